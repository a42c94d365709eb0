"""Hugging Face import: a transformers model directory (``hf:DIR`` / ``hf:ORG/NAME``) -> a fastlm
GPT, its tokenizer and a run config, exactly (the mapping: :mod:`fastlm.io.hf_common`).

``hf:DIR`` names a transformers model directory (``config.json``, ``model.safetensors`` or a
sharded index, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``); ``hf:ORG/NAME`` that is not
a directory is looked up in the local Hugging Face cache, never on the network. Reading needs
``tokenizers`` (and ``huggingface_hub`` for a cache lookup), not transformers. The directory's
tokenizer becomes a :class:`fastlm.text.tokenizers.HFTokenizer`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from fastlm.errors import HFError
from fastlm.files.safeio import read_bounded
from fastlm.io.checkpoint import load_model_tensors
from fastlm.io.hf_common import (HF_CLASSES, MAX_JSON_BYTES, bias_shape, hf_has_tensor, qk_norm_pairs, require,
                                 weight_pairs)
from fastlm.model import GPT, GPTConfig
from fastlm.text.tokenizers import HFTokenizer

__all__ = ["load_hf_model", "resolve_hf_dir", "from_hf_config", "from_hf_tensors", "with_defaults", "read_json_file"]


HF_DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "use_sliding_window": False},
    "stablelm": {"vocab_size": 50304, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
                 "max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
                 "partial_rotary_factor": 0.25, "use_qkv_bias": False},
}


def with_defaults(hf: dict) -> dict:
    """``hf`` with transformers' defaults for the fields it omits (HFError for an unknown model_type)."""
    arch = hf.get("model_type")
    if arch not in HF_CLASSES:
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
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
           "relu2": "relu2"}.get(hf["activation_function"])
    if act is None:
        _refuse("activation_function", hf["activation_function"],
                "only gelu, gelu_new, gelu_pytorch_tanh, relu, relu2 map onto fastlm")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            _refuse(key, hf[key], "a different attention")
    n_embd = hf["n_embd"]
    return {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": n_embd, "block_size": hf["n_positions"],
            "mlp_hidden": hf["n_inner"] or 4 * n_embd, "norm_eps": hf["layer_norm_epsilon"], "pos": "learned",
            "mlp": act, "norm": "layernorm"}


def _from_rope_family(hf: dict, arch: str) -> dict:
    if hf["hidden_act"] != "silu":
        _refuse("hidden_act", hf["hidden_act"], "only silu (SwiGLU) maps onto fastlm")
    windowed = hf.get("use_sliding_window", True)  # qwen3 ignores sliding_window unless this is set
    for key in ("sliding_window", "layer_types"):
        if (hf.get(key) is not None and not (key == "layer_types" and set(hf[key]) <= {"full_attention"})
                and (windowed or key == "layer_types")):
            _refuse(key, hf[key], "sliding-window attention")
    if arch == "stablelm":
        for key in ("qk_layernorm", "use_parallel_residual"):
            if hf.get(key):
                _refuse(key, hf[key], "not in fastlm's block")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        _refuse("head_dim", head_dim,
                f"fastlm needs head_dim = hidden_size / num_attention_heads = {n_embd / n_head:g}")
    rms = arch in ("llama", "qwen3")
    return {"n_layer": hf["num_hidden_layers"], "n_head": n_head, "n_embd": n_embd,
            "n_kv_head": hf["num_key_value_heads"] or n_head, "mlp_hidden": hf["intermediate_size"],
            "block_size": hf["max_position_embeddings"], "norm_eps": hf["rms_norm_eps" if rms else "layer_norm_eps"],
            "pos": "rope", "mlp": "swiglu", "norm": "rmsnorm" if rms else "layernorm", "qk_norm": arch == "qwen3",
            "rope_theta": _rope_theta(hf)}


