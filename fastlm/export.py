"""``python -m fastlm.export``: write a fastlm run as a Hugging Face transformers model directory.

Usage::

    python -m fastlm.export --checkpoint runs/shakespeare-char --out hf/shakespeare
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               m = AutoModelForCausalLM.from_pretrained('hf/shakespeare'); \\
               t = AutoTokenizer.from_pretrained('hf/shakespeare')"

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` and a ``README.md``
model card, and loads without custom code (no ``trust_remote_code``). The architecture mapping is
in :mod:`fastlm.io.hf_common`; a model without an exact transformers equivalent is refused.

Self-check: when transformers is installed, the written directory is loaded back and its logits
are compared with fastlm's on a few sequences (fp32, max abs diff <= 1e-4), and its tokenizer's
ids and text with fastlm's; the export fails otherwise. Everything is written into a staging
folder beside ``--out`` and moved into place only after the check: a failed export leaves
``--out`` as it was.

An export never deletes what it did not write: ``--out`` may not be the exported run (or ``hf:``
folder) nor a folder holding it (a new folder inside the run is fine), and a non-empty ``--out``
is replaced only with ``--overwrite`` and only when it holds an earlier export and nothing else
(its ``.fastlm-export`` marker lists the files). The run is read under its lock: exporting a run
that is being trained is refused (``RUN is in use by pid N``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from fastlm.cli import run_command
from fastlm.config import OneLineParser, add_dataclass_args, dataclass_from_args
from fastlm.inference import LoadConfig
from fastlm.io.hf_export import export_model

__all__ = ["build_parser", "main", "run"]


@dataclass(frozen=True)
class Export:
    out: str = field(metadata={"help": "output directory (must be empty or absent, unless --overwrite)"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an earlier fastlm export in --out (any other non-empty folder is refused)"},
    )
    check: bool = field(
        default=True,
        metadata={"help": "self-check: reload the export with transformers and compare logits (--no-check skips it)"},
    )


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m fastlm.export",
        description="Write a fastlm run as a transformers model "
        "directory (AutoModelForCausalLM / AutoTokenizer load it without custom code).",
    )
    add_dataclass_args(p, LoadConfig, title="model", exclude=("device",))  # loaded on the CPU
    add_dataclass_args(p, Export, title="export")
    return p


def run(argv=None) -> dict:
    """Parse ``argv`` and export; returns :func:`~fastlm.io.hf_export.export_model`'s summary."""
    values = vars(build_parser().parse_args(argv))
    ckpt, opts = dataclass_from_args(LoadConfig, values), dataclass_from_args(Export, values)
    return export_model(ckpt.checkpoint, opts.out, overwrite=opts.overwrite, check=opts.check, backend=ckpt.backend)


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (see :mod:`fastlm.cli`)."""
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
