"""What a backend of :mod:`fastlm.ops` is: the :class:`Backend` protocol, and :class:`BackendBase` with
the defaults of the optional capabilities. (The registry that picks one is :mod:`fastlm.ops.backend`.)"""

from __future__ import annotations

from typing import Optional, Protocol

from fastlm.ops import composed

__all__ = ["Backend", "BackendBase"]


class Backend(Protocol):
    """What every backend object provides. ``*_unsupported`` return None when the backend can run
    that call (arguments already validated by the public op), else a one-line reason. The last four
    pairs are optional capabilities, which a backend overrides only where it has a compiled entry
    point: :class:`BackendBase` refuses ``attention_qkv`` (the public op then composes it from
    :func:`fastlm.ops.attention`), ``muon_step`` and ``bpe_train`` (another backend runs them), and
    runs the composed forms of ``qk_norm_value_mix`` and ``layer_norm`` itself (:mod:`fastlm.ops.composed`)."""

    name: str

    def unavailable_reason(self) -> Optional[str]: ...

    def attention_unsupported(
        self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None
    ) -> Optional[str]: ...

    def attention(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None): ...

    def swiglu_unsupported(self, gate, up) -> Optional[str]: ...

    def swiglu(self, gate, up): ...

    def swiglu_packed_unsupported(self, x) -> Optional[str]: ...

    def swiglu_packed(self, x): ...

    def attention_qkv_unsupported(
        self, qkv, n_head, n_kv_head, rope, causal, scale, alibi_slopes, window=None, segment_ids=None
    ) -> Optional[str]: ...

    def attention_qkv(
        self, qkv, n_head, n_kv_head, rope, causal, scale, alibi_slopes, window=None, segment_ids=None
    ): ...

    def qk_norm_value_mix_unsupported(
        self, qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx=None
    ) -> Optional[str]: ...

    def qk_norm_value_mix(
        self, qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx=None
    ): ...

    def layer_norm_unsupported(self, x, weight, bias, residual, norm, eps, out_dtype) -> Optional[str]: ...

    def layer_norm(self, x, weight, bias, residual, norm, eps, out_dtype): ...

    def muon_step_unsupported(self, params, grads, momentum_buffers, ns_dtype) -> Optional[str]: ...

    def muon_step(
        self,
        params,
        grads,
        momentum_buffers,
        *,
        lr,
        momentum,
        nesterov,
        weight_decay,
        ns_steps,
        ns_coefficients,
        ns_dtype,
        eps,
    ) -> None: ...

    def bpe_train_unsupported(self) -> Optional[str]: ...

    def bpe_train(self, words, counts, num_merges) -> list: ...

    def details(self) -> Optional[str]: ...


class BackendBase:
    """Defaults of the optional capabilities: refused, so the public op runs its composed form
    (``attention_qkv``: split, rotate, :func:`fastlm.ops.attention`) or another backend."""

    name = "base"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def attention_qkv_unsupported(
        self, qkv, n_head, n_kv_head, rope, causal, scale, alibi_slopes, window=None, segment_ids=None
    ):
        return f"backend {self.name!r} has no fused qkv attention (the composed form runs)"

    def qk_norm_value_mix_unsupported(
        self, qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx=None
    ):
        return None  # every backend runs the composed form unless it has a kernel

    def qk_norm_value_mix(self, qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx=None):
        """The composed form (PyTorch ops on any device): :func:`fastlm.ops.composed.qk_norm_value_mix`."""
        return composed.qk_norm_value_mix(
            qkv, n_head, n_kv_head, q_gain, k_gain, norm, eps, ve, ve_mix, out_dtype, ve_idx
        )

    def layer_norm_unsupported(self, x, weight, bias, residual, norm, eps, out_dtype):
        return None  # every backend runs the composed form unless it has a kernel

    def layer_norm(self, x, weight, bias, residual, norm, eps, out_dtype):
        """The composed form (PyTorch ops on any device): :func:`fastlm.ops.composed.layer_norm`."""
        return composed.layer_norm(x, weight, bias, residual, norm, eps, out_dtype)

    def muon_step_unsupported(self, params, grads, momentum_buffers, ns_dtype):
        return f"backend {self.name!r} has no Muon step"

    def bpe_train_unsupported(self):
        return f"backend {self.name!r} has no BPE trainer"

    def details(self) -> Optional[str]:
        """Extra lines for ``python -m fastlm.info`` (where the code comes from, how it was built)."""
        return None
