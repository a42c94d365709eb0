"""``fastlm.kernels`` in a source tree: map the repository's ``kernels/`` folder to it.

An install (``pip install .``) copies ``kernels/`` into the package as ``fastlm/kernels/`` and Python
finds it as usual. In a source tree (an editable install, or no install at all, as on the GPU image)
there is no such folder: setuptools' editable finder cannot resolve a mapped folder without an
``__init__.py``, and ``kernels/`` must not have one (it would shadow Hugging Face's ``kernels`` from
the repository root). So ``import fastlm`` calls :func:`use_tree_kernels`, which registers the tree's
folder as the namespace package ``fastlm.kernels``. Nothing is imported from it here (no triton).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["use_tree_kernels"]

_PACKAGE = Path(__file__).resolve().parents[1]  # fastlm/
_TREE_KERNELS = _PACKAGE.parent / "kernels"


def use_tree_kernels() -> bool:
    """Register the tree's ``kernels/`` as ``fastlm.kernels``; False when there is nothing to do (an
    install, where ``fastlm/kernels/`` is a folder of the package, or no tree ``kernels/`` beside it)."""
    if "fastlm.kernels" in sys.modules or (_PACKAGE / "kernels").is_dir():
        return False
    if not (_TREE_KERNELS / "attention.py").is_file():
        return False
    spec = importlib.machinery.ModuleSpec("fastlm.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(_TREE_KERNELS)]
    module = importlib.util.module_from_spec(spec)  # a namespace package, like the installed one
    sys.modules["fastlm.kernels"] = module
    sys.modules["fastlm"].kernels = module
    return True
