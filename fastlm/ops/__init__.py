"""fastlm's public ops: one API, several backends.

* :func:`attention` -- scaled dot-product attention on SDPA's ``(B, H, T, D)`` layout.
* :func:`swiglu` -- ``silu(gate) * up``.
* :func:`swiglu_packed` -- the same on one ``[..., 2 * hidden]`` tensor holding ``[gate | up]``
  (what a fused up-projection produces; the model's SwiGLU MLP uses it).
* :func:`attention_qkv` -- self-attention on the model's packed ``qkv`` projection, with RoPE.
* :func:`qk_norm_value_mix` -- QK-norm and the value-embedding mix on the packed ``qkv`` (the step
  between the model's qkv projection and :func:`attention_qkv`).
* :func:`layer_norm` -- LayerNorm / RMSNorm over the last dim, optionally writing bfloat16 from
  float32 in the same pass (the model's pre-norms in the CPU autocast step).
* :func:`muon_step` -- one step of the Muon optimizer on a list of matrices (:func:`muon_bf16_products`:
  whether its bfloat16 Newton-Schulz runs fused here).
* :func:`bpe_train` -- the merge loop of byte-level BPE training.

Backends (``backend=`` argument, or the ``FASTLM_BACKEND`` environment variable, which overrides
``"auto"``):

========== ==========================================================================
reference  explicit PyTorch math with hand-written backward (:mod:`fastlm.ops.reference`)
torch      ``F.scaled_dot_product_attention`` / eager ``F.silu(g) * u``
triton     fused Triton kernels (:mod:`fastlm.kernels`), CUDA tensors (or TRITON_INTERPRET=1)
cuda       C++/CUDA kernels in ``fastlm._C`` (CUDA tensors)
cpp        C++ CPU kernels in ``fastlm._C`` (CPU tensors)
========== ==========================================================================

``auto`` walks a per-device preference list and takes the first backend that is available and
supports the call; if it has to skip a preferred one it logs why, once. The registry and the
:class:`Backend` protocol are in :mod:`fastlm.ops.backend`; each op's public function validates its
arguments once and dispatches there (:mod:`fastlm.ops.attention`, :mod:`fastlm.ops.swiglu`,
:mod:`fastlm.ops.muon`, :mod:`fastlm.ops.bpe`, :mod:`fastlm.ops.qk_norm`, :mod:`fastlm.ops.norm`).
Position helpers (RoPE, ALiBi slopes) are in
:mod:`fastlm.ops.positions`.
"""

from __future__ import annotations

from fastlm.errors import BackendUnavailableError
from fastlm.ops import backend as _backend
from fastlm.ops import reference, torch_backend
from fastlm.ops.attention import attention, attention_backend, attention_qkv, attention_qkv_bf16
from fastlm.ops.backend import (
    BACKENDS,
    Backend,
    available_backends,
    backend_details,
    backend_status,
    load_backends,
    resolve_backend,
)
from fastlm.ops.bpe import bpe_train
from fastlm.ops.muon import muon_bf16_products, muon_step
from fastlm.ops.norm import layer_norm
from fastlm.ops.qk_norm import qk_norm_value_mix
from fastlm.ops.swiglu import swiglu, swiglu_packed

__all__ = [
    "attention",
    "attention_backend",
    "attention_qkv",
    "attention_qkv_bf16",
    "swiglu",
    "swiglu_packed",
    "qk_norm_value_mix",
    "layer_norm",
    "muon_step",
    "muon_bf16_products",
    "bpe_train",
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_details",
    "backend_status",
    "load_backends",
    "resolve_backend",
]

# the in-process backends, registered from the start (torch.compile cannot trace a lazy import)
_backend.register(reference.BACKEND)
_backend.register(torch_backend.BACKEND)
