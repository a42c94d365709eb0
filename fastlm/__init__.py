"""fastlm: small GPT language models with fused attention and SwiGLU kernels.

Quick tour::

    import torch, fastlm
    from fastlm.ops import attention, swiglu
    q = k = v = torch.randn(2, 4, 128, 64)
    y = attention(q, k, v, causal=True)          # backend="auto"
    model = fastlm.GPT(fastlm.GPTConfig())       # decoder-only GPT on fastlm.ops
    summary = fastlm.Trainer(fastlm.TrainConfig(max_iters=200)).fit()   # what `python -m fastlm.train` runs
    model, tokenizer, info = fastlm.load("runs/shakespeare-char")      # the inference API (fastlm.inference)
    print(fastlm.generate(model, tokenizer, "ROMEO:", max_new_tokens=100)[0])
    print(fastlm.evaluate(model, tokenizer, info.split("val"))["loss"])

CLIs: ``python -m fastlm.train``, ``python -m fastlm.generate``, ``python -m fastlm.evaluate``,
``python -m fastlm.export`` (to Hugging Face transformers), ``python -m fastlm.info``. Checkpoints
named ``hf:DIR`` are transformers model directories (:mod:`fastlm.io.hf_import`, extra ``fastlm[hf]``).
"""

import sys
import types

from fastlm._version import __version__  # noqa: F401
from fastlm.ops._tree_kernels import use_tree_kernels  # noqa: E402

use_tree_kernels()  # a source tree: its kernels/ folder as fastlm.kernels (an install has it inside)

from fastlm import ops  # noqa: E402,F401
from fastlm.ops import attention, swiglu, swiglu_packed  # noqa: E402,F401

# the rest of the API on first use: keep `import fastlm` quick (the trainer pulls numpy, tqdm, ...)
_LAZY = {
    "GPT": "fastlm.model",
    "GPTConfig": "fastlm.model",
    "Trainer": "fastlm.training.trainer",
    "Callback": "fastlm.training.trainer",
    "TrainConfig": "fastlm.training.settings",
    **{
        name: "fastlm.inference"
        for name in ("load", "generate", "evaluate", "beam_search", "ModelInfo", "GenerateConfig", "EvaluateConfig")
    },
}

__all__ = ["__version__", "ops", "attention", "swiglu", "swiglu_packed", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The type of the ``fastlm`` module: ``fastlm.generate`` and ``fastlm.evaluate`` stay the API
    functions when the command-line modules of the same names are imported (``python -m
    fastlm.generate``, ``from fastlm.evaluate import main``); the import system would otherwise set
    each such module as an attribute of its package, in place of the function."""

    def __setattr__(self, name, value):
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
