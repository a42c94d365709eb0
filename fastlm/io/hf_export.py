"""Hugging Face export: a fastlm run -> a transformers model directory that loads without custom code
and computes the same logits (the mapping: :mod:`fastlm.io.hf_common`).

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` and a ``README.md``
model card. Tokenizers: ``char`` -> a WordLevel model over single characters, ``word`` -> WordLevel
with fastlm's normaliser and split regex, ``bpe`` / ``tiktoken:*`` -> byte-level BPE (merges derived
from the ranks, whole pre-tokens looked up first as tiktoken does); decoders reproduce fastlm's text
for the specials (``<eos>`` -> a blank line for char/word). ``split_special_tokens`` keeps a literal
``<eos>`` in the text ordinary, as in fastlm.

Self-check: when transformers is installed, the written directory is loaded back and its logits
are compared with fastlm's on a few sequences (fp32, max abs diff <= 1e-4), and its tokenizer's
ids and text with fastlm's; the export fails otherwise. Everything is written into a staging
folder beside the output and moved into place only after the check: a failed export leaves the
output as it was.

An export never deletes what it did not write: the output may not be the exported folder (the run,
or the ``hf:`` model folder) nor a folder that holds it (a new folder inside the run is fine); a
non-empty output is replaced only with ``overwrite``, and only when it is an earlier export (its
``.fastlm-export`` marker lists the files it wrote, and the folder holds no others). A run is read
under its lock (:mod:`fastlm.files.runlock`): a run being trained is refused, naming the trainer.
Files and folders follow the umask.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from fastlm._version import __version__
from fastlm.errors import HFError
from fastlm.files.atomic import make_temp_dir
from fastlm.files.runlock import RunLock
from fastlm.files.safeio import read_bounded
from fastlm.io.checkpoint import model_tensors
from fastlm.io.hf_common import (
    EXPORTABLE,
    HF_CLASSES,
    HF_PREFIX,
    bias_shape,
    hf_has_tensor,
    qk_norm_pairs,
    require,
    split_sizes,
    weight_pairs,
)
from fastlm.io.hf_import import resolve_hf_dir
from fastlm.io.loading import load_model, run_dir_of
from fastlm.model import GPTConfig
from fastlm.text.data import load_split

__all__ = [
    "export_model",
    "architecture_of",
    "to_hf_config",
    "to_hf_tensors",
    "to_hf_tokenizer",
    "PARITY_ATOL",
    "EXPORT_MARKER",
]


#: fastlm mlp -> gpt2's activation_function (transformers' ACT2FN names)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}
#: GPTConfig options no transformers architecture computes together with fastlm's block -> the
#: training flag that leaves the option off
NOT_EXPORTABLE = {
    "logit_softcap": "--logit-softcap 0",
    "value_embed": "--no-value-embed",
    "unet_skips": "--no-unet-skips",
    "smear": "--no-smear",
    "x0_mix": "--no-x0-mix",
}


def architecture_of(cfg: GPTConfig) -> str:
    """The transformers ``model_type`` computing exactly ``cfg``'s math, or HFError naming the option."""
    on = [name for name in NOT_EXPORTABLE if getattr(cfg, name)]
    if on:
        what = ", ".join(f"{name}={getattr(cfg, name)}" for name in on)
        flags = " ".join(NOT_EXPORTABLE[name] for name in on)
        raise HFError(
            f"{what} {'does' if len(on) == 1 else 'do'} not export to transformers exactly (no architecture "
            f"has {'it' if len(on) == 1 else 'them'} with fastlm's block; a model trained with {flags} does); "
            f"exportable: {EXPORTABLE}"
        )
    combo = (cfg.pos, cfg.mlp, cfg.norm)
    if cfg.window is not None:
        if combo == ("rope", "swiglu", "rmsnorm") and not cfg.bias and not cfg.qk_norm:
            return "mistral"
        raise HFError(
            f"window={cfg.window} (sliding-window attention) exports only as mistral: pos=rope, "
            f"mlp=swiglu, norm=rmsnorm, no biases and no qk_norm (this model: pos={cfg.pos}, "
            f"mlp={cfg.mlp}, norm={cfg.norm}, bias={cfg.bias}, qk_norm={cfg.qk_norm})"
        )
    if cfg.pos == "learned" and cfg.mlp in GPT2_ACTIVATIONS and cfg.norm == "layernorm":
        for bad, what in (
            (cfg.n_kv_head != cfg.n_head, f"n_kv_head={cfg.n_kv_head} (grouped-query attention)"),
            (cfg.qk_norm, "qk_norm=True"),
        ):
            if bad:
                raise HFError(f"{what} has no gpt2 equivalent; exportable: {EXPORTABLE}")
        return "gpt2"
    if combo == ("rope", "swiglu", "rmsnorm"):
        return "qwen3" if cfg.qk_norm else "llama"
    if combo == ("rope", "swiglu", "layernorm"):
        return "stablelm"
    option = (
        f"pos={cfg.pos}"
        if cfg.pos not in ("learned", "rope")
        else f"pos={cfg.pos} with mlp={cfg.mlp} and norm={cfg.norm}"
    )
    raise HFError(f"{option} does not export to transformers exactly; exportable: {EXPORTABLE}")


