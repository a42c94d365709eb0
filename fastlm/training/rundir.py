"""A run directory's life: checks before a run starts, replacing an old run, building the data,
the CSV logs, the loss plot and the summary.

Layout (see also :mod:`fastlm.io.checkpoint`): ``config.json``, ``tokenizer.json``,
``model.safetensors`` (best validation weights), ``latest`` + ``ckpt-*/`` (training checkpoints),
``data/{train,val,test}.npy`` (token cache), ``metrics.csv`` (every evaluation), ``train_log.csv``
(every ``log_interval`` steps), ``loss.png`` and ``summary.json``.

``--overwrite`` only ever replaces a fastlm run, deletes only the files a run writes, and only once
the new corpus and settings have checked out: a user's own files in the folder are never touched. A
symbolic link in the place of a run file or folder (``data/``, ``ckpt-*``, ``metrics.csv``, ...) is
removed as a link, never followed, and the logs are never written through one. The run's lock file
(``.lock``, :mod:`fastlm.files.runlock`) is neither a user's file nor a run file to delete.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import shutil
from pathlib import Path

from fastlm.files.atomic import atomic_write_bytes, atomic_write_json, atomic_writer
from fastlm.files.runlock import LOCK_NAME
from fastlm.files.safeio import read_bounded
from fastlm.io import checkpoint as ckpt_mod
from fastlm.text import data as data_mod
from fastlm.text.data import DataError
from fastlm.text.tokenizers import build_tokenizer
from fastlm.training.settings import TrainConfig, TrainError

__all__ = [
    "RUN_FILES",
    "METRICS_HEADER",
    "LOG_HEADER",
    "is_run_dir",
    "check_out_dir",
    "clear_run_dir",
    "build_data",
    "append_csv",
    "truncate_csv",
    "plot_losses",
    "write_summary",
]

RUN_FILES = (
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "latest",
    "metrics.csv",
    "train_log.csv",
    "loss.png",
    "summary.json",
)
METRICS_HEADER = ["step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s"]
LOG_HEADER = ["step", "loss", "lr", "tokens_per_s"]


def is_run_dir(out: Path) -> bool:
    """True when ``out`` holds a fastlm run (its own config.json, not a link to one, says so)."""
    if (out / "config.json").is_symlink():
        return False
    try:
        ckpt_mod.read_run_config(out)
        return True
    except (ValueError, OSError):
        return False


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out-dir`` that training may not write into (before any work is done)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out-dir {out} exists and is not a directory")
    if not (out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())):
        return
    is_run = is_run_dir(out)
    if not overwrite:
        if is_run and not (out / "latest").exists():
            raise TrainError(
                f"run directory {out} already exists but holds no checkpoint (its run stopped "
                f"before the first save); use --overwrite to start it again, or another --out-dir"
            )
        raise TrainError(
            f"run directory {out} already exists; use --overwrite to replace it, "
            f"--resume {out} to continue it, or another --out-dir"
        )
    if not is_run:
        raise TrainError(
            f"--out-dir {out} is not empty and is not a fastlm run directory (no valid "
            f"config.json); --overwrite only replaces fastlm runs, so choose a new or empty "
            f"--out-dir"
        )


def clear_run_dir(out: Path) -> None:
    """Delete the files a previous fastlm run wrote in ``out`` (and nothing else of the user's). A
    symbolic link in their place is removed as a link: nothing it points to is touched."""
    for name in RUN_FILES:
        _remove(out / name)
    for p in out.iterdir():
        if p.name.startswith(ckpt_mod.CKPT_PREFIX):
            _remove(p)
    cache = out / "data"
    if cache.is_symlink() or not cache.is_dir():
        _remove(cache)
        return
    for split in data_mod.SPLITS:
        _remove(data_mod.split_path(out, split))
    for p in cache.glob(".*.npy.*tmp"):
        _remove(p)
    with contextlib.suppress(OSError):
        cache.rmdir()  # only when empty: anything else in it is the user's


def _remove(path: Path) -> None:
    """Remove ``path`` if it is there: a folder with its contents, anything else (a link to a folder
    included) as itself."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def build_data(train: TrainConfig, block_size: int, tokenizer=None):
    """Read + tokenize the corpus and cut the splits, in memory -> (tokenizer, splits, info).
    Nothing is written: a bad corpus fails here, before an existing run is touched."""
    sources = train.data or [str(data_mod.default_corpus())]
    docs = data_mod.read_documents(sources, text_column=train.text_column, raw_newlines=train.raw_newlines)
    if tokenizer is None:
        tokenizer = build_tokenizer(
            train.tokenizer,
            "\n".join(docs) if len(docs) > 1 else docs[0],
            vocab_size=train.vocab_size,
            min_freq=train.min_freq,
            lowercase=train.lowercase,
        )
    ids, dropped = data_mod.encode_documents(tokenizer, docs, train.max_doc_tokens)
    splits = data_mod.split_tokens(ids, train.split)
    for name in ("train", "val"):
        if len(splits[name]) < block_size + 1:
            raise DataError(
                f"corpus too short: the {name} split has {len(splits[name])} tokens but block_size "
                f"{block_size} needs at least {block_size + 1}; use more text or a smaller --block-size"
            )
    if train.split and data_mod.parse_split(train.split)[2] > 0 and len(splits["test"]) < 2:
        raise DataError(f"the test split has {len(splits['test'])} tokens; use a larger test fraction or more text")
    info = {
        "sources": [str(s) for s in sources],
        "documents": len(docs),
        "dropped_documents": dropped,
        "tokens": {k: int(len(v)) for k, v in splits.items()},
    }
    return tokenizer, splits, info


def append_csv(path: Path, header: list, row: list) -> None:
    """Append ``row`` (and the header to a new file). A symbolic link in the log's place is refused,
    never written through: the log belongs to the run."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise TrainError(f"{path} is a symbolic link; a run's log must be its own file (remove the link)") from None
    with os.fdopen(fd, "a", newline="") as f:
        w = csv.writer(f)
        if os.fstat(fd).st_size == 0:
            w.writerow(header)
        w.writerow(row)


MAX_LOG_BYTES = 1 << 30  # a CSV log of a run (a resumed run reads its logs back)


def _read_csv(path: Path) -> list[list[str]]:
    """The rows of a run's CSV log; a FIFO or device in its place is refused unopened."""
    text = read_bounded(path, MAX_LOG_BYTES, "run log", TrainError).decode("utf-8", errors="replace")
    return list(csv.reader(io.StringIO(text, newline="")))


def truncate_csv(path: Path, max_step: int) -> None:
    """Drop the rows after ``max_step`` (a resumed run rewrites them)."""
    if path.is_symlink():
        raise TrainError(f"{path} is a symbolic link; a run's log must be its own file (remove the link)")
    if not path.exists():
        return
    rows = _read_csv(path)
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= max_step]
    atomic_write_bytes(path, "".join(",".join(r) + "\r\n" for r in keep).encode())


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = _read_csv(path)
    return [dict(zip(rows[0], r)) for r in rows[1:]] if rows else []


def plot_losses(run_dir: Path) -> None:
    """``loss.png``: train/val loss at every evaluation and the per-step train loss."""
    rows = _read_rows(run_dir / "metrics.csv")
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [float(r["train_loss"]) for r in rows], marker="o", label="train")
    ax.plot(steps, [float(r["val_loss"]) for r in rows], marker="o", label="val")
    log_rows = _read_rows(run_dir / "train_log.csv")
    if log_rows:
        ax.plot(
            [int(r["step"]) for r in log_rows],
            [float(r["loss"]) for r in log_rows],
            alpha=0.3,
            label="train (per step)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_writer(run_dir / "loss.png") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_json(run_dir / "summary.json", summary)
