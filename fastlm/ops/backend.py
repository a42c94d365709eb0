"""The backend registry of :mod:`fastlm.ops`: the :class:`Backend` protocol, which backends exist,
how ``auto`` picks one for a call, and the errors when a named backend cannot run it.

A backend is an object with ``name``, ``unavailable_reason()`` and, per op, ``<op>_unsupported(...)``
(None when it can run that call, else a one-line reason) and ``<op>(...)``. The in-process backends
(``reference``, ``torch``) are loaded with this module; the compiled ones (``cpp`` and ``cuda`` from
``fastlm._C``, ``triton`` from :mod:`fastlm.kernels`) on first use, so ``import fastlm`` pays for
neither. This registry is the one door into compiled code: nothing above :mod:`fastlm.ops` imports
``fastlm._C``, its glue (:mod:`fastlm.ops.extension`) or ``torch.ops.fastlm``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from fastlm.errors import BackendUnavailableError
from fastlm.ops.protocol import Backend, BackendBase

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendBase",
    "available_backends",
    "backend_details",
    "backend_status",
    "load_backends",
    "requested_backend",
    "resolve_backend",
    "BackendUnavailableError",
]

log = logging.getLogger("fastlm")

BACKENDS = ("reference", "torch", "triton", "cuda", "cpp")

# auto's preference per (op, device type). Measured choices: see benchmarks/REPORT.md.
_AUTO_ORDER = {
    ("attention", "cuda"): ("triton", "cuda", "torch", "reference"),
    ("attention", "cpu"): ("torch", "cpp", "reference"),  # cpp first for some calls: ops.attention's order
    ("swiglu", "cuda"): ("triton", "cuda", "torch", "reference"),
    ("swiglu", "cpu"): ("cpp", "torch", "reference"),
    ("swiglu_packed", "cuda"): ("triton", "cuda", "torch", "reference"),
    ("swiglu_packed", "cpu"): ("cpp", "torch", "reference"),
    ("qk_norm_value_mix", "cpu"): ("cpp", "reference"),
    ("layer_norm", "cpu"): ("cpp", "reference"),
    ("muon_step", "cpu"): ("cpp", "reference"),
    ("bpe_train", "cpu"): ("cpp", "reference"),
}
_AUTO_DEFAULT = ("torch", "reference")


# ---- registry -----------------------------------------------------------------------------------
# The in-process backends are registered by fastlm.ops at import (torch.compile cannot trace a lazy
# import); the compiled ones are imported on first use.
_loaded: dict = {}
_load_errors: dict = {}
_logged: set = set()


def register(obj) -> None:
    """Register an in-process backend object (done by :mod:`fastlm.ops` for reference and torch)."""
    _loaded[obj.name] = obj


def _import_backend(name: str) -> Backend:
    """The compiled backends, imported on first use (so `import fastlm` never pays for triton or
    the C++ extension)."""
    if name == "triton":
        from fastlm.ops.triton_backend import BACKEND as triton_backend

        return triton_backend
    if name == "cuda":
        from fastlm.ops.extension import CUDA_BACKEND

        return CUDA_BACKEND
    if name == "cpp":
        from fastlm.ops.extension import CPP_BACKEND

        return CPP_BACKEND
    raise ValueError(f"unknown backend {name!r}")


def _load(name: str) -> Optional[Backend]:
    """The backend object, or None (with the reason recorded) when it cannot be imported."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        obj = _import_backend(name)
    except Exception as e:  # ImportError, missing symbols, a broken build: all mean unavailable
        _load_errors[name] = f"{type(e).__name__}: {e}".splitlines()[0]
        return None
    _loaded[name] = obj
    return obj


def load_backends(check_availability: bool = False) -> None:
    """Import every backend now (``torch.compile`` cannot trace the lazy imports of a first call);
    with ``check_availability`` also run their availability checks (triton's imports triton)."""
    for name in BACKENDS:
        _load(name)
    if check_availability:
        backend_status()


def _unavailable(name: str) -> Optional[str]:
    obj = _load(name)
    if obj is None:
        return _load_errors[name]
    return obj.unavailable_reason()


def backend_status() -> dict:
    """``{backend: None if usable here else 'reason'}`` for every backend."""
    return {name: _unavailable(name) for name in BACKENDS}


def available_backends() -> list:
    return [name for name, why in backend_status().items() if why is None]


def backend_details() -> dict:
    """``{backend: extra description or None}`` for the usable backends (``python -m fastlm.info``)."""
    return {name: _loaded[name].details() for name in BACKENDS if _unavailable(name) is None}


def _log_once(msg: str):
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


def requested_backend(backend: str) -> str:
    """The backend a call asks for: ``backend``, or for ``"auto"`` the ``FASTLM_BACKEND`` environment
    variable's (``"auto"`` when unset or empty)."""
    if backend == "auto":
        return os.environ.get("FASTLM_BACKEND", "auto").strip().lower() or "auto"
    return backend


def resolve_backend(op: str, backend: str, device_type: str, unsupported, order=None) -> object:
    """Pick the backend object for one call.

    ``unsupported(obj)`` returns None when ``obj`` can run the call, else a reason; ``order`` (a
    tuple of names) replaces the ``(op, device)`` preference list of :data:`_AUTO_ORDER`.
    Explicit backends raise :class:`BackendUnavailableError` with the reason; ``auto`` falls through
    its preference list, logging (once) each preferred backend it had to skip.
    """
    backend = requested_backend(backend)
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
        why = _unavailable(backend)
        if why is None:
            obj = _loaded[backend]
            why = unsupported(obj)
            if why is None:
                return obj
        raise BackendUnavailableError(f"fastlm {op}: backend {backend!r} cannot run this call: {why}")
    skipped = []
    for name in order or _AUTO_ORDER.get((op, device_type), _AUTO_DEFAULT):
        why = _unavailable(name)
        if why is None:
            obj = _loaded[name]
            why = unsupported(obj)
            if why is None:
                if skipped:
                    _log_once(f"fastlm {op} on {device_type}: using backend {name!r} ({'; '.join(skipped)})")
                return obj
        skipped.append(f"{name} skipped: {why}")
    raise BackendUnavailableError(f"fastlm {op}: no backend can run this call ({'; '.join(skipped)})")
