"""One prepared GPU run: environment and ceilings, correctness, headline timings, the rest.

    python -m benchmarks.gpu_check --out DIR [--budget-s 420] [--dry-run] [--steps 1,3]

Runs from the work tree with no ``pip install``: ``kernels/`` is imported from the tree as
``fastlm.kernels``; the CUDA C++ kernels come from ``benchmarks.cuda_direct`` (a torch-free shared
library built with nvcc in the background while the Triton steps run). Steps, in order, each
under its own time limit; every result is appended to ``DIR/results.jsonl`` and flushed the
moment it is measured; a failing step records its error and the run goes on:

1. env         GPU, clocks, driver, versions; measured copy bandwidth and bf16 matmul rate
2. correct     triton / cuda forward+backward against an fp32 reference (FlashAttention's 2x rule)
3. headline    Triton forward, B=2 H=16 T=8192 D=128 causal bf16, per pinned config (+ registers,
               spills); SDPA default (its kernel named), flash, efficient, cuDNN
4. fwdbwd      forward+backward at the same shape, Triton vs SDPA default
5. cuda_attn   CUDA C++ attention forward/backward at D=64 and D=128 vs SDPA flash
6. swiglu      SwiGLU split/packed (Triton, CUDA) at 8192 x 16384 bf16: TB/s, % of copy bandwidth
7. train_step  GPT-2-small-shaped step (12 x 768, T=1024, bf16): fastlm auto vs SDPA + eager MLP
8. pytest_gpu  ``pytest -m gpu`` with pinned configs, in whatever time remains

Timing: CUDA events through ``triton.testing.do_bench`` (warm-up, L2 flushed, median and
quantiles), compilation and autotuning before the timed region. FLOPs: FlashAttention's count.
``--dry-run`` runs every step on CPU at tiny shapes (Triton interpreter; CUDA steps recorded as
skipped with the reason): the CI test of this script's logic and output.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "correct", "headline", "fwdbwd", "cuda_attn", "swiglu", "train_step", "pytest_gpu")
# share of the budget each step may use at most (the rest carries over to later steps)
STEP_SHARE = {"env": 0.05, "correct": 0.25, "headline": 0.2, "fwdbwd": 0.1, "cuda_attn": 0.08,
              "swiglu": 0.06, "train_step": 0.12, "pytest_gpu": 1.0}


class StepTimeout(BaseException):
    """A step's time limit (a BaseException, so per-case ``except Exception`` cannot swallow it)."""


class Run:
    """The output file, the clock and the shared facts of one run."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.jsonl"
        self.out = out
        self.dry = dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.budget_s = budget_s
        self.step = ""
        self.facts: dict = {}  # copy_GBps, matmul_TFLOPs, device, cuda_lib, ...
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, name: str, **fields) -> dict:
        """Append one result row (flushed and fsynced now)."""
        row = {"run": self.run_id, "step": self.step, "name": name, "t_s": round(time.monotonic() - self.t0, 2),
               "dry_run": self.dry, "device": self.facts.get("device"), "commit": self.facts.get("commit")}
        row.update(fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[{row['t_s']:7.1f}s] {self.step}/{name}: "
              + ", ".join(f"{k}={v}" for k, v in fields.items() if k not in ("traceback",))[:300], flush=True)
        return row

    def skip(self, name: str, reason: str) -> dict:
        return self.row(name, status="skipped", reason=reason)

    def error(self, name: str, exc: BaseException) -> dict:
        return self.row(name, status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])


def _alarm(_signum, _frame):
    raise StepTimeout("step time limit reached")


def run_step(run: Run, name: str, fn) -> None:
    """``fn(run)`` under its time limit; its error or time-out becomes a row and the run goes on."""
    run.step = name
    limit = min(run.left(), max(5.0, STEP_SHARE[name] * run.budget_s)) if name != "pytest_gpu" else run.left()
    if limit < 3:
        run.skip("step", f"no time left in the {run.budget_s:.0f} s budget")
        return
    start = time.monotonic()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        fn(run, start + limit)
        status, reason = "ok", None
    except StepTimeout:
        status, reason = "timeout", f"time limit {limit:.0f} s"
    except Exception as e:  # a failing step records its error and the run goes on
        status, reason = "error", f"{type(e).__name__}: {e}".splitlines()[0][:500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    run.row("step", status=status, reason=reason, elapsed_s=round(time.monotonic() - start, 2),
            limit_s=round(limit, 1))


def _import_triton_compiled() -> None:
    """Import triton outside interpreter mode: its own @jit helpers (the reduction combine
    functions) are then compilable, so the dry run can still compile kernels for sm_90 to read
    their registers and spills; launches later follow TRITON_INTERPRET."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.jsonl (and build files)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny shapes (CI)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or args.budget_s <= 0:
        print(f"error: unknown step(s) {', '.join(unknown)} (choose from {', '.join(STEPS)})" if unknown
              else f"error: --budget-s must be positive, got {args.budget_s}", file=sys.stderr)
        return 2
    if not args.dry_run and not _cuda_available():
        print("error: no CUDA device visible; run with --dry-run to check the steps on CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        _import_triton_compiled()
        os.environ["TRITON_INTERPRET"] = "1"  # read at each launch: the kernels run interpreted
    else:
        os.environ.setdefault("FASTLM_TRITON_CONFIGS", "pinned")
    sys.path.insert(0, str(REPO))
    import fastlm  # noqa: F401  (no install on the GPU image: this maps the tree's kernels/ to fastlm.kernels)
    from benchmarks import gpu_steps
    run = Run(args.out, args.budget_s, args.dry_run)
    gpu_steps.start(run)
    for name in STEPS:
        if name in steps:
            run_step(run, name, getattr(gpu_steps, "step_" + name))
    run.step = "done"
    run.row("summary", status="ok", elapsed_s=round(time.monotonic() - run.t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
