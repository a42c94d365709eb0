"""``ops.layer_norm`` (the model's pre-norms, with the residual add before them): the fused C++ op
(``cpp``, CPU, autograd in C++) vs the composed form (``torch``: ``x + residual``, ``F.layer_norm``, the
cast to bf16 the next Linear makes under autocast: what the model ran before).

Shape: the default CPU run's activations (batch 16, block 128, width 96) on CPU; on CUDA no backend has
a kernel for it (every backend runs the composed form), so only ``torch`` runs there, at GPT-2 small's
width. Variants: ``fp32`` (float32 in and out, no residual) and ``fp32+bf16->bf16`` (the CPU autocast
step: the float32 residual stream plus a bfloat16 branch output, normalised and written in bfloat16);
passes ``fwd`` and ``fwd+bwd`` (the gradients of x, weight, bias and the residual).
"""

from __future__ import annotations

import pytest
import torch

from fastlm import ops

from .common import DEVICE, ON_GPU, gpu_oom_skip, skip_unless_fastlm_backend

# (B, T, C)
SHAPE = (8, 1024, 768) if ON_GPU else (16, 128, 96)
VARIANTS = {"fp32": (None, None), "fp32+bf16->bf16": (torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("variant", tuple(VARIANTS))
def test_layer_norm(bench, variant, pass_, backend):
    skip_unless_fastlm_backend(backend)
    res_dtype, out_dtype = VARIANTS[variant]
    if ON_GPU and res_dtype is not None:
        pytest.skip("the fp32+bf16 -> bf16 variant is the CPU autocast step's")

    def make():
        x = torch.randn(SHAPE, device=DEVICE, requires_grad=True)
        w, b = torch.ones(SHAPE[-1], device=DEVICE, requires_grad=True), torch.zeros(SHAPE[-1], device=DEVICE)
        b.requires_grad_()
        r = torch.randn(SHAPE, device=DEVICE, dtype=res_dtype, requires_grad=True) if res_dtype else None
        dout = torch.randn(SHAPE, device=DEVICE, dtype=out_dtype or torch.float32)
        return x, w, b, r, dout

    x, w, b, r, dout = gpu_oom_skip(make)
    kwargs = dict(residual=r, out_dtype=out_dtype, backend=backend)
    leaves = tuple(t for t in (x, w, b, r) if t is not None)

    def norm():
        got = ops.layer_norm(x, w, b, **kwargs)
        return got if r is None else got[0]

    try:
        norm()
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    fn = norm if pass_ == "fwd" else (lambda: torch.autograd.grad(norm(), leaves, dout))
    bench.benchmark.group = f"layer_norm {pass_} {variant} {SHAPE}"
    median = gpu_oom_skip(lambda: bench.time(fn))
    bench.record(
        suite="layer_norm",
        op="layer_norm",
        pass_=pass_,
        backend=backend,
        resolved="composed" if backend != "cpp" else "cpp",
        median_s=median,
        dtype=variant,
        shape=dict(zip(("batch", "block", "n_embd"), SHAPE)),
        variant=variant,
    )
