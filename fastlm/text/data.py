"""Corpora -> token arrays -> batches.

Pipeline (what ``python -m fastlm.train`` does with ``--data``):

1. :func:`read_documents` reads a text file, several files, a folder of ``.txt`` files (each file one
   document), or a ``.csv`` / ``.jsonl`` file where each row is a document (``text_column`` names
   the column; a column called ``text`` is used when none is named). Files must be UTF-8 (a BOM is
   dropped); anything else is a one-line :class:`DataError` naming the file and the byte offset.
   Newlines are normalised as Python's text mode and nanoGPT do: ``\r\n`` and a lone ``\r``
   become ``\n`` in every document (CSV/JSONL text fields included); ``raw_newlines=True`` keeps
   them as they are.
2. :func:`encode_documents` tokenizes each document and joins them with the tokenizer's EOS id
   (documents longer than ``max_doc_tokens`` are dropped).
3. :func:`split_tokens` cuts the stream, in order, into ``train | val | test`` by fractions
   (default ``0.9, 0.1, 0.0``: validation is the LAST 10% of the stream; with a test fraction the
   test part comes last and validation sits just before it).
4. :func:`save_splits` caches each part as ``<run>/data/<split>.npy`` (uint16 when the vocabulary
   has fewer than 65536 ids, else uint32) and :func:`load_split` memory-maps it back.
5. :class:`BatchSampler` draws random ``(x, y)`` windows from a split with its own numpy generator
   whose state is JSON (for exact resume); :func:`split_loss` scores a whole split.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastlm.errors import DataError
from fastlm.files.atomic import atomic_writer, fsync_dir

__all__ = [
    "DataError",
    "SPLITS",
    "default_corpus",
    "corpus_files",
    "read_documents",
    "normalize_newlines",
    "encode_documents",
    "segment_ids",
    "parse_split",
    "split_tokens",
    "token_dtype",
    "save_splits",
    "load_split",
    "split_path",
    "BatchSampler",
    "split_loss",
]

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".csv", ".jsonl")


def default_corpus() -> Path:
    """The bundled Tiny Shakespeare text (``fastlm/data/tinyshakespeare.txt``)."""
    return Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def corpus_files(paths) -> list[Path]:
    """Expand ``paths`` (a path or a list of paths; folders -> their ``.txt`` files, recursively,
    sorted) into the list of files to read."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError("no corpus given")
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"corpus folder {p} has no .txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DataError(f"corpus path {p} is not a regular file or folder")
        else:
            raise DataError(f"corpus not found: {p}")
    return files


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} looks binary, not text (NUL byte at byte offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _pick_column(path: Path, columns: Sequence[str], text_column: Optional[str]) -> str:
    if text_column is None:
        if "text" in columns:
            return "text"
        raise DataError(
            f"{path}: name the text column with --text-column (columns: {', '.join(map(str, columns)) or 'none'})"
        )
    if text_column not in columns:
        raise DataError(f"{path}: no column {text_column!r} (columns: {', '.join(map(str, columns)) or 'none'})")
    return text_column


def _read_csv(path: Path, text_column: Optional[str]) -> list[str]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        col = _pick_column(path, columns, text_column)
        docs = []
        for row in reader:
            val = row.get(col)
            docs.append("" if val is None else val)
    except csv.Error as e:
        raise DataError(f"{path}: bad CSV ({e})") from None
    return docs


def _read_jsonl(path: Path, text_column: Optional[str]) -> list[str]:
    text = _read_text(path)
    docs = []
    col = text_column
    for lineno, line in enumerate(text.split("\n"), 1):  # JSON Lines: "\n" ends a line ("\r" is JSON space)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: each JSONL line must be an object, got {type(row).__name__}")
        if col is None or col not in row:
            col = _pick_column(path, list(row), text_column) if col is None else col
            if col not in row:
                raise DataError(f"{path}:{lineno}: no field {col!r} (fields: {', '.join(row) or 'none'})")
        val = row[col]
        if val is None:
            val = ""
        if not isinstance(val, str):
            raise DataError(f"{path}:{lineno}: field {col!r} must be a string, got {type(val).__name__}")
        docs.append(val)
    return docs


def normalize_newlines(text: str) -> str:
    """``\r\n`` and lone ``\r`` -> ``\n`` (what Python's text mode does when reading)."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_documents(paths, text_column: Optional[str] = None, raw_newlines: bool = False) -> list[str]:
    """Read a corpus into a list of documents (see the module docstring for the formats).

    Newlines are normalised to ``\n`` (:func:`normalize_newlines`) unless ``raw_newlines``.
    Raises :class:`DataError` for a missing path, a folder without ``.txt`` files, non-UTF-8 or
    binary bytes, a CSV/JSONL without the text column, or a corpus with no text at all.
    """
    docs: list[str] = []
    files = corpus_files(paths)
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".csv":
            docs.extend(_read_csv(f, text_column))
        elif suffix == ".jsonl":
            docs.extend(_read_jsonl(f, text_column))
        else:
            docs.append(_read_text(f))
    if not raw_newlines:
        docs = [normalize_newlines(d) for d in docs]
    if not any(d.strip() for d in docs):
        names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise DataError(f"corpus is empty (no text in {names})")
    return docs


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> np.ndarray:
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:
        return np.asarray(fast(text), dtype=np.int64)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def encode_documents(tokenizer, docs: Iterable[str], max_doc_tokens: Optional[int] = None) -> tuple[np.ndarray, int]:
    """Tokenize ``docs`` and join them with ``tokenizer.eos_id`` (nothing between them when the
    tokenizer has no EOS). Empty documents are skipped; documents with more than ``max_doc_tokens``
    tokens are dropped. Returns ``(int64 ids, number of dropped documents)``."""
    if max_doc_tokens is not None and max_doc_tokens <= 0:
        raise DataError(f"max_doc_tokens must be positive, got {max_doc_tokens}")
    eos = tokenizer.eos_id
    parts: list[np.ndarray] = []
    dropped = 0
    for doc in docs:
        if not doc:
            continue
        ids = _encode(tokenizer, doc)
        if max_doc_tokens is not None and len(ids) > max_doc_tokens:
            dropped += 1
            continue
        if parts and eos is not None:
            parts.append(np.array([eos], dtype=np.int64))
        parts.append(ids)
    if not parts:
        why = f" (all {dropped} longer than max_doc_tokens={max_doc_tokens})" if dropped else ""
        raise DataError(f"corpus has no tokens left{why}")
    return np.concatenate(parts), dropped


def parse_split(spec) -> tuple[float, float, float]:
    """``"0.9,0.1"`` / ``"0.8,0.1,0.1"`` / a sequence -> (train, val, test) fractions summing to 1."""
    if isinstance(spec, str):
        try:
            vals = [float(x) for x in spec.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise DataError(f"split must be fractions like 0.9,0.1 or 0.8,0.1,0.1, got {spec!r}") from None
    else:
        vals = [float(x) for x in spec]
    if len(vals) == 2:
        vals.append(0.0)
    if len(vals) != 3:
        raise DataError(f"split needs 2 or 3 fractions (train,val[,test]), got {spec!r}")
    if any(not math.isfinite(v) or v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be non-negative and sum to 1, got {spec!r}")
    if vals[0] <= 0 or vals[1] <= 0:
        raise DataError(f"split needs a positive train and val fraction, got {spec!r}")
    return vals[0], vals[1], vals[2]


def split_tokens(ids: np.ndarray, fractions=(0.9, 0.1, 0.0)) -> dict[str, np.ndarray]:
    """Cut the stream in order into ``train | val | test`` (val is the last part when test is 0)."""
    f_train, f_val, f_test = parse_split(fractions)
    n = len(ids)
    n_test = int(round(n * f_test))
    n_val = int(round(n * f_val))
    n_train = n - n_val - n_test
    return {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


def split_path(run_dir, split: str) -> Path:
    return Path(run_dir) / "data" / f"{split}.npy"


def save_splits(run_dir, splits: dict, vocab_size: int) -> None:
    """Write each split to ``<run>/data/<split>.npy`` atomically (temp file, fsync, os.replace, fsync of the folder)."""
    folder = Path(run_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    for name, ids in splits.items():
        with atomic_writer(folder / f"{name}.npy") as f:
            np.save(f, np.asarray(ids).astype(dtype, copy=False))
    fsync_dir(folder.parent)  # the data/ folder's own entry in the run directory


def load_split(run_dir, split: str, vocab_size: Optional[int] = None) -> np.ndarray:
    """Token ids of ``split`` ('train' | 'val' | 'test') cached in ``run_dir``, memory-mapped.
    With ``vocab_size``, ids outside ``[0, vocab_size)`` (a damaged cache) raise :class:`DataError`."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = split_path(run_dir, split)
    if not path.is_file():
        raise DataError(f"no cached {split} tokens in {run_dir} (expected {path})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot read token cache {path}: {e}") from None
    if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32):
        raise DataError(f"token cache {path} must be a 1-D uint16/uint32 array, got {arr.dtype} {arr.shape}")
    if vocab_size is not None and len(arr) and int(arr.max()) >= vocab_size:
        raise DataError(
            f"token cache {path} is damaged: it holds id {int(arr.max())}, beyond the tokenizer's "
            f"vocabulary of {vocab_size}; start the run again with --overwrite"
        )
    return arr


