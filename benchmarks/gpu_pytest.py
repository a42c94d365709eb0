"""The GPU check's test step: ``pytest -m gpu`` that yields results under a time limit.

:func:`run_pytest` starts pytest in its own process group with :mod:`benchmarks.pytest_stream`
(one JSON line per test the moment it finishes; the Triton modules first, ``torch.compile`` tests
last), JUnit XML, pytest-xdist (``-n``) and pytest-timeout (``--timeout``) where installed (else the
plugin's own per-test limit), and its output streamed to a log file. When the step's time runs out
the whole group is killed; the counts then come from the streamed lines, so a run killed in the
middle of a test still reports every test that finished.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = ("passed", "failed", "skipped", "error")


def pytest_command(out: Path, targets, select: str, test_timeout_s: float, workers: int) -> list:
    """The pytest command line (files under ``out``: pytest_stream.jsonl, pytest_junit.xml)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *targets,
        "-v",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-p",
        "benchmarks.pytest_stream",
        f"--stream-out={out / 'pytest_stream.jsonl'}",
        f"--junitxml={out / 'pytest_junit.xml'}",
    ]
    if select:
        cmd += ["-m", select]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={test_timeout_s:g}"]
    else:
        cmd += [f"--stream-test-timeout={test_timeout_s:g}"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    return cmd


def counts_from_stream(path: Path) -> dict:
    """Outcome counts of the streamed lines (a test's error in setup or teardown counts as an error)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    if not path.is_file():
        return counts
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        outcome = row.get("outcome")
        if row.get("when") != "call" and outcome == "failed":
            outcome = "error"
        if outcome in counts:
            counts[outcome] += 1
    return counts


def counts_from_junit(path: Path):
    """Outcome counts of the JUnit XML, or None when pytest did not get to write it."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = dict.fromkeys(OUTCOMES, 0)
    for case in root.iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts["failed" if kind == "failure" else kind] += 1
    return counts


def run_pytest(
    out: Path,
    limit_s: float,
    targets=("tests",),
    select: str = "gpu",
    env=None,
    test_timeout_s: float = 120.0,
    workers: int = 1,
) -> dict:
    """Runs pytest for at most ``limit_s`` seconds; returns the step's row fields (status ok / fail
    / timeout, the counts, where they came from, the log)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("pytest_stream.jsonl", "pytest_junit.xml"):
        (out / name).unlink(missing_ok=True)
    log = out / "pytest_gpu.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            pytest_command(out, targets, select, test_timeout_s, workers),
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also when the step's own time limit interrupts the wait
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    junit = counts_from_junit(out / "pytest_junit.xml")
    counts = junit if junit is not None else counts_from_stream(out / "pytest_stream.jsonl")
    if rc is None:
        status = "timeout"
    else:
        status = "ok" if rc == 0 and sum(counts.values()) > 0 else "fail"
    return {
        "status": status,
        "rc": rc,
        "counts_from": "junit" if junit is not None else "stream",
        **counts,
        "elapsed_s": round(time.monotonic() - start, 1),
        "limit_s": round(limit_s, 1),
        "log": log.name,
        "tail": _tail(log),
    }


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-2:])[-300:]


def collect_count(env, targets=("tests",), select: str = "gpu", limit: float = 120.0) -> int:
    """How many tests ``pytest --collect-only -m select`` finds (0 when it cannot say)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", select, *targets]
    try:
        text = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit).stdout
    except subprocess.TimeoutExpired:
        return 0
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    return int(found.group(1)) if found else 0
