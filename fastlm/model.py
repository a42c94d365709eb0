"""A decoder-only GPT whose attention and SwiGLU run only through :mod:`fastlm.ops`.

Readable in one sitting, in the spirit of nanoGPT's model.py: pre-norm blocks
``x + attn(norm(x))``, ``x + mlp(norm(x))``, a final norm and a (tied) language-model head.

Options (all in :class:`GPTConfig`): ``norm`` (layernorm | rmsnorm, epsilon
``norm_eps``), ``mlp`` (gelu | gelu_tanh | relu | relu2 | swiglu),
``pos`` (learned | sinusoidal | alibi | rope | none), ``n_kv_head`` for grouped-query attention,
dropout (residual and embedding; identity in eval), bias on/off, tied embeddings, GPT-2 init.
The speedrun options (modded-nanogpt's ideas; each off in :data:`PLAIN_OPTIONS`, which leaves the
block exactly a plain GPT's): ``qk_norm``, ``mlp="relu2"``, ``logit_softcap``, ``zero_init_proj``,
``value_embed``, ``unet_skips``, ``smear``, ``x0_mix`` (see the fields' help for the math of each).
``GPTConfig()``, the default run's model, turns on ``qk_norm``, ``value_embed``, ``smear`` and ``x0_mix``.

Incremental decoding: :meth:`GPT.new_kv_cache` returns a static :class:`KVCache`; passing it to
:meth:`GPT.forward` feeds only the new tokens, which attend to the cached keys with the
bottom-right causal alignment of :func:`fastlm.ops.attention`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastlm import ops
from fastlm.errors import ConfigError
from fastlm.ops.embedding import embedding
from fastlm.ops.positions import alibi_slopes, apply_rope, rope_tables

__all__ = ["GPTConfig", "GPT", "KVCache", "PLAIN_OPTIONS"]

NORMS = ("layernorm", "rmsnorm")
MLPS = (
    "gelu",
    "gelu_tanh",
    "relu",
    "relu2",
    "swiglu",
)  # gelu: exact erf; gelu_tanh: GPT-2's tanh form; relu2: relu(x)^2
POSITIONS = ("learned", "sinusoidal", "alibi", "rope", "none")
MAX_POSITIONS = 1 << 17  # the largest context any positional scheme here is built for


#: The options of a plain GPT block (what transformers' architectures compute and what a stored config
#: from before these fields meant). The default run's model turns four of them on (qk_norm, value_embed,
#: smear, x0_mix).
PLAIN_OPTIONS = {
    "window": None,
    "qk_norm": False,
    "logit_softcap": 0.0,
    "zero_init_proj": False,
    "value_embed": False,
    "unet_skips": False,
    "smear": False,
    "x0_mix": False,
}


@dataclass
class GPTConfig:
    """A decoder-only GPT. The defaults are the model of the default run (``python -m fastlm.train``
    with no flags): 3 layers of 3 heads, width 96, context 128, RoPE, SwiGLU, LayerNorm, no bias,
    an untied head, QK-norm, value embeddings, the smear and the x0 mix."""

    vocab_size: int = field(default=65, metadata={"help": "tokenizer vocabulary size (set from the tokenizer)"})
    block_size: int = field(default=128, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=3, metadata={"help": "transformer blocks"})
    n_head: int = field(default=3, metadata={"help": "query heads"})
    n_kv_head: Optional[int] = field(default=None, metadata={"help": "key/value heads for GQA (default: n_head)"})
    n_embd: int = field(default=96, metadata={"help": "embedding width"})
    mlp_hidden: Optional[int] = field(
        default=None, metadata={"help": "MLP hidden width (default 4*n_embd; 8/3*n_embd for swiglu)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings and residual branches"})
    bias: bool = field(default=False, metadata={"help": "biases in Linear and LayerNorm"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of LayerNorm / RMSNorm"})
    mlp: str = field(default="swiglu", metadata={"help": "gelu | gelu_tanh | relu | relu2 (relu(x)^2) | swiglu"})
    pos: str = field(default="rope", metadata={"help": "learned | sinusoidal | alibi | rope | none"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share token embedding and LM head"})
    window: Optional[int] = field(
        default=None,
        metadata={
            "help": "sliding-window attention in every layer: a query sees its last N keys, itself included "
            "(default: none = the whole causal context; fastlm.ops.masks has the exact rule)"
        },
    )
    qk_norm: bool = field(
        default=True,
        metadata={
            "help": "normalise each head's queries and keys (the model's norm over head_dim, learned gain, no bias; "
            "separate for q and k) before RoPE"
        },
    )
    logit_softcap: float = field(
        default=0.0, metadata={"help": "soft-cap the logits at +-c: c * tanh(logits / c) (0 = off)"}
    )
    zero_init_proj: bool = field(
        default=False,
        metadata={"help": "initialise the output projections (attention, MLP, and an untied LM head) to zero"},
    )
    value_embed: bool = field(
        default=True,
        metadata={
            "help": "value embeddings: each layer's attention values become a*v + b*E_l[token], with a token "
            "embedding E_l per layer and learned scalars a, b (start 0.5)"
        },
    )
    unet_skips: bool = field(
        default=False,
        metadata={
            "help": "U-net skips: the outputs of the first n_layer//2 blocks are added, times a learned weight "
            "(start 1), to the inputs of the mirrored last n_layer//2 blocks"
        },
    )
    smear: bool = field(
        default=True,
        metadata={
            "help": "smear the previous token into each token's embedding: e_t + g * e_(t-1), a learned gain g "
            "per channel (start 0); nothing at a sequence's or a document's first token"
        },
    )
    x0_mix: bool = field(
        default=True,
        metadata={
            "help": "every block after the first takes a_i * x + b_i * x0 for its input x, x0 the first block's "
            "input (the embeddings), learned scalars a_i, b_i (start 1, 0)"
        },
    )
    backend: str = field(default="auto", metadata={"help": "fastlm.ops backend for attention/swiglu"})

    def __post_init__(self):
        # None means "the default for this shape": resolved here, so n_kv_head and mlp_hidden are
        # always the numbers the model is built with (and what config.json records).
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None and isinstance(self.n_embd, int) and not isinstance(self.n_embd, bool):
            if self.mlp == "swiglu":  # keep the parameter count of a 4x MLP: 2/3 * 4 * n_embd, rounded up to 8
                self.mlp_hidden = ((8 * self.n_embd // 3) + 7) // 8 * 8
            else:
                self.mlp_hidden = 4 * self.n_embd
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        def positive_int(name):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise ConfigError(f"{name} must be an integer, got {val!r}")
            if val <= 0:
                raise ConfigError(f"{name} must be positive, got {val}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            positive_int(name)
        for name, choices in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.backend not in ("auto",) + ops.BACKENDS:
            raise ConfigError(f"backend must be auto or one of {', '.join(ops.BACKENDS)}, got {self.backend!r}")
        flags = ("bias", "tie_embeddings", "qk_norm", "zero_init_proj", "value_embed", "unet_skips", "smear", "x0_mix")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if (
            isinstance(self.rope_theta, bool)
            or not isinstance(self.rope_theta, (int, float))
            or not self.rope_theta > 0
        ):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise ConfigError(f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
        if (
            isinstance(self.logit_softcap, bool)
            or not isinstance(self.logit_softcap, (int, float))
            or not 0 <= self.logit_softcap < math.inf
        ):
            raise ConfigError(f"logit_softcap must be a finite number >= 0 (0 = off), got {self.logit_softcap!r}")
        if self.unet_skips and self.n_layer < 2:
            raise ConfigError(f"unet_skips needs n_layer >= 2, got {self.n_layer}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ConfigError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(f"pos=rope needs an even head dim, got n_embd/n_head = {self.head_dim}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            raise ConfigError(f"window must be a positive integer or none, got {self.window!r}")
        if self.block_size > MAX_POSITIONS:
            raise ConfigError(
                f"block_size {self.block_size} is beyond the {MAX_POSITIONS} positions "
                f"that pos={self.pos} supports here"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A stored config (``config.json``, a checkpoint's): a field it lacks was added after it was
        written, and takes the value that meant what the model computed then (:data:`PLAIN_OPTIONS`),
        not today's default."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**{**PLAIN_OPTIONS, **d})


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The fixed sine/cosine position table of "Attention Is All You Need", ``(n_pos, dim)``."""
    pos = torch.arange(n_pos, dtype=torch.float32).unsqueeze(1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class KVCache:
    """Static per-layer key/value buffers ``(n_layer, B, H_kv, capacity, D)``.

    ``GPT.forward(idx, kv_cache=cache)`` appends the new tokens' keys/values and advances the cache;
    ``length`` counts the positions seen (the next token's position), ``fill`` the entries held.
    Without a window they are equal and ``capacity`` is the longest sequence. With a sliding
    ``window`` w only the last w - 1 keys can ever be seen again: when a forward of T tokens would
    overflow, the last w - 1 entries move to the front (:meth:`make_room`), so generation runs for
    ever at constant memory (``capacity`` >= w - 1 + the longest forward). :meth:`reorder` selects
    batch rows (beam search). ``last_token`` ``(B,)`` is the id of the last position fed (None before
    the first forward): a ``smear`` model mixes its embedding into the next token's.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device=None,
        dtype=torch.float32,
        window: Optional[int] = None,
    ):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.window = window
        self.length = 0
        self.fill = 0
        self.last_token: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def make_room(self, n: int) -> None:
        """Make room for ``n`` new entries: drop what a windowed model can no longer see."""
        if self.fill + n <= self.max_len:
            return
        keep = min(self.fill, (self.window or 1) - 1) if self.window is not None else None
        if keep is None or keep + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, needs {self.fill + n}")
        if keep:
            self.k[:, :, :, :keep] = self.k[:, :, :, self.fill - keep : self.fill].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, self.fill - keep : self.fill].clone()
        self.fill = keep

    def update(self, layer: int, k: Tensor, v: Tensor):
        """Write new keys/values ``(B, H_kv, T, D)`` after the held ones; return the filled views."""
        start, end = self.fill, self.fill + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
        self.fill += n

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (in that order), e.g. the surviving beams."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        if self.last_token is not None:
            self.last_token = self.last_token.index_select(0, index)

    def reset(self) -> None:
        self.length = self.fill = 0
        self.last_token = None


class Embedding(nn.Embedding):
    """``nn.Embedding`` (no padding index, no max-norm) looked up by :func:`fastlm.ops.embedding.embedding`:
    the same values, and on CPU a backward that is one ``index_add_``."""

    def forward(self, idx: Tensor) -> Tensor:
        return embedding(idx, self.weight)


def _norm_out_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype a pre-norm writes: under CPU autocast, a float32 input's norm comes out in the
    autocast dtype (the cast the next Linear would make, done in the norm's pass); else x's."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return None


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) computed by :func:`fastlm.ops.layer_norm`: the
    C++ op on CPU, which under CPU autocast writes its output in the autocast dtype (see
    :func:`_norm_out_dtype`). ``m(x, residual=r)`` returns ``(norm(x + r), x + r)``, the residual
    add done in the norm's pass."""

    backend = "auto"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return ops.layer_norm(
            x,
            self.weight,
            self.bias,
            residual=residual,
            eps=self.eps,
            out_dtype=_norm_out_dtype(x),
            backend=self.backend,
        )


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed by :func:`fastlm.ops.layer_norm` (as :class:`LayerNorm`)."""

    backend = "auto"

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return ops.layer_norm(
            x,
            self.weight,
            None,
            residual=residual,
            norm="rmsnorm",
            eps=self.eps if self.eps is not None else torch.finfo(x.dtype).eps,
            out_dtype=_norm_out_dtype(x),
            backend=self.backend,
        )


def _norm(cfg: GPTConfig, width: Optional[int] = None, bias: Optional[bool] = None) -> nn.Module:
    width = cfg.n_embd if width is None else width
    if cfg.norm == "rmsnorm":
        m = RMSNorm(width, eps=cfg.norm_eps)
    else:
        m = LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias if bias is None else bias)
    m.backend = cfg.backend
    return m


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # qk_norm: one gain per head dim for all query heads, one for all key heads (no bias)
        self.q_norm = _norm(cfg, cfg.head_dim, bias=False) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, cfg.head_dim, bias=False) if cfg.qk_norm else None
        # value_embed: v <- ve_mix[0] * v + ve_mix[1] * (the layer's value embedding of the token)
        self.ve_mix = nn.Parameter(torch.full((2,), 0.5)) if cfg.value_embed else None

    def forward(
        self,
        x: Tensor,
        rope=None,
        alibi: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        segment_ids: Optional[Tensor] = None,
        ve: Optional[Tensor] = None,
        ve_idx: Optional[Tensor] = None,
    ) -> Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D)
        # CPU autocast: where attention computes in float32 (the C++ op's BLAS path), upcast qkv once here
        # (in the options' pass when there are options) rather than have the options promote, cast
        # back and the op cast up again. (A model held in bf16 stays in bf16.) On a CPU with
        # AVX512-BF16 the fused op takes the bf16 qkv itself (bf16 products, float32 sums).
        upcast = (
            kv_cache is None
            and qkv.device.type == "cpu"
            and qkv.dtype in (torch.bfloat16, torch.float16)
            and torch.is_autocast_enabled("cpu")
            and not ops.attention_qkv_bf16(qkv, self.cfg.backend)
        )
        if self.q_norm is not None or ve is not None:  # qk_norm, value_embed: one op on the packed qkv
            qkv = ops.qk_norm_value_mix(
                qkv,
                H,
                Hkv,
                q_gain=self.q_norm.weight if self.q_norm is not None else None,
                k_gain=self.k_norm.weight if self.k_norm is not None else None,
                norm=self.cfg.norm,
                eps=self.cfg.norm_eps,
                ve=ve,
                ve_mix=self.ve_mix if ve is not None else None,
                ve_idx=ve_idx,
                out_dtype=torch.float32 if upcast else None,
                backend=self.cfg.backend,
            )
        elif upcast:
            qkv = qkv.float()
        if kv_cache is None:  # split, rotate, attend, merge heads: fused into one op where a kernel does it
            y = ops.attention_qkv(
                qkv,
                H,
                Hkv,
                rope=rope,
                causal=True,
                window=self.cfg.window,
                segment_ids=segment_ids,
                alibi_slopes=alibi,
                backend=self.cfg.backend,
            )
            return self.resid_drop(self.proj(y))
        qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk = qk.view(B, T, H + Hkv, D)
        if rope is not None:  # rotate queries and keys in one pass: (B, T, H + Hkv, D)
            cos, sin = rope
            qk = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D), a strided view: no copy
        k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, Hkv, T_past + T, D)
        y = ops.attention(q, k, v, causal=True, window=self.cfg.window, alibi_slopes=alibi, backend=self.cfg.backend)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, self.backend = cfg.mlp, cfg.backend
        hidden = cfg.mlp_hidden
        # SwiGLU: one fused up-projection producing [gate | up] (B, T, 2 * hidden)
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) = [gate | up] for swiglu
        if self.kind == "swiglu":
            h = ops.swiglu_packed(h, backend=self.backend)  # (B, T, hidden)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, alibi=None, kv_cache=None, segment_ids=None, ve=None, ve_idx=None):
        x, m = self.residual_step(
            x, None, rope=rope, alibi=alibi, kv_cache=kv_cache, segment_ids=segment_ids, ve=ve, ve_idx=ve_idx
        )
        return x + m

    def residual_step(self, x, pending, rope=None, alibi=None, kv_cache=None, segment_ids=None, ve=None, ve_idx=None):
        """The block on the residual stream ``x + pending`` (``pending``: the previous block's MLP output
        not yet added, or None), each residual add done in the pass of the norm after it. Returns
        ``(x', m)``: the block's output is ``x' + m``, its MLP output ``m`` left for the next norm."""
        h, x = (self.ln1(x), x) if pending is None else self.ln1(x, residual=pending)
        a = self.attn(h, rope=rope, alibi=alibi, kv_cache=kv_cache, segment_ids=segment_ids, ve=ve, ve_idx=ve_idx)
        h, x = self.ln2(x, residual=a)
        return x, self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        # Load the backends now: torch.compile cannot trace their lazy imports. The availability
        # checks (triton's imports triton, seconds) only where auto may pick a GPU backend.
        ops.load_backends(check_availability=torch.cuda.is_available())
        self.config = cfg = config
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        if cfg.pos == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_head), persistent=False)
        else:
            self.alibi = None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        kv_width = cfg.n_kv_head * cfg.head_dim
        self.value_embeds = (
            nn.ModuleList(Embedding(cfg.vocab_size, kv_width) for _ in range(cfg.n_layer)) if cfg.value_embed else None
        )
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips else None
        # smear: the previous token's embedding, times a gain per channel (starts off)
        self.smear_gain = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.smear else None
        # x0_mix: block i > 0 takes x0_keep[i-1] * x + x0_add[i-1] * x0 (starts as the plain stream; one
        # block has nothing to mix)
        mix = cfg.x0_mix and cfg.n_layer > 1
        self.x0_keep = nn.Parameter(torch.ones(cfg.n_layer - 1)) if mix else None
        self.x0_add = nn.Parameter(torch.zeros(cfg.n_layer - 1)) if mix else None
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init_proj:
            self._zero_output_projections()

    def _zero_output_projections(self) -> None:
        """zero_init_proj: every block's attention and MLP output projection, and an untied head, start
        at zero (after the normal init above, so the other weights draw the same random numbers)."""
        with torch.no_grad():
            for block in self.blocks:
                block.attn.proj.weight.zero_()
                block.mlp.proj.weight.zero_()
            if not self.config.tie_embeddings:
                self.lm_head.weight.zero_()

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def max_context(self) -> int:
        """The context the model was trained on (block_size): the longest sequence one forward may
        hold, unless :attr:`unbounded` (then it is only the training windows' length)."""
        return self.config.block_size

    @property
    def unbounded(self) -> bool:
        """True when any sequence length is in distribution: a sliding window with relative (or no)
        positions, so a query never sees further back than in training."""
        return self.config.window is not None and self.config.pos in ("rope", "alibi", "none")

    def _rope(self, start: int, T: int, device):
        return rope_tables(self.config.head_dim, self.config.rope_theta, start, T, device)

    def forward(
        self,
        idx: Tensor,
        targets: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        last_only: bool = False,
        segment_ids: Optional[Tensor] = None,
    ):
        """idx ``(B, T)`` token ids -> ``(logits, loss)``.

        logits: ``(B, T, vocab)`` (``(B, 1, vocab)`` with ``last_only``); loss: mean cross-entropy
        against ``targets`` (``-1`` ignored), or None. With ``kv_cache``, idx holds only the new
        tokens; they take positions ``kv_cache.length ...`` and the cache advances by T.
        ``segment_ids`` ``(B, T)`` (no cache): document masking, see :func:`fastlm.ops.attention`.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size and not self.unbounded:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if kv_cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (document masking) apply to whole sequences, not to KV-cached decoding")
            kv_cache.make_room(T)
        x = self.wte(idx)  # (B, T, C)
        if self.smear_gain is not None:
            x = self._smear(x, idx, kv_cache, segment_ids)
        pos = self.config.pos
        if pos == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        elif pos == "sinusoidal":
            x = x + self.pos_table[start : start + T].to(x.dtype)
        rope = self._rope(start, T, idx.device) if pos == "rope" else None
        x, pending = self._blocks(self.drop(x), idx, rope, kv_cache, segment_ids)
        if kv_cache is not None:
            kv_cache.advance(T)
            if T:
                kv_cache.last_token = idx[:, -1].clone()
        x = self.ln_f(x) if pending is None else self.ln_f(x, residual=pending)[0]
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _smear(self, x: Tensor, idx: Tensor, kv_cache: Optional[KVCache], segment_ids: Optional[Tensor]) -> Tensor:
        """smear: ``e_t + smear_gain * e_(t-1)`` for the token embeddings ``x`` ``(B, T, C)``. The first
        position takes the KV cache's last token (the one before it in the sequence), or nothing at a
        sequence's start; with ``segment_ids`` nothing crosses into a document from the one before."""
        prev = x[:, :-1]
        if segment_ids is not None:
            prev = prev * (segment_ids[:, 1:] == segment_ids[:, :-1]).unsqueeze(-1).to(x.dtype)
        if kv_cache is not None and kv_cache.last_token is not None:
            prev = torch.cat([self.wte(kv_cache.last_token).unsqueeze(1).to(x.dtype), prev], dim=1)
        else:
            prev = F.pad(prev, (0, 0, 1, 0))
        return torch.addcmul(x, self.smear_gain, prev)

    def _blocks(self, x: Tensor, idx: Tensor, rope, kv_cache: Optional[KVCache], segment_ids: Optional[Tensor]):
        """The transformer blocks -> ``(x, pending)``: the residual stream after them is ``x + pending``
        (``pending``: the last MLP output, which ``ln_f`` adds in its pass; see :meth:`Block.residual_step`).
        With unet_skips, block ``i`` of the second half first adds ``skip_weights[n-1-i]`` times the
        output of its mirror, block ``n-1-i`` of the first half. With x0_mix, block ``i > 0`` then takes
        ``x0_keep[i-1] * x + x0_add[i-1] * x0``, ``x0`` the first block's input."""
        n = len(self.blocks)
        skips = []
        pending = None
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= n - len(self.skip_weights):
                x = x if pending is None else x + pending
                x, pending = x + self.skip_weights[n - 1 - i] * skips.pop(), None
            if self.x0_keep is not None and i > 0:
                x = x if pending is None else x + pending
                x, pending = torch.addcmul(x * self.x0_keep[i - 1], self.x0_add[i - 1], x0), None
            # value embeddings: the layer's table and the token ids; the lookup happens in the attention's
            # QK-norm / value-mix op (ops.qk_norm_value_mix's ve_idx)
            ve = self.value_embeds[i].weight if self.value_embeds is not None else None
            x, pending = block.residual_step(
                x,
                pending,
                rope=rope,
                alibi=self.alibi,
                kv_cache=kv_cache,
                segment_ids=segment_ids,
                ve=ve,
                ve_idx=idx if ve is not None else None,
            )
            if self.skip_weights is not None and i < len(self.skip_weights):
                x, pending = x + pending, None
                skips.append(x)
        return x, pending

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward and backward), by the rule of PaLM's appendix B (and
        nanoGPT's ``estimate_mfu``): ``6 N + 12 L H D T``.

        ``N`` is the number of weights that multiply activations: every ``nn.Linear`` weight, the LM
        head included (once, tied or not); embedding lookups (tokens, positions, value embeddings),
        norms, biases and scalar gains do no matrix multiply and are left out. Each such weight costs
        2 FLOPs per token forward and 4 backward. ``12 L H D T`` is attention's two matmuls (scores and
        weighted values: 2 x 2 x T x D per head and token forward, x3 with backward) over the full
        ``T x T`` score matrix (no causal discount, as PaLM and nanoGPT count), ``T`` = ``seq_len``
        (default ``block_size``), ``L`` layers of ``H`` query heads of width ``D``.
        """
        cfg = self.config
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        t = cfg.block_size if seq_len is None else seq_len
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * t

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> KVCache:
        """A cache for ``max_len`` positions (at most block_size); an :attr:`unbounded` model's holds
        ``2 * window`` entries whatever ``max_len`` (forwards of up to ``window + 1`` tokens fit)."""
        cfg = self.config
        if self.unbounded:
            max_len = 2 * cfg.window if max_len is None else min(max_len, 2 * cfg.window)
        else:
            max_len = cfg.block_size if max_len is None else min(max_len, cfg.block_size)
        p = self.wte.weight
        device = torch.device(device or p.device)
        if dtype is None:  # under autocast the keys/values come out in the autocast dtype
            on = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if on else p.dtype
        return KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_kv_head,
            max_len,
            cfg.head_dim,
            device=device,
            dtype=dtype,
            window=cfg.window if self.unbounded else None,
        )
