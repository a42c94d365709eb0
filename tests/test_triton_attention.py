"""Triton attention kernels (fastlm.kernels.attention) against the float64 oracle.

Runs on a CUDA GPU when there is one (compiled kernels), otherwise on CPU tensors in Triton's
interpreter: an autouse fixture sets ``TRITON_INTERPRET=1`` for each test of this module only
(fastlm.kernels builds its kernel objects at launch time from the current setting, so this works
in any test order and does not leak into other modules).

Tolerance rule (FlashAttention's): ``max|out - ref64| <= 2 * max|base - ref64| + eps`` where
``ref64`` is :func:`fastlm.ops.reference.naive_attention` in float64 (on the inputs as rounded to the
tested dtype, so input rounding is not counted as kernel error) and ``base`` the same computation
by plain PyTorch in the tested dtype: the ``torch`` backend (SDPA) when it can express the call,
else the textbook formula run in that dtype (``naive_attention(..., dtype=dtype)``: SDPA cannot
express causal T_q > T_k with its fully masked rows). ``eps`` is half an ulp of the dtype at the
reference's magnitude (``finfo.eps / 2 * max(1, max|ref64|)``, what rounding the exact result to
the dtype may cost), so exact baselines do not demand bit equality. Every comparison here (LSE,
split-KV, strided gradients, torch.compile, each tile config) follows this rule.
Interpreter bfloat16 ``tl.dot`` is wrong (triton 3.9): bfloat16 runs on the GPU only.

Every entry of the tile config lists (``CONFIGS``: forward, dK/dV, dQ, split-KV decode) passes a
small causal GQA case with ragged T_q != T_k (:func:`test_every_tile_config_parity`): in the
interpreter here, compiled on a GPU (where the autotuner may pick any of them); the GPU check runs
the same cases first (``benchmarks.gpu_check``, step ``configs``).
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if not hasattr(torch.library, "triton_op"):
    pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)

from fastlm import ops  # noqa: E402
from fastlm.ops.reference import naive_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")

EPS = {dt: torch.finfo(dt).eps / 2 for dt in (torch.float32, torch.float16, torch.bfloat16)}  # half an ulp


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def A():
    from fastlm.kernels import attention as mod

    return mod


def _dtypes():
    return [
        torch.float32,
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(not CUDA, reason="bfloat16 tl.dot is wrong in the Triton interpreter; GPU only"),
        ),
    ]


def _inputs(b, h, h_kv, t_q, t_k, d, alibi, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # (B, T, H, D) memory viewed as (B, H, T, D): no copy
        q = torch.randn(b, t_q, h, d, generator=g).transpose(1, 2)
        k = torch.randn(b, t_k, h_kv, d, generator=g).transpose(1, 2)
        v = torch.randn(b, t_k, h_kv, d, generator=g).transpose(1, 2)
    else:
        q = torch.randn(b, h, t_q, d, generator=g)
        k = torch.randn(b, h_kv, t_k, d, generator=g)
        v = torch.randn(b, h_kv, t_k, d, generator=g)
    do = torch.randn(b, h, t_q, d, generator=g)
    slopes = (torch.rand(h, generator=g) * 0.5 + 0.05) if alibi else None
    return q, k, v, do, slopes


def _run(fn, q, k, v, do):
    """out, dq, dk, dv of fn (inputs are leaves of their own)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out,) + torch.autograd.grad(out, (q, k, v), do.to(out.dtype))


def _to(t, dtype):
    return t.detach().to(device=DEVICE, dtype=dtype)


def _baseline(q, k, v, do, causal, slopes, dtype, scale=None):
    """PyTorch's runs in ``dtype`` (a list of (out, dq, dk, dv)): SDPA where it can express the
    call, else the textbook formula; in float32 both where SDPA can (the rule takes the worse:
    both are float32 computations, and their max errors against the oracle differ by up to 5x
    here, e.g. dK 8.9e-6 vs 1.8e-6 in test_negative_scale, so either alone is an arbitrary pick;
    in float16 / bfloat16 the textbook formula rounds P to the dtype and is no peer of SDPA)."""
    args = [_to(t, dtype) for t in (q, k, v)]
    sl = None if slopes is None else slopes.to(DEVICE)
    runs = []
    sdpa = ops.torch_backend.BACKEND.attention_unsupported(*args, causal, scale or 1.0, sl) is None
    if sdpa:
        run = _run(
            lambda a, b, c: ops.attention(a, b, c, causal=causal, scale=scale, alibi_slopes=sl, backend="torch"),
            *args,
            _to(do, dtype),
        )
        # CPU SDPA (torch 2.13) returns NaN for is_causal with a negative scale: no baseline then
        sdpa = all(torch.isfinite(t).all() for t in run)
        runs += [run] if sdpa else []
    if not sdpa or dtype == torch.float32:
        runs.append(
            _run(lambda a, b, c: naive_attention(a, b, c, causal, scale, sl, dtype=dtype), *args, _to(do, dtype))
        )
    return runs


def _oracle(q, k, v, do, causal, slopes, dtype=torch.float64, scale=None):
    """float64 math on the inputs as rounded to the tested ``dtype``."""
    sl = None if slopes is None else slopes.to(DEVICE)
    args = [_to(t, dtype).double() for t in (q, k, v)]
    return _run(lambda a, b, c: naive_attention(a, b, c, causal, scale, sl), *args, _to(do, dtype).double())


