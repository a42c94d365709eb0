"""Train a GPT on text: ``python -m fastlm.train [flags]`` (or ``fastlm-train``).

With no flags it trains a character-level model on the bundled Tiny Shakespeare, sized for a CPU
(``GPTConfig()``: a 3x96 SwiGLU/RoPE model with QK-norm, value embeddings, the smear and the x0 mix; 1750
Muon steps in bfloat16 on a CPU with native bf16, 950 in float32 elsewhere: about a minute on two cores), and
writes ``runs/shakespeare-char/``. Every flag is generated from a config dataclass
(:class:`~fastlm.training.settings.TrainConfig`, and :class:`~fastlm.model.GPTConfig` for the model), so
defaults live in one place; ``--config run.toml|run.json`` sets many at once (flags on the command
line win over the file).

Profiles: the settings you do not set take the values of a recipe, ``--profile cpu`` (the default
run) or ``--profile gpu`` (nanoGPT's shakespeare-char recipe); ``auto`` (the default) picks gpu on
CUDA. ``--print-config`` prints the fully resolved settings and exits without training.

This module is the command line only: the work is done by :class:`fastlm.training.trainer.Trainer`
(also the Python API), with the settings in :mod:`fastlm.training.settings`, the run directory's life
in :mod:`fastlm.training.rundir` and device/distributed setup in :mod:`fastlm.training.runtime`.

Distributed: ``torchrun --nproc_per_node=N -m fastlm.train ...`` (see :mod:`fastlm.training.trainer`).

Exit codes (:mod:`fastlm.cli`): 0 done (also after early stopping), 2 bad input (one ``error: ...``
line on stderr), 3 non-finite loss, 4 I/O failure (disk full, read-only), 128+signal after Ctrl-C /
SIGTERM (a checkpoint is saved first; continue with ``--resume RUN_DIR``).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from fastlm.cli import run_cli
from fastlm.config import ConfigFileError, OneLineParser, add_dataclass_args, load_config_file, merge_values
from fastlm.model import GPTConfig
from fastlm.training.settings import PROFILES, TrainConfig
from fastlm.training.trainer import Callback, Trainer

__all__ = ["main", "build_parser", "resolve_config"]


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m fastlm.train",
        description="Train a decoder-only GPT on text. Flags mirror TrainConfig and GPTConfig fields; "
        "`--config FILE` (.toml/.json, flat keys or [train]/[model] tables) sets many at once.",
        epilog="Profiles (the values of the settings you do not set): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in {**r["train"], **r["model"]}.items())
            for name, r in PROFILES.items()
        )
        + ". Examples: python -m fastlm.train; python -m fastlm.train --data corpus/ --tokenizer bpe "
        "--vocab-size 2048 --out-dir runs/mine; torchrun --nproc_per_node=2 -m fastlm.train ...",
    )
    p.add_argument("--config", default=None, metavar="FILE", help="TOML or JSON file of settings (flags override it)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved settings (profile applied) as JSON and exit without training",
    )
    add_dataclass_args(p, TrainConfig, title="training")
    add_dataclass_args(p, GPTConfig, title="model", exclude=("vocab_size",))
    return p


def resolve_config(argv=None) -> tuple[TrainConfig, dict, set, bool]:
    """Parse flags (+ config file) -> (TrainConfig, model settings the user chose, names they set,
    whether --print-config was given)."""
    namespace = vars(build_parser().parse_args(argv))
    config_path = namespace.pop("config", None)
    print_only = namespace.pop("print_config")
    file_data = load_config_file(config_path) if config_path else None
    where = str(config_path) if config_path else "command line"
    merged, explicit = merge_values({"train": TrainConfig, "model": GPTConfig}, file_data, namespace, where=where)
    if "vocab_size" in merged["model"]:
        raise ConfigFileError(f"{where}: model vocab_size comes from the tokenizer; set train vocab_size for bpe/word")
    try:
        train = TrainConfig(**merged["train"])
    except TypeError as e:
        raise ConfigFileError(f"{where}: {e}") from None
    return train, merged["model"], explicit, print_only


def main(argv=None, callbacks: Sequence[Callback] = ()) -> int:
    """CLI entry point: returns the exit code (see the module docstring)."""

    def body() -> int:
        train, model, explicit, print_only = resolve_config(argv)
        trainer = Trainer(train, model, callbacks=callbacks, explicit=explicit)
        if print_only:
            print(json.dumps(trainer.settings(), indent=1, default=str))
            return 0
        trainer.fit()
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
