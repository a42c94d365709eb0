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
1-D grid over elements with a large BLOCK, int64 offsets. Kernel objects are created at launch
time in the current mode (``TRITON_INTERPRET`` or compiled), like :mod:`fastlm.kernels.attention`.
Ops: ``fastlm::triton_swiglu_fwd/bwd`` and ``fastlm::triton_swiglu_packed_fwd/bwd``.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import _is_interpreted, _is_traced, _wrap, interpreting

__all__ = ["swiglu", "swiglu_packed", "swiglu_forward", "swiglu_backward",
           "swiglu_packed_forward", "swiglu_packed_backward"]


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


def _swiglu_packed_fwd_kernel(X, OUT, N, HIDDEN, stride_xrow, BLOCK: tl.constexpr):
    # element e of the [rows, HIDDEN] output: gate at X[row, col], up at X[row, HIDDEN + col]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = offs // HIDDEN
    col = offs - row * HIDDEN
    x_off = row * stride_xrow + col
    g = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + x_off + HIDDEN, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _swiglu_packed_bwd_kernel(DOUT, X, DX, N, HIDDEN, stride_xrow, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = offs // HIDDEN
    col = offs - row * HIDDEN
    x_off = row * stride_xrow + col
    do = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + x_off + HIDDEN, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    du = do * g * s
    dg = do * u * s * (1.0 + g * (1.0 - s))
    dx_off = row * (2 * HIDDEN) + col  # dx is a fresh contiguous [rows, 2 * HIDDEN]
    tl.store(DX + dx_off, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + dx_off + HIDDEN, du.to(DX.dtype.element_ty), mask=mask)


_cache: dict = {}


def _kernel(fn):
    key = (fn.__name__, interpreting())
    k = _cache.get(key)
    if k is None:
        k = _cache[key] = triton.jit(fn)
    return k


def _launch_cfg(kernel) -> dict:
    # interpreter: one block of 1024 is fast enough; GPU: 4096 elements per program, 8 warps
    return {"BLOCK": 1024} if _is_interpreted(kernel) else {"BLOCK": 4096, "num_warps": 8}


def _check(t: Tensor, name: str):
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton swiglu: {name} dtype {t.dtype} not supported (float16/bfloat16/float32)")


# ---- launchers ---------------------------------------------------------------------------------
def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, "gate")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n == 0 or (_is_traced(gate, up) and interpreting()):
        return out
    kernel = _kernel(_swiglu_fwd_kernel)
    cfg = _launch_cfg(kernel)
    _wrap(kernel)[(triton.cdiv(n, cfg["BLOCK"]),)](gate, up, out, n, **cfg)
    return out


def swiglu_backward(dout: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    d_gate = torch.empty_like(gate)
    d_up = torch.empty_like(up)
    n = gate.numel()
    if n == 0 or (_is_traced(dout, gate, up) and interpreting()):
        return d_gate, d_up
    kernel = _kernel(_swiglu_bwd_kernel)
    cfg = _launch_cfg(kernel)
    _wrap(kernel)[(triton.cdiv(n, cfg["BLOCK"]),)](dout, gate, up, d_gate, d_up, n, **cfg)
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
    n = out.numel()
    if n == 0 or (_is_traced(x) and interpreting()):
        return out
    x2 = _rows(x)
    kernel = _kernel(_swiglu_packed_fwd_kernel)
    cfg = _launch_cfg(kernel)
    _wrap(kernel)[(triton.cdiv(n, cfg["BLOCK"]),)](x2, out, n, hidden, x2.stride(0), **cfg)
    return out


def swiglu_packed_backward(dout: Tensor, x: Tensor) -> Tensor:
    hidden = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dout = dout.contiguous()
    n = dout.numel()
    if n == 0 or (_is_traced(dout, x) and interpreting()):
        return dx
    x2 = _rows(x)
    kernel = _kernel(_swiglu_packed_bwd_kernel)
    cfg = _launch_cfg(kernel)
    _wrap(kernel)[(triton.cdiv(n, cfg["BLOCK"]),)](dout, x2, dx, n, hidden, x2.stride(0), **cfg)
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


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dout, gate, up)


def _packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _packed_grad(ctx, dout):
    (x,) = ctx.saved_tensors
    return _swiglu_packed_bwd_op(dout, x)


_swiglu_fwd_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)
_swiglu_packed_fwd_op.register_autograd(_packed_grad, setup_context=_packed_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Differentiable fused ``silu(gate) * up`` (same shape, dtype and device; not validated here)."""
    return _swiglu_fwd_op(gate, up)


def swiglu_packed(x: Tensor) -> Tensor:
    """Differentiable ``silu(x[..., :H]) * x[..., H:]`` for ``x`` of shape ``[..., 2H]``."""
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu_packed: last dim must be even (gate | up), got shape {tuple(x.shape)}")
    return _swiglu_packed_fwd_op(x)
