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

Run directories are downloaded and shared, so they are read as untrusted: files must be regular
files (a FIFO or ``/dev/zero`` is refused unopened), JSON files and safetensors headers have size
limits checked before reading, manifest entries must be the plain names of the checkpoint's own
regular files, and :func:`load_model` checks ``config.json`` against the tensor shapes in the
weights' safetensors header before any model is allocated (the parameters then cannot outgrow the
weights file). Errors name the file and the problem and echo no content of other files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fastlm import ops
from fastlm.errors import CheckpointError
from fastlm.files.atomic import atomic_write_bytes, atomic_write_json, fsync_dir, make_temp_dir, write_fsync
from fastlm.files.safeio import is_plain_file_name, open_regular, read_bounded, read_exactly
from fastlm.model import GPT

__all__ = [
    "CheckpointError",
    "RUN_FORMAT",
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
    "clean_leftovers",
    "read_safetensors_header",
    "read_weights_file",
    "tensors_from_bytes",
    "check_config_matches_weights",
    "bound_config_by_weights",
    "unwrap_model",
    "rng_state",
    "set_rng_state",
]

RUN_FORMAT = "fastlm-run"
STATE_FORMAT = "fastlm-train-state"
VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
CKPT_PREFIX = "ckpt-"
CKPT_FILES = ("model.safetensors", "best.safetensors", "optim.safetensors", "state.json")
MAX_JSON_BYTES = 64 << 20  # config.json, state.json, manifest.json, latest
MAX_HEADER_BYTES = 64 << 20  # a safetensors header (safetensors itself stops at 100 MB)
MAX_WEIGHTS_BYTES = 1 << 40  # a weights file (a bound for the reader, not a model limit)
MODEL_BYTES_SLACK = 256 << 20  # what a model may take beyond 4x its weights file (position tables)
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def _read_json(path, what: str) -> dict:
    path = Path(path)
    raw = read_bounded(path, MAX_JSON_BYTES, what, CheckpointError)
    _refuse_pickle_bytes(path, raw[:4])
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON (truncated or corrupted?): {e}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} nests JSON too deeply") from None
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
        raise CheckpointError(
            f"refusing to load {path}: it looks like a pickle/torch.save file; "
            "fastlm reads only safetensors and JSON (pickle can run arbitrary code)"
        )


def refuse_pickle_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"refusing to load {path}: {path.suffix} files are pickle-based; "
            "fastlm reads only .safetensors checkpoints (pickle can run arbitrary code)"
        )


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


def _read_weights_bytes(path: Path) -> tuple[bytes, int]:
    """``(the bytes of a weights file, its header length)``: the one place a weights file is read
    whole, refused by name or by its first bytes when it looks like a pickle, and its safetensors
    framing checked."""
    refuse_pickle_path(path)
    raw = read_bounded(path, MAX_WEIGHTS_BYTES, "checkpoint file", CheckpointError)
    if len(raw) < 8:
        _refuse_pickle_bytes(path, raw[:4])
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes), not a safetensors file")
    header_len = int.from_bytes(raw[:8], "little")
    if len(raw) < 9 or raw[8:9] != b"{":  # a safetensors header is a JSON object
        _refuse_pickle_bytes(path, raw[:4])
        raise CheckpointError(f"{path} is not a safetensors file")
    if header_len > len(raw) - 8:
        raise CheckpointError(
            f"{path} is truncated or not a safetensors file (header of {header_len} bytes in a {len(raw)}-byte file)"
        )
    return raw, header_len


