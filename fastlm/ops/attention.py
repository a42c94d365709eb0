"""Attention ops of :mod:`fastlm.ops`: :func:`attention` on SDPA's ``(B, H, T, D)`` layout and
:func:`attention_qkv` on the model's packed projection."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastlm.ops.backend import _load, resolve_backend
from fastlm.ops.masks import check_masks
from fastlm.ops.positions import apply_rope

__all__ = ["attention", "attention_backend", "attention_qkv"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _cpu_attention_order(q, k, v, causal, alibi_slopes, masked=False):
    """auto's preference for one CPU attention call (None: the default ``torch, cpp, reference``).

    Measured (benchmarks/REPORT.md, 2-core AMD EPYC): for causal float32/float64 calls with keys
    short enough for the C++ kernel's BLAS path (``T_k <= CPP_BACKEND.gemm_max_tk``, 512) the C++
    kernel beats SDPA's CPU flash kernel (forward+backward 1.2-2.3x at T=128-512, forward 1.1-1.5x);
    non-causal calls (SDPA's forward is faster there), single-query decoding steps and longer keys
    stay on SDPA. In bfloat16/float16 the C++ kernel's fused backward wins training calls
    (3.6-4.2x there, 2.3x on an AMD EPYC), where SDPA falls back to slow reduced-precision math."""
    if q.device.type != "cpu":
        return None
    if masked:  # a window or documents: the C++ kernel skips the hidden tiles, SDPA computes a dense mask
        return ("cpp", "torch", "reference")
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


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention ``softmax(q k^T * scale + bias) v``.

    Args:
        q: ``(B, H, T_q, D)``; any strides (e.g. a ``(B, T, H, D)`` tensor ``.transpose(1, 2)``).
        k, v: ``(B, H_kv, T_k, D)`` with ``H % H_kv == 0`` (grouped-query attention: query head
            ``h`` uses kv head ``h // (H // H_kv)``).
        causal: mask future keys. The diagonal is aligned **bottom-right**: query ``i`` sits at key
            position ``i + T_k - T_q`` and sees keys ``j <= i + T_k - T_q``, which is what
            incremental decoding with a KV cache needs. (SDPA's ``is_causal`` is top-left; they
            agree when ``T_q == T_k``.) A query row that sees no key (``T_q > T_k``) outputs zeros.
        window: sliding window of ``w >= 1`` keys (None: no window): with ``causal``, query ``i``
            sees keys ``i' - w < j <= i'`` where ``i' = i + T_k - T_q``; without, ``|i' - j| < w``.
        segment_ids: ``(B, T_k)`` int32/int64, non-decreasing along T (documents packed left to
            right): query ``i`` sees key ``j`` only when the ids of ``i'`` and ``j`` are equal. The
            whole rule, with a picture: :mod:`fastlm.ops.masks`. The fused kernels skip every tile
            these masks hide.
        scale: multiplier of ``q k^T``; default ``1 / sqrt(D)``.
        alibi_slopes: ``(H,)`` tensor; adds ``-slope_h * |i + T_k - T_q - j|`` to the scores
            (FlashAttention's definition), with or without ``causal``.
        backend: ``auto`` | ``reference`` | ``torch`` | ``triton`` | ``cuda`` | ``cpp``.

    Returns:
        ``(B, H, T_q, D)`` in q's dtype. Differentiable with respect to q, k and v.
    """
    obj, scale, alibi_slopes, masks = _attention_backend(
        q, k, v, causal, scale, alibi_slopes, backend, window, segment_ids
    )
    return obj.attention(q, k, v, causal, scale, alibi_slopes, **masks)


def _attention_backend(q, k, v, causal, scale, alibi_slopes, backend, window=None, segment_ids=None, order=None):
    """Validate one call -> (backend object, scale, slopes, the mask keywords for the backend); ``order``
    overrides auto's CPU preference."""
    _check_attention(q, k, v, alibi_slopes)
    window = check_masks(q, k, causal, window, segment_ids)
    masks = {} if window is None and segment_ids is None else {"window": window, "segment_ids": segment_ids}
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float()
    obj = resolve_backend(
        "attention",
        backend,
        q.device.type,
        lambda b: b.attention_unsupported(q, k, v, causal, scale, alibi_slopes, **masks),
        order=order or _cpu_attention_order(q, k, v, causal, alibi_slopes, bool(masks)),
    )
    return obj, scale, alibi_slopes, masks


def attention_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    backend: str = "auto",
) -> str:
    """The name of the backend :func:`attention` would run for this call (same arguments; the
    choice of ``auto`` depends on the device, dtype, options and whether a gradient is needed)."""
    return _attention_backend(q, k, v, causal, scale, alibi_slopes, backend, window, segment_ids)[0].name


