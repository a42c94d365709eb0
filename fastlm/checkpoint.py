"""Checkpoints: safetensors weights, JSON config/tokenizer/state, crash-safe writes, no pickle.

A run directory::

    config.json          run config: {"model": GPTConfig, "train": TrainConfig, "tokenizer": {...}}
    tokenizer.json       the tokenizer (JSON)
    model.safetensors    best-validation weights (what load_model / generate / evaluate read)
    latest               pointer (JSON) to the newest complete training checkpoint directory
    ckpt-<step>-<rand>/  model.safetensors (current weights), best.safetensors (best weights),
                         optim.safetensors (optimizer tensors + torch RNG states as uint8 tensors),
                         state.json (step, scheduler, early stopping, python/numpy/sampler RNG, ...),
                         manifest.json (sha256 + size of every file above)
    data/ metrics.csv loss.png summary.json

Crash safety: a checkpoint is written into a fresh ``ckpt-*`` directory (every file fsynced, then
the directory), then the ``latest`` pointer is replaced atomically (temp file + fsync + os.replace +
fsync of the run directory), then ``model.safetensors`` is replaced (hard link of the new best
weights, os.replace), and only then are older ``ckpt-*`` directories deleted. A crash at any point
leaves ``latest`` naming a complete directory (the old one until the pointer moves) and
``model.safetensors`` a complete file (at worst the previous best; resume re-syncs it).

Every weights file carries a sha256 of its tensors in the safetensors metadata, and every
checkpoint directory a manifest, so truncated or corrupted bytes are refused with a one-line
:class:`CheckpointError`. Nothing here calls pickle or ``torch.load``; pickle-looking files are
refused outright.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "RUN_FORMAT",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_weights",
    "load_weights",
    "model_tensors",
    "load_model_tensors",
    "write_run_files",
    "read_run_config",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint_dir",
    "sync_best",
    "load_model",
    "unwrap_model",
    "rng_state",
    "set_rng_state",
]

RUN_FORMAT = "fastlm-run"
STATE_FORMAT = "fastlm-train-state"
VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
CKPT_PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A missing, truncated, corrupted, unsafe or incompatible checkpoint (one line)."""


# ---------------------------------------------------------------------------------------------
# Atomic file writes
# ---------------------------------------------------------------------------------------------

def _fsync_dir(path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse O_RDONLY on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_fsync(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, os.replace it, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode("utf-8"))


def _read_json(path, what: str) -> dict:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
    _refuse_pickle_bytes(path, raw[:4])
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return obj


# ---------------------------------------------------------------------------------------------
# Tensors <-> safetensors (with an embedded checksum)
# ---------------------------------------------------------------------------------------------

def _looks_pickled(head: bytes) -> bool:
    # pickle protocol 2+ starts with 0x80 <protocol>; torch.save's zip format with "PK\x03\x04";
    # protocol 0/1 pickles start with an opcode such as "(", "c" or "]"
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"


def _refuse_pickle_bytes(path, head: bytes) -> None:
    if _looks_pickled(head):
        raise CheckpointError(f"refusing to load {path}: it looks like a pickle/torch.save file; "
                              "fastlm reads only safetensors and JSON (pickle can run arbitrary code)")


def _refuse_pickle_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"refusing to load {path}: {path.suffix} files are pickle-based; "
                              "fastlm reads only .safetensors checkpoints (pickle can run arbitrary code)")


def _tensor_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode("utf-8"))
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _to_bytes(tensors: dict, metadata: Optional[dict] = None) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"fastlm_sha256": _tensor_digest(tensors)}
    meta.update(metadata or {})
    return save(tensors, metadata=meta)


