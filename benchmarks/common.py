"""Shared machinery of the benchmark suites: device and grid choice, FLOP/byte counts, timing
through pytest-benchmark, and the results record.

Timing rules
------------
* Warm-up (and Triton autotuning / torch.compile) runs before the timed region.
* ``benchmark.pedantic`` times ``rounds`` rounds of ``inner`` calls each and reports the time per
  call. On CUDA one round launches ``inner`` calls back to back and synchronises once at its end
  (``inner`` is chosen so that a round lasts >= 1 ms), so the median measures the kernels, not the
  Python launch + sync latency of a single call.
* Inputs are random normal, never zeros.
* The recorded time (``ms``; TFLOP/s, GB/s, tokens/s derive from it) is the median on CUDA and the
  best round on CPU (shared CI/dev CPUs: other jobs inflate whole rounds); rows keep both
  ``median_ms`` and ``min_ms``.

Environment knobs
-----------------
``FASTLM_BENCH_DEVICE``   cpu | cuda (default: cuda when available)
``FASTLM_BENCH_GRID``     full | quick (default full on CUDA; the CPU grid is always the small one)
``FASTLM_BENCH_BUDGET``   seconds of timed rounds per benchmark (default 0.06 on CUDA, 0.3 on CPU)
``FASTLM_BENCH_RECORD``   1: append one JSON line per benchmark to the results file; 0: never;
                          unset: record on CUDA only
``FASTLM_BENCH_RESULTS``  results file (default ``benchmarks/results.jsonl``)
``FASTLM_BENCH_COMPILE``  0: skip the torch.compile baselines
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from fastlm.training.mfu import CUDA_PEAK_TFLOPS, cpu_model

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_RESULTS = BENCH_DIR / "results.jsonl"

_RUN_ID = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


# ---- device and grid ----------------------------------------------------------------------------
def _device() -> torch.device:
    want = os.environ.get("FASTLM_BENCH_DEVICE", "").strip().lower()
    if want not in ("", "cpu", "cuda"):
        raise ValueError(f"FASTLM_BENCH_DEVICE must be cpu or cuda, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("FASTLM_BENCH_DEVICE=cuda but torch sees no CUDA device")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


DEVICE = _device()
ON_GPU = DEVICE.type == "cuda"


def grid() -> str:
    g = os.environ.get("FASTLM_BENCH_GRID", "full" if ON_GPU else "cpu").strip().lower()
    if not ON_GPU:
        return "cpu"
    if g not in ("full", "quick"):
        raise ValueError(f"FASTLM_BENCH_GRID must be full or quick, got {g!r}")
    return g


def compile_enabled() -> bool:
    return os.environ.get("FASTLM_BENCH_COMPILE", "1").strip() != "0"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- FLOPs and bytes ----------------------------------------------------------------------------
def attention_flops(b: int, h: int, t_q: int, t_k: int, d: int, causal: bool, pass_: str) -> float:
    """FlashAttention's count: forward 4*B*H*Tq*Tk*D (two matmuls), halved when causal; backward
    2.5x forward (five matmuls, one recomputing the scores)."""
    fwd = 4.0 * b * h * t_q * t_k * d / (2.0 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def swiglu_bytes(numel: int, elem_size: int, pass_: str) -> float:
    """Minimum traffic of a fused kernel: forward reads gate, up and writes out (3 tensors); backward
    reads gate, up, dout and writes dgate, dup (5 tensors)."""
    return float(numel * elem_size * {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[pass_])


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU by name (:data:`fastlm.training.mfu.CUDA_PEAK_TFLOPS`), None if unknown."""
    return next((peaks["bf16"] for key, peaks in CUDA_PEAK_TFLOPS if key in device_name), None)


