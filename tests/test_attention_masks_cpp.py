"""Sliding-window and document (segment) masks in the C++ CPU attention ops (``torch.ops.fastlm.*``).

The rule (bottom-right aligned like causal): query i sits at key position p = i + T_k - T_q. A window
w keeps the keys j with p - w < j <= p (causal) or |p - j| < w (not causal); segment_ids (B, T_k)
keep the keys whose id equals the id of position p (a query whose p is outside [0, T_k) sees none).
The oracle builds that dense boolean mask directly from the rule and runs the textbook formula in
float64; the op must meet FlashAttention's 2x rule against SDPA given the same dense mask in the same
dtype, on both CPU paths: the per-head BLAS GEMMs (float32/float64, T_k <= 512) and the flash loop
(longer keys, bfloat16/float16).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mask_rule import alibi, doc_ids, oracle, visible
from test_cpp_ops import assert_two_x, fwd_bwd  # the 2x rule and a forward + backward helper

from fastlm.ops import extension as _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"{_ext._IMPORT_ERROR}")

OPS = torch.ops.fastlm if _ext._C is not None else None
GEMM_MAX_TK = _ext.CPP_BACKEND.gemm_max_tk


# ---- the rule, the oracle and the baseline ------------------------------------------------------
def sdpa_dense(q, k, v, mask, scale, slopes):
    """SDPA with the equivalent dense float mask (rows that see nothing: zeros)."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(g, 1) for x in (k, v))
    any_key = mask.any(-1, keepdim=True)[:, None]  # (B, 1, T_q, 1)
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))[:, None]
    if slopes is not None:
        bias = bias + alibi(slopes, q.shape[2], k.shape[2])[None]
    bias = torch.where(any_key, bias, 0.0).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale) * any_key


def op_attention(q, k, v, causal, scale, slopes, window, seg):
    return OPS.attention_fwd(q, k, v, causal, scale, slopes, window, seg)[0]


# ---- inputs -------------------------------------------------------------------------------------
def make_inputs(case, dtype, seed=0):
    _, b, h, h_kv, t_q, t_k, d, causal, window, docs, use_alibi, layout = case
    g = torch.Generator().manual_seed(seed)

    def rand(heads, t):
        if layout == "bthd":  # (B, T, H, D) storage viewed as (B, H, T, D)
            return torch.randn(b, t, heads, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, t, d, generator=g).to(dtype)

    q, k, v = rand(h, t_q), rand(h_kv, t_k), rand(h_kv, t_k)
    dout = torch.randn(b, h, t_q, d, generator=g).to(dtype)
    seg = None if docs is None else doc_ids(b, t_k, docs, g, window, torch.int32 if seed % 2 else torch.int64)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)]) if use_alibi else None
    return q, k, v, dout, seg, slopes


