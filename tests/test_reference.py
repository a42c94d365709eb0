"""fastlm.ops.reference: the oracle itself, checked against the float64 textbook formula.

Forward to 1e-6 relative in float32, hand-written backward by gradcheck (float64) and against
autograd of the naive formula, fp16/bf16 with FlashAttention's 2x rule, fully masked rows, NaN/Inf.
"""

import math

import pytest
import torch

from fastlm.ops import reference
from fastlm.ops.positions import alibi_slopes
from fastlm.ops.reference import naive_attention

# (name, B, H, H_kv, T_q, T_k, D, causal, alibi)
CASES = [
    ("causal", 2, 3, 3, 17, 17, 40, True, False),
    ("noncausal", 2, 3, 3, 17, 17, 40, False, False),
    ("causal_long", 1, 2, 2, 97, 97, 64, True, False),
    ("alibi_causal", 1, 4, 4, 17, 17, 16, True, True),
    ("alibi_noncausal", 1, 4, 4, 17, 17, 16, False, True),
    ("gqa_2", 2, 4, 2, 17, 17, 16, True, False),
    ("gqa_1", 1, 4, 1, 23, 23, 40, True, True),
    ("tq_lt_tk", 2, 2, 2, 5, 23, 16, True, False),
    ("tq_lt_tk_alibi_gqa", 1, 4, 2, 5, 23, 16, True, True),
    ("tq_gt_tk", 1, 2, 2, 23, 5, 16, True, False),
    ("tq_gt_tk_alibi_noncausal", 1, 2, 2, 23, 5, 16, False, True),
    ("tq1", 2, 2, 2, 1, 9, 16, True, False),
]
IDS = [c[0] for c in CASES]


def make_qkv(b, h, h_kv, t_q, t_k, d, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, t_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, t_k, d, generator=g, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)]


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def fully_masked_rows(t_q, t_k):
    """Query rows that see no key under bottom-right causal masking."""
    return max(t_q - t_k, 0)


def loop_attention(q, k, v, causal, scale, slopes):
    """The definitions written out element by element (float64), independent of fastlm's helpers:
    query head h reads kv head h // (H // H_kv); query i sits at key position i + T_k - T_q."""
    b_, h_, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    out = torch.zeros(b_, h_, t_q, d, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            hk = h // (h_ // h_kv)
            for i in range(t_q):
                pos = i + t_k - t_q
                keys = [j for j in range(t_k) if not causal or j <= pos]
                if not keys:
                    continue  # sees nothing: zeros
                scores = []
                for j in keys:
                    sc = scale * float(q[b, h, i].double() @ k[b, hk, j].double())
                    if slopes is not None:
                        sc -= float(slopes[h]) * abs(pos - j)
                    scores.append(sc)
                m = max(scores)
                w = [math.exp(sc - m) for sc in scores]
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj / sum(w) * v[b, hk, j].double()
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c[4] * c[5] <= 23 * 23], ids=lambda c: c[0])
def test_naive_oracle_matches_the_definition(case):
    """The oracle shares no mask/bias/GQA helper with this loop, so a wrong convention shows."""
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v = make_qkv(b, h, h_kv, t_q, t_k, d, dtype=torch.float64)
    slopes = alibi_slopes(h) if alibi else None
    want = loop_attention(q, k, v, causal, 1 / math.sqrt(d), slopes)
    assert rel_err(naive_attention(q, k, v, causal=causal, alibi_slopes=slopes), want) <= 1e-12
    assert rel_err(reference.attention(q, k, v, causal=causal, alibi_slopes=slopes), want) <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_fp32_matches_float64(case):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v = make_qkv(b, h, h_kv, t_q, t_k, d)
    slopes = alibi_slopes(h) if alibi else None
    out = reference.attention(q, k, v, causal=causal, alibi_slopes=slopes)
    ref = naive_attention(q, k, v, causal=causal, alibi_slopes=slopes)
    assert out.dtype == torch.float32 and out.shape == (b, h, t_q, d)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-6