def _within(got, ref64, bases, dtype):
    """(ok, err, bound) of the 2x rule for one tensor; ``bases``: PyTorch's results in the dtype."""
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - ref64).abs().max().item()
    base_err = max((b.double() - ref64).abs().max().item() for b in bases)
    bound = 2 * base_err + EPS[dtype] * max(1.0, ref64.abs().max().item())
    return err <= bound, err, bound


def _check_all(got, ref, bases, dtype, names=("out", "dq", "dk", "dv")):
    """The 2x rule on each output; ``bases``: a list of PyTorch runs (see :func:`_baseline`)."""
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        assert g.shape == r.shape and g.dtype == dtype, (name, g.shape, g.dtype)
        ok, err, bound = _within(g, r, [run[i] for run in bases], dtype)
        assert ok, f"{name}: max err {err:.3e} > bound {bound:.3e}"


def _lse_refs(args, causal, scale, slopes):
    """(float64 LSE, the LSE by plain PyTorch in float32, as the kernels compute it: see
    tests/attn_oracle.py) of these inputs."""
    from attn_oracle import lse_base2_fp32

    from fastlm.ops.reference import attention_forward as ref_forward

    sl = None if slopes is None else slopes.to(DEVICE)
    ref = ref_forward(*[a.double() for a in args], causal, scale, None if sl is None else sl.double())[1]
    return ref, lse_base2_fp32(args[0], args[1], causal, scale, sl)


def _check_lse(lse, ref, base):
    """Fully masked rows (-inf) where the oracle has them; the 2x rule on the rest."""
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(lse)), "fully masked rows differ"
    ok, err, bound = _within(lse[fin], ref[fin], [base[fin]], torch.float32)
    assert ok, f"lse: max err {err:.3e} > bound {bound:.3e}"


# (B, H, H_kv, T_q, T_k, D, causal, alibi): odd T and D, GQA/MQA, T_q != T_k both ways
CASES = [
    (1, 2, 2, 1, 1, 16, True, False),  # T = 1
    (1, 2, 2, 17, 17, 16, True, False),
    (1, 2, 2, 17, 17, 40, False, False),
    (2, 4, 2, 33, 50, 40, True, True),  # GQA, T_q < T_k (bottom-right), ALiBi
    (1, 2, 1, 50, 33, 64, True, False),  # MQA, T_q > T_k: fully masked rows
    (1, 2, 2, 97, 97, 80, True, False),
    (1, 2, 2, 97, 61, 64, False, True),  # non-causal ALiBi, T_q > T_k
    (1, 4, 1, 5, 40, 32, True, True),  # few queries, MQA, below the split-KV threshold
]


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}h{}kv{}tq{}tk{}d{}{}{}".format(*c[:6], "-causal" if c[6] else "", "-alibi" if c[7] else ""),
)
def test_forward_backward_parity(A, case, dtype):
    b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v, do, slopes = _inputs(b, h, h_kv, t_q, t_k, d, alibi)
    sl = None if slopes is None else slopes.to(DEVICE)
    got = _run(
        lambda a, b_, c: A.attention(a, b_, c, causal, None, sl), *(_to(t, dtype) for t in (q, k, v)), _to(do, dtype)
    )
    _check_all(got, _oracle(q, k, v, do, causal, slopes, dtype), _baseline(q, k, v, do, causal, slopes, dtype), dtype)