def _rope_fields(theta: float) -> dict:
    # transformers 5 reads rope_parameters, 4.x the top-level rope_theta: write both
    return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def to_hf_config(cfg: GPTConfig, specials: dict) -> dict:
    """The transformers ``config.json`` for ``cfg`` (``specials``: bos/eos/pad token ids or None)."""
    arch = architecture_of(cfg)
    common = {
        "model_type": arch,
        "architectures": [HF_CLASSES[arch]],
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        **{f"{k}_token_id": specials.get(k) for k in ("bos", "eos", "pad")},
    }
    if arch == "gpt2":
        return {
            **common,
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": GPT2_ACTIVATIONS[cfg.mlp],
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    shared = {
        **common,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "attention_dropout": 0.0,
        **_rope_fields(cfg.rope_theta),
    }
    if arch == "llama":
        return {
            **shared,
            "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps,
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "pretraining_tp": 1,
        }
    if arch == "mistral":  # transformers' sliding window: query i sees keys i - window < j <= i, as fastlm's
        return {**shared, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "sliding_window": cfg.window}
    if arch == "qwen3":  # llama's block with per-head RMSNorm of q and k before RoPE; no MLP biases
        return {
            **shared,
            "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps,
            "attention_bias": cfg.bias,
            "use_sliding_window": False,
        }
    shared["rope_parameters"]["partial_rotary_factor"] = 1.0
    return {
        **shared,
        "layer_norm_eps": cfg.norm_eps,
        "partial_rotary_factor": 1.0,
        "use_qkv_bias": cfg.bias,
        "qk_layernorm": cfg.qk_norm,
        "use_parallel_residual": False,
        "hidden_dropout": cfg.dropout,
    }


def to_hf_tensors(tensors: dict, cfg: GPTConfig, hf: dict) -> dict:
    """fastlm tensors -> the HF state dict of config ``hf`` (float32, contiguous). A fastlm bias the HF
    model has no slot for must be zero (else HFError); an HF slot fastlm lacks gets zeros."""
    arch = hf["model_type"]
    out = {}
    for fl, names, how in weight_pairs(arch, cfg.n_layer) + qk_norm_pairs(cfg, arch):
        if fl == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if fl in tensors:
            tensor = tensors[fl].detach().float().cpu()
        else:  # a bias of a bias=False model
            tensor = torch.zeros(bias_shape(cfg, fl))
        if not all(hf_has_tensor(hf, arch, n) for n in names):
            if torch.count_nonzero(tensor):
                raise HFError(f"{fl} is non-zero but {arch} has no such bias; this model does not export exactly")
            continue
        parts = (
            tensor.split(split_sizes(cfg, fl), dim=0)
            if how == "rows"
            else [tensor.clone() for _ in names]
            if how == "heads"
            else [tensor]
        )
        for n, p in zip(names, parts):
            out[n] = (p.t() if how == "t" and p.dim() == 2 else p).contiguous()
    return out


# ---- fastlm tokenizers -> tokenizers.Tokenizer (what AutoTokenizer loads from tokenizer.json) ----


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
        splits = [
            (ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:])
            for i in range(1, len(tok))
            if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank
        ]
        merges += [(spell[left], spell[right]) for _, _, left, right in sorted(splits)]
    return {spell[t]: r for t, r in ranks.items()}, merges


