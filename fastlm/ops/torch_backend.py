"""The ``torch`` backend of :mod:`fastlm.ops`: ``F.scaled_dot_product_attention`` where it can
express the call (bottom-right causal as an explicit mask when ``T_q != T_k``, ALiBi as an additive
float mask; it cannot express a causal call with ``T_q > T_k``), and eager ``F.silu(gate) * up``."""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from fastlm.ops import reference
from fastlm.ops.protocol import BackendBase

__all__ = ["TorchBackend", "BACKEND"]


class TorchBackend(BackendBase):
    """``F.scaled_dot_product_attention`` where it can express the call; eager SwiGLU."""

    name = "torch"

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes):
        if causal and q.shape[2] > k.shape[2]:
            return "causal with T_q > T_k has fully masked rows, which SDPA turns into NaN"
        if q.shape[1] != k.shape[1] and not _SDPA_HAS_GQA:
            return "this torch's SDPA has no enable_gqa"
        return None

    def attention(self, q, k, v, causal, scale, alibi_slopes):
        t_q, t_k = q.shape[2], k.shape[2]
        kwargs = {"scale": scale}
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        mask = None
        is_causal = False
        if alibi_slopes is not None:
            mask = reference.alibi_bias(alibi_slopes, t_q, t_k, dtype=torch.float32)
            if causal:
                mask = mask.masked_fill(~reference.causal_mask(t_q, t_k, q.device), float("-inf"))
            mask = mask.to(q.dtype).unsqueeze(0)  # (1, H, T_q, T_k)
        elif causal and t_q == t_k:
            is_causal = True
        elif causal and t_q > 1:  # bottom-right diagonal; T_q == 1 sees every key
            mask = reference.causal_mask(t_q, t_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              **kwargs)

    def swiglu_unsupported(self, gate, up):
        return None

    def swiglu(self, gate, up):
        return F.silu(gate) * up

    def swiglu_packed_unsupported(self, x):
        return None

    def swiglu_packed(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtin without a signature: torch >= 2.5 has it
        return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


_SDPA_HAS_GQA = _sdpa_has_gqa()

BACKEND = TorchBackend()
