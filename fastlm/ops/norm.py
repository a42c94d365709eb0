"""The model's pre-norms as one op: :func:`layer_norm` (LayerNorm or RMSNorm over the last dim, with the
residual add before it and the autocast step's cast to bfloat16 after it, all in one pass)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastlm.ops.backend import resolve_backend

__all__ = ["layer_norm", "NORMS"]

NORMS = ("layernorm", "rmsnorm")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.bfloat16, torch.float16)


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    residual: Optional[Tensor] = None,
    norm: str = "layernorm",
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Normalise ``x`` ``(..., C)`` over its last dim: ``norm="layernorm"`` gives
    ``(x - mean) / sqrt(var + eps) * weight + bias`` (``F.layer_norm``), ``"rmsnorm"`` gives
    ``x / sqrt(mean(x^2) + eps) * weight (+ bias)`` (``F.rms_norm``); ``weight`` and ``bias`` ``(C,)``
    are optional.

    With ``residual`` (x's shape, a dtype no wider than x's), the norm is of ``s = x + residual``
    (x's dtype, as torch's ``x + residual`` gives it) and the call returns ``(out, s)``: a pre-norm
    block's residual add and its next norm in one pass, as FlashAttention's fused
    ``dropout_add_layer_norm`` does. Without it the call returns ``out``.

    ``out`` is a new tensor of x's shape in ``out_dtype``: x's dtype (default), or bfloat16/float16 for
    a float32 ``x``, the value rounded once from the float32 result (what ``F.layer_norm(x).to(out_dtype)``
    gives: the CPU autocast step, whose next Linear takes bfloat16, gets it without a separate cast).
    Differentiable in ``x``, ``weight``, ``bias`` and ``residual``; gradients take their inputs' dtypes.

    The ``cpp`` backend (CPU) runs one fused C++ op each way (autograd wired in C++): math in float32
    (float64 for float64), the statistics recomputed in the backward, the parameter gradients reduced
    in a fixed order whatever the thread count. Other backends run the composed form (an add,
    ``F.layer_norm`` / ``F.rms_norm``, a cast).
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(
            f"layer_norm: x must be a tensor of at least one dim, got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    out_dtype = out_dtype or x.dtype
    if out_dtype != x.dtype and not (x.dtype == torch.float32 and out_dtype in _REDUCED):
        raise ValueError(
            f"layer_norm: out_dtype must be x's dtype ({x.dtype}) or bfloat16/float16 for a float32 x, got {out_dtype}"
        )
    C = x.shape[-1]
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("residual", residual, tuple(x.shape))):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"layer_norm: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"layer_norm: {name} must be {shape} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} on {t.device}, x on {x.device}")
    if residual is not None and torch.promote_types(x.dtype, residual.dtype) != x.dtype:
        raise TypeError(
            f"layer_norm: residual ({residual.dtype}) must not be wider than x ({x.dtype}): s = x + residual "
            f"takes x's dtype"
        )
    if norm not in NORMS:
        raise ValueError(f"layer_norm: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm: eps must be a positive number, got {eps!r}")
    args = (x, weight, bias, residual, norm, float(eps), out_dtype)
    obj = resolve_backend("layer_norm", backend, x.device.type, lambda b: b.layer_norm_unsupported(*args))
    return obj.layer_norm(*args)
