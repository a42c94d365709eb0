"""Autograd wiring shared by the compiled backends (C++/CUDA ops of ``fastlm._C`` and the Triton
ops of :mod:`fastlm.kernels`): each forward op gets its backward op through one of two helpers.

* :func:`register_attention_autograd` -- ``fwd(q, k, v, causal, scale, alibi_slopes, *masks) -> (out, lse)``
  with ``bwd(dout, q, k, v, out, lse, causal, scale, alibi_slopes, *masks) -> (dq, dk, dv)``; ``lse`` is
  not differentiable, ``alibi_slopes`` is a constant of the model, and the trailing mask arguments
  (``window``, ``segment_ids`` where the op has them) go to the backward unchanged.
* :func:`register_qk_norm_autograd` -- the QK-norm / value-embedding mix op (d qkv and the gradients of
  the gains, ``ve`` and ``ve_mix``);
* :func:`register_elementwise_autograd` -- ``fwd(*inputs) -> out`` with
  ``bwd(dout, *inputs) -> one gradient per input`` (SwiGLU, split and packed).
"""

from __future__ import annotations

import torch

__all__ = [
    "register_attention_autograd",
    "register_attention_qkv_autograd",
    "register_elementwise_autograd",
    "register_qk_norm_autograd",
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


def register_attention_qkv_autograd(fwd_op, bwd_op) -> None:
    """Wire ``bwd_op`` as the backward of the packed self-attention op ``fwd_op`` (qkv in, d(qkv) out;
    the RoPE tables, head counts, scale, slopes and the trailing mask arguments take no gradient)."""

    def setup_context(ctx, inputs, output):
        qkv, n_head, n_kv_head, cos, sin, scale, alibi_slopes, *masks = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, cos, sin)
        ctx.heads = (n_head, n_kv_head)
        ctx.scale = scale
        ctx.alibi_slopes = alibi_slopes
        ctx.masks = masks
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        qkv, out, lse, cos, sin = ctx.saved_tensors
        dqkv = bwd_op(dout, qkv, out, lse, *ctx.heads, cos, sin, ctx.scale, ctx.alibi_slopes, *ctx.masks)
        return (dqkv, None, None, None, None, None, None) + (None,) * len(ctx.masks)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


def register_qk_norm_autograd(fwd_op, bwd_op) -> None:
    """Wire ``bwd_op`` as the backward of the QK-norm / value-mix op ``fwd_op``:
    ``fwd(qkv, n_head, n_kv_head, q_gain?, k_gain?, rms, eps, ve?, ve_mix?, out_dtype?)`` with
    ``bwd(dout, qkv, n_head, n_kv_head, q_gain?, k_gain?, rms, eps, ve?, ve_mix?) -> (d qkv, d q_gain,
    d k_gain, d ve, d ve_mix)`` (empty tensors for absent inputs: no gradient)."""

    def setup_context(ctx, inputs, output):
        qkv, n_head, n_kv_head, q_gain, k_gain, rms, eps, ve, ve_mix, *_ = inputs
        ctx.save_for_backward(qkv, q_gain, k_gain, ve, ve_mix)
        ctx.args = (n_head, n_kv_head, rms, eps)

    def backward(ctx, dout):
        qkv, q_gain, k_gain, ve, ve_mix = ctx.saved_tensors
        n_head, n_kv_head, rms, eps = ctx.args
        dqkv, dqg, dkg, dve, dmix = bwd_op(dout, qkv, n_head, n_kv_head, q_gain, k_gain, rms, eps, ve, ve_mix)
        if q_gain is None:
            dqg = dkg = None
        if ve is None:
            dve = dmix = None
        return dqkv, None, None, dqg, dkg, None, None, dve, dmix, None

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


def register_elementwise_autograd(fwd_op, bwd_op) -> None:
    """Wire ``bwd_op(dout, *inputs)`` as the backward of ``fwd_op(*inputs)`` (all inputs saved)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dout):
        return bwd_op(dout, *ctx.saved_tensors)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
