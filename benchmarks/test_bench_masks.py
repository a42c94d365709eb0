"""Masked attention: sliding windows and documents, forward+backward, against what the same call
costs without skipping.

For each case (B=2, H=4, D=64; T = 1024, 2048, 4096; causal; a window of 128 or 512 keys, or 8 or 32
documents of random lengths per row) every row times:

* ``cpp`` / ``triton`` / ``cuda``: fastlm's kernels, which skip every tile the mask hides;
* ``torch``: ``F.scaled_dot_product_attention`` given the equivalent dense boolean mask (fastlm's
  torch backend: every score is computed, then masked);
* ``<kernel>-dense``: the same fastlm kernel on the plain causal call (the cost without skipping);
* ``flex``: FlexAttention's forward with the same ``mask_mod`` where it runs (it has no CPU
  backward; its forward-only row is recorded as ``fwd``).

FLOPs count the visible (query, key) pairs: 4·D per pair forward, 2.5x that backward.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastlm import ops
from fastlm.ops.masks import visible_mask

from .common import DEVICE, ON_GPU, dtype_name, gpu_oom_skip, skip_unless_fastlm_backend

B, H, D = 2, 4, 64
KERNEL = "triton" if ON_GPU else "cpp"


def _cases():
    dtypes = (torch.bfloat16,) if ON_GPU else (torch.float32, torch.bfloat16)
    out = []
    for dtype in dtypes:
        for t in (1024, 2048, 4096):
            if dtype == torch.bfloat16 and not ON_GPU and t != 2048:
                continue  # bf16 on CPU: one length
            out += [dict(T=t, window=w, docs=None, dtype=dtype) for w in (128, 512)]
            out += [dict(T=t, window=None, docs=n, dtype=dtype) for n in (8, 32)]
    return out


def _case_id(c):
    mask = f"w{c['window']}" if c["window"] else f"docs{c['docs']}"
    return f"t{c['T']}-{mask}-{dtype_name(c['dtype'])}"


def _segments(t, n, seed=0):
    """``n`` documents of random lengths per row, as non-decreasing ids ``(B, T)``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        cuts = sorted(rng.sample(range(1, t), n - 1))
        ids = torch.zeros(t, dtype=torch.int64)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows).to(DEVICE)


def _visible_pairs(t, window, seg):
    return float(visible_mask(t, t, True, window, seg, device=DEVICE).sum()) * (B if seg is None else 1) * H


BACKENDS = (KERNEL, "torch", f"{KERNEL}-dense", "flex")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_masked_attention(bench, case, backend):
    t, window, dtype = case["T"], case["window"], case["dtype"]
    seg = _segments(t, case["docs"]) if case["docs"] else None
    masks = {"window": window, "segment_ids": seg}
    fastlm_backend = backend.removesuffix("-dense")
    if backend != "flex":
        skip_unless_fastlm_backend(fastlm_backend)

    def make():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(B, H, t, D, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        return q, k, v, torch.randn(B, H, t, D, device=DEVICE, dtype=dtype, generator=g)

    q, k, v, dout = gpu_oom_skip(make)
    pass_ = "fwd+bwd"
    if backend == "flex":
        call, pass_ = _flex_call(q, k, v, window, seg), "fwd"
    elif backend.endswith("-dense"):
        call = lambda: ops.attention(q, k, v, causal=True, backend=fastlm_backend)  # noqa: E731
    else:
        try:
            ops.attention_backend(q, k, v, causal=True, backend=backend, **masks)
        except ops.BackendUnavailableError as e:
            pytest.skip(str(e))
        call = lambda: ops.attention(q, k, v, causal=True, backend=backend, **masks)  # noqa: E731
    fn = call if pass_ == "fwd" else (lambda: torch.autograd.grad(call(), (q, k, v), dout))
    gpu_oom_skip(fn)  # a try-out call outside the timing
    bench.benchmark.group = f"masked attention {_case_id(case)}"
    median = gpu_oom_skip(lambda: bench.time(fn))
    pairs = _visible_pairs(t, window, seg) if not backend.endswith("-dense") else B * H * t * (t + 1) / 2
    flops = 4.0 * D * pairs * (3.5 if pass_ == "fwd+bwd" else 1.0)
    bench.record(
        suite="attention_masks",
        op="attention",
        pass_=pass_,
        backend=backend,
        median_s=median,
        dtype=dtype_name(dtype),
        causal=True,
        variant=_case_id(case).split("-")[1],
        shape={"B": B, "H": H, "H_kv": H, "T_q": t, "T_k": t, "D": D},
        flops=flops,
        window=window,
        documents=case["docs"],
    )


def _flex_call(q, k, v, window, seg):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        pytest.skip(f"no FlexAttention in this torch: {e}")

    def mask_mod(b, h, i, j):
        keep = j <= i
        if window is not None:
            keep = keep & (i - j < window)
        if seg is not None:
            keep = keep & (seg[b, i] == seg[b, j])
        return keep

    t = q.shape[2]
    try:
        block_mask = create_block_mask(mask_mod, B if seg is not None else None, None, t, t, device=DEVICE.type)
        qd, kd, vd = (x.detach() for x in (q, k, v))
        flex_attention(qd, kd, vd, block_mask=block_mask)
    except Exception as e:  # noqa: BLE001 - FlexAttention says why it cannot run here
        pytest.skip(f"FlexAttention cannot run here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return lambda: flex_attention(qd, kd, vd, block_mask=block_mask)
