"""``ops.qk_norm_value_mix`` (QK-norm + the value-embedding mix on the packed qkv, the default model's
step between its qkv projection and attention): the fused C++ op (``cpp``, CPU) vs the composed form
(``torch``: split, ``F.layer_norm`` per head view, mix, concatenation: what the model ran before).

Shape: the default CPU run's (batch 16, block 128, 3 heads of 32, value embeddings) on CPU; on CUDA
no backend has a kernel for it (every backend runs the composed form), so only ``torch`` runs there
at GPT-2 small's shape, in float32. Variants: ``fp32`` (float32 qkv and output) and ``bf16->fp32`` (the CPU
autocast step: a bfloat16 qkv from the projection, the output in float32 for the attention);
passes ``fwd`` and ``fwd+bwd`` (the gradients of qkv, both gains, ve and the mix).
"""

from __future__ import annotations

import pytest
import torch

from fastlm import ops

from .common import DEVICE, ON_GPU, gpu_oom_skip, skip_unless_fastlm_backend

# (B, T, H, H_kv, D)
SHAPE = (8, 1024, 12, 12, 64) if ON_GPU else (16, 128, 3, 3, 32)
VARIANTS = {"fp32": (torch.float32, None), "bf16->fp32": (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("variant", tuple(VARIANTS))
def test_qk_norm_value_mix(bench, variant, pass_, backend):
    skip_unless_fastlm_backend(backend)
    b, t, h, h_kv, d = SHAPE
    dtype, out_dtype = VARIANTS[variant]
    if ON_GPU and out_dtype is not None:
        pytest.skip("the bf16 -> fp32 variant is the CPU autocast step's")

    def make():
        qkv = torch.randn(b, t, (h + 2 * h_kv) * d, device=DEVICE, dtype=dtype, requires_grad=True)
        qg, kg = (torch.ones(d, device=DEVICE, requires_grad=True) for _ in range(2))
        ve = torch.randn(b, t, h_kv * d, device=DEVICE, requires_grad=True)
        mix = torch.full((2,), 0.5, device=DEVICE, requires_grad=True)
        dout = torch.randn(qkv.shape, device=DEVICE, dtype=out_dtype or dtype)
        return qkv, qg, kg, ve, mix, dout

    qkv, qg, kg, ve, mix, dout = gpu_oom_skip(make)
    args = (qkv, h, h_kv)
    kwargs = dict(q_gain=qg, k_gain=kg, ve=ve, ve_mix=mix, out_dtype=out_dtype, backend=backend)
    try:
        ops.qk_norm_value_mix(*args, **kwargs)
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    if pass_ == "fwd":
        fn = lambda: ops.qk_norm_value_mix(*args, **kwargs)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(ops.qk_norm_value_mix(*args, **kwargs), (qkv, qg, kg, ve, mix), dout)  # noqa: E731
    bench.benchmark.group = f"qk_norm_value_mix {pass_} {variant} {SHAPE}"
    median = gpu_oom_skip(lambda: bench.time(fn))
    bench.record(
        suite="qk_norm",
        op="qk_norm_value_mix",
        pass_=pass_,
        backend=backend,
        resolved="composed" if backend != "cpp" else "cpp",
        median_s=median,
        dtype=variant,
        shape=dict(zip(("batch", "block", "n_head", "n_kv_head", "head_dim"), SHAPE)),
        variant=variant,
    )
