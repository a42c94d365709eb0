"""Muon's optimizer step as an op of :mod:`fastlm.ops`: :func:`muon_step`.

Backends: ``reference`` (the PyTorch form, :mod:`fastlm.ops.reference_muon`: batched same-shape
matrices, what GPUs run) and ``cpp`` (``fastlm::muon_step_``, csrc/cpu/muon.cpp: CPU float32/float64
parameters whose Newton-Schulz dtype is their own; each matrix runs start to finish on one thread
with single-threaded BLAS calls, the same arithmetic per matrix). ``auto`` takes ``cpp`` where it
applies: at the default model's shapes it took 1.9-2.6x less time than the PyTorch form
(benchmarks/REPORT.md, optimizer step rows).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from fastlm.ops.backend import resolve_backend

__all__ = ["muon_step"]


def muon_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
    ns_coefficients,
    ns_dtype: str,
    eps: float,
    backend: str = "auto",
) -> str:
    """One Muon step in place on the 2-D ``params`` and their ``momentum_buffers`` (see
    :mod:`fastlm.ops.reference_muon` for the math; ``grads`` and buffers have each parameter's shape).
    Returns the name of the backend that ran it."""
    params, grads, bufs = list(params), list(grads), list(momentum_buffers)
    if not params:
        return "none"
    if not (len(params) == len(grads) == len(bufs)):
        raise ValueError(f"muon_step: {len(params)} params, {len(grads)} grads, {len(bufs)} momentum buffers")
    if len({id(t) for t in params + bufs}) != 2 * len(params):
        raise ValueError("muon_step: a parameter or momentum buffer is listed twice (each is updated in place once)")
    obj = resolve_backend(
        "muon_step", backend, params[0].device.type, lambda b: b.muon_step_unsupported(params, grads, bufs, ns_dtype)
    )
    obj.muon_step(
        params,
        grads,
        bufs,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        ns_steps=ns_steps,
        ns_coefficients=ns_coefficients,
        ns_dtype=ns_dtype,
        eps=eps,
    )
    return obj.name
