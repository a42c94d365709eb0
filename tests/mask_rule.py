"""The mask rule of fastlm's attention, written out for the tests (tests/test_attention_masks_cpp.py,
tests/test_attention_common.py, tests/test_cuda_host_sim.py): the dense boolean mask of causal,
sliding-window and document masking, the attention it defines written out (the float64 oracle),
document ids to draw, and the document bounds the kernels take.

Query i sits at key position p = i + T_k - T_q (bottom-right aligned). A window w keeps the keys j
with p - w < j <= p (causal) or |p - j| < w (not causal); segment ids (B, T_k) keep the keys whose id
equals the id of position p, and none when p is outside [0, T_k).
"""

from __future__ import annotations

import torch


def visible(b, t_q, t_k, causal, window, seg):
    """(B, T_q, T_k) bool: which keys each query sees, straight from the rule."""
    p = torch.arange(t_q)[:, None] + (t_k - t_q)
    j = torch.arange(t_k)[None, :]
    m = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        m = m & (j <= p)
    if window is not None:
        m = m & ((j > p - window) if causal else ((p - j).abs() < window))
    m = m.expand(b, t_q, t_k)
    if seg is not None:
        own = seg[:, p[:, 0].clamp(0, t_k - 1)]  # (B, T_q): the id of each query's position
        inside = ((p >= 0) & (p < t_k))[None]
        m = m & inside & (own[:, :, None] == seg[:, None, :])
    return m


def alibi(slopes, t_q, t_k):
    p = torch.arange(t_q)[:, None] + (t_k - t_q)
    return -slopes.double()[:, None, None] * (p - torch.arange(t_k)[None, :]).abs()  # (H, T_q, T_k)


def oracle(q, k, v, mask, scale, slopes):
    """Masked softmax attention, written out; a row that sees nothing gives zeros."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(g, 1) for x in (k, v))
    s = q @ k.transpose(-1, -2) * scale
    if slopes is not None:
        s = s + alibi(slopes, q.shape[2], k.shape[2]).to(s.dtype)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    mx = s.amax(-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isfinite(mx), mx, 0))
    den = e.sum(-1, keepdim=True)
    return (e / torch.where(den > 0, den, 1)) @ v


def doc_ids(b, t, kind, gen, window=None, dtype=torch.int64):
    """(B, T) non-decreasing ids; each batch row gets its own split."""
    rows = []
    for r in range(b):
        if kind == "random":  # random cuts, ids with gaps (ids need not be 0, 1, 2, ...)
            cuts = (
                torch.randperm(t - 1, generator=gen)[: int(torch.randint(1, max(2, t // 6), (1,), generator=gen))] + 1
            )
            starts = torch.zeros(t, dtype=torch.int64)
            starts[cuts] = torch.randint(1, 4, (len(cuts),), generator=gen)
            rows.append(starts.cumsum(0) + 7 * r)
        elif kind == "len1":  # a document of length 1 in the middle and one at each end
            ids = torch.zeros(t, dtype=torch.int64)
            mid = t // 2 + r
            ids[mid:] = 1
            ids[mid + 1 :] = 2
            ids[-1] = 3
            ids[1:] += 1
            rows.append(ids)
        elif kind == "per_window":  # one document per window
            rows.append((torch.arange(t) + r) // window)
        elif kind == "edges":  # boundaries right after the first and right before the last token
            ids = torch.ones(t, dtype=torch.int64)
            ids[0], ids[-1] = 0, 2
            rows.append(ids)
    return torch.stack(rows).to(dtype)


def doc_bounds(seg):
    """(B, 2, T) int64: first position and one past the last of each position's document."""
    b, t = seg.shape
    out = torch.empty(b, 2, t, dtype=torch.int64)
    for r in range(b):
        for x in range(t):
            same = (seg[r] == seg[r, x]).nonzero().flatten()
            out[r, 0, x], out[r, 1, x] = int(same[0]), int(same[-1]) + 1
    return out
