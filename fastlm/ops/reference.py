"""Pure-PyTorch reference ops with hand-written backward passes.

This is the CPU/MPS fallback of :mod:`fastlm.ops` and the oracle of every parity test. The math is
explicit (scores, mask, softmax statistics, the chain rule written out) so it can be read like a
from-scratch layer; ``torch.autograd.gradcheck`` checks each backward in float64.

Conventions shared by every backend (see :func:`fastlm.ops.attention`):

* layout ``(B, H, T, D)`` for q and ``(B, H_kv, T_k, D)`` for k/v, any strides, ``H % H_kv == 0``
  (grouped-query attention: query head ``h`` reads kv head ``h // (H // H_kv)``);
* causal masking is aligned **bottom-right**: query row ``i`` sits at key position
  ``i + T_k - T_q`` and sees keys ``j <= i + T_k - T_q`` (what a KV cache needs); sliding windows
  and document segments follow the same alignment (:mod:`fastlm.ops.masks`);
* ALiBi as in FlashAttention: ``score[h, i, j] -= slope[h] * |i + T_k - T_q - j|``;
* statistics (row max, row sum, log-sum-exp) in float32, or float64 for float64 inputs;
* a fully masked row (causal or document masks with ``T_q > T_k``) outputs zeros, not NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastlm.ops import reference_bpe, reference_muon
from fastlm.ops.masks import visible_mask
from fastlm.ops.protocol import BackendBase

__all__ = [
    "attention",
    "attention_forward",
    "attention_backward",
    "swiglu",
    "swiglu_packed",
    "swiglu_forward",
    "swiglu_backward",
    "naive_attention",
    "alibi_bias",
    "causal_mask",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(t_q: int, t_k: int, device=None) -> Tensor:
    """Boolean ``(T_q, T_k)`` mask, True where the key is visible (bottom-right aligned)."""
    i = torch.arange(t_q, device=device).unsqueeze(1)
    j = torch.arange(t_k, device=device).unsqueeze(0)
    return j <= i + (t_k - t_q)


def alibi_bias(slopes: Tensor, t_q: int, t_k: int, dtype=torch.float32) -> Tensor:
    """ALiBi bias ``(H, T_q, T_k)``: ``-slope_h * |i + T_k - T_q - j|``."""
    i = torch.arange(t_q, device=slopes.device).unsqueeze(1)
    j = torch.arange(t_k, device=slopes.device).unsqueeze(0)
    dist = (i + (t_k - t_q) - j).abs().to(dtype)
    return -slopes.to(dtype).view(-1, 1, 1) * dist


def _expand_kv(x: Tensor, n_head: int) -> Tensor:
    """(B, H_kv, T, D) -> (B, H, T, D) by repeating each kv head for its group of query heads."""
    h_kv = x.shape[1]
    if h_kv == n_head:
        return x
    return x.repeat_interleave(n_head // h_kv, dim=1)


def _reduce_kv(g: Tensor, h_kv: int) -> Tensor:
    """(B, H, T, D) -> (B, H_kv, T, D): sum the gradient over each group of query heads."""
    b, h, t, d = g.shape
    if h == h_kv:
        return g
    return g.view(b, h_kv, h // h_kv, t, d).sum(dim=2)


def _scores(q, k, scale, causal, alibi_slopes, window=None, segment_ids=None):
    """Masked, biased scores ``(B, H, T_q, T_k)`` in the compute dtype, plus the visibility mask."""
    ct = _compute_dtype(q.dtype)
    t_q, t_k = q.shape[2], k.shape[2]
    s = torch.matmul(q.to(ct), _expand_kv(k, q.shape[1]).to(ct).transpose(-2, -1)) * scale
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, t_q, t_k, dtype=ct)
    visible = visible_mask(t_q, t_k, causal, window, segment_ids, device=q.device)
    if visible is not None:
        visible = visible.unsqueeze(1)  # (B or 1, 1, T_q, T_k): every head alike
        s = s.masked_fill(~visible, float("-inf"))
    return s, visible


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    alibi_slopes: Optional[Tensor] = None,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
):
    """Returns ``(out, lse)``: out ``(B, H, T_q, D)`` in q's dtype, lse ``(B, H, T_q)`` float32/64.

    ``lse`` is the natural-log sum of exp of the (scaled, biased) scores of each row; ``-inf`` for a
    fully masked row.
    """
    ct = _compute_dtype(q.dtype)
    s, _ = _scores(q, k, scale, causal, alibi_slopes, window, segment_ids)
    m = s.amax(dim=-1, keepdim=True)  # row max, -inf for fully masked rows
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    l = p.sum(dim=-1, keepdim=True)
    safe_l = torch.where(l > 0, l, torch.ones_like(l))
    p = p / safe_l
    out = torch.matmul(p, _expand_kv(v, q.shape[1]).to(ct))
    lse = (m + torch.log(l)).squeeze(-1)  # log(0) = -inf for fully masked rows
    return out.to(q.dtype), lse


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    alibi_slopes: Optional[Tensor] = None,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
):
    """Gradients ``(dq, dk, dv)`` of the attention forward, recomputing P from the saved LSE.

    With ``P = softmax(S)``, ``O = P V``:  ``dV = P^T dO``, ``dP = dO V^T``,
    ``dS = P * (dP - rowsum(dO * O))``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``;
    for GQA the dK/dV of the query heads sharing a kv head are summed.
    """
    ct = _compute_dtype(q.dtype)
    h, h_kv = q.shape[1], k.shape[1]
    s, _ = _scores(q, k, scale, causal, alibi_slopes, window, segment_ids)
    lse_c = lse.to(ct).unsqueeze(-1)
    lse_safe = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    p = torch.exp(s - lse_safe)  # masked entries -> 0; fully masked rows -> all 0
    do = dout.to(ct)
    ve = _expand_kv(v, h).to(ct)
    ke = _expand_kv(k, h).to(ct)
    dv = torch.matmul(p.transpose(-2, -1), do)  # (B, H, T_k, D)
    dp = torch.matmul(do, ve.transpose(-2, -1))  # (B, H, T_q, T_k)
    delta = (do * out.to(ct)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.to(ct)) * scale
    return dq.to(q.dtype), _reduce_kv(dk, h_kv).to(k.dtype), _reduce_kv(dv, h_kv).to(v.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, alibi_slopes, window, segment_ids):
        out, lse = attention_forward(q, k, v, causal, scale, alibi_slopes, window, segment_ids)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, segment_ids)
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, alibi_slopes, segment_ids = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            dout, q, k, v, out, lse, ctx.causal, ctx.scale, alibi_slopes, ctx.window, segment_ids
        )
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Reference attention (differentiable through a hand-written backward). No input checks:
    call :func:`fastlm.ops.attention` for validated input."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _Attention.apply(q, k, v, causal, float(scale), alibi_slopes, window, segment_ids)


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` computed in float32 (float64 for float64 input), returned in gate's dtype."""
    ct = _compute_dtype(gate.dtype)
    g = gate.to(ct)
    return (g * torch.sigmoid(g) * up.to(ct)).to(gate.dtype)