# ---------------------------------------------------------------------------------------------
# Batches and scoring
# ---------------------------------------------------------------------------------------------


class BatchSampler:
    """Random ``(x, y)`` windows of ``block_size`` tokens from one token array.

    Uses its own ``numpy.random.Generator`` (PCG64 seeded with ``seed``: an int or a list of ints).
    :meth:`state` / :meth:`set_state` are JSON-serialisable for exact resume.
    """

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(ids) < block_size + 1:
            raise DataError(f"split has {len(ids)} tokens; need at least block_size + 1 = {block_size + 1}")
        self.ids = ids
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._windows = np.lib.stride_tricks.sliding_window_view(ids, block_size + 1)

    def next_indices(self, rank: int = 0, world: int = 1, batch_size: Optional[int] = None) -> np.ndarray:
        """Draw ``batch_size * world`` window offsets (the global batch) and return rank's slice."""
        batch = self.batch_size if batch_size is None else batch_size
        idx = self.rng.integers(0, len(self._windows), size=batch * world)
        return idx[rank * batch : (rank + 1) * batch]

    def sample(
        self, device="cpu", rank: int = 0, world: int = 1, batch_size: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``(x, y)`` batch ``(batch_size, block_size)`` int64 on ``device`` (``batch_size``: this
        draw's, default the sampler's); with DDP every rank draws the same global offsets and keeps its
        own slice (so ranks see different windows)."""
        rows = self._windows[self.next_indices(rank, world, batch_size)].astype(np.int64)  # (B, T + 1)
        t = torch.from_numpy(rows)
        x, y = t[:, :-1], t[:, 1:]
        if torch.device(device).type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.contiguous().to(device), y.contiguous().to(device)
        return x, y

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise DataError(f"bad sampler state: {e}") from None


def _autocast_ctx(autocast):
    if autocast is None:
        return contextlib.nullcontext()
    if hasattr(autocast, "__enter__"):
        return autocast
    return autocast()


def split_loss(
    model, ids, block_size: int, batch_size: int, device, autocast=None, eos_id: Optional[int] = None
) -> float:
    """Mean cross-entropy (nats/token) of ``model`` over the WHOLE token array ``ids``.

    The ``len(ids) - 1`` next-token predictions are scored in non-overlapping windows of
    ``block_size`` inputs (the last, shorter window included), ``batch_size`` windows per forward,
    with the model in eval mode (its previous mode is restored). ``autocast``: None, a context
    manager, or a zero-argument callable returning one. ``eos_id``: mask attention at document
    boundaries (:func:`segment_ids`), as a run trained with document masking does.
    """
    total, count = split_loss_sum(model, ids, block_size, batch_size, device, autocast, eos_id=eos_id)
    return total / count


@torch.no_grad()
def split_loss_sum(
    model,
    ids,
    block_size: int,
    batch_size: int,
    device,
    autocast=None,
    *,
    rank: int = 0,
    world: int = 1,
    eos_id: Optional[int] = None,
) -> tuple[float, int]:
    """``(summed cross-entropy, predictions)`` of :func:`split_loss`'s windows; with ``world`` > 1
    this process scores only every ``world``-th batch starting at ``rank`` (the last rank also
    the tail), so the ranks' sums add up to the whole split's."""
    ids = np.asarray(ids)
    n_pred = len(ids) - 1
    if n_pred < 1:
        raise DataError(f"need at least 2 tokens to compute a loss, got {len(ids)}")
    if block_size <= 0 or batch_size <= 0:
        raise ValueError(f"block_size and batch_size must be positive, got {block_size}, {batch_size}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_full = n_pred // block_size
    try:
        with _autocast_ctx(autocast):
            if n_full:
                full = np.lib.stride_tricks.as_strided(
                    ids,
                    shape=(n_full, block_size + 1),
                    strides=(ids.strides[0] * block_size, ids.strides[0]),
                    writeable=False,
                )
                for start in range(rank * batch_size, n_full, batch_size * world):
                    rows = torch.from_numpy(full[start : start + batch_size].astype(np.int64)).to(device)
                    total += _sum_ce(model, rows, eos_id)
                    count += rows.shape[0] * block_size
            rest = n_pred - n_full * block_size
            if rest and rank == world - 1:
                tail = ids[n_full * block_size :].astype(np.int64)
                total += _sum_ce(model, torch.from_numpy(tail).unsqueeze(0).to(device), eos_id)
                count += rest
    finally:
        model.train(was_training)
    return total, count


def segment_ids(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document ids ``(B, T)`` of token windows ``x`` for document masking: each end-of-text token
    starts a new document (it is the beginning-of-text of the next, as generation uses it), so the
    last token of a document still predicts the EOS from its own document, and the first token
    after the EOS is predicted from the EOS alone. Non-decreasing, as fastlm.ops.attention needs."""
    return (x == eos_id).cumsum(dim=1)


def _sum_ce(model, rows: torch.Tensor, eos_id: Optional[int] = None) -> float:
    x, y = rows[:, :-1], rows[:, 1:]
    logits, _ = model(x, segment_ids=None if eos_id is None else segment_ids(x, eos_id))
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    return float(loss)
