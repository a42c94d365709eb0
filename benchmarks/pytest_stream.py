"""A pytest plugin for the GPU check's test step (``-p benchmarks.pytest_stream``): results that
survive a kill, the GPU-critical tests first, a per-test time limit.

* ``--stream-out FILE``: one JSON line per test outcome (setup errors and skips, the call, teardown
  errors), appended and flushed the moment pytest reports it, so a run killed at any point still
  leaves what finished. Under pytest-xdist only the controller writes.
* Order: the Triton kernel modules first, then the CUDA library, the ops, the model, the rest, and
  every ``torch.compile`` test last (their compiles are the slowest and the least likely to matter
  first); a stable sort, so pytest's order holds within each group.
* ``--stream-test-timeout S``: fail a test that runs longer than S seconds (SIGALRM in the main
  thread) when pytest-timeout is not installed; with it, pass ``--timeout`` instead.
"""

import json
import signal
import time

import pytest

GROUPS = (
    ("test_triton_",),
    ("test_cuda_",),
    ("test_ops", "test_cpp_ops", "test_reference", "test_attention_common", "test_swiglu"),
    ("test_model", "test_generate", "test_sampling", "test_optim"),
)


def rank(item) -> int:
    """The item's place: its group's index, the rest after them, torch.compile tests last."""
    if "compile" in item.name and "torch" in item.name:
        return len(GROUPS) + 1
    name = item.path.name
    return next((i for i, prefixes in enumerate(GROUPS) if name.startswith(prefixes)), len(GROUPS))


def pytest_addoption(parser):
    group = parser.getgroup("stream", "streamed results (benchmarks.pytest_stream)")
    group.addoption("--stream-out", default=None, help="append one JSON line per test outcome here")
    group.addoption(
        "--stream-test-timeout",
        type=float,
        default=0.0,
        help="per-test time limit in seconds (SIGALRM) when pytest-timeout is absent",
    )


def pytest_collection_modifyitems(config, items):
    items.sort(key=rank)


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # a pytest-xdist worker: the controller writes


class _TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("stream_test_timeout")
    if not limit or item.config.pluginmanager.hasplugin("timeout"):
        yield
        return

    def on_alarm(_signum, _frame):
        raise _TestTimeout(f"test ran past --stream-test-timeout={limit:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_logreport(report):
    path = _STATE.get("path")
    if path is None:
        return
    if report.when != "call" and report.passed:
        return  # setup / teardown that went fine: the call's line says it
    row = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration_s": round(report.duration, 3),
        "t": round(time.time(), 3),
    }
    if not report.passed:
        text = report.longreprtext.strip().splitlines()
        row["reason"] = text[-1][:300] if text else ""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


_STATE: dict = {}


def pytest_configure(config):
    out = config.getoption("stream_out")
    _STATE["path"] = out if out and not _is_worker(config) else None