def attention_qkv_bf16(qkv: Tensor, backend: str = "auto") -> bool:
    """Whether :func:`attention_qkv` computes this bfloat16 ``qkv`` with bf16 products itself, float32 sums
    (the ``cpp`` backend on a CPU with AVX512-BF16, for 2..``gemm_max_tk`` tokens). Everywhere else a
    bfloat16 ``qkv`` on the CPU is computed in float32, so a caller may as well upcast it once, early."""
    if qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or backend not in ("auto", "cpp"):
        return False
    cpp = _load("cpp")
    return (
        cpp is not None
        and cpp.unavailable_reason() is None
        and 1 < qkv.size(1) <= getattr(cpp, "gemm_max_tk", 0)
        and bool(getattr(cpp, "bf16_products", lambda: False)())
    )


def attention_qkv(
    qkv: Tensor,
    n_head: int,
    n_kv_head: Optional[int] = None,
    *,
    rope=None,
    causal: bool = True,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Self-attention on a packed projection, as the model computes it: ``qkv`` ``(B, T, (H + 2 H_kv) D)``
    holds ``[q heads | k heads | v heads]`` per token; ``rope = (cos, sin)``, each ``(T, D/2)``, rotates
    q and k first (:func:`fastlm.ops.positions.apply_rope`'s half-split pairing). Returns ``(B, T, H D)``.
    ``window`` and ``segment_ids`` ``(B, T)`` as in :func:`attention`.

    Equal to splitting, rotating and calling :func:`attention` on the ``(B, H, T, D)`` views (the
    composed form). A backend with a fused form of the whole op runs it instead where the call
    :func:`attention` would make on the unrotated views resolves to that backend: today ``cpp`` on
    causal float32/float64 calls of at most ``gemm_max_tk`` tokens, one C++ op that reads ``qkv`` in
    place, rotates q/k inside, writes ``(B, T, H D)`` and returns ``d(qkv)`` in the backward, so the
    rotated copy, the split's concatenation and the layout copies of the composed form never happen.
    A bfloat16 ``qkv`` takes it with bf16 products and float32 sums where :func:`attention_qkv_bf16`
    says so (AVX512-BF16; with or without a gradient), elsewhere in training on its float32 upcast.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 3:
        raise ValueError(
            f"attention_qkv: qkv must be a (B, T, (H + 2 H_kv) D) tensor, got "
            f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}"
        )
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
            raise ValueError(
                f"attention_qkv: rope tables must be (T, D/2) = ({T}, {D // 2}) with an even "
                f"head dim, got {tuple(cos.shape)} / {tuple(sin.shape)} (D={D})"
            )
    obj, scale, alibi_slopes, masks = _attention_backend(
        qk[:, :, :H].transpose(1, 2),
        qk[:, :, H:].transpose(1, 2),
        v,
        causal,
        scale,
        alibi_slopes,
        backend,
        window,
        segment_ids,
        # bf16 on AVX512-BF16: the fused op's own bf16 products, with or without a gradient
        order=("cpp", "torch", "reference") if causal and attention_qkv_bf16(qkv, backend) else None,
    )
    if obj.attention_qkv_unsupported(qkv, H, Hkv, rope, causal, scale, alibi_slopes, **masks) is None:
        return obj.attention_qkv(qkv, H, Hkv, rope, causal, scale, alibi_slopes, **masks)
    if rope is not None:
        qk = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))
    q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # strided views: no copy
    y = obj.attention(q, k, v, causal, scale, alibi_slopes, **masks)
    return y.transpose(1, 2).reshape(B, T, H * D)