@pytest.mark.parametrize("d", [8, 128, 256])
def test_head_dim_extremes_fp32(A, d):
    """Head dims padded to 16 (D=8) and the largest tile (D=256), fwd + bwd."""
    q, k, v, do, _ = _inputs(1, 2, 1, 9, 21, d, False, seed=d)
    got = _run(
        lambda a, b, c: A.attention(a, b, c, True), *(_to(t, torch.float32) for t in (q, k, v)), _to(do, torch.float32)
    )
    _check_all(
        got,
        _oracle(q, k, v, do, True, None, torch.float32),
        _baseline(q, k, v, do, True, None, torch.float32),
        torch.float32,
    )


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize(
    "h,h_kv,t_q,causal,alibi", [(2, 2, 1, True, False), (4, 2, 1, False, True), (8, 2, 3, True, True)]
)
def test_decode_split_kv(A, dtype, h, h_kv, t_q, causal, alibi):
    """T_q <= 16 against a long KV takes the split-KV path automatically; fwd and bwd match."""
    t_k = 300
    assert A.use_split_kv(t_q, t_k, h // h_kv)
    q, k, v, do, slopes = _inputs(2, h, h_kv, t_q, t_k, 64, alibi, seed=t_q)
    sl = None if slopes is None else slopes.to(DEVICE)
    got = _run(
        lambda a, b, c: A.attention(a, b, c, causal, None, sl), *(_to(t, dtype) for t in (q, k, v)), _to(do, dtype)
    )
    _check_all(got, _oracle(q, k, v, do, causal, slopes, dtype), _baseline(q, k, v, do, causal, slopes, dtype), dtype)
    # the split-KV and one-pass forwards, outputs and LSEs, each within the rule
    args = [_to(t, dtype) for t in (q, k, v)]
    ref_lse, base_lse = _lse_refs(args, causal, 0.125, slopes)
    ref = naive_attention(*[a.double() for a in args], causal, 0.125, None if sl is None else sl.double())
    base = naive_attention(*args, causal, 0.125, sl, dtype=dtype)
    for split in (True, False):
        out, lse = A.attention_forward(*args, causal, 0.125, sl, split_kv=split)
        _check_all([out], [ref], [[base]], dtype, names=[f"out (split_kv={split})"])
        _check_lse(lse, ref_lse, base_lse)


def test_decode_fully_masked_rows_and_single_chunk(A):
    """Split-KV path forced on tiny shapes: one chunk, and causal T_q > T_k rows give zeros."""
    q, k, v, _, _ = _inputs(1, 4, 2, 5, 3, 32, False)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    out, lse = A.attention_decode(*args, True, 0.2)
    ref = naive_attention(*args, True, 0.2, dtype=torch.float64)
    _check_all([out], [ref], [[naive_attention(*args, True, 0.2, dtype=torch.float32)]], torch.float32)
    _check_lse(lse, *_lse_refs(args, True, 0.2, None))
    assert (out[:, :, :2] == 0).all() and torch.isneginf(lse[:, :, :2]).all()


def test_lse_matches_reference(A):
    q, k, v, _, slopes = _inputs(1, 2, 1, 23, 19, 32, True)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    _, lse = A.attention_forward(*args, True, 0.3, slopes.to(DEVICE))
    ref, base = _lse_refs(args, True, 0.3, slopes)
    assert (~torch.isfinite(ref)).any()  # rows 0..3 see no key
    _check_lse(lse, ref, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_bthd_layout(A, dtype):
    """(B, T, H, D) tensors viewed as (B, H, T, D) run without a copy; out and grads keep the
    layout, and a non-contiguous upstream gradient (expanded) is read through its strides."""
    q, k, v, do, slopes = _inputs(2, 4, 2, 19, 19, 40, True, layout="bthd")
    sl = slopes.to(DEVICE)
    args = [_to(t, dtype) for t in (q, k, v)]
    assert not args[0].is_contiguous()
    got = _run(lambda a, b, c: A.attention(a, b, c, True, None, sl), *args, _to(do, dtype))
    assert got[0].stride() == args[0].stride()
    assert got[1].stride() == args[0].stride() and got[2].stride() == args[1].stride()
    _check_all(got, _oracle(q, k, v, do, True, slopes, dtype), _baseline(q, k, v, do, True, slopes, dtype), dtype)

    # upstream gradient with stride 0 along T (what out.sum(dim=2) backward produces)
    def grads(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        fn(*leaves).double().sum(dim=2).pow(2).sum().backward()
        return [t.grad for t in leaves]

    got = grads(lambda a, b, c: A.attention(a, b, c, True, None, sl), args)
    ref = grads(lambda a, b, c: naive_attention(a, b, c, True, None, sl), [t.double() for t in args])
    base = grads(lambda a, b, c: naive_attention(a, b, c, True, None, sl, dtype=dtype), args)
    _check_all(got, ref, [base], dtype, names=("dq", "dk", "dv"))


def test_backward_fresh_tensors_inputs_untouched_deterministic(A):
    q, k, v, do, _ = _inputs(1, 4, 2, 33, 33, 32, True)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    before = [a.clone() for a in args]
    out, lse = A.attention_forward(*args, True, 0.17)
    dout = _to(do, torch.float32)
    g1 = A.attention_backward(dout, *args, out, lse, True, 0.17)
    g2 = A.attention_backward(dout, *args, out, lse, True, 0.17)
    for a, b in zip(args, before):
        assert torch.equal(a, b)
    for x, y, a in zip(g1, g2, args):
        assert torch.equal(x, y)  # no atomics: bitwise reproducible (GQA summed in registers)
        assert x.data_ptr() != a.data_ptr() and x.untyped_storage().data_ptr() != dout.untyped_storage().data_ptr()


def test_fully_masked_rows_zero_output_and_grad(A):
    q, k, v, do, _ = _inputs(1, 2, 2, 9, 4, 16, False)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    out, dq, dk, dv = _run(lambda a, b, c: A.attention(a, b, c, True), *args, _to(do, torch.float32))
    assert (out[:, :, :5] == 0).all() and (dq[:, :, :5] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_tolerance_rule_catches_a_wrong_mask(A):
    """The parity check is not vacuous: top-left causal (SDPA's is_causal) with T_q < T_k fails."""
    q, k, v, do, _ = _inputs(1, 2, 2, 8, 24, 16, False)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    ref = _oracle(q, k, v, do, True, None, torch.float32)
    base = _baseline(q, k, v, do, True, None, torch.float32)
    wrong = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True)
    assert not _within(wrong, ref[0], [run[0] for run in base], torch.float32)[0]
    right = A.attention(*args, True)
    assert _within(right, ref[0], [run[0] for run in base], torch.float32)[0]


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]], ids=lambda c: "tq{}tk{}d{}".format(*c[3:6]))
def test_tolerance_rejects_five_times_pytorchs_float32_error(case):
    """The rule with half-ulp eps is not vacuous in float32: a "kernel" whose error is 5x PyTorch's
    own (the oracle plus 5x the worse baseline's deviation) fails on every output. (The former
    EPS of 2e-6, ~30 half-ulps, let it pass.)"""
    b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v, do, slopes = _inputs(b, h, h_kv, t_q, t_k, d, alibi)
    ref = _oracle(q, k, v, do, causal, slopes, torch.float32)
    bases = _baseline(q, k, v, do, causal, slopes, torch.float32)
    for i, r in enumerate(ref):
        worst = max((run[i] for run in bases), key=lambda t: (t.double() - r).abs().max().item())
        fake = (r + 5 * (worst.double() - r)).float()
        assert not _within(fake, r, [run[i] for run in bases], torch.float32)[0], i


