"""Hugging Face interop: fastlm models <-> transformers model directories, exactly.

Architectures (both ways, same math, checked by logits parity in tests/test_hf.py):

=====================================================  =============  ================================
fastlm (GPTConfig)                                     transformers   notes
=====================================================  =============  ================================
pos=learned, mlp=gelu | gelu_tanh, norm=layernorm      ``gpt2``       Conv1D weights (in, out); zero
                                                                      biases when the run had none
pos=rope, mlp=swiglu, norm=rmsnorm (GQA included)      ``llama``      q/k/v split out of ``qkv``
pos=rope, mlp=swiglu, norm=layernorm (CPU default)     ``stablelm``   partial_rotary_factor=1, no
                                                                      qk-norm, sequential residual
=====================================================  =============  ================================

Both use half-split rotary pairs (``rotate_half``), as :func:`fastlm.model.apply_rope` does, so
q/k rows need no permutation. Anything else is refused in one line naming the option or the field.

Tokenizers (export): ``char`` -> a WordLevel model over single characters, ``word`` -> WordLevel
with fastlm's normaliser and split regex, ``bpe`` / ``tiktoken:*`` -> byte-level BPE (merges derived
from the ranks, whole pre-tokens looked up first as tiktoken does); decoders reproduce fastlm's text
for the specials (``<eos>`` -> a blank line for char/word). ``split_special_tokens`` keeps a literal
``<eos>`` in the text ordinary, as in fastlm. Import: the directory's ``tokenizer.json`` (or
``vocab.json`` + ``merges.txt``) becomes a :class:`fastlm.tokenizers.HFTokenizer`.

``hf:DIR`` names a transformers model directory (``config.json``, ``model.safetensors`` or a
sharded index, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``); ``hf:ORG/NAME`` that is not
a directory is looked up in the local Hugging Face cache, never on the network. Reading needs
``tokenizers`` (and ``huggingface_hub`` for a cache lookup), not transformers; the export's
self-check needs ``transformers`` (all in ``pip install 'fastlm[hf]'``). ``import fastlm`` imports
none of them.
"""
from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import CheckpointError, load_model_tensors
from .model import GPT, GPTConfig
from .safeio import read_bounded

__all__ = ["HFError", "HF_PREFIX", "EXPORTABLE", "HF_CLASSES", "export", "load_hf_model", "resolve_hf_dir",
           "architecture_of", "to_hf_config", "to_hf_tensors", "to_hf_tokenizer", "from_hf_config",
           "from_hf_tensors", "with_defaults", "require"]

HF_PREFIX = "hf:"
EXPORTABLE = ("pos=learned + mlp=gelu|gelu_tanh + norm=layernorm -> gpt2; "
              "pos=rope + mlp=swiglu + norm=rmsnorm -> llama; pos=rope + mlp=swiglu + norm=layernorm -> stablelm")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "stablelm": "StableLmForCausalLM"}
MAX_JSON_BYTES = 64 << 20  # config / tokenizer files of a downloaded model are untrusted input


class HFError(CheckpointError):
    """A model that cannot be converted exactly, a missing extra, a bad model directory (one line)."""


def require(module: str, what: str):
    """Import ``module`` or fail with one line saying how to install the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFError(f"{what} needs {module.split('.')[0]}: pip install 'fastlm[hf]'") from None


# ---------------------------------------------------------------------------------------------
# fastlm -> transformers
# ---------------------------------------------------------------------------------------------

def architecture_of(cfg: GPTConfig) -> str:
    """The transformers ``model_type`` computing exactly ``cfg``'s math, or HFError naming the option."""
    combo = (cfg.pos, cfg.mlp, cfg.norm)
    if cfg.pos == "learned" and cfg.mlp in ("gelu", "gelu_tanh") and cfg.norm == "layernorm":
        if cfg.n_kv_head != cfg.n_head:
            raise HFError(f"n_kv_head={cfg.n_kv_head} (grouped-query attention) has no gpt2 equivalent; "
                          f"exportable: {EXPORTABLE}")
        return "gpt2"
    if combo == ("rope", "swiglu", "rmsnorm"):
        return "llama"
    if combo == ("rope", "swiglu", "layernorm"):
        return "stablelm"
    if cfg.pos not in ("learned", "rope"):
        option = f"pos={cfg.pos}"
    elif cfg.mlp == "relu":
        option = "mlp=relu"
    else:
        option = f"pos={cfg.pos} with mlp={cfg.mlp} and norm={cfg.norm}"
    raise HFError(f"{option} does not export to transformers exactly; exportable: {EXPORTABLE}")


