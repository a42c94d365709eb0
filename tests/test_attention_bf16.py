"""The fused packed attention (``torch.ops.fastlm.attention_qkv_fwd/bwd``) on a bfloat16 ``qkv``: bf16
products with float32 sums (csrc/cpu/bf16_gemm.h; AVX512-BF16 micro-kernels where the CPU has them,
plain loops elsewhere and when switched off).

The oracle is the op's documented arithmetic written out in float64: q and k rotated then rounded to
bf16, the softmax of their exact scores, P rounded to bf16 for P V and P^T dO, dS = P (dP - delta)
rounded to bf16 for dS K and dS^T q, the results rounded to bf16. The kernel may differ from it only by
its float32 sums (a bf16 rounding that flips), far less than the gap to float32 attention. Each case
runs on both implementations where the CPU has the micro-kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from mask_rule import alibi, doc_ids, visible

from fastlm import ops
from fastlm.ops import extension as _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"{_ext._IMPORT_ERROR}")

OPS = torch.ops.fastlm if _ext._C is not None else None
HAS_DOT = _ext.cpu_bf16_products()
IMPLS = ["dot", "plain"] if HAS_DOT else ["plain"]


@pytest.fixture
def impl(request):
    """Switch the bf16 micro-kernels on ("dot") or off ("plain") for one test, then back."""
    before = _ext.cpu_bf16_products()
    _ext.cpu_bf16_products(request.param == "dot")
    try:
        yield request.param
    finally:
        _ext.cpu_bf16_products(before)


def bf(x):
    return x.to(torch.bfloat16).double()


def rope_tables(t, d):
    ang = torch.outer(torch.arange(t, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, d, 2).double() / d))
    return ang.cos().float(), ang.sin().float()


def rotate(x, cos, sin, inverse=False):
    d = x.shape[-1]
    c, s = cos.double(), sin.double() * (-1 if inverse else 1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def emulate(qkv, dout, h, h_kv, rope, scale, slopes, window, seg):
    """(out, dqkv) of the op's arithmetic in float64, rounded where the op rounds (both bfloat16)."""
    b, t, w = qkv.shape
    d = w // (h + 2 * h_kv)
    g = h // h_kv
    q, k, v = (x.reshape(b, t, -1, d).transpose(1, 2) for x in qkv.double().split([h * d, h_kv * d, h_kv * d], -1))
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    qb, kb = bf(q), bf(k)
    kg, vg = (x.repeat_interleave(g, 1) for x in (kb, v))
    s = qb @ kg.transpose(-1, -2) * scale
    if slopes is not None:
        s = s + alibi(slopes, t, t)[None]
    mask = visible(b, t, t, True, window, seg)[:, None]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    if slopes is None:
        # without ALiBi the forward rounds the unnormalised exp(s - max) and divides P V by the row's
        # sum (as FlashAttention does); with ALiBi it rounds the normalised P
        e = (
            (s - s.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True))
            .exp()
            .masked_fill(~mask, 0.0)
            .nan_to_num(0.0)
        )
        inv = 1.0 / e.sum(-1, keepdim=True)
        out = ((bf(e) @ vg) * inv.nan_to_num(0.0, posinf=0.0)).transpose(1, 2).reshape(b, t, h * d)
    else:
        out = (bf(p) @ vg).transpose(1, 2).reshape(b, t, h * d)
    pb = bf(p)
    do = dout.double().reshape(b, t, h, d).transpose(1, 2)
    dp = do @ vg.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dsb = bf(ds)
    dq = dsb @ kg * scale
    dk = (dsb.transpose(-1, -2) @ qb * scale).reshape(b, h_kv, g, t, d).sum(2)
    dv = (pb.transpose(-1, -2) @ do).reshape(b, h_kv, g, t, d).sum(2)
    if rope is not None:
        dq, dk = rotate(dq, *rope, inverse=True), rotate(dk, *rope, inverse=True)
    dqkv = torch.cat([x.transpose(1, 2).reshape(b, t, -1) for x in (dq, dk, dv)], -1)
    return out.to(torch.bfloat16), dqkv.to(torch.bfloat16)


def float32_path(qkv, dout, h, h_kv, rope, scale, slopes, window, seg):
    """The same call on the float32 upcast (what a bfloat16 qkv took before): the gap the bf16 products open."""
    cos, sin = rope if rope is not None else (None, None)
    x = qkv.float()
    out, lse = OPS.attention_qkv_fwd(x, h, h_kv, cos, sin, scale, slopes, window, seg)
    dx = OPS.attention_qkv_bwd(dout.float(), x, out, lse, h, h_kv, cos, sin, scale, slopes, window, seg)
    return out.to(torch.bfloat16), dx.to(torch.bfloat16)


def ulps(a, b):
    """|a - b| per element in bf16 units (2^-7 relative) of the larger magnitude, at least 1/16 of b's
    RMS: a gradient that cancels to near zero carries its terms' absolute float32 sum error."""
    a, b = a.double(), b.double()
    floor = b.pow(2).mean().sqrt().item() / 16 + 1e-30
    return (a - b).abs() / (torch.maximum(a.abs(), b.abs()).clamp_min(floor) * 2.0**-7)