def test_fully_masked_rows_are_exact_zeros():
    q, k, v = make_qkv(1, 2, 2, 23, 5, 16, requires_grad=True)
    out = reference.attention(q, k, v, causal=True)
    n = fully_masked_rows(23, 5)
    assert n == 18
    assert torch.equal(out[:, :, :n], torch.zeros_like(out[:, :, :n]))
    assert torch.isfinite(out).all()
    assert (out[:, :, n:].abs().sum(-1) > 0).all()  # the rows that see keys are not zeroed
    _, lse = reference.attention_forward(q.detach(), k.detach(), v.detach(), True, 0.25)
    assert torch.isneginf(lse[:, :, :n]).all() and torch.isfinite(lse[:, :, n:]).all()
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(q.grad[:, :, :n], torch.zeros_like(q.grad[:, :, :n]))


def test_causal_is_bottom_right_aligned():
    # one query against 7 keys sees every key; the last query of a T_q == T_k call sees all too
    q, k, v = make_qkv(1, 1, 1, 1, 7, 8)
    torch.testing.assert_close(
        reference.attention(q, k, v, causal=True), reference.attention(q, k, v, causal=False), rtol=0, atol=0
    )
    # query i of T_q=3 vs T_k=7 equals query 4+i of the full causal square
    qf, kf, vf = make_qkv(1, 1, 1, 7, 7, 8, seed=1)
    full = naive_attention(qf, kf, vf, causal=True)
    part = reference.attention(qf[:, :, 4:], kf, vf, causal=True)
    assert rel_err(part, full[:, :, 4:]) <= 1e-6


def test_default_scale_and_explicit_scale():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16)
    out = reference.attention(q, k, v, causal=True)
    assert rel_err(out, naive_attention(q, k, v, causal=True, scale=1 / math.sqrt(16))) <= 1e-6
    out = reference.attention(q, k, v, causal=True, scale=0.7)
    ref = naive_attention(q, k, v, causal=True, scale=0.7)
    assert rel_err(out, ref) <= 1e-6
    assert rel_err(out, naive_attention(q, k, v, causal=True)) > 1e-3  # the scale is really used


# ---- backward -----------------------------------------------------------------------------------
GRAD_CASES = [
    ("causal", 1, 2, 2, 6, 6, 4, True, False),
    ("noncausal", 2, 2, 2, 5, 5, 3, False, False),
    ("alibi", 1, 2, 2, 6, 6, 4, True, True),
    ("alibi_noncausal", 1, 2, 2, 5, 5, 4, False, True),
    ("gqa", 1, 4, 2, 5, 5, 4, True, False),
    ("tq_lt_tk", 1, 2, 1, 3, 7, 4, True, True),
    ("tq_gt_tk", 1, 2, 2, 7, 3, 4, True, False),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_attention_gradcheck_float64(case):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v = make_qkv(b, h, h_kv, t_q, t_k, d, dtype=torch.float64, requires_grad=True)
    slopes = alibi_slopes(h).double() if alibi else None
    fn = lambda q, k, v: reference.attention(q, k, v, causal=causal, alibi_slopes=slopes)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_swiglu_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(4, 7, dtype=torch.float64, generator=g)).requires_grad_()
    up = torch.randn(4, 7, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(reference.swiglu, (gate, up), eps=1e-6, atol=1e-8, rtol=1e-6)


def _grads(fn, inputs, dout):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [x.grad for x in inputs]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_autograd_of_naive(case, dtype, tol):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v = make_qkv(b, h, h_kv, t_q, t_k, d, dtype=dtype)
    dout = torch.randn(b, h, t_q, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    slopes = alibi_slopes(h) if alibi else None
    _, got = _grads(
        lambda q, k, v: reference.attention(q, k, v, causal=causal, alibi_slopes=slopes), (q, k, v), dout.to(dtype)
    )
    _, want = _grads(
        lambda q, k, v: naive_attention(q, k, v, causal=causal, alibi_slopes=slopes),
        (q.double(), k.double(), v.double()),
        dout,
    )
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) <= tol, (name, rel_err(g, w))


def test_backward_writes_fresh_tensors():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    out, lse = reference.attention_forward(q, k, v, True, 0.3)
    dout = torch.randn_like(out)
    saved = [t.clone() for t in (dout, q, k, v, out, lse)]
    dq, dk, dv = reference.attention_backward(dout, q, k, v, out, lse, True, 0.3)
    for before, after in zip(saved, (dout, q, k, v, out, lse)):
        assert torch.equal(before, after)
    for grad, x in zip((dq, dk, dv), (q, k, v)):
        assert grad.data_ptr() != x.data_ptr()


# ---- low precision: the 2x rule against the naive formula computed in the same dtype ----------
def _two_x(out, base, ref, dtype):
    """FlashAttention's rule: max|out - ref64| <= 2 * max|base - ref64| + eps."""
    eps = torch.finfo(dtype).eps * ref.abs().max().item() / 4
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    assert err <= 2 * base_err + eps, f"error {err:.3g} vs same-dtype naive {base_err:.3g}"
    return err, base_err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_two_x_rule(case, dtype):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v = make_qkv(b, h, h_kv, t_q, t_k, d, dtype=dtype)
    dout = torch.randn(b, h, t_q, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    slopes = alibi_slopes(h) if alibi else None
    out, got = _grads(lambda q, k, v: reference.attention(q, k, v, causal=causal, alibi_slopes=slopes), (q, k, v), dout)
    base, base_g = _grads(
        lambda q, k, v: naive_attention(q, k, v, causal=causal, alibi_slopes=slopes, dtype=dtype), (q, k, v), dout
    )
    ref, ref_g = _grads(
        lambda q, k, v: naive_attention(q, k, v, causal=causal, alibi_slopes=slopes),
        (q.double(), k.double(), v.double()),
        dout.double(),
    )
    assert out.dtype == dtype
    _two_x(out, base, ref, dtype)
    for g, bg, rg in zip(got, base_g, ref_g):
        assert g.dtype == dtype
        _two_x(g, bg, rg, dtype)


# ---- non-finite input ---------------------------------------------------------------------------
def test_nan_in_key_propagates_only_to_rows_that_see_it():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16)
    k[0, 0, 5, 3] = float("nan")
    out = reference.attention(q, k, v, causal=True)
    assert torch.isfinite(out[0, 0, :5]).all()  # rows 0..4 never see key 5
    assert torch.isnan(out[0, 0, 5:]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_query_row_does_not_leak(bad):
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, requires_grad=True)
    with torch.no_grad():
        q[0, 1, 2, 0] = bad
    out = reference.attention(q, k, v, causal=False)
    assert not torch.isfinite(out[0, 1, 2]).all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 1, 2] = False
    assert torch.isfinite(out[mask]).all()
    out.sum().backward()  # no crash; the poisoned row's gradient is non-finite
    assert not torch.isfinite(q.grad[0, 1, 2]).all()


