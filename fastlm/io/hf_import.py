"""Hugging Face import: a transformers model directory (``hf:DIR`` / ``hf:ORG/NAME``) -> a fastlm
GPT, its tokenizer and a run config, exactly (the mapping: :mod:`fastlm.io.hf_common`).

``hf:DIR`` names a transformers model directory (``config.json``, ``model.safetensors`` or a
sharded index, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``); ``hf:ORG/NAME`` that is not
a directory is looked up in the local Hugging Face cache, never on the network. Reading needs
``tokenizers`` (and ``huggingface_hub`` for a cache lookup), not transformers. The directory's
tokenizer becomes a :class:`fastlm.text.tokenizers.HFTokenizer`.

A downloaded model folder is untrusted, and read like a fastlm run directory: every file (index
shards included) must be a regular file inside the folder (a symbolic link may point within it, and
in a Hugging Face cache snapshot into the same repository's ``blobs/``; links elsewhere, FIFOs and
devices are refused unopened); JSON files are read with a size bound; the config is checked against
the shapes in the weights' safetensors headers (layers bounded by the tensors present, every size,
and a model at most 4x the weights' bytes) before any tensor is read or allocated; a tensor the
config does not use is refused by name (known buffers such as GPT-2's ``attn.bias`` and rotary
``inv_freq``, and the ``lm_head.weight`` of a tied model, excepted); the tokenizer's ids must lie
below the model's ``vocab_size``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from fastlm.errors import HFError
from fastlm.files.safeio import is_plain_file_name, open_regular, read_bounded
from fastlm.io.checkpoint import (
    bound_config_by_weights,
    check_config_matches_weights,
    load_model_tensors,
    read_safetensors_header,
)
from fastlm.io.hf_common import (
    HF_CLASSES,
    MAX_JSON_BYTES,
    bias_shape,
    hf_has_tensor,
    qk_norm_pairs,
    require,
    weight_pairs,
)
from fastlm.model import GPT, PLAIN_OPTIONS, GPTConfig
from fastlm.text.tokenizers import MAX_HF_TOKENIZER_CHARS, HFTokenizer

__all__ = [
    "load_hf_model",
    "resolve_hf_dir",
    "from_hf_config",
    "from_hf_tensors",
    "check_hf_config",
    "with_defaults",
    "read_json_file",
    "model_file",
]


HF_DEFAULTS = {
    "gpt2": {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
    },
    "stablelm": {
        "vocab_size": 50304,
        "hidden_size": 2560,
        "intermediate_size": 6912,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "partial_rotary_factor": 0.25,
        "use_qkv_bias": False,
    },
}


def with_defaults(hf: dict) -> dict:
    """``hf`` with transformers' defaults for the fields it omits (HFError for an unknown model_type)."""
    arch = hf.get("model_type")
    if not isinstance(arch, str) or arch not in HF_CLASSES:
        _refuse("model_type", arch, f"only {', '.join(HF_CLASSES)} are supported")
    return {**HF_DEFAULTS[arch], **{k: v for k, v in hf.items() if v is not None or k not in HF_DEFAULTS[arch]}}


def _refuse(field: str, value, why: str):
    raise HFError(f"config field {field}={value!r}: {why}; fastlm cannot represent it exactly")


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        _refuse("rope_scaling", scaling, "rope scaling")
    if params.get("rope_type", "default") != "default":
        _refuse("rope_parameters.rope_type", params["rope_type"], "rope scaling")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        _refuse("partial_rotary_factor", factor, "partial rotary embeddings")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _from_gpt2(hf: dict) -> dict:
    act = {
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "relu": "relu",
        "relu2": "relu2",
    }.get(hf["activation_function"])
    if act is None:
        _refuse(
            "activation_function",
            hf["activation_function"],
            "only gelu, gelu_new, gelu_pytorch_tanh, relu, relu2 map onto fastlm",
        )
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, want) != want:
            _refuse(key, hf[key], "a different attention")
    n_embd = hf["n_embd"]
    return {
        "n_layer": hf["n_layer"],
        "n_head": hf["n_head"],
        "n_embd": n_embd,
        "block_size": hf["n_positions"],
        "mlp_hidden": hf["n_inner"] or 4 * n_embd,
        "norm_eps": hf["layer_norm_epsilon"],
        "pos": "learned",
        "mlp": act,
        "norm": "layernorm",
    }


