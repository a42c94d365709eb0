"""The suite's own rules (tests/conftest.py): ``pytest -m gpu`` and ``pytest -m "not gpu"`` split it into
two halves that add up to the whole and mean what they say; the CPU tests that train, evaluate and
generate keep their meaning where a GPU is visible (a simulated one: FASTLM_TEST_CUDA_VISIBLE); child
processes import the fastlm under test, also from a checkout that was never installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env, run_bounded

ROOT = Path(__file__).resolve().parents[1]


def _pytest(args, timeout_s, cwd=ROOT, **env):
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return run_bounded(cmd, timeout_s, cwd=cwd, env=child_env(**env))


def _collect(tmp_path, name, marks, **env):
    """``pytest --collect-only -m marks`` -> (node ids selected, {node id: {"gpu", "skipped"}} of all)."""
    report = tmp_path / f"{name}.json"
    proc = _pytest(["--collect-only", "-q", "-m", marks, "tests"], 600, FASTLM_TEST_MARKS_OUT=report, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listing = proc.stdout.split("\n\n", 1)[0]  # the node ids, one a line, then a blank line and the summary
    selected = {line for line in listing.splitlines() if "::" in line}
    return selected, json.loads(report.read_text())


@pytest.mark.slow
def test_the_gpu_halves_add_up_and_each_test_is_in_the_half_that_runs_it(tmp_path):
    gpu, everything = _collect(tmp_path, "gpu", "gpu")
    cpu, _ = _collect(tmp_path, "cpu", "not gpu")
    assert gpu and cpu and not gpu & cpu and gpu | cpu == set(everything)
    assert gpu == {node for node, row in everything.items() if row["gpu"]}
    # the same collection on the other kind of machine (simulated): a test that runs only where a GPU
    # is must be gpu, one that runs only where none is must not (skip marks; a test that skips itself
    # inside for want of a GPU fails outside the gpu half: conftest's pytest_runtest_makereport)
    gpu_here = torch.cuda.is_available()
    _, there = _collect(tmp_path, "there", "gpu or not gpu", FASTLM_TEST_CUDA_VISIBLE=str(int(not gpu_here)))
    with_gpu, without_gpu = (everything, there) if gpu_here else (there, everything)
    changes = {
        node: row["gpu"]
        for node, row in everything.items()
        if node in there and with_gpu[node]["skipped"] != without_gpu[node]["skipped"]
    }
    only_with_gpu = {node for node in changes if without_gpu[node]["skipped"]}
    assert only_with_gpu and len(changes) > len(only_with_gpu)  # both kinds exist: the check is not vacuous
    wrong = [
        f"{node}: runs only {'with' if node in only_with_gpu else 'without'} a GPU, gpu={gpu}"
        for node, gpu in changes.items()
        if gpu != (node in only_with_gpu)
    ]
    assert not wrong, "\n".join(wrong)


GUARD_TESTS = textwrap.dedent("""
    import pytest

    def test_cpu_test_that_wants_a_gpu():
        pytest.skip("needs a CUDA device")

    @pytest.mark.gpu
    def test_gpu_test_without_one():
        pytest.skip("needs a CUDA device")

    def test_cpu_test_skipped_for_another_reason():
        pytest.skip("nvcc not found")
""")


def test_a_cpu_test_skipping_for_want_of_a_gpu_fails(tmp_path):
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_guard.py").write_text(GUARD_TESTS)
    proc = _pytest(["-rA", "tests/test_guard.py"], 300, cwd=tmp_path)
    assert "FAILED tests/test_guard.py::test_cpu_test_that_wants_a_gpu" in proc.stdout, proc.stdout[-3000:]
    assert "but not in the gpu half: mark it @pytest.mark.gpu" in proc.stdout
    assert "1 failed, 2 skipped" in proc.stdout, proc.stdout[-3000:]


#: the modules whose CPU tests train, evaluate or generate (with and without the CLIs)
DEVICE_SENSITIVE = ["test_train.py", "test_optim.py", "test_checkpoint.py", "test_evaluate.py", "test_generate.py"]


@pytest.mark.slow
def test_cpu_tests_keep_their_meaning_where_a_gpu_is_visible():
    """Those modules with torch reporting a CUDA device: a test that does not pin the CPU would take
    the GPU (and the GPU profile) there, and fails here at its first CUDA tensor. opcheck's AOT pass
    probes CUDA itself, whatever the device of its tensors: left out."""
    proc = _pytest(
        ["-m", "not gpu and not slow", "-k", "not opcheck", *(f"tests/{name}" for name in DEVICE_SENSITIVE)],
        900,
        FASTLM_TEST_CUDA_VISIBLE="1",
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "CUDA: True" in proc.stdout  # simulated, or a real GPU: then the run is the real thing
    assert int(re.search(r"(\d+) passed", proc.stdout.splitlines()[-1]).group(1)) >= 150, proc.stdout[-500:]


LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open(sys.argv[1], "w").write(str(rank.pid))
    time.sleep(1000)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_hang_guard_kills_a_launcher_and_what_it_started(tmp_path):
    """run_bounded past its time: the test fails, and the child goes together with what it started in a
    session of its own (as torchrun starts its ranks); nothing is left holding the pipes."""
    pid_file = tmp_path / "rank.pid"
    with pytest.raises(pytest.fail.Exception, match="still running after 5 s"):
        run_bounded([sys.executable, "-c", LAUNCHER, str(pid_file)], 5)
    rank = int(pid_file.read_text())
    deadline = time.monotonic() + 30  # SIGKILL lands asynchronously
    while _alive(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = _alive(rank)
    if survived:  # (leave no orphan behind)
        os.kill(rank, signal.SIGKILL)
    assert not survived


CHILD_SCRIPT = textwrap.dedent("""
    import subprocess, sys
    checkout = sys.argv[1]
    sys.path[:0] = [checkout + "/tests", checkout]
    import conftest
    code = "import fastlm; print(fastlm.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=conftest.child_env(), capture_output=True,
                          text=True, timeout=120)
    print(proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])
""")


def test_children_import_the_checkout_that_was_never_installed(tmp_path):
    """A copy of the tree that no pip install knows (as on the GPU image): a child started from anywhere
    imports the copy's fastlm, not an installed one and not nothing."""
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "_C.*")
    for folder in ("fastlm", "kernels"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=ignore)
    (checkout / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", checkout / "tests")
    env = child_env()
    env["PYTHONPATH"] = ""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT, str(checkout)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == checkout / "fastlm" / "__init__.py", proc.stdout
