"""``python -m fastlm.evaluate``: loss, perplexity and bits per character of a checkpoint.

Examples::

    python -m fastlm.evaluate --checkpoint runs/shakespeare                 # the run's val split
    python -m fastlm.evaluate --checkpoint runs/shakespeare --split test --json
    python -m fastlm.evaluate --checkpoint runs/shakespeare/model.safetensors --data other.txt

``--split`` scores the token cache the training run wrote (``<run>/data/<split>.npy``); ``--data``
reads any corpus the training CLI accepts (text file, folder of ``.txt``, CSV/JSONL with
``--text-column``), tokenizes it with the checkpoint's tokenizer and joins documents with its EOS
token, exactly like training. Every next-token prediction of the whole array is scored
(non-overlapping windows of the model's context; see :func:`fastlm.text.data.split_loss`).

Metrics: ``loss`` = mean cross-entropy in nats per token; ``perplexity`` = exp(loss);
``bits/token`` = loss / ln 2; ``bits/char``: for a char tokenizer one token is one character, so it
equals bits/token; for other tokenizers it is the total nats / the number of characters the scored
tokens decode to / ln 2 (comparable across tokenizers; with a word tokenizer, words outside the
vocabulary decode as ``<unk>``, so the count is approximate). Errors are one line ``error: ...`` on
stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from fastlm.cli import run_cli
from fastlm.config import OneLineParser
from fastlm.io.loading import load_model, run_dir_of
from fastlm.text.data import encode_documents, load_split, read_documents, split_loss
from fastlm.training.runtime import resolve_device

__all__ = ["main", "build_parser", "evaluate"]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m fastlm.evaluate",
        description="Loss, perplexity and bits per character of a fastlm checkpoint on a split of "
                    "its run or on any text corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run directory or the model.safetensors file inside one")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=("train", "val", "test"), default=None,
                     help="score this cached split of the run (default: val, unless --data is given)")
    src.add_argument("--data", nargs="+", default=None,
                     help="score this corpus instead: text file(s), a folder of .txt files, CSV or JSONL")
    p.add_argument("--text-column", default=None, help="CSV/JSONL column holding the text")
    p.add_argument("--batch-size", type=int, default=8, help="windows of block_size tokens per forward")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score only the first N tokens (quick estimates on big corpora)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--backend", default=None,
                   help="fastlm.ops backend: auto | reference | torch | triton | cuda | cpp (default: the one the "
                        "run was trained with when it can run here, else auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def evaluate(model, tokenizer, ids, *, batch_size: int = 8, device="cpu") -> dict:
    """Score the token array ``ids`` with ``model``; returns the metrics described in the module doc."""
    ids = np.asarray(ids)
    block = model.max_context()
    loss = split_loss(model, ids, block, batch_size, device)
    n_pred = len(ids) - 1
    if tokenizer.kind == "char":
        n_chars = n_pred
    else:
        n_chars = len(tokenizer.decode(np.asarray(ids[1:], dtype=np.int64).tolist()))
    bpc = loss * n_pred / n_chars / math.log(2) if n_chars else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_token": loss / math.log(2),
        "bits_per_char": bpc,
        "tokens": int(n_pred),
        "chars": int(n_chars),
    }


def run(args, out=None) -> dict:
    out = out if out is not None else sys.stdout
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2 (one prediction needs two tokens), got {args.max_tokens}")
    if args.text_column is not None and args.data is None:
        raise ValueError("--text-column only applies with --data")
    device = resolve_device(args.device)
    model, tokenizer, run_config = load_model(args.checkpoint, device=str(device), backend=args.backend)
    if args.data is not None:
        train = run_config.get("train")  # read the text as the run read its corpus
        raw_newlines = isinstance(train, dict) and train.get("raw_newlines") is True
        ids, _ = encode_documents(tokenizer, read_documents(args.data, args.text_column, raw_newlines))
        source = " ".join(args.data)
    else:
        split = args.split or "val"
        ids = load_split(run_dir_of(args.checkpoint), split, tokenizer.vocab_size)
        source = f"{split} split"
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{source} has {len(ids)} token(s); a loss needs at least 2")
    t0 = time.perf_counter()
    metrics = evaluate(model, tokenizer, np.asarray(ids), batch_size=args.batch_size, device=device)
    seconds = time.perf_counter() - t0
    result = {"checkpoint": args.checkpoint, "data": source, "tokenizer": tokenizer.kind,
              "device": str(device), **metrics, "seconds": round(seconds, 3)}
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        rows = [
            ("checkpoint", args.checkpoint),
            ("data", f"{source} ({metrics['tokens']:,} predicted tokens, {tokenizer.kind} tokenizer)"),
            ("loss", f"{metrics['loss']:.4f} nats/token"),
            ("perplexity", f"{metrics['perplexity']:.3f}"),
            ("bits/token", f"{metrics['bits_per_token']:.4f}"),
            ("bits/char", f"{metrics['bits_per_char']:.4f}"),
            ("time", f"{seconds:.2f} s on {device}"),
        ]
        width = max(len(k) for k, _ in rows)
        out.write("".join(f"{k:<{width}}  {v}\n" for k, v in rows))
    out.flush()
    return result


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (2 and one ``error:`` line for bad input)."""
    def body() -> int:
        run(build_parser().parse_args(argv))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
