"""SwiGLU ``silu(gate) * up``: every fastlm backend vs eager PyTorch and vs torch.compile of it.

Shapes: CUDA 8192 x 16384 bf16; CPU 8192 x 2048 fp32. Passes ``fwd`` and ``fwd+bwd`` (inputs
requiring grad). GB/s counts the bytes a fused kernel must move: forward reads gate and up and
writes out (3 tensors), backward reads gate, up, dout and writes dgate, dup (5 tensors).
``FASTLM_BENCH_COMPILE=0`` skips the torch.compile baseline (its compile time is in extra_info).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops

from .common import (
    DEVICE,
    ON_GPU,
    compile_enabled,
    dtype_name,
    gpu_oom_skip,
    skip_unless_fastlm_backend,
    swiglu_bytes,
    sync,
)

FASTLM_BACKENDS = ("auto", "reference", "torch", "triton", "cuda", "cpp")
BACKENDS = FASTLM_BACKENDS + ("eager", "compile")
PASSES = ("fwd", "fwd+bwd")
SHAPE, DTYPE = ((8192, 16384), torch.bfloat16) if ON_GPU else ((8192, 2048), torch.float32)


def eager_swiglu(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_", PASSES)
def test_swiglu(bench, pass_, backend):
    rows, cols = SHAPE
    extra = {}
    if backend in FASTLM_BACKENDS:
        skip_unless_fastlm_backend(backend)
    if backend == "compile" and not compile_enabled():
        pytest.skip("torch.compile baseline disabled (FASTLM_BENCH_COMPILE=0)")

    def make():
        gate = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE, requires_grad=True)
        up = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE, requires_grad=True)
        dout = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE)
        return gate, up, dout

    gate, up, dout = gpu_oom_skip(make)
    resolved = backend
    if backend in FASTLM_BACKENDS:
        try:
            obj = ops.resolve_backend("swiglu", backend, DEVICE.type, lambda o: o.swiglu_unsupported(gate, up))
        except ops.BackendUnavailableError as e:
            pytest.skip(str(e))
        if obj.name == "triton" and not ON_GPU:
            pytest.skip("auto resolves to the Triton interpreter on CPU: not benchmarked")
        resolved = obj.name
        op = lambda g, u: ops.swiglu(g, u, backend=backend)  # noqa: E731
    elif backend == "eager":
        op = eager_swiglu
    else:
        op = torch.compile(eager_swiglu, dynamic=False)

    if pass_ == "fwd":
        fn = lambda: op(gate, up)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(op(gate, up), (gate, up), dout)  # noqa: E731
    if backend == "compile":
        t0 = time.perf_counter()
        try:
            fn()
            sync()
        except Exception as e:  # noqa: BLE001 - no compiler / inductor failure: show why it is missing
            pytest.skip(f"torch.compile failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        extra["compile_s"] = round(time.perf_counter() - t0, 2)

    bench.benchmark.group = f"swiglu {pass_} {rows}x{cols} {dtype_name(DTYPE)}"
    median = gpu_oom_skip(lambda: bench.time(fn))
    bench.record(
        suite="swiglu",
        op="swiglu",
        pass_=pass_,
        backend=backend,
        resolved=resolved,
        median_s=median,
        dtype=dtype_name(DTYPE),
        shape={"rows": rows, "cols": cols},
        nbytes=swiglu_bytes(rows * cols, gate.element_size(), pass_),
        **extra,
    )


def eager_swiglu_packed(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("backend", ("auto", "reference", "torch", "triton", "cuda", "cpp", "eager"))
@pytest.mark.parametrize("pass_", PASSES)
def test_swiglu_packed(bench, pass_, backend):
    """The model's layout: one ``[rows, 2 * cols]`` tensor ``[gate | up]`` from a fused up-projection.
    Same byte count as the split op (the kernels read the halves in place, write one gradient)."""
    rows, cols = SHAPE
    if backend != "eager":
        skip_unless_fastlm_backend(backend)

    def make():
        x = torch.randn(rows, 2 * cols, device=DEVICE, dtype=DTYPE, requires_grad=True)
        return x, torch.randn(rows, cols, device=DEVICE, dtype=DTYPE)

    x, dout = gpu_oom_skip(make)
    resolved = backend
    if backend == "eager":
        op = eager_swiglu_packed
    else:
        try:
            obj = ops.resolve_backend("swiglu_packed", backend, DEVICE.type, lambda o: o.swiglu_packed_unsupported(x))
        except ops.BackendUnavailableError as e:
            pytest.skip(str(e))
        if obj.name == "triton" and not ON_GPU:
            pytest.skip("auto resolves to the Triton interpreter on CPU: not benchmarked")
        resolved = obj.name
        op = lambda t: ops.swiglu_packed(t, backend=backend)  # noqa: E731
    if pass_ == "fwd":
        fn = lambda: op(x)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(op(x), (x,), dout)  # noqa: E731
    bench.benchmark.group = f"swiglu_packed {pass_} {rows}x2*{cols} {dtype_name(DTYPE)}"
    median = gpu_oom_skip(lambda: bench.time(fn))
    bench.record(
        suite="swiglu",
        op="swiglu_packed",
        pass_=pass_,
        backend=backend,
        resolved=resolved,
        median_s=median,
        dtype=dtype_name(DTYPE),
        shape={"rows": rows, "cols": cols},
        nbytes=swiglu_bytes(rows * cols, x.element_size(), pass_),
    )
