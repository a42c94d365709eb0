"""Train a GPT on text: ``python -m fastlm.train [flags]`` (or ``fastlm-train``).

With no flags it trains a character-level model on the bundled Tiny Shakespeare, sized for a CPU
(a 3x96 SwiGLU/RoPE model, 1200 steps: under two minutes on two cores), and writes
``runs/shakespeare-char/``. Every flag is generated from a config dataclass
(:class:`~fastlm.training.settings.TrainConfig`, and :class:`~fastlm.model.GPTConfig` for the model), so
defaults live in one place; ``--config run.toml|run.json`` sets many at once (flags on the command
line win over the file).

This module is the command line only: the work is done by :class:`fastlm.training.trainer.Trainer` (also the
Python API), with the settings in :mod:`fastlm.training.settings`, the run directory's life in
:mod:`fastlm.training.rundir` and device/distributed setup in :mod:`fastlm.training.runtime`.

GPU defaults profile: when ``--device`` resolves to CUDA (and ``--no-gpu-defaults`` is not given),
every setting in :data:`~fastlm.training.settings.GPU_DEFAULTS` that the user did not set (on the command
line or in the config file) takes the profile's value instead (nanoGPT's shakespeare-char recipe).

Distributed: ``torchrun --nproc_per_node=N -m fastlm.train ...`` (see :mod:`fastlm.training.trainer`).

Exit codes (:mod:`fastlm.cli`): 0 done (also after early stopping), 2 bad input (one ``error: ...``
line on stderr), 3 non-finite loss, 4 I/O failure (disk full, read-only), 128+signal after Ctrl-C /
SIGTERM (a checkpoint is saved first; continue with ``--resume RUN_DIR``).
"""
from __future__ import annotations

import sys
from typing import Sequence

from fastlm.cli import run_cli
from fastlm.config import ConfigFileError, OneLineParser, add_dataclass_args, load_config_file, merge_values
from fastlm.model import GPTConfig
from fastlm.training.schedule import LRSchedule
from fastlm.training.settings import CPU_MODEL_DEFAULTS, GPU_DEFAULTS, TrainConfig, TrainError
from fastlm.training.trainer import Callback, Trainer

__all__ = ["TrainConfig", "GPU_DEFAULTS", "CPU_MODEL_DEFAULTS", "LRSchedule", "TrainError", "main",
           "build_parser", "resolve_config"]


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m fastlm.train",
        description="Train a decoder-only GPT on text. Flags mirror TrainConfig and GPTConfig fields; "
                    "`--config FILE` (.toml/.json, flat keys or [train]/[model] tables) sets many at once.",
        epilog="GPU defaults profile (applied on CUDA to settings you did not set; --no-gpu-defaults turns it off): "
               + ", ".join(f"{k}={v}" for k, v in GPU_DEFAULTS.items())
               + ". Examples: python -m fastlm.train; python -m fastlm.train --data corpus/ --tokenizer bpe "
                 "--vocab-size 2048 --out-dir runs/mine; torchrun --nproc_per_node=2 -m fastlm.train ...",
    )
    p.add_argument("--config", default=None, metavar="FILE", help="TOML or JSON file of settings (flags override it)")
    add_dataclass_args(p, TrainConfig, title="training")
    add_dataclass_args(p, GPTConfig, title="model", exclude=("vocab_size",), defaults_override=CPU_MODEL_DEFAULTS)
    return p


def resolve_config(argv=None) -> tuple[TrainConfig, dict, set]:
    """Parse flags (+ config file) -> (TrainConfig, model settings the user chose, names they set)."""
    namespace = vars(build_parser().parse_args(argv))
    config_path = namespace.pop("config", None)
    file_data = load_config_file(config_path) if config_path else None
    where = str(config_path) if config_path else "command line"
    merged, explicit = merge_values({"train": TrainConfig, "model": GPTConfig}, file_data, namespace, where=where)
    if "vocab_size" in merged["model"]:
        raise ConfigFileError(f"{where}: model vocab_size comes from the tokenizer; set train vocab_size for bpe/word")
    try:
        train = TrainConfig(**merged["train"])
    except TypeError as e:
        raise ConfigFileError(f"{where}: {e}") from None
    return train, merged["model"], explicit


def main(argv=None, callbacks: Sequence[Callback] = ()) -> int:
    """CLI entry point: returns the exit code (see the module docstring)."""
    def body() -> int:
        train, model, explicit = resolve_config(argv)
        Trainer(train, model, callbacks=callbacks, explicit=explicit).fit()
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
