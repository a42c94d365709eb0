"""Hugging Face interop, what both directions share: fastlm models <-> transformers model directories,
exactly (import: :mod:`fastlm.io.hf_import`, export: :mod:`fastlm.io.hf_export`).

Architectures (both ways, same math, checked by logits parity in tests/test_hf.py):

=====================================================  =============  ================================
fastlm (GPTConfig)                                     transformers   notes
=====================================================  =============  ================================
pos=learned, mlp=gelu | gelu_tanh, norm=layernorm      ``gpt2``       Conv1D weights (in, out); zero
                                                                      biases when the run had none
pos=rope, mlp=swiglu, norm=rmsnorm (GQA included)      ``llama``      q/k/v split out of ``qkv``
the same with ``window`` (sliding window), no biases   ``mistral``    ``sliding_window`` = window
pos=rope, mlp=swiglu, norm=layernorm (CPU default)     ``stablelm``   partial_rotary_factor=1, no
                                                                      qk-norm, sequential residual
=====================================================  =============  ================================

Also (speedrun options): ``mlp=relu | relu2`` with gpt2's block (``activation_function``);
``qk_norm`` with ``norm=rmsnorm`` <-> ``qwen3`` (per-head q/k RMSNorm before RoPE), with
``norm=layernorm`` -> ``stablelm`` with ``qk_layernorm`` (export only: fastlm's one gain is copied
into each head's LayerNorm);
``zero_init_proj`` changes only the initial weights. ``logit_softcap``, ``value_embed``, ``unet_skips``,
``smear`` and ``x0_mix`` are refused in one line (no transformers architecture computes them with this
block).

Both use half-split rotary pairs (``rotate_half``), as :func:`fastlm.ops.positions.apply_rope` does, so
q/k rows need no permutation. Anything else is refused in one line naming the option or the field.

Tokenizers (export): ``char`` -> a WordLevel model over single characters, ``word`` -> WordLevel
with fastlm's normaliser and split regex, ``bpe`` / ``tiktoken:*`` -> byte-level BPE (merges derived
from the ranks, whole pre-tokens looked up first as tiktoken does); decoders reproduce fastlm's text
for the specials (``<eos>`` -> a blank line for char/word). ``split_special_tokens`` keeps a literal
``<eos>`` in the text ordinary, as in fastlm. Import: the directory's ``tokenizer.json`` (or
``vocab.json`` + ``merges.txt``) becomes a :class:`fastlm.text.tokenizers.HFTokenizer`.

``hf:DIR`` names a transformers model directory (``config.json``, ``model.safetensors`` or a
sharded index, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``); ``hf:ORG/NAME`` that is not
a directory is looked up in the local Hugging Face cache, never on the network. Reading needs
``tokenizers`` (and ``huggingface_hub`` for a cache lookup), not transformers; the export's
self-check needs ``transformers`` (all in ``pip install 'fastlm[hf]'``). ``import fastlm`` imports
none of them.
"""

from __future__ import annotations

from fastlm.errors import HFError
from fastlm.model import GPTConfig

__all__ = [
    "HF_PREFIX",
    "EXPORTABLE",
    "HF_CLASSES",
    "MAX_JSON_BYTES",
    "require",
    "weight_pairs",
    "hf_has_tensor",
    "split_sizes",
    "bias_shape",
    "qk_norm_pairs",
]

HF_PREFIX = "hf:"


EXPORTABLE = (
    "pos=learned + mlp=gelu|gelu_tanh|relu|relu2 + norm=layernorm -> gpt2; "
    "pos=rope + mlp=swiglu + norm=rmsnorm -> llama (with window and no bias: mistral; with qk_norm: "
    "qwen3); pos=rope + mlp=swiglu + norm=layernorm -> stablelm"
)


HF_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


MAX_JSON_BYTES = 64 << 20  # config / tokenizer files of a downloaded model are untrusted input