def tensors_from_bytes(path, raw: bytes, metadata: dict) -> dict:
    """The tensors (on CPU) of a weights file's bytes ``raw`` (from :func:`read_weights_file`), checked
    against the sha256 in its ``metadata``; CheckpointError when they are corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None
    want = metadata.get("fastlm_sha256") if isinstance(metadata, dict) else None
    if want is None:
        raise CheckpointError(f"{path} has no fastlm checksum; not written by fastlm")
    if _tensor_digest(tensors) != want:
        raise CheckpointError(f"{path} is corrupted: its tensor bytes do not match the stored sha256")
    return tensors


def load_weights(path) -> tuple[dict, dict]:
    """Read a safetensors file written by :func:`save_weights` -> ``(tensors on CPU, metadata)``;
    CheckpointError if it is missing, not safetensors (e.g. a pickle), truncated or corrupted."""
    path = Path(path)
    raw, header_len = _read_weights_bytes(path)
    try:
        metadata = json.loads(raw[8 : 8 + header_len].decode("utf-8")).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None
    return tensors_from_bytes(path, raw, metadata), metadata


def read_weights_file(path) -> tuple[bytes, dict, dict]:
    """One read of a weights file to load a model from: ``(its bytes, {tensor name: shape}, metadata)``,
    the header checked as :func:`read_safetensors_header` checks it. :func:`tensors_from_bytes` then
    builds the tensors from these very bytes (no second open, nothing swapped in between)."""
    path = Path(path)
    raw, n = _read_weights_bytes(path)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: safetensors header of {n} bytes is larger than the {MAX_HEADER_BYTES}-byte "
            f"limit (truncated or not a safetensors file)"
        )
    return (raw, *_parse_header(path, raw[8 : 8 + n], len(raw) - 8 - n))


def read_safetensors_header(path) -> tuple[dict, dict]:
    """``({tensor name: shape tuple}, metadata)`` from a safetensors file's header, without reading
    the tensors.

    Only the 8-byte length and the header itself are read (at most MAX_HEADER_BYTES); every entry's
    dtype, shape and byte range are checked against the file's size, so the shapes it returns are
    backed by that many bytes in the file.
    """
    path = Path(path)
    refuse_pickle_path(path)
    with open_regular(path, "checkpoint file", CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        head = read_exactly(f, 8, path, "checkpoint file", CheckpointError) if size >= 8 else b""
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes), not a safetensors file")
        _refuse_pickle_bytes(path, head[:4])
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header of {n} bytes is larger than the file or the "
                f"{MAX_HEADER_BYTES}-byte limit (truncated or not a safetensors file)"
            )
        raw = read_exactly(f, n, path, "checkpoint file", CheckpointError)
    return _parse_header(path, raw, size - 8 - n)


def _parse_header(path, raw: bytes, data_bytes: int) -> tuple[dict, dict]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its metadata is not a JSON object)")
    return _header_shapes(path, header, data_bytes), meta


def _header_shapes(path, header: dict, data_bytes: int) -> dict:
    shapes, used = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize = _ST_ITEMSIZE[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            ok = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not begin <= end <= data_bytes or end - begin != itemsize * math.prod(shape):
            raise CheckpointError(
                f"{path}: the safetensors header entry of tensor {name[:80]!r} is malformed or points outside the file"
            )
        shapes[name] = shape
        used += end - begin
    if used != data_bytes:
        raise CheckpointError(
            f"{path}: the safetensors header does not account for the file's {data_bytes} "
            f"data bytes (truncated or corrupted?)"
        )
    return shapes


def bound_config_by_weights(cfg, shapes: dict, weights_path, config_path) -> None:
    """CheckpointError unless the numbers that drive Python loops and tensor sizes are bounded by the
    weights' header ``shapes``: at most one layer per tensor, and the widths (n_embd, vocab_size,
    mlp_hidden, each the size of some weight of a real model) at most the largest dimension there
    (heads <= n_embd follows from the config's own checks). Then a model of ``cfg`` can be built on
    the meta device without its sizes overflowing."""
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    if cfg.n_layer > len(shapes) or max(cfg.n_embd, cfg.vocab_size, cfg.mlp_hidden) > largest:
        raise CheckpointError(
            f"{config_path} describes a larger model (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, "
            f"vocab_size={cfg.vocab_size}, mlp_hidden={cfg.mlp_hidden}) than the {len(shapes)} "
            f"tensors in {weights_path}"
        )


def check_config_matches_weights(cfg, shapes: dict, weights_path, config_path, weights_bytes=None) -> None:
    """CheckpointError unless the GPT that ``cfg`` describes has exactly the tensors ``shapes``
    (the first result of :func:`read_safetensors_header`) and fits its weights (see
    :func:`_check_model_bytes`; ``weights_bytes``: their size, default the size of ``weights_path``).
    The model is built on the meta device (no memory), after :func:`bound_config_by_weights`."""
    bound_config_by_weights(cfg, shapes, weights_path, config_path)
    ops.load_backends()  # import them now, not inside the meta-device context below
    try:
        with torch.device("meta"):
            meta_model = GPT(cfg)
    except RuntimeError as e:  # sizes past int64 ("Storage size calculation overflowed")
        raise CheckpointError(f"{config_path} describes a model too large to build: {str(e)[:120]}") from None
    have = os.path.getsize(weights_path) if weights_bytes is None else weights_bytes
    _check_model_bytes(meta_model, have, weights_path, config_path)
    expected = meta_model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for name in sorted(set(expected) | set(shapes)):
        want = tuple(expected[name].shape) if name in expected else None
        got = shapes.get(name)
        if want != got:
            what = (
                f"lacks tensor {name}"
                if got is None
                else f"has an unexpected tensor {name[:80]!r}"
                if want is None
                else f"holds {name} with shape {got}, the config implies {want}"
            )
            raise CheckpointError(f"{config_path} does not match {weights_path}: the weights file {what}")


def _check_model_bytes(meta_model, have: int, weights_path, config_path) -> None:
    """The model (parameters and every buffer, e.g. a sinusoidal position table that block_size
    alone sizes) may take at most 4x its weights' ``have`` bytes (fp32 from 1-byte tensors) plus
    MODEL_BYTES_SLACK: a small file with a config claiming a huge context must not allocate GBs."""
    tensors = list(meta_model.parameters()) + list(meta_model.buffers())
    need = sum(t.numel() * t.element_size() for t in tensors)
    if need > 4 * have + MODEL_BYTES_SLACK:
        raise CheckpointError(
            f"{config_path} describes a model of {need} bytes (parameters and position tables), "
            f"far more than its {have}-byte weights file {weights_path} can hold"
        )


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
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(v.shape)}, the model config expects {tuple(own[k].shape)}"
            )
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
    np_json = {
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
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
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": np.asarray(n["state"]["key"], dtype=np.uint32), "pos": n["state"]["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"].to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
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
    if not is_plain_file_name(name) or not name.startswith(CKPT_PREFIX):
        raise CheckpointError(f"{pointer} names no checkpoint directory")
    path = run_dir / name
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which is missing (or a symlink)")
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
    with open_regular(path, "checkpoint file", CheckpointError) as f:  # never a FIFO swapped in
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
    fsync_dir(run_dir)


def _clean_old(run_dir: Path, keep: Optional[Path]) -> None:
    for p in run_dir.iterdir():
        if p.name.startswith(CKPT_PREFIX) and p.is_dir() and (keep is None or p.name != keep.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".model.safetensors.") and p.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def _names(run_dir: Path, folder: Path) -> bool:
    """True when ``run_dir/latest`` names ``folder``."""
    try:
        return latest_checkpoint_dir(run_dir) == folder
    except (CheckpointError, OSError):
        return False


def clean_leftovers(run_dir) -> None:
    """Delete what interrupted saves left in ``run_dir``: checkpoint directories the ``latest``
    pointer does not name, and temp files of ``model.safetensors``."""
    run_dir = Path(run_dir)
    _clean_old(run_dir, latest_checkpoint_dir(run_dir))


def _write_checkpoint_files(
    folder: Path,
    prev: Optional[Path],
    model,
    optimizer,
    state: dict,
    rank_states: list,
    is_best: bool,
    model_config: dict,
) -> None:
    meta = {"fastlm_model_config": json.dumps(model_config, sort_keys=True)}
    write_fsync(folder / "model.safetensors", _to_bytes(model_tensors(model), meta))
    if is_best or prev is None or not (prev / "best.safetensors").is_file():
        _link_or_copy(folder / "model.safetensors", folder / "best.safetensors")
    else:
        _link_or_copy(prev / "best.safetensors", folder / "best.safetensors")
    opt_js, opt_tensors = _optimizer_split(optimizer)
    tensors = dict(opt_tensors)
    ranks_js = []
    for r, (js, rng_tensors) in enumerate(rank_states):
        ranks_js.append(js)
        for name, t in rng_tensors.items():
            tensors[f"rank{r}.{name}"] = t
    write_fsync(folder / "optim.safetensors", _to_bytes(tensors))
    full = {
        "format": STATE_FORMAT,
        "version": VERSION,
        **state,
        "optimizer": opt_js,
        "ranks": ranks_js,
        "model_config": model_config,
    }
    write_fsync(folder / "state.json", (json.dumps(full, allow_nan=True) + "\n").encode("utf-8"))
    names = ("model.safetensors", "best.safetensors", "optim.safetensors", "state.json")
    manifest = {n: {"sha256": _sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names}
    write_fsync(folder / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    fsync_dir(folder)


def save_checkpoint(
    run_dir,
    model,
    optimizer,
    state: dict,
    rank_states: list,
    *,
    is_best: bool,
    model_config: dict,
    before_publish: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write a complete training checkpoint and publish it (see the module docstring for the order).

    ``state``: JSON-able trainer state (step, scheduler, best val, ...). ``rank_states``: one
    ``(json_dict, {name: uint8 tensor})`` per rank (sampler + RNG states). ``is_best``: the current
    weights are the best so far (else the best weights are carried over from the previous checkpoint).
    ``before_publish(folder)`` is called once the folder is complete, before ``latest`` names it.
    A save that fails before publishing removes its folder and raises.
    """
    run_dir = Path(run_dir)
    prev = latest_checkpoint_dir(run_dir) if (run_dir / "latest").exists() else None
    step = int(state["step"])
    folder = make_temp_dir(f"{CKPT_PREFIX}{step:08d}-", run_dir)
    try:
        _write_checkpoint_files(folder, prev, model, optimizer, state, rank_states, is_best, model_config)
        fsync_dir(run_dir)
        if before_publish is not None:
            before_publish(folder)
        atomic_write_json(run_dir / "latest", {"dir": folder.name, "step": step})
    except BaseException:
        if not _names(run_dir, folder):  # published after all (only the folder fsync failed): keep it
            shutil.rmtree(folder, ignore_errors=True)
        raise
    sync_best(run_dir, folder)
    _clean_old(run_dir, folder)
    return folder


def _verify_manifest(ckpt: Path) -> None:
    """Check every file the manifest lists. Entries must be plain names of regular files (no
    symlinks) in the checkpoint directory itself, and the checkpoint's own files must be listed."""
    mpath = ckpt / "manifest.json"
    manifest = _read_json(mpath, "checkpoint manifest")
    for name in CKPT_FILES:
        if name not in manifest:
            raise CheckpointError(f"{mpath} does not list {name}")
    for name, info in manifest.items():
        if not is_plain_file_name(name):
            raise CheckpointError(f"{mpath} lists an entry that is not a plain file name in its directory")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("sha256"), str)
            or not isinstance(info.get("size"), int)
        ):
            raise CheckpointError(f"{mpath}: the entry for {name} needs a sha256 string and an integer size")
        p = ckpt / name
        try:
            st = p.lstat()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ckpt} lacks {name}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{p} is not a regular file (a symlink or special file); refusing to read it")
        if st.st_size != info["size"]:
            raise CheckpointError(f"{p} is truncated or changed ({st.st_size} bytes, manifest says {info['size']})")
        if _sha256_file(p) != info["sha256"]:
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
        refuse_pickle_path(p)
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
            ranks.append((js, {k[len(prefix) :]: v for k, v in opt_t.items() if k.startswith(prefix)}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'} is malformed: {e}") from None
    return {
        "dir": ckpt,
        "state": state,
        "model": model_t,
        "best": best_t,
        "optimizer": optim,
        "ranks": ranks,
        "model_config": state.get("model_config"),
    }