def from_hf_config(hf: dict, bias: bool = True) -> GPTConfig:
    """A transformers ``config.json`` (dict) -> GPTConfig (HFError naming an unsupported field)."""
    hf = with_defaults(hf)
    arch = hf["model_type"]
    try:
        fields = _from_gpt2(hf) if arch == "gpt2" else _from_rope_family(hf, arch)
        return GPTConfig(vocab_size=hf["vocab_size"], bias=bias, tie_embeddings=hf["tie_word_embeddings"],
                         dropout=0.0, **fields)
    except HFError:
        raise
    except KeyError as e:
        raise HFError(f"config.json of this {arch} model lacks the field {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise HFError(f"config.json does not describe a {arch} model fastlm can build: {e}") from None


def from_hf_tensors(hf_tensors: dict, hf: dict) -> tuple[GPTConfig, dict]:
    """HF state dict + config -> (GPTConfig, fastlm tensors). HF biases missing from the model are
    zeros in fastlm's bias=True layout; when every bias is zero the model is built with bias=False."""
    hf = with_defaults(hf)
    cfg = from_hf_config(hf, bias=True)
    arch = hf["model_type"]
    if arch == "gpt2":  # hub GPT-2 files name tensors without the "transformer." prefix
        hf_tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                      for k, v in hf_tensors.items()}
    out = {}
    for fl, names, how in weight_pairs(arch, cfg.n_layer) + qk_norm_pairs(cfg, arch):
        if fl == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if not all(hf_has_tensor(hf, arch, n) for n in names):
            out[fl] = torch.zeros(bias_shape(cfg, fl))
            continue
        missing = [n for n in names if n not in hf_tensors]
        if missing:
            raise HFError(f"the model's weights lack {missing[0]}")
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
        raise HFError(f"hf:{name} is neither a local directory nor in the Hugging Face cache (offline lookup); "
                      f"where there is network run `hf download {name} --include '*.json' '*.safetensors' "
                      f"'*.txt' --local-dir DIR` and pass hf:DIR (or fill this machine's HF cache)") from None


def read_json_file(path: Path, what: str) -> dict:
    if not path.exists():
        raise HFError(f"{path.parent} has no {path.name} ({what})")
    raw = read_bounded(path, MAX_JSON_BYTES, what, HFError)  # a regular file only: never a FIFO or device
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HFError(f"cannot read {what} {path}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise HFError(f"{what} {path} must hold a JSON object")
    return obj


def _weight_files(folder: Path) -> list:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(read_json_file(index, "weights index").get("weight_map", {}).values())
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
        if bad or not shards:
            raise HFError(f"{index} names no shard files in its folder")
        return [folder / s for s in sorted(shards)]
    if any((folder / n).exists() for n in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")):
        raise HFError(f"{folder} holds only pickle weights (pytorch_model.bin); fastlm reads safetensors: "
                      f"convert them with transformers (model.save_pretrained(dir, safe_serialization=True))")
    raise HFError(f"{folder} has no model.safetensors")


def _read_hf_tensors(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for f in _weight_files(folder):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise HFError(f"cannot read {f}: {e}") from None
    return tensors


def load_hf_model(name: str, device="cpu", backend: Optional[str] = None) -> tuple:
    """``hf:NAME`` -> ``(GPT in eval mode, HFTokenizer, run_config)`` like a fastlm run; ``backend``:
    the fastlm.ops backend (default auto)."""
    folder = resolve_hf_dir(name)
    hf = read_json_file(folder / "config.json", "model config")
    cfg, tensors = from_hf_tensors(_read_hf_tensors(folder), hf)
    if backend is not None:
        cfg = GPTConfig.from_dict({**cfg.to_dict(), "backend": backend})
    tokenizer = HFTokenizer.from_model_dir(folder, cfg.vocab_size, hf.get("eos_token_id"))
    model = GPT(cfg)
    load_model_tensors(model, tensors, f"hf:{name}")
    model.to(device).eval()
    run_config = {"model": cfg.to_dict(), "source": {"hf": str(folder), "model_type": hf["model_type"]},
                  "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}}
    return model, tokenizer, run_config