def test_ops_dispatch_triton_backend():
    q, k, v, _, slopes = _inputs(1, 4, 2, 11, 11, 24, True)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    sl = slopes.to(DEVICE)
    out = ops.attention(*args, causal=True, alibi_slopes=sl, backend="triton")
    ref = naive_attention(*args, True, None, sl)
    _check_all([out], [ref], [[naive_attention(*args, True, None, sl, dtype=torch.float32)]], torch.float32)


def test_backend_reasons(monkeypatch):
    from fastlm.ops.triton_backend import BACKEND

    q = torch.zeros(1, 2, 4, 16, device=DEVICE)
    assert BACKEND.unavailable_reason() is None
    assert BACKEND.attention_unsupported(q, q, q, True, 0.25, None) is None
    big = torch.zeros(1, 1, 2, 320, device=DEVICE)
    assert "head dim 320" in BACKEND.attention_unsupported(big, big, big, True, 0.1, None)
    q64 = q.double()
    assert "float64" in BACKEND.attention_unsupported(q64, q64, q64, True, 0.25, None)
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.attention(q64, q64, q64, backend="triton")
    if not CUDA:
        qb = q.bfloat16()
        assert "interpreter" in BACKEND.attention_unsupported(qb, qb, qb, True, 0.25, None)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        why = BACKEND.unavailable_reason()
        assert "no CUDA device" in why and "TRITON_INTERPRET=1" in why
        assert "TRITON_INTERPRET=1" in BACKEND.attention_unsupported(q, q, q, True, 0.25, None)


def _opcheck_attention(utils):
    q, k, v, _, slopes = _inputs(1, 4, 2, 7, 9, 16, True)
    args = [_to(t, torch.float32).requires_grad_() for t in (q, k, v)]
    for sl in (None, slopes.to(DEVICE)):
        torch.library.opcheck(torch.ops.fastlm.triton_attention_fwd.default, (*args, True, 0.25, sl), test_utils=utils)
    plain = [a.detach() for a in args]
    out, lse = torch.ops.fastlm.triton_attention_fwd(*plain, True, 0.25, None)
    torch.library.opcheck(
        torch.ops.fastlm.triton_attention_bwd.default,
        (torch.randn_like(out), *plain, out, lse, True, 0.25, None),
        test_utils=tuple(u for u in utils if u != "test_autograd_registration"),
    )


def test_opcheck(A):
    _opcheck_attention(("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(
    not CUDA,
    reason="opcheck's test_aot_dispatch_dynamic runs the op inside an AOT "
    "graph of FunctionalTensors, which the CPU interpreter cannot execute; GPU only",
)
def test_opcheck_aot_dispatch(A):
    _opcheck_attention(("test_aot_dispatch_dynamic",))


# ---- GPU only ----------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,d,causal", [(1025, 128, True), (512, 64, False), (256, 96, True)])
def test_gpu_real_sizes(A, dtype, t, d, causal):
    q, k, v, do, _ = _inputs(2, 8, 2, t, t, d, False)
    got = _run(lambda a, b, c: A.attention(a, b, c, causal), *(_to(x, dtype) for x in (q, k, v)), _to(do, dtype))
    _check_all(got, _oracle(q, k, v, do, causal, None, dtype), _baseline(q, k, v, do, causal, None, dtype), dtype)


@needs_gpu
@pytest.mark.gpu
def test_gpu_decode_long_kv(A):
    dtype = torch.bfloat16
    q, k, v, do, slopes = _inputs(2, 8, 2, 1, 4096, 128, True)
    sl = slopes.to(DEVICE)
    args = [_to(x, dtype) for x in (q, k, v)]
    out = A.attention(*args, True, None, sl)
    ref = naive_attention(*args, True, None, sl)
    base = naive_attention(*args, True, None, sl, dtype=dtype)
    ok, err, bound = _within(out, ref, [base], dtype)
    assert ok, (err, bound)


class _Block(torch.nn.Module):
    """Attention + packed SwiGLU MLP, with the two ops passed in (Triton kernels, plain PyTorch)."""

    def __init__(self, c=128, h=4):
        super().__init__()
        self.h = h
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.up = torch.nn.Linear(c, 4 * c)
        self.down = torch.nn.Linear(2 * c, c)

    def forward(self, x, attn, act):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).unbind(2)
        y = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + y.transpose(1, 2).reshape(b, t, c)
        return x + self.down(act(self.up(x)))