def save_weights(path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """Atomically write ``tensors`` (no shared storage) as safetensors with a sha256 in its metadata."""
    atomic_write_bytes(path, _to_bytes(tensors, metadata))


def load_weights(path) -> tuple[dict, dict]:
    """Read a safetensors file written by :func:`save_weights` -> ``(tensors on CPU, metadata)``;
    CheckpointError if it is missing, not safetensors (e.g. a pickle), truncated or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    _refuse_pickle_path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from None
    if len(raw) < 8:
        _refuse_pickle_bytes(path, raw[:4])
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes), not a safetensors file")
    header_len = int.from_bytes(raw[:8], "little")
    if len(raw) < 9 or raw[8:9] != b"{":  # a safetensors header is a JSON object
        _refuse_pickle_bytes(path, raw[:4])
        raise CheckpointError(f"{path} is not a safetensors file")
    if header_len > len(raw) - 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes "
                              f"in a {len(raw)}-byte file)")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        tensors = load(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None
    want = metadata.get("fastlm_sha256")
    if want is None:
        raise CheckpointError(f"{path} has no fastlm checksum; not written by fastlm")
    if _tensor_digest(tensors) != want:
        raise CheckpointError(f"{path} is corrupted: its tensor bytes do not match the stored sha256")
    return tensors, metadata


def unwrap_model(model):
    """The plain GPT under DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def model_tensors(model) -> dict:
    """The unwrapped model's state dict on CPU, without the tied ``lm_head.weight`` duplicate."""
    model = unwrap_model(model)
    sd = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").clone() for k, v in sd.items()}


def load_model_tensors(model, tensors: dict, path="checkpoint") -> None:
    """Copy ``tensors`` into the (unwrapped) model, checking names and shapes (CheckpointError)."""
    model = unwrap_model(model)
    own = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", False)
    expected = {k for k in own if not (tied and k == "lm_head.weight")}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}")
        raise CheckpointError(f"{path} does not match the model config ({'; '.join(parts)})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model config "
                                  f"expects {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


# ---------------------------------------------------------------------------------------------
# Run files
# ---------------------------------------------------------------------------------------------

def write_run_files(run_dir, run_config: dict, tokenizer) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", {"format": RUN_FORMAT, "version": VERSION, **run_config})
    tokenizer.save(run_dir / "tokenizer.json")


def read_run_config(run_dir) -> dict:
    cfg = _read_json(Path(run_dir) / "config.json", "run config")
    if cfg.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'} is not a fastlm run config")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"unsupported run config version {cfg.get('version')!r} (this fastlm reads {VERSION})")
    if not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{Path(run_dir) / 'config.json'} has no 'model' section")
    return cfg


# ---------------------------------------------------------------------------------------------
# RNG states (JSON-able parts + uint8 tensors)
# ---------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict, dict]:
    """This process's RNG states -> (JSON-able dict, {name: uint8 tensor})."""
    v, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_json = {"bit_generator": np_state["bit_generator"],
               "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])},
               "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])}
    js = {"python": [v, list(internal), gauss], "numpy": np_json}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return js, tensors


def set_rng_state(js: dict, tensors: dict) -> None:
    try:
        v, internal, gauss = js["python"]
        random.setstate((v, tuple(internal), gauss))
        n = js["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"],
                             "state": {"key": np.asarray(n["state"]["key"], dtype=np.uint32), "pos": n["state"]["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"].to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"bad RNG state in checkpoint: {e}") from None


# ---------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------

def _optimizer_split(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, state_js = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val
            else:
                entry[key] = val
        state_js[str(pid)] = entry
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups, "state": state_js}, tensors


def _optimizer_join(js: dict, tensors: dict) -> dict:
    state: dict = {}
    for pid, entry in js["state"].items():
        state[int(pid)] = dict(entry)
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def latest_checkpoint_dir(run_dir) -> Optional[Path]:
    """The checkpoint directory the ``latest`` pointer names, or None when there is no pointer."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if not pointer.exists():
        return None
    js = _read_json(pointer, "checkpoint pointer")
    name = js.get("dir")
    if not isinstance(name, str) or "/" in name or os.sep in name or not name.startswith(CKPT_PREFIX):
        raise CheckpointError(f"{pointer} names no checkpoint directory")
    path = run_dir / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which is missing")
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sync_best(run_dir, ckpt_dir: Optional[Path] = None) -> None:
    """Make ``<run>/model.safetensors`` the best weights of the current checkpoint (atomic)."""
    run_dir = Path(run_dir)
    ckpt_dir = ckpt_dir or latest_checkpoint_dir(run_dir)
    if ckpt_dir is None:
        return
    src = ckpt_dir / "best.safetensors"
    dst = run_dir / "model.safetensors"
    with contextlib.suppress(OSError):
        if dst.exists() and os.path.samefile(src, dst):
            return
    tmp = run_dir / f".model.safetensors.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    _link_or_copy(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(run_dir)


def _clean_old(run_dir: Path, keep: Path) -> None:
    for p in run_dir.iterdir():
        if p.name.startswith(CKPT_PREFIX) and p.is_dir() and p.name != keep.name:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".model.safetensors.") and p.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def save_checkpoint(run_dir, model, optimizer, state: dict, rank_states: list, *, is_best: bool,
                    model_config: dict) -> Path:
    """Write a complete training checkpoint and publish it (see the module docstring for the order).

    ``state``: JSON-able trainer state (step, scheduler, best val, ...). ``rank_states``: one
    ``(json_dict, {name: uint8 tensor})`` per rank (sampler + RNG states). ``is_best``: the current
    weights are the best so far (else the best weights are carried over from the previous checkpoint).
    """
    run_dir = Path(run_dir)
    prev = latest_checkpoint_dir(run_dir) if (run_dir / "latest").exists() else None
    step = int(state["step"])
    tmp = Path(tempfile.mkdtemp(prefix=f"{CKPT_PREFIX}{step:08d}-", dir=run_dir))
    meta = {"fastlm_model_config": json.dumps(model_config, sort_keys=True)}
    _write_fsync(tmp / "model.safetensors", _to_bytes(model_tensors(model), meta))
    if is_best or prev is None or not (prev / "best.safetensors").is_file():
        _link_or_copy(tmp / "model.safetensors", tmp / "best.safetensors")
    else:
        _link_or_copy(prev / "best.safetensors", tmp / "best.safetensors")
    opt_js, opt_tensors = _optimizer_split(optimizer)
    tensors = dict(opt_tensors)
    ranks_js = []
    for r, (js, rng_tensors) in enumerate(rank_states):
        ranks_js.append(js)
        for name, t in rng_tensors.items():
            tensors[f"rank{r}.{name}"] = t
    _write_fsync(tmp / "optim.safetensors", _to_bytes(tensors))
    full = {"format": STATE_FORMAT, "version": VERSION, **state, "optimizer": opt_js, "ranks": ranks_js,
            "model_config": model_config}
    _write_fsync(tmp / "state.json", (json.dumps(full, allow_nan=True) + "\n").encode("utf-8"))
    names = ("model.safetensors", "best.safetensors", "optim.safetensors", "state.json")
    manifest = {n: {"sha256": _sha256_file(tmp / n), "size": (tmp / n).stat().st_size} for n in names}
    _write_fsync(tmp / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    _fsync_dir(tmp)
    _fsync_dir(run_dir)
    hook = os.environ.get("FASTLM_TEST_SAVE_PAUSE")  # test hook: widen the window between steps
    if hook:
        import time
        time.sleep(float(hook))
    atomic_write_json(run_dir / "latest", {"dir": tmp.name, "step": step})
    sync_best(run_dir, tmp)
    _clean_old(run_dir, tmp)
    return tmp


def _verify_manifest(ckpt: Path) -> None:
    manifest = _read_json(ckpt / "manifest.json", "checkpoint manifest")
    for name, info in manifest.items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} lacks {name}")
        if p.stat().st_size != info.get("size"):
            raise CheckpointError(f"{p} is truncated or changed ({p.stat().st_size} bytes, manifest says {info.get('size')})")
        if _sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p} is corrupted (sha256 differs from the manifest)")


def load_checkpoint(run_dir) -> dict:
    """Read and verify the latest training checkpoint of ``run_dir``.

    Returns ``{"dir", "state", "model": tensors, "best": tensors, "optimizer": state_dict,
    "ranks": [(json, tensors)], "model_config"}``. CheckpointError when anything is missing or bad.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    ckpt = latest_checkpoint_dir(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no training checkpoint to resume (no 'latest' pointer)")
    for p in ckpt.iterdir():
        _refuse_pickle_path(p)
    _verify_manifest(ckpt)
    state = _read_json(ckpt / "state.json", "training state")
    if state.get("format") != STATE_FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{ckpt / 'state.json'} is not a fastlm training state of version {VERSION}")
    model_t, _ = load_weights(ckpt / "model.safetensors")
    best_t, _ = load_weights(ckpt / "best.safetensors")
    opt_t, _ = load_weights(ckpt / "optim.safetensors")
    try:
        optim = _optimizer_join(state["optimizer"], opt_t)
        ranks = []
        for r, js in enumerate(state["ranks"]):
            prefix = f"rank{r}."
            ranks.append((js, {k[len(prefix):]: v for k, v in opt_t.items() if k.startswith(prefix)}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'} is malformed: {e}") from None
    return {"dir": ckpt, "state": state, "model": model_t, "best": best_t, "optimizer": optim,
            "ranks": ranks, "model_config": state.get("model_config")}


# ---------------------------------------------------------------------------------------------
# Inference loading
# ---------------------------------------------------------------------------------------------

def load_model(path, device="cpu") -> tuple:
    """Load ``(GPT in eval mode on device, Tokenizer, run_config dict)`` from a run directory or its
    ``model.safetensors`` (config.json and tokenizer.json are read from the same folder), or from
    ``hf:DIR`` / ``hf:ORG/NAME``, a transformers model directory (see :mod:`fastlm.hf`)."""
    from .model import GPT, GPTConfig
    from .tokenizers import TokenizerError, load_tokenizer

    if isinstance(path, str) and path.startswith("hf:"):
        from .hf import load_hf_model

        try:
            return load_hf_model(path[len("hf:"):], device)
        except TokenizerError as e:
            raise CheckpointError(f"cannot load the tokenizer of {path}: {e}") from None
    path = Path(path)
    if path.is_dir():
        run_dir = path
        weights = path / "model.safetensors"
        if not weights.exists():
            ckpt = latest_checkpoint_dir(path)
            if ckpt is None:
                raise CheckpointError(f"{path} holds no model.safetensors (is it a fastlm run directory?)")
            weights = ckpt / "best.safetensors"
    elif path.exists():
        _refuse_pickle_path(path)
        run_dir, weights = path.parent, path
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    run_config = read_run_config(run_dir)
    try:
        cfg = GPTConfig.from_dict(run_config["model"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: bad model config: {e}") from None
    try:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    except TokenizerError as e:
        raise CheckpointError(f"cannot load the run's tokenizer: {e}") from None
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} ids but the model config says "
                              f"vocab_size={cfg.vocab_size}")
    tensors, meta = load_weights(weights)
    stored = meta.get("fastlm_model_config")
    if stored is not None:
        try:  # through GPTConfig: fields added since (with defaults) compare equal
            stored_cfg = GPTConfig.from_dict(json.loads(stored)).to_dict()
        except (json.JSONDecodeError, ValueError, TypeError):
            raise CheckpointError(f"{weights}: unreadable model config in its metadata") from None
        if stored_cfg != cfg.to_dict():
            diff = sorted(k for k in set(stored_cfg) | set(cfg.to_dict()) if stored_cfg.get(k) != cfg.to_dict().get(k))
            raise CheckpointError(f"{weights} was trained with another model config than {run_dir / 'config.json'} "
                                  f"(differs in {', '.join(diff)})")
    model = GPT(cfg)
    load_model_tensors(model, tensors, weights)
    model.to(device)
    model.eval()
    return model, tokenizer, run_config
