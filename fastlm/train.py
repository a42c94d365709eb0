"""Train a GPT on text: ``python -m fastlm.train [flags]`` (or ``fastlm-train``).

With no flags it trains a character-level model on the bundled Tiny Shakespeare, sized for a CPU
(a 3x96 SwiGLU/RoPE model, 1200 steps: under two minutes on two cores), and writes
``runs/shakespeare-char/``. Every flag is generated
from a config dataclass (:class:`TrainConfig` here, :class:`fastlm.model.GPTConfig` for the
model), so defaults live in one place; ``--config run.toml|run.json`` sets many at once (flags on
the command line win over the file).

GPU defaults profile: when ``--device`` resolves to CUDA (and ``--no-gpu-defaults`` is not given),
every setting in :data:`GPU_DEFAULTS` that the user did not set (on the command line or in the
config file) takes the profile's value instead: a 6x384 model, context 256, batch 64, 5000
steps, dropout 0.2 (nanoGPT's shakespeare-char recipe); bf16 autocast follows from ``--dtype auto``.

Run directory: see :mod:`fastlm.checkpoint` (config.json, tokenizer.json, model.safetensors = best
validation weights, crash-safe training checkpoints) plus ``data/`` (token cache), ``metrics.csv``
(every evaluation), ``train_log.csv`` (every ``--log-interval`` steps), ``loss.png`` and
``summary.json`` (val_loss over the WHOLE validation split with the best weights, ...).

Distributed: ``torchrun --nproc_per_node=N -m fastlm.train ...``. Every step all ranks draw the same
global set of window offsets from one generator and rank ``r`` takes its own slice, so each rank
trains on different data and a run on N ranks equals a one-process run with the same global batch
(``batch_size x grad_accum x world_size``); only rank 0 writes files.

Exit codes: 0 done (also after early stopping), 2 bad input (one ``error: ...`` line on stderr),
3 non-finite loss, 128+signal after Ctrl-C / SIGTERM (a checkpoint is saved first; continue with
``--resume RUN_DIR``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt_mod
from . import data as data_mod
from .checkpoint import CheckpointError
from .config import ConfigFileError, OneLineParser, add_dataclass_args, load_config_file, merge_values
from .data import DataError
from .model import GPT, GPTConfig
from .optim import OPTIMIZERS, build_optimizer

__all__ = ["TrainConfig", "GPU_DEFAULTS", "train", "main", "build_parser", "TrainError"]

SCHEDULES = ("cosine", "plateau", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class TrainError(ValueError):
    """A bad training setting (one line)."""


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list, metadata={
        "help": "corpus: text file(s), a folder of .txt files, or .csv/.jsonl with --text-column; "
                "empty = the bundled Tiny Shakespeare"})
    out_dir: str = field(default="runs/shakespeare-char", metadata={"help": "run directory"})
    tokenizer: str = field(default="char", metadata={"help": "char | word | bpe | tiktoken:NAME_OR_FILE"})
    vocab_size: Optional[int] = field(default=None, metadata={"help": "tokenizer vocabulary size (bpe; cap for word)"})
    min_freq: int = field(default=1, metadata={"help": "word tokenizer: minimum count of a word"})
    lowercase: bool = field(default=False, metadata={"help": "word tokenizer: lowercase the text"})
    text_column: Optional[str] = field(default=None, metadata={"help": "CSV/JSONL column holding the text (default: 'text')"})
    max_doc_tokens: Optional[int] = field(default=None, metadata={"help": "drop documents longer than this many tokens"})
    split: str = field(default="0.9,0.1,0.0", metadata={
        "help": "train,val[,test] fractions of the token stream, cut in that order (by default val = the last 10 percent)"})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch (per rank)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_iters: int = field(default=1200, metadata={"help": "optimizer steps"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr: Optional[float] = field(default=None, metadata={"help": "final / lowest learning rate (default lr/10)"})
    warmup_iters: int = field(default=50, metadata={"help": "linear warm-up steps"})
    lr_schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule", "choices": SCHEDULES})
    plateau_patience: int = field(default=2, metadata={"help": "plateau: evals without improvement before the LR drops"})
    plateau_factor: float = field(default=0.5, metadata={"help": "plateau: LR multiplier on a plateau"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw | muon (Muon for the 2-D weights inside the blocks, AdamW with --lr for the rest)",
        "choices": OPTIMIZERS})
    muon_lr: float = field(default=0.02, metadata={"help": "muon: peak learning rate of the Muon matrices"})
    muon_momentum: float = field(default=0.95, metadata={"help": "muon: Nesterov momentum of the Muon matrices"})
    weight_decay: float = field(default=0.1, metadata={"help": "weight decay of the 2-D weights (AdamW and Muon)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    # evaluation
    eval_interval: int = field(default=200, metadata={"help": "evaluate (and checkpoint) every N steps"})
    eval_iters: int = field(default=10, metadata={"help": "batches per split in each evaluation"})
    eval_batch_size: int = field(default=64, metadata={"help": "windows per forward in the final whole-split evaluation"})
    early_stopping_patience: Optional[int] = field(default=None, metadata={
        "help": "stop after this many evals without a better val loss (none = never)"})
    sample_tokens: int = field(default=100, metadata={"help": "tokens of sample text printed at each eval (0 = none)"})
    # system
    device: str = field(default="auto", metadata={"help": "auto picks cuda > mps > cpu", "choices": DEVICES})
    dtype: str = field(default="auto", metadata={"help": "autocast dtype (auto: bfloat16 on CUDA if supported, else float16; float32 elsewhere)", "choices": DTYPES})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)"})
    gpu_defaults: bool = field(default=True, metadata={"help": "on CUDA, use the GPU profile for settings you did not set"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    log_interval: int = field(default=50, metadata={"help": "write train_log.csv every N steps"})
    # run management
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in --out-dir"})
    resume: Optional[str] = field(default=None, metadata={"help": "continue the run in this directory exactly"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "fine-tune from this run dir / model.safetensors (its tokenizer and architecture)"})

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise TrainError(msg)

        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "eval_batch_size",
                     "log_interval", "min_freq", "plateau_patience"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_iters", "sample_tokens"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be a non-negative integer, got {v!r}")
        for name in ("early_stopping_patience", "threads", "max_doc_tokens", "vocab_size"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                 f"{name} must be a positive integer or none, got {v!r}")
        need(math.isfinite(self.lr) and 0 < self.lr <= 10, f"lr must be a finite number in (0, 10], got {self.lr!r}")
        if self.min_lr is not None:
            need(math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr,
                 f"min_lr must be a finite number in [0, lr={self.lr}], got {self.min_lr!r}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            need(math.isfinite(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
        need(math.isfinite(self.grad_clip) and self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip!r}")
        need(math.isfinite(self.plateau_factor) and 0 < self.plateau_factor < 1,
             f"plateau_factor must be in (0, 1), got {self.plateau_factor!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(math.isfinite(self.muon_lr) and 0 < self.muon_lr <= 10,
             f"muon_lr must be a finite number in (0, 10], got {self.muon_lr!r}")
        need(math.isfinite(self.muon_momentum) and 0 <= self.muon_momentum < 1,
             f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        need(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(bool(self.out_dir), "out_dir must not be empty")
        data_mod.parse_split(self.split)
        need(not (self.resume and self.init_from), "use either --resume or --init-from, not both")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


#: The CPU defaults are tuned so that the no-flag run (char-level Tiny Shakespeare) finishes in under
#: two minutes on two cores with a whole-val loss below 1.72 (README: the recipe, its curve and the
#: shapes tried). On CUDA GPU_DEFAULTS replace every setting the user did not set.
CPU_MODEL_DEFAULTS = {"n_layer": 3, "n_head": 3, "n_embd": 96, "block_size": 128, "pos": "rope", "mlp": "swiglu"}
GPU_DEFAULTS = {
    "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2,
    "batch_size": 64, "max_iters": 5000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 100,
    "eval_interval": 250, "eval_iters": 100, "sample_tokens": 200,
}
#: settings --resume may change (everything else must match the run's stored config)
RESUME_OVERRIDABLE = {"max_iters", "device", "threads", "progress", "log_interval", "sample_tokens", "compile",
                      "resume", "overwrite", "gpu_defaults", "early_stopping_patience", "eval_batch_size"}
#: GPTConfig fields that --init-from takes from the flags (the rest is the checkpoint's architecture)
INIT_OVERRIDABLE = {"dropout", "backend"}
RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "latest", "metrics.csv", "train_log.csv",
             "loss.png", "summary.json")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m fastlm.train",
        description="Train a decoder-only GPT on text. Flags mirror TrainConfig and GPTConfig fields; "
                    "`--config FILE` (.toml/.json, flat keys or [train]/[model] tables) sets many at once.",
        epilog="GPU defaults profile (applied on CUDA to settings you did not set; --no-gpu-defaults turns it off): "
               + ", ".join(f"{k}={v}" for k, v in GPU_DEFAULTS.items())
               + ". Examples: python -m fastlm.train; python -m fastlm.train --data corpus/ --tokenizer bpe "
                 "--vocab-size 2048 --out-dir runs/mine; torchrun --nproc_per_node=2 -m fastlm.train ...",
    )
    p.add_argument("--config", default=None, metavar="FILE", help="TOML or JSON file of settings (flags override it)")
    add_dataclass_args(p, TrainConfig, title="training")
    add_dataclass_args(p, GPTConfig, title="model", exclude=("vocab_size",), defaults_override=CPU_MODEL_DEFAULTS)
    return p


def resolve_config(argv=None) -> tuple[TrainConfig, dict, set]:
    """Parse flags (+ config file) -> (TrainConfig, model settings dict without vocab_size, names set)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config", None)
    file_data = load_config_file(config_path) if config_path else None
    where = str(config_path) if config_path else "command line"
    merged, explicit = merge_values({"train": TrainConfig, "model": GPTConfig}, file_data, ns, where=where)
    if "vocab_size" in merged["model"]:
        raise ConfigFileError(f"{where}: model vocab_size comes from the tokenizer; set train vocab_size for bpe/word")
    try:
        tcfg = TrainConfig(**merged["train"])
    except TypeError as e:
        raise ConfigFileError(f"{where}: {e}") from None
    model_values = {**CPU_MODEL_DEFAULTS, **merged["model"]}
    return tcfg, model_values, explicit