def _eager_swiglu_packed(x):
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@needs_gpu
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) over the Triton attention + SwiGLU ops, forward and input
    gradient against the float64 oracle (the same block, weights and input as rounded to bf16, in
    float64 with the textbook ops) under the 2x rule; baseline: the block in bf16 on SDPA and eager
    SwiGLU."""
    import copy

    from fastlm.kernels.attention import attention
    from fastlm.kernels.swiglu import swiglu_packed

    torch.manual_seed(0)
    block = _Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 128, device="cuda").to(torch.bfloat16)
    dout = torch.randn(2, 64, 128, device="cuda").to(torch.bfloat16)

    def run(dtype, attn, act, compile_=False):
        model = copy.deepcopy(block).to(dtype)
        fn = (
            torch.compile(lambda inp: model(inp, attn, act), fullgraph=True)
            if compile_
            else (lambda inp: model(inp, attn, act))
        )
        inp = x.to(dtype).requires_grad_()
        out = fn(inp)
        return (out,) + torch.autograd.grad(out, inp, dout.to(dtype))

    ref = run(torch.float64, lambda a, b, c: naive_attention(a, b, c, True), _eager_swiglu_packed)
    base = run(
        torch.bfloat16,
        lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True),
        _eager_swiglu_packed,
    )
    got = run(torch.bfloat16, lambda a, b, c: attention(a, b, c, True), swiglu_packed, compile_=True)
    _check_all(got, ref, [base], torch.bfloat16, names=("out", "dx"))


def test_interpreter_mode_is_per_call():
    """The kernel mode follows TRITON_INTERPRET at launch time (not at import)."""
    from fastlm.kernels import attention as mod

    if CUDA:
        assert not mod.interpreting()
    else:
        from fastlm.kernels.launch import is_interpreted

        assert mod.interpreting()
        k, blocks = mod._tuned_kernel("dq", mod._attn_bwd_dq_kernel, 64, 4)
        assert is_interpreted(k) and blocks == mod._INTERP_BLOCKS["dq"]


@pytest.mark.parametrize("causal", [True, False])
def test_negative_scale(A, causal):
    """The unmasked key blocks take the row max of the unscaled scores; with a negative scale that is
    the row minimum. Long enough (T = 97 > the interpreter's 16-key blocks) that unmasked blocks
    run, checked against the float64 oracle under the 2x rule."""
    q, k, v, do, _ = _inputs(1, 2, 2, 97, 97, 32, False, seed=3)
    scale = -0.4
    dtype = torch.float32
    got = _run(lambda a, b, c: A.attention(a, b, c, causal, scale), *(_to(t, dtype) for t in (q, k, v)), _to(do, dtype))
    _check_all(
        got, _oracle(q, k, v, do, causal, None, dtype, scale), _baseline(q, k, v, do, causal, None, dtype, scale), dtype
    )


def test_math_scale_default():
    """scale=None means 1/sqrt(D) (checked through the public op against an explicit scale)."""
    from fastlm.kernels.attention import attention

    q, k, v, _, _ = _inputs(1, 1, 1, 6, 6, 36, False)
    args = [_to(t, torch.float32) for t in (q, k, v)]
    assert torch.equal(attention(*args, False), attention(*args, False, 1 / math.sqrt(36)))


# ---- compiled path without a GPU: compile every kernel for sm_80 / sm_90 (ptxas ships with triton)
def _compile_or_skip(fn, dtype, ce, cap, num_warps=4, num_stages=2):
    try:
        from fastlm.kernels.resources import compile_for_target

        return compile_for_target(fn, dtype, ce, cap, num_warps=num_warps, num_stages=num_stages)
    except ImportError as e:
        pytest.skip(f"this triton has no ASTSource/GPUTarget API ({e})")
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas available: {e}")
        raise


_FWD_OPTS = dict(
    HEAD_DIM=80,
    CAUSAL=True,
    HAS_ALIBI=True,
    EVEN_D=False,
    BLOCK_D=128,
    DOT_PREC="tf32",
    HAS_WINDOW=False,
    HAS_DOCS=False,
)
_MASKS = dict(HAS_WINDOW=True, HAS_DOCS=True)  # the masked kernels' widest form


def _gpu_compile_cases():
    from fastlm.kernels import attention as A
    from fastlm.kernels import swiglu as S

    opts = _FWD_OPTS
    fwd = dict(opts, NEG_SCALE=False)
    return {
        "fwd-sm90": (A._attn_fwd_kernel, "bf16", dict(fwd, BLOCK_M=128, BLOCK_N=64), 90),
        "fwd-sm80": (A._attn_fwd_kernel, "fp16", dict(fwd, BLOCK_M=128, BLOCK_N=64), 80),
        "fwd-d40-sm90": (A._attn_fwd_kernel, "fp16", dict(fwd, HEAD_DIM=40, BLOCK_D=64, BLOCK_M=128, BLOCK_N=64), 90),
        "dkdv-sm90": (A._attn_bwd_dkdv_kernel, "bf16", dict(opts, BLOCK_M=32, BLOCK_N=128), 90),
        "dq-sm90": (A._attn_bwd_dq_kernel, "bf16", dict(opts, DELTA_ONLY=False, BLOCK_M=128, BLOCK_N=32), 90),
        "fwd-masks-sm80": (A._attn_fwd_kernel, "fp16", dict(fwd, **_MASKS, BLOCK_M=128, BLOCK_N=64), 80),
        "dkdv-masks-sm80": (A._attn_bwd_dkdv_kernel, "fp16", dict(opts, **_MASKS, BLOCK_M=32, BLOCK_N=64), 80),
        "dq-masks-sm80": (
            A._attn_bwd_dq_kernel,
            "fp16",
            dict(opts, **_MASKS, DELTA_ONLY=True, BLOCK_M=64, BLOCK_N=32),
            80,
        ),
        "pre-sm90": (A._attn_bwd_preprocess_kernel, "bf16", dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64), 90),
        "decode-sm90": (
            A._attn_decode_kernel,
            "bf16",
            dict(
                HEAD_DIM=80, CAUSAL=True, HAS_ALIBI=True, BLOCK_D=128, DOT_PREC="tf32", BLOCK_M=16, BLOCK_N=64, **_MASKS
            ),
            90,
        ),
        "combine-sm90": (
            A._attn_decode_combine_kernel,
            "bf16",
            dict(HEAD_DIM=80, PART_M=16, BLOCK_S=32, BLOCK_D=128),
            90,
        ),
        "swiglu-fwd": (S._swiglu_fwd_kernel, "bf16", dict(BLOCK=4096), 90),
        "swiglu-bwd": (S._swiglu_bwd_kernel, "bf16", dict(BLOCK=4096), 90),
        "packed-fwd": (S._swiglu_packed_fwd_kernel, "bf16", dict(BLOCK=2048), 90),
        "packed-bwd": (S._swiglu_packed_bwd_kernel, "bf16", dict(BLOCK=2048), 90),
    }


@pytest.mark.cpu_only  # compiles or parses only: no GPU needed, none used
@pytest.mark.parametrize(
    "name",
    [
        "fwd-sm90",
        "fwd-sm80",
        "fwd-d40-sm90",
        "dkdv-sm90",
        "dq-sm90",
        "pre-sm90",
        "fwd-masks-sm80",
        "dkdv-masks-sm80",
        "dq-masks-sm80",
        "decode-sm90",
        "combine-sm90",
        "swiglu-fwd",
        "swiglu-bwd",
        "packed-fwd",
        "packed-bwd",
    ],
)
def test_kernels_compile_for_gpu_targets(name, monkeypatch):
    """The compiled (non-interpreter) path is checked on CPU-only machines too: each kernel goes
    through Triton's full pipeline to a cubin. Attention tiles must use tensor cores
    (wgmma on sm_90, mma.sync on sm_80) and pipelined cp.async loads; the packed SwiGLU kernels
    (a (row, column block) grid) divide no integer per element."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn, dtype, ce, cap = _gpu_compile_cases()[name]
    kernel = _compile_or_skip(fn, dtype, ce, cap, num_stages=3 if name.startswith(("fwd", "dq")) else 2)
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.shared <= 160 * 1024
    if name.startswith(("fwd", "dkdv", "dq", "decode")):
        mma = "wgmma.mma_async" if cap == 90 and not name.startswith("decode") else "mma.sync"
        assert mma in ptx, f"no tensor-core MMA ({mma})"  # decode's 16-row tiles use mma.sync
        assert "cp.async" in ptx, "loads are not pipelined"
    if name.startswith("packed"):
        assert not any(op in ptx for op in ("div.s64", "rem.s64", "div.u64", "rem.u64", "div.s32", "rem.s32"))


def _assert_no_spills(usage):
    """At most 255 registers, no spill stores or loads (Triton's own ptxas -v), no stack frame in the
    cubin (cuobjdump), within sm_90's 227 KiB of shared memory."""
    assert "ptxas_error" not in usage and "cuobjdump_error" not in usage, usage
    assert 0 < usage["ptxas_regs"] <= 255, usage
    assert usage["ptxas_spill_store_bytes"] == 0 and usage["ptxas_spill_load_bytes"] == 0, usage
    assert usage["cubin_regs"] == usage["ptxas_regs"] and usage["cubin_stack_bytes"] == 0, usage
    assert usage["shared_bytes"] <= 227 * 1024, usage


def _need_cuda_tools():
    from fastlm.kernels.resources import _tool, ptxas_path

    missing = [name for name, found in (("ptxas", ptxas_path(90)), ("cuobjdump", _tool("cuobjdump"))) if not found]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} (triton's bundled copy or on PATH)")


@pytest.mark.cpu_only  # compiles or parses only: no GPU needed, none used
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq", "decode"])
def test_pinned_default_registers_and_spills_sm90(kind, head_dim, masks, monkeypatch):
    """Registers and spills read from the compiled kernel (Triton's ptxas -v report and cuobjdump on
    the cubin; not the PTX, where spills do not show) of each kernel's default pinned config at
    D=64 (GPT-2 small) and D=128 (the headline) in bf16, compiled for sm_90 with this Triton (the
    GPU image's Triton: :func:`test_pinned_registers_and_spills_other_triton`), without masks and
    with a sliding window and documents both on (HAS_WINDOW, HAS_DOCS)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _need_cuda_tools()
    from fastlm.kernels import attention as A
    from fastlm.kernels.resources import config_usage

    try:
        usage = config_usage(kind, head_dim, A.pinned_default(kind, head_dim, 2, masks), masks=masks)
    except ImportError as e:
        pytest.skip(f"this triton has no ASTSource/GPUTarget API ({e})")
    _assert_no_spills(usage)


OTHER_TRITON = "3.6.0"  # the GPU image's Triton


def _other_triton_sites(this_version: str) -> list:
    """FASTLM_OTHER_TRITONS's folders; else Triton 3.6 installed once (``pip install --no-deps
    --target``, about 640 MB, seconds from a package index) into ``~/.cache/fastlm/triton-3.6.0``,
    so CI checks the GPU image's compiler too. A skip names the reason where neither can be had."""
    from fastlm.kernels.resources import OTHER_TRITONS_ENV, other_triton_sites

    sites = other_triton_sites()
    if sites:
        return sites
    if this_version == OTHER_TRITON:
        pytest.skip(f"this is Triton {OTHER_TRITON}: set {OTHER_TRITONS_ENV} to a folder holding another one")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm" / f"triton-{OTHER_TRITON}"
    if not (cache / "triton" / "__init__.py").is_file():
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(tmp),
                f"triton=={OTHER_TRITON}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if pip.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (pip.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"no {OTHER_TRITONS_ENV} set and pip could not install triton=={OTHER_TRITON}: {tail}")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return [str(cache)]