# (name, B, T, H, H_kv, D, rope, alibi, window, docs)
CASES = [
    ("default_shape", 2, 128, 3, 3, 32, True, False, None, None),
    ("gqa_t77_d16", 2, 77, 4, 2, 16, True, False, None, None),
    ("mqa_odd_d15_t200", 1, 200, 2, 1, 15, False, False, None, None),
    ("alibi_t70_d32", 2, 70, 3, 3, 32, True, True, None, None),
    ("window33_t100", 2, 100, 2, 2, 32, True, False, 33, None),
    ("docs_window10_t130_d24", 2, 130, 2, 1, 24, True, False, 10, "random"),
    ("t2_d8", 1, 2, 1, 1, 8, False, False, None, None),
    ("wide_t300_d64", 1, 300, 2, 2, 64, True, False, None, None),
]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bf16_qkv_matches_its_arithmetic_in_float64(case, impl):
    _, b, t, h, h_kv, d, use_rope, use_alibi, window, docs = case
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, generator=g).bfloat16()
    dout = torch.randn(b, t, h * d, generator=g).bfloat16()
    rope = rope_tables(t, d) if use_rope else None
    cos, sin = rope if rope is not None else (None, None)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)]) if use_alibi else None
    seg = None if docs is None else doc_ids(b, t, docs, g, window, torch.int64)
    scale = 1.0 / math.sqrt(d)

    out, lse = OPS.attention_qkv_fwd(qkv, h, h_kv, cos, sin, scale, slopes, window, seg)
    dqkv = OPS.attention_qkv_bwd(dout, qkv, out, lse, h, h_kv, cos, sin, scale, slopes, window, seg)
    assert out.dtype == dqkv.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want = emulate(qkv, dout, h, h_kv, rope, scale, slopes, window, seg)
    f32 = float32_path(qkv, dout, h, h_kv, rope, scale, slopes, window, seg)
    for name, got, ref in zip(("out", "dqkv"), (out, dqkv), want):
        err = ulps(got, ref)
        # only float32-sum roundings: all but a few elements exact, none 3 ulps off (measured: <= 1.65 and
        # <= 0.1% of the elements at AVX-512 and AVX2, 2.03 and 0.11% in the portable build)
        assert err.max() <= 3 and (err > 0).double().mean() < 0.005, (name, err.max(), (err > 0).double().mean())
    # and the oracle tells the two precisions apart: float32 attention misses it in a quarter of the gradient
    assert (ulps(f32[1], want[1]) > 0).double().mean() > 0.25


@pytest.mark.skipif(not HAS_DOT, reason="this CPU has no AVX512-BF16")
def test_micro_kernels_and_plain_loops_agree():
    """The two implementations take the same bf16 operands: they differ only in float32 summation order."""
    g = torch.Generator().manual_seed(8)
    b, t, h, d = 3, 150, 2, 40
    qkv = torch.randn(b, t, 3 * h * d, generator=g).bfloat16()
    dout = torch.randn(b, t, h * d, generator=g).bfloat16()
    cos, sin = rope_tables(t, d)
    results = []
    for on in (True, False):
        _ext.cpu_bf16_products(on)
        try:
            out, lse = OPS.attention_qkv_fwd(qkv, h, h, cos, sin, 0.2, None, None, None)
            results.append(
                (out, lse, OPS.attention_qkv_bwd(dout, qkv, out, lse, h, h, cos, sin, 0.2, None, None, None))
            )
        finally:
            _ext.cpu_bf16_products(True)
    (o1, l1, d1), (o2, l2, d2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-5)
    for x, y in ((o1, o2), (d1, d2)):
        err = ulps(x, y)
        assert err.max() < 2 and (err > 0).double().mean() < 0.005


def test_bf16_op_passes_opcheck():
    b, t, h, h_kv, d = 1, 9, 4, 2, 8
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d).bfloat16()
    cos, sin = rope_tables(t, d)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    torch.library.opcheck(OPS.attention_qkv_fwd.default, (qkv.requires_grad_(), h, h_kv, cos, sin, 0.3, slopes))
    out, lse = OPS.attention_qkv_fwd(qkv.detach(), h, h_kv, cos, sin, 0.3, slopes)
    torch.library.opcheck(
        OPS.attention_qkv_bwd.default, (torch.randn_like(out), qkv.detach(), out, lse, h, h_kv, cos, sin, 0.3, slopes)
    )


def test_which_calls_take_the_bf16_products():
    """ops.attention_qkv_bf16: bfloat16 CPU qkv of 2..gemm_max_tk tokens on auto/cpp, where the CPU has them."""
    x = torch.randn(2, 16, 96).bfloat16()
    assert ops.attention_qkv_bf16(x) is HAS_DOT and ops.attention_qkv_bf16(x, "cpp") is HAS_DOT
    assert not ops.attention_qkv_bf16(x.float())
    assert not ops.attention_qkv_bf16(x.half())
    assert not ops.attention_qkv_bf16(x, "reference")
    assert not ops.attention_qkv_bf16(torch.randn(1, 1, 96).bfloat16())
    assert not ops.attention_qkv_bf16(torch.randn(1, _ext.CPP_BACKEND.gemm_max_tk + 1, 24).bfloat16())
    _ext.cpu_bf16_products(False)
    try:
        assert not ops.attention_qkv_bf16(x)
    finally:
        _ext.cpu_bf16_products(True)


@pytest.mark.skipif(not HAS_DOT, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_public_op_runs_the_bf16_kernel_with_and_without_a_gradient(monkeypatch, grad):
    """ops.attention_qkv on a bf16 qkv calls the fused op on the bf16 tensor itself (no float32 copy),
    in training and in evaluation."""
    b, t, h, d = 2, 40, 2, 16
    qkv = torch.randn(b, t, 3 * h * d).bfloat16().requires_grad_(grad)
    seen = []
    real = OPS.attention_qkv_fwd
    monkeypatch.setattr(OPS, "attention_qkv_fwd", lambda x, *a: seen.append(x.dtype) or real(x, *a))
    y = ops.attention_qkv(qkv, h, rope=rope_tables(t, d))
    assert seen == [torch.bfloat16] and y.dtype == torch.bfloat16
    if grad:
        y.float().sum().backward()
        assert qkv.grad.dtype == torch.bfloat16 and torch.isfinite(qkv.grad.float()).all()