def _byte_level_bpe(tk, enc):
    """A tiktoken Encoding -> byte-level BPE with the same pre-tokenisation regex and specials."""
    vocab, merges = _bpe_vocab_and_merges(enc._mergeable_ranks)
    vocab.update(enc._special_tokens)
    # tiktoken looks a whole pre-token up before merging: ignore_merges does the same
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(enc._pat_str), "isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
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
        norms += [
            tk.normalizers.Replace("\r\n", "\n"),
            tk.normalizers.Replace("\r", "\n"),
            tk.normalizers.Replace(tk.Regex(f"[{other_space}]"), " "),
        ]
    if t.lowercase:  # Rust's tables; they lowercase ~55 letters newer than Python 3.11's Unicode 14
        norms.append(tk.normalizers.Lowercase())
    if norms:
        tok.normalizer = tk.normalizers.Sequence(norms)
    word, space = _python_class(r"\w"), _python_class(r"\s")  # WordTokenizer._SPLIT, spelled out
    tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(f"[{word}]+|[^{word}{space}]|[{space}]"), "isolated")
    tok.decoder = tk.decoders.Sequence(
        [
            tk.decoders.Replace("<eos>", "\n\n"),
            tk.decoders.Replace("<bos>", ""),
            tk.decoders.Replace("<pad>", ""),
            tk.decoders.Fuse(),
        ]
    )
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


# ---- the model directory: files, model card, self-check, publication ----

PARITY_ATOL = 1e-4  # fp32 logits, transformers vs fastlm


def _special_ids(hf_tok, specials: dict) -> dict:
    ids = {k.removesuffix("_token"): hf_tok.token_to_id(v) for k, v in specials.items()}
    return {k: ids.get(k) for k in ("bos", "eos", "pad")}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_model_files(folder: Path, model, tokenizer) -> dict:
    """Write every file but the model card into ``folder``; returns the HF config dict."""
    from safetensors.torch import save

    cfg = model.config
    hf_tok, specials, split_specials = to_hf_tokenizer(tokenizer)
    ids = _special_ids(hf_tok, specials)
    hf_cfg = to_hf_config(cfg, ids)
    _write_json(folder / "config.json", hf_cfg)
    # save() + write_bytes: safetensors' save_file creates its file 0600 whatever the umask
    (folder / "model.safetensors").write_bytes(
        save(to_hf_tensors(model_tensors(model), cfg, hf_cfg), metadata={"format": "pt"})
    )
    _write_json(
        folder / "generation_config.json",
        {"_from_model_config": True, **{f"{k}_token_id": v for k, v in ids.items() if v is not None}},
    )
    (folder / "tokenizer.json").write_text(hf_tok.to_str(), encoding="utf-8")
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.block_size,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": split_specials,
            **specials,
        },
    )
    _write_json(folder / "special_tokens_map.json", specials)
    return hf_cfg


def _model_card(checkpoint: str, run_config: dict, hf_cfg: dict, summary: dict, max_diff) -> str:
    m = run_config.get("model", {})
    train = run_config.get("train", {})
    data = train.get("data") or (["Tiny Shakespeare (bundled with fastlm)"] if train else ["unknown"])
    val = summary.get("val_loss")
    steps = summary.get("steps", summary.get("step", train.get("max_iters")))
    arch = hf_cfg["model_type"]
    parity = f"{max_diff:.2e}" if max_diff is not None else "not checked (transformers not installed)"
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "tags: [fastlm]",
            "---",
            "",
            f"# {Path(checkpoint).name or 'fastlm model'}",
            "",
            f"A small GPT trained and exported by fastlm {__version__}. Load it with "
            "`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` (no custom code).",
            "",
            "## Training",
            "",
            f"- data: {', '.join(map(str, data))}",
            *([f"- fine-tuned from: `{train['init_from']}`"] if train.get("init_from") else []),
            *(
                [f"- converted from the transformers model in `{run_config['source']['hf']}`"]
                if "source" in run_config
                else []
            ),
            f"- tokenizer: {run_config.get('tokenizer', {}).get('kind', '?')}, vocabulary {hf_cfg['vocab_size']}",
            f"- steps: {steps if steps is not None else 'unknown'}",
            f"- validation loss: {f'{val:.4f} nats/token' if isinstance(val, (int, float)) else 'unknown'}",
            *([f"- command: `{run_config['command']}`"] if isinstance(run_config.get("command"), str) else []),
            "",
            "## Architecture",
            "",
            f"fastlm `pos={m.get('pos')}, mlp={m.get('mlp')}, norm={m.get('norm')}` maps exactly onto transformers "
            f"`{arch}` (`{HF_CLASSES[arch]}`): {m.get('n_layer')} layers, {m.get('n_head')} heads "
            f"({m.get('n_kv_head')} key/value), width {m.get('n_embd')}, context {m.get('block_size')}.",
            "",
            f"Max abs logit difference transformers vs fastlm at export (fp32): {parity}.",
            "",
            f"Exported by fastlm from `{checkpoint}`.",
            "",
        ]
    )


