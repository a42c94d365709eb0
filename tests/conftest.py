"""Shared pytest configuration of the test suite: fixtures and the ``gpu`` marker."""
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

# `benchmarks/` is not installed: plain `pytest` (which, unlike `python -m pytest`, does not put the
# working directory on sys.path) must still import it. Appended, so an installed fastlm stays first.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from fastlm.text import data  # noqa: E402


def _corpus_file(tmp_path_factory, n_chars: int):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(data.default_corpus().read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The first 8,000 characters of Tiny Shakespeare, as a file: enough for tiny training runs."""
    return _corpus_file(tmp_path_factory, 8000)


@pytest.fixture(scope="session")
def corpus_20k(tmp_path_factory):
    """The first 20,000 characters of Tiny Shakespeare, as a file."""
    return _corpus_file(tmp_path_factory, 20000)


@pytest.fixture(scope="session", autouse=True)
def _peak_cache(tmp_path_factory):
    """Training runs measure the CPU peak for MFU once and cache it: in a folder of this session, not
    the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLM_CACHE_DIR", str(tmp_path_factory.mktemp("fastlm-cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add barrier waits (30x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_error_line(captured) -> str:
    """The single ``error: ...`` line a CLI printed on stderr (asserts there is exactly one)."""
    lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), captured.err
    return lines[0]


class Hang(Exception):
    """A read blocked (see :func:`no_hang`)."""


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) when a read blocks: SIGALRM after 20 s."""
    def on_alarm(*_):
        raise Hang("the read blocked")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ==== gpu marker (GPU readiness, issue 12) ========================================================
# `pytest -m gpu` selects exactly the tests that run on a CUDA device when one is present:
#   * tests marked @pytest.mark.gpu explicitly (they need a GPU and skip without one);
#   * every test of the Triton modules (compiled kernels on a GPU, the interpreter on CPU);
#   * tests parametrized with backend="cuda" (they skip without a GPU);
#   * tests with a skipif whose reason says they need a CUDA device / GPU.
# `pytest -m "not gpu"` is then the CPU-only part of the suite. A test that skips itself at run
# time without a GPU (pytest.skip inside) must carry @pytest.mark.gpu explicitly.
_GPU_MODULES = {"test_triton_attention.py", "test_triton_swiglu.py"}
_NEEDS_GPU_REASON = re.compile(r"CUDA (device|GPU)|\bGPU\b")


def _runs_on_gpu(item) -> bool:
    if item.get_closest_marker("gpu") is not None or item.path.name in _GPU_MODULES:
        return True
    if any(_NEEDS_GPU_REASON.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("backend") == "cuda"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_on_gpu(item) and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
# ==== end gpu marker ==============================================================================
