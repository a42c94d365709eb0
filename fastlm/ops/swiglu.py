"""SwiGLU ops of :mod:`fastlm.ops`: :func:`swiglu` and its packed form :func:`swiglu_packed`."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm.ops.backend import resolve_backend

__all__ = ["swiglu", "swiglu_packed"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` (SwiGLU's gating), any shape, float16/bfloat16/float32/float64.

    ``gate`` and ``up`` must share shape, dtype and device. Returns gate's dtype; differentiable.
    """
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"swiglu: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate and up dtypes differ ({gate.dtype}, {up.dtype})")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate on {gate.device}, up on {up.device}")
    obj = resolve_backend("swiglu", backend, gate.device.type, lambda b: b.swiglu_unsupported(gate, up))
    return obj.swiglu(gate, up)


def swiglu_packed(x: Tensor, *, backend: str = "auto") -> Tensor:
    """``silu(x[..., :H]) * x[..., H:]`` for ``x`` of shape ``[..., 2H]`` (gate and up packed along
    the last dim, as one fused ``Linear(n_embd, 2H)`` produces them). Returns ``[..., H]`` in x's
    dtype; differentiable (the gradient is one ``[..., 2H]`` tensor). Equal to
    ``swiglu(*x.chunk(2, -1))``, but the ``cpp`` and ``triton`` kernels read the halves in place and
    write the gradient without a concatenation.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"swiglu_packed: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"swiglu_packed: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu_packed: the last dim of x must be even ([gate | up]), got shape {tuple(x.shape)}")
    obj = resolve_backend("swiglu_packed", backend, x.device.type, lambda b: b.swiglu_packed_unsupported(x))
    return obj.swiglu_packed(x)