def _from_rope_family(hf: dict, arch: str) -> dict:
    if hf["hidden_act"] != "silu":
        _refuse("hidden_act", hf["hidden_act"], "only silu (SwiGLU) maps onto fastlm")
    window = _sliding_window(hf, arch)
    if arch == "stablelm":
        for key in ("qk_layernorm", "use_parallel_residual"):
            if hf.get(key):
                _refuse(key, hf[key], "not in fastlm's block")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        _refuse(
            "head_dim", head_dim, f"fastlm needs head_dim = hidden_size / num_attention_heads = {n_embd / n_head:g}"
        )
    rms = arch in ("llama", "mistral", "qwen3")
    return {
        "n_layer": hf["num_hidden_layers"],
        "n_head": n_head,
        "n_embd": n_embd,
        "n_kv_head": hf["num_key_value_heads"] or n_head,
        "mlp_hidden": hf["intermediate_size"],
        "block_size": hf["max_position_embeddings"],
        "norm_eps": hf["rms_norm_eps" if rms else "layer_norm_eps"],
        "pos": "rope",
        "mlp": "swiglu",
        "norm": "rmsnorm" if rms else "layernorm",
        "rope_theta": _rope_theta(hf),
        "qk_norm": arch == "qwen3",
        "window": window,
    }


def _sliding_window(hf: dict, arch: str):
    """fastlm's ``window`` for a config: mistral's ``sliding_window`` (every layer alike), None elsewhere."""
    window = hf.get("sliding_window")
    if arch == "qwen3" and not hf.get("use_sliding_window", True):
        window = None  # qwen3 ignores sliding_window unless use_sliding_window is set
    kinds = set(hf.get("layer_types") or [])
    if arch != "mistral":
        if window is not None or not kinds <= {"full_attention"}:
            _refuse(
                "sliding_window" if window is not None else "layer_types",
                window or hf["layer_types"],
                "sliding-window attention (a mistral config carries it)",
            )
        return None
    if not kinds <= {"sliding_attention"} and not kinds <= {"full_attention"}:
        _refuse("layer_types", hf["layer_types"], "a sliding window in some layers only")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        _refuse("sliding_window", window, "it must be a positive integer")
    return window