def swiglu_backward(dout: Tensor, gate: Tensor, up: Tensor):
    """``d up = dout * silu(g)``; ``d gate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))``."""
    ct = _compute_dtype(gate.dtype)
    g, u, do = gate.to(ct), up.to(ct), dout.to(ct)
    sig = torch.sigmoid(g)
    d_up = do * g * sig
    d_gate = do * u * sig * (1.0 + g * (1.0 - sig))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dout, gate, up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Reference SwiGLU ``silu(gate) * up`` with a hand-written backward."""
    return _SwiGLU.apply(gate, up)


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        return torch.cat(swiglu_backward(dout, gate, up), dim=-1)


def swiglu_packed(x: Tensor) -> Tensor:
    """Reference packed SwiGLU: ``x = [..., 2H]`` holds ``[gate | up]``; returns ``[..., H]``."""
    return _SwiGLUPacked.apply(x)


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float64,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """The textbook formula through plain autograd, in ``dtype`` (float64 by default): the oracle
    that tests compare every backend (and the hand-written backward above) against."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    h = q.shape[1]
    qd, kd, vd = q.to(dtype), _expand_kv(k, h).to(dtype), _expand_kv(v, h).to(dtype)
    s = (qd @ kd.transpose(-2, -1)) * scale
    t_q, t_k = q.shape[2], k.shape[2]
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, t_q, t_k, dtype=dtype)
    vis = visible_mask(t_q, t_k, causal, window, segment_ids, device=q.device)
    if vis is not None:
        vis = vis.unsqueeze(1)
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(vis.any(dim=-1, keepdim=True), p, torch.zeros_like(p))  # fully masked -> 0
    else:
        p = torch.softmax(s, dim=-1)
    return p @ vd


# ---- backend interface used by fastlm.ops ------------------------------------------------------
class ReferenceBackend(BackendBase):
    """Every op in plain PyTorch (the Muon step: :mod:`fastlm.ops.reference_muon`; BPE training in
    Python: :mod:`fastlm.ops.reference_bpe`)."""

    name = "reference"

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        return None

    def attention(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        return attention(q, k, v, causal, scale, alibi_slopes, window, segment_ids)

    def swiglu_unsupported(self, gate, up):
        return None

    def swiglu(self, gate, up):
        return swiglu(gate, up)

    def swiglu_packed_unsupported(self, x):
        return None

    def swiglu_packed(self, x):
        return swiglu_packed(x)

    def muon_step_unsupported(self, params, grads, momentum_buffers, ns_dtype):
        return None

    def muon_step(self, params, grads, momentum_buffers, **kwargs):
        reference_muon.muon_step(params, grads, momentum_buffers, **kwargs)

    def bpe_train_unsupported(self):
        return None

    def bpe_train(self, words, counts, num_merges):
        return reference_bpe.bpe_train(words, counts, num_merges)


BACKEND = ReferenceBackend()
