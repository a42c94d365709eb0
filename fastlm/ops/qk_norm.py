"""The step between the model's packed qkv projection and its attention: :func:`qk_norm_value_mix`
(QK-norm and the value-embedding mix of the speedrun options, one op)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastlm.ops.backend import resolve_backend

__all__ = ["qk_norm_value_mix", "NORMS"]

NORMS = ("layernorm", "rmsnorm")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, shape: tuple, device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"qk_norm_value_mix: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qk_norm_value_mix: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"qk_norm_value_mix: {name} must be {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"qk_norm_value_mix: {name} on {t.device}, qkv on {device}")


def _check_value_embedding(ve, ve_mix, ve_idx, B: int, T: int, width: int, device) -> None:
    """ve and ve_mix go together; ve is (B, T, width), or with ve_idx ((B, T) int64/int32 ids) a
    (V, width) table."""
    if (ve is None) != (ve_mix is None):
        raise ValueError("qk_norm_value_mix: ve and ve_mix go together (both or neither)")
    if ve_idx is None:
        if ve is not None:
            _check_tensor("ve", ve, (B, T, width), device)
    else:
        if ve is None:
            raise ValueError("qk_norm_value_mix: ve_idx indexes the table ve: pass ve (and ve_mix) with it")
        if not isinstance(ve_idx, Tensor) or ve_idx.dtype not in (torch.int64, torch.int32):
            got = getattr(ve_idx, "dtype", type(ve_idx).__name__)
            raise TypeError(f"qk_norm_value_mix: ve_idx must be an int64/int32 tensor, got {got}")
        if tuple(ve_idx.shape) != (B, T) or ve_idx.device != device:
            raise ValueError(f"qk_norm_value_mix: ve_idx must be ({B}, {T}) on {device}, got {tuple(ve_idx.shape)}")
        rows = ve.shape[0] if isinstance(ve, Tensor) and ve.dim() == 2 and ve.shape[0] > 0 else -1
        _check_tensor("ve", ve, (rows, width), device)
    if ve_mix is not None:
        _check_tensor("ve_mix", ve_mix, (2,), device)


def qk_norm_value_mix(
    qkv: Tensor,
    n_head: int,
    n_kv_head: Optional[int] = None,
    *,
    q_gain: Optional[Tensor] = None,
    k_gain: Optional[Tensor] = None,
    norm: str = "layernorm",
    eps: float = 1e-5,
    ve: Optional[Tensor] = None,
    ve_mix: Optional[Tensor] = None,
    ve_idx: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tensor:
    """QK-norm and the value-embedding mix on a packed projection ``qkv`` ``(B, T, (H + 2 H_kv) D)``
    (``[q heads | k heads | v heads]`` per token, the layout of :func:`fastlm.ops.attention_qkv`):

    * with ``q_gain`` and ``k_gain`` (each ``(D,)``): every query head becomes
      ``norm(q_h) * q_gain`` and every key head ``norm(k_h) * k_gain``, ``norm`` over the head dim:
      ``"layernorm"`` (no bias: ``(x - mean) / sqrt(var + eps)``) or ``"rmsnorm"``
      (``x / sqrt(mean(x^2) + eps)``);
    * with ``ve`` ``(B, T, H_kv D)`` and ``ve_mix`` ``(2,)``: the values become
      ``ve_mix[0] * v + ve_mix[1] * ve``; with ``ve_idx`` (integer ``(B, T)``), ``ve`` is instead a
      ``(V, H_kv D)`` embedding table and the mix takes its rows ``ve[ve_idx]``: the lookup happens in
      the op's pass and the table's gradient is summed per row in token order (an embedding's
      ``index_add`` backward), so the ``(B, T, H_kv D)`` lookup and its gradient are never stored.

    Returns a new ``(B, T, W)`` tensor in ``out_dtype``: qkv's dtype (default), or float32 for a
    bfloat16/float16 ``qkv`` (the CPU autocast step, whose attention computes in float32: the upcast
    happens in the same pass). Differentiable in ``qkv``, the gains, ``ve`` and ``ve_mix``.

    Equal to splitting ``qkv``, ``F.layer_norm``/``F.rms_norm`` on the head views, the mix and a
    concatenation (the composed form, what every backend without a kernel for it runs: the model's
    math before this op existed). The ``cpp`` backend (CPU) runs one fused C++ op each way instead:
    one pass over the rows, math in float32 (float64 for float64), the gain/mix gradients reduced in
    a fixed order whatever the thread count.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        raise ValueError(
            f"qk_norm_value_mix: qkv must be a (B, T, (H + 2 H_kv) D) tensor, got "
            f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}"
        )
    if qkv.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qk_norm_value_mix: qkv must be float16/bfloat16/float32/float64, got {qkv.dtype}")
    H = int(n_head)
    Hkv = H if n_kv_head is None else int(n_kv_head)
    if H <= 0 or Hkv <= 0 or H % Hkv:
        raise ValueError(f"qk_norm_value_mix: n_head ({H}) must be a positive multiple of n_kv_head ({Hkv})")
    B, T, W = qkv.shape
    if W == 0 or W % (H + 2 * Hkv):
        raise ValueError(f"qk_norm_value_mix: width {W} is not ({H} + 2 * {Hkv}) heads of one size")
    D = W // (H + 2 * Hkv)
    if (q_gain is None) != (k_gain is None):
        raise ValueError("qk_norm_value_mix: q_gain and k_gain go together (both or neither)")
    if q_gain is not None:
        _check_tensor("q_gain", q_gain, (D,), qkv.device)
        _check_tensor("k_gain", k_gain, (D,), qkv.device)
    _check_value_embedding(ve, ve_mix, ve_idx, B, T, Hkv * D, qkv.device)
    if norm not in NORMS:
        raise ValueError(f"qk_norm_value_mix: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"qk_norm_value_mix: eps must be a positive number, got {eps!r}")
    reduced = qkv.dtype in (torch.bfloat16, torch.float16)
    if out_dtype is not None and out_dtype != qkv.dtype and not (reduced and out_dtype == torch.float32):
        raise ValueError(
            f"qk_norm_value_mix: out_dtype must be qkv's dtype ({qkv.dtype}) or float32 for a bfloat16/float16 "
            f"qkv, got {out_dtype}"
        )
    args = (qkv, H, Hkv, q_gain, k_gain, norm, float(eps), ve, ve_mix, out_dtype or qkv.dtype, ve_idx)
    obj = resolve_backend(
        "qk_norm_value_mix", backend, qkv.device.type, lambda b: b.qk_norm_value_mix_unsupported(*args)
    )
    return obj.qk_norm_value_mix(*args)
