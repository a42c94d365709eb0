"""pytest configuration of the benchmark suites.

* Benchmarks run only when this folder is named on the command line (``pytest benchmarks
  --benchmark-only``); ``pytest`` (testpaths = tests) and ``pytest .`` do not collect them, and
  ``pytest benchmarks`` collects nothing outside this folder.
* The ``bench`` fixture wraps pytest-benchmark's ``benchmark`` (see :mod:`benchmarks.common`).
* On a CPU the session keeps its freed heap as training runs do
  (:func:`fastlm.training.runtime.keep_cpu_heap`), so steps and ops are timed as a run takes them.
* With ``FASTLM_BENCH_RECORD=1`` (default on CUDA) every benchmark appends one JSON line to
  ``benchmarks/results.jsonl``; ``python -m benchmarks.report`` turns it into tables and plots.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from .common import BENCH_DIR, DEVICE, ON_GPU, Bench, grid, record_enabled, results_path, run_info


def _named_explicitly(config) -> bool:
    """True when a command-line path points at this folder or inside it."""
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = arg.split("::", 1)[0]
        if not path:
            continue
        p = (base / path).resolve()
        if p == BENCH_DIR or BENCH_DIR in p.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    """Keep benchmarks out of runs that reach this folder only by recursion (``pytest .``)."""
    path = Path(collection_path).resolve()
    if path != BENCH_DIR and BENCH_DIR in path.parents and not _named_explicitly(config):
        return True
    return None


def pytest_report_header(config):
    info = run_info()
    rec = f"recording to {results_path()}" if record_enabled() else "not recording (FASTLM_BENCH_RECORD=1 to record)"
    return [
        f"fastlm benchmarks: device {info['device']} ({DEVICE.type}, {info['threads']} threads), "
        f"grid {grid()}, commit {info['commit']}{' (dirty)' if info['dirty'] else ''}; {rec}"
    ]


@pytest.fixture(scope="session", autouse=True)
def _heap_as_in_training():
    if not ON_GPU:
        from fastlm.training.runtime import keep_cpu_heap

        keep_cpu_heap()


@pytest.fixture
def bench(benchmark, request):
    b = Bench(benchmark, request.node.nodeid)
    yield b
    if ON_GPU:  # big attention cases must not starve the next one
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
