"""fastlm's public ops: one API, several backends.

* :func:`attention` -- scaled dot-product attention on SDPA's ``(B, H, T, D)`` layout.
* :func:`swiglu` -- ``silu(gate) * up``.
* :func:`swiglu_packed` -- the same on one ``[..., 2 * hidden]`` tensor holding ``[gate | up]``
  (what a fused up-projection produces; the model's SwiGLU MLP uses it).

Backends (``backend=`` argument, or the ``FASTLM_BACKEND`` environment variable, which overrides
``"auto"``):

========== ==========================================================================
reference  explicit PyTorch math with hand-written backward (:mod:`fastlm.reference`)
torch      ``F.scaled_dot_product_attention`` / eager ``F.silu(g) * u``
triton     fused Triton kernels (:mod:`fastlm.kernels`), CUDA tensors (or TRITON_INTERPRET=1)
cuda       C++/CUDA kernels in ``fastlm._C`` (CUDA tensors)
cpp        C++ CPU kernels in ``fastlm._C`` (CPU tensors)
========== ==========================================================================

``auto`` walks a per-device preference list and takes the first backend that is available and
supports the call; if it has to skip a preferred one it logs why, once.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

__all__ = ["attention", "attention_backend", "attention_qkv", "swiglu", "swiglu_packed", "BACKENDS", "Backend", "available_backends",
           "backend_status", "load_backends", "resolve_backend", "BackendUnavailableError"]

log = logging.getLogger("fastlm")

BACKENDS = ("reference", "torch", "triton", "cuda", "cpp")

# auto's preference per (op, device type). Measured choices: see benchmarks/ and README.
_AUTO_ORDER = {
    ("attention", "cuda"): ("triton", "cuda", "torch", "reference"),
    ("attention", "cpu"): ("torch", "cpp", "reference"),  # cpp first for some calls: _cpu_attention_order
    ("swiglu", "cuda"): ("triton", "cuda", "torch", "reference"),
    ("swiglu", "cpu"): ("cpp", "torch", "reference"),
    ("swiglu_packed", "cuda"): ("triton", "cuda", "torch", "reference"),
    ("swiglu_packed", "cpu"): ("cpp", "torch", "reference"),
}
_AUTO_DEFAULT = ("torch", "reference")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here (or cannot run this call)."""


class Backend(Protocol):
    """What every backend object provides. ``*_unsupported`` return None when the backend can run
    that call (arguments already validated by the public op), else a one-line reason."""

    name: str

    def unavailable_reason(self) -> Optional[str]: ...

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes) -> Optional[str]: ...

    def attention(self, q, k, v, causal, scale, alibi_slopes) -> Tensor: ...

    def swiglu_unsupported(self, gate, up) -> Optional[str]: ...

    def swiglu(self, gate, up) -> Tensor: ...

    def swiglu_packed_unsupported(self, x) -> Optional[str]: ...

    def swiglu_packed(self, x) -> Tensor: ...


