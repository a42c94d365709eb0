"""Fused SwiGLU ``silu(gate) * up`` in Triton: forward and backward, split and packed inputs.

* :func:`swiglu` -- ``gate`` and ``up`` of any (equal) shape. Inputs are made contiguous
  (``.contiguous()`` copies only when they are not), so the kernels index one flat range.
* :func:`swiglu_packed` -- one tensor ``x`` of shape ``[..., 2 * hidden]`` whose first half of the
  last dim is the gate and the second half is up (what a fused ``w_gate|w_up`` linear produces);
  returns ``[..., hidden]``; its gradient is ``[..., 2 * hidden]``. ``x`` is read in place when its
  last dim is contiguous (any row stride), otherwise copied.

Math in fp32 whatever the storage dtype; the backward recomputes ``sigmoid(gate)`` rather than
saving it and writes fresh gradient tensors:
``d_up = dout * silu(g)``, ``d_gate = dout * up * s * (1 + g * (1 - s))`` with ``s = sigmoid(g)``.
Split kernels: a 1-D grid over the flat elements with a large BLOCK, int64 offsets. Packed
kernels: a 2-D grid of (row, column block) programs, so no per-element division by the row width.
Kernel objects are created at launch time in the current mode (``TRITON_INTERPRET`` or compiled),
through :mod:`fastlm.kernels.launch` like those of :mod:`fastlm.kernels.attention`.
Ops: ``fastlm::triton_swiglu_fwd/bwd`` and ``fastlm::triton_swiglu_packed_fwd/bwd``.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastlm.ops._autograd import register_elementwise_autograd

from .launch import interpreting, is_traced, jit, wrap

__all__ = [
    "swiglu",
    "swiglu_packed",
    "swiglu_forward",
    "swiglu_backward",
    "swiglu_packed_forward",
    "swiglu_packed_backward",
]


def _swiglu_fwd_kernel(G, U, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    do = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    du = do * g * s
    dg = do * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def _swiglu_packed_fwd_kernel(X, OUT, HIDDEN, stride_xrow, BLOCK: tl.constexpr):
    # program (row, column block): gate at X[row, col], up at X[row, HIDDEN + col]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x_row = X + row * stride_xrow
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + row * HIDDEN + cols, out.to(OUT.dtype.element_ty), mask=mask)


def _swiglu_packed_bwd_kernel(DOUT, X, DX, HIDDEN, stride_xrow, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x_row = X + row * stride_xrow
    do = tl.load(DOUT + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    du = do * g * s
    dg = do * u * s * (1.0 + g * (1.0 - s))
    dx_row = DX + row * (2 * HIDDEN)  # dx is a fresh contiguous [rows, 2 * HIDDEN]
    tl.store(dx_row + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_row + HIDDEN + cols, du.to(DX.dtype.element_ty), mask=mask)


def _flat_cfg() -> dict:
    # interpreter: one block of 1024 is fast enough; GPU: 4096 elements per program, 8 warps
    return {"BLOCK": 1024} if interpreting() else {"BLOCK": 4096, "num_warps": 8}


def _row_cfg(hidden: int) -> dict:
    """Column block of the packed kernels: the row's width up to a cap (a power of two)."""
    cap = 1024 if interpreting() else 2048
    block = min(cap, max(16, triton.next_power_of_2(hidden)))
    return {"BLOCK": block} if interpreting() else {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8}


def _check(t: Tensor, name: str):
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton swiglu: {name} dtype {t.dtype} not supported (float16/bfloat16/float32)")


# ---- launchers ---------------------------------------------------------------------------------
def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, "gate")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n == 0 or (is_traced(gate, up) and interpreting()):
        return out
    cfg = _flat_cfg()
    wrap(jit(_swiglu_fwd_kernel))[(triton.cdiv(n, cfg["BLOCK"]),)](gate, up, out, n, **cfg)
    return out


def swiglu_backward(dout: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    d_gate = torch.empty_like(gate)
    d_up = torch.empty_like(up)
    n = gate.numel()
    if n == 0 or (is_traced(dout, gate, up) and interpreting()):
        return d_gate, d_up
    cfg = _flat_cfg()
    wrap(jit(_swiglu_bwd_kernel))[(triton.cdiv(n, cfg["BLOCK"]),)](dout, gate, up, d_gate, d_up, n, **cfg)
    return d_gate, d_up


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``[rows, 2 * hidden]`` with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def swiglu_packed_forward(x: Tensor) -> Tensor:
    _check(x, "x")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu_packed: last dim must be even (gate | up), got shape {tuple(x.shape)}")
    hidden = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], hidden))
    if out.numel() == 0 or (is_traced(x) and interpreting()):
        return out
    x2 = _rows(x)
    cfg = _row_cfg(hidden)
    grid = (x2.shape[0], triton.cdiv(hidden, cfg["BLOCK"]))
    wrap(jit(_swiglu_packed_fwd_kernel))[grid](x2, out, hidden, x2.stride(0), **cfg)
    return out


def swiglu_packed_backward(dout: Tensor, x: Tensor) -> Tensor:
    hidden = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dout = dout.contiguous()
    if dout.numel() == 0 or (is_traced(dout, x) and interpreting()):
        return dx
    x2 = _rows(x)
    cfg = _row_cfg(hidden)
    grid = (x2.shape[0], triton.cdiv(hidden, cfg["BLOCK"]))
    wrap(jit(_swiglu_packed_bwd_kernel))[grid](dout, x2, dx, hidden, x2.stride(0), **cfg)
    return dx


# ---- torch.library ops + autograd --------------------------------------------------------------
@torch.library.triton_op("fastlm::triton_swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_forward(gate, up)


@torch.library.triton_op("fastlm::triton_swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    return swiglu_backward(dout, gate, up)


@torch.library.triton_op("fastlm::triton_swiglu_packed_fwd", mutates_args=())
def _swiglu_packed_fwd_op(x: Tensor) -> Tensor:
    return swiglu_packed_forward(x)


@torch.library.triton_op("fastlm::triton_swiglu_packed_bwd", mutates_args=())
def _swiglu_packed_bwd_op(dout: Tensor, x: Tensor) -> Tensor:
    return swiglu_packed_backward(dout, x)


register_elementwise_autograd(_swiglu_fwd_op, _swiglu_bwd_op)
register_elementwise_autograd(_swiglu_packed_fwd_op, _swiglu_packed_bwd_op)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Differentiable fused ``silu(gate) * up`` (same shape, dtype and device; not validated here)."""
    return _swiglu_fwd_op(gate, up)


def swiglu_packed(x: Tensor) -> Tensor:
    """Differentiable ``silu(x[..., :H]) * x[..., H:]`` for ``x`` of shape ``[..., 2H]``."""
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu_packed: last dim must be even (gate | up), got shape {tuple(x.shape)}")
    return _swiglu_packed_fwd_op(x)