def test_inf_value_propagates():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    v[0, 0, 2, 1] = float("inf")
    out = reference.attention(q, k, v, causal=True)
    # rows that see value 2 are inf in that column (masked rows may give 0 * inf = nan, as SDPA does)
    assert torch.isinf(out[0, 0, 2:, 1]).all()
    assert torch.isfinite(out[0, 0, :, 0]).all()


# ---- swiglu -------------------------------------------------------------------------------------
def _swiglu64(gate, up):
    g = gate.double()
    return g * torch.sigmoid(g) * up.double()


@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 5, 97)])
def test_swiglu_fp32_and_backward(shape):
    g = torch.Generator().manual_seed(3)
    gate = 4 * torch.randn(shape, generator=g)
    up = torch.randn(shape, generator=g)
    dout = torch.randn(shape, generator=g)
    out, got = _grads(reference.swiglu, (gate, up), dout)
    ref, want = _grads(_swiglu64, (gate.double(), up.double()), dout.double())
    assert out.dtype == torch.float32 and out.shape == shape
    assert rel_err(out, ref) <= 1e-6
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swiglu_low_precision_two_x_rule(dtype):
    g = torch.Generator().manual_seed(4)
    gate = (4 * torch.randn(8, 257, generator=g)).to(dtype)
    up = torch.randn(8, 257, generator=g).to(dtype)
    dout = torch.randn(8, 257, generator=g).to(dtype)
    out, got = _grads(reference.swiglu, (gate, up), dout)
    base, base_g = _grads(lambda a, b: torch.nn.functional.silu(a) * b, (gate, up), dout)
    ref, ref_g = _grads(_swiglu64, (gate.double(), up.double()), dout.double())
    _two_x(out, base, ref, dtype)
    for a, b, r in zip(got, base_g, ref_g):
        _two_x(a, b, r, dtype)


def test_swiglu_non_finite_propagates():
    gate = torch.tensor([0.5, float("nan"), float("inf"), -float("inf")])
    up = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = reference.swiglu(gate, up)
    assert torch.isfinite(out[0])
    assert torch.isnan(out[1])
    assert out[2] == float("inf")