def from_hf_config(hf: dict, bias: bool = True) -> GPTConfig:
    """A transformers ``config.json`` (dict) -> GPTConfig (HFError naming an unsupported field)."""
    hf = with_defaults(hf)
    arch = hf["model_type"]
    try:
        fields = _from_gpt2(hf) if arch == "gpt2" else _from_rope_family(hf, arch)
        settings = {"vocab_size": hf["vocab_size"], "bias": bias, "tie_embeddings": hf["tie_word_embeddings"]}
        return GPTConfig(**{**PLAIN_OPTIONS, "dropout": 0.0, **settings, **fields})
    except HFError:
        raise
    except KeyError as e:
        raise HFError(f"config.json of this {arch} model lacks the field {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise HFError(f"config.json does not describe a {arch} model fastlm can build: {str(e)[:200]}") from None


def _gpt2_names(arch: str, names):
    """Hub GPT-2 files name tensors without the ``transformer.`` prefix: the names with it."""
    if arch != "gpt2":
        return names
    return {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in names.items()}


def _mapped(hf: dict, cfg: GPTConfig, present) -> list:
    """``(fastlm name, HF names or None for a zero bias, how)`` for the tensors of ``cfg``; HFError
    naming an HF tensor the model lacks. ``present``: the HF tensor names there are."""
    arch = hf["model_type"]
    out = []
    for fl, names, how in weight_pairs(arch, cfg.n_layer) + qk_norm_pairs(cfg, arch):
        if fl == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if not all(hf_has_tensor(hf, arch, n) for n in names):
            out.append((fl, None, how))
            continue
        missing = [n for n in names if n not in present]
        if missing:
            raise HFError(f"the model's weights lack {missing[0]}")
        out.append((fl, names, how))
    return out


def from_hf_tensors(hf_tensors: dict, hf: dict) -> tuple[GPTConfig, dict]:
    """HF state dict + config -> (GPTConfig, fastlm tensors). HF biases missing from the model are
    zeros in fastlm's bias=True layout; when every bias is zero the model is built with bias=False."""
    hf = with_defaults(hf)
    cfg = from_hf_config(hf, bias=True)
    hf_tensors = _gpt2_names(hf["model_type"], hf_tensors)
    out = {}
    for fl, names, how in _mapped(hf, cfg, hf_tensors):
        if names is None:
            out[fl] = torch.zeros(bias_shape(cfg, fl))
            continue
        parts = [hf_tensors[n].float() for n in names]
        if how == "t":
            parts = [p.t() if p.dim() == 2 else p for p in parts]
        try:
            out[fl] = torch.cat(parts, 0).contiguous() if len(parts) > 1 else parts[0].contiguous()
        except RuntimeError:
            raise HFError(f"the model's tensors {', '.join(names)} have shapes that do not fit its config") from None
    if all(not torch.count_nonzero(v) for k, v in out.items() if k.endswith(".bias")):
        cfg = GPTConfig.from_dict({**cfg.to_dict(), "bias": False})
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return cfg, out


#: tensors transformers keeps in some checkpoints that are not weights (causal masks, RoPE tables)
_KNOWN_BUFFERS = re.compile(r"\.attn\.(masked_)?bias$|\.rotary_emb\.inv_freq$")


def _joined_shape(names: list, how: str, shapes: dict) -> tuple:
    """The shape of the fastlm tensor made of the HF tensors ``names`` (see ``from_hf_tensors``)."""
    parts = [tuple(reversed(shapes[n])) if how == "t" and len(shapes[n]) == 2 else shapes[n] for n in names]
    if len(parts) > 1 and (any(len(p) == 0 for p in parts) or len({p[1:] for p in parts}) != 1):
        raise HFError(f"the model's tensors {', '.join(names)} have shapes that do not fit its config")
    return (sum(p[0] for p in parts), *parts[0][1:]) if len(parts) > 1 else parts[0]


def check_hf_config(hf: dict, shapes: dict, weights: str, weights_bytes: int, config_path) -> GPTConfig:
    """The GPTConfig (bias=True layout) of ``hf``, checked against the HF tensor shapes of the weights'
    headers before anything is allocated: the layer count is bounded by the tensors present, every
    mapped shape must be the config's, the model may take at most 4x ``weights_bytes`` (see
    :func:`fastlm.io.checkpoint.check_config_matches_weights`), and every tensor must be used."""
    hf = with_defaults(hf)
    cfg = from_hf_config(hf, bias=True)
    shapes = _gpt2_names(hf["model_type"], shapes)
    bound_config_by_weights(cfg, shapes, weights, config_path)  # before any loop over layers
    mapped = _mapped(hf, cfg, shapes)
    used = {n for _, names, _ in mapped for n in names or ()}
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()  # transformers ignores it too
    unused = sorted(n for n in set(shapes) - used - tied_head if not _KNOWN_BUFFERS.search(n))
    if unused:
        raise HFError(
            f"{weights} has {len(unused)} tensor(s) that {config_path} does not use, e.g. {unused[0][:80]} "
            f"(a config that describes a smaller model than its weights?)"
        )
    fl_shapes = {
        fl: bias_shape(cfg, fl) if names is None else _joined_shape(names, how, shapes) for fl, names, how in mapped
    }
    check_config_matches_weights(cfg, fl_shapes, weights, config_path, weights_bytes=weights_bytes)
    return cfg


def resolve_hf_dir(name: str) -> Path:
    """A local model directory, or the cached snapshot of the hub repo ``name`` (never the network)."""
    if not name:
        raise HFError("hf: needs a directory or a model name, e.g. hf:./gpt2 or hf:openai-community/gpt2")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise HFError(f"hf:{name} is not a model directory")
    hub = require("huggingface_hub", f"hf:{name} (a Hugging Face cache lookup)")
    try:
        return Path(hub.snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: the same advice either way
        raise HFError(
            f"hf:{name} is neither a local directory nor in the Hugging Face cache (offline lookup); "
            f"where there is network run `hf download {name} --include '*.json' '*.safetensors' "
            f"'*.txt' --local-dir DIR` and pass hf:DIR (or fill this machine's HF cache)"
        ) from None


def model_file(folder: Path, name: str) -> Path:
    """``folder/name``, checked to stay in the model folder: where links lead must be inside it or,
    for a Hugging Face cache snapshot (``models--ORG--NAME/snapshots/REV``), inside the same
    repository's ``blobs/``. Whether it is a regular file is checked when it is opened."""
    path = folder / name
    target = os.path.realpath(path)
    roots = [os.path.realpath(folder)]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(os.path.realpath(folder.parent.parent / "blobs"))
    if not any(os.path.commonpath([root, target]) == root for root in roots):
        raise HFError(f"{path} is a symbolic link to {target}, outside the model folder {folder}; refusing to read it")
    return path


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is there (and refused when read)


def read_json_file(path: Path, what: str) -> dict:
    if not _exists(path):
        raise HFError(f"{path.parent} has no {path.name} ({what})")
    raw = read_bounded(model_file(path.parent, path.name), MAX_JSON_BYTES, what, HFError)  # never a FIFO or device
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HFError(f"cannot read {what} {path}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise HFError(f"{what} {path} must hold a JSON object")
    return obj


def _weight_files(folder: Path) -> list:
    if _exists(folder / "model.safetensors"):
        return [model_file(folder, "model.safetensors")]
    index = folder / "model.safetensors.index.json"
    if _exists(index):
        weight_map = read_json_file(index, "weights index").get("weight_map")
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        if not shards or not all(is_plain_file_name(s) for s in shards):
            raise HFError(f"{index}: its weight_map must map tensor names to shard files in its folder")
        return [model_file(folder, s) for s in sorted(shards)]
    if any(_exists(folder / n) for n in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")):
        raise HFError(
            f"{folder} holds only pickle weights (pytorch_model.bin); fastlm reads safetensors: "
            f"convert them with transformers (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise HFError(f"{folder} has no model.safetensors")


def _header_shapes(files: list) -> dict:
    """``{HF tensor name: shape}`` over every shard's header (checked against the file's size)."""
    shapes = {}
    for f in files:
        own, _ = read_safetensors_header(f)
        twice = set(own) & set(shapes)
        if twice:
            raise HFError(f"tensor {sorted(twice)[0][:80]} is in two shards of {f.parent}")
        shapes.update(own)
    return shapes


def _read_hf_tensors(files: list) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for f in files:
        with open_regular(f, "weights file", HFError) as opened:  # a regular file: never a FIFO or device
            fd_path = f"/proc/self/fd/{opened.fileno()}"  # the file just checked, whatever the path holds now
            try:
                tensors.update(load_file(fd_path if os.path.exists(fd_path) else str(f)))
            except (SafetensorError, OSError) as e:
                raise HFError(f"cannot read {f}: {e}") from None
    return tensors


def _read_tokenizer_file(folder: Path):
    """The ``read(name)`` of :meth:`HFTokenizer.from_model_files` for a model folder."""

    def read(name: str) -> Optional[bytes]:
        path = folder / name
        if not _exists(path):
            return None
        return read_bounded(model_file(folder, name), MAX_HF_TOKENIZER_CHARS, "tokenizer file", HFError)

    return read


def load_hf_model(name: str, device="cpu", backend: Optional[str] = None) -> tuple:
    """``hf:NAME`` -> ``(GPT in eval mode, HFTokenizer, run_config)`` like a fastlm run; ``backend``:
    the fastlm.ops backend (default auto)."""
    folder = resolve_hf_dir(name)
    hf = read_json_file(folder / "config.json", "model config")
    files = _weight_files(folder)
    total = sum(os.path.getsize(f) for f in files)
    checked = check_hf_config(
        hf, _header_shapes(files), str(files[0] if len(files) == 1 else folder), total, folder / "config.json"
    )
    tokenizer = HFTokenizer.from_model_files(_read_tokenizer_file(folder), checked.vocab_size, hf.get("eos_token_id"))
    cfg, tensors = from_hf_tensors(_read_hf_tensors(files), hf)
    if backend is not None:
        cfg = GPTConfig.from_dict({**cfg.to_dict(), "backend": backend})
    model = GPT(cfg)
    load_model_tensors(model, tensors, f"hf:{name}")
    model.to(device).eval()
    run_config = {
        "model": cfg.to_dict(),
        "source": {"hf": str(folder), "model_type": hf["model_type"]},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
    }
    return model, tokenizer, run_config
