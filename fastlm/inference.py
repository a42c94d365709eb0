"""The Python inference API: load a model, sample from it, score text with it.

::

    import sys, fastlm
    model, tokenizer, info = fastlm.load("runs/shakespeare-char")     # or its model.safetensors, or hf:DIR
    text = fastlm.generate(model, tokenizer, "ROMEO:", max_new_tokens=100)[0]
    texts = fastlm.generate(model, tokenizer, "ROMEO:", num_samples=3, top_k=50, temperature=0.9)
    fastlm.generate(model, tokenizer, "ROMEO:", greedy=True, stream=sys.stdout)   # printed as decoded
    fastlm.evaluate(model, tokenizer, info.split("val"))["loss"]                  # the run's val split
    fastlm.evaluate(model, tokenizer, "any text")["bits_per_char"]

Settings are frozen dataclasses, checked when they are made: :class:`GenerateConfig` and
:class:`EvaluateConfig` (keyword settings replace fields of the ``config`` passed, or of the
defaults), :class:`LoadConfig` for :func:`load`. ``python -m fastlm.generate|evaluate`` are thin
layers over these functions, their flags generated from the same dataclasses; a bad setting's
one-line error names the field and its flag (``max_new_tokens (--max-new-tokens) must be >= 0``).
Bad input raises :class:`~fastlm.errors.InputError` (a ``ValueError``; the CLIs exit with 2):
:class:`~fastlm.errors.CheckpointError` for a model that cannot be loaded,
:class:`~fastlm.errors.DataError` for data that cannot be scored,
:class:`~fastlm.errors.TokenizerError` for text the tokenizer cannot encode.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
import torch

from fastlm.errors import DataError, InputError
from fastlm.io.hf_common import HF_PREFIX
from fastlm.io.loading import load_model, run_dir_of
from fastlm.model import GPT
from fastlm.sampling import _check_sampling
from fastlm.sampling import beam_search as _beam_search
from fastlm.sampling import generate as _generate
from fastlm.text.data import encode_documents, load_split, normalize_newlines, split_loss
from fastlm.text.tokenizers import Tokenizer
from fastlm.training.runtime import resolve_device
from fastlm.training.settings import flag_name

__all__ = [
    "load",
    "generate",
    "beam_search",
    "sample_split",
    "evaluate",
    "read_prompt_file",
    "LoadConfig",
    "ModelInfo",
    "GenerateConfig",
    "EvaluateConfig",
    "SplitSample",
    "MAX_PROMPT_BYTES",
]

#: the largest prompt file (bytes) read: a regular file is refused by its size before it is opened,
#: a FIFO or pipe (``--prompt-file <(command)``) once more than this has arrived
MAX_PROMPT_BYTES = 16 << 20

#: a prompt: text, or token ids (a list or a 1-D tensor)
Prompt = Union[str, Sequence[int], torch.Tensor]
#: what :func:`evaluate` scores: a text, a list of documents, or token ids (list, array, 1-D tensor)
Data = Union[str, Sequence[str], Sequence[int], np.ndarray, torch.Tensor]
#: where streamed text goes: a callable taking each new piece, or a text file (flushed per piece)
Stream = Union[Callable[[str], None], TextIO]


def _setting(name: str) -> str:
    """How an error names a setting: ``max_new_tokens (--max-new-tokens)``."""
    return f"{name} ({flag_name(name)})"


def _need(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise InputError(f"{_setting(name)} must be {rule}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _config(cls, config, settings: dict):
    """``config`` (default ``cls()``) with ``settings`` replacing its fields, checked once, here."""
    base = cls() if config is None else config
    if not isinstance(base, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {unknown[0]!r}")
    return dataclasses.replace(base, **settings) if settings else base


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadConfig:
    """Where a model comes from (the ``--checkpoint``, ``--device`` and ``--backend`` flags of the CLIs)."""

    checkpoint: str = field(
        metadata={
            "help": "a run directory, its model.safetensors, or hf:DIR / hf:ORG/NAME "
            "(a Hugging Face transformers model directory)"
        }
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    backend: Optional[str] = field(
        default=None,
        metadata={
            "help": "fastlm.ops backend: auto | reference | torch | triton | cuda | cpp (default: the one the run "
            "was trained with when it can run here, else auto)"
        },
    )


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`load` loaded, besides the model and its tokenizer."""

    source: str  #: the checkpoint as given: a run directory, a weights file or ``hf:NAME``
    run_dir: Optional[Path]  #: its fastlm run directory (None for a ``hf:`` model)
    device: torch.device  #: where the model's weights are
    backend: str  #: the fastlm.ops backend the model runs with
    run_config: dict  #: the run's ``config.json`` (model, train, tokenizer, ...); ``hf:``: its equivalent

    @property
    def raw_newlines(self) -> bool:
        """Whether the run read its corpus with ``\\r\\n`` / ``\\r`` kept as they were."""
        train = self.run_config.get("train")
        return isinstance(train, dict) and train.get("raw_newlines") is True

    def split(self, name: str) -> np.ndarray:
        """The token ids of the run's cached ``train`` / ``val`` / ``test`` split (memory-mapped);
        CheckpointError for a ``hf:`` model, DataError for a missing, damaged or empty split."""
        run_dir = run_dir_of(self.source)  # a hf: model has no splits: says so
        ids = load_split(run_dir, name, self.run_config["model"].get("vocab_size"))
        if len(ids) == 0:
            raise DataError(f"the {name} split of {run_dir} holds no tokens")
        return ids


