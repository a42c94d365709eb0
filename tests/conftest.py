"""Shared pytest configuration of the test suite."""
import re

import pytest

from fastlm._tree_kernels import use_tree_kernels

use_tree_kernels()  # a checkout without an install (the GPU image): kernels/ as fastlm.kernels

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
