"""Muon's step in PyTorch: the reference (and GPU) form of :func:`fastlm.ops.muon_step`.

For each parameter matrix, following ``torch.optim.Muon`` (torch >= 2.13) so the two can be compared
number for number:

* momentum ``buf <- lerp(buf, g, 1 - mu)``; Nesterov update ``lerp(g, buf, mu)`` (else ``buf``);
* ``O = NS_k(update)``: ``k`` quintic Newton-Schulz iterations ``X <- a X + (b A + c A^2) X`` with
  ``A = X X^T``, coefficients ``(3.4445, -4.7750, 2.0315)``, on the wide orientation (a tall matrix
  is transposed), after ``X <- X / max(||X||_F, eps)``;
* decoupled weight decay ``W <- W (1 - lr wd)``, then ``W <- W - lr sqrt(max(1, rows / cols)) O``
  (torch's ``adjust_lr_fn="original"``: an update of the same RMS per column for any aspect ratio).

Matrices of one shape are stacked and orthogonalised together as batched matmuls (``torch.bmm`` /
``baddbmm`` on ``(N, m, n)``), so the default 3-layer model runs 4 batched Newton-Schulz runs
instead of 12 single ones; in float32/64 a matrix more than 1.5x wider than high runs the same
polynomial in its Gram form (m x m matmuls, 37% fewer flops at the default shapes; error ~1e-4 of an
update entry, bounded, vs ~2e-6 for the direct fp32 form and ~5e-2 for bf16). The Newton-Schulz
precision is a setting: ``ns_dtype="auto"`` is float32 on CPU (there faster than bf16 and far more
accurate, measured) and bfloat16 on CUDA.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "NS_DTYPES", "newton_schulz", "newton_schulz_many", "resolve_ns_dtype", "muon_step"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def newton_schulz(
    G: Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, dtype: torch.dtype = torch.float32, eps: float = 1e-7
) -> Tensor:
    """Approximately orthogonalise each matrix of ``G`` ``(N, rows, cols)``: ``U S' V^T`` with
    ``S'`` near 1 for ``G = U S V^T``. Computed in ``dtype``; returned in ``dtype``, shape of ``G``.

    In float32/float64 a matrix wider than 1.5x its height (after orienting it wide) takes the Gram
    form (:func:`_gram_polynomial`), the same polynomial in fewer flops; otherwise the direct
    iteration on ``X``."""
    return newton_schulz_many([G], steps, coefficients, dtype, eps)[0]


def newton_schulz_many(
    stacks: list, steps: int = 5, coefficients=NS_COEFFICIENTS, dtype: torch.dtype = torch.float32, eps: float = 1e-7
) -> list:
    """:func:`newton_schulz` of each ``(N_i, rows_i, cols_i)`` stack, results in the same order.
    Gram-form stacks whose short side ``m`` is the same run their ``m x m`` polynomial as ONE batched
    iteration (the default model: its 9 wide matrices of 3 shapes share m = 96), so the optimizer
    step issues a third of the small matmuls; each matrix's arithmetic is the same as alone."""
    out = [None] * len(stacks)
    gram = defaultdict(list)  # m -> [(position, oriented X, tall)]
    for pos, G in enumerate(stacks):
        if G.dim() != 3:
            raise ValueError(f"newton_schulz expects a (N, rows, cols) stack, got shape {tuple(G.shape)}")
        tall = G.size(1) > G.size(2)
        X = G.to(dtype)
        if tall:
            X = X.mT
        X = X / X.norm(dim=(1, 2), keepdim=True).clamp_min(eps)
        m, n = X.shape[1:]
        if dtype in (torch.float32, torch.float64) and 2 * n > 3 * m and steps > 1:
            gram[m].append((pos, X, tall))
        else:
            X = _newton_schulz_direct(X, steps, coefficients)
            out[pos] = X.mT if tall else X
    for items in gram.values():
        A = torch.cat([torch.bmm(X, X.mT) for _, X, _ in items])  # (sum N, m, m)
        Qs = _gram_polynomial(A, steps, coefficients).split([X.size(0) for _, X, _ in items])
        for (pos, X, tall), Q in zip(items, Qs):
            X = torch.bmm(Q, X)
            out[pos] = X.mT if tall else X
    return out


def _newton_schulz_direct(X: Tensor, steps: int, coefficients) -> Tensor:
    """``X <- a X + (b A + c A^2) X`` with ``A = X X^T``: per step 4 m^2 n + 2 m^3 flops (X: m x n)."""
    a, b, c = coefficients
    for _ in range(steps):
        A = torch.bmm(X, X.mT)  # (N, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def _gram_polynomial(A: Tensor, steps: int, coefficients) -> Tensor:
    """The Gram form of the iteration: every iterate is ``Q X_0`` with ``Q`` a polynomial in
    ``A_0 = X_0 X_0^T``, so ``P_k = a + b A_k + c A_k^2``, ``Q_{k+1} = P_k Q_k`` and
    ``A_{k+1} = P_k A_k P_k`` (all commute); returns ``Q`` (the caller forms ``Q X_0``, so ``X_0`` is
    touched twice). Flops: 4 m^2 n + (8 steps - 6) m^3, fewer than the direct form when n > 1.5 m.
    Needs float32/64: A squares the singular values."""
    a, b, c = coefficients
    Q = None
    for k in range(steps):
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=1, dim2=2).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        if k + 1 < steps:
            A = torch.bmm(torch.bmm(P, A), P)
    return Q


def resolve_ns_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be auto or one of {', '.join(NS_DTYPES)}, got {name!r}")
    return NS_DTYPES[name]


def muon_step(
    params: list,
    grads: list,
    momentum_buffers: list,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
    ns_coefficients,
    ns_dtype: str,
    eps: float,
) -> None:
    """One Muon step in place on ``params`` and ``momentum_buffers`` (lists of 2-D tensors; a grad
    and a buffer of each parameter's shape). Same-shape matrices run as one batch; one Newton-Schulz
    call per (device, dtype), so same-m Gram stacks of different shapes run together."""
    batches = defaultdict(list)  # (shape, dtype, device) -> positions
    for i, p in enumerate(params):
        batches[(tuple(p.shape), p.dtype, p.device)].append(i)
    batches = list(batches.values())
    updates = [
        _momentum_update([grads[i] for i in idx], [momentum_buffers[i] for i in idx], momentum, nesterov)
        for idx in batches
    ]
    by_kind = defaultdict(list)
    for b, idx in enumerate(batches):
        by_kind[(params[idx[0]].device, params[idx[0]].dtype)].append(b)
    for (device, _), which in by_kind.items():
        dtype = resolve_ns_dtype(ns_dtype, device.type)
        orthos = newton_schulz_many([updates[b] for b in which], ns_steps, tuple(ns_coefficients), dtype, eps)
        for b, ortho in zip(which, orthos):
            _apply([params[i] for i in batches[b]], ortho, lr, weight_decay)


def _momentum_update(grads: list, bufs: list, momentum: float, nesterov: bool) -> Tensor:
    """Momentum buffers advanced in place; returns the (N, rows, cols) update to orthogonalise."""
    torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
    stacked = torch.stack(bufs)
    if nesterov:
        stacked = torch.stack(grads).lerp_(stacked, momentum)
    return stacked


def _apply(params: list, ortho: Tensor, lr: float, weight_decay: float) -> None:
    rows, cols = params[0].shape
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-lr * math.sqrt(max(1.0, rows / cols)))
