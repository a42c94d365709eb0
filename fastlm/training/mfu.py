"""Model FLOPs utilisation (MFU): the FLOP/s a run achieved over the peak of the machine it ran on.

* Achieved FLOP/s = :meth:`fastlm.model.GPT.flops_per_token` (``6 N + 12 L H D T``, PaLM's appendix B,
  nanoGPT's ``estimate_mfu``) x the run's training tokens per second.
* Peak (:func:`peak_flops`), per device:

  - **CPU**: measured, not taken from a data sheet: ``threads x`` the single-thread rate of a
    single-precision GEMM (``torch.mm`` of two 512 x 512 float32 matrices, 2 x 512^3 FLOPs, on one
    thread: the best repeat over about half a second), with ``threads`` = torch's thread count of the
    run. One thread, because a multi-threaded GEMM on a shared, loaded machine measures the load (a
    thread that is descheduled stalls the others at every barrier: 2-thread rates from 3 to 206
    GFLOP/s were seen on the same 2-core machine within minutes); the best repeat, because other jobs
    only ever slow a repeat down. So the peak is what the machine's BLAS reaches on one core, times
    the cores the run uses, and MFU says how close the whole training step comes to it. The
    single-thread figure is cached per machine in ``$FASTLM_CACHE_DIR/cpu_peak.json`` (default
    ``$XDG_CACHE_HOME/fastlm`` or ``~/.cache/fastlm``), keyed by the CPU model and the torch version;
    ``python -m fastlm.info --calibrate`` measures again and keeps the higher figure. A run under
    bfloat16 autocast (``--dtype auto`` on a CPU with native bf16) is measured against the same
    rate of a **bfloat16** GEMM (4x the float32 one on a 2-core AMD EPYC with AVX512-BF16): its peak
    is the one its matrix products could reach.
  - **CUDA**: the device's dense (no sparsity) peak from :data:`CUDA_PEAK_TFLOPS`: the bf16 tensor-core
    figure for a run under bf16/fp16 autocast, the plain fp32 figure (no TF32) for a float32 run.
  - ``FASTLM_PEAK_TFLOPS`` overrides both (e.g. a GPU missing from the table).

A distributed run's peak is the per-device peak times the number of processes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastlm.files.atomic import atomic_write_json
from fastlm.files.safeio import read_bounded

__all__ = [
    "Peak",
    "CUDA_PEAK_TFLOPS",
    "peak_flops",
    "cpu_model",
    "cache_path",
    "measure_cpu_gemm",
    "calibrate_cpu",
    "mfu_fields",
    "format_flops",
]

#: dense peak TFLOP/s (bf16 tensor cores, fp32 without TF32) by a substring of the device name,
#: first match wins (so "H100 PCIe" before "H100"); vendors' data sheets
CUDA_PEAK_TFLOPS = (
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp32": 31.2}),
)
GEMM_SIZE = 512
CALIBRATION_S = 0.5


@dataclass(frozen=True)
class Peak:
    """A peak rate: ``flops_per_s`` (None when unknown) and where it comes from (``source``)."""

    flops_per_s: Optional[float]
    source: str


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` says), with its family and
    model numbers where ``cpuinfo`` gives them (x86): virtual machines often show one bare name, such
    as ``AMD EPYC``, for CPU generations whose GEMM rates differ twofold, and the cached peak
    (:func:`calibrate_cpu`) and the benchmark report are kept per CPU by this name."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # the first processor's block is enough
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown CPU"
    family, model = fields.get("cpu family"), fields.get("model")
    if family and model and family.isdigit() and model.isdigit():
        name += f" (family {family}, model {model})"
    return name


def cache_path() -> Path:
    base = (
        os.environ.get("FASTLM_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm"
    )
    return Path(base) / "cpu_peak.json"


def _cache_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__}"


def measure_cpu_gemm(
    seconds: float = CALIBRATION_S, size: int = GEMM_SIZE, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of the best of repeated ``dtype`` ``size x size`` matmuls on one thread over ``seconds``."""
    gen = torch.Generator().manual_seed(0)  # the global RNG is left alone
    a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):
            torch.mm(a, b, out=out)
        best, end = float("inf"), time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            t1 = time.perf_counter()
            best = min(best, t1 - t0)
            if t1 >= end:
                return 2.0 * size**3 / best
    finally:
        torch.set_num_threads(threads)