@contextlib.contextmanager
def _transformers_loading(what: str):
    """Quiet transformers' logs and progress bars; its load errors become one-line HFErrors."""
    transformers = require("transformers", "the export self-check")
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    except HFError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HFError(f"self-check failed: transformers cannot load the exported {what}: {first}") from None
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def _check_logits(folder: Path, model) -> float:
    with _transformers_loading("model") as transformers:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))  # float32: config.json says so
    hf_model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    length = min(cfg.block_size, max(48, 2 * (cfg.window or 0)))  # longer than a window: its mask is checked
    idx = torch.randint(0, cfg.vocab_size, (3, length), generator=gen)
    with torch.no_grad():
        ours = model(idx.to(next(model.parameters()).device))[0].float().cpu()
        theirs = hf_model(input_ids=idx).logits.float()
    return (ours - theirs).abs().max().item()


def _check_tokenizer(folder: Path, tokenizer, texts: list) -> None:
    with _transformers_loading("tokenizer") as transformers:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        ids = tokenizer.encode(text)
        got = hf_tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != ids:
            raise HFError(
                f"self-check failed: the exported tokenizer encodes {text[:40]!r} differently "
                f"from fastlm's {tokenizer.kind} tokenizer"
            )
        ids = ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if hf_tok.decode(ids) != tokenizer.decode(ids):
            raise HFError(
                f"self-check failed: the exported tokenizer decodes {text[:40]!r} differently "
                f"from fastlm's {tokenizer.kind} tokenizer"
            )


