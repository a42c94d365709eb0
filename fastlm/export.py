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

import argparse
import sys

from fastlm.cli import run_cli
from fastlm.config import OneLineParser
from fastlm.io.hf_export import export_model

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m fastlm.export",
        description="Write a fastlm run as a transformers model directory (AutoModelForCausalLM / "
                    "AutoTokenizer load it without custom code).")
    p.add_argument("--checkpoint", required=True, help="run directory or its model.safetensors")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier fastlm export in --out (any other non-empty folder is refused)")
    p.add_argument("--backend", default=None,
                   help="fastlm.ops backend for the self-check's fastlm logits (default: the run's, else auto)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the self-check (reload with transformers and compare logits)")
    return p


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (2 and one ``error:`` line for bad input)."""
    def body() -> int:
        args = build_parser().parse_args(argv)
        export_model(args.checkpoint, args.out, overwrite=args.overwrite, check=not args.no_check,
                     backend=args.backend)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