def test_pinned_registers_and_spills_other_triton():
    """The same check under each other Triton named by FASTLM_OTHER_TRITONS (site-packages folders,
    e.g. ``pip install --no-deps --target DIR triton==3.6.0``), by default Triton 3.6: the GPU image's version, whose
    register allocation differs; before the K/V pointers were rebuilt per iteration its forward
    spilled 584-1236 bytes at the pinned configs)."""
    import triton as this_triton

    from fastlm.kernels.resources import other_triton_usage

    _need_cuda_tools()
    sites = _other_triton_sites(this_triton.__version__)
    for site in sites:
        rows = other_triton_usage(site)
        assert rows[0]["triton"] != this_triton.__version__, (site, rows[0]["triton"])
        assert {(r["kind"], r["head_dim"]) for r in rows} == {
            (k, d) for k in ("fwd", "dkdv", "dq", "decode") for d in (64, 128)
        }
        for row in rows:
            _assert_no_spills(row)


@pytest.mark.cpu_only  # compiles or parses only: no GPU needed, none used
def test_spills_show_in_the_cubin_not_in_the_ptx(monkeypatch):
    """Negative control of the check above: dK/dV with a 32x128 tile on 4 warps at D=128 spills
    (measured 2408 bytes) although its PTX has no local loads."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _need_cuda_tools()
    from fastlm.kernels import attention as A
    from fastlm.kernels.resources import resource_usage

    ce = dict(
        HEAD_DIM=128,
        CAUSAL=True,
        HAS_ALIBI=False,
        EVEN_D=True,
        BLOCK_D=128,
        DOT_PREC="tf32",
        HAS_WINDOW=False,
        HAS_DOCS=False,
        BLOCK_M=32,
        BLOCK_N=128,
    )
    kernel = _compile_or_skip(A._attn_bwd_dkdv_kernel, "bf16", ce, 90, num_warps=4, num_stages=3)
    assert "ld.local" not in kernel.asm["ptx"]
    usage = resource_usage(kernel, 90)
    assert usage["ptxas_spill_store_bytes"] > 0 and usage["cubin_stack_bytes"] > 0, usage
    with pytest.raises(AssertionError):
        _assert_no_spills(usage)


def _tile_configs():
    from fastlm.kernels.attention import CONFIGS

    return [
        (kind, width, config)
        for kind, table in CONFIGS.items()
        for width, entries in table.items()
        for config in entries
    ]


# the dtype and head dim whose tile width (padded head dim x element size) selects each list; in the
# interpreter the 1024 list's tiles run in float16 (same tiles, the 512 list's dtype): its float32 D=256
# dots go through numpy's OpenBLAS there, measured 2-4x less accurate than torch's float32 matmul on the
# very same formula (out error 1.09e-6 by the kernel and by numpy's textbook attention, 5.6e-7 by torch),
# which no 2x rule can absorb; on a GPU the case is float32
_WIDTH_CASES = {
    128: (torch.bfloat16 if CUDA else torch.float16, 64),
    256: (torch.bfloat16 if CUDA else torch.float16, 128),
    512: (torch.float32, 128),
    1024: (torch.float32 if CUDA else torch.float16, 256),
}


def _tile_case_shapes(kind, config):
    """(T_q, T_k, ALiBi) cases spanning several blocks of this tile on both sides, ragged: a KV
    cache (T_q < T_k) and causal T_q > T_k (fully masked rows) with ALiBi; decode: few queries."""
    if kind == "decode":
        return [(3, 4 * config[1] + 7, False), (5, 2 * config[1] + 3, True)]
    big = max(config[:2])
    return [(big + 3, big + 3 + big // 2 + 5, False), (big + big // 2 + 5, big + 3, True)]


@pytest.mark.parametrize(
    "kind,width,config", _tile_configs(), ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x)
)
def test_every_tile_config_parity(A, kind, width, config, monkeypatch):
    """Each entry of the config lists (any of which the autotuner may pick on a GPU) pinned alone
    (FASTLM_TRITON_CONFIGS=<kind>=<config>): causal, GQA, ragged T_q != T_k both ways, in the
    dtype and head dim of its list, against the float64 oracle under the 2x rule. The forward and
    decode kernels are checked on out and LSE, dK/dV and dQ on all four outputs. Interpreter here
    (the tile sizes), compiled on a GPU (warps and stages too)."""
    monkeypatch.setenv("FASTLM_TRITON_CONFIGS", f"{kind}=" + "x".join(map(str, config)))
    dtype, d = _WIDTH_CASES[width]
    assert A.configs(kind, A._block_d(d), dtype.itemsize) == A.CONFIGS[kind][width] or (width, CUDA) == (1024, False)
    for t_q, t_k, alibi in _tile_case_shapes(kind, config):
        q, k, v, do, slopes = _inputs(1, 4, 2, t_q, t_k, d, alibi, seed=t_q)
        sl = None if slopes is None else slopes.to(DEVICE)
        args = [_to(t, dtype) for t in (q, k, v)]
        ref, base = _oracle(q, k, v, do, True, slopes, dtype), _baseline(q, k, v, do, True, slopes, dtype)
        try:
            if kind in ("fwd", "decode"):
                out, lse = A.attention_forward(*args, True, d**-0.5, sl, split_kv=kind == "decode")
                _check_all([out], ref[:1], [run[:1] for run in base], dtype)
                _check_lse(lse, *_lse_refs(args, True, d**-0.5, slopes))
            else:
                got = _run(lambda a, b, c: A.attention(a, b, c, True, None, sl), *args, _to(do, dtype))
                _check_all(got, ref, base, dtype)
        except triton.runtime.errors.OutOfResources as e:  # the autotuner drops it on this GPU too
            pytest.skip(f"{kind} {config} does not fit this GPU: {e}")


@pytest.mark.cpu_only  # compiles or parses only: no GPU needed, none used
def test_pinned_configs_parse(monkeypatch):
    from fastlm.kernels.launch import PIN_ENV, pinned_configs

    monkeypatch.delenv(PIN_ENV, raising=False)
    assert pinned_configs() is None
    monkeypatch.setenv(PIN_ENV, "pinned")
    assert pinned_configs() == {}
    monkeypatch.setenv(PIN_ENV, "fwd=128x128x8x2, dq=64X32x4x3")
    assert pinned_configs() == {"fwd": (128, 128, 8, 2), "dq": (64, 32, 4, 3)}
    for bad in ("fwd=128x128x8", "bwd=64x64x4x2", "fwd:128x64x4x3", "fwd=128x0x4x2", "fwd=axbxcxd"):
        monkeypatch.setenv(PIN_ENV, bad)
        with pytest.raises(ValueError, match=PIN_ENV):
            pinned_configs()


@pytest.mark.cpu_only  # compiles or parses only: no GPU needed, none used
def test_pinned_config_reaches_the_launch(monkeypatch):
    """With a pinned config the compiled path launches the plain JIT kernel with exactly that config
    (no autotuner); unpinned kernels of the run take their list's first config."""
    from fastlm.kernels import attention as A
    from fastlm.kernels.launch import PIN_ENV

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(PIN_ENV, "fwd=128x128x8x2")
    kernel, kwargs = A._tuned_kernel("fwd", A._attn_fwd_kernel, 128, 2)
    assert isinstance(kernel, triton.runtime.jit.JITFunction)
    assert kwargs == {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    _, kwargs = A._tuned_kernel("dkdv", A._attn_bwd_dkdv_kernel, 128, 2)
    m, n, w, s = A.CONFIGS["dkdv"][256][0]
    assert kwargs == {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s} and w == 8
    monkeypatch.delenv(PIN_ENV)
    kernel, kwargs = A._tuned_kernel("fwd", A._attn_fwd_kernel, 128, 2)
    assert isinstance(kernel, triton.runtime.autotuner.Autotuner) and kwargs == {}


# ---- a model trained with the triton backend follows the reference's loss curve ------------------
def test_training_with_triton_matches_reference_loss_curve():
    """A tiny GPT trained from the same init on the same batches with backend="triton" (kernels for
    attention and the packed SwiGLU; interpreter on CPU) and backend="reference": the loss curves
    agree to float32 noise and both learn."""
    from fastlm.model import GPT, GPTConfig
    from fastlm.training.optim import build_optimizer

    steps = 200 if CUDA else 40
    cfg = dict(vocab_size=24, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, mlp="swiglu", pos="alibi")
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 24, (7,), generator=g)
    data = torch.cat([pattern.repeat(40), torch.randint(0, 24, (200,), generator=g)])
    curves = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg, backend=backend)).to(DEVICE)
        opt = build_optimizer(model, optimizer="adamw", weight_decay=0.0, lr=1e-2, device_type=str(DEVICE))
        rng = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            starts = torch.randint(0, len(data) - 17, (4,), generator=rng)
            batch = torch.stack([data[s : s + 17] for s in starts.tolist()]).to(DEVICE)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    ref, tri = curves["reference"], curves["triton"]
    assert (tri - ref).abs().max().item() <= 2e-3 * ref.abs().max().item(), (ref[::8], tri[::8])
    assert tri[-5:].mean() < 0.8 * tri[:5].mean()  # it learned
