"""Position helpers of the op layer: ALiBi slopes and rotary embeddings (RoPE).

The model builds its position inputs with these, and :func:`fastlm.ops.attention_qkv` rotates q/k
with :func:`apply_rope` on the composed path, so the rotation has one definition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alibi_slopes", "apply_rope", "rope_tables"]


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi head slopes (Press et al.): a geometric sequence 2^(-8/n), 2^(-16/n), ...; for a head
    count that is not a power of two, the closest power's slopes plus every other slope of the next."""

    def pow2_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = pow2_slopes(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = pow2_slopes(closest) + pow2_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def rope_tables(head_dim: int, theta: float, start: int, T: int, device=None) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(T, head_dim / 2)`` float32: the rotary angles of positions
    ``start .. start + T - 1`` with base ``theta`` (frequency ``theta^(-2i/head_dim)`` for pair i)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
    ang = torch.outer(pos, inv)  # (T, D/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by position angles. x: (B, H, T, D) with cos/sin
    (T, D/2), or x: (B, T, H, D) with cos/sin (T, 1, D/2)."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)
