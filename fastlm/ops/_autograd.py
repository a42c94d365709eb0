"""Autograd wiring shared by the compiled backends (C++/CUDA ops of ``fastlm._C`` and the Triton
ops of :mod:`fastlm.kernels`): each forward op gets its backward op through one of two helpers. (The
CPU-only C++ ops the training step calls, ``attention_qkv_fwd``, ``qk_norm_value_mix_fwd`` and
``layer_norm_fwd``, have their autograd in C++, csrc/cpu: a Python formula costs some 20 us a call.)

* :func:`register_attention_autograd` -- ``fwd(q, k, v, causal, scale, alibi_slopes, *masks) -> (out, lse)``
  with ``bwd(dout, q, k, v, out, lse, causal, scale, alibi_slopes, *masks) -> (dq, dk, dv)``; ``lse`` is
  not differentiable, ``alibi_slopes`` is a constant of the model, and the trailing mask arguments
  (``window``, ``segment_ids`` where the op has them) go to the backward unchanged.
* :func:`register_elementwise_autograd` -- ``fwd(*inputs) -> out`` with
  ``bwd(dout, *inputs) -> one gradient per input`` (SwiGLU, split and packed).
"""

from __future__ import annotations

import torch

__all__ = [
    "register_attention_autograd",
    "register_elementwise_autograd",
]


def register_attention_autograd(fwd_op, bwd_op, contiguous_dout: bool = False) -> None:
    """Wire ``bwd_op`` as the backward of the attention op ``fwd_op`` (an op object or its
    qualified name); ``contiguous_dout`` hands the backward a contiguous ``dout``."""

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, alibi_slopes, *masks = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.alibi_slopes = alibi_slopes
        ctx.causal = causal
        ctx.scale = scale
        ctx.masks = masks
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if contiguous_dout:
            dout = dout.contiguous()
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.alibi_slopes, *ctx.masks)
        return (dq, dk, dv, None, None, None) + (None,) * len(ctx.masks)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


def register_elementwise_autograd(fwd_op, bwd_op) -> None:
    """Wire ``bwd_op(dout, *inputs)`` as the backward of ``fwd_op(*inputs)`` (all inputs saved)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dout):
        return bwd_op(dout, *ctx.saved_tensors)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