def load(
    path_or_hf: Union[str, os.PathLike], *, device: str = LoadConfig.device, backend: Optional[str] = LoadConfig.backend
) -> Tuple[GPT, Tokenizer, ModelInfo]:
    """``(model in eval mode on device, tokenizer, ModelInfo)`` from a run directory (its
    ``model.safetensors``, else the latest checkpoint's best weights), a weights file inside one, or
    ``hf:DIR`` / ``hf:ORG/NAME`` (a transformers model directory, or a cached hub snapshot).

    ``device``: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. ``backend``:
    the fastlm.ops backend (default: the one the run was trained with when it can run here, else
    ``auto``, with a note on stderr). Every file is read once and checked (config against the
    weights' header, tokenizer against the vocabulary) before the model is built.
    """
    source = os.fspath(path_or_hf)
    where = resolve_device(device)
    model, tokenizer, run_config = load_model(source, device=str(where), backend=backend)
    run_dir = None if source.startswith(HF_PREFIX) else Path(run_dir_of(source))
    return model, tokenizer, ModelInfo(source, run_dir, where, model.config.backend, run_config)


# ---------------------------------------------------------------------------------------------
# Generating


@dataclass(frozen=True)
class GenerateConfig:
    """How :func:`generate`, :func:`beam_search` and :func:`sample_split` decode (the flags of
    ``python -m fastlm.generate``). Sampling settings apply when ``beam_size`` is None."""

    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate per sample"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt (one batched call)"})
    seed: Optional[int] = field(default=1337, metadata={"help": "random seed (none: torch's global generator)"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature (> 0)"})
    top_k: Optional[int] = field(default=None, metadata={"help": "sample among the k most likely tokens"})
    top_p: Optional[float] = field(
        default=None, metadata={"help": "nucleus sampling: the smallest set of tokens with probability mass >= p"}
    )
    greedy: bool = field(default=False, metadata={"help": "always take the most likely token"})
    beam_size: Optional[int] = field(default=None, metadata={"help": "beam search with this many beams"})
    length_penalty: float = field(default=1.0, metadata={"help": "beam score = sum log-prob / length**penalty"})
    stop_at_eos: bool = field(
        default=False, metadata={"help": "stop a sample at the end-of-text token (it is not printed)"}
    )
    kv_cache: bool = field(
        default=True,
        metadata={
            "help": "decode with the KV cache (--no-kv-cache recomputes the whole context at every step: slow; "
            "for checking the cache)"
        },
    )
    raw_newlines: bool = field(
        default=False,
        metadata={
            "help": "keep \\r\\n / \\r in the prompt as they are, instead of normalising them to \\n as training "
            "does with its corpus"
        },
    )
    examples: int = field(default=5, metadata={"help": "number of prompts with --from-split"})
    prompt_tokens: Optional[int] = field(
        default=None, metadata={"help": "prompt length in tokens with --from-split (default: min(64, block_size // 2))"}
    )

    def __post_init__(self):
        _need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens", ">= 0", self.max_new_tokens)
        for name in ("num_samples", "examples"):
            _need(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("beam_size", "prompt_tokens"):
            value = getattr(self, name)
            _need(value is None or (_is_int(value) and value > 0), name, "> 0 or none", value)
        _need(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            "seed",
            "an integer in [-2**63, 2**64) or none",
            self.seed,
        )
        for name in ("greedy", "stop_at_eos", "kv_cache", "raw_newlines"):
            _need(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        _need(
            isinstance(self.length_penalty, (int, float))
            and not isinstance(self.length_penalty, bool)
            and math.isfinite(self.length_penalty),
            "length_penalty",
            "a finite number",
            self.length_penalty,
        )
        if self.beam_size is not None and self.num_samples != 1:
            raise InputError(
                f"{_setting('beam_size')} returns the best beams of one prompt; leave {_setting('num_samples')} at 1"
            )
        if self.beam_size is None:
            _check_sampling(self.temperature, self.top_k, self.top_p, self.greedy)


class _Streamer:
    """Turns row 0's new tokens, step by step, into text for ``out`` (a callable taking each new
    piece, or a text file, flushed after each piece): whole characters only (a byte-level BPE token
    can end inside one), nothing from ``eos_id`` on. :meth:`finish` writes what is left, then
    ``end``, and returns the continuation's text."""

    def __init__(self, tokenizer, out: Stream, eos_id: Optional[int], end: str = "\n"):
        self.tok, self.eos_id, self.end = tokenizer, eos_id, end
        self.write = out if callable(out) else _file_writer(out)
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
        if text.endswith("\ufffd") or not text.startswith(self.printed):  # wait for the rest of a character
            return
        self.write(text[len(self.printed) :])
        self.printed = text

    def finish(self) -> str:
        text = self.tok.decode(self.ids)
        rest = (text[len(self.printed) :] if text.startswith(self.printed) else "") + self.end
        if rest:
            self.write(rest)
        return text


def _file_writer(out: TextIO) -> Callable[[str], None]:
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    return write


def _prompt_ids(tokenizer, prompt: Prompt, cfg: GenerateConfig) -> Tuple[str, List[int]]:
    """``(the prompt's text as returned, its token ids)``; an empty prompt starts from the
    end-of-text token (the document boundary the model saw between training documents)."""
    if isinstance(prompt, str):
        text = prompt if cfg.raw_newlines else normalize_newlines(prompt)
        ids = list(tokenizer.encode(text))
    else:
        ids = [int(i) for i in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        text = tokenizer.decode(ids)
    if not ids:
        if tokenizer.eos_id is None:
            raise InputError(
                "empty prompt and the tokenizer has no end-of-text token to start from; give a prompt (--prompt)"
            )
        ids = [tokenizer.eos_id]
    return text, ids


def _eos(tokenizer, cfg: GenerateConfig) -> Optional[int]:
    if cfg.stop_at_eos and tokenizer.eos_id is None:
        raise InputError(f"{_setting('stop_at_eos')}: the {tokenizer.kind} tokenizer has no end-of-text token")
    return tokenizer.eos_id if cfg.stop_at_eos else None


def _sampling(model, cfg: GenerateConfig, eos_id: Optional[int]) -> dict:
    """The keyword arguments of :func:`fastlm.sampling.generate` (a generator seeded on the model's device)."""
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    return dict(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        greedy=cfg.greedy,
        eos_id=eos_id,
        use_cache=cfg.kv_cache,
        generator=generator,
    )


def _continuation(tokenizer, ids, eos_id: Optional[int]) -> str:
    ids = [int(i) for i in ids]
    return tokenizer.decode(ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids)


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: Prompt = "",
    config: Optional[GenerateConfig] = None,
    *,
    stream: Optional[Stream] = None,
    **settings,
) -> List[str]:
    """Continue ``prompt`` (text, or token ids) and return the texts, each the prompt followed by
    its continuation: ``num_samples`` samples decoded in one batched call, or with ``beam_size`` the
    beams, best first (:func:`beam_search` gives their scores).

    ``config`` / ``settings``: see :class:`GenerateConfig` (greedy, temperature, top-k, top-p, beam
    search, several samples, stop at the end-of-text token, KV cache on or off, seed). Text prompts
    have their newlines normalised to ``\\n`` unless ``raw_newlines``; an empty prompt starts from
    the end-of-text token. ``stream`` (one sample only) receives the returned text piece by piece as
    it is decoded, the prompt first: a callable, or a text file such as ``sys.stdout``.
    """
    cfg = _config(GenerateConfig, config, settings)
    if stream is not None and (cfg.num_samples != 1 or cfg.beam_size is not None):
        raise InputError("stream takes one sample: leave num_samples at 1 and beam_size at none")
    if cfg.beam_size is not None:
        return [text for text, _ in beam_search(model, tokenizer, prompt, cfg)]
    text, ids = _prompt_ids(tokenizer, prompt, cfg)
    eos_id = _eos(tokenizer, cfg)
    batch = torch.tensor([ids] * cfg.num_samples, dtype=torch.long)
    if stream is None:
        rows = _generate(model, batch, cfg.max_new_tokens, **_sampling(model, cfg, eos_id))
        return [text + _continuation(tokenizer, row[len(ids) :].tolist(), eos_id) for row in rows]
    streamer = _Streamer(tokenizer, stream, eos_id, end="")
    if text:
        streamer.write(text)
    _generate(model, batch, cfg.max_new_tokens, stream=streamer, **_sampling(model, cfg, eos_id))
    return [text + streamer.finish()]


def beam_search(
    model: GPT, tokenizer: Tokenizer, prompt: Prompt = "", config: Optional[GenerateConfig] = None, **settings
) -> List[Tuple[str, float]]:
    """Beam search from ``prompt`` with ``beam_size`` beams (a required setting): ``(text, score)``
    pairs, best first, each text the prompt followed by its continuation; score = the
    continuation's summed log-probability / its length ** ``length_penalty``."""
    cfg = _config(GenerateConfig, config, settings)
    if cfg.beam_size is None:
        raise InputError(f"beam_search needs {_setting('beam_size')}")
    text, ids = _prompt_ids(tokenizer, prompt, cfg)
    eos_id = _eos(tokenizer, cfg)
    beams = _beam_search(
        model, torch.tensor([ids]), cfg.max_new_tokens, cfg.beam_size, length_penalty=cfg.length_penalty, eos_id=eos_id
    )
    return [(text + _continuation(tokenizer, seq[len(ids) :].tolist(), eos_id), score) for seq, score in beams]


@dataclass(frozen=True)
class SplitSample:
    """A prompt drawn from a token array by :func:`sample_split`, with both continuations."""

    start: int  #: the index of the prompt's first token in the array
    stop: int  #: the index after its last token (where the true continuation starts)
    prompt: str  #: the prompt's text
    model: str  #: the model's continuation
    true: str  #: the text that follows the prompt in the array (``max_new_tokens`` tokens)


def sample_split(
    model: GPT, tokenizer: Tokenizer, ids, config: Optional[GenerateConfig] = None, **settings
) -> List[SplitSample]:
    """``examples`` prompts of ``prompt_tokens`` tokens drawn (seeded) from the token array ``ids``
    (e.g. ``info.split("val")``), continued in one batched call (sampling settings as in
    :func:`generate`; no beams, one sample per prompt)."""
    cfg = _config(GenerateConfig, config, settings)
    if cfg.beam_size is not None or cfg.num_samples != 1:
        raise InputError(
            f"prompts from a split (--from-split) take neither {_setting('beam_size')} nor "
            f"{_setting('num_samples')} (use examples, --examples)"
        )
    n = cfg.prompt_tokens if cfg.prompt_tokens is not None else max(1, min(64, model.max_context() // 2))
    if len(ids) < n + 1:
        raise DataError(
            f"the split has {len(ids)} tokens; a prompt of {n} tokens plus one to continue needs "
            f"more (lower --prompt-tokens)"
        )
    rng = np.random.default_rng(None if cfg.seed is None else cfg.seed % 2**64)
    starts = sorted(rng.integers(0, len(ids) - n, size=cfg.examples).tolist())
    prompts = torch.tensor(np.stack([np.asarray(ids[s : s + n], dtype=np.int64) for s in starts]))
    eos_id = _eos(tokenizer, cfg)
    rows = _generate(model, prompts, cfg.max_new_tokens, **_sampling(model, cfg, eos_id))
    true = [np.asarray(ids[s + n : s + n + cfg.max_new_tokens], dtype=np.int64).tolist() for s in starts]
    return [
        SplitSample(
            s,
            s + n,
            tokenizer.decode(prompts[i].tolist()),
            _continuation(tokenizer, rows[i, n:].tolist(), eos_id),
            tokenizer.decode(true[i]),
        )
        for i, s in enumerate(starts)
    ]


def read_prompt_file(path: Union[str, os.PathLike], max_bytes: int = MAX_PROMPT_BYTES) -> str:
    """The UTF-8 text of a prompt file, newlines as they are. A regular file larger than
    ``max_bytes`` is refused by its size before it is opened; a FIFO, a pipe (``<(command)``) or
    another stream is read up to ``max_bytes`` and refused when more arrives."""
    what = f"--prompt-file {os.fspath(path)}"
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what} is a directory")
        if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
            raise InputError(f"{what} is too large ({st.st_size} bytes; the limit is {max_bytes})")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError) as e:  # other OSErrors stay I/O failures (exit 4)
        raise InputError(f"{what}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise InputError(f"{what} holds more than {max_bytes} bytes (the limit)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 text (byte {e.start}: {e.reason})") from None


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class EvaluateConfig:
    """How :func:`evaluate` scores (flags of ``python -m fastlm.evaluate``)."""

    batch_size: int = field(default=8, metadata={"help": "windows of block_size tokens per forward"})
    max_tokens: Optional[int] = field(
        default=None, metadata={"help": "score only the first N tokens (quick estimates on big corpora)"}
    )
    raw_newlines: bool = field(
        default=False,
        metadata={"help": "keep \\r\\n / \\r in text as they are, instead of normalising them to \\n as training does"},
    )
    doc_mask: Optional[bool] = field(
        default=None,
        metadata={
            "help": "mask attention at document boundaries (end-of-text tokens), as training with --doc-mask does "
            "(default: what the run was trained with)"
        },
    )

    def __post_init__(self):
        _need(_is_int(self.batch_size) and self.batch_size > 0, "batch_size", "> 0", self.batch_size)
        _need(self.doc_mask in (None, True, False), "doc_mask", "true, false or none", self.doc_mask)
        _need(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 2),
            "max_tokens",
            ">= 2 (one prediction needs two tokens)",
            self.max_tokens,
        )
        _need(isinstance(self.raw_newlines, bool), "raw_newlines", "true or false", self.raw_newlines)


def _token_ids(tokenizer, data: Data, cfg: EvaluateConfig) -> np.ndarray:
    docs = [data] if isinstance(data, str) else data
    if isinstance(docs, (list, tuple)) and docs and all(isinstance(d, str) for d in docs):
        docs = docs if cfg.raw_newlines else [normalize_newlines(d) for d in docs]
        return encode_documents(tokenizer, docs)[0]  # joined with the end-of-text token, as training does
    ids = np.asarray(data.cpu() if isinstance(data, torch.Tensor) else data)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise DataError(
            f"data must be a text, a list of documents or a 1-D array of token ids, got "
            f"{ids.dtype} of shape {ids.shape}"
        )
    return ids


def evaluate(model: GPT, tokenizer: Tokenizer, data: Data, config: Optional[EvaluateConfig] = None, **settings) -> dict:
    """Score ``data`` with ``model``: a text, a list of documents (tokenized and joined with the
    end-of-text token, as training does; newlines normalised unless ``raw_newlines``), or token ids
    such as ``info.split("val")``. Every next-token prediction is scored, in non-overlapping windows
    of the model's context (:func:`fastlm.text.data.split_loss`); ``max_tokens`` keeps the first N.

    Returns ``loss`` (mean cross-entropy, nats/token), ``perplexity`` (exp(loss)), ``bits_per_token``
    (loss / ln 2), ``bits_per_char``, ``tokens`` (predictions scored) and ``chars``. Bits per char:
    for a char tokenizer one token is one character, so it equals bits/token; otherwise it is the
    total nats / the characters the scored tokens decode to / ln 2 (comparable across tokenizers;
    a word tokenizer decodes unknown words as ``<unk>``, so there the count is approximate).
    """
    cfg = _config(EvaluateConfig, config, settings)
    ids = _token_ids(tokenizer, data, cfg)[: cfg.max_tokens]
    if len(ids) < 2:
        raise DataError(f"{len(ids)} token(s) to score; a loss needs at least 2")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise DataError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
    if cfg.doc_mask and tokenizer.eos_id is None:
        raise InputError(f"doc_mask needs an end-of-text token; the {tokenizer.kind} tokenizer has none")
    loss = split_loss(
        model,
        ids,
        model.max_context(),
        cfg.batch_size,
        next(model.parameters()).device,
        eos_id=tokenizer.eos_id if cfg.doc_mask else None,
    )
    n_pred = len(ids) - 1
    if tokenizer.kind == "char":
        n_chars = n_pred
    else:
        n_chars = len(tokenizer.decode(np.asarray(ids[1:], dtype=np.int64).tolist()))
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_token": loss / math.log(2),
        "bits_per_char": loss * n_pred / n_chars / math.log(2) if n_chars else float("nan"),
        "tokens": int(n_pred),
        "chars": int(n_chars),
    }
