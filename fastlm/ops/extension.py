"""Python side of the C++/CUDA extension ``fastlm._C``.

* ``torch.library`` fake (shape-only) kernels and autograd formulas for the ops that
  ``csrc/ops.cpp`` defines (``fastlm::attention_fwd/bwd``, ``fastlm::swiglu_fwd/bwd``), so they work
  under ``torch.compile`` and pass ``torch.library.opcheck``;
* the ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors) backend objects used by :mod:`fastlm.ops`.

The package imports and works without ``_C`` (pure-Python install): both backends then report it
as their unavailable reason.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastlm.ops._autograd import (
    register_attention_autograd,
    register_elementwise_autograd,
)
from fastlm.ops._buildinfo import CPU_LEVEL_FLAGS, cpu_flags, csrc_hash, embedded_csrc_hash
from fastlm.ops.protocol import BackendBase
from fastlm.ops.reference_muon import resolve_ns_dtype


def build_mismatch(level: str, flags) -> Optional[str]:
    """Why a ``_C`` compiled for vector ``level`` must not run on a CPU with ``flags`` (None: it may,
    or the flags are unknown): a build made on another machine, e.g. through a shared wheel cache."""
    missing = [f for f in CPU_LEVEL_FLAGS.get(level, ()) if flags is not None and f not in flags]
    if not missing:
        return None
    return (
        f"fastlm._C was compiled for {level} but this CPU lacks {', '.join(missing)}: rebuild it on this "
        f"machine (pip install --no-cache-dir --force-reinstall --no-deps fastlm, or FASTLM_CPU_AVX512=0 / "
        f"FASTLM_CPU_AVX2=0 for a portable build)"
    )


def _installed_build():
    """``(module, None)`` or ``(None, reason)``: in a source checkout whose ``fastlm/`` holds no built
    ``_C`` (``pip install .`` then ``python -m fastlm.train`` at the repository root, where the
    checkout's ``fastlm/`` comes first on sys.path), the installed distribution's ``_C``, provided it
    was built from this checkout's exact ``csrc/`` (compared before the library is loaded)."""
    import importlib.metadata
    import importlib.util
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parents[1]  # fastlm/
    csrc = package.parent / "csrc"
    if not csrc.is_dir():
        return None, None
    try:
        files = importlib.metadata.distribution("fastlm").files or []
    except importlib.metadata.PackageNotFoundError:
        return None, None
    for f in files:
        if f.parts[:1] != ("fastlm",) or not f.name.startswith("_C.") or f.suffix not in (".so", ".pyd"):
            continue
        path = Path(f.locate()).resolve()
        if path.parent == package or not path.is_file():
            continue
        if embedded_csrc_hash(str(path)) != csrc_hash(str(csrc)):
            return None, (
                f"the installed {path.name} was built from other csrc/ sources than this checkout's "
                f"(pip install . again, or pip install -e . to build it in the tree)"
            )
        spec = importlib.util.spec_from_file_location("fastlm._C", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastlm._C"] = module
        spec.loader.exec_module(module)
        return module, None
    return None, None


try:
    from fastlm import _C  # registers the torch.ops.fastlm.* schemas and kernels

    _IMPORT_ERROR = None
except ImportError as e:  # pure-Python install, a broken build, or a checkout run beside an install
    _C, _why = _installed_build()
    _IMPORT_ERROR = None if _C is not None else f"fastlm._C not importable ({_why or e})"
if _C is not None:
    _IMPORT_ERROR = build_mismatch(getattr(_C, "cpu_capability", lambda: "DEFAULT")(), cpu_flags())
    if _IMPORT_ERROR:
        _C = None

# Whether the fused qkv attention computes a bf16 qkv with bf16 products (AVX512-BF16; FASTLM_CPU_BF16_DOT=0
# turns them off): read once and kept here, so that a traced model (torch.compile) reads a Python bool.
_BF16_DOT = _C is not None and bool(getattr(_C, "cpu_bf16_dot", lambda: False)())


def cpu_bf16_products(enable: Optional[bool] = None) -> bool:
    """Whether the ``cpp`` fused qkv attention computes a bfloat16 ``qkv`` with bf16 products (float32
    sums) rather than on its float32 upcast: on CPUs with AVX512-BF16, unless ``FASTLM_CPU_BF16_DOT=0``.
    ``enable`` switches them on (where the CPU has them) or off; returns the state after the call."""
    global _BF16_DOT
    if enable is not None and _C is not None and hasattr(_C, "cpu_bf16_dot"):
        _BF16_DOT = bool(_C.cpu_bf16_dot(bool(enable)))
    return _BF16_DOT


_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:
    _ops = torch.ops.fastlm

    # ---- fake kernels: output metadata only (the real kernels return contiguous tensors) -------
    @torch.library.register_fake("fastlm::attention_fwd")
    def _attention_fwd_fake(q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        b, h, t_q, d = q.shape
        out = q.new_empty((b, h, t_q, d))
        lse = q.new_empty((b, h, t_q), dtype=_lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("fastlm::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, causal, scale, alibi_slopes, window=None, segment_ids=None):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fastlm::attention_qkv_fwd")
    def _attention_qkv_fwd_fake(qkv, n_head, n_kv_head, cos, sin, scale, alibi_slopes, window=None, segment_ids=None):
        b, t, w = qkv.shape
        d = w // (n_head + 2 * n_kv_head)
        return qkv.new_empty((b, t, n_head * d)), qkv.new_empty((b, n_head, t), dtype=_lse_dtype(qkv.dtype))

    @torch.library.register_fake("fastlm::attention_qkv_bwd")
    def _attention_qkv_bwd_fake(
        dout, qkv, out, lse, n_head, n_kv_head, cos, sin, scale, alibi_slopes, window=None, segment_ids=None
    ):
        return qkv.new_empty(qkv.shape)

    @torch.library.register_fake("fastlm::qk_norm_value_mix_fwd")
    def _qk_norm_value_mix_fwd_fake(
        qkv, n_head, n_kv_head, q_gain, k_gain, rms, eps, ve, ve_mix, out_dtype=None, ve_idx=None
    ):
        return qkv.new_empty(qkv.shape, dtype=out_dtype or qkv.dtype)

    @torch.library.register_fake("fastlm::qk_norm_value_mix_bwd")
    def _qk_norm_value_mix_bwd_fake(dout, qkv, n_head, n_kv_head, q_gain, k_gain, rms, eps, ve, ve_mix, ve_idx=None):
        def like(t):
            return t.new_empty(t.shape) if t is not None else qkv.new_empty((0,))

        return qkv.new_empty(qkv.shape), like(q_gain), like(k_gain), like(ve), like(ve_mix)

    @torch.library.register_fake("fastlm::layer_norm_fwd")
    def _layer_norm_fwd_fake(x, weight, bias, rms, eps, out_dtype=None, residual=None):
        out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
        return out, x.new_empty(x.shape if residual is not None else (0,))

    @torch.library.register_fake("fastlm::layer_norm_bwd")
    def _layer_norm_bwd_fake(dout, x, weight, bias, rms, eps, dsum=None, residual_dtype=None):
        def like(t):
            return t.new_empty(t.shape) if t is not None else x.new_empty((0,))

        dres = x.new_empty(x.shape, dtype=residual_dtype) if residual_dtype is not None else x.new_empty((0,))
        return x.new_empty(x.shape), like(weight), like(bias), dres

    @torch.library.register_fake("fastlm::swiglu_fwd")
    def _swiglu_fwd_fake(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("fastlm::swiglu_bwd")
    def _swiglu_bwd_fake(dout, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    @torch.library.register_fake("fastlm::swiglu_packed_fwd")
    def _swiglu_packed_fwd_fake(x):
        torch._check(
            x.dim() >= 1 and x.shape[-1] % 2 == 0,
            lambda: f"swiglu_packed_fwd: the last dim of x must be even, got {tuple(x.shape)}",
        )
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("fastlm::swiglu_packed_bwd")
    def _swiglu_packed_bwd_fake(dout, x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::muon_step_")
    def _muon_step_fake(params, grads, momentum_buffers, *settings):  # in place: no outputs
        return None

    # ---- autograd ------------------------------------------------------------------------------
    register_attention_autograd("fastlm::attention_fwd", _ops.attention_bwd, contiguous_dout=True)
    # attention_qkv_fwd, qk_norm_value_mix_fwd and layer_norm_fwd: autograd registered in C++ (csrc/cpu)
    register_elementwise_autograd("fastlm::swiglu_fwd", _ops.swiglu_bwd)
    register_elementwise_autograd("fastlm::swiglu_packed_fwd", _ops.swiglu_packed_bwd)  # CUDA (CPU: AutogradCPU, C++)


def _has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "has_cuda", lambda: False)())


class _CppBackend(BackendBase):
    """C++ CPU kernels (csrc/cpu): CPU tensors, float32/float64/bfloat16/float16, any strides; the
    fused qkv attention, the Muon step and the BPE trainer."""

    name = "cpp"
    #: longest T_k whose float32/float64 attention runs through BLAS GEMMs (0: not in this build)
    gemm_max_tk = int(getattr(_C, "cpu_attention_gemm_max_tk", lambda: 0)()) if _C is not None else 0
    _device = "cpu"
    _dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def unavailable_reason(self):
        return _IMPORT_ERROR

    def _tensor_unsupported(self, *tensors):
        for t in tensors:
            if t.device.type != self._device:
                return f"needs {self._device} tensors, got {t.device}"
            if t.dtype not in self._dtypes:
                return f"dtype {t.dtype} not supported ({', '.join(str(d) for d in self._dtypes)})"
        return None

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        return self._tensor_unsupported(q, k, v)

    def attention(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        return _ops.attention_fwd(q, k, v, causal, scale, alibi_slopes, window, segment_ids)[0]

    def swiglu_unsupported(self, gate, up):
        return self._tensor_unsupported(gate, up)

    def swiglu(self, gate, up):
        return _ops.swiglu_fwd(gate, up)

    def swiglu_packed_unsupported(self, x):
        return self._tensor_unsupported(x)

    def swiglu_packed(self, x):
        """Reads ``[gate | up]`` in place (any row stride); the gradient is one fresh tensor."""
        return _ops.swiglu_packed_fwd(x)

    def attention_qkv_unsupported(
        self, qkv, n_head, n_kv_head, rope, causal, scale, alibi_slopes, window=None, segment_ids=None
    ):
        """The fused op takes causal CPU calls of 2..gemm_max_tk tokens with a contiguous last dim
        (the BLAS path's shapes): float32/float64, or bfloat16/float16 computed in float32 (the
        autocast training step's case: one upcast of qkv, one downcast of the output)."""
        if not causal:
            return "the fused qkv op is causal only"
        if qkv.device.type != "cpu" or qkv.dtype not in self._dtypes:
            return (
                f"the fused qkv op takes float32/float64/bfloat16/float16 CPU tensors, got {qkv.dtype} on {qkv.device}"
            )
        if not 1 < qkv.size(1) <= self.gemm_max_tk or qkv.stride(-1) != 1:
            return f"the fused qkv op takes 2..{self.gemm_max_tk} tokens with a contiguous last dim"
        return None

    def attention_qkv(self, qkv, n_head, n_kv_head, rope, causal, scale, alibi_slopes, window=None, segment_ids=None):
        cos, sin = rope if rope is not None else (None, None)
        x = qkv  # float32/float64, or bf16 with bf16 products (float32 sums)
        if qkv.dtype == torch.float16 or (qkv.dtype == torch.bfloat16 and not self.bf16_products()):
            x = qkv.float()  # the BLAS path is float32: compute there, return qkv's dtype
        out = _ops.attention_qkv_fwd(x, n_head, n_kv_head, cos, sin, scale, alibi_slopes, window, segment_ids)[0]
        return out.to(qkv.dtype)

    @staticmethod
    def bf16_products() -> bool:
        """Whether the fused qkv op computes a bfloat16 ``qkv`` with bf16 products (float32 sums; AVX512-BF16
        micro-kernels) rather than upcasting it to the float32 path: :func:`cpu_bf16_products`."""
        return _BF16_DOT

    def qk_norm_value_mix_unsupported(
        self, qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx=None
    ):
        """The fused op takes CPU tensors of float32/float64/bfloat16/float16 (the public op has
        checked the shapes and out_dtype)."""
        return self._tensor_unsupported(*(t for t in (qkv, q_gain, k_gain, ve, ve_mix) if t is not None))

    def qk_norm_value_mix(self, qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx=None):
        return _ops.qk_norm_value_mix_fwd(
            qkv, n_head, n_kv_head, q_gain, k_gain, norm == "rmsnorm", eps, ve, ve_mix, out_dtype, ve_idx
        )

    def layer_norm_unsupported(self, x, weight, bias, residual, norm, eps, out_dtype):
        """The fused op takes CPU tensors of float32/float64/bfloat16/float16 (the public op has
        checked the shapes and dtypes), with a residual of x's dtype or ``out_dtype``. Its autograd is
        C++ (csrc/cpu/layer_norm.cpp)."""
        if residual is not None and residual.dtype not in (x.dtype, out_dtype):
            return f"the fused op takes a residual of x's dtype or out_dtype, got {residual.dtype}"
        return self._tensor_unsupported(*(t for t in (x, weight, bias, residual) if t is not None))

    def layer_norm(self, x, weight, bias, residual, norm, eps, out_dtype):
        out, total = _ops.layer_norm_fwd(x, weight, bias, norm == "rmsnorm", eps, out_dtype, residual)
        return out if residual is None else (out, total)

    def muon_step_unsupported(self, params, grads, bufs, ns_dtype):
        """Why ``fastlm::muon_step_`` cannot take these lists (None: it can): CPU, one dtype of
        float32/float64 for all that is also the Newton-Schulz dtype (or float32 parameters with a
        bfloat16 Newton-Schulz, where :func:`cpu_bf16_products` is on: bf16 products, float32 sums),
        contiguous 2-D tensors, a grad and a buffer of each parameter's shape."""
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        if not self.gemm_max_tk:
            return "this build of fastlm._C has no BLAS to call"
        dtype = params[0].dtype if params else None
        if params[0].device.type != "cpu":
            return f"the op is CPU-only, the parameters are on {params[0].device}"
        ns = resolve_ns_dtype(ns_dtype, "cpu")
        if ns == torch.bfloat16 and dtype == torch.float32:
            if not cpu_bf16_products():
                return "a bfloat16 Newton-Schulz needs bf16 products (AVX512-BF16, FASTLM_CPU_BF16_DOT not 0)"
        elif ns != dtype:
            return f"the Newton-Schulz dtype ({ns_dtype}) must resolve to the parameters' dtype ({dtype}) on CPU"
        if dtype not in (torch.float32, torch.float64):
            return f"takes float32/float64 parameters, got {dtype}"
        if any(g.is_sparse for g in grads):
            return "sparse gradients"
        for p, g, b in zip(params, grads, bufs):
            for t in (p, g, b):
                if t.device.type != "cpu":
                    return f"needs cpu tensors, got {t.device}"
                if (
                    t.dtype != dtype
                    or t.shape != p.shape
                    or t.layout != torch.strided
                    or not t.is_contiguous()
                    or t.numel() == 0
                ):
                    return (
                        "needs non-empty contiguous tensors of one dtype, a grad and a buffer shaped like each "
                        "parameter"
                    )
        return None

    def muon_step(
        self, params, grads, bufs, *, lr, momentum, nesterov, weight_decay, ns_steps, ns_coefficients, ns_dtype, eps
    ):
        """One Muon step in place on ``params`` and ``bufs`` (see csrc/cpu/muon.cpp)."""
        _ops.muon_step_(
            params,
            grads,
            bufs,
            float(lr),
            float(momentum),
            bool(nesterov),
            float(weight_decay),
            int(ns_steps),
            [float(c) for c in ns_coefficients],
            float(eps),
            resolve_ns_dtype(ns_dtype, "cpu") == torch.bfloat16,
        )

    def bpe_train_unsupported(self):
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        return None if hasattr(_C, "bpe_train") else "this build of fastlm._C has no bpe_train"

    def bpe_train(self, words, counts, num_merges):
        return _C.bpe_train(words, counts, num_merges)

    def details(self):
        return f"fastlm._C {_C.__file__}, CPU kernels compiled for {_C.cpu_capability()}"


class _CudaBackend(_CppBackend):
    """CUDA kernels (csrc/cuda): tensor-core attention for fp16/bf16 with head dim 64 or 128 and a
    contiguous last dim; vectorised SwiGLU for fp16/bf16/fp32, whose packed form reads the two
    halves of ``[..., 2H]`` in place (``swiglu_packed`` is inherited: same op, CUDA dispatch)."""

    name = "cuda"
    _device = "cuda"
    _dtypes = (torch.float16, torch.bfloat16, torch.float32)
    attention_qkv_unsupported = BackendBase.attention_qkv_unsupported
    qk_norm_value_mix_unsupported = BackendBase.qk_norm_value_mix_unsupported  # the composed form
    qk_norm_value_mix = BackendBase.qk_norm_value_mix
    layer_norm_unsupported = BackendBase.layer_norm_unsupported  # the composed form
    layer_norm = BackendBase.layer_norm
    muon_step_unsupported = BackendBase.muon_step_unsupported
    bpe_train_unsupported = BackendBase.bpe_train_unsupported

    def details(self):
        return None

    def unavailable_reason(self):
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        if not _has_cuda_kernels():
            return "fastlm._C was built without CUDA kernels (FASTLM_CUDA=0 or no nvcc/CUDA torch)"
        if not torch.cuda.is_available():
            return "no CUDA device available"
        return None

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        for t in (q, k, v):
            if t.device.type != "cuda":
                return f"needs cuda tensors, got {t.device}"
        if q.dtype not in _CUDA_DTYPES:
            return f"attention kernel takes float16/bfloat16, got {q.dtype}"
        if q.shape[-1] not in _CUDA_HEAD_DIMS:
            return f"head dim {q.shape[-1]} not supported (only {_CUDA_HEAD_DIMS})"
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1:
                return f"{name} needs a contiguous last dim (stride {t.stride(-1)})"
            if any(st % 8 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1) or t.data_ptr() % 16:
                return f"{name} strides/pointer not 16-byte aligned"
        return None

    def swiglu_unsupported(self, gate, up):
        return self._tensor_unsupported(gate, up)


CPP_BACKEND = _CppBackend()
CUDA_BACKEND = _CudaBackend()
