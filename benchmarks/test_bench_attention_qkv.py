"""``ops.attention_qkv`` (the model's self-attention on its packed qkv, RoPE inside) at the default CPU
run's shape: the fused C++ op (``cpp``) vs the composed form on SDPA (``torch``: split, rotate, SDPA,
merge heads).

Variants: ``fp32``; ``bf16`` (a bfloat16 qkv, the CPU autocast step: on a CPU with AVX512-BF16 the
fused op computes it with bf16 products and float32 sums); ``bf16 via fp32`` (the fused op on the
float32 upcast, what a bfloat16 qkv took before the bf16 products: ``cpu_bf16_products`` switched off).
Passes ``fwd`` (no gradient: evaluation) and ``fwd+bwd``. CPU only: on CUDA the model's attention
runs the tensor-core kernels (tests/test_bench_attention.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from fastlm import ops

from .common import ON_GPU, default_train_setup, skip_unless_fastlm_backend

pytestmark = pytest.mark.skipif(ON_GPU, reason="the CPU default run's attention")

VARIANTS = ("fp32", "bf16", "bf16 via fp32")


@contextmanager
def _bf16_products(on: bool):
    from fastlm.ops.extension import cpu_bf16_products

    before = cpu_bf16_products()
    try:
        yield cpu_bf16_products(on)
    finally:
        cpu_bf16_products(before)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_qkv(bench, variant, pass_, backend):
    skip_unless_fastlm_backend(backend)
    if variant == "bf16 via fp32" and backend != "cpp":
        pytest.skip("the float32 route is the cpp op's")
    cfg, batch, _ = default_train_setup()
    b, t, h, h_kv, d = batch, cfg.block_size, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, generator=g).to(dtype).requires_grad_(pass_ != "fwd")
    dout = torch.randn(b, t, h * d, generator=g).to(dtype)
    ang = torch.outer(torch.arange(t).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    rope = (ang.cos(), ang.sin())

    def fwd():
        with torch.no_grad():
            return ops.attention_qkv(qkv, h, h_kv, rope=rope, backend=backend)

    def fwd_bwd():
        return torch.autograd.grad(ops.attention_qkv(qkv, h, h_kv, rope=rope, backend=backend), qkv, dout)

    fn = fwd if pass_ == "fwd" else fwd_bwd
    with _bf16_products(variant == "bf16") as products:
        if variant == "bf16" and backend == "cpp" and not products:
            pytest.skip("this CPU has no AVX512-BF16: a bfloat16 qkv takes the float32 route (the other row)")
        fn()
        bench.benchmark.group = f"attention_qkv {pass_} {variant} B{b} T{t} H{h} D{d}"
        median = bench.time(fn)
    bench.record(
        suite="attention_qkv",
        op="attention_qkv",
        pass_=pass_,
        backend=backend,
        resolved="composed" if backend != "cpp" else ("cpp bf16 products" if variant == "bf16" else "cpp"),
        median_s=median,
        dtype=variant,
        shape={"batch": b, "block": t, "n_head": h, "n_kv_head": h_kv, "head_dim": d},
        variant=variant,
    )