# ---- torch backend ------------------------------------------------------------------------------
class TorchBackend:
    """``F.scaled_dot_product_attention`` where it can express the call; eager SwiGLU."""

    name = "torch"

    def unavailable_reason(self):
        return None

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes):
        if causal and q.shape[2] > k.shape[2]:
            return "causal with T_q > T_k has fully masked rows, which SDPA turns into NaN"
        if q.shape[1] != k.shape[1] and not _SDPA_HAS_GQA:
            return "this torch's SDPA has no enable_gqa"
        return None

    def attention(self, q, k, v, causal, scale, alibi_slopes):
        t_q, t_k = q.shape[2], k.shape[2]
        kwargs = {"scale": scale}
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        mask = None
        is_causal = False
        if alibi_slopes is not None:
            mask = reference.alibi_bias(alibi_slopes, t_q, t_k, dtype=torch.float32)
            if causal:
                mask = mask.masked_fill(~reference.causal_mask(t_q, t_k, q.device), float("-inf"))
            mask = mask.to(q.dtype).unsqueeze(0)  # (1, H, T_q, T_k)
        elif causal and t_q == t_k:
            is_causal = True
        elif causal and t_q > 1:  # bottom-right diagonal; T_q == 1 sees every key
            mask = reference.causal_mask(t_q, t_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              **kwargs)

    def swiglu_unsupported(self, gate, up):
        return None

    def swiglu(self, gate, up):
        return F.silu(gate) * up

    def swiglu_packed_unsupported(self, x):
        return None

    def swiglu_packed(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _sdpa_has_gqa() -> bool:
    import inspect
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtin without a signature: torch >= 2.5 has it
        return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


_SDPA_HAS_GQA = _sdpa_has_gqa()
TORCH_BACKEND = TorchBackend()


# ---- backend registry ---------------------------------------------------------------------------
# The in-process backends are loaded from the start: torch.compile cannot trace the lazy import.
_loaded: dict = {"reference": reference.BACKEND, "torch": TORCH_BACKEND}
_load_errors: dict = {}
_logged: set = set()


def _import_backend(name: str) -> Backend:
    """The compiled backends, imported on first use (so `import fastlm` never pays for triton or
    the C++ extension)."""
    if name == "triton":
        from ._triton import BACKEND as triton_backend
        return triton_backend
    if name == "cuda":
        from ._ext import CUDA_BACKEND
        return CUDA_BACKEND
    if name == "cpp":
        from ._ext import CPP_BACKEND
        return CPP_BACKEND
    raise ValueError(f"unknown backend {name!r}")


def _load(name: str) -> Optional[Backend]:
    """The backend object, or None (with the reason recorded) when it cannot be imported."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        obj = _import_backend(name)
    except Exception as e:  # ImportError, missing symbols, a broken build: all mean unavailable
        _load_errors[name] = f"{type(e).__name__}: {e}".splitlines()[0]
        return None
    _loaded[name] = obj
    return obj


def load_backends(check_availability: bool = False) -> None:
    """Import every backend now (``torch.compile`` cannot trace the lazy imports of a first call);
    with ``check_availability`` also run their availability checks (triton's imports triton)."""
    for name in BACKENDS:
        _load(name)
    if check_availability:
        backend_status()


def _unavailable(name: str) -> Optional[str]:
    obj = _load(name)
    if obj is None:
        return _load_errors[name]
    return obj.unavailable_reason()


def backend_status() -> dict:
    """``{backend: None if usable here else 'reason'}`` for every backend."""
    return {name: _unavailable(name) for name in BACKENDS}


def available_backends() -> list:
    return [name for name, why in backend_status().items() if why is None]


def _log_once(msg: str):
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


def resolve_backend(op: str, backend: str, device_type: str, unsupported, order=None) -> object:
    """Pick the backend object for one call.

    ``unsupported(obj)`` returns None when ``obj`` can run the call, else a reason; ``order`` (a
    tuple of names) replaces the ``(op, device)`` preference list of :data:`_AUTO_ORDER`.
    Explicit backends raise :class:`BackendUnavailableError` with the reason; ``auto`` falls through
    its preference list, logging (once) each preferred backend it had to skip.
    """
    if backend == "auto":
        backend = os.environ.get("FASTLM_BACKEND", "auto").strip().lower() or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
        why = _unavailable(backend)
        if why is None:
            obj = _loaded[backend]
            why = unsupported(obj)
            if why is None:
                return obj
        raise BackendUnavailableError(f"fastlm {op}: backend {backend!r} cannot run this call: {why}")
    skipped = []
    for name in order or _AUTO_ORDER.get((op, device_type), _AUTO_DEFAULT):
        why = _unavailable(name)
        if why is None:
            obj = _loaded[name]
            why = unsupported(obj)
            if why is None:
                if skipped:
                    _log_once(f"fastlm {op} on {device_type}: using backend {name!r} "
                              f"({'; '.join(skipped)})")
                return obj
        skipped.append(f"{name} skipped: {why}")
    raise BackendUnavailableError(f"fastlm {op}: no backend can run this call ({'; '.join(skipped)})")


# ---- public ops ---------------------------------------------------------------------------------
def _check_attention(q, k, v, alibi_slopes):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    b, h, t_q, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ ({tuple(k.shape)} vs {tuple(v.shape)})")
    bk, h_kv, t_k, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch or head dim")
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of kv heads ({h_kv})")
    if t_q == 0 or t_k == 0 or d == 0 or b == 0 or h == 0:
        raise ValueError(f"attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.shape != (h,):
            shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
            raise ValueError(f"attention: alibi_slopes must be a tensor of shape ({h},), got {shape}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"attention: alibi_slopes on {alibi_slopes.device}, q on {q.device}")


def _cpu_attention_order(q, k, v, causal, alibi_slopes):
    """auto's preference for one CPU attention call (None: the default ``torch, cpp, reference``).

    Measured (benchmarks/REPORT.md, 2-core AMD EPYC): for causal float32/float64 calls with keys
    short enough for the C++ kernel's BLAS path (``T_k <= CPP_BACKEND.gemm_max_tk``, 512) the C++
    kernel beats SDPA's CPU flash kernel (forward+backward 1.2-2.3x at T=128-512, forward 1.1-1.5x);
    non-causal calls (SDPA's forward is faster there), single-query decoding steps and longer keys
    stay on SDPA. In bfloat16/float16 the C++ kernel's fused backward wins training calls
    (3.6-4.2x there, 2.3x on an AMD EPYC), where SDPA falls back to slow reduced-precision math."""
    if q.device.type != "cpu":
        return None
    if q.dtype in (torch.float32, torch.float64):
        cpp = _load("cpp")
        if causal and cpp is not None and q.size(-2) > 1 and k.size(-2) <= getattr(cpp, "gemm_max_tk", 0):
            return ("cpp", "torch", "reference")
        return None
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if q.dtype in (torch.bfloat16, torch.float16):
        return ("cpp", "torch", "reference")
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
              alibi_slopes: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention ``softmax(q k^T * scale + bias) v``.

    Args:
        q: ``(B, H, T_q, D)``; any strides (e.g. a ``(B, T, H, D)`` tensor ``.transpose(1, 2)``).
        k, v: ``(B, H_kv, T_k, D)`` with ``H % H_kv == 0`` (grouped-query attention: query head
            ``h`` uses kv head ``h // (H // H_kv)``).
        causal: mask future keys. The diagonal is aligned **bottom-right**: query ``i`` sits at key
            position ``i + T_k - T_q`` and sees keys ``j <= i + T_k - T_q``, which is what
            incremental decoding with a KV cache needs. (SDPA's ``is_causal`` is top-left; they
            agree when ``T_q == T_k``.) A query row that sees no key (``T_q > T_k``) outputs zeros.
        scale: multiplier of ``q k^T``; default ``1 / sqrt(D)``.
        alibi_slopes: ``(H,)`` tensor; adds ``-slope_h * |i + T_k - T_q - j|`` to the scores
            (FlashAttention's definition), with or without ``causal``.
        backend: ``auto`` | ``reference`` | ``torch`` | ``triton`` | ``cuda`` | ``cpp``.

    Returns:
        ``(B, H, T_q, D)`` in q's dtype. Differentiable with respect to q, k and v.
    """
    obj, scale, alibi_slopes = _attention_backend(q, k, v, causal, scale, alibi_slopes, backend)
    return obj.attention(q, k, v, causal, scale, alibi_slopes)


def _attention_backend(q, k, v, causal, scale, alibi_slopes, backend):
    _check_attention(q, k, v, alibi_slopes)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float()
    obj = resolve_backend("attention", backend, q.device.type,
                          lambda b: b.attention_unsupported(q, k, v, causal, scale, alibi_slopes),
                          order=_cpu_attention_order(q, k, v, causal, alibi_slopes))
    return obj, scale, alibi_slopes


def attention_backend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
                      alibi_slopes: Optional[Tensor] = None, backend: str = "auto") -> str:
    """The name of the backend :func:`attention` would run for this call (same arguments; the
    choice of ``auto`` depends on the device, dtype, options and whether a gradient is needed)."""
    return _attention_backend(q, k, v, causal, scale, alibi_slopes, backend)[0].name


def attention_qkv(qkv: Tensor, n_head: int, n_kv_head: Optional[int] = None, *, rope=None, causal: bool = True,
                  scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                  backend: str = "auto") -> Tensor:
    """Self-attention on a packed projection, as the model computes it: ``qkv`` ``(B, T, (H + 2 H_kv) D)``
    holds ``[q heads | k heads | v heads]`` per token; ``rope = (cos, sin)``, each ``(T, D/2)``, rotates
    q and k first (:func:`fastlm.model.apply_rope`'s half-split pairing). Returns ``(B, T, H D)``.

    Equal to splitting, rotating and calling :func:`attention` on the ``(B, H, T, D)`` views (what it
    does for every backend but one): where :func:`attention` would run ``cpp`` on a causal
    float32/float64 call of at most ``gemm_max_tk`` tokens, one fused C++ op reads ``qkv`` in place,
    rotates q/k inside, writes ``(B, T, H D)`` and returns ``d(qkv)`` in the backward, so the rotated
    copy, the split's concatenation and the layout copies of the composed path never happen.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        raise ValueError(f"attention_qkv: qkv must be a (B, T, (H + 2 H_kv) D) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    H = int(n_head)
    Hkv = H if n_kv_head is None else int(n_kv_head)
    if H <= 0 or Hkv <= 0 or H % Hkv:
        raise ValueError(f"attention_qkv: n_head ({H}) must be a positive multiple of n_kv_head ({Hkv})")
    B, T, W = qkv.shape
    if W % (H + 2 * Hkv):
        raise ValueError(f"attention_qkv: width {W} is not ({H} + 2 * {Hkv}) heads of one size")
    D = W // (H + 2 * Hkv)
    qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
    qk = qk.view(B, T, H + Hkv, D)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        if D % 2 or tuple(cos.shape) != (T, D // 2) or tuple(sin.shape) != (T, D // 2):
            raise ValueError(f"attention_qkv: rope tables must be (T, D/2) = ({T}, {D // 2}) with an even "
                             f"head dim, got {tuple(cos.shape)} / {tuple(sin.shape)} (D={D})")
    if causal and _fused_qkv_runs(qkv, qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v, scale,
                                  alibi_slopes, backend):
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        cos, sin = rope if rope is not None else (None, None)
        return torch.ops.fastlm.attention_qkv_fwd(qkv, H, Hkv, cos, sin, scale, alibi_slopes)[0]
    if rope is not None:
        from .model import apply_rope  # (model imports ops)
        cos, sin = rope
        qk = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))
    q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # strided views: no copy
    y = attention(q, k, v, causal=causal, scale=scale, alibi_slopes=alibi_slopes, backend=backend)
    return y.transpose(1, 2).reshape(B, T, H * D)


def _fused_qkv_runs(qkv, q, k, v, scale, alibi_slopes, backend) -> bool:
    """True when :func:`attention_qkv` takes the fused C++ op: the call :func:`attention` would make
    on the (unrotated) views ``q, k, v`` resolves to ``cpp`` and fits the op (CPU, float32/float64,
    1 < T <= gemm_max_tk)."""
    T = qkv.size(1)
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.float64) or T <= 1:
        return False
    cpp = _load("cpp")
    if cpp is None or T > getattr(cpp, "gemm_max_tk", 0) or qkv.stride(-1) != 1:
        return False
    return attention_backend(q, k, v, causal=True, scale=scale, alibi_slopes=alibi_slopes, backend=backend) == "cpp"


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` (SwiGLU's gating), any shape, float16/bfloat16/float32/float64.

    ``gate`` and ``up`` must share shape, dtype and device. Returns gate's dtype; differentiable.
    """
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"swiglu: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate and up dtypes differ ({gate.dtype}, {up.dtype})")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate on {gate.device}, up on {up.device}")
    obj = resolve_backend("swiglu", backend, gate.device.type, lambda b: b.swiglu_unsupported(gate, up))
    return obj.swiglu(gate, up)


def swiglu_packed(x: Tensor, *, backend: str = "auto") -> Tensor:
    """``silu(x[..., :H]) * x[..., H:]`` for ``x`` of shape ``[..., 2H]`` (gate and up packed along
    the last dim, as one fused ``Linear(n_embd, 2H)`` produces them). Returns ``[..., H]`` in x's
    dtype; differentiable (the gradient is one ``[..., 2H]`` tensor). Equal to
    ``swiglu(*x.chunk(2, -1))``, but the ``cpp`` and ``triton`` kernels read the halves in place and
    write the gradient without a concatenation.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"swiglu_packed: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"swiglu_packed: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(f"swiglu_packed: the last dim of x must be even ([gate | up]), got shape {tuple(x.shape)}")
    obj = resolve_backend("swiglu_packed", backend, x.device.type, lambda b: b.swiglu_packed_unsupported(x))
    return obj.swiglu_packed(x)