def _rope_fields(theta: float) -> dict:
    # transformers 5 reads rope_parameters, 4.x the top-level rope_theta: write both
    return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def to_hf_config(cfg: GPTConfig, specials: dict) -> dict:
    """The transformers ``config.json`` for ``cfg`` (``specials``: bos/eos/pad token ids or None)."""
    arch = architecture_of(cfg)
    common = {"model_type": arch, "architectures": [HF_CLASSES[arch]], "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "dtype": "float32",
              **{f"{k}_token_id": specials.get(k) for k in ("bos", "eos", "pad")}}
    if arch == "gpt2":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu" if cfg.mlp == "gelu" else "gelu_pytorch_tanh",
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    shared = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.n_kv_head, "hidden_act": "silu",
              "max_position_embeddings": cfg.block_size, "attention_dropout": 0.0, **_rope_fields(cfg.rope_theta)}
    if arch == "llama":
        return {**shared, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias,
                "mlp_bias": cfg.bias, "pretraining_tp": 1}
    shared["rope_parameters"]["partial_rotary_factor"] = 1.0
    return {**shared, "layer_norm_eps": cfg.norm_eps, "partial_rotary_factor": 1.0, "use_qkv_bias": cfg.bias,
            "qk_layernorm": False, "use_parallel_residual": False, "hidden_dropout": cfg.dropout}


def _layer_pairs(arch: str, i: int) -> list:
    """``(fastlm name, [HF names], how)`` for block ``i``; how: ``copy``, ``t`` (Conv1D transpose) or
    ``rows`` (fastlm's fused rows are the HF tensors stacked: qkv = [q; k; v], fc = [gate; up])."""
    f = f"blocks.{i}."
    if arch == "gpt2":
        h = f"transformer.h.{i}."
        pairs = [("ln1", "ln_1", "copy"), ("attn.qkv", "attn.c_attn", "t"), ("attn.proj", "attn.c_proj", "t"),
                 ("ln2", "ln_2", "copy"), ("mlp.fc", "mlp.c_fc", "t"), ("mlp.proj", "mlp.c_proj", "t")]
        return [(f + a + s, [h + b + s], how) for a, b, how in pairs for s in (".weight", ".bias")]
    h = f"model.layers.{i}."
    qkv = [h + f"self_attn.{p}_proj" for p in "qkv"]
    gate_up = [h + "mlp.gate_proj", h + "mlp.up_proj"]
    out = []
    for s in (".weight", ".bias"):
        out += [(f + "ln1" + s, [h + "input_layernorm" + s], "copy"),
                (f + "attn.qkv" + s, [n + s for n in qkv], "rows"),
                (f + "attn.proj" + s, [h + "self_attn.o_proj" + s], "copy"),
                (f + "ln2" + s, [h + "post_attention_layernorm" + s], "copy"),
                (f + "mlp.fc" + s, [n + s for n in gate_up], "rows"),
                (f + "mlp.proj" + s, [h + "mlp.down_proj" + s], "copy")]
    return out


def _pairs(arch: str, n_layer: int) -> list:
    top = "transformer." if arch == "gpt2" else "model."
    final = "ln_f" if arch == "gpt2" else "norm"
    pairs = [("wte.weight", [top + ("wte" if arch == "gpt2" else "embed_tokens") + ".weight"], "copy"),
             ("ln_f.weight", [top + final + ".weight"], "copy"), ("ln_f.bias", [top + final + ".bias"], "copy"),
             ("lm_head.weight", ["lm_head.weight"], "copy")]
    if arch == "gpt2":
        pairs.append(("wpe.weight", ["transformer.wpe.weight"], "copy"))
    for i in range(n_layer):
        pairs += _layer_pairs(arch, i)
    if arch == "llama":  # RMSNorm has no bias on either side
        pairs = [p for p in pairs if not (p[0].endswith(".bias") and (".ln" in p[0] or p[0].startswith("ln_f")))]
    return pairs


