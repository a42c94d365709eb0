"""``python -m fastlm.generate``: sample text from a trained checkpoint.

Examples::

    python -m fastlm.generate --checkpoint runs/shakespeare --prompt "ROMEO:" --max-new-tokens 300
    python -m fastlm.generate --checkpoint runs/shakespeare/model.safetensors --num-samples 4 \\
        --temperature 0.8 --top-k 50 --output-file samples.txt
    python -m fastlm.generate --checkpoint runs/shakespeare --beam-size 4 --prompt "To be"
    python -m fastlm.generate --checkpoint runs/shakespeare --from-split val --examples 5

One sample is streamed to stdout token by token; several samples (decoded in one batched call)
are printed when done, separated by a line of dashes. ``--from-split`` draws prompts from the run's
cached corpus split and prints each prompt, the model's continuation and the true continuation.
An empty prompt starts from the tokenizer's end-of-text token (the document boundary the model saw
between training documents). Errors are one line ``error: ...`` on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from fastlm.cli import run_cli
from fastlm.config import OneLineParser
from fastlm.io.loading import load_model, run_dir_of
from fastlm.sampling import _check_sampling, beam_search, generate
from fastlm.text.data import load_split, normalize_newlines
from fastlm.training.runtime import resolve_device

__all__ = ["main", "build_parser"]

SEPARATOR = "-" * 40


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m fastlm.generate",
        description="Sample text from a fastlm checkpoint (KV-cached decoding; temperature, top-k, "
                    "top-p, greedy or beam search).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run directory or the model.safetensors file inside one")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: empty = start of a document)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    src.add_argument("--from-split", choices=("train", "val", "test"), default=None,
                     help="draw prompts from this split of the run's corpus and show the true continuation")
    p.add_argument("--raw-newlines", action="store_true",
                   help="keep \\r\\n / \\r in the prompt as they are (default: normalise them to \\n, "
                        "as training does with its corpus)")
    p.add_argument("--examples", type=int, default=5, help="number of prompts with --from-split")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length in tokens with --from-split (default: min(64, block_size // 2))")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (one batched call)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with probability mass >= p")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--beam-size", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = sum log-prob / length**penalty")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop a sample at the end-of-text token (it is not printed)")
    p.add_argument("--output-file", default=None, help="also write the samples here (never overwritten)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--backend", default=None,
                   help="fastlm.ops backend: auto | reference | torch | triton | cuda | cpp (default: the one the "
                        "run was trained with when it can run here, else auto)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole context at every step (slow; for checking the cache)")
    return p




def _check_args(args) -> None:
    def positive(name, val, allow_zero=False):
        if val is not None and (val < 0 or (val == 0 and not allow_zero)):
            raise ValueError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {val}")

    positive("max-new-tokens", args.max_new_tokens, allow_zero=True)
    positive("num-samples", args.num_samples)
    positive("examples", args.examples)
    positive("prompt-tokens", args.prompt_tokens)
    positive("beam-size", args.beam_size)
    if args.beam_size is not None:
        if args.num_samples != 1:
            raise ValueError("--beam-size returns the best beams of one prompt; drop --num-samples")
        if args.from_split is not None:
            raise ValueError("--beam-size cannot be combined with --from-split")
    if args.from_split is not None and args.num_samples != 1:
        raise ValueError("--num-samples does not apply to --from-split (use --examples)")
    if args.beam_size is None:  # sampling settings: refuse them before anything is printed
        _check_sampling(args.temperature, args.top_k, args.top_p, args.greedy)
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        raise ValueError(f"--length-penalty must be a finite number, got {args.length_penalty}")
    if args.output_file is not None and os.path.exists(args.output_file):
        raise ValueError(f"--output-file {args.output_file} already exists; refusing to overwrite it")


def _cut_at_eos(ids: List[int], eos_id: Optional[int]) -> List[int]:
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id)]
    return ids


class _Streamer:
    """Writes the decoded continuation of row 0 as it grows (whole characters only)."""

    def __init__(self, tokenizer, out, eos_id: Optional[int]):
        self.tok, self.out, self.eos_id = tokenizer, out, eos_id
        self.ids: List[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, tokens) -> None:
        if self.done:
            return
        t = int(tokens[0])
        if self.eos_id is not None and t == self.eos_id:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        # a byte-level BPE token can end inside a multi-byte character: wait for the rest
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def finish(self) -> str:
        text = self.tok.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()
        return text


def _prompt_text(args) -> str:
    """The prompt, newlines normalised to ``\\n`` unless ``--raw-newlines``."""
    text = args.prompt if args.prompt is not None else ""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8", newline="") as f:  # newline="": read as is
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start}: "
                             f"{e.reason})") from None
    return text if args.raw_newlines else normalize_newlines(text)


def _write_output(path: Optional[str], text: str) -> None:
    if path is None:
        return
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": fails if it appeared meanwhile
            f.write(text)
    except FileExistsError as e:
        raise ValueError(f"--output-file {path} already exists; refusing to overwrite it") from e


def _sample_kwargs(args, eos_id):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                eos_id=eos_id, use_cache=not args.no_kv_cache)


def _from_split(args, model, tokenizer, device, generator, eos_id, out) -> str:
    ids = load_split(run_dir_of(args.checkpoint), args.from_split, tokenizer.vocab_size)
    block = model.max_context()
    n_prompt = args.prompt_tokens if args.prompt_tokens is not None else max(1, min(64, block // 2))
    if len(ids) < n_prompt + 1:
        raise ValueError(f"the {args.from_split} split has {len(ids)} tokens; a prompt of {n_prompt} "
                         f"tokens plus one to continue needs more (lower --prompt-tokens)")
    rng = np.random.default_rng(args.seed)
    starts = sorted(rng.integers(0, len(ids) - n_prompt, size=args.examples).tolist())
    prompts = torch.tensor(np.stack([np.asarray(ids[s:s + n_prompt], dtype=np.int64) for s in starts]))
    out_ids = generate(model, prompts, args.max_new_tokens, generator=generator,
                       **_sample_kwargs(args, eos_id))
    chunks = []
    for i, s in enumerate(starts):
        cont = _cut_at_eos(out_ids[i, n_prompt:].tolist(), eos_id)
        true = np.asarray(ids[s + n_prompt:s + n_prompt + args.max_new_tokens]).tolist()
        chunks.append(
            f"=== example {i + 1}/{len(starts)}: {args.from_split} tokens {s}..{s + n_prompt - 1} ===\n"
            f"--- prompt ---\n{tokenizer.decode(prompts[i].tolist())}\n"
            f"--- model ---\n{tokenizer.decode(cont)}\n"
            f"--- true ---\n{tokenizer.decode(true)}\n")
    text = "\n".join(chunks)
    out.write(text)
    out.flush()
    return text


def run(args, out=None) -> None:
    out = out if out is not None else sys.stdout
    _check_args(args)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(args.checkpoint, device=str(device), backend=args.backend)
    if args.stop_at_eos and tokenizer.eos_id is None:
        raise ValueError(f"--stop-at-eos: the {tokenizer.kind} tokenizer has no end-of-text token")
    eos_id = tokenizer.eos_id if args.stop_at_eos else None
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    if args.from_split is not None:
        text = _from_split(args, model, tokenizer, device, generator, eos_id, out)
        _write_output(args.output_file, text)
        return

    prompt_text = _prompt_text(args)
    ids = tokenizer.encode(prompt_text)
    if not ids:  # start from the end-of-text token (a document boundary), not printed
        if tokenizer.eos_id is None:
            raise ValueError("empty prompt and the tokenizer has no end-of-text token to start from; "
                             "give --prompt")
        ids = [tokenizer.eos_id]
    n_prompt = len(ids)

    def continuation(row) -> str:
        return tokenizer.decode(_cut_at_eos(row[n_prompt:].tolist(), eos_id))

    if args.beam_size is not None:
        beams = beam_search(model, torch.tensor([ids]), args.max_new_tokens, args.beam_size,
                            length_penalty=args.length_penalty, eos_id=eos_id)
        chunks = [f"[beam {rank}] score {score:.4f}\n{prompt_text}{continuation(seq)}\n"
                  for rank, (seq, score) in enumerate(beams, 1)]
        text = (SEPARATOR + "\n").join(chunks)
        out.write(text)
        out.flush()
        _write_output(args.output_file, text)
        return

    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    kwargs = _sample_kwargs(args, eos_id)
    if args.num_samples == 1:  # stream the one sample as it is decoded
        out.write(prompt_text)
        out.flush()
        streamer = _Streamer(tokenizer, out, eos_id)
        generate(model, prompt, args.max_new_tokens, generator=generator, stream=streamer, **kwargs)
        text = prompt_text + streamer.finish()
        _write_output(args.output_file, text + "\n")
        return

    seqs = generate(model, prompt, args.max_new_tokens, generator=generator, **kwargs)
    chunks = [prompt_text + continuation(row) + "\n" for row in seqs]
    text = (SEPARATOR + "\n").join(chunks)
    out.write(text)
    out.flush()
    _write_output(args.output_file, text)


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (2 and one ``error:`` line for bad input)."""
    def body() -> int:
        run(build_parser().parse_args(argv))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
