"""Muon's optimizer step as an op of :mod:`fastlm.ops`: :func:`muon_step`.

Backends: ``reference`` (the PyTorch form, :mod:`fastlm.ops.reference_muon`: batched same-shape
matrices, what GPUs run) and ``cpp`` (``fastlm::muon_step_``, csrc/cpu/muon.cpp: CPU float32/float64
parameters whose Newton-Schulz dtype is their own, or float32 ones with a bfloat16 Newton-Schulz of
bf16 products and float32 sums where the CPU has AVX512-BF16 (:func:`muon_bf16_products`); each
matrix runs start to finish on one thread with single-threaded BLAS calls or bf16 micro-kernels, the
same arithmetic per matrix). ``auto`` takes ``cpp`` where it
applies: at the default model's shapes it took 1.9-2.6x less time than the PyTorch form
(benchmarks/REPORT.md, optimizer step rows).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from fastlm.ops.backend import _load, requested_backend, resolve_backend

__all__ = ["muon_step", "muon_bf16_products"]


def muon_bf16_products(device_type: str = "cpu", backend: str = "auto") -> bool:
    """Whether a bfloat16 Newton-Schulz (``ns_dtype="bfloat16"``) of float32 parameters on this device
    runs in the ``cpp`` step with bf16 products and float32 sums (a CPU with AVX512-BF16, unless
    ``FASTLM_CPU_BF16_DOT=0``): 2.1x faster than its float32 step at the default model's shapes. Elsewhere
    it takes the PyTorch form (bf16 tensors), on a CPU no faster than float32."""
    backend = requested_backend(backend)  # FASTLM_BACKEND too: a forced reference runs PyTorch's form
    if device_type != "cpu" or backend not in ("auto", "cpp"):
        return False
    cpp = _load("cpp")
    return cpp is not None and cpp.unavailable_reason() is None and bool(getattr(cpp, "bf16_products", bool)())


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