def require(module: str, what: str):
    """Import ``module`` or fail with one line saying how to install the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFError(f"{what} needs {module.split('.')[0]}: pip install 'fastlm[hf]'") from None


def _layer_pairs(arch: str, i: int) -> list:
    """``(fastlm name, [HF names], how)`` for block ``i``; how: ``copy``, ``t`` (Conv1D transpose) or
    ``rows`` (fastlm's fused rows are the HF tensors stacked: qkv = [q; k; v], fc = [gate; up])."""
    f = f"blocks.{i}."
    if arch == "gpt2":
        h = f"transformer.h.{i}."
        pairs = [
            ("ln1", "ln_1", "copy"),
            ("attn.qkv", "attn.c_attn", "t"),
            ("attn.proj", "attn.c_proj", "t"),
            ("ln2", "ln_2", "copy"),
            ("mlp.fc", "mlp.c_fc", "t"),
            ("mlp.proj", "mlp.c_proj", "t"),
        ]
        return [(f + a + s, [h + b + s], how) for a, b, how in pairs for s in (".weight", ".bias")]
    h = f"model.layers.{i}."
    qkv = [h + f"self_attn.{p}_proj" for p in "qkv"]
    gate_up = [h + "mlp.gate_proj", h + "mlp.up_proj"]
    out = []
    for s in (".weight", ".bias"):
        out += [
            (f + "ln1" + s, [h + "input_layernorm" + s], "copy"),
            (f + "attn.qkv" + s, [n + s for n in qkv], "rows"),
            (f + "attn.proj" + s, [h + "self_attn.o_proj" + s], "copy"),
            (f + "ln2" + s, [h + "post_attention_layernorm" + s], "copy"),
            (f + "mlp.fc" + s, [n + s for n in gate_up], "rows"),
            (f + "mlp.proj" + s, [h + "mlp.down_proj" + s], "copy"),
        ]
    return out


def weight_pairs(arch: str, n_layer: int) -> list:
    top = "transformer." if arch == "gpt2" else "model."
    final = "ln_f" if arch == "gpt2" else "norm"
    pairs = [
        ("wte.weight", [top + ("wte" if arch == "gpt2" else "embed_tokens") + ".weight"], "copy"),
        ("ln_f.weight", [top + final + ".weight"], "copy"),
        ("ln_f.bias", [top + final + ".bias"], "copy"),
        ("lm_head.weight", ["lm_head.weight"], "copy"),
    ]
    if arch == "gpt2":
        pairs.append(("wpe.weight", ["transformer.wpe.weight"], "copy"))
    for i in range(n_layer):
        pairs += _layer_pairs(arch, i)
    if arch in ("llama", "mistral", "qwen3"):  # RMSNorm has no bias on either side
        pairs = [p for p in pairs if not (p[0].endswith(".bias") and (".ln" in p[0] or p[0].startswith("ln_f")))]
    return pairs


def qk_norm_pairs(cfg: GPTConfig, arch: str) -> list:
    """``(fastlm name, [HF names], how)`` of the qk_norm gains: qwen3 has one q_norm/k_norm per layer
    (``copy``), stablelm one LayerNorm per head (``heads``: the shared gain copied into each)."""
    pairs = []
    for i in range(cfg.n_layer if cfg.qk_norm else 0):
        f, h = f"blocks.{i}.attn.", f"model.layers.{i}.self_attn."
        for side, heads in (("q", cfg.n_head), ("k", cfg.n_kv_head)):
            if arch == "qwen3":
                pairs.append((f + f"{side}_norm.weight", [h + f"{side}_norm.weight"], "copy"))
            else:
                pairs.append(
                    (
                        f + f"{side}_norm.weight",
                        [h + f"{side}_layernorm.norms.{j}.weight" for j in range(heads)],
                        "heads",
                    )
                )
    return pairs


def hf_has_tensor(hf: dict, arch: str, name: str) -> bool:
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


def split_sizes(cfg: GPTConfig, fl_name: str) -> list:
    if ".attn.qkv" in fl_name:
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    return [cfg.mlp_hidden, cfg.mlp_hidden]


def bias_shape(cfg: GPTConfig, fl: str) -> tuple:
    """Shape of the bias ``fl`` in a bias=True model of ``cfg``'s shape."""
    key = fl.split(".", 2)[-1] if fl.startswith("blocks.") else fl
    widths = {
        "ln1.bias": cfg.n_embd,
        "ln2.bias": cfg.n_embd,
        "ln_f.bias": cfg.n_embd,
        "attn.qkv.bias": (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim,
        "attn.proj.bias": cfg.n_embd,
        "mlp.fc.bias": cfg.mlp_hidden * (2 if cfg.mlp == "swiglu" else 1),
        "mlp.proj.bias": cfg.n_embd,
    }
    return (widths[key],)
