"""Work the GPU check starts at once and collects later, while the Triton steps run:

* the torch-free CUDA library (:mod:`benchmarks.cuda_direct`): the prebuilt one carried in
  ``.gpu_prebuilt/`` when it loads, else built with nvcc into ``OUT/cuda_build`` (the three ``.cu``
  files in parallel); ptxas's report is copied into ``OUT``;
* the CUDA extension ``fastlm._C`` (``python setup.py build_ext --inplace`` for this GPU's arch,
  niced, log in ``OUT/ext_build.log``), when the budget leaves time for it (``EXT_MIN_BUDGET_S``), so
  that the test step's ``backend="cuda"`` parity tests run on a checkout with no install. The test
  step waits for it a bounded time, then kills it and goes on without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXT_MIN_BUDGET_S = 300.0  # below this the build (minutes on 16 cores) would only eat the tests' time


# ---- the CUDA library ---------------------------------------------------------------------------
def start_cuda_lib(run, gpu: bool) -> None:
    """Loads or builds the library in a thread; ``run.facts`` gets ``cuda_lib`` or ``cuda_lib_error``."""
    if not gpu:
        run.facts["cuda_lib_error"] = "dry run / no CUDA device: the CUDA C++ kernels need a GPU"
        return
    threading.Thread(target=_load_cuda_lib, args=(run,), daemon=True).start()


def _load_cuda_lib(run) -> None:
    from benchmarks import cuda_direct

    start = time.monotonic()
    try:
        lib = cuda_direct.build_and_load(str(run.out / "cuda_build"), 240)
    except Exception as e:  # noqa: BLE001 -- cuda_direct.Unavailable or a build failure: the reason
        run.facts["cuda_lib_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return
    report = lib.path.with_name(lib.path.name + ".ptxas.txt")
    if report.is_file():
        shutil.copy(report, run.out / "cuda_ptxas.txt")
    run.facts["cuda_lib_source"] = "prebuilt" if lib.path.parent == cuda_direct.PREBUILT_DIR else "built here"
    run.facts["cuda_lib_s"] = round(time.monotonic() - start, 1)
    run.facts["cuda_lib"] = lib


def cuda_lib(run, deadline):
    """The CUDA library (waiting for the thread up to ``deadline``), or None with a reason."""
    while "cuda_lib" not in run.facts and "cuda_lib_error" not in run.facts and time.monotonic() < deadline - 5:
        time.sleep(0.5)
    return run.facts.get("cuda_lib"), run.facts.get("cuda_lib_error", "CUDA library build still running")


# ---- the CUDA extension fastlm._C -----------------------------------------------------------------
def extension_command(build_temp: str) -> list:
    return [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", build_temp]


def extension_env(arch: str) -> dict:
    jobs = max(2, (os.cpu_count() or 4) - 4)  # leave cores to the Triton compiles of the steps
    return dict(os.environ, FASTLM_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs))


def start_extension_build(run, arch, command=None) -> None:
    """Starts the build (niced, own process group) when ``arch`` is known (a GPU) and the budget
    allows; otherwise records why not in ``run.facts["ext_build"]``."""
    if arch is None:
        run.facts["ext_build"] = {"status": "skipped", "reason": "dry run / no CUDA device"}
        return
    if run.budget_s < EXT_MIN_BUDGET_S:
        run.facts["ext_build"] = {
            "status": "skipped",
            "reason": f"budget {run.budget_s:.0f} s < {EXT_MIN_BUDGET_S:.0f} s",
        }
        return
    temp = tempfile.mkdtemp(prefix="fastlm_ext_")
    log = open(run.out / "ext_build.log", "w")
    proc = subprocess.Popen(
        command or extension_command(temp),
        cwd=REPO,
        env=extension_env(arch),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: os.nice(5),
    )
    run.facts["ext_build"] = {"status": "running", "proc": proc, "log": log, "t0": time.monotonic(), "arch": arch}


def finish_extension_build(run, wait_s: float) -> dict:
    """Waits up to ``wait_s`` for the build; kills it if still running. Row fields."""
    state = run.facts.get("ext_build") or {"status": "skipped", "reason": "not started"}
    if state["status"] != "running":
        return {k: v for k, v in state.items() if k in ("status", "reason")}
    proc = state["proc"]
    try:
        rc = proc.wait(timeout=max(0.0, wait_s))
    except subprocess.TimeoutExpired:
        rc = None
    finally:  # also when the step's time limit interrupts the wait: never leave it running
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        state["log"].close()
    elapsed = round(time.monotonic() - state["t0"], 1)
    if rc is None:
        fields = {"status": "timeout", "reason": f"not built after {elapsed} s: the test step runs without it"}
    elif rc != 0:
        tail = (run.out / "ext_build.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        fields = {"status": "error", "reason": f"exit {rc}: {tail[0][:300]}"}
    else:
        fields = {"status": "ok", "arch": state["arch"]}
    run.facts["ext_build"] = {"status": fields["status"]}
    return {**fields, "build_s": elapsed, "log": "ext_build.log"}