def _hf_has(hf: dict, arch: str, name: str) -> bool:
    """Whether the HF model described by config ``hf`` holds the tensor ``name``."""
    if name == "lm_head.weight":
        return not hf.get("tie_word_embeddings", True)
    if not name.endswith(".bias"):
        return True
    if arch == "gpt2":
        return True
    if "layernorm" in name or name.endswith("norm.bias"):
        return arch == "stablelm"  # LlamaRMSNorm has no bias; StableLM's LayerNorm always has one
    if "self_attn" in name:
        if arch == "stablelm":
            return hf.get("use_qkv_bias", False) and "o_proj" not in name
        return bool(hf.get("attention_bias", False))
    return arch == "llama" and bool(hf.get("mlp_bias", False))


def _split_sizes(cfg: GPTConfig, fl_name: str) -> list:
    if ".attn.qkv" in fl_name:
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    return [cfg.mlp_hidden, cfg.mlp_hidden]


def to_hf_tensors(tensors: dict, cfg: GPTConfig, hf: dict) -> dict:
    """fastlm tensors -> the HF state dict of config ``hf`` (float32, contiguous). A fastlm bias the HF
    model has no slot for must be zero (else HFError); an HF slot fastlm lacks gets zeros."""
    arch = hf["model_type"]
    out = {}
    for fl, names, how in _pairs(arch, cfg.n_layer):
        if fl == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if fl in tensors:
            tensor = tensors[fl].detach().float().cpu()
        else:  # a bias of a bias=False model
            tensor = torch.zeros(_bias_shape(cfg, fl))
        if not all(_hf_has(hf, arch, n) for n in names):
            if torch.count_nonzero(tensor):
                raise HFError(f"{fl} is non-zero but {arch} has no such bias; this model does not export exactly")
            continue
        parts = tensor.split(_split_sizes(cfg, fl), dim=0) if how == "rows" else [tensor]
        for n, p in zip(names, parts):
            out[n] = (p.t() if how == "t" and p.dim() == 2 else p).contiguous()
    return out


def _bias_shape(cfg: GPTConfig, fl: str) -> tuple:
    """Shape of the bias ``fl`` in a bias=True model of ``cfg``'s shape."""
    key = fl.split(".", 2)[-1] if fl.startswith("blocks.") else fl
    widths = {"ln1.bias": cfg.n_embd, "ln2.bias": cfg.n_embd, "ln_f.bias": cfg.n_embd,
              "attn.qkv.bias": (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, "attn.proj.bias": cfg.n_embd,
              "mlp.fc.bias": cfg.mlp_hidden * (2 if cfg.mlp == "swiglu" else 1), "mlp.proj.bias": cfg.n_embd}
    return (widths[key],)


# ---------------------------------------------------------------------------------------------
# transformers -> fastlm
# ---------------------------------------------------------------------------------------------

#: transformers' defaults for the fields read here (a hub config.json may omit any field at its default)
HF_DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False},
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
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(hf["activation_function"])
    if act is None:
        _refuse("activation_function", hf["activation_function"],
                "only gelu, gelu_new, gelu_pytorch_tanh map onto fastlm")
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
    for key in ("sliding_window", "layer_types"):
        if hf.get(key) is not None and not (key == "layer_types" and set(hf[key]) <= {"full_attention"}):
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
    eps = hf["rms_norm_eps"] if arch == "llama" else hf["layer_norm_eps"]
    return {"n_layer": hf["num_hidden_layers"], "n_head": n_head, "n_embd": n_embd,
            "n_kv_head": hf["num_key_value_heads"] or n_head, "mlp_hidden": hf["intermediate_size"],
            "block_size": hf["max_position_embeddings"], "norm_eps": eps, "pos": "rope",
            "mlp": "swiglu", "norm": "rmsnorm" if arch == "llama" else "layernorm", "rope_theta": _rope_theta(hf)}


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
    for fl, names, how in _pairs(arch, cfg.n_layer):
        if fl == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if not all(_hf_has(hf, arch, n) for n in names):
            out[fl] = torch.zeros(_bias_shape(cfg, fl))
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


# ---------------------------------------------------------------------------------------------
# hf:DIR -> (model, tokenizer, run config)
# ---------------------------------------------------------------------------------------------

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
    from .tokenizers import HFTokenizer

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


# ---------------------------------------------------------------------------------------------
# fastlm tokenizers -> tokenizers.Tokenizer (what AutoTokenizer loads from tokenizer.json)
# ---------------------------------------------------------------------------------------------