# (name, B, H, H_kv, T_q, T_k, D, causal, window, docs, alibi, layout)
SMALL = [  # float32 takes the BLAS path here (T_k <= 512); bfloat16 the flash loop
    ("win17_causal_t97_d40", 2, 2, 2, 97, 97, 40, True, 17, None, False, "bhtd"),
    ("win9_noncausal_gqa_70x90_d16", 1, 4, 2, 70, 90, 16, False, 9, None, False, "bthd"),
    ("win1_itself_t40_d8", 1, 2, 2, 40, 40, 8, True, 1, None, False, "bhtd"),
    ("win1_t1_d16", 2, 1, 1, 1, 1, 16, True, 1, "edges", False, "bhtd"),
    ("docs_random_gqa_t130_d24", 2, 2, 1, 130, 130, 24, True, None, "random", False, "bhtd"),
    ("docs_len1_alibi_t64_d16", 2, 3, 3, 64, 64, 16, True, None, "len1", True, "bhtd"),
    ("docs_edges_noncausal_t33_d8", 2, 2, 2, 33, 33, 8, False, None, "edges", False, "bthd"),
    ("docs_per_window_w10_t100_d16", 2, 2, 2, 100, 100, 16, True, 10, "per_window", False, "bhtd"),
    ("docs_win20_alibi_kvcache_17x150_d32", 2, 4, 2, 17, 150, 32, True, 20, "random", True, "bhtd"),
    ("docs_win5_noncausal_alibi_t45_d16", 1, 2, 1, 45, 45, 16, False, 5, "random", True, "bthd"),
    ("masked_rows_docs_60x40_d16", 1, 2, 2, 60, 40, 16, True, None, "random", False, "bhtd"),
    ("masked_rows_win7_noncausal_50x20_d16", 1, 2, 2, 50, 20, 16, False, 7, None, False, "bhtd"),
    ("win_past_t_77x77_d16", 1, 2, 1, 77, 77, 16, True, 500, None, True, "bhtd"),
]
LONG = [  # T_k > 512: the flash loop in float32 too
    ("flash_win100_causal_t600_d16", 1, 2, 1, 600, 600, 16, True, 100, None, False, "bhtd"),
    ("flash_docs_win70_alibi_t530_d24", 1, 2, 2, 530, 530, 24, True, 70, "random", True, "bthd"),
    ("flash_docs_noncausal_40x700_d16", 2, 2, 1, 40, 700, 16, False, None, "random", False, "bhtd"),
    ("flash_masked_rows_docs_600x520_d8", 1, 1, 1, 600, 520, 8, True, 33, "per_window", False, "bhtd"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_against_oracle(case, dtype, seed=0):
    q, k, v, dout, seg, slopes = make_inputs(case, dtype, seed)
    _, b, _, _, t_q, t_k, d, causal, window, *_ = case
    scale = 1.0 / math.sqrt(d)
    mask = visible(b, t_q, t_k, causal, window, seg)
    ref = fwd_bwd(lambda *x: oracle(*x, mask, scale, slopes), q.double(), k.double(), v.double(), dout.double())
    base = fwd_bwd(lambda *x: sdpa_dense(*x, mask, scale, slopes), q, k, v, dout)
    got = fwd_bwd(lambda *x: op_attention(*x, causal, scale, slopes, window, seg), q, k, v, dout)
    for name, o, bs, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert o.dtype == dtype and o.shape == r.shape
        assert_two_x(o, bs, r, f"{case[0]} {name} ({dtype})")
    blind = ~mask.any(-1)  # (B, T_q): rows that see no key give zeros and no gradient
    assert (got[0].permute(0, 2, 1, 3)[blind] == 0).all()
    assert (got[1].permute(0, 2, 1, 3)[blind] == 0).all()
    return got


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", SMALL + LONG, ids=[c[0] for c in SMALL + LONG])
def test_masks_match_float64(case, dtype_name):
    check_against_oracle(case, DTYPES[dtype_name])


@pytest.mark.parametrize("seed", range(6))
def test_random_windows_and_splits(seed):
    """Random sizes, windows, document splits and options, both CPU paths (float32)."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    t_k = pick(2, 160) if seed % 2 else pick(GEMM_MAX_TK + 1, 620)
    t_q = min(t_k, pick(1, 160)) if seed % 3 else pick(1, t_k + 30)
    h_kv = pick(1, 2)
    window = pick(1, t_k) if seed != 4 else None
    case = (
        f"rand{seed}",
        pick(1, 2),
        h_kv * pick(1, 2),
        h_kv,
        t_q,
        t_k,
        pick(1, 5) * 8,
        bool(seed % 4),
        window,
        "random" if seed != 5 else None,
        bool(seed % 2),
        "bhtd",
    )
    check_against_oracle(case, torch.float32, seed)


def test_flash_loop_half_precision():
    check_against_oracle(("fp16_docs_win", 1, 2, 1, 77, 140, 24, True, 30, "random", True, "bthd"), torch.float16)


@pytest.mark.parametrize("case", [SMALL[4], SMALL[9], SMALL[10], LONG[1]], ids=lambda c: c[0])
def test_lse_float64(case):
    q, k, v, _, seg, slopes = make_inputs(case, torch.float64)
    _, b, _, _, t_q, t_k, _, causal, window, *_ = case
    out, lse = OPS.attention_fwd(q, k, v, causal, 0.3, slopes, window, seg)
    mask = visible(b, t_q, t_k, causal, window, seg)
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * 0.3
    if slopes is not None:
        s = s + alibi(slopes, t_q, t_k)
    ref_lse = torch.logsumexp(s.masked_fill(~mask[:, None], float("-inf")), -1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)  # -inf where nothing is seen
    torch.testing.assert_close(out, oracle(q, k, v, mask, 0.3, slopes), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [90, 600])
def test_masks_that_hide_nothing_change_nothing(dtype, t):
    """A window past every distance and one document for all: bit for bit the plain causal call."""
    q, k, v, dout, _, slopes = make_inputs(("", 1, 2, 1, t, t, 16, True, None, None, True, "bhtd"), dtype)
    plain = fwd_bwd(lambda *x: op_attention(*x, True, 0.25, slopes, None, None), q, k, v, dout)
    for window, seg in ((2 * t, None), (None, torch.full((1, t), 3)), (t, torch.zeros(1, t, dtype=torch.int32))):
        got = fwd_bwd(lambda *x: op_attention(*x, True, 0.25, slopes, window, seg), q, k, v, dout)
        for x, y in zip(got, plain):
            assert torch.equal(x, y)


@pytest.mark.parametrize("t_q,t_k", [(20, 100), (20, 700)])
def test_keys_nobody_sees_are_never_read(t_q, t_k):
    """NaN in keys/values outside every query's window and document: the outputs are untouched and
    those keys' gradients exactly zero (tiles outside the mask are skipped, masked columns of partly
    visible tiles give P = dS = 0 rather than 0 * NaN)."""
    q, k, v, dout, _, _ = make_inputs(("", 1, 2, 1, t_q, t_k, 16, True, None, None, False, "bhtd"), torch.float32)
    seg = torch.zeros(1, t_k, dtype=torch.int64)
    seg[:, t_k - 40 :] = 1  # the queries (the last t_q positions) sit in the last document
    clean = fwd_bwd(lambda *x: op_attention(*x, True, 0.25, None, 15, seg), q, k, v, dout)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, : t_k - 40] = float("nan")
    v_bad[:, :, : t_k - 40] = float("nan")
    got = fwd_bwd(lambda *x: op_attention(*x, True, 0.25, None, 15, seg), q, k_bad, v_bad, dout)
    for x, y in zip(got, clean):
        assert torch.equal(x, y)
    assert (got[2][:, :, : t_k - t_q - 14] == 0).all() and (got[3][:, :, : t_k - t_q - 14] == 0).all()


# ---- gradcheck and opcheck ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "causal,window,docs,h_kv,t_q,t_k,use_alibi",
    [
        (True, 3, "random", 2, 9, 9, False),
        (False, 2, None, 1, 6, 8, True),
        (True, None, "len1", 1, 10, 7, True),
        (True, 2, "edges", 2, 5, 11, False),
    ],
)
def test_gradcheck_float64(causal, window, docs, h_kv, t_q, t_k, use_alibi):
    case = ("", 1, 2, h_kv, t_q, t_k, 4, causal, window, docs, use_alibi, "bhtd")
    q, k, v, _, seg, slopes = make_inputs(case, torch.float64, seed=3)
    xs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *x: op_attention(*x, causal, 0.7, slopes, window, seg), xs)


def test_gradcheck_float64_flash_loop():
    case = ("", 1, 1, 1, 40, GEMM_MAX_TK + 9, 4, True, 25, "random", True, "bhtd")
    q, k, v, _, seg, slopes = make_inputs(case, torch.float64, seed=5)
    xs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *x: op_attention(*x, True, 0.7, slopes, 25, seg), xs, fast_mode=True)


def test_opcheck_attention_with_masks():
    case = ("", 2, 4, 2, 9, 13, 16, True, 4, "random", True, "bhtd")
    q, k, v, dout, seg, slopes = make_inputs(case, torch.float32, seed=1)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, slopes, 4, seg)
    torch.library.opcheck(OPS.attention_fwd.default, args)
    torch.library.opcheck(OPS.attention_fwd.default, args[:6], {"segment_ids": seg})
    out, lse = OPS.attention_fwd(*(x.detach() for x in args[:3]), *args[3:])
    torch.library.opcheck(
        OPS.attention_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25, slopes, 4, seg)
    )


# ---- the fused packed op (attention_qkv) --------------------------------------------------------
def rope_tables(t, d):
    ang = torch.outer(torch.arange(t, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    return ang.cos(), ang.sin()


def qkv_composed(qkv, h, h_kv, rope, mask, slopes, attend):
    """Split the packed projection, rotate q/k, attend with `attend`, merge the heads."""
    b, t, w = qkv.shape
    d = w // (h + 2 * h_kv)
    q, k, v = (x.reshape(b, t, -1, d).transpose(1, 2) for x in qkv.split([h * d, h_kv * d, h_kv * d], dim=-1))
    cos, sin = (x.to(qkv.dtype) for x in rope)

    def rot(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    y = attend(rot(q), rot(k), v, mask, 1.0 / math.sqrt(d), slopes)
    return y.transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize(
    "b,t,h,h_kv,d,window,docs,use_alibi",
    [
        (2, 97, 4, 2, 16, 13, "random", False),
        (1, 130, 3, 1, 8, None, "len1", True),
        (2, 70, 2, 2, 32, 64, None, False),
        (1, 40, 2, 1, 8, 5, "per_window", True),
    ],
)
def test_attention_qkv_with_masks_matches_float64(b, t, h, h_kv, d, window, docs, use_alibi):
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, generator=g)
    dout = torch.randn(b, t, h * d, generator=g)
    seg = None if docs is None else doc_ids(b, t, docs, g, window)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)]) if use_alibi else None
    rope = rope_tables(t, d)
    mask = visible(b, t, t, True, window, seg)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        y = fn(x)
        y.backward(dout.to(x.dtype))
        return y.detach(), x.grad

    ref = run(lambda x: qkv_composed(x, h, h_kv, rope, mask, slopes, oracle), qkv.double())
    base = run(lambda x: qkv_composed(x, h, h_kv, rope, mask, slopes, sdpa_dense), qkv)
    cos, sin = (x.float() for x in rope)
    got = run(lambda x: OPS.attention_qkv_fwd(x, h, h_kv, cos, sin, 1.0 / math.sqrt(d), slopes, window, seg)[0], qkv)
    for name, o, bs, r in zip(("out", "dqkv"), got, base, ref):
        assert_two_x(o, bs, r, f"attention_qkv {name}")


def test_attention_qkv_masks_gradcheck_and_opcheck():
    b, t, h, h_kv, d = 1, 7, 2, 1, 4
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(t, d)
    seg = torch.tensor([[0, 0, 0, 1, 2, 2, 2]])
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: OPS.attention_qkv_fwd(x, h, h_kv, cos, sin, 0.6, slopes, 2, seg)[0], (qkv,)
    )
    x32 = qkv.detach().float().requires_grad_()
    c32, s32 = cos.float(), sin.float()
    torch.library.opcheck(OPS.attention_qkv_fwd.default, (x32, h, h_kv, c32, s32, 0.6, slopes.float(), 2, seg))
    out, lse = OPS.attention_qkv_fwd(x32.detach(), h, h_kv, c32, s32, 0.6, slopes.float(), 2, seg)
    torch.library.opcheck(
        OPS.attention_qkv_bwd.default,
        (torch.randn_like(out), x32.detach(), out, lse, h, h_kv, c32, s32, 0.6, slopes.float(), 2, seg),
    )


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "window,seg,words",
    [
        (0, None, "window must be >= 1"),
        (-3, None, "window must be >= 1"),
        (None, torch.zeros(2, 5, dtype=torch.int64), r"segment_ids must have shape \(B, T_k\) = \(1, 7\)"),
        (None, torch.zeros(1, 7), "segment_ids must be int32 or int64"),
        (None, torch.tensor([[0, 0, 1, 1, 0, 2, 2]]), "non-decreasing"),
    ],
)
def test_bad_masks_are_refused(window, seg, words):
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 7, 8)
    with pytest.raises(RuntimeError, match=words):
        OPS.attention_fwd(q, k, k, True, 0.3, None, window, seg)
    out, lse = OPS.attention_fwd(q, k, k, True, 0.3, None)
    with pytest.raises(RuntimeError, match=words):
        OPS.attention_bwd(out, q, k, k, out, lse, True, 0.3, None, window, seg)
    qkv = torch.randn(1, 7, 24)
    with pytest.raises(RuntimeError, match=words):
        OPS.attention_qkv_fwd(qkv, 1, 1, None, None, 0.3, None, window, seg)
