"""fastlm: small GPT language models with fused attention and SwiGLU kernels.

Quick tour::

    import torch, fastlm
    from fastlm.ops import attention, swiglu
    q = k = v = torch.randn(2, 4, 128, 64)
    y = attention(q, k, v, causal=True)          # backend="auto"
    model = fastlm.GPT(fastlm.GPTConfig())       # decoder-only GPT on fastlm.ops
    summary = fastlm.Trainer(fastlm.TrainConfig(max_iters=200)).fit()   # what `python -m fastlm.train` runs

CLIs: ``python -m fastlm.train``, ``python -m fastlm.generate``, ``python -m fastlm.evaluate``,
``python -m fastlm.export`` (to Hugging Face transformers), ``python -m fastlm.info``. Checkpoints
named ``hf:DIR`` are transformers model directories (:mod:`fastlm.io.hf_import`, extra ``fastlm[hf]``).
"""
from fastlm._version import __version__  # noqa: F401

from fastlm.ops._tree_kernels import use_tree_kernels  # noqa: E402

use_tree_kernels()  # a source tree: its kernels/ folder as fastlm.kernels (an install has it inside)

from fastlm import ops  # noqa: E402,F401
from fastlm.ops import attention, swiglu, swiglu_packed  # noqa: E402,F401

# the rest of the API on first use: keep `import fastlm` quick (the trainer pulls numpy, tqdm, ...)
_LAZY = {"GPT": "fastlm.model", "GPTConfig": "fastlm.model", "Trainer": "fastlm.training.trainer",
         "Callback": "fastlm.training.trainer", "TrainConfig": "fastlm.training.settings"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
