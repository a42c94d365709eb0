"""Where a job runs: device, autocast dtype, and torch.distributed (DDP under ``torchrun``).

One ``resolve_device`` serves every CLI. :class:`Dist` wraps the process group with the few
collectives the trainer needs; :func:`init_distributed` starts it from torchrun's environment with
a timeout, so a rank that dies cannot leave the others waiting for ever.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
from dataclasses import dataclass

import torch

from fastlm.errors import DeviceError

__all__ = [
    "DeviceError",
    "resolve_device",
    "resolve_dtype",
    "cpu_native_bf16",
    "autocast",
    "keep_cpu_heap",
    "Dist",
    "init_distributed",
    "DEFAULT_DIST_TIMEOUT_S",
]

DEFAULT_DIST_TIMEOUT_S = 600


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` -> a usable torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"device {name!r} requested but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return device


def cpu_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX), where a bfloat16
    GEMM runs several times faster than a float32 one (4x measured on a 2-core AMD EPYC, oneDNN).
    ``FASTLM_CPU_BF16=0`` / ``=1`` overrides the detection (a machine whose flags mislead; tests)."""
    env = os.environ.get("FASTLM_CPU_BF16", "").strip()
    if env in ("0", "1"):
        return env == "1"
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """Autocast dtype. ``auto``: bfloat16 on CUDA if supported (else float16); on a CPU, bfloat16
    where :func:`cpu_native_bf16` (the GEMMs in bfloat16 with float32 weights, optimizer and
    attention; the default run's steps are 1.6x faster there), else float32; float32 elsewhere."""
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device_type == "cpu" and cpu_native_bf16():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise DeviceError(f"dtype must be auto, {', '.join(dtypes)}; got {name!r}")
    if dtypes[name] == torch.float16 and device_type != "cuda":
        raise DeviceError("--dtype float16 needs CUDA (use bfloat16 or float32 here)")
    return dtypes[name]


def autocast(device_type: str, dtype: torch.dtype):
    """A context-manager factory: torch.autocast in ``dtype``, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


# glibc's mallopt parameters (malloc.h) and the values keep_cpu_heap sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_KEEP_TRIM_THRESHOLD = 1 << 30
_heap_kept: "bool | None" = None


def keep_cpu_heap() -> bool:
    """Stop glibc's malloc from handing a CPU training step's freed memory back to the system, so
    that the next step does not fault it in again, page by page (Linux/glibc; elsewhere nothing).

    Every step frees most of what it allocated (activations, gradients, workspaces) and allocates
    the same again. glibc returns the free top of its heap to the system once it exceeds the trim
    threshold (a few MiB), and serves blocks above its mmap threshold with fresh mappings; either
    way the next step's first writes to that memory take a page fault each, zeroing the page. The
    default run took about 340 minor faults per step this way (none with the heap kept); a bare
    loop of its steps, as the benchmarks time them, 2,000-3,300, and ran 1.15-1.19x faster without
    them (2-core AMD EPYC, alternating processes).

    So this sets the trim threshold to 1 GiB and the mmap threshold to 32 MiB (glibc's largest; a
    fixed trim threshold turns off glibc's own raising of the mmap threshold, which alone made every
    block over 128 KiB a fresh mapping: 19,000 faults per step). The process keeps up to 1 GiB of
    freed heap for reuse. Process-wide, once; ``FASTLM_KEEP_HEAP=0`` leaves malloc as it is. Returns
    whether the thresholds are set."""
    global _heap_kept
    if _heap_kept is None:
        _heap_kept = False
        if os.environ.get("FASTLM_KEEP_HEAP", "").strip() != "0" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            # mmap first: were it refused, a fixed trim threshold alone would make matters worse
            if mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP_THRESHOLD) == 1:
                _heap_kept = mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1
    return _heap_kept


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_obj(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_obj(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: list[float], device) -> list[float]:
        """Element-wise mean of ``values`` over the ranks."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def first_error(self, err):
        """Exchange an error message (or None) from every rank: the lowest rank's error, or None.
        Every rank must call it at the same point (it is a collective)."""
        if not self.enabled:
            return err
        return next((e for e in self.gather_obj(err) if e is not None), None)

    def close(self, ok: bool = True) -> None:
        """Leave the process group. After a run that ended well on every rank (``ok``) the ranks first
        meet at a barrier, so none tears its group down while another still talks to it; then every
        object that holds the group is collected before it is destroyed, so no gloo thread is left for
        the interpreter's shutdown to destroy (a rank aborted there, 'terminate called without an
        active exception', in about 5% of the test suite's 2-process runs)."""
        if self.enabled:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                if ok:
                    dist.barrier()
                gc.collect()
                dist.destroy_process_group()
                gc.collect()


def init_distributed(device_name: str, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a one-process Dist.
    NCCL on CUDA, gloo otherwise; collectives give up after ``timeout_s``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local, world)
