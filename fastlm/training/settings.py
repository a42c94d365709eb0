"""Training settings: :class:`TrainConfig`, the two recipes (profiles), and how a run's settings are
resolved, once, before anything is built.

One source of truth: a setting is either given (by a flag, a config file, or a Python caller: every
value passed is honoured, even one equal to a default) or left to the **profile**, a recipe that
fills exactly the settings left unset. The profile-dependent settings default to None ("the
profile's"); :data:`PROFILES` holds the recipes: ``cpu`` (what ``python -m fastlm.train`` trains
with no flags: the model of ``GPTConfig()``, 950 Muon steps, 1750 where it trains in bfloat16) and ``gpu`` (nanoGPT's
shakespeare-char recipe, AdamW). ``profile="auto"`` picks ``gpu`` on CUDA and ``cpu`` elsewhere.
:func:`resolve_settings` turns a request into the fully resolved run (what ``--print-config``
prints and ``config.json`` records); :func:`resume_config` does the same for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fastlm.errors import TrainError
from fastlm.io.checkpoint import CheckpointError
from fastlm.model import GPTConfig
from fastlm.ops.reference_muon import NS_DTYPES
from fastlm.text import data as data_mod
from fastlm.training.optim import OPTIMIZERS
from fastlm.training.runtime import resolve_dtype

__all__ = [
    "TrainConfig",
    "TrainError",
    "PROFILES",
    "PROFILE_CHOICES",
    "Resolved",
    "RESUME_OVERRIDABLE",
    "INIT_OVERRIDABLE",
    "SCHEDULES",
    "DEVICES",
    "DTYPES",
    "default_optimizer",
    "explicit_settings",
    "flag_name",
    "profile_name",
    "profile_train",
    "resolve_settings",
    "resume_config",
    "train_command",
]

SCHEDULES = ("cosine", "plateau", "constant", "wsd")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PROFILE_CHOICES = ("auto", "cpu", "gpu")

#: The recipes: the values of the settings left unset (None). ``cpu``'s model is ``GPTConfig()``: it
#: reaches a whole-val loss of about 1.50 on Tiny Shakespeare (1.54 in float32) in about a minute of training
#: on two CPU cores (README; its steps cost the training time of the earlier plain model's 1150). ``gpu`` is nanoGPT's
#: shakespeare-char recipe (AdamW: Muon is not yet measured on a GPU).
#: A fine-tune (``init_from``) that sets no optimizer takes AdamW in both (see :func:`default_optimizer`).
PROFILES = {
    "cpu": {
        "train": {
            "batch_size": 16,
            # the steps of the earlier default model's 980 / 1850 in the same time (README)
            "max_iters": 950,
            "lr": 2e-3,
            "warmup_iters": 50,
            "eval_interval": 384,
            "eval_iters": 10,
            "sample_tokens": 100,
            "optimizer": "muon",
            # the embedding tables at 5x the AdamW rate: -0.014 to -0.019 nats/char at the same steps (README)
            "embed_lr_ratio": 5.0,
        },
        # where the run trains in bfloat16 autocast (a CPU with native bf16: --dtype auto picks it,
        # fastlm.training.runtime.resolve_dtype): its faster steps buy more of them in the same time
        "train_bf16": {"max_iters": 1750},
        "model": {},
    },
    "gpu": {
        "train": {
            "batch_size": 64,
            "max_iters": 5000,
            "lr": 1e-3,
            "warmup_iters": 100,
            "eval_interval": 250,
            "eval_iters": 100,
            "sample_tokens": 200,
            "optimizer": "adamw",
            "embed_lr_ratio": 1.0,
        },
        # nanoGPT's model: a plain GPT block (no speedrun options), tied embeddings
        "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2}
        | {"qk_norm": False, "value_embed": False, "smear": False, "x0_mix": False, "tie_embeddings": True},
    },
}


def _by_profile(name: str) -> str:
    def value(p):
        bf16 = PROFILES[p].get("train_bf16", {})
        return f"{p} {PROFILES[p]['train'][name]}" + (f" ({bf16[name]} in bfloat16)" if name in bf16 else "")

    return "; default: the profile's (" + ", ".join(value(p) for p in ("cpu", "gpu")) + ")"


def profile_train(name: str, dtype: str, device_type: str) -> dict:
    """The train settings of profile ``name`` for a run of autocast ``dtype`` on ``device_type``: its
    ``train`` values, with ``train_bf16``'s over them where the run's autocast resolves to bfloat16."""
    recipe = PROFILES[name]
    bf16 = recipe.get("train_bf16")
    if (
        bf16
        and device_type == "cpu"
        and dtype in ("auto", "bfloat16")
        and resolve_dtype(dtype, "cpu") == torch.bfloat16
    ):
        return {**recipe["train"], **bf16}
    return dict(recipe["train"])


NS_DTYPE_CHOICES = ("auto", *NS_DTYPES)


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "corpus: text file(s), a folder of .txt files, or .csv/.jsonl with --text-column; "
            "empty = the bundled Tiny Shakespeare"
        },
    )
    out_dir: str = field(default="runs/shakespeare-char", metadata={"help": "run directory"})
    tokenizer: str = field(default="char", metadata={"help": "char | word | bpe | tiktoken:NAME_OR_FILE"})
    vocab_size: Optional[int] = field(default=None, metadata={"help": "tokenizer vocabulary size (bpe; cap for word)"})
    min_freq: int = field(default=1, metadata={"help": "word tokenizer: minimum count of a word"})
    lowercase: bool = field(default=False, metadata={"help": "word tokenizer: lowercase the text"})
    text_column: Optional[str] = field(
        default=None, metadata={"help": "CSV/JSONL column holding the text (default: 'text')"}
    )
    max_doc_tokens: Optional[int] = field(
        default=None, metadata={"help": "drop documents longer than this many tokens"}
    )
    doc_mask: Optional[bool] = field(
        default=None,
        metadata={
            "help": "mask attention at document boundaries (each end-of-text token starts a document); default: on "
            "when the corpus has more than one document"
        },
    )
    raw_newlines: bool = field(
        default=False,
        metadata={"help": "keep \\r\\n / \\r line ends of text corpora as they are (default: normalise them to \\n)"},
    )
    split: str = field(
        default="0.9,0.1,0.0",
        metadata={
            "help": "train,val[,test] fractions of the token stream, cut in that order "
            "(by default val = the last 10 percent)"
        },
    )
    # optimisation
    batch_size: Optional[int] = field(
        default=None, metadata={"help": "sequences per micro-batch (per rank)" + _by_profile("batch_size")}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    batch_warmup_iters: int = field(
        default=0,
        metadata={
            "help": "batch-size warm-up: the micro-batch grows linearly from batch_warmup_start to batch_size over "
            "these first steps (0 = off)"
        },
    )
    batch_warmup_start: Optional[int] = field(
        default=None,
        metadata={"help": "batch-size warm-up: sequences per micro-batch at step 0 (default batch_size/4)"},
    )
    max_iters: Optional[int] = field(default=None, metadata={"help": "optimizer steps" + _by_profile("max_iters")})
    lr: Optional[float] = field(default=None, metadata={"help": "peak learning rate" + _by_profile("lr")})
    min_lr: Optional[float] = field(default=None, metadata={"help": "final / lowest learning rate (default lr/10)"})
    warmup_iters: Optional[int] = field(
        default=None, metadata={"help": "linear warm-up steps" + _by_profile("warmup_iters")}
    )
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "learning-rate schedule after the warm-up: cosine to min_lr, plateau, constant, or wsd "
            "(warmup-stable-decay: lr until the last decay_frac of the steps, then linear to min_lr)",
            "choices": SCHEDULES,
        },
    )
    decay_frac: float = field(default=0.4, metadata={"help": "wsd: fraction of max_iters spent in the final decay"})
    plateau_patience: int = field(
        default=2, metadata={"help": "plateau: evals without improvement before the LR drops"}
    )
    plateau_factor: float = field(default=0.5, metadata={"help": "plateau: LR multiplier on a plateau"})
    optimizer: Optional[str] = field(
        default=None,
        metadata={
            "help": "adamw (AdamW at --lr on every parameter) | muon (Muon at --muon-lr for the 2-D weights "
            "inside the blocks, AdamW at --lr for the rest); default: adamw when fine-tuning (--init-from: "
            "then --lr governs every weight), else the profile's (cpu muon, gpu adamw)",
            "choices": OPTIMIZERS,
        },
    )
    muon_lr: float = field(
        default=0.02,
        metadata={"help": "muon: peak learning rate of the Muon matrices (used only with the muon optimizer)"},
    )
    muon_momentum: float = field(default=0.95, metadata={"help": "muon: Nesterov momentum of the Muon matrices"})
    muon_ns_dtype: str = field(
        default="auto",
        metadata={
            "help": "muon: precision of the Newton-Schulz products. auto: bfloat16 products with float32 sums "
            "in a CPU bfloat16 run on a CPU with AVX512-BF16 (the fused step, 2.1x faster), bfloat16 on CUDA, "
            "else float32",
            "choices": NS_DTYPE_CHOICES,
        },
    )
    embed_lr_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "peak learning rate of the embedding tables (token, learned-position and value embeddings; "
            "not a token embedding tied to the head) as a multiple of --lr (1 in a fine-tune, --init-from)"
            + _by_profile("embed_lr_ratio")
        },
    )
    weight_decay: float = field(default=0.1, metadata={"help": "weight decay of the 2-D weights (AdamW and Muon)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    # evaluation
    eval_interval: Optional[int] = field(
        default=None, metadata={"help": "evaluate (and checkpoint) every N steps" + _by_profile("eval_interval")}
    )
    eval_iters: Optional[int] = field(
        default=None, metadata={"help": "batches per split in each evaluation" + _by_profile("eval_iters")}
    )
    eval_batch_size: int = field(
        default=64, metadata={"help": "windows per forward in the final whole-split evaluation"}
    )
    early_stopping_patience: Optional[int] = field(
        default=None, metadata={"help": "stop after this many evals without a better val loss (none = never)"}
    )
    sample_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "tokens of sample text printed at each eval (0 = none)" + _by_profile("sample_tokens")},
    )
    # system
    device: str = field(default="auto", metadata={"help": "auto picks cuda > mps > cpu", "choices": DEVICES})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "autocast dtype (auto: bfloat16 on CUDA if supported, else float16; on a CPU bfloat16 "
            "where it has native bf16 (AVX512-BF16/AMX), else float32; float32 elsewhere)",
            "choices": DTYPES,
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)"})
    dist_timeout_s: int = field(
        default=600,
        metadata={"help": "torchrun jobs: seconds a collective may wait for the other ranks before the job fails"},
    )
    profile: str = field(
        default="auto",
        metadata={
            "help": "the recipe for the settings you do not set: cpu, gpu, or auto (gpu on CUDA, else cpu)",
            "choices": PROFILE_CHOICES,
        },
    )
    gpu_defaults: bool = field(
        default=True, metadata={"help": "with --profile auto on CUDA: the gpu profile (--no-gpu-defaults: the cpu one)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    log_interval: int = field(default=50, metadata={"help": "write train_log.csv every N steps"})
    # run management
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in --out-dir"})
    resume: Optional[str] = field(default=None, metadata={"help": "continue the run in this directory exactly"})
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "fine-tune from this run dir / model.safetensors (its tokenizer and architecture)"},
    )

    def validate(self) -> None:
        """TrainError naming the first setting out of its range (None = the profile's, not checked here)."""
        unset = {name for name in PROFILES["cpu"]["train"] if getattr(self, name) is None}  # the profile's
        self._check_counts(unset)
        self._check_rates(unset)
        _need(
            self.batch_warmup_start is None or "batch_size" in unset or self.batch_warmup_start <= self.batch_size,
            f"batch_warmup_start ({self.batch_warmup_start}) must not exceed batch_size ({self.batch_size})",
        )
        _need(
            self.lr_schedule in SCHEDULES,
            f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}",
        )
        _need(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _need(
            self.profile in PROFILE_CHOICES,
            f"profile must be one of {', '.join(PROFILE_CHOICES)}, got {self.profile!r}",
        )
        _need(bool(self.out_dir), "out_dir must not be empty")
        data_mod.parse_split(self.split)
        _need(not (self.resume and self.init_from), "use either --resume or --init-from, not both")

    def _check_counts(self, unset: set) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "eval_batch_size",
            "log_interval",
            "min_freq",
            "plateau_patience",
            "dist_timeout_s",
        ):
            v = getattr(self, name)
            _need(
                name in unset or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                f"{name} must be a positive integer, got {v!r}",
            )
        for name in ("warmup_iters", "sample_tokens", "batch_warmup_iters"):
            v = getattr(self, name)
            _need(
                name in unset or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                f"{name} must be a non-negative integer, got {v!r}",
            )
        for name in ("early_stopping_patience", "threads", "max_doc_tokens", "vocab_size", "batch_warmup_start"):
            v = getattr(self, name)
            _need(
                v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                f"{name} must be a positive integer or none, got {v!r}",
            )

    def _check_rates(self, unset: set) -> None:
        _need(
            "lr" in unset or (_is_number(self.lr) and 0 < self.lr <= 10),
            f"lr must be a finite number in (0, 10], got {self.lr!r}",
        )
        if self.min_lr is not None:
            _need(
                _is_number(self.min_lr) and 0 <= self.min_lr and ("lr" in unset or self.min_lr <= self.lr),
                f"min_lr must be a finite number in [0, lr={self.lr}], got {self.min_lr!r}",
            )
        _need(
            "embed_lr_ratio" in unset or (_is_number(self.embed_lr_ratio) and 0 < self.embed_lr_ratio <= 1000),
            f"embed_lr_ratio must be a finite number in (0, 1000], got {self.embed_lr_ratio!r}",
        )
        _need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0, got {self.weight_decay!r}",
        )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _need(math.isfinite(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
        _need(math.isfinite(self.grad_clip) and self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip!r}")
        _need(
            math.isfinite(self.plateau_factor) and 0 < self.plateau_factor < 1,
            f"plateau_factor must be in (0, 1), got {self.plateau_factor!r}",
        )
        _need(
            self.optimizer is None or self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        _need(
            math.isfinite(self.muon_lr) and 0 < self.muon_lr <= 10,
            f"muon_lr must be a finite number in (0, 10], got {self.muon_lr!r}",
        )
        _need(
            math.isfinite(self.muon_momentum) and 0 <= self.muon_momentum < 1,
            f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}",
        )
        _need(
            self.muon_ns_dtype in NS_DTYPE_CHOICES,
            f"muon_ns_dtype must be one of {', '.join(NS_DTYPE_CHOICES)}, got {self.muon_ns_dtype!r}",
        )
        _need(
            _is_number(self.decay_frac) and 0 < self.decay_frac <= 1,
            f"decay_frac must be a number in (0, 1], got {self.decay_frac!r}",
        )

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def batch_at(self, step: int) -> int:
        """Sequences per micro-batch at optimizer step ``step`` (0-based): ``batch_size``, or during the
        batch-size warm-up ``start + (batch_size - start) * step // batch_warmup_iters``."""
        if step >= self.batch_warmup_iters:
            return self.batch_size
        start = self.batch_warmup_start or max(1, self.batch_size // 4)
        return start + (self.batch_size - start) * step // self.batch_warmup_iters


def _need(cond, msg: str) -> None:
    if not cond:
        raise TrainError(msg)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


#: settings --resume may change (everything else must match the run's stored config)
RESUME_OVERRIDABLE = {
    "max_iters",
    "device",
    "threads",
    "progress",
    "log_interval",
    "sample_tokens",
    "compile",
    "resume",
    "overwrite",
    "gpu_defaults",
    "profile",
    "early_stopping_patience",
    "eval_batch_size",
    "dist_timeout_s",
}
#: the value of each profile setting added since runs were first stored, for a run stored before it (what
#: that run trained with): ``--resume`` continues it as it was
_BEFORE_SETTINGS = {"embed_lr_ratio": 1.0}
#: GPTConfig fields that --init-from takes from the flags (the rest is the checkpoint's architecture)
INIT_OVERRIDABLE = {"dropout", "backend"}


def default_optimizer(train: TrainConfig, profile: str = "cpu") -> str:
    """The optimizer of a run that did not choose one: AdamW for a fine-tune (``init_from``), whose
    ``lr`` then governs every parameter (Muon's default peak of 0.02 would undo a gentle fine-tune),
    else the profile's."""
    return "adamw" if train.init_from else PROFILES[profile]["train"]["optimizer"]


def profile_name(train: TrainConfig, device_type: str) -> str:
    """The recipe a run uses: the one named, or for ``auto`` gpu on CUDA (unless ``gpu_defaults`` is
    off) and cpu elsewhere."""
    if train.profile != "auto":
        return train.profile
    return "gpu" if device_type == "cuda" and train.gpu_defaults else "cpu"


@dataclass(frozen=True)
class Resolved:
    """A run's settings with nothing left to a default: ``train`` (no None where a profile decides),
    ``model`` (GPTConfig fields but vocab_size, which the tokenizer sets), the ``profile`` used and
    ``from_profile``: the settings whose values came from it."""

    train: TrainConfig
    model: dict
    profile: str
    from_profile: dict

    def as_dict(self) -> dict:
        """What ``python -m fastlm.train --print-config`` prints."""
        return {
            "profile": self.profile,
            "train": dataclasses.asdict(self.train),
            "model": dict(self.model),
            "from_profile": dict(self.from_profile),
        }


def resolve_settings(train: TrainConfig, model: dict, device_type: str) -> Resolved:
    """The settings of a new run: what the caller set (``train``'s fields that are not None, and the
    keys of ``model``), and the profile's values for the rest. ``device_type`` is where it runs
    (``profile="auto"`` depends on it)."""
    train.validate()
    name = profile_name(train, device_type)
    recipe = PROFILES[name]
    values, applied = dataclasses.asdict(train), {}
    if values["optimizer"] is None:
        values["optimizer"] = default_optimizer(train, name)
        applied["optimizer"] = values["optimizer"]
    if values["embed_lr_ratio"] is None and train.init_from:  # a fine-tune: --lr governs every weight
        values["embed_lr_ratio"] = applied["embed_lr_ratio"] = 1.0
    for key, value in profile_train(name, values["dtype"], device_type).items():
        if values[key] is None:
            values[key] = applied[key] = value
    values["profile"] = name
    if values["dtype"] == "auto" and device_type == "cpu":
        # the machine's choice, recorded: a resume continues in the precision the run started in
        values["dtype"] = str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    applied.update({k: v for k, v in recipe["model"].items() if k not in model})
    resolved = TrainConfig(**values)
    resolved.validate()
    full = GPTConfig(**{**recipe["model"], **model}).to_dict()  # every field (a bad one: one-line ConfigError)
    full.pop("vocab_size")
    return Resolved(resolved, full, name, applied)


def explicit_settings(train: TrainConfig, model: dict) -> set:
    """The settings a Python caller chose: TrainConfig fields that are set (profile settings) or differ
    from their defaults (the rest), and every key of the model settings. (The CLI knows exactly what was
    typed and passes that instead.)"""
    defaults = TrainConfig()
    chosen = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(train, f.name) is not None and getattr(train, f.name) != getattr(defaults, f.name)
    }
    chosen |= {name for name in PROFILES["cpu"]["train"] if getattr(train, name) is not None}
    return chosen | set(model)


def resume_config(
    stored: dict, train: TrainConfig, model: dict, explicit: set, run_dir: Path
) -> tuple[TrainConfig, GPTConfig]:
    """The settings of a resumed run: the stored ones, with the RESUME_OVERRIDABLE settings the user
    chose now. Any other setting that differs from the run's is refused (one line)."""
    stored_train, stored_model = {**_BEFORE_SETTINGS, **stored.get("train", {})}, stored.get("model", {})
    requested = dataclasses.asdict(train)
    for name in sorted(explicit - RESUME_OVERRIDABLE - {"out_dir", "config"}):
        if name in requested and name in stored_train and stored_train[name] != requested[name]:
            raise CheckpointError(
                f"--resume {run_dir}: the run was trained with {name}={stored_train[name]!r}, not "
                f"{requested[name]!r}; drop that setting or start a new run"
            )
        if name in model and name in stored_model and stored_model[name] != model[name]:
            raise CheckpointError(
                f"--resume {run_dir}: the run's model has {name}={stored_model[name]!r}, not "
                f"{model[name]!r} (another config); drop that flag or start a new run"
            )
    values = dict(stored_train)
    for name in RESUME_OVERRIDABLE & explicit:
        if name in requested:
            values[name] = requested[name]
    values.update(resume=str(run_dir), out_dir=str(run_dir), overwrite=False, init_from=None)
    try:
        resumed = TrainConfig(**values)
        resumed.validate()
        model_cfg = GPTConfig.from_dict(stored_model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: {e}") from None
    return resumed, model_cfg


def flag_name(field_name: str) -> str:
    """The command-line flag of a setting: ``max_iters`` -> ``--max-iters``."""
    return "--" + field_name.replace("_", "-")


def train_command(run_config: dict) -> str:
    """The ``python -m fastlm.train`` command line equivalent to a run's config: every architecture
    field and every training setting that differs from :class:`TrainConfig`'s defaults."""
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    args = ["python", "-m", "fastlm.train"]
    train = {k: v for k, v in run_config.get("train", {}).items() if k not in ("overwrite", "resume")}
    model = {k: v for k, v in run_config.get("model", {}).items() if k not in ("vocab_size", "backend")}
    for name, val in [*((k, v) for k, v in train.items() if k not in defaults or defaults[k] != v), *model.items()]:
        if val is None or val == []:
            continue
        if isinstance(val, bool):
            args.append(flag_name(name) if val else "--no-" + flag_name(name)[2:])
        else:
            args += [flag_name(name), *(map(str, val) if isinstance(val, list) else [str(val)])]
    return " ".join(shlex.quote(a) for a in args)