def resolve_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda requested but CUDA is not available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise TrainError("--device mps requested but MPS is not available")
    return name


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dt == torch.float16 and device_type != "cuda":
        raise TrainError("--dtype float16 needs CUDA (use bfloat16 or float32 here)")
    return dt


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def broadcast_obj(self, obj):
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_obj(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        dist.all_reduce(t)
        return (t / self.world).tolist()


def init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, local, world)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------

class LRSchedule:
    """Warm-up then cosine (to min LR) / plateau (x factor after patience bad evals) / constant."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.scale = 1.0  # plateau multiplier
        self.bad = 0
        self.best = math.inf

    def lr(self, step: int) -> float:
        c = self.cfg
        if c.warmup_iters and step < c.warmup_iters:
            return c.lr * (step + 1) / c.warmup_iters
        if c.lr_schedule == "cosine":
            span = max(1, c.max_iters - c.warmup_iters)
            frac = min(1.0, (step - c.warmup_iters) / span)
            return c.final_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (c.lr - c.final_lr)
        if c.lr_schedule == "plateau":
            return max(c.final_lr, c.lr * self.scale)
        return c.lr

    def observe(self, val_loss: float) -> bool:
        """Plateau bookkeeping after an evaluation; True when the LR was just reduced."""
        if self.cfg.lr_schedule != "plateau":
            return False
        if val_loss < self.best:
            self.best, self.bad = val_loss, 0
            return False
        self.bad += 1
        if self.bad >= self.cfg.plateau_patience:
            self.scale *= self.cfg.plateau_factor
            self.bad = 0
            return True
        return False

    def state(self) -> dict:
        return {"scale": self.scale, "bad": self.bad, "best": self.best if math.isfinite(self.best) else None}

    def load(self, s: dict) -> None:
        self.scale, self.bad = float(s["scale"]), int(s["bad"])
        self.best = math.inf if s.get("best") is None else float(s["best"])


# ---------------------------------------------------------------------------------------------
# Run setup
# ---------------------------------------------------------------------------------------------

def _say(dist: Dist, msg: str, bar=None) -> None:
    if not dist.main:
        return
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _is_run_dir(out: Path) -> bool:
    """True when ``out`` holds a fastlm run (its config.json says so)."""
    try:
        ckpt_mod.read_run_config(out)
        return True
    except (ValueError, OSError):
        return False


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out-dir`` that training may not write into (before any work is done)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out-dir {out} exists and is not a directory")
    if not (out.is_dir() and any(out.iterdir())):
        return
    is_run = _is_run_dir(out)
    if not overwrite:
        if is_run and not (out / "latest").exists():
            raise TrainError(f"run directory {out} already exists but holds no checkpoint (its run stopped "
                             f"before the first save); use --overwrite to start it again, or another --out-dir")
        raise TrainError(f"run directory {out} already exists; use --overwrite to replace it, "
                         f"--resume {out} to continue it, or another --out-dir")
    if not is_run:
        raise TrainError(f"--out-dir {out} is not empty and is not a fastlm run directory (no valid "
                         f"config.json); --overwrite only replaces fastlm runs, so choose a new or empty "
                         f"--out-dir")


def _clear_run_dir(out: Path) -> None:
    """Delete the files a previous fastlm run wrote in ``out`` (and nothing else of the user's)."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(ckpt_mod.CKPT_PREFIX):
            shutil.rmtree(p)
    cache = out / "data"
    if cache.is_dir():
        for split in data_mod.SPLITS:
            with contextlib.suppress(FileNotFoundError):
                data_mod.split_path(out, split).unlink()
        for p in cache.glob(".*.npy.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):
            cache.rmdir()  # only when empty: anything else in it is the user's


def _build_data(tcfg: TrainConfig, block_size: int, tokenizer=None):
    """Read + tokenize the corpus and cut the splits, in memory -> (tokenizer, splits, info).
    Nothing is written: a bad corpus fails here, before an existing run is touched."""
    from .tokenizers import build_tokenizer

    sources = tcfg.data or [str(data_mod.default_corpus())]
    docs = data_mod.read_documents(sources, text_column=tcfg.text_column)
    if tokenizer is None:
        tokenizer = build_tokenizer(tcfg.tokenizer, "\n".join(docs) if len(docs) > 1 else docs[0],
                                    vocab_size=tcfg.vocab_size, min_freq=tcfg.min_freq, lowercase=tcfg.lowercase)
    ids, dropped = data_mod.encode_documents(tokenizer, docs, tcfg.max_doc_tokens)
    splits = data_mod.split_tokens(ids, tcfg.split)
    for name in ("train", "val"):
        if len(splits[name]) < block_size + 1:
            raise DataError(f"corpus too short: the {name} split has {len(splits[name])} tokens but block_size "
                            f"{block_size} needs at least {block_size + 1}; use more text or a smaller --block-size")
    if tcfg.split and data_mod.parse_split(tcfg.split)[2] > 0 and len(splits["test"]) < 2:
        raise DataError(f"the test split has {len(splits['test'])} tokens; use a larger test fraction or more text")
    info = {"sources": [str(s) for s in sources], "documents": len(docs), "dropped_documents": dropped,
            "tokens": {k: int(len(v)) for k, v in splits.items()}}
    return tokenizer, splits, info


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _sample_text(model, tokenizer, n: int, device, seed: int) -> str:
    start = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    prompt = torch.tensor([[start]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    try:
        from .sampling import generate
        out = generate(model, prompt, n, temperature=0.8, top_k=None, generator=gen, use_cache=True)
    except ImportError:  # pragma: no cover - sampling.py is part of the package
        was = model.training
        model.eval()
        seq = prompt
        with torch.no_grad():
            for _ in range(n):
                logits, _ = model(seq[:, -model.config.block_size:], last_only=True)
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        model.train(was)
        out = seq
    return tokenizer.decode(out[0, 1:].tolist())


def _append_csv(path: Path, header: list, row: list) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerow(row)


def _truncate_csv(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= max_step]
    ckpt_mod.atomic_write_bytes(path, "".join(",".join(r) + "\r\n" for r in keep).encode())


def plot_losses(run_dir: Path) -> None:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [float(r["train_loss"]) for r in rows], marker="o", label="train")
    ax.plot(steps, [float(r["val_loss"]) for r in rows], marker="o", label="val")
    log = run_dir / "train_log.csv"
    if log.exists():
        with open(log, newline="") as f:
            lrows = list(csv.DictReader(f))
        if lrows:
            ax.plot([int(r["step"]) for r in lrows], [float(r["loss"]) for r in lrows], alpha=0.3,
                    label="train (per step)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


def _check_resume_compatible(stored: dict, tcfg_values: dict, model_values: dict, explicit: set, run_dir: Path):
    st, sm = stored.get("train", {}), stored.get("model", {})
    for name in sorted(explicit):
        if name in RESUME_OVERRIDABLE or name in ("out_dir", "config"):
            continue
        if name in tcfg_values and name in st and st[name] != tcfg_values[name]:
            raise CheckpointError(f"--resume {run_dir}: the run was trained with {name}={st[name]!r}, not "
                                  f"{tcfg_values[name]!r}; drop that setting or start a new run")
        if name in model_values and name in sm and sm[name] != model_values[name]:
            raise CheckpointError(f"--resume {run_dir}: the run's model has {name}={sm[name]!r}, not "
                                  f"{model_values[name]!r} (another config); drop that flag or start a new run")


def train(tcfg: TrainConfig, model_values: dict, explicit: set = frozenset()) -> int:
    """Run training; returns the process exit code (see the module docstring)."""
    t_start = time.time()
    tcfg.validate()
    dist = init_distributed(tcfg.device)
    try:
        return _train(tcfg, model_values, set(explicit), dist, t_start)
    finally:
        if dist.enabled:
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()


def _train(tcfg: TrainConfig, model_values: dict, explicit: set, dist: Dist, t_start: float) -> int:
    from .tokenizers import load_tokenizer

    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device_type = resolve_device(tcfg.device)
    device = torch.device(f"cuda:{dist.local_rank}" if device_type == "cuda" and dist.enabled else device_type)
    resume_dir = Path(tcfg.resume) if tcfg.resume else None
    init_state = None

    # ---- resolve the run config -----------------------------------------------------------------
    if resume_dir is not None:
        stored = ckpt_mod.read_run_config(resume_dir)
        if not (resume_dir / "latest").exists():
            raise CheckpointError(f"--resume {resume_dir}: the run holds no checkpoint yet (it stopped before "
                                  f"its first save); start it again with --out-dir {resume_dir} --overwrite")
        new_train = dataclasses.asdict(tcfg)
        _check_resume_compatible(stored, new_train, model_values, explicit, resume_dir)
        train_values = dict(stored["train"])
        for name in RESUME_OVERRIDABLE & explicit:
            if name in new_train:
                train_values[name] = new_train[name]
        train_values.update(resume=str(resume_dir), out_dir=str(resume_dir), overwrite=False, init_from=None)
        try:
            tcfg = TrainConfig(**train_values)
            tcfg.validate()
            mcfg = GPTConfig.from_dict(stored["model"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{resume_dir / 'config.json'}: {e}") from None
        if stored.get("world_size", 1) != dist.world:
            raise CheckpointError(f"--resume {resume_dir}: the run used {stored.get('world_size', 1)} process(es), "
                                  f"this launch has {dist.world}; resume with the same --nproc_per_node")
        out = resume_dir
    else:
        if device_type == "cuda" and tcfg.gpu_defaults:
            applied = {k: v for k, v in GPU_DEFAULTS.items() if k not in explicit}
            tv = dataclasses.asdict(tcfg)
            for k, v in applied.items():
                if k in tv:
                    tv[k] = v
                else:
                    model_values[k] = v
            tcfg = TrainConfig(**tv)
            tcfg.validate()
            if applied:
                _say(dist, "gpu defaults: " + ", ".join(f"{k}={v}" for k, v in applied.items()))
        out = Path(tcfg.out_dir)
        mcfg = None
    autocast_dtype = resolve_dtype(tcfg.dtype, device_type)

    # ---- data + tokenizer (rank 0 prepares, the others wait) ------------------------------------
    err = None
    run_config = None
    if dist.main:
        try:
            if resume_dir is None:
                tokenizer = None
                if tcfg.init_from:
                    init_model, tokenizer, init_cfg = ckpt_mod.load_model(tcfg.init_from, "cpu")
                    base = dict(init_cfg["model"])
                    ignored = sorted(k for k in explicit if k in base and k not in INIT_OVERRIDABLE
                                     and model_values.get(k) != base[k])
                    if ignored:
                        _say(dist, "note: --init-from takes the architecture from the checkpoint; ignoring "
                             + ", ".join(ignored))
                    for k in INIT_OVERRIDABLE & explicit:
                        base[k] = model_values[k]
                    init_state = ckpt_mod.model_tensors(init_model)
                    del init_model
                    mcfg = GPTConfig.from_dict(base)
                else:
                    mcfg = GPTConfig(vocab_size=2, **{k: v for k, v in model_values.items()})  # validate early
                _check_out_dir(out, tcfg.overwrite)
                tokenizer, splits, data_info = _build_data(tcfg, mcfg.block_size, tokenizer)
                mcfg = GPTConfig.from_dict({**mcfg.to_dict(), "vocab_size": tokenizer.vocab_size})
                if out.is_dir():  # all checks passed: only now is the previous run replaced
                    _clear_run_dir(out)
                run_config = {"model": mcfg.to_dict(), "train": dataclasses.asdict(tcfg),
                              "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                                            "eos_id": tokenizer.eos_id},
                              "data": data_info, "world_size": dist.world,
                              "fastlm_version": __import__("fastlm").__version__}
                # config first: a start killed from here on leaves a recognisable run (no checkpoint
                # yet), which --overwrite may replace
                ckpt_mod.write_run_files(out, run_config, tokenizer)
                data_mod.save_splits(out, splits, tokenizer.vocab_size)
                del splits
        except (ValueError, OSError) as e:
            err = str(e)
    err = dist.broadcast_obj(err)
    if err is not None:
        if dist.main:
            raise TrainError(err)
        return 2
    init_state = dist.broadcast_obj(init_state) if tcfg.init_from else None
    run_config = ckpt_mod.read_run_config(out)
    mcfg = GPTConfig.from_dict(run_config["model"])
    tokenizer = load_tokenizer(out / "tokenizer.json")
    train_ids = data_mod.load_split(out, "train", tokenizer.vocab_size)
    val_ids = data_mod.load_split(out, "val", tokenizer.vocab_size)

    # ---- model, optimizer ------------------------------------------------------------------------
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed % (2 ** 32))
    model = GPT(mcfg)
    if init_state is not None:
        ckpt_mod.load_model_tensors(model, init_state, tcfg.init_from)
    model.to(device)
    optimizer = build_optimizer(model, optimizer=tcfg.optimizer, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                betas=(tcfg.beta1, tcfg.beta2), muon_lr=tcfg.muon_lr,
                                muon_momentum=tcfg.muon_momentum, device_type=device_type)
    sched = LRSchedule(tcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=(autocast_dtype == torch.float16))
    use_autocast = autocast_dtype != torch.float32
    amp = (lambda: torch.autocast(device_type, dtype=autocast_dtype)) if use_autocast else contextlib.nullcontext
    torch.manual_seed(tcfg.seed + dist.rank)  # dropout differs per rank

    train_sampler = data_mod.BatchSampler(train_ids, mcfg.block_size, tcfg.batch_size, [tcfg.seed, 0])
    # eval batches hold one optimizer step's sequences (batch x accum per rank): same estimate on any world size
    eval_b = tcfg.batch_size * tcfg.grad_accum
    eval_samplers = {"train": data_mod.BatchSampler(train_ids, mcfg.block_size, eval_b, [tcfg.seed, 1]),
                     "val": data_mod.BatchSampler(val_ids, mcfg.block_size, eval_b, [tcfg.seed, 2])}
    eval_start = {k: s.state() for k, s in eval_samplers.items()}  # every eval draws the same windows
    step, tokens_seen, best_val, best_step, bad_evals, prev_wall = 0, 0, math.inf, None, 0, 0.0
    best_train = None

    if resume_dir is not None:
        ck = ckpt_mod.load_checkpoint(resume_dir)
        st = ck["state"]
        if GPTConfig.from_dict(ck["model_config"]).to_dict() != mcfg.to_dict():
            raise CheckpointError(f"{ck['dir']} was written for another model config than {resume_dir / 'config.json'}")
        ckpt_mod.load_model_tensors(model, ck["model"], ck["dir"] / "model.safetensors")
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ck['dir']}: optimizer state does not fit the model: {e}") from None
        for g in optimizer.param_groups:  # device placement of AdamW's state follows the params
            for p in g["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and k != "step":
                        optimizer.state[p][k] = v.to(p.device)
        if len(ck["ranks"]) != dist.world:
            raise CheckpointError(f"{ck['dir']} holds {len(ck['ranks'])} rank state(s), this launch has {dist.world}")
        rjs, rt = ck["ranks"][dist.rank]
        ckpt_mod.set_rng_state(rjs["rng"], rt)
        train_sampler.set_state(rjs["sampler"])
        for k, s in eval_samplers.items():
            s.set_state(rjs["eval_sampler"][k])
        sched.load(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        step, tokens_seen = int(st["step"]), int(st["tokens_seen"])
        best_val = math.inf if st.get("best_val") is None else float(st["best_val"])
        best_step, bad_evals, prev_wall = st.get("best_step"), int(st["bad_evals"]), float(st.get("train_wall_s", 0.0))
        best_train = st.get("best_train")
        if dist.main:
            ckpt_mod.sync_best(resume_dir, ck["dir"])
            _truncate_csv(out / "metrics.csv", step)
            _truncate_csv(out / "train_log.csv", step)
        _say(dist, f"resuming {out} at step {step} (best val {best_val:.4f})" if math.isfinite(best_val)
             else f"resuming {out} at step {step}")

    raw_model = model
    if tcfg.compile:
        model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dist.local_rank] if device_type == "cuda" else None)

    n_params = raw_model.num_params()
    tokens_per_step = tcfg.batch_size * mcfg.block_size * tcfg.grad_accum * dist.world
    if resume_dir is None:
        _say(dist, f"run dir: {out}")
    _say(dist, f"device: {device} ({'autocast ' + str(autocast_dtype).replace('torch.', '') if use_autocast else 'float32'})"
               f"{f', {dist.world} processes' if dist.enabled else ''}")
    _say(dist, f"data: {len(train_ids):,} train / {len(val_ids):,} val tokens, {tokenizer.kind} tokenizer, "
               f"vocab {tokenizer.vocab_size}")
    _say(dist, f"model: {n_params / 1e6:.2f}M params ({mcfg.n_layer} layers, {mcfg.n_head} heads, "
               f"{mcfg.n_embd} wide, context {mcfg.block_size})")
    _say(dist, f"global batch: {tcfg.batch_size} x grad_accum {tcfg.grad_accum} x world {dist.world} = "
               f"{tcfg.batch_size * tcfg.grad_accum * dist.world} sequences = {tokens_per_step:,} tokens/step")

    def rank_state():
        js, tens = ckpt_mod.rng_state()
        js = {"rng": js, "sampler": train_sampler.state(),
              "eval_sampler": {k: s.state() for k, s in eval_samplers.items()}}
        return js, {k: v.numpy().tobytes() for k, v in tens.items()}

    def save(is_best: bool, wall: float):
        states = dist.gather_obj(rank_state())
        if dist.main:
            rank_states = [(js, {k: torch.frombuffer(bytearray(b), dtype=torch.uint8) for k, b in t.items()})
                           for js, t in states]
            state = {"step": step, "tokens_seen": tokens_seen, "scheduler": sched.state(),
                     "best_val": best_val if math.isfinite(best_val) else None, "best_step": best_step,
                     "best_train": best_train, "bad_evals": bad_evals, "train_wall_s": wall,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None}
            ckpt_mod.save_checkpoint(out, raw_model, optimizer, state, rank_states, is_best=is_best,
                                     model_config=mcfg.to_dict())
        dist.barrier()

    @torch.no_grad()
    def estimate() -> dict:
        """Mean loss over eval_iters batches per split; the SAME windows at every eval (paired
        comparisons: picking the best checkpoint is not at the mercy of which batches were drawn)."""
        model.eval()
        res = {}
        for split, s in eval_samplers.items():
            s.set_state(eval_start[split])
            total = 0.0
            for _ in range(tcfg.eval_iters):
                x, y = s.sample(device, dist.rank, dist.world)
                with amp():
                    _, loss = raw_model(x, y)
                total += float(loss)
            res[split] = total / tcfg.eval_iters
        model.train()
        vals = dist.mean([res["train"], res["val"]], device)
        return {"train": vals[0], "val": vals[1]}

    # ---- signals ---------------------------------------------------------------------------------
    stop_signal = {"sig": None}

    def on_signal(signum, frame):
        stop_signal["sig"] = signum

    old_handlers = {}
    if threading_main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_signal)

    nan_step = int(os.environ.get("FASTLM_TEST_NAN_AT_STEP", "0") or 0)  # test hook: poison the loss
    step_sleep = float(os.environ.get("FASTLM_TEST_STEP_SLEEP", "0") or 0)  # test hook: slow steps down
    signal_step = int(os.environ.get("FASTLM_TEST_SIGNAL_AT_STEP", "0") or 0)  # test hook: act as if Ctrl-C
    bar = None
    if dist.main and tcfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=tcfg.max_iters, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0)
    exit_code = 0
    stopped_early = False
    t_loop = time.time()
    last_t, last_step = t_loop, step
    try:
        if resume_dir is None:
            save(False, 0.0)  # step-0 checkpoint: the run is resumable from the first moment
        model.train()
        while step < tcfg.max_iters:
            lr = sched.lr(step)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_ratio", 1.0)
            loss_sum = 0.0
            for micro in range(tcfg.grad_accum):
                x, y = train_sampler.sample(device, dist.rank, dist.world)
                sync_ctx = (model.no_sync() if dist.enabled and micro < tcfg.grad_accum - 1
                            else contextlib.nullcontext())
                with sync_ctx:
                    with amp():
                        _, loss = model(x, y)
                    if nan_step and step + 1 == nan_step:
                        loss = loss * float("nan")
                    scaler.scale(loss / tcfg.grad_accum).backward()
                loss_sum += loss.detach()
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
            step_loss = float(loss_sum) / tcfg.grad_accum
            flags = dist.mean([step_loss, float(stop_signal["sig"] or 0)], device)
            step_loss = flags[0]
            if not math.isfinite(step_loss):
                if dist.main:
                    if bar is not None:
                        bar.close()
                    print(f"error: loss is {step_loss} at step {step + 1}; stopping. The last good checkpoint "
                          f"is kept in {out} (try a lower --lr, --grad-clip, or --dtype float32)",
                          file=sys.stderr, flush=True)
                exit_code = 3
                raise _Stop
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            if step_sleep:
                time.sleep(step_sleep)
            if signal_step and step == signal_step:
                stop_signal["sig"] = signal.SIGINT
            if dist.main and (step % tcfg.log_interval == 0 or step == tcfg.max_iters):
                now = time.time()
                tps = (step - last_step) * tokens_per_step / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                _append_csv(out / "train_log.csv", ["step", "loss", "lr", "tokens_per_s"],
                            [step, f"{step_loss:.6f}", f"{lr:.6g}", f"{tps:.0f}"])
                if bar is not None:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if step % tcfg.eval_interval == 0 or step == tcfg.max_iters:
                losses = estimate()
                improved = losses["val"] < best_val
                if improved:
                    best_val, best_step, best_train, bad_evals = losses["val"], step, losses["train"], 0
                else:
                    bad_evals += 1
                if sched.observe(losses["val"]):
                    _say(dist, f"step {step}: val loss plateaued, lr x{tcfg.plateau_factor} -> "
                               f"{sched.lr(step):.3g}", bar)
                wall = prev_wall + time.time() - t_loop
                if dist.main:
                    _append_csv(out / "metrics.csv", ["step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s"],
                                [step, f"{losses['train']:.6f}", f"{losses['val']:.6f}", f"{lr:.6g}", tokens_seen,
                                 f"{wall:.2f}"])
                _say(dist, f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                           f"{' (best)' if improved else ''}, lr {lr:.3g}", bar)
                if dist.main and tcfg.sample_tokens:
                    text = _sample_text(raw_model, tokenizer, tcfg.sample_tokens, device, tcfg.seed + step)
                    _say(dist, "  sample: " + text.replace("\n", "\n  | "), bar)
                save(improved, wall)
                if tcfg.early_stopping_patience and bad_evals >= tcfg.early_stopping_patience:
                    _say(dist, f"early stopping at step {step}: no val improvement in {bad_evals} evals "
                               f"(best {best_val:.4f} at step {best_step})", bar)
                    stopped_early = True
                    break
            if flags[1]:
                sig = stop_signal["sig"] or signal.SIGTERM
                wall = prev_wall + time.time() - t_loop
                save(False, wall)
                _say(dist, f"interrupted ({signal.Signals(sig).name}) at step {step}: checkpoint saved; "
                           f"continue with: python -m fastlm.train --resume {out}", bar)
                exit_code = 128 + int(sig)
                raise _Stop
    except _Stop:
        pass
    finally:
        if bar is not None:
            bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    if exit_code:
        if dist.main:
            with contextlib.suppress(Exception):
                plot_losses(out)
        return exit_code

    # ---- final: whole-split evaluation of the best weights ------------------------------------------
    train_wall = prev_wall + time.time() - t_loop
    summary = None
    if dist.main:
        ck = ckpt_mod.load_checkpoint(out)
        ckpt_mod.load_model_tensors(raw_model, ck["best"], ck["dir"] / "best.safetensors")
        val_loss = data_mod.split_loss(raw_model, val_ids, mcfg.block_size, tcfg.eval_batch_size, device,
                                       amp if use_autocast else None)
        summary = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)),
                   "train_loss": best_train, "best_step": best_step, "steps": step,
                   "stopped_early": stopped_early, "tokens_seen": tokens_seen,
                   "tokens_per_s": tokens_seen / max(train_wall, 1e-9), "train_wall_s": train_wall,
                   "params": n_params, "device": str(device), "world_size": dist.world}
        test_path = data_mod.split_path(out, "test")
        if test_path.exists():
            test_ids = data_mod.load_split(out, "test", tokenizer.vocab_size)
            if len(test_ids) >= 2:
                summary["test_loss"] = data_mod.split_loss(raw_model, test_ids, mcfg.block_size,
                                                           tcfg.eval_batch_size, device,
                                                           amp if use_autocast else None)
        plot_losses(out)
        summary["wall_s"] = time.time() - t_start
        ckpt_mod.atomic_write_json(out / "summary.json", summary)
        print(f"done: best val loss {val_loss:.4f} (perplexity {summary['val_ppl']:.2f}) over the whole val "
              f"split, step {best_step}; {summary['tokens_per_s']:,.0f} tokens/s; wall {summary['wall_s']:.1f} s",
              flush=True)
        print(f"run dir: {out}", flush=True)
    dist.barrier()
    return 0


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (2 and one ``error:`` line for bad input)."""
    try:
        tcfg, model_values, explicit = resolve_config(argv)
        return train(tcfg, model_values, explicit)
    except (ValueError, OSError) as e:  # DataError, CheckpointError, ConfigError, TokenizerError, ...
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
