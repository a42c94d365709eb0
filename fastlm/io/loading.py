"""Loading a model to run it: a fastlm run directory (or its weights file) or a Hugging Face model
directory (``hf:DIR`` / ``hf:ORG/NAME``) -> ``(GPT in eval mode, tokenizer, run config)``.

Everything read here is untrusted input: the run's config is checked against the weights' headers
before any tensor is allocated (:func:`fastlm.io.checkpoint.check_config_matches_weights`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from fastlm import ops
from fastlm.errors import CheckpointError, TokenizerError
from fastlm.io.checkpoint import (
    check_config_matches_weights,
    latest_checkpoint_dir,
    load_model_tensors,
    read_run_config,
    read_weights_file,
    tensors_from_bytes,
)
from fastlm.io.hf_common import HF_PREFIX
from fastlm.io.hf_import import load_hf_model
from fastlm.model import GPT, GPTConfig
from fastlm.text.tokenizers import load_tokenizer

__all__ = ["load_model", "backend_for", "run_dir_of"]


def backend_for(saved: str, requested: Optional[str], device) -> tuple[str, Optional[str]]:
    """The ops backend a loaded model runs with, and a note when the saved one cannot run here.

    ``requested`` (a ``--backend`` flag) wins; otherwise the saved backend is kept when it can run
    on ``device``, else ``auto`` is used (a run trained with ``--backend cuda`` still samples on a CPU
    machine)."""
    if requested is not None:
        if requested != "auto" and requested not in ops.BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose from auto, {', '.join(ops.BACKENDS)}")
        return requested, None
    if saved == "auto":
        return saved, None
    device_type = torch.device(device).type
    why = ops.backend_status().get(saved, f"unknown backend {saved!r}")
    if why is None and (saved, device_type) in (("cpp", "cuda"), ("cuda", "cpu"), ("cpp", "mps"), ("cuda", "mps")):
        why = f"it does not run on {device_type}"
    if why is None:
        return saved, None
    return "auto", f"note: the model was trained with backend {saved!r}, which cannot run here ({why}); using auto"


def _check_stored_config(meta: dict, cfg, weights, config_path) -> None:
    """The model config a fastlm weights file carries in its metadata must be ``cfg``."""
    stored = meta.get("fastlm_model_config")
    if stored is None:
        return
    try:
        stored_cfg = json.loads(stored)
    except (TypeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{weights}: unreadable model config in its metadata") from None
    if not isinstance(stored_cfg, dict):
        raise CheckpointError(f"{weights}: unreadable model config in its metadata")
    try:
        stored_cfg = type(cfg).from_dict(stored_cfg).to_dict()  # older runs stored unresolved defaults (None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: bad model config in its metadata: {str(e)[:200]}") from None
    if stored_cfg != cfg.to_dict():
        diff = sorted(k for k in set(stored_cfg) | set(cfg.to_dict()) if stored_cfg.get(k) != cfg.to_dict().get(k))
        shown = ", ".join(str(k)[:40] for k in diff[:8])
        raise CheckpointError(
            f"{weights} was trained with another model config than {config_path} (differs in {shown})"
        )


def load_model(path, device="cpu", backend: Optional[str] = None) -> tuple:
    """Load ``(GPT in eval mode on device, Tokenizer, run_config dict)`` from a run directory or its
    ``model.safetensors`` (config.json and tokenizer.json are read from the same folder), or from
    ``hf:DIR`` / ``hf:ORG/NAME``, a transformers model directory (see :mod:`fastlm.io.hf_import`).

    ``backend`` overrides the ops backend the run was trained with; without it, a saved backend
    that cannot run here falls back to ``auto`` with a note on stderr."""
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        try:
            return load_hf_model(path[len(HF_PREFIX) :], device, backend)
        except TokenizerError as e:
            raise CheckpointError(f"cannot load the tokenizer of {path}: {e}") from None
    path = Path(path)
    if path.is_dir():
        run_dir = path
        weights = path / "model.safetensors"
        if not weights.exists():
            ckpt = latest_checkpoint_dir(path)
            if ckpt is None:
                raise CheckpointError(f"{path} holds no model.safetensors (is it a fastlm run directory?)")
            weights = ckpt / "best.safetensors"
    elif path.exists():
        run_dir, weights = path.parent, path
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    raw, shapes, meta = read_weights_file(weights)  # read once (a pickle is refused here, first)
    run_config = read_run_config(run_dir)
    try:
        cfg = GPTConfig.from_dict(run_config["model"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: bad model config: {e}") from None
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    except TokenizerError as e:
        raise CheckpointError(f"cannot load the run's tokenizer: {e}") from None
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model config says vocab_size={cfg.vocab_size}"
        )
    _check_stored_config(meta, cfg, weights, run_dir / "config.json")
    check_config_matches_weights(cfg, shapes, weights, run_dir / "config.json")
    tensors = tensors_from_bytes(weights, raw, meta)
    del raw  # the model is built below: hold the weights once, not twice
    cfg.backend, note = backend_for(cfg.backend, backend, device)
    if note:
        print(note, file=sys.stderr, flush=True)
    model = GPT(cfg)
    load_model_tensors(model, tensors, weights)
    model.to(device)
    model.eval()
    return model, tokenizer, run_config


def run_dir_of(checkpoint: str) -> str:
    """The run directory of a checkpoint given as a directory or as a file inside one."""
    if checkpoint.startswith(HF_PREFIX):
        raise CheckpointError(
            f"{checkpoint} is a Hugging Face model, not a fastlm run: it has no data splits "
            f"(evaluate it with --data FILE; prompt it with --prompt)"
        )
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
