"""``python -m fastlm.evaluate``: loss, perplexity and bits per character of a checkpoint (over
:func:`fastlm.inference.evaluate`, which defines the metrics; flags from its dataclasses).

    python -m fastlm.evaluate --checkpoint runs/shakespeare --split test --json   # default: the val split
    python -m fastlm.evaluate --checkpoint runs/shakespeare/model.safetensors --data other.txt

``--split`` scores the token cache the run wrote (``<run>/data/<split>.npy``); ``--data`` reads any
corpus the training CLI accepts (text files, a folder of ``.txt``, CSV/JSONL with ``--text-column``)
and tokenizes it as the run's corpus was (documents joined by the end-of-text token, newlines as
the run treated them). Bad input: one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from fastlm.cli import run_command
from fastlm.config import OneLineParser, add_dataclass_args, dataclass_from_args
from fastlm.errors import InputError
from fastlm.inference import EvaluateConfig, LoadConfig, evaluate, load
from fastlm.text.data import SPLITS, encode_documents, read_documents

__all__ = ["main", "build_parser", "run", "evaluate"]


@dataclass(frozen=True)
class Source:
    split: Optional[str] = field(
        default=None,
        metadata={"choices": SPLITS, "exclusive": "data", "help": "score this cached split of the run (default: val)"},
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "score this corpus instead: text file(s), a folder of .txt files, CSV or JSONL",
            "exclusive": "data",
        },
    )
    text_column: Optional[str] = field(default=None, metadata={"help": "CSV/JSONL column holding the text"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the table"})


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m fastlm.evaluate",
        description="Loss, perplexity and bits per character of "
        "a fastlm checkpoint on a split of its run or on any text corpus.",
    )
    for cls, title in ((LoadConfig, "model"), (Source, "data"), (EvaluateConfig, "scoring")):
        add_dataclass_args(p, cls, title=title, exclude=("raw_newlines",))  # text is read as the run read its own
    return p


def run(argv=None, out=None) -> dict:
    """Parse ``argv``, load, score and print to ``out``; returns the printed result."""
    out = out or sys.stdout
    values = vars(build_parser().parse_args(argv))
    ckpt, src, cfg = (dataclass_from_args(cls, values) for cls in (LoadConfig, Source, EvaluateConfig))
    if src.text_column is not None and not src.data:
        raise InputError("--text-column only applies with --data")
    model, tokenizer, info = load(ckpt.checkpoint, device=ckpt.device, backend=ckpt.backend)
    name = " ".join(src.data) if src.data else f"{src.split or 'val'} split"
    if src.data:  # read and tokenized as the run read its corpus
        ids = encode_documents(tokenizer, read_documents(src.data, src.text_column, info.raw_newlines))[0]
    else:
        ids = info.split(src.split or "val")
    if cfg.doc_mask is None:  # score as the run was trained
        cfg = dataclasses.replace(cfg, doc_mask=bool(info.run_config.get("train", {}).get("doc_mask")))
    t0 = time.perf_counter()
    metrics = evaluate(model, tokenizer, ids, cfg)
    seconds = time.perf_counter() - t0
    result = {
        "checkpoint": ckpt.checkpoint,
        "data": name,
        "tokenizer": tokenizer.kind,
        "device": str(info.device),
        **metrics,
        "seconds": round(seconds, 3),
    }
    rows = [
        ("checkpoint", ckpt.checkpoint),
        ("data", f"{name} ({metrics['tokens']:,} predicted tokens, {tokenizer.kind} tokenizer)"),
        ("loss", f"{metrics['loss']:.4f} nats/token"),
        ("perplexity", f"{metrics['perplexity']:.3f}"),
        ("bits/token", f"{metrics['bits_per_token']:.4f}"),
        ("bits/char", f"{metrics['bits_per_char']:.4f}"),
        ("time", f"{seconds:.2f} s on {info.device}"),
    ]
    width = max(len(k) for k, _ in rows)
    out.write(json.dumps(result) + "\n" if src.json else "".join(f"{k:<{width}}  {v}\n" for k, v in rows))
    out.flush()
    return result


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (see :mod:`fastlm.cli`)."""
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
