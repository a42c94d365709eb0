"""``python -m fastlm.generate``: sample text (over :mod:`fastlm.inference`; flags from its dataclasses).

    python -m fastlm.generate --checkpoint runs/shakespeare --prompt "ROMEO:" --max-new-tokens 300
    python -m fastlm.generate --checkpoint runs/shakespeare --num-samples 4 --top-k 50 --output-file samples.txt
    python -m fastlm.generate --checkpoint runs/shakespeare --beam-size 4 --prompt-file <(echo "To be")
    python -m fastlm.generate --checkpoint runs/shakespeare --from-split val --examples 5

One sample is streamed as it is decoded; several samples or beams are printed when done, separated
by a line of dashes; ``--from-split`` prints prompts from the run's split with the model's and the
true continuations. An empty prompt starts at the end-of-text token. ``--prompt-file`` reads at most
16 MiB (a larger regular file is refused by its size). Bad input: one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from fastlm.cli import refuse_existing, run_command, write_new_file
from fastlm.config import OneLineParser, add_dataclass_args, dataclass_from_args
from fastlm.inference import GenerateConfig, LoadConfig, beam_search, generate, load, read_prompt_file, sample_split
from fastlm.text.data import SPLITS

__all__ = ["main", "build_parser", "run"]

SEPARATOR = "-" * 40


@dataclass(frozen=True)
class Prompts:
    prompt: Optional[str] = field(
        default=None, metadata={"help": "prompt text (default: empty = start of a document)", "exclusive": "prompt"}
    )
    prompt_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "read the prompt from this UTF-8 file, FIFO or <(command) (16 MiB at most)",
            "exclusive": "prompt",
        },
    )
    from_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "draw prompts from this split of the run's corpus and show the true continuation",
            "choices": SPLITS,
            "exclusive": "prompt",
        },
    )
    output_file: Optional[str] = field(default=None, metadata={"help": "also write the samples here (a new file)"})


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m fastlm.generate",
        description="Sample text from a fastlm checkpoint "
        "(KV-cached decoding; temperature, top-k, top-p, greedy or beam search).",
    )
    for cls, title in ((LoadConfig, "model"), (Prompts, "prompts"), (GenerateConfig, "decoding")):
        add_dataclass_args(p, cls, title=title)
    return p


def run(argv=None, out=None) -> None:
    """Parse ``argv``, load and decode; print to ``out`` (stdout) and to ``--output-file``."""
    out = out or sys.stdout
    values = vars(build_parser().parse_args(argv))
    source, io, cfg = (dataclass_from_args(cls, values) for cls in (LoadConfig, Prompts, GenerateConfig))
    refuse_existing("--output-file", io.output_file)
    prompt = read_prompt_file(io.prompt_file) if io.prompt_file is not None else io.prompt or ""
    model, tokenizer, info = load(source.checkpoint, device=source.device, backend=source.backend)
    streamed = ""
    if io.from_split is not None:
        done = sample_split(model, tokenizer, info.split(io.from_split), cfg)
        text = "\n".join(
            f"=== example {i}/{len(done)}: {io.from_split} tokens {s.start}..{s.stop - 1} ===\n"
            f"--- prompt ---\n{s.prompt}\n--- model ---\n{s.model}\n--- true ---\n{s.true}\n"
            for i, s in enumerate(done, 1)
        )
    elif cfg.beam_size is not None:
        beams = enumerate(beam_search(model, tokenizer, prompt, cfg), 1)
        text = (SEPARATOR + "\n").join(f"[beam {rank}] score {score:.4f}\n{t}\n" for rank, (t, score) in beams)
    elif cfg.num_samples > 1:
        text = (SEPARATOR + "\n").join(t + "\n" for t in generate(model, tokenizer, prompt, cfg))
    else:  # one sample, streamed as it is decoded
        text = (streamed := generate(model, tokenizer, prompt, cfg, stream=out)[0]) + "\n"
    out.write(text[len(streamed) :])
    out.flush()
    write_new_file("--output-file", io.output_file, text)


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (see :mod:`fastlm.cli`)."""
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
