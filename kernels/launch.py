"""Launch helpers shared by every Triton kernel of fastlm (the one home of this machinery).

* :func:`interpreting` -- whether ``TRITON_INTERPRET`` asks for the CPU interpreter, read now;
* :func:`jit` -- the kernel object of a plain kernel function in the current mode (cached);
* :func:`device_function` -- a helper that kernels call, in either mode;
* :func:`is_interpreted`, :func:`wrap`, :func:`is_traced` -- launching through
  ``torch.library.wrap_triton`` (so torch.compile sees the launch) and shape-only tracing;
* pinned configs: ``FASTLM_TRITON_CONFIGS`` fixes each autotuned kernel's config and skips
  autotuning (GPU tests, ``benchmarks.gpu_check``):

  ``FASTLM_TRITON_CONFIGS=pinned``                   each kernel's default pinned config
  ``FASTLM_TRITON_CONFIGS=fwd=128x64x4x3,dq=...``    these (``BLOCK_MxBLOCK_NxWARPSxSTAGES``;
                                                     kernels fwd, dkdv, dq, decode), the
                                                     defaults for kernels not named
  unset, empty or ``autotune``                       autotune (the default)

Kernel functions are plain Python functions turned into kernel objects on first launch, so the
interpreter decision is made at launch time, not at import.
"""

import os
from typing import Dict, Optional, Tuple

import torch
import triton
from triton.runtime.jit import JITFunction

__all__ = [
    "interpreting",
    "jit",
    "device_function",
    "is_interpreted",
    "wrap",
    "is_traced",
    "pinned_configs",
    "PIN_ENV",
    "PINNABLE",
]

PIN_ENV = "FASTLM_TRITON_CONFIGS"
PINNABLE = ("fwd", "dkdv", "dq", "decode")  # fastlm.kernels.attention: the autotuned kernels, split-KV


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read now)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_jit_cache: dict = {}


def jit(fn):
    """``triton.jit(fn)`` for the current mode (interpreted or compiled), created once per mode."""
    key = (fn, interpreting())
    kernel = _jit_cache.get(key)
    if kernel is None:
        kernel = _jit_cache[key] = triton.jit(fn)
    return kernel


class _DeviceFunction(JITFunction):
    """A ``JITFunction`` that a compiled kernel inlines like any ``@triton.jit`` helper and that an
    interpreted kernel (plain Python over the interpreter's ``tl``) simply calls: one object for
    both modes, whatever mode triton was imported in."""

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def device_function(fn):
    """``fn`` as a helper that kernels of either mode call (a module global of the kernels' module)."""
    return _DeviceFunction(fn)


def is_interpreted(kernel) -> bool:
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def wrap(kernel):
    """``wrap_triton`` so torch.compile / make_fx see the launch; interpreted kernels are
    launched directly (torch <= 2.11 rejects them in wrap_triton, and they cannot be traced)."""
    if is_interpreted(kernel):
        return kernel
    return torch.library.wrap_triton(kernel)


def is_traced(*tensors) -> bool:
    """True for fake / meta tensors (shape propagation: register_fake, opcheck's fake test).
    Raises for the FunctionalTensors of AOT tracing in interpreter mode: the graph would have no
    kernel in it (interpreted kernels cannot be captured), so torch.compile needs a GPU."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    tensors = [t for t in tensors if t is not None]
    if interpreting() and any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError(
            "fastlm Triton ops cannot be traced by torch.compile/AOT autograd in "
            "TRITON_INTERPRET mode; compile them on a CUDA GPU"
        )
    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


# ---- pinned configs -----------------------------------------------------------------------------
Config = Tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _parse_config(kind: str, text: str) -> Config:
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or any(v <= 0 for v in values):
        raise ValueError(
            f"{PIN_ENV}: config for {kind!r} must be BLOCK_MxBLOCK_NxWARPSxSTAGES (positive integers), got {text!r}"
        )
    return values


def pinned_configs() -> Optional[Dict[str, Config]]:
    """None to autotune; otherwise ``{kind: config}`` for the kernels named in ``FASTLM_TRITON_CONFIGS``
    (an empty dict for ``pinned``: every kernel takes its default pinned config)."""
    text = os.environ.get(PIN_ENV, "").strip()
    if text.lower() in ("", "autotune", "0"):
        return None
    if text.lower() in ("pinned", "1", "default"):
        return {}
    pins = {}
    for item in text.split(","):
        kind, sep, cfg = item.strip().partition("=")
        if not sep or kind not in PINNABLE:
            raise ValueError(
                f"{PIN_ENV}: expected 'pinned' or kernel=BLOCK_MxBLOCK_NxWARPSxSTAGES "
                f"pairs with kernels from {', '.join(PINNABLE)}, got {item.strip()!r}"
            )
        pins[kind] = _parse_config(kind, cfg)
    return pins
