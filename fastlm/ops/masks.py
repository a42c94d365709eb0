"""Which keys a query sees: the one rule of every attention backend (causal, sliding window,
document segments), written once.

Query row ``i`` of ``T_q`` sits at key position ``p = i + T_k - T_q`` (bottom-right alignment: the
last query is the last key, what a KV cache needs). Key ``j`` of ``T_k`` is visible when all of:

* ``causal``: ``j <= p``;
* ``window = w`` (an int >= 1): ``p - w < j`` with ``causal`` (the last ``w`` keys, itself included:
  ``window=1`` is "itself only"), ``|p - j| < w`` without;
* ``segment_ids`` ``(B, T_k)``, non-decreasing along T (documents packed left to right): the ids
  of ``j`` and of ``p`` are equal. A query with ``p < 0`` (``T_q > T_k``) sees no key then.

A row that sees no key outputs zeros (and passes no gradient). Every combination leaves each row one
contiguous run of visible keys (documents are contiguous, the window is contiguous, causal is a
prefix), whose two ends never move left as ``i`` grows: the kernels skip every tile outside the run
of a block of rows and mask only the tiles it cuts. For T_q = T_k = 8, causal, ``window=3`` and
documents ``[0 0 0 1 1 1 1 2]`` (``x`` = visible)::

          j: 0 1 2 3 4 5 6 7
    i = 0:   x . . . . . . .
    i = 1:   x x . . . . . .
    i = 2:   x x x . . . . .
    i = 3:   . . . x . . . .      a new document: its first token sees itself
    i = 4:   . . . x x . . .
    i = 5:   . . . x x x . .
    i = 6:   . . . . x x x .      the window: 3 keys
    i = 7:   . . . . . . . x
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_masks", "visible_mask"]

_SEGMENT_DTYPES = (torch.int32, torch.int64)


def check_masks(q: Tensor, k: Tensor, causal: bool, window, segment_ids) -> Optional[int]:
    """Validate ``window`` and ``segment_ids`` for queries ``q`` ``(B, H, T_q, D)`` and keys ``k``
    ``(B, H_kv, T_k, D)``; returns the window as an int (or None). One-line ValueError/TypeError."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"attention: window must be an integer >= 1 or None, got {window!r}")
    if segment_ids is None:
        return window
    if not isinstance(segment_ids, Tensor):
        raise TypeError(f"attention: segment_ids must be a tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype not in _SEGMENT_DTYPES:
        raise TypeError(f"attention: segment_ids must be int32 or int64, got {segment_ids.dtype}")
    want = (q.shape[0], k.shape[2])
    if tuple(segment_ids.shape) != want:
        raise ValueError(f"attention: segment_ids must have shape (B, T_k) = {want}, got {tuple(segment_ids.shape)}")
    if segment_ids.device != q.device:
        raise ValueError(f"attention: segment_ids on {segment_ids.device}, q on {q.device}")
    if segment_ids.shape[1] > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
        raise ValueError("attention: segment_ids must be non-decreasing along T (documents packed left to right)")
    return window


def visible_mask(
    t_q: int, t_k: int, causal: bool, window: Optional[int] = None, segment_ids: Optional[Tensor] = None, device=None
) -> Optional[Tensor]:
    """Boolean ``(B or 1, T_q, T_k)``, True where the key is visible (the rule above); None when
    every key is visible (no causal, window or segments)."""
    if not causal and window is None and segment_ids is None:
        return None
    if segment_ids is not None:
        device = segment_ids.device
    p = torch.arange(t_q, device=device).unsqueeze(1) + (t_k - t_q)  # (T_q, 1) key position of each query
    j = torch.arange(t_k, device=device).unsqueeze(0)  # (1, T_k)
    vis = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if causal:
        vis &= j <= p
    if window is not None:
        vis &= (p - j < window) if causal else ((p - j).abs() < window)
    vis = vis.unsqueeze(0)
    if segment_ids is not None:
        seg = segment_ids.long()
        own = seg.gather(1, p.clamp(min=0).squeeze(1).unsqueeze(0).expand(seg.shape[0], -1))  # (B, T_q)
        same = own.unsqueeze(2) == seg.unsqueeze(1)  # (B, T_q, T_k)
        vis = vis & same & (p >= 0).squeeze(1).view(1, -1, 1)
    return vis
