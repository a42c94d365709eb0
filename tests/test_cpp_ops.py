"""The C++ extension ops (``torch.ops.fastlm.*`` from ``fastlm._C``): CPU kernels against the
float64 oracle (forward, backward, LSE), float64 gradcheck, ``torch.library.opcheck``, clear
errors, and the ``cpp`` backend through :mod:`fastlm.ops`. CUDA parity at real sizes runs when a
GPU and a CUDA build are present and is skipped with the reason otherwise.

Tolerance (FlashAttention's rule): ``max|out - ref64| <= 2 * max|base - ref64| + eps`` where
``base`` is the ``torch`` backend (SDPA) in the same dtype, or the textbook formula in that dtype
where SDPA cannot express the call, and ``eps`` is half an ulp at the largest reference value.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastlm import ops
from fastlm.ops import extension as _ext
from fastlm.ops.reference import attention_forward, naive_attention

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"{_ext._IMPORT_ERROR}")

OPS = torch.ops.fastlm if _ext._C is not None else None
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (name, B, H, H_kv, T_q, T_k, D, causal, alibi)
CASES = [
    ("t1_d16", 2, 2, 2, 1, 1, 16, True, False),
    ("t17_d40", 2, 3, 3, 17, 17, 40, True, False),
    ("t97_d64", 1, 2, 2, 97, 97, 64, True, False),
    ("t97_d80_noncausal", 1, 2, 2, 97, 97, 80, False, False),
    ("gqa4_t17_d16", 1, 4, 1, 17, 17, 16, True, False),
    ("gqa2_alibi_t97_d40", 1, 4, 2, 97, 97, 40, True, True),
    ("alibi_noncausal_t17_d64", 2, 2, 2, 17, 17, 64, False, True),
    ("kvcache_17x97_d64", 1, 2, 2, 17, 97, 64, True, False),
    ("decode_1x97_d80_alibi", 16, 4, 2, 1, 97, 80, True, True),
    ("masked_rows_97x17_d16", 1, 2, 2, 97, 17, 16, True, False),
    ("tiles_130x130_d16", 1, 1, 1, 130, 130, 16, True, False),
    # float32/float64 run through BLAS GEMMs up to T_k = 512 (gemm_max_tk), the flash loop beyond
    ("gemm_edge_70x512_d24", 1, 2, 1, 70, 512, 24, True, True),
    ("flash_loop_40x530_d24", 1, 2, 1, 40, 530, 24, True, True),
]


def make_inputs(b, h, h_kv, t_q, t_k, d, dtype, alibi, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # (B, T, H, D) storage viewed as (B, H, T, D): strided, no copy
        q = torch.randn(b, t_q, h, d, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(b, t_k, h_kv, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, t_k, h_kv, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, hh, t, d, generator=g).to(dtype) for hh, t in ((h, t_q), (h_kv, t_k), (h_kv, t_k)))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)]) if alibi else None
    return q, k, v, slopes


def fwd_bwd(fn, q, k, v, dout):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in xs]


def assert_two_x(out, base, ref, what):
    ref = ref.double()
    eps = torch.finfo(out.dtype).eps * ref.abs().max().item() / 2 + 1e-12
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err <= 2 * base_err + eps, f"{what}: error {err:.3g} > 2 x baseline {base_err:.3g} + {eps:.2g}"


def _base_fn(causal, scale, slopes, dtype, q, k):
    if ops.torch_backend.BACKEND.attention_unsupported(q, k, k, causal, scale, slopes) is None:
        return lambda a, b_, c: ops.attention(
            a, b_, c, causal=causal, scale=scale, alibi_slopes=slopes, backend="torch"
        )
    return lambda a, b_, c: naive_attention(a, b_, c, causal, scale, slopes, dtype=dtype).to(dtype)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_fwd_bwd_matches_float64(case, dtype_name):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    dtype = DTYPES[dtype_name]
    q, k, v, slopes = make_inputs(b, h, h_kv, t_q, t_k, d, dtype, alibi)
    scale = 1.0 / math.sqrt(d)
    dout = torch.randn(b, h, t_q, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = fwd_bwd(
        lambda a, b_, c: naive_attention(a, b_, c, causal, scale, slopes),
        q.double(),
        k.double(),
        v.double(),
        dout.double(),
    )
    base = fwd_bwd(_base_fn(causal, scale, slopes, dtype, q, k), q, k, v, dout)
    got = fwd_bwd(
        lambda a, b_, c: ops.attention(a, b_, c, causal=causal, scale=scale, alibi_slopes=slopes, backend="cpp"),
        q,
        k,
        v,
        dout,
    )
    for name, o, bs, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert o.dtype == dtype and o.shape == r.shape
        assert_two_x(o, bs, r, f"{name} ({dtype_name})")
    if causal and t_q > t_k:  # rows that see no key: zeros, not NaN
        assert (got[0][:, :, : t_q - t_k] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_lse_matches_reference(case):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v, slopes = make_inputs(b, h, h_kv, t_q, t_k, d, torch.float64, alibi)
    out, lse = OPS.attention_fwd(q, k, v, causal, 0.3, slopes)
    ref_out, ref_lse = attention_forward(q, k, v, causal, 0.3, slopes)
    assert lse.dtype == torch.float64 and lse.shape == (b, h, t_q)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)  # -inf where fully masked
    _, lse32 = OPS.attention_fwd(q.float(), k.float(), v.float(), causal, 0.3, slopes)
    assert lse32.dtype == torch.float32


@pytest.mark.parametrize("layout", ["bthd", "permuted"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_attention_strided_inputs(layout, dtype_name):
    dtype = DTYPES[dtype_name]
    b, h, h_kv, t_q, t_k, d = 2, 4, 2, 33, 45, 40
    if layout == "bthd":
        q, k, v, slopes = make_inputs(b, h, h_kv, t_q, t_k, d, dtype, True, layout="bthd")
    else:  # (B, H, D, T) storage: the head dim is the strided one
        q, k, v, slopes = make_inputs(b, h, h_kv, t_q, t_k, d, dtype, True)
        q, k, v = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    assert not q.is_contiguous()
    dout = torch.randn(b, t_q, h, d).to(dtype).transpose(1, 2)
    got = fwd_bwd(lambda a, b_, c: ops.attention(a, b_, c, alibi_slopes=slopes, backend="cpp"), q, k, v, dout)
    dense = fwd_bwd(
        lambda a, b_, c: ops.attention(a, b_, c, alibi_slopes=slopes, backend="cpp"),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        dout.contiguous(),
    )
    for x, y in zip(got, dense):  # same math, different memory layout: identical results
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_attention_overlapping_rows_are_read_safely():
    """k/v broadcast along T (stride 0) or with a row stride below D: the BLAS path cannot take such
    rows as a matrix; the kernel copies them and gets what the dense tensors give."""
    q, k, v, slopes = make_inputs(2, 4, 2, 21, 21, 16, torch.float32, True, seed=7)
    k_b = k[:, :, :1].expand(-1, -1, 21, -1)
    v_b = v[:, :, 3:4].expand(-1, -1, 21, -1)
    dout = torch.randn(2, 4, 21, 16)
    got = OPS.attention_fwd(q, k_b, v_b, True, 0.25, slopes)
    dense = OPS.attention_fwd(q, k_b.contiguous(), v_b.contiguous(), True, 0.25, slopes)
    for x, y in zip(got, dense):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    g = OPS.attention_bwd(dout, q, k_b, v_b, got[0], got[1], True, 0.25, slopes)
    g_dense = OPS.attention_bwd(dout, q, k_b.contiguous(), v_b.contiguous(), dense[0], dense[1], True, 0.25, slopes)
    for x, y in zip(g, g_dense):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "causal,alibi,h_kv,t_q,t_k",
    [(True, False, 2, 5, 5), (False, True, 1, 4, 7), (True, True, 2, 6, 3), (True, False, 1, 3, 9)],
)
def test_attention_gradcheck_float64(causal, alibi, h_kv, t_q, t_k):
    q, k, v, slopes = make_inputs(1, 2, h_kv, t_q, t_k, 8, torch.float64, alibi, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def fn(a, b_, c):
        return ops.attention(a, b_, c, causal=causal, alibi_slopes=slopes, backend="cpp")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_swiglu_gradcheck_float64():
    g = torch.randn(3, 19, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 19, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.swiglu(a, b, backend="cpp"), (g, u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 33, 4099])
def test_swiglu_fwd_bwd_matches_float64(dtype, n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4
    u = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
    dout = torch.randn(n, generator=torch.Generator().manual_seed(n + 2))
    g, u, dout = g.to(dtype), u.to(dtype), dout.to(dtype)

    def run(fn, *xs, do):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        out.backward(do)
        return [out.detach()] + [x.grad for x in xs]

    ref = run(lambda a, b: torch.nn.functional.silu(a) * b, g.double(), u.double(), do=dout.double())
    base = run(lambda a, b: torch.nn.functional.silu(a) * b, g, u, do=dout)
    got = run(lambda a, b: ops.swiglu(a, b, backend="cpp"), g, u, do=dout)
    for name, o, bs, r in zip(("out", "dgate", "dup"), got, base, ref):
        assert o.dtype == dtype
        assert_two_x(o, bs, r, f"swiglu {name} {dtype}")


def test_swiglu_non_contiguous_and_nd():
    g = torch.randn(6, 10, 12).transpose(0, 2)
    u = torch.randn(12, 10, 6)
    out = ops.swiglu(g, u, backend="cpp")
    torch.testing.assert_close(out, torch.nn.functional.silu(g) * u)


def _opcheck_attention_args(dtype=torch.float32, alibi=True):
    q, k, v, slopes = make_inputs(1, 4, 2, 9, 13, 16, dtype, alibi, seed=5)
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25, slopes)


@pytest.mark.parametrize("alibi", [False, True])
def test_opcheck_attention_fwd(alibi):
    torch.library.opcheck(OPS.attention_fwd.default, _opcheck_attention_args(alibi=alibi))


def test_opcheck_attention_bwd():
    q, k, v, causal, scale, slopes = _opcheck_attention_args()
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = OPS.attention_fwd(q, k, v, causal, scale, slopes)
    torch.library.opcheck(OPS.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, causal, scale, slopes))


def test_opcheck_swiglu():
    g = torch.randn(5, 9, requires_grad=True)
    u = torch.randn(5, 9, requires_grad=True)
    torch.library.opcheck(OPS.swiglu_fwd.default, (g, u))
    torch.library.opcheck(OPS.swiglu_bwd.default, (torch.randn(5, 9), g.detach(), u.detach()))


def test_opcheck_swiglu_packed():
    x = torch.randn(3, 4, 18, requires_grad=True)
    torch.library.opcheck(OPS.swiglu_packed_fwd.default, (x,))
    strided = torch.randn(3, 30)[:, 2:20]  # row stride 30
    torch.library.opcheck(OPS.swiglu_packed_fwd.default, (strided,))
    torch.library.opcheck(OPS.swiglu_packed_bwd.default, (torch.randn(3, 4, 9), x.detach()))


def test_swiglu_packed_backward_is_fresh_and_in_place_read():
    big = torch.randn(6, 50)
    x = big[:, 5:45]  # a view: the kernel must read it in place and leave it alone
    before = big.clone()
    dout = torch.randn(6, 20)
    dx = OPS.swiglu_packed_bwd(dout, x)
    assert torch.equal(big, before) and dx.is_contiguous() and dx.shape == x.shape
    gate, up = x.double().chunk(2, -1)
    sig = torch.sigmoid(gate)
    d = dout.double()
    want = torch.cat([d * up * sig * (1 + gate * (1 - sig)), d * gate * sig], dim=-1)
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-6)


def test_swiglu_large_outputs_use_their_own_allocation_correctly():
    """Outputs >= 32 MiB come from the kernel's huge-page allocation: same values, usable as
    gradients (accumulated in place by autograd), freed with the tensor."""
    g = torch.Generator().manual_seed(11)
    gate = torch.randn(4096, 2048, generator=g, requires_grad=True)
    up = torch.randn(4096, 2048, generator=g, requires_grad=True)
    for _ in range(2):  # the second backward accumulates into the first one's gradient tensors
        ops.swiglu(gate, up, backend="cpp").sum().backward()
    sig = torch.sigmoid(gate.detach())
    want_du = gate.detach() * sig
    want_dg = up.detach() * sig * (1 + gate.detach() * (1 - sig))
    torch.testing.assert_close(up.grad, 2 * want_du, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate.grad, 2 * want_dg, rtol=1e-5, atol=1e-5)
    x = torch.cat([gate.detach(), up.detach()], dim=1)
    out = OPS.swiglu_packed_fwd(x)
    torch.testing.assert_close(out, want_du * up.detach(), rtol=1e-6, atol=1e-6)
    dx = OPS.swiglu_packed_bwd(torch.ones_like(out), x)
    torch.testing.assert_close(dx, torch.cat([want_dg, want_du], dim=1), rtol=1e-5, atol=1e-5)
    out.add_(1.0)  # an ordinary, writable tensor
    del out, dx


def test_swiglu_packed_op_errors():
    with pytest.raises(RuntimeError, match="even"):
        OPS.swiglu_packed_fwd(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        OPS.swiglu_packed_fwd(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="dout must have"):
        OPS.swiglu_packed_bwd(torch.randn(3, 3), torch.randn(3, 4))


def test_backward_writes_fresh_tensors():
    q, k, v, _ = make_inputs(1, 2, 2, 8, 8, 16, torch.float32, False)
    out, lse = OPS.attention_fwd(q, k, v, True, 0.25, None)
    dout = torch.randn_like(out)
    before = [x.clone() for x in (dout, q, k, v, out, lse)]
    dq, dk, dv = OPS.attention_bwd(dout, q, k, v, out, lse, True, 0.25, None)
    for x, y in zip((dout, q, k, v, out, lse), before):
        assert torch.equal(x, y)
    assert len({t.data_ptr() for t in (dq, dk, dv, dout, q, k, v)}) == 7


@pytest.mark.parametrize(
    "args,words",
    [
        (lambda q, k, v: (q.to(torch.int32), k, v), "dtype"),
        (lambda q, k, v: (q, k.double(), v), "dtypes differ"),
        (lambda q, k, v: (q[0], k, v), "4-D"),
        (lambda q, k, v: (q, k, v[:, :, :3]), "shapes differ"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), "head dim"),
        (lambda q, k, v: (q[:, :3], k, v), "multiple of kv heads"),
    ],
)
def test_attention_op_errors(args, words):
    q, k, v, _ = make_inputs(1, 4, 2, 5, 5, 16, torch.float32, False)
    with pytest.raises(RuntimeError, match=words):
        OPS.attention_fwd(*args(q, k, v), True, 0.25, None)


def test_attention_op_rejects_bad_alibi_and_lse():
    q, k, v, _ = make_inputs(1, 4, 2, 5, 5, 16, torch.float32, False)
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        OPS.attention_fwd(q, k, v, True, 0.25, torch.ones(3))
    out, lse = OPS.attention_fwd(q, k, v, True, 0.25, None)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        OPS.attention_bwd(out, q, k, v, out, lse[:, :2], True, 0.25, None)


def test_swiglu_op_errors():
    with pytest.raises(RuntimeError, match="shapes differ"):
        OPS.swiglu_fwd(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        OPS.swiglu_fwd(torch.randn(3), torch.randn(3).double())
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        OPS.swiglu_fwd(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))


def test_backend_objects_report_reasons():
    q, k, v, _ = make_inputs(1, 2, 2, 4, 4, 16, torch.float32, False)
    assert _ext.CPP_BACKEND.unavailable_reason() is None
    assert _ext.CPP_BACKEND.attention_unsupported(q, k, v, True, 0.25, None) is None
    assert "dtype" in _ext.CPP_BACKEND.swiglu_unsupported(
        torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    )
    assert "cuda" in _ext.CUDA_BACKEND.attention_unsupported(q, k, v, True, 0.25, None)
    assert isinstance(_ext._C.has_cuda(), bool)
    if not torch.cuda.is_available():
        assert _ext.CUDA_BACKEND.unavailable_reason() is not None


def test_cpp_backend_through_ops_and_compile():
    q, k, v, slopes = make_inputs(1, 4, 2, 16, 16, 16, torch.float32, True)
    expect = ops.attention(q, k, v, alibi_slopes=slopes, backend="reference")
    got = ops.attention(q, k, v, alibi_slopes=slopes, backend="cpp")
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    fn = torch.compile(
        lambda a, b, c: ops.attention(a, b, c, alibi_slopes=slopes, backend="cpp"), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(fn(q, k, v), got, rtol=0, atol=0)


# ---- CUDA (real sizes; skipped without a GPU and a CUDA build) -----------------------------------
def _require_cuda():
    why = _ext.CUDA_BACKEND.unavailable_reason()
    if why is not None:
        pytest.skip(f"cuda backend unavailable: {why}")


CUDA_CASES = [
    ("t1024_d64", 2, 8, 8, 1024, 1024, 64, True, False),
    ("t1000_d128", 1, 4, 4, 1000, 1000, 128, True, False),
    ("gqa_alibi_t517_d64", 2, 8, 2, 517, 517, 64, True, True),
    ("noncausal_t333_d128", 2, 4, 4, 333, 333, 128, False, False),
    ("kvcache_77x1025_d64", 1, 4, 2, 77, 1025, 64, True, True),
    ("masked_rows_300x100_d64", 1, 2, 2, 300, 100, 64, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_attention_matches_float64(case, dtype):
    _require_cuda()
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v, slopes = make_inputs(b, h, h_kv, t_q, t_k, d, dtype, alibi, layout="bthd")
    q, k, v = (x.cuda() for x in (q, k, v))
    slopes = slopes.cuda() if slopes is not None else None
    scale = 1.0 / math.sqrt(d)
    dout = torch.randn(b, h, t_q, d, device="cuda").to(dtype)
    ref = fwd_bwd(
        lambda a, b_, c: naive_attention(a, b_, c, causal, scale, slopes),
        q.double(),
        k.double(),
        v.double(),
        dout.double(),
    )
    base = fwd_bwd(_base_fn(causal, scale, slopes, dtype, q, k), q, k, v, dout)
    got = fwd_bwd(
        lambda a, b_, c: ops.attention(a, b_, c, causal=causal, scale=scale, alibi_slopes=slopes, backend="cuda"),
        q,
        k,
        v,
        dout,
    )
    for name, o, bs, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert_two_x(o.cpu(), bs.cpu(), r.cpu(), f"cuda {name}")


@pytest.mark.gpu
def test_cuda_attention_refuses_what_it_cannot_run():
    _require_cuda()
    q = torch.randn(1, 2, 8, 80, device="cuda", dtype=torch.float16)
    assert "head dim" in _ext.CUDA_BACKEND.attention_unsupported(q, q, q, True, 0.1, None)
    with pytest.raises(RuntimeError, match="head dim"):
        OPS.attention_fwd(q, q, q, True, 0.1, None)
    q32 = torch.randn(1, 2, 8, 64, device="cuda")
    assert "float16/bfloat16" in _ext.CUDA_BACKEND.attention_unsupported(q32, q32, q32, True, 0.1, None)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.attention_fwd(q32, q32, q32, True, 0.1, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [8192 * 2048 + 3, 1000])
def test_cuda_swiglu_matches_float64(dtype, n):
    _require_cuda()
    g, u, dout = (torch.randn(n, device="cuda").to(dtype) for _ in range(3))
    xs = [x.clone().requires_grad_() for x in (g, u)]
    out = ops.swiglu(*xs, backend="cuda")
    out.backward(dout)
    rg, ru = (x.double().requires_grad_() for x in (g, u))
    ref = torch.nn.functional.silu(rg) * ru
    ref.backward(dout.double())
    bg, bu = (x.clone().requires_grad_() for x in (g, u))
    base = torch.nn.functional.silu(bg) * bu
    base.backward(dout)
    for o, bs, r in ((out, base, ref), (xs[0].grad, bg.grad, rg.grad), (xs[1].grad, bu.grad, ru.grad)):
        assert_two_x(o.detach().cpu(), bs.detach().cpu(), r.detach().cpu(), f"cuda swiglu {dtype}")


# ---- packed self-attention with RoPE inside (attention_qkv) -------------------------------------
def _rope64(t, d):
    ang = torch.outer(
        torch.arange(t, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    )
    return ang.cos(), ang.sin()


def _composed64(qkv, h, h_kv, rope, slopes):
    """The oracle: split, rotate (float64), naive attention (float64), merge heads."""
    b, t, w = qkv.shape
    d = w // (h + 2 * h_kv)
    q, k, v = qkv.double().split([h * d, h_kv * d, h_kv * d], dim=-1)
    q, k, v = (x.reshape(b, t, -1, d).transpose(1, 2) for x in (q, k, v))
    if rope is not None:
        cos, sin = (x.double() for x in rope)

        def rot(x):
            x1, x2 = x[..., : d // 2], x[..., d // 2 :]
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

        q, k = rot(q), rot(k)
    y = naive_attention(q, k, v, True, 1.0 / math.sqrt(d), slopes)
    return y.transpose(1, 2).reshape(b, t, h * d)


QKV_CASES = [  # (name, B, T, H, H_kv, D, rope, alibi)
    ("rope_t9_d8_gqa", 2, 9, 4, 2, 8, True, False),
    ("rope_t70_d32_alibi", 2, 70, 3, 3, 32, True, True),
    ("norope_t128_d32_mqa", 1, 128, 3, 1, 32, False, False),
    ("rope_t130_d16", 1, 130, 2, 2, 16, True, False),  # three row blocks, the last partial
]


@pytest.mark.parametrize("case", QKV_CASES, ids=[c[0] for c in QKV_CASES])
def test_attention_qkv_fused_matches_float64(case):
    _, b, t, h, h_kv, d, use_rope, alibi = case
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, generator=g)
    dout = torch.randn(b, t, h * d, generator=g)
    rope = tuple(x.float() for x in _rope64(t, d)) if use_rope else None
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)]) if alibi else None
    assert (
        ops.attention_backend(*(torch.randn(b, hh, t, d) for hh in (h, h_kv, h_kv)), alibi_slopes=slopes, backend="cpp")
        == "cpp"
    )

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        y = fn(x)
        y.backward(dout.to(x.dtype))
        return y.detach(), x.grad

    ref = run(lambda x: _composed64(x, h, h_kv, rope, slopes), qkv.double())
    base = run(lambda x: ops.attention_qkv(x, h, h_kv, rope=rope, alibi_slopes=slopes, backend="torch"), qkv)
    got = run(lambda x: ops.attention_qkv(x, h, h_kv, rope=rope, alibi_slopes=slopes, backend="cpp"), qkv)
    for name, o, bs, r in zip(("out", "dqkv"), got, base, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        assert_two_x(o, bs, r, f"attention_qkv {name}")


def test_attention_qkv_fused_op_is_used_and_strided_rows_are_read_in_place(monkeypatch):
    """The cpp call goes through the one fused op (no attention_fwd), and a qkv whose rows are wider
    than its width (a column slice of a bigger tensor) gives what its contiguous copy gives."""
    b, t, h, d = 2, 33, 3, 16
    wide = torch.randn(b, t, 5 * h * d)
    qkv = wide[..., : 3 * h * d]  # row stride 5 H D
    rope = tuple(x.float() for x in _rope64(t, d))
    seen = []
    real = torch.ops.fastlm.attention_fwd
    monkeypatch.setattr(OPS, "attention_fwd", lambda *a: seen.append("attention_fwd") or real(*a))
    y = ops.attention_qkv(qkv, h, rope=rope, backend="cpp")
    assert seen == []
    torch.testing.assert_close(y, ops.attention_qkv(qkv.contiguous(), h, rope=rope, backend="cpp"), rtol=0, atol=0)


def test_attention_qkv_gradcheck_float64():
    b, t, h, h_kv, d = 1, 6, 2, 1, 4
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, dtype=torch.float64, requires_grad=True)
    rope = _rope64(t, d)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: ops.attention_qkv(x, h, h_kv, rope=rope, alibi_slopes=slopes, backend="cpp"), (qkv,)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_qkv_in_reduced_precision_runs_the_fused_op_in_float32(monkeypatch, dtype):
    """A float16 qkv, and a bfloat16 one where the bf16 products are off (a CPU without AVX512-BF16, or
    FASTLM_CPU_BF16_DOT=0; tests/test_attention_bf16.py has them on), takes the fused op on its float32
    upcast: output and gradient are exactly the float32 op's, rounded to qkv's dtype; no composed call."""
    before = _ext.cpu_bf16_products()
    _ext.cpu_bf16_products(False)
    try:
        _reduced_precision_runs_in_float32(monkeypatch, dtype)
    finally:
        _ext.cpu_bf16_products(before)


def _reduced_precision_runs_in_float32(monkeypatch, dtype):
    b, t, h, h_kv, d = 2, 40, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, generator=g).to(dtype)
    dout = torch.randn(b, t, h * d, generator=g).to(dtype)
    rope = tuple(x.float() for x in _rope64(t, d))
    seen = []
    real = torch.ops.fastlm.attention_fwd
    monkeypatch.setattr(OPS, "attention_fwd", lambda *a: seen.append("attention_fwd") or real(*a))
    x = qkv.clone().requires_grad_()
    y = ops.attention_qkv(x, h, h_kv, rope=rope, backend="cpp")
    y.backward(dout)
    x32 = qkv.float().requires_grad_()
    y32 = ops.attention_qkv(x32, h, h_kv, rope=rope, backend="cpp")
    y32.backward(dout.float())
    assert seen == [] and y.dtype == dtype and x.grad.dtype == dtype
    assert torch.equal(y, y32.to(dtype)) and torch.equal(x.grad, x32.grad.to(dtype))
    assert (y.double() - _composed64(qkv, h, h_kv, rope, None)).abs().max() < 3e-2


def test_attention_qkv_composes_where_the_fused_op_does_not_run():
    """Keys past gemm_max_tk and non-causal calls compose split + rotate + attention."""
    h, d = 2, 8
    for t, dtype, causal in (
        (_ext.CPP_BACKEND.gemm_max_tk + 3, torch.float32, True),
        (_ext.CPP_BACKEND.gemm_max_tk + 3, torch.bfloat16, True),
        (17, torch.float32, False),
    ):
        qkv = torch.randn(1, t, 3 * h * d).to(dtype)
        rope = tuple(x.float() for x in _rope64(t, d))
        got = ops.attention_qkv(qkv, h, rope=rope, causal=causal, backend="cpp")
        want = _composed64(qkv, h, h, rope, None) if causal else None
        if want is not None:
            assert (got.double() - want).abs().max() < (3e-2 if dtype == torch.bfloat16 else 1e-5)
        assert got.shape == (1, t, h * d) and got.dtype == dtype


def test_attention_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heads of one size"):
        ops.attention_qkv(torch.randn(1, 4, 50), 2, 1)
    with pytest.raises(ValueError, match="rope tables"):
        ops.attention_qkv(torch.randn(1, 4, 48), 2, 2, rope=(torch.ones(4, 3), torch.ones(4, 3)))
    with pytest.raises(ValueError, match="positive multiple"):
        ops.attention_qkv(torch.randn(1, 4, 48), 3, 2)
    with pytest.raises(RuntimeError, match="T <= 512"):
        OPS.attention_qkv_fwd(torch.randn(1, 600, 24), 2, 2, None, None, 0.5, None)


def test_opcheck_attention_qkv():
    b, t, h, h_kv, d = 1, 9, 4, 2, 8
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, requires_grad=True)
    cos, sin = (x.float() for x in _rope64(t, d))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    torch.library.opcheck(OPS.attention_qkv_fwd.default, (qkv, h, h_kv, cos, sin, 0.3, slopes))
    out, lse = OPS.attention_qkv_fwd(qkv.detach(), h, h_kv, cos, sin, 0.3, slopes)
    torch.library.opcheck(
        OPS.attention_qkv_bwd.default, (torch.randn_like(out), qkv.detach(), out, lse, h, h_kv, cos, sin, 0.3, slopes)
    )


def test_attention_qkv_head_counts_cannot_wrap():
    """n_head + 2 n_kv_head wrapped for absurd counts (undefined behaviour; before: a head size of -1
    and a misleading "needs T <= 512" refusal). An empty tensor may be that wide."""
    wide = torch.empty(0, 1, 2**62)
    with pytest.raises(RuntimeError, match="heads"):
        OPS.attention_qkv_fwd(wide, 2**62, 2**62, None, None, 0.5, None)


def test_muon_step_refuses_a_tensor_listed_twice():
    """Two threads updated one parameter at once when it was listed twice (before: accepted)."""
    p, g, b = torch.randn(8, 8), torch.randn(8, 8), torch.zeros(8, 8)
    q, g2, b2 = torch.randn(8, 8), torch.randn(8, 8), torch.zeros(8, 8)
    coeffs = [3.4445, -4.775, 2.0315]
    with pytest.raises(RuntimeError, match="overlap"):
        OPS.muon_step_([p, p], [g, g2], [b, b2], 0.1, 0.9, True, 0.0, 5, coeffs, 1e-7)
    with pytest.raises(RuntimeError, match="overlap"):  # one buffer for two parameters
        OPS.muon_step_([p, q], [g, g2], [b, b], 0.1, 0.9, True, 0.0, 5, coeffs, 1e-7)
    with pytest.raises(RuntimeError, match="overlap"):  # a buffer that is a parameter
        OPS.muon_step_([p, q], [g, g2], [b, p], 0.1, 0.9, True, 0.0, 5, coeffs, 1e-7)
    OPS.muon_step_([p, q], [g, g], [b, b2], 0.1, 0.9, True, 0.0, 5, coeffs, 1e-7)  # one grad read twice is fine
