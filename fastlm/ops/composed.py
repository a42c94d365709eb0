"""Composed forms (plain PyTorch ops, any device, autograd) of the ops whose fused kernels only some
backends have: what :class:`fastlm.ops.protocol.BackendBase` runs for a backend without the kernel,
and the oracle of the kernels' parity tests (with the float64 gradcheck of the kernels themselves).
Imports nothing from fastlm, so the backend protocol can hold it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["layer_norm", "qk_norm_value_mix"]


def qk_norm_value_mix(
    qkv: Tensor, n_head: int, n_kv_head: int, q_gain, k_gain, norm: str, eps: float, ve, ve_mix, out_dtype, ve_idx=None
) -> Tensor:
    """The composed form of :func:`fastlm.ops.qk_norm_value_mix` (no input checks): split, torch's
    ``F.layer_norm``/``F.rms_norm`` on the head views, the mix (with ``ve_idx``, of the rows
    ``F.embedding(ve_idx, ve)``), a concatenation; plain autograd. A wider ``out_dtype`` upcasts ``qkv``
    first, so the math runs there."""
    if out_dtype != qkv.dtype:
        qkv = qkv.to(out_dtype)
    B, T, W = qkv.shape
    H, Hkv = n_head, n_kv_head
    D = W // (H + 2 * Hkv)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    if q_gain is not None:
        if norm == "rmsnorm":
            q = F.rms_norm(q.view(B, T, H, D), (D,), q_gain, eps).view(B, T, H * D)
            k = F.rms_norm(k.view(B, T, Hkv, D), (D,), k_gain, eps).view(B, T, Hkv * D)
        else:
            q = F.layer_norm(q.view(B, T, H, D), (D,), q_gain, None, eps).view(B, T, H * D)
            k = F.layer_norm(k.view(B, T, Hkv, D), (D,), k_gain, None, eps).view(B, T, Hkv * D)
    if ve is not None:
        v = ve_mix[0] * v + ve_mix[1] * (ve if ve_idx is None else F.embedding(ve_idx, ve))
    # under autocast the norms and an fp32 mix promote: keep qkv's dtype (as a KV cache does)
    return torch.cat([q, k, v], dim=-1).to(qkv.dtype)


def layer_norm(x: Tensor, weight, bias, residual, norm: str, eps: float, out_dtype):
    """The composed form of :func:`fastlm.ops.layer_norm` (no input checks): ``s = x + residual``
    (x's dtype: the residual is never wider), torch's ``F.layer_norm`` or ``F.rms_norm`` (plus
    ``bias``) over the last dim of ``s``, the cast to ``out_dtype``; ``(out, s)`` with a residual."""
    s = x if residual is None else x + residual
    shape = (s.shape[-1],)
    if norm == "rmsnorm":
        y = F.rms_norm(s, shape, weight, eps)
        if bias is not None:
            y = y + bias
    else:
        y = F.layer_norm(s, shape, weight, bias, eps)
    y = y.to(out_dtype)
    return y if residual is None else (y, s)
