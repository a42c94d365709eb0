"""The ``torch`` backend of :mod:`fastlm.ops`: ``F.scaled_dot_product_attention`` where it can
express the call (bottom-right causal, sliding windows and documents as an explicit boolean mask,
ALiBi as an additive float mask; it cannot express a masked call with ``T_q > T_k``, whose fully
masked rows SDPA turns into NaN), and eager ``F.silu(gate) * up``."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from fastlm.ops import reference
from fastlm.ops.masks import visible_mask
from fastlm.ops.protocol import BackendBase

__all__ = ["TorchBackend", "BACKEND"]


class TorchBackend(BackendBase):
    """``F.scaled_dot_product_attention`` where it can express the call; eager SwiGLU."""

    name = "torch"

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        if (causal or window is not None or segment_ids is not None) and q.shape[2] > k.shape[2]:
            return "a masked call with T_q > T_k has fully masked rows, which SDPA turns into NaN"
        if q.shape[1] != k.shape[1] and not _SDPA_HAS_GQA:
            return "this torch's SDPA has no enable_gqa"
        return None

    def attention(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        """Windows and documents as a dense boolean ``(B, 1, T_q, T_k)`` mask: SDPA computes every
        score (no tile is skipped), which is what the fused kernels are measured against."""
        t_q, t_k = q.shape[2], k.shape[2]
        kwargs = {"scale": scale}
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        mask, is_causal = None, False
        # SDPA's causal CPU kernel returns NaN for a negative scale (torch 2.13): an explicit mask then
        if window is None and segment_ids is None and alibi_slopes is None and causal and t_q == t_k and scale > 0:
            is_causal = True
        elif window is not None or segment_ids is not None or alibi_slopes is not None or (causal and t_q > 1):
            mask = visible_mask(t_q, t_k, causal, window, segment_ids, device=q.device)  # T_q == 1, causal: None
            mask = None if mask is None else mask.unsqueeze(1)  # (B or 1, 1, T_q, T_k)
        if alibi_slopes is not None:
            bias = reference.alibi_bias(alibi_slopes, t_q, t_k, dtype=torch.float32).unsqueeze(0)  # (1, H, T_q, T_k)
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            mask = bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kwargs)

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