# ---- run metadata -------------------------------------------------------------------------------
def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def run_info() -> dict:
    """Fields shared by every row of this pytest session."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: record that it is absent
        triton_version = None
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    if ON_GPU:
        name = torch.cuda.get_device_name(DEVICE)
        cap = torch.cuda.get_device_capability(DEVICE)
        device = name
        extra = {"capability": f"{cap[0]}.{cap[1]}"}
    else:
        device = f"CPU {cpu_model()}"
        extra = {}
    return {
        "run_id": _RUN_ID,
        "device": device,
        "device_type": DEVICE.type,
        "threads": torch.get_num_threads(),
        **extra,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
    }


def record_enabled() -> bool:
    flag = os.environ.get("FASTLM_BENCH_RECORD", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return ON_GPU


def results_path() -> Path:
    return Path(os.environ.get("FASTLM_BENCH_RESULTS", "") or DEFAULT_RESULTS)


def append_row(row: dict, path: Optional[Path] = None) -> None:
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
        f.write(line)


# ---- timing -------------------------------------------------------------------------------------
def _budget_s() -> float:
    raw = os.environ.get("FASTLM_BENCH_BUDGET", "")
    if raw:
        val = float(raw)
        if not val > 0:
            raise ValueError(f"FASTLM_BENCH_BUDGET must be a positive number of seconds, got {raw!r}")
        return val
    return 0.06 if ON_GPU else 0.3


class Bench:
    """One benchmark: ``run`` times a callable through pytest-benchmark, fills
    ``benchmark.extra_info`` and appends the results row."""

    def __init__(self, benchmark, nodeid: str):
        self.benchmark = benchmark
        self.nodeid = nodeid
        self.min_s: Optional[float] = None

    def time(
        self,
        fn: Callable[[], object],
        *,
        warmup: Optional[int] = None,
        min_rounds: Optional[int] = None,
        max_rounds: Optional[int] = None,
        budget_s: Optional[float] = None,
    ) -> Optional[float]:
        """Median seconds per call of ``fn`` (None when pytest-benchmark is disabled)."""
        warmup = (3 if ON_GPU else 1) if warmup is None else warmup
        budget = _budget_s() if budget_s is None else budget_s
        min_rounds = (5 if ON_GPU else 3) if min_rounds is None else min_rounds
        max_rounds = (100 if ON_GPU else 30) if max_rounds is None else max_rounds
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        est = max(time.perf_counter() - t0, 1e-7)
        inner = min(200, max(1, math.ceil(1e-3 / est))) if ON_GPU else 1
        rounds = int(min(max_rounds, max(min_rounds, budget // (est * inner))))
        calls = [0]

        def target():
            fn()
            calls[0] += 1
            if calls[0] % inner == 0:  # the last call of a round waits for the GPU
                sync()

        self.benchmark.pedantic(target, rounds=rounds, iterations=inner, warmup_rounds=1 if ON_GPU else 0)
        sync()
        self.benchmark.extra_info.update({"rounds": rounds, "inner": inner})
        stats = self.benchmark.stats
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return None
        self.min_s = float(stats.stats.min)
        return float(stats.stats.median)

    def record(
        self,
        *,
        suite: str,
        op: str,
        backend: str,
        median_s: Optional[float],
        pass_: Optional[str] = None,
        dtype: Optional[str] = None,
        shape: Optional[dict] = None,
        causal: Optional[bool] = None,
        variant: Optional[str] = None,
        flops: Optional[float] = None,
        nbytes: Optional[float] = None,
        tokens: Optional[float] = None,
        **extra,
    ) -> dict:
        """Fill ``benchmark.extra_info`` (ms, TFLOP/s, GB/s, tokens/s) and append the row when
        recording is on. ``extra`` lands in the row as is (e.g. resolved backend, peak memory)."""
        row = {
            "suite": suite,
            "op": op,
            "pass": pass_,
            "backend": backend,
            "dtype": dtype,
            "shape": shape or {},
            "causal": causal,
            "variant": variant,
            "ms": None,
            "stat": None,
            "median_ms": None,
            "min_ms": None,
            "tflops": None,
            "gbps": None,
            "tokens_per_s": None,
        }
        if median_s is not None and median_s > 0:
            # Headline time: the median on CUDA; on CPU the best round, because the CPU machines
            # these run on are shared and other jobs' bursts inflate whole rounds (median kept too).
            t, stat = median_s, "median"
            if not ON_GPU and self.min_s is not None and self.min_s > 0:
                t, stat = self.min_s, "min"
            row.update(
                ms=t * 1e3,
                stat=stat,
                median_ms=median_s * 1e3,
                min_ms=self.min_s * 1e3 if self.min_s is not None else None,
            )
            if flops is not None:
                row["tflops"] = flops / t / 1e12
            if nbytes is not None:
                row["gbps"] = nbytes / t / 1e9
            if tokens is not None:
                row["tokens_per_s"] = tokens / t
        row.update(extra)
        info = {k: v for k, v in row.items() if v is not None and k not in ("suite",)}
        self.benchmark.extra_info.update(info)
        if median_s is not None and record_enabled():
            full = {
                **run_info(),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **row,
                "rounds": self.benchmark.extra_info.get("rounds"),
                "inner": self.benchmark.extra_info.get("inner"),
                "test": self.nodeid,
            }
            append_row(full)
        return row


# ---- fastlm backend helpers ---------------------------------------------------------------------
def fastlm_backend_skip_reason(name: str) -> Optional[str]:
    """Why fastlm backend ``name`` is not benchmarked on this device (None: benchmark it)."""
    from fastlm import ops

    if name == "auto":
        return None
    why = ops.backend_status().get(name, f"unknown backend {name!r}")
    if why is not None:
        return f"fastlm backend {name!r} unavailable: {why}"
    if name == "cuda" and not ON_GPU:
        return "fastlm backend 'cuda' needs a CUDA device"
    if name == "cpp" and ON_GPU:
        return "fastlm backend 'cpp' is the CPU path"
    if name == "triton" and not ON_GPU:
        return "fastlm backend 'triton' on CPU is the Triton interpreter: not benchmarked"
    return None


def skip_unless_fastlm_backend(name: str) -> None:
    why = fastlm_backend_skip_reason(name)
    if why is not None:
        pytest.skip(why)


def gpu_oom_skip(fn: Callable[[], object]):
    """Run ``fn``; on CUDA out-of-memory free the cache and skip with the reason."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"CUDA out of memory: {str(e).splitlines()[0][:160]}")


# ---- the default training setup (CPU model / attention shapes) ----------------------------------
@functools.lru_cache(maxsize=None)
def default_train_setup():
    """``(GPTConfig, batch_size, source)``: what ``python -m fastlm.train`` trains on the CPU with no
    flags (Tiny Shakespeare, char vocabulary of 65)."""
    from fastlm.model import GPTConfig
    from fastlm.training.settings import TrainConfig, resolve_settings

    resolved = resolve_settings(TrainConfig(profile="cpu"), {}, "cpu")
    values = {**resolved.model, "vocab_size": 65}  # the bundled corpus' chars
    values.pop("backend", None)
    return GPTConfig(**values), int(resolved.train.batch_size), "fastlm.train defaults (CPU)"
