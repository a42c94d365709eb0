"""The training loop behind ``python -m fastlm.train``, as a Python API::

    from fastlm import Trainer, TrainConfig
    summary = Trainer(TrainConfig(out_dir="runs/mine", max_iters=500)).fit()

:meth:`Trainer.fit` runs exactly what the CLI runs (the CLI is a thin layer over it) and returns the
summary that is also written to ``summary.json``. Its parts, in order:

* the constructor resolves the settings, once (:func:`fastlm.training.settings.resolve_settings`
  for a new run, the stored ones for ``resume``): :attr:`Trainer.config` is the resolved run;
* :meth:`~Trainer._prepare` -- the run directory and its data (rank 0 builds them, every rank
  reads them), model, optimizer, samplers;
* :meth:`~Trainer._restore` -- a resumed run's weights, optimizer, RNG and sampler states;
* :meth:`~Trainer._train_step` / :meth:`~Trainer._evaluate` / :meth:`~Trainer._save` -- the loop;
* :meth:`~Trainer._finish` -- the whole-split evaluation of the best weights and the summary, which
  also gives the run's model FLOPs per token, achieved FLOP/s and MFU against the device's peak
  (:mod:`fastlm.training.mfu` defines each).

:class:`Callback` hooks let a caller watch or steer a run (``on_step``, ``on_eval``, ...);
:meth:`Trainer.request_stop` ends it gracefully. A non-finite loss raises :class:`NonFiniteLoss`,
a signal (Ctrl-C, SIGTERM) or a stop request with a signal saves a checkpoint and raises
:class:`TrainingInterrupted` (continue with ``TrainConfig(resume=run_dir)``).

Distributed (``torchrun``): every step all ranks draw the same global set of window offsets from one
generator and rank ``r`` takes its own slice, so a run on N ranks equals a one-process run with the
same global batch (``batch_size x grad_accum x world_size``); only rank 0 writes files, and an error
on one rank ends every rank (errors are exchanged at each save, so no rank waits for ever).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from fastlm._version import __version__
from fastlm.errors import CheckpointError, NonFiniteLoss, RankFailed, TrainError, TrainingInterrupted
from fastlm.files.runlock import RunLock
from fastlm.io import checkpoint as ckpt_mod
from fastlm.io.loading import load_model
from fastlm.model import GPT, GPTConfig
from fastlm.sampling import generate
from fastlm.text import data as data_mod
from fastlm.text.tokenizers import load_tokenizer
from fastlm.training import rundir
from fastlm.training.mfu import format_flops, mfu_fields, peak_flops
from fastlm.training.optim import clip_grad_norm, embedding_param_names, load_checked_state, optimizer_for
from fastlm.training.runtime import autocast, init_distributed, keep_cpu_heap, resolve_device, resolve_dtype
from fastlm.training.schedule import LRSchedule
from fastlm.training.settings import (
    INIT_OVERRIDABLE,
    Resolved,
    TrainConfig,
    explicit_settings,
    resolve_settings,
    resume_config,
    train_command,
)

__all__ = ["Trainer", "Callback", "TrainingInterrupted", "NonFiniteLoss", "RankFailed"]


class Callback:
    """Hooks into :meth:`Trainer.fit`; override the ones you need. Each gets the trainer, whose
    ``config``, ``model_config``, ``model``, ``optimizer``, ``run_dir`` and ``progress`` are set."""

    def on_start(self, trainer: "Trainer") -> None:
        """Everything is prepared (and restored); the loop starts next."""

    def on_step(self, trainer: "Trainer", step: int, loss: float) -> None:
        """After optimizer step ``step`` (1-based); ``loss`` is its mean training loss."""

    def on_eval(self, trainer: "Trainer", step: int, losses: dict) -> None:
        """After an evaluation: ``losses = {"train": ..., "val": ...}`` on the fixed eval windows."""

    def before_publish(self, trainer: "Trainer", folder: Path) -> None:
        """A checkpoint folder is complete on disk but not yet published as ``latest`` (rank 0)."""

    def on_end(self, trainer: "Trainer", summary: dict) -> None:
        """The run finished; ``summary`` is what ``summary.json`` holds (rank 0 only)."""


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    best_step: Optional[int] = None
    best_train: Optional[float] = None
    bad_evals: int = 0
    wall_before: float = 0.0  # training seconds of earlier sessions of this run
    stopped_early: bool = False

    def to_state(self, wall: float) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val": self.best_val if math.isfinite(self.best_val) else None,
            "best_step": self.best_step,
            "best_train": self.best_train,
            "bad_evals": self.bad_evals,
            "train_wall_s": wall,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        """The progress a checkpoint's ``state.json`` saved (``ValueError`` naming a field fastlm
        would not have written: a count that is not a whole number >= 0, a best loss that is NaN or
        infinite; ``null`` is "no best yet")."""
        step = _whole(state, "step")
        best_step = state.get("best_step")
        if best_step is not None and _whole(state, "best_step") > step:
            raise ValueError(f"best_step {best_step} is after step {step}")
        best = _finite(state, "best_val")
        return cls(
            step=step,
            tokens_seen=_whole(state, "tokens_seen"),
            best_val=math.inf if best is None else best,
            best_step=best_step,
            best_train=_finite(state, "best_train"),
            bad_evals=_whole(state, "bad_evals"),
            wall_before=_finite(state, "train_wall_s") or 0.0,
        )


def _whole(state: dict, key: str) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{key} must be a whole number >= 0, got {str(value)[:40]}")
    return value


def _finite(state: dict, key: str) -> Optional[float]:
    """``state[key]`` as a finite float, or None when it is missing or null."""
    value = state.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number or null, got {str(value)[:40]}")
    return float(value)


@dataclass
class LoopClock:
    """The loop's timing (not saved): when this session's loop started, the last logged step and
    time, and the training losses summed since (tensors: read on the host only when logged)."""

    start: float = 0.0
    mark_time: float = 0.0
    mark_tokens: int = 0
    losses: list = dataclasses.field(default_factory=list)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class Trainer:
    """Train a GPT as ``python -m fastlm.train`` does.

    Args:
        config: training settings (default: ``TrainConfig()``, the CLI's defaults). Settings left
            unset (None) take the profile's values (:data:`fastlm.training.settings.PROFILES`); every
            value given is honoured.
        model: the model settings: a :class:`GPTConfig` (its ``vocab_size`` is replaced by the
            tokenizer's), a dict of GPTConfig fields (the rest from the profile and GPTConfig's
            defaults), or None (the profile's model; the cpu profile's is ``GPTConfig()``).
        callbacks: :class:`Callback` objects.
        explicit: names of the settings the user chose (the CLI passes what was typed); used to
            refuse a ``resume`` with other settings and to note model flags an ``init_from`` ignores.
            Default: :func:`fastlm.training.settings.explicit_settings`.

    The settings are resolved here, before anything is built: :attr:`config` is the resolved
    :class:`TrainConfig` (nothing left to a profile) and :attr:`resolved` what ``--print-config``
    prints; a resume reads the run's stored settings here.
    """

    def __init__(
        self,
        config: Optional[TrainConfig] = None,
        model: Union[GPTConfig, dict, None] = None,
        *,
        callbacks: Sequence[Callback] = (),
        explicit: Optional[set] = None,
    ):
        requested = config if config is not None else TrainConfig()
        requested.validate()
        if isinstance(model, GPTConfig):
            model = {k: v for k, v in model.to_dict().items() if k != "vocab_size"}
        chosen_model = dict(model or {})
        self._explicit = set(explicit) if explicit is not None else explicit_settings(requested, chosen_model)
        self.callbacks = list(callbacks)
        self.resolved: Optional[Resolved] = None
        self.model_config: Optional[GPTConfig] = None
        if requested.resume:  # the run's stored settings, its device included (unless --device is given now)
            self.run_dir = Path(requested.resume)
            self._stored = ckpt_mod.read_run_config(self.run_dir)
            self.config, self.model_config = resume_config(
                self._stored, requested, chosen_model, self._explicit, self.run_dir
            )
            self.device_type = resolve_device(self.config.device).type
        else:
            self.device_type = resolve_device(requested.device).type
            self.resolved = resolve_settings(requested, chosen_model, self.device_type)
            self.config = self.resolved.train
            self.run_dir = Path(self.config.out_dir)
        self._chosen_model = chosen_model
        # built by fit(), in this order: the process group and device, the run's data, the model and
        # its optimizer, the samplers; then the loop's state
        self.dist = None
        self.device: Optional[torch.device] = None
        self.autocast_dtype: Optional[torch.dtype] = None
        self.tokenizer = self.train_ids = self.val_ids = None
        self.doc_eos: Optional[int] = None  # the end-of-text id when attention is masked at documents
        self.model = self.raw_model = self.optimizer = None
        self.schedule: Optional[LRSchedule] = None
        self.scaler = self.amp = None
        self.train_sampler = None
        self.eval_samplers: dict = {}
        self._eval_start: dict = {}
        self.tokens_per_step = 0
        self.progress = Progress()
        self.summary: Optional[dict] = None
        self._clock = LoopClock()
        self._bar = None
        self._stop_signal: Optional[int] = None  # a signal arrived (or a stop with one was requested)
        self._stop_pending = False  # request_stop() without a signal
        self._lock: Optional[RunLock] = None  # the run directory's lock (rank 0), held until fit() returns

    # ---- public -------------------------------------------------------------------------------
    def fit(self) -> Optional[dict]:
        """Run training; returns the summary dict (None on ranks other than 0)."""
        t_start = time.time()
        self.dist = init_distributed(self.config.device, self.config.dist_timeout_s)
        handlers = self._install_signal_handlers()
        ok = False
        try:
            self._prepare()
            self._emit("on_start")
            self._loop()
            summary = self._finish(t_start)
            ok = True
            return summary
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.model = self.raw_model  # drop the DDP wrapper first: it holds the process group
            self.dist.close(ok)
            if self._lock is not None:  # a refused new run leaves no lock file (nor a folder it made)
                self._lock.release(keep_file=rundir.is_run_dir(self.run_dir))
                self._lock = None

    def settings(self) -> dict:
        """The fully resolved settings of this run (what ``--print-config`` prints): the profile, the
        training settings and the model (a resume: the run's stored ones; a fine-tune: the source's
        architecture, read when the run starts)."""
        if self.resolved is None:
            return {
                "profile": self.config.profile,
                "train": dataclasses.asdict(self.config),
                "model": self.model_config.to_dict(),
            }
        out = self.resolved.as_dict()
        if self.config.init_from:
            overrides = {k: v for k, v in self._chosen_model.items() if k in INIT_OVERRIDABLE}
            out["model"] = {"from": self.config.init_from, **overrides}
        return out

    def request_stop(self, signum: Optional[int] = None) -> None:
        """Stop the run at the end of the next optimizer step (requests and signals are exchanged
        there, so every rank of a distributed job stops at the same step). With ``signum`` it acts as
        that signal would (checkpoint, then :class:`TrainingInterrupted`); without, like early
        stopping (evaluation, final whole-split evaluation, summary)."""
        if signum is None:
            self._stop_pending = True
        else:
            self._stop_signal = int(signum)

    # ---- messages and hooks ---------------------------------------------------------------------
    def say(self, msg: str) -> None:
        """Print a progress message (rank 0; above the progress bar when there is one)."""
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            self._stop_signal = signum

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    # ---- preparation ----------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device_type == "cpu":
            keep_cpu_heap()  # activations live in host memory: no page faults step after step
        self.device = torch.device(
            f"cuda:{self.dist.local_rank}" if self.device_type == "cuda" and self.dist.enabled else self.device_type
        )
        self._agreed(self._lock_run_dir)
        if cfg.resume:
            self._check_resume()
        elif self.resolved.from_profile:
            self.say(
                f"profile {self.resolved.profile}: "
                + ", ".join(f"{k}={v}" for k, v in self.resolved.from_profile.items())
            )
        self.autocast_dtype = resolve_dtype(cfg.dtype, self.device_type)
        init_state = self._prepare_run_dir()
        self._load_run()
        self._build_model(init_state)
        if cfg.resume:
            self._restore()
        self._wrap_model()
        self._announce()

    def _check_resume(self) -> None:
        if not (self.run_dir / "latest").exists():
            raise CheckpointError(
                f"--resume {self.run_dir}: the run holds no checkpoint yet (it stopped before "
                f"its first save); start it again with --out-dir {self.run_dir} --overwrite"
            )
        if self._stored.get("world_size", 1) != self.dist.world:
            raise CheckpointError(
                f"--resume {self.run_dir}: the run used {self._stored.get('world_size', 1)} "
                f"process(es), this launch has {self.dist.world}; resume with the same "
                f"--nproc_per_node"
            )

    def _lock_run_dir(self) -> None:
        """Rank 0 holds the run directory's lock until :meth:`fit` returns: a second process on the
        run is refused before it reads or writes anything (a new run's folder is made for it)."""
        self._lock = RunLock(self.run_dir, create=not self.config.resume).acquire()

    def _prepare_run_dir(self) -> Optional[dict]:
        """Rank 0 creates a new run (checks, data, config, tokenizer) or tidies a resumed one; every
        rank learns of a failure. Returns the ``init_from`` weights (every rank), else None."""
        if self.config.resume:
            self._agreed(lambda: ckpt_mod.clean_leftovers(self.run_dir))
            return None
        init_state = self._agreed(self._create_run)
        return self.dist.broadcast_obj(init_state) if self.config.init_from else None

    def _agreed(self, work, everywhere: bool = False):
        """Run ``work()`` on rank 0 (or on every rank) and exchange failures: when any rank fails,
        that rank raises its error and every other rank raises :class:`RankFailed`, at once."""
        err, result = None, None
        if everywhere or self.dist.is_main:
            try:
                result = work()
            except Exception as e:  # bad input, disk full, a callback's error ...
                err = e
        message = self.dist.first_error(None if err is None else _one_line(err))
        if err is not None:
            raise err
        if message is not None:
            raise RankFailed(message)
        return result

    def _create_run(self) -> Optional[dict]:
        """Check everything, then (only then) replace an old run and write the new one."""
        cfg, out = self.config, self.run_dir
        tokenizer, init_state = None, None
        if cfg.init_from:
            mcfg, tokenizer, init_state = self._init_from()
        else:
            mcfg = GPTConfig(vocab_size=2, **self.resolved.model)
        rundir.check_out_dir(out, cfg.overwrite)
        tokenizer, splits, data_info = rundir.build_data(cfg, mcfg.block_size, tokenizer)
        mcfg = GPTConfig.from_dict({**mcfg.to_dict(), "vocab_size": tokenizer.vocab_size})
        doc_mask = data_info["documents"] > 1 if cfg.doc_mask is None else cfg.doc_mask
        if doc_mask and tokenizer.eos_id is None:
            raise TrainError(
                f"doc_mask needs an end-of-text token to find the documents; the {tokenizer.kind} "
                f"tokenizer has none (train with --no-doc-mask)"
            )
        if out.is_dir():  # all checks passed: only now is the previous run replaced
            rundir.clear_run_dir(out)
        run_config = {
            "model": mcfg.to_dict(),
            "train": {**dataclasses.asdict(cfg), "doc_mask": doc_mask},
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
            "data": data_info,
            "world_size": self.dist.world,
            "fastlm_version": __version__,
        }
        run_config["command"] = train_command(run_config)
        # config first: a start killed from here on leaves a recognisable run (no checkpoint yet),
        # which --overwrite may replace
        ckpt_mod.write_run_files(out, run_config, tokenizer)
        data_mod.save_splits(out, splits, tokenizer.vocab_size)
        return init_state

    def _init_from(self):
        """Architecture, tokenizer and weights of the checkpoint a fine-tune starts from."""
        init_model, tokenizer, init_cfg = load_model(self.config.init_from, "cpu")
        base = dict(init_cfg["model"])
        ignored = sorted(
            k
            for k in self._chosen_model
            if k in base and k not in INIT_OVERRIDABLE and self._chosen_model[k] != base[k]
        )
        if ignored:
            self.say("note: --init-from takes the architecture from the checkpoint; ignoring " + ", ".join(ignored))
        for k in INIT_OVERRIDABLE & set(self._chosen_model):
            base[k] = self._chosen_model[k]
        return GPTConfig.from_dict(base), tokenizer, ckpt_mod.model_tensors(init_model)

    def _load_run(self) -> None:
        run_config = ckpt_mod.read_run_config(self.run_dir)
        self.model_config = GPTConfig.from_dict(run_config["model"])
        self.tokenizer = load_tokenizer(self.run_dir / "tokenizer.json")
        self.train_ids = data_mod.load_split(self.run_dir, "train", self.tokenizer.vocab_size)
        # document masking as the run decided it (a resumed run: its stored decision)
        self.doc_eos = self.tokenizer.eos_id if run_config["train"].get("doc_mask") else None
        self.val_ids = data_mod.load_split(self.run_dir, "val", self.tokenizer.vocab_size)

    def _build_model(self, init_state) -> None:
        """Model, optimizer, schedule, scaler and samplers, seeded as every run of these settings is."""
        cfg, mcfg = self.config, self.model_config
        if cfg.resume:  # an untrusted run: its config must describe its weights before anything is built
            weights = ckpt_mod.latest_checkpoint_dir(self.run_dir) / "model.safetensors"
            shapes, _ = ckpt_mod.read_safetensors_header(weights)
            ckpt_mod.check_config_matches_weights(mcfg, shapes, weights, self.run_dir / "config.json")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        model = GPT(mcfg)
        if init_state is not None:
            ckpt_mod.load_model_tensors(model, init_state, cfg.init_from)
        model.to(self.device)
        self.raw_model = self.model = model
        self.optimizer = optimizer_for(model, cfg, self.device.type, self.autocast_dtype)
        self.schedule = LRSchedule(cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(self.autocast_dtype == torch.float16))
        self.amp = autocast(self.device.type, self.autocast_dtype)
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs per rank
        self.train_sampler = data_mod.BatchSampler(self.train_ids, mcfg.block_size, cfg.batch_size, [cfg.seed, 0])
        # eval batches hold one optimizer step's sequences (batch x accum per rank): same estimate on any world size
        eval_batch = cfg.batch_size * cfg.grad_accum
        self.eval_samplers = {
            "train": data_mod.BatchSampler(self.train_ids, mcfg.block_size, eval_batch, [cfg.seed, 1]),
            "val": data_mod.BatchSampler(self.val_ids, mcfg.block_size, eval_batch, [cfg.seed, 2]),
        }
        self._eval_start = {k: s.state() for k, s in self.eval_samplers.items()}  # every eval: the same windows

    def _restore(self) -> None:
        """Continue a run exactly: weights, optimizer, schedule, RNGs, samplers, progress."""
        saved = ckpt_mod.load_checkpoint(self.run_dir)
        if GPTConfig.from_dict(saved["model_config"]).to_dict() != self.model_config.to_dict():
            raise CheckpointError(
                f"{saved['dir']} was written for another model config than {self.run_dir / 'config.json'}"
            )
        ckpt_mod.load_model_tensors(self.raw_model, saved["model"], saved["dir"] / "model.safetensors")
        self._restore_optimizer(saved)
        if len(saved["ranks"]) != self.dist.world:
            raise CheckpointError(
                f"{saved['dir']} holds {len(saved['ranks'])} rank state(s), this launch has {self.dist.world}"
            )
        try:  # state.json comes with the run: a malformed field is a one-line refusal
            self._restore_state(saved["state"], *saved["ranks"][self.dist.rank])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
            what = f"lacks {e}" if isinstance(e, KeyError) else _one_line(e)
            raise CheckpointError(f"{saved['dir'] / 'state.json'} is malformed: {what}") from None
        if self.dist.is_main:
            ckpt_mod.sync_best(self.run_dir, saved["dir"])
            rundir.truncate_csv(self.run_dir / "metrics.csv", self.progress.step)
            rundir.truncate_csv(self.run_dir / "train_log.csv", self.progress.step)
        best = self.progress.best_val
        self.say(
            f"resuming {self.run_dir} at step {self.progress.step}"
            + (f" (best val {best:.4f})" if math.isfinite(best) else "")
        )

    def _restore_state(self, state: dict, rank_js: dict, rank_tensors: dict) -> None:
        """This rank's RNG and sampler states, then the run's progress, schedule and scaler."""
        ckpt_mod.set_rng_state(rank_js["rng"], rank_tensors)
        self.train_sampler.set_state(rank_js["sampler"])
        for k, s in self.eval_samplers.items():
            s.set_state(rank_js["eval_sampler"][k])
        self.progress = Progress.from_state(state)
        self.schedule.load(state["scheduler"], self.progress.step)
        scaler = state.get("scaler")
        if scaler:
            if not all(_finite(scaler, key) is not None and scaler[key] >= 0 for key in scaler):
                raise ValueError("the scaler state must hold finite numbers >= 0")
            self.scaler.load_state_dict(scaler)

    def _restore_optimizer(self, saved: dict) -> None:
        try:  # checked first: torch's load_state_dict compares no shapes and re-checks no hyperparameter
            load_checked_state(self.optimizer, saved["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{saved['dir']}: {_one_line(e)}") from None
        for group in self.optimizer.param_groups:  # device placement of the state follows the params
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and k != "step":
                        self.optimizer.state[p][k] = v.to(p.device)

    def _wrap_model(self) -> None:
        if self.config.compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

    def _announce(self) -> None:
        cfg, mcfg, world = self.config, self.model_config, self.dist.world
        self.tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.grad_accum * world
        if not cfg.resume:
            self.say(f"run dir: {self.run_dir}")
        precision = (
            f"autocast {str(self.autocast_dtype).replace('torch.', '')}"
            if self.autocast_dtype != torch.float32
            else "float32"
        )
        self.say(f"device: {self.device} ({precision}){f', {world} processes' if self.dist.enabled else ''}")
        self.say(
            f"data: {len(self.train_ids):,} train / {len(self.val_ids):,} val tokens, {self.tokenizer.kind} "
            f"tokenizer, vocab {self.tokenizer.vocab_size}"
        )
        self.say(
            f"model: {self.raw_model.num_params() / 1e6:.2f}M params ({mcfg.n_layer} layers, {mcfg.n_head} heads, "
            f"{mcfg.n_embd} wide, context {mcfg.block_size})"
        )
        if self.doc_eos is not None:
            self.say("documents: attention masked at end-of-text boundaries (--no-doc-mask turns it off)")
        self.say(
            f"global batch: {cfg.batch_size} x grad_accum {cfg.grad_accum} x world {world} = "
            f"{cfg.batch_size * cfg.grad_accum * world} sequences = {self.tokens_per_step:,} tokens/step"
            + (
                f" (warm-up: micro-batch {cfg.batch_at(0)} -> {cfg.batch_size} over the first "
                f"{cfg.batch_warmup_iters} steps)"
                if cfg.batch_warmup_iters
                else ""
            )
        )
        tables = cfg.embed_lr_ratio != 1.0 and bool(embedding_param_names(self.raw_model))
        if cfg.optimizer == "muon":
            rest = "the head, norms and biases" if tables else "embeddings, norms and biases"
            line = f"optimizer: muon (peak lr {cfg.muon_lr:g} for the block matrices) + adamw (peak lr {cfg.lr:g}"
            line += f" for {rest}"
        else:
            line = f"optimizer: adamw (peak lr {cfg.lr:g} for every parameter" + (
                " but the embeddings" if tables else ""
            )
        if tables:
            line += f"; {cfg.lr * cfg.embed_lr_ratio:g} for the embeddings"
        self.say(line + ")")

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        cfg, progress = self.config, self.progress
        if self.dist.is_main and cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=cfg.max_iters,
                initial=progress.step,
                desc="train",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        now = time.time()
        self._clock = LoopClock(start=now, mark_time=now, mark_tokens=progress.tokens_seen)
        self._watch_steps = any(type(cb).on_step is not Callback.on_step for cb in self.callbacks)
        try:
            if not cfg.resume:
                self._save(is_best=False)  # step-0 checkpoint: the run is resumable from the first moment
            self.model.train()
            while progress.step < cfg.max_iters:
                stop_signal, stop_asked = self._train_step()
                if self._after_step(stop_signal, stop_asked):
                    break
        except (NonFiniteLoss, TrainingInterrupted):
            if self.dist.is_main:
                rundir.plot_losses(self.run_dir)
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _wall(self) -> float:
        return self.progress.wall_before + time.time() - self._clock.start

    def _train_step(self) -> tuple[int, bool]:
        """One optimizer step (grad accumulation, clipping, scaler). Returns the stop signal any rank
        received (0 for none) and whether any rank asked to stop. The loss stays on the device until
        it is logged, evaluated after or watched by a callback (no host sync per step on a GPU)."""
        cfg, progress = self.config, self.progress
        lr = self.schedule.lr(progress.step)
        for group in self.optimizer.param_groups:  # Muon groups run at muon_lr / lr times the schedule
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        loss_sum, batch = 0.0, cfg.batch_at(progress.step)
        for micro in range(cfg.grad_accum):
            x, y = self.train_sampler.sample(self.device, self.dist.rank, self.dist.world, batch)
            last = micro == cfg.grad_accum - 1
            with self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext():
                with self.amp():
                    _, loss = self.model(x, y, segment_ids=self._segments(x))
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm(self.raw_model.parameters(), cfg.grad_clip)
        self._clock.losses.append(loss_sum)
        signalled, stop_asked = self._stop_requests()
        step, due = progress.step + 1, self._loss_due(progress.step + 1) or signalled or stop_asked
        step_loss = self._read_losses(step) / cfg.grad_accum if due else None  # raises on a non-finite loss
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step = step
        progress.tokens_seen += self.tokens_per_step * batch // cfg.batch_size
        self._log_step(step_loss, lr)
        if step_loss is not None:
            self._emit("on_step", step, step_loss)
        return ((self._stop_signal or signal.SIGTERM) if signalled else 0), bool(stop_asked)

    def _segments(self, x):
        """The document ids of windows ``x`` when the run masks attention at documents, else None."""
        return None if self.doc_eos is None else data_mod.segment_ids(x, self.doc_eos)

    def _stop_requests(self) -> tuple[bool, bool]:
        """(a signal arrived, a stop was asked) on any rank: every rank of a job decides alike."""
        signalled, asked = self._stop_signal is not None, self._stop_pending
        if self.dist.enabled:
            signalled, asked = (v > 0 for v in self.dist.mean([float(signalled), float(asked)], self.device))
        return signalled, asked

    def _loss_due(self, step: int) -> bool:
        """Whether step ``step``'s loss is read on the host: it is logged, an evaluation (and a
        checkpoint) follows, it is the last, or a callback watches every step."""
        cfg = self.config
        return (
            step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or step == cfg.max_iters or self._watch_steps
        )

    def _read_losses(self, step: int) -> float:
        """The summed loss of step ``step`` (mean over ranks), after checking that every step since
        the last read had a finite loss (one host sync for all of them)."""
        pending, self._clock.losses = self._clock.losses, []
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in pending]).double()
        if self.dist.enabled:
            values = torch.tensor(self.dist.mean(values.tolist(), self.device), dtype=torch.float64)
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            first = int(bad[0])
            raise NonFiniteLoss(
                f"loss is {float(values[first])} at step {step - len(pending) + 1 + first}; stopping. "
                f"The last good checkpoint is kept in {self.run_dir} (try a lower --lr, --grad-clip, "
                f"or --dtype float32)"
            )
        return float(values[-1])

    def _log_step(self, loss: Optional[float], lr: float) -> None:
        step, cfg = self.progress.step, self.config
        if self.dist.is_main and (step % cfg.log_interval == 0 or step == cfg.max_iters):
            now, clock, tokens = time.time(), self._clock, self.progress.tokens_seen
            tokens_per_s = (tokens - clock.mark_tokens) / max(now - clock.mark_time, 1e-9)
            clock.mark_time, clock.mark_tokens = now, tokens
            rundir.append_csv(
                self.run_dir / "train_log.csv",
                rundir.LOG_HEADER,
                [step, f"{loss:.6f}", f"{lr:.6g}", f"{tokens_per_s:.0f}"],
            )
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if self._bar is not None:
            self._bar.update(1)

    def _after_step(self, stop_signal: int, stop_asked: bool) -> bool:
        """Evaluate/save when due, then honour stop requests. True ends the loop normally."""
        cfg, progress = self.config, self.progress
        evaluated = progress.step % cfg.eval_interval == 0 or progress.step == cfg.max_iters
        if evaluated and self._evaluate_and_save():
            return True  # early stopping
        if stop_signal:
            self._save(is_best=False)
            self.say(
                f"interrupted ({signal.Signals(stop_signal).name}) at step {progress.step}: checkpoint saved; "
                f"continue with: python -m fastlm.train --resume {self.run_dir}"
            )
            raise TrainingInterrupted(stop_signal, progress.step, self.run_dir)
        if stop_asked:
            self.say(f"stop requested at step {progress.step}")
            if not evaluated:
                self._evaluate_and_save()
            progress.stopped_early = True
            return True
        return False

    def _evaluate_and_save(self) -> bool:
        """Evaluate, log, sample, checkpoint. True when early stopping ends the run."""
        cfg, progress = self.config, self.progress
        losses = self._evaluate()
        improved = losses["val"] < progress.best_val
        if improved:
            progress.best_val, progress.best_step, progress.best_train = losses["val"], progress.step, losses["train"]
            progress.bad_evals = 0
        else:
            progress.bad_evals += 1
        lr = self.schedule.lr(progress.step - 1)
        if self.schedule.observe(losses["val"]):
            self.say(
                f"step {progress.step}: val loss plateaued, lr x{cfg.plateau_factor} -> "
                f"{self.schedule.lr(progress.step):.3g}"
            )
        if self.dist.is_main:
            rundir.append_csv(
                self.run_dir / "metrics.csv",
                rundir.METRICS_HEADER,
                [
                    progress.step,
                    f"{losses['train']:.6f}",
                    f"{losses['val']:.6f}",
                    f"{lr:.6g}",
                    progress.tokens_seen,
                    f"{self._wall():.2f}",
                ],
            )
        self.say(
            f"step {progress.step}: train {losses['train']:.4f}, val {losses['val']:.4f}"
            f"{' (best)' if improved else ''}, lr {lr:.3g}"
        )
        if self.dist.is_main and cfg.sample_tokens:
            text = sample_text(self.raw_model, self.tokenizer, cfg.sample_tokens, self.device, cfg.seed + progress.step)
            self.say("  sample: " + text.replace("\n", "\n  | "))
        self._save(improved)
        self._emit("on_eval", progress.step, losses)
        if cfg.early_stopping_patience and progress.bad_evals >= cfg.early_stopping_patience:
            self.say(
                f"early stopping at step {progress.step}: no val improvement in {progress.bad_evals} evals "
                f"(best {progress.best_val:.4f} at step {progress.best_step})"
            )
            progress.stopped_early = True
            return True
        return False

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Mean loss over eval_iters batches per split; the SAME windows at every eval (paired
        comparisons: picking the best checkpoint is not at the mercy of which batches were drawn)."""
        self.model.eval()
        result = {}
        for split, sampler in self.eval_samplers.items():
            sampler.set_state(self._eval_start[split])
            total = 0.0
            for _ in range(self.config.eval_iters):
                x, y = sampler.sample(self.device, self.dist.rank, self.dist.world)
                with self.amp():
                    _, loss = self.raw_model(x, y, segment_ids=self._segments(x))
                total += float(loss)
            result[split] = total / self.config.eval_iters
        self.model.train()
        train_loss, val_loss = self.dist.mean([result["train"], result["val"]], self.device)
        return {"train": train_loss, "val": val_loss}

    def _rank_state(self):
        rng_js, rng_tensors = ckpt_mod.rng_state()
        js = {
            "rng": rng_js,
            "sampler": self.train_sampler.state(),
            "eval_sampler": {k: s.state() for k, s in self.eval_samplers.items()},
        }
        return js, {k: v.numpy().tobytes() for k, v in rng_tensors.items()}

    def _save(self, is_best: bool) -> None:
        """Checkpoint (rank 0 writes every rank's states). A failure on rank 0 ends every rank."""
        states = self.dist.gather_obj(self._rank_state())
        self._agreed(lambda: self._write_checkpoint(states, is_best))

    def _write_checkpoint(self, states: list, is_best: bool) -> None:
        rank_states = [
            (js, {k: torch.frombuffer(bytearray(b), dtype=torch.uint8) for k, b in tensors.items()})
            for js, tensors in states
        ]
        state = {
            **self.progress.to_state(self._wall()),
            "scheduler": self.schedule.state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        ckpt_mod.save_checkpoint(
            self.run_dir,
            self.raw_model,
            self.optimizer,
            state,
            rank_states,
            is_best=is_best,
            model_config=self.model_config.to_dict(),
            before_publish=lambda folder: self._emit("before_publish", folder),
        )

    # ---- the end ----------------------------------------------------------------------------------
    def _finish(self, t_start: float) -> Optional[dict]:
        """Whole-split evaluation of the best weights (all ranks share the windows), summary, plot."""
        train_wall = self._wall()
        self._agreed(self._load_best_weights, everywhere=True)
        val_loss, test_loss = self._split_loss(self.val_ids), self._test_loss()
        self.summary = self._agreed(lambda: self._report(val_loss, test_loss, train_wall, t_start))
        self.dist.barrier()  # every rank is past its last collective before the group is destroyed
        return self.summary

    def _report(self, val_loss: float, test_loss: Optional[float], train_wall: float, t_start: float) -> dict:
        """Rank 0: summary.json, loss.png and the closing lines."""
        progress = self.progress
        summary = {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700)),
            "train_loss": progress.best_train,
            "best_step": progress.best_step,
            "steps": progress.step,
            "stopped_early": progress.stopped_early,
            "tokens_seen": progress.tokens_seen,
            "tokens_per_s": progress.tokens_seen / max(train_wall, 1e-9),
            "train_wall_s": train_wall,
            "params": self.raw_model.num_params(),
            "device": str(self.device),
            "dtype": str(self.autocast_dtype).replace("torch.", ""),  # the autocast dtype (--dtype auto's choice)
            "world_size": self.dist.world,
        }
        if test_loss is not None:
            summary["test_loss"] = test_loss
        summary.update(
            mfu_fields(
                self.raw_model.flops_per_token(),
                progress.tokens_seen,
                train_wall,
                peak_flops(self.device, self.autocast_dtype),
                self.dist.world,
            )
        )
        rundir.plot_losses(self.run_dir)
        summary["wall_s"] = time.time() - t_start
        rundir.write_summary(self.run_dir, summary)
        print(
            f"done: best val loss {val_loss:.4f} (perplexity {summary['val_ppl']:.2f}) over the whole val "
            f"split, step {progress.best_step}; {summary['tokens_per_s']:,.0f} tokens/s; {_mfu_text(summary)}; "
            f"wall {summary['wall_s']:.1f} s",
            flush=True,
        )
        print(f"run dir: {self.run_dir}", flush=True)
        self._emit("on_end", summary)
        return summary

    def _load_best_weights(self) -> None:
        best = ckpt_mod.load_checkpoint(self.run_dir)
        ckpt_mod.load_model_tensors(self.raw_model, best["best"], best["dir"] / "best.safetensors")

    def _split_loss(self, ids) -> float:
        """Mean loss over a whole split; with DDP each rank scores its share of the windows. On a CPU in
        float32 also after a bfloat16 run: the figure ``fastlm.evaluate`` gives (it never autocasts)."""
        amp = self.amp if self.autocast_dtype != torch.float32 and self.device.type != "cpu" else None
        total, count = self._agreed(
            lambda: data_mod.split_loss_sum(
                self.raw_model,
                ids,
                self.model_config.block_size,
                self.config.eval_batch_size,
                self.device,
                amp,
                rank=self.dist.rank,
                world=self.dist.world,
                eos_id=self.doc_eos,
            ),
            everywhere=True,
        )
        if self.dist.enabled:
            total, count = self.dist.mean([total, float(count)], self.device)
        return total / count

    def _test_loss(self) -> Optional[float]:
        if not data_mod.split_path(self.run_dir, "test").exists():
            return None
        test_ids = self._agreed(
            lambda: data_mod.load_split(self.run_dir, "test", self.tokenizer.vocab_size), everywhere=True
        )
        return self._split_loss(test_ids) if len(test_ids) >= 2 else None


def _mfu_text(summary: dict) -> str:
    """``2.47 MFLOP/token, 74.1 GFLOP/s = MFU 35.2% of 210 GFLOP/s`` (the done line's part)."""
    text = f"{format_flops(summary['flops_per_token'])}/token, {format_flops(summary['flops_per_s'])}/s"
    if summary["mfu"] is None:
        return f"{text}, MFU n/a ({summary['peak_source']})"
    return f"{text} = MFU {100 * summary['mfu']:.1f}% of {format_flops(summary['peak_flops_per_s'])}/s"


def sample_text(model, tokenizer, n: int, device, seed: int) -> str:
    """``n`` tokens sampled (temperature 0.8) from the start of a document: the eval-time sample."""
    start = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    prompt = torch.tensor([[start]], dtype=torch.long, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    out = generate(model, prompt, n, temperature=0.8, top_k=None, generator=generator, use_cache=True)
    return tokenizer.decode(out[0, 1:].tolist())
