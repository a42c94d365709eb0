"""One prepared GPU run: environment and ceilings, correctness, headline timings, the rest.

The command (from the repository root; only the folder named by ``$OUT`` comes back from a lent
GPU machine, and only the tail of the output is shown)::

    FASTLM_COMMIT=<git rev-parse --short HEAD> python3 -m benchmarks.gpu_check --out "$OUT" --budget-s 420

``benchmarks/gpu_suite.sh`` is the same with the commit filled in. Before the device call: run
``python -m benchmarks.cuda_direct --prebuild`` (the CUDA library for sm_90a/sm_80 into the ignored
``.gpu_prebuilt/``, which the call must carry) and ``python -m benchmarks.gpu_check --dry-run --out
out/dry`` (every step on CPU, 1-3 minutes). After a fix, rerun only what changed, e.g.
``--steps correct,headline``. Options: ``--out DIR`` (required), ``--budget-s S`` (default 420: the
whole run's hard limit), ``--steps NAME,NAME`` (the names below), ``--dry-run``.

Runs from the work tree with no ``pip install`` (``import fastlm`` maps the tree's ``kernels/`` to
``fastlm.kernels``); Triton configs are pinned (``FASTLM_TRITON_CONFIGS=pinned``: no autotuning).
Every result is a row appended to ``DIR/results.jsonl`` and flushed the moment it is measured; each
step runs under its own time limit and a failing step records its error and the run goes on.
Correctness is FlashAttention's rule against a float64 oracle (2x PyTorch's error in the dtype +
half an ulp); a timing is taken only after its kernel passed. In the background from the start: the
CUDA library (prebuilt, else nvcc) and, with a budget of 300 s or more, the CUDA extension
``fastlm._C`` (so ``backend="cuda"`` parity runs in the test step). Steps, in order:

1. env         GPU, clocks, driver, versions; measured copy bandwidth and bf16 matmul rate
2. correct     Triton and CUDA forward+backward against float64 at the benchmark shapes (a slice of
               heads and rows at T=8k), GQA, ALiBi, T_q != T_k, D=80, odd T, decode; bf16 and fp16
3. headline    Triton forward, B=2 H=16 T=8192 D=128 causal bf16, per forward config (each first
               checked at a small shape), and at D=64 (H=32) the first two; SDPA default (its
               kernel named), flash, efficient, cuDNN
4. fwdbwd      forward+backward at the headline shape, Triton vs SDPA default
5. sweep       T = 1k..16k at D=64 and 128 (B*T = 16k, H*D = 2048): float64 check, then Triton and
               SDPA forward and forward+backward
6. cuda_attn   CUDA C++ attention forward/backward at D=64 and D=128 vs SDPA flash
7. swiglu      SwiGLU split/packed (Triton, CUDA) at 8192 x 16384 bf16: float64 check, then TB/s and
               % of copy bandwidth
8. train_step  GPT-2-small-shaped step (12 x 768, T=1024, bf16): loss and gradient norm of backend
               auto vs float64 (torch backend as baseline), then tokens/s of auto and torch
9. configs     every entry of the Triton config lists (fwd, dK/dV, dQ, decode) at D=64 and 128,
               compiled, against float64 at small shapes (what the autotuner may pick)
10. resources  registers/spills of every pinned kernel compiled for sm_90 (dry run only: CPU work;
               with FASTLM_OTHER_TRITONS also under another Triton, e.g. the GPU image's 3.6)
11. pytest_gpu ``pytest -m gpu`` in what time remains: per-test JSON lines, JUnit XML and the log
               in DIR as tests finish (Triton modules first, torch.compile last), counts that
               survive a kill

Timing: CUDA events through ``triton.testing.do_bench`` (warm-up, L2 flushed, median and
quantiles), compilation before the timed region. FLOPs: FlashAttention's count. The summary table
(at most 40 lines, also in ``DIR/summary.txt``) is printed last. The commit comes from
``FASTLM_COMMIT``, else git, else a hash of the tracked sources (the GPU copy has no ``.git``).
``--dry-run`` runs every step on CPU at tiny shapes (Triton interpreter; CUDA steps recorded as
skipped with the reason): the CI test of this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = (
    "env",
    "correct",
    "headline",
    "fwdbwd",
    "sweep",
    "cuda_attn",
    "swiglu",
    "train_step",
    "configs",
    "resources",
    "pytest_gpu",
)
# share of the budget each step may use at most (the rest carries over to later steps)
STEP_SHARE = {
    "env": 0.05,
    "correct": 0.2,
    "headline": 0.15,
    "fwdbwd": 0.05,
    "sweep": 0.15,
    "cuda_attn": 0.05,
    "swiglu": 0.05,
    "train_step": 0.1,
    "configs": 0.1,
    "resources": 0.15,
    "pytest_gpu": 1.0,
}
SUMMARY_LINES = 40


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
        self.facts: dict = {}  # copy_GBps, matmul_TFLOPs, device, commit, cuda_lib, ext_build, ...
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, name: str, **fields) -> dict:
        """Append one result row (flushed and fsynced now)."""
        row = {
            "run": self.run_id,
            "step": self.step,
            "name": name,
            "t_s": round(time.monotonic() - self.t0, 2),
            "dry_run": self.dry,
            "device": self.facts.get("device"),
            "commit": self.facts.get("commit"),
        }
        row.update(fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(
            f"[{row['t_s']:7.1f}s] {self.step}/{name}: "
            + ", ".join(f"{k}={v}" for k, v in fields.items() if k not in ("traceback",))[:300],
            flush=True,
        )
        return row

    def skip(self, name: str, reason: str) -> dict:
        return self.row(name, status="skipped", reason=reason)

    def error(self, name: str, exc: BaseException) -> dict:
        return self.row(name, status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])


def _alarm(_signum, _frame):
    raise StepTimeout("step time limit reached")


def run_step(run: Run, name: str, fn) -> None:
    """``fn(run, deadline)`` under its time limit; its error or time-out becomes a row and the run goes on."""
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
    run.row("step", status=status, reason=reason, elapsed_s=round(time.monotonic() - start, 2), limit_s=round(limit, 1))


# ---- facts ---------------------------------------------------------------------------------------
def source_commit() -> str:
    """``FASTLM_COMMIT``, else ``git rev-parse``, else ``tree-<sha256 of the sources>``."""
    if os.environ.get("FASTLM_COMMIT", "").strip():
        return os.environ["FASTLM_COMMIT"].strip()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, cwd=REPO
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return out
    digest = hashlib.sha256()
    for folder in ("fastlm", "kernels", "csrc", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".cu", ".h"):
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return "tree-" + digest.hexdigest()[:12]


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


def _cuda_arch():
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" + ("a" if major >= 9 else "")


def start(run: Run, steps) -> None:
    """Facts every row carries; the background builds start (the extension only for the test step)."""
    import platform

    import torch

    from benchmarks import gpu_background

    gpu = torch.cuda.is_available() and not run.dry
    run.facts["device"] = torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.machine()})"
    run.facts["commit"] = source_commit()
    gpu_background.start_cuda_lib(run, gpu)
    if "pytest_gpu" in steps:
        gpu_background.start_extension_build(run, _cuda_arch() if gpu else None)


def step_pytest_gpu(run: Run, deadline: float) -> None:
    """The CUDA extension's build (waited for at most 40% of the time left), then ``pytest -m gpu``
    in the rest (dry run: the SwiGLU parity tests in the interpreter, and the collection of
    ``-m gpu``)."""
    from benchmarks import gpu_background, gpu_pytest

    run.row("ext_build", **gpu_background.finish_extension_build(run, 0.4 * (deadline - time.monotonic())))
    env = dict(
        os.environ,
        FASTLM_TRITON_CONFIGS="pinned",
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    )
    env.pop("TRITON_INTERPRET", None)
    limit = deadline - time.monotonic() - 5
    if run.dry:
        targets, select, workers = ("tests/test_triton_swiglu.py::test_swiglu_parity",), "", 1
    else:
        targets, select, workers = ("tests",), "gpu", min(4, max(1, (os.cpu_count() or 2) // 4))
    fields = gpu_pytest.run_pytest(run.out, limit, targets, select, env, workers=workers)
    run.row("pytest", targets=list(targets), select=select, **fields)
    if run.dry:
        collected = gpu_pytest.collect_count(env, limit=max(5.0, deadline - time.monotonic() - 3))
        run.row("collect", status="ok" if collected > 0 else "fail", collected=collected, select="gpu")


# ---- the summary -----------------------------------------------------------------------------------
def summary_lines(rows: list) -> list:
    """At most SUMMARY_LINES lines: per step its status and counts, the headline numbers, what failed."""
    lines = [
        f"gpu_check {rows[0].get('run') if rows else ''}: {rows[0].get('device') if rows else ''}, "
        f"commit {rows[0].get('commit') if rows else ''}"
    ]
    for step in STEPS:
        mine = [r for r in rows if r.get("step") == step and r.get("name") != "step"]
        end = next((r for r in rows if r.get("step") == step and r.get("name") == "step"), None)
        if not mine and end is None:
            continue
        counts = {s: sum(r.get("status") == s for r in mine) for s in ("ok", "fail", "error", "skipped")}
        lines.append(
            f"{step:11s} {end.get('status') if end else 'cut':8s} "
            + " ".join(f"{k}={v}" for k, v in counts.items() if v)
            + _best(step, mine)
        )
    bad = [r for r in rows if r.get("status") in ("fail", "error", "timeout") and r.get("name") != "step"]
    room = SUMMARY_LINES - len(lines) - 1
    lines += [f"  {r['status'].upper()} {r['step']}/{r['name']}: {_why(r)}"[:160] for r in bad[:room]]
    if len(bad) > room:
        lines.append(f"  ... {len(bad) - room} more not-ok rows in results.jsonl")
    return lines[:SUMMARY_LINES]


def _why(row: dict) -> str:
    if row.get("reason"):
        return str(row["reason"])
    errors = row.get("errors") or {}
    worst = [f"{n} {e['err']:.2e}>{e['bound']:.2e}" for n, e in errors.items() if not e.get("ok")]
    return ", ".join(worst) or str({k: row.get(k) for k in ("passed", "failed", "error", "skipped") if k in row})


def _best(step: str, rows: list) -> str:
    timed = [r for r in rows if r.get("status") == "ok" and r.get("TFLOPs")]
    tri = [r for r in timed if r.get("backend") == "triton"]
    if step in ("headline", "fwdbwd") and tri:
        best = max(tri, key=lambda r: r["TFLOPs"])
        sdpa = max((r["TFLOPs"] for r in timed if str(r.get("backend", "")).startswith("sdpa")), default=None)
        return f" | best triton {best['name']} {best['TFLOPs']} TFLOP/s" + (f" vs sdpa {sdpa}" if sdpa else "")
    if step == "swiglu":
        pct = [r.get("pct_of_copy") for r in rows if r.get("pct_of_copy") is not None]
        return f" | best {max(pct)}% of copy" if pct else ""
    if step == "pytest_gpu":
        p = next((r for r in rows if r.get("name") == "pytest"), {})
        return " | " + " ".join(f"{k}={p.get(k)}" for k in ("passed", "failed", "error", "skipped", "counts_from"))
    return ""


def finish(run: Run, args) -> None:
    rows = [json.loads(line) for line in run.path.read_text().splitlines()]
    lines = summary_lines(rows)
    rerun = (
        f'rerun: FASTLM_COMMIT=<commit> python3 -m benchmarks.gpu_check --out "$OUT" --budget-s '
        f"{args.budget_s:.0f} --steps <the steps above that failed>"
    )
    (run.out / "summary.txt").write_text("\n".join(lines + [rerun]) + "\n")
    print("\n".join(["=" * 60] + lines + [rerun]), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.jsonl and the logs ($OUT)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny shapes (CI)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or args.budget_s <= 0:
        print(
            f"error: unknown step(s) {', '.join(unknown)} (choose from {', '.join(STEPS)})"
            if unknown
            else f"error: --budget-s must be positive, got {args.budget_s}",
            file=sys.stderr,
        )
        return 2
    if not args.dry_run and not _cuda_visible():
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
    from benchmarks.gpu_background import finish_extension_build

    run = Run(args.out, args.budget_s, args.dry_run)
    start(run, steps)
    for name in STEPS:
        if name in steps:
            run_step(run, name, step_pytest_gpu if name == "pytest_gpu" else getattr(gpu_steps, "step_" + name))
    run.step = "done"
    if run.facts.get("ext_build", {}).get("status") == "running":  # the test step never collected it
        run.row("ext_build", **finish_extension_build(run, 0))
    run.row("summary", status="ok", elapsed_s=round(time.monotonic() - run.t0, 1))
    finish(run, args)
    return 0


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