def _read_cache() -> dict:
    try:
        data = json.loads(read_bounded(cache_path(), 1 << 20, "the CPU peak cache").decode("utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again
    return data if isinstance(data, dict) else {}


#: the cache entry's field of each calibrated dtype's one-thread rate
_CACHE_FIELDS = {torch.float32: "flops_per_s_one_thread", torch.bfloat16: "bf16_flops_per_s_one_thread"}


def calibrate_cpu(threads: Optional[int] = None, force: bool = False, dtype: torch.dtype = torch.float32) -> Peak:
    """The CPU peak for ``threads`` (default: torch's current count): ``threads`` x the single-thread
    GEMM rate in ``dtype`` (float32 or bfloat16), from the cache or measured and cached. ``force``
    measures again and keeps the higher of the two single-thread figures."""
    if dtype not in _CACHE_FIELDS:
        raise ValueError(f"calibrate_cpu: dtype must be float32 or bfloat16, got {dtype}")
    threads = torch.get_num_threads() if threads is None else threads
    key, cache, name = _cache_key(), _read_cache(), _CACHE_FIELDS[dtype]
    entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
    per_core = entry.get(name)
    valid = isinstance(per_core, (int, float)) and math.isfinite(per_core) and per_core > 0
    per_core = float(per_core) if valid else None
    if per_core is None or force:
        per_core = max(measure_cpu_gemm(dtype=dtype), per_core or 0.0)
        cache[key] = {**entry, name: per_core, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            cache_path().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path(), cache)
        except OSError:
            pass  # a read-only home: the figure is used, just not kept
    label = "fp32" if dtype == torch.float32 else "bf16"
    return Peak(
        per_core * threads,
        f"{threads} thread(s) x {format_flops(per_core)}/s, the one-thread {label} GEMM rate cached in {cache_path()}",
    )


def _cuda_peak(device: torch.device, precision: str) -> Peak:
    name = torch.cuda.get_device_name(device)
    for key, peaks in CUDA_PEAK_TFLOPS:
        if key in name:
            return Peak(peaks[precision] * 1e12, f"{name} dense {precision} (data sheet)")
    return Peak(None, f"{name}: peak unknown (set FASTLM_PEAK_TFLOPS)")


def peak_flops(device, autocast_dtype: Optional[torch.dtype] = None) -> Peak:
    """The peak FLOP/s of one ``device`` for a run in ``autocast_dtype`` (None or float32: fp32)."""
    override = os.environ.get("FASTLM_PEAK_TFLOPS", "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = 0.0
        if value > 0:
            return Peak(value * 1e12, "FASTLM_PEAK_TFLOPS")
        return Peak(None, f"FASTLM_PEAK_TFLOPS={override!r} is not a positive number")
    device = torch.device(device)
    if device.type == "cuda":
        low = autocast_dtype in (torch.bfloat16, torch.float16)
        return _cuda_peak(device, "bf16" if low else "fp32")
    if device.type == "cpu":
        return calibrate_cpu(dtype=torch.bfloat16 if autocast_dtype == torch.bfloat16 else torch.float32)
    return Peak(None, f"{device.type}: peak unknown (set FASTLM_PEAK_TFLOPS)")


def mfu_fields(flops_per_token: float, tokens: int, seconds: float, peak: Peak, devices: int = 1) -> dict:
    """The summary's FLOP fields: per token, total, achieved FLOP/s, the peak used and MFU."""
    achieved = flops_per_token * tokens / max(seconds, 1e-9)
    total_peak = peak.flops_per_s * devices if peak.flops_per_s else None
    return {
        "flops_per_token": flops_per_token,
        "flops": flops_per_token * tokens,
        "flops_per_s": achieved,
        "peak_flops_per_s": total_peak,
        "peak_source": peak.source,
        "mfu": achieved / total_peak if total_peak else None,
    }


def format_flops(x: float) -> str:
    """``2.47e9`` -> ``2.47 GFLOP``."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"