def _sample_texts(run_dir: Path, tokenizer) -> list:
    """A few texts the tokenizer can encode: slices of the run's val split (or of random ids)."""
    try:
        ids = load_split(run_dir, "val", tokenizer.vocab_size)[:1200].tolist()
    except (ValueError, OSError):
        ids = torch.randint(0, tokenizer.vocab_size, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [i for i in ids if i != tokenizer.eos_id]
    return [tokenizer.decode(ids[i : i + 200]) for i in range(0, len(ids), 200)] + [""]


EXPORT_MARKER = ".fastlm-export"  # in every export: {"format": "fastlm-export", "files": [names it wrote]}


def _written_by_export(out: Path) -> Optional[set]:
    """The names an earlier export wrote into ``out`` (its marker's list), or None when ``out`` holds
    no marker of fastlm's."""
    marker = out / EXPORT_MARKER
    if marker.is_symlink():
        return None
    with contextlib.suppress(OSError, ValueError, RecursionError):
        obj = json.loads(read_bounded(marker, 1 << 20, "export marker").decode("utf-8"))
        files = obj.get("files") if isinstance(obj, dict) and obj.get("format") == "fastlm-export" else None
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            return set(files)
    return None


def _check_out(out: Path, source: Optional[Path], overwrite: bool) -> None:
    """Refuse an output folder the export may not replace (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise HFError(f"--out {out} exists and is not a directory")
    if source is not None:
        real_out, real_source = os.path.realpath(out), os.path.realpath(source)
        if os.path.commonpath([real_out, real_source]) == real_out:
            raise HFError(
                f"--out {out} is the folder being exported ({source}) or holds it; choose another --out "
                f"(a new folder inside the run is fine)"
            )
    entries = list(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise HFError(f"--out {out} is not empty; pass --overwrite to replace an earlier export")
    written = _written_by_export(out)
    if written is None:
        raise HFError(
            f"--out {out} is not an earlier fastlm export (it has no {EXPORT_MARKER}); --overwrite "
            f"replaces only those: choose a new or empty folder"
        )
    others = sorted(
        p.name
        for p in entries
        if p.name != EXPORT_MARKER and (p.name not in written or (p.is_dir() and not p.is_symlink()))
    )
    if others:
        raise HFError(
            f"--out {out} holds files the earlier export did not write ({', '.join(others[:3])}); "
            f"--overwrite replaces only an export's own files"
        )


def _publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out`` (the old ``out`` is removed only after)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "x")
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _source_folder(checkpoint: str) -> Path:
    """The folder an export reads: the run directory, or the ``hf:`` model folder."""
    if checkpoint.startswith(HF_PREFIX):
        return resolve_hf_dir(checkpoint[len(HF_PREFIX) :])
    return Path(run_dir_of(checkpoint))


def export_model(
    checkpoint, out_dir, *, overwrite: bool = False, check: bool = True, log=print, backend: Optional[str] = None
) -> dict:
    """Export ``checkpoint`` (run dir / weights / ``hf:DIR``) to ``out_dir``; returns
    ``{"out", "model_type", "max_abs_logit_diff"}`` (the diff is None when not checked)."""
    out, checkpoint = Path(out_dir), str(checkpoint)
    source = _source_folder(checkpoint)
    _check_out(out, source, overwrite)
    is_run = not checkpoint.startswith(HF_PREFIX) and Path(checkpoint).exists() and source.is_dir()
    with RunLock(source, required=False) if is_run else contextlib.nullcontext():
        model, tokenizer, run_config = load_model(checkpoint, "cpu", backend=backend)
        architecture_of(model.config)  # refuse before writing anything
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(f".{out.name}.export-", out.parent)
        try:
            hf_cfg = _write_model_files(staging, model, tokenizer)
            max_diff = _self_check(staging, model, tokenizer, source if is_run else None, log) if check else None
            summary = _read_summary(source if is_run else None)
            (staging / "README.md").write_text(
                _model_card(checkpoint, run_config, hf_cfg, summary, max_diff), encoding="utf-8"
            )
            _write_json(
                staging / EXPORT_MARKER,
                {"format": "fastlm-export", "version": 1, "files": sorted(p.name for p in staging.iterdir())},
            )
            _check_out(out, source, overwrite)  # again: the folder may have changed during the self-check
            _publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"exported {checkpoint} as transformers {hf_cfg['model_type']} to {out}")
    return {"out": str(out), "model_type": hf_cfg["model_type"], "max_abs_logit_diff": max_diff}


def _read_summary(run_dir) -> dict:
    if run_dir is None:
        return {}
    with contextlib.suppress(OSError, ValueError, RecursionError):  # the card just omits what it cannot read
        raw = read_bounded(Path(run_dir) / "summary.json", 1 << 20, "run summary")  # never a FIFO
        summary = json.loads(raw.decode("utf-8"))
        return summary if isinstance(summary, dict) else {}
    return {}


def _self_check(staging: Path, model, tokenizer, run_dir, log):
    try:
        import transformers  # noqa: F401
    except ImportError:
        log("self-check skipped: transformers is not installed (pip install 'fastlm[hf]')")
        return None
    max_diff = _check_logits(staging, model)
    if not max_diff <= PARITY_ATOL:
        raise HFError(
            f"self-check failed: transformers' logits differ from fastlm's by {max_diff:.2e} "
            f"(> {PARITY_ATOL:g}); nothing was written"
        )
    _check_tokenizer(staging, tokenizer, _sample_texts(run_dir, tokenizer) if run_dir else [""])
    log(
        f"self-check: transformers reloads it; max abs logit diff vs fastlm {max_diff:.2e} (fp32), "
        f"tokenizer ids and text identical"
    )
    return max_diff
