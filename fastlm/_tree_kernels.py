"""Run from a source checkout without installing: map the tree's ``kernels/`` folder to
``fastlm.kernels`` (what setup.py's ``package_dir`` does for an install). Used by
``benchmarks.gpu_check`` and the test suite's conftest on machines where nothing is installed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["use_tree_kernels"]

_KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def use_tree_kernels() -> bool:
    """Make ``fastlm.kernels`` importable from the tree; False when it already is (an install) or
    when this checkout has no ``kernels/`` folder."""
    import fastlm
    if "fastlm.kernels" in sys.modules or importlib.util.find_spec("fastlm.kernels") is not None:
        return False
    if not (_KERNELS / "__init__.py").is_file():
        return False
    spec = importlib.util.spec_from_file_location("fastlm.kernels", _KERNELS / "__init__.py",
                                                  submodule_search_locations=[str(_KERNELS)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastlm.kernels"] = module
    spec.loader.exec_module(module)
    fastlm.kernels = module
    return True