def _byte_to_unicode() -> dict:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + n)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _bpe_vocab_and_merges(ranks: dict) -> tuple[dict, list]:
    """tiktoken ranks -> byte-level (vocab, merges). A merge (left, right) exists for every split of a
    token into two lower-ranked tokens, ordered by the rank of the token they make (tiktoken's rule:
    merge the adjacent pair whose concatenation ranks lowest)."""
    to_uni = _byte_to_unicode()
    spell = {tok: "".join(to_uni[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                  if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank]
        merges += [(spell[left], spell[right]) for _, _, left, right in sorted(splits)]
    return {spell[t]: r for t, r in ranks.items()}, merges


def _byte_level_bpe(tk, enc):
    """A tiktoken Encoding -> byte-level BPE with the same pre-tokenisation regex and specials."""
    vocab, merges = _bpe_vocab_and_merges(enc._mergeable_ranks)
    vocab.update(enc._special_tokens)
    # tiktoken looks a whole pre-token up before merging: ignore_merges does the same
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(enc._pat_str), "isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    return tok, ({"eos_token": "<|endoftext|>"} if "<|endoftext|>" in enc._special_tokens else {})


def _char_level(tk, t):
    vocab = {c: i for i, c in enumerate(t.chars)}
    vocab["<eos>"] = t.eos_id
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), "isolated")
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("<eos>", "\n\n"), tk.decoders.Fuse()])
    return tok, {"eos_token": "<eos>"}


@functools.lru_cache(maxsize=None)
def _python_class(python_class: str) -> str:
    """Python's ``re`` character class (e.g. ``\\w``) spelled out as code point ranges for Oniguruma,
    whose ``\\w``/``\\s`` differ from Python's (combining marks, other numbers, connector punctuation)."""
    match = re.compile(python_class).match
    spans, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and not 0xD800 <= cp <= 0xDFFF and match(chr(cp)) is not None
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            spans.append(f"\\x{{{start:X}}}" + (f"-\\x{{{cp - 1:X}}}" if cp - 1 > start else ""))
            start = None
    return "".join(spans)


def _word_level(tk, t):
    tok = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate(t.tokens)}, unk_token="<unk>"))
    norms = []
    if t.clean:  # WordTokenizer.normalize: \r\n and \r -> \n, other whitespace -> " "
        other_space = _python_class(r"[^\S\n ]")
        norms += [tk.normalizers.Replace("\r\n", "\n"), tk.normalizers.Replace("\r", "\n"),
                  tk.normalizers.Replace(tk.Regex(f"[{other_space}]"), " ")]
    if t.lowercase:  # Rust's tables; they lowercase ~55 letters newer than Python 3.11's Unicode 14
        norms.append(tk.normalizers.Lowercase())
    if norms:
        tok.normalizer = tk.normalizers.Sequence(norms)
    word, space = _python_class(r"\w"), _python_class(r"\s")  # WordTokenizer._SPLIT, spelled out
    tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(f"[{word}]+|[^{word}{space}]|[{space}]"), "isolated")
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("<eos>", "\n\n"), tk.decoders.Replace("<bos>", ""),
                                        tk.decoders.Replace("<pad>", ""), tk.decoders.Fuse()])
    return tok, {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}


def to_hf_tokenizer(t) -> tuple:
    """A fastlm tokenizer -> ``(tokenizers.Tokenizer, {"eos_token": ..., ...}, split_specials)``.

    ``split_specials``: fastlm never reads a special token out of text (``<eos>`` typed in the text
    is ordinary characters), so the export tells AutoTokenizer to do the same."""
    tk = require("tokenizers", "exporting a tokenizer")
    if t.kind == "hf":
        tok = tk.Tokenizer.from_str(t.tokenizer_json)
        eos = {"eos_token": tok.id_to_token(t.eos_id)} if t.eos_id is not None else {}
        return tok, eos, False
    build = {"char": _char_level, "word": _word_level}.get(t.kind)
    tok, specials = build(tk, t) if build else _byte_level_bpe(tk, t.encoding)
    tok.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in specials.values()])
    return tok, specials, True


def export(checkpoint, out_dir, *, overwrite: bool = False, check: bool = True) -> dict:
    """Write ``checkpoint`` as a transformers model directory (see :mod:`fastlm.export`)."""
    from .export import export_model

    return export_model(str(checkpoint), out_dir, overwrite=overwrite, check=check)
