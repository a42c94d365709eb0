"""fastlm.ops: every backend against the float64 oracle, plus dispatch and input validation.

Tolerance (FlashAttention's rule): ``max|out - ref64| <= 2 * max|base - ref64| + eps`` where
``base`` is the textbook formula computed entirely in the same dtype and ``eps`` is a quarter of
an ulp at the output's largest magnitude. Backends that cannot run here are *skipped* with the
reason :func:`fastlm.ops.backend_status` gives.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.ops import BackendUnavailableError
from fastlm.ops.positions import alibi_slopes
from fastlm.ops.reference import naive_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (name, B, H, H_kv, T_q, T_k, D, causal, alibi)
CASES = [
    ("t1_d16", 2, 2, 2, 1, 1, 16, True, False),
    ("t17_d40", 2, 3, 3, 17, 17, 40, True, False),
    ("t97_d64", 1, 2, 2, 97, 97, 64, True, False),
    ("noncausal_t17_d64", 2, 2, 2, 17, 17, 64, False, False),
    ("kvcache_5x23_d40", 2, 2, 2, 5, 23, 40, True, False),
    ("noncausal_5x23_d16", 1, 2, 2, 5, 23, 16, False, False),
    ("decode_1x17_d16", 2, 2, 2, 1, 17, 16, True, False),
    ("gqa2_t17_d16", 2, 4, 2, 17, 17, 16, True, False),
    ("gqa1_t97_d40", 1, 4, 1, 97, 97, 40, True, False),
    ("alibi_t17_d64", 1, 4, 4, 17, 17, 64, True, True),
    ("alibi_noncausal_t17_d16", 2, 4, 4, 17, 17, 16, False, True),
    ("alibi_gqa_5x23_d40", 1, 4, 2, 5, 23, 40, True, True),
    ("alibi_noncausal_23x5_d16", 1, 4, 4, 23, 5, 16, False, True),
    ("masked_rows_23x5_d16", 1, 2, 2, 23, 5, 16, True, False),
]


def _device_for(backend):
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def require_backend(name):
    """Skip (with the backend's own reason) unless ``name`` can run in this process."""
    if name == "triton":
        pytest.skip("triton is tested in its own test file (GPU or TRITON_INTERPRET=1)")
    why = ops.backend_status()[name]
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    dev = _device_for(name)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"backend {name!r} needs a CUDA device")
    return ops.backend._load(name), dev


def make_qkv(b, h, h_kv, t_q, t_k, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t_q, d, generator=g)
    k = torch.randn(b, h_kv, t_k, d, generator=g)
    v = torch.randn(b, h_kv, t_k, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def run_with_grads(fn, inputs, dout):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [x.grad for x in inputs]


def assert_two_x(out, base, ref, what, floor=0.0):
    """The 2x rule with ``eps`` = half an ulp of out's dtype at max|ref| (its final rounding) plus
    ``floor`` (an absolute term for results whose exact value is ~0, see the gradient check)."""
    ref = ref.double().cpu()
    eps = torch.finfo(out.dtype).eps * ref.abs().max().item() / 2 + floor
    err = (out.double().cpu() - ref).abs().max().item()
    base_err = (base.double().cpu() - ref).abs().max().item()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err <= 2 * base_err + eps, f"{what}: error {err:.3g} > 2 x same-dtype naive {base_err:.3g}"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_attention_matches_float64(backend, case, dtype_name):
    obj, dev = require_backend(backend)
    dtype = DTYPES[dtype_name]
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    q, k, v = make_qkv(b, h, h_kv, t_q, t_k, d, dtype, dev)
    slopes = alibi_slopes(h).to(dev) if alibi else None
    why = obj.attention_unsupported(q, k, v, causal, d**-0.5, slopes)
    if why is not None:
        pytest.skip(f"backend {backend!r} does not support this call: {why}")
    dout = torch.randn(b, h, t_q, d, generator=torch.Generator().manual_seed(1)).to(dev, dtype)

    out, grads = run_with_grads(
        lambda q, k, v: ops.attention(q, k, v, causal=causal, alibi_slopes=slopes, backend=backend), (q, k, v), dout
    )
    base, base_grads = run_with_grads(
        lambda q, k, v: naive_attention(q, k, v, causal=causal, alibi_slopes=slopes, dtype=dtype), (q, k, v), dout
    )
    ref, ref_grads = run_with_grads(
        lambda q, k, v: naive_attention(q, k, v, causal=causal, alibi_slopes=slopes), (q, k, v), dout.double()
    )

    assert out.shape == (b, h, t_q, d) and out.dtype == dtype and out.device.type == dev
    assert_two_x(out, base, ref, "out")
    # dS = P * (dO V^T - rowsum(dO * O)) cancels in fp32 at the scale |dO| |O|; where the exact
    # gradient is 0 (a row with one visible key) the naive formula can be exact, so allow 2 fp32
    # ulps at that scale on top
    floor = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item() * dout.abs().max().item()
    for name, x, g, bg, rg in zip(("dq", "dk", "dv"), (q, k, v), grads, base_grads, ref_grads):
        assert g.shape == x.shape and g.dtype == dtype, name
        assert_two_x(g, bg, rg, name, floor=floor)
    if t_q > t_k and causal:  # rows that see no key: exact zeros
        n = t_q - t_k
        assert torch.equal(out[:, :, :n], torch.zeros_like(out[:, :, :n]))


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_attention_strided_input(backend, dtype_name):
    """A (B, T, H, D) tensor viewed as (B, H, T, D) gives the same result as a contiguous copy."""
    obj, dev = require_backend(backend)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(2)
    b, t, h, h_kv, d = 2, 17, 4, 2, 40
    qkv = torch.randn(b, t, h + 2 * h_kv, d, generator=g).to(dev, dtype)  # fused projection layout
    q, k, v = qkv.split([h, h_kv, h_kv], dim=2)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D) views, no copy
    assert not q.is_contiguous() and not k.is_contiguous()
    if obj.attention_unsupported(q, k, v, True, d**-0.5, None) is not None:
        pytest.skip(f"backend {backend!r} does not support this call")
    dout = torch.randn(b, h, t, d, generator=g).to(dev, dtype)
    out, grads = run_with_grads(lambda q, k, v: ops.attention(q, k, v, backend=backend), (q, k, v), dout)
    q_c, k_c, v_c = (x.contiguous() for x in (q, k, v))
    out_c, grads_c = run_with_grads(lambda q, k, v: ops.attention(q, k, v, backend=backend), (q_c, k_c, v_c), dout)
    # same math on the same values: agreement to the dtype's rounding of one accumulation order
    tol = {"fp32": 1e-6, "bf16": 1e-2}[dtype_name]
    torch.testing.assert_close(out, out_c, rtol=0, atol=tol * out_c.abs().max().item())
    for gs, gc in zip(grads, grads_c):
        torch.testing.assert_close(gs, gc, rtol=0, atol=tol * gc.abs().max().item())
    ref = naive_attention(q, k, v, causal=True)
    base = naive_attention(q, k, v, causal=True, dtype=dtype)
    assert_two_x(out, base, ref, "strided out")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_attention_gradcheck_float64(backend):
    obj, dev = require_backend(backend)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = alibi_slopes(4)
    for causal, sl in ((True, None), (False, None), (True, slopes)):
        if obj.attention_unsupported(q, k, v, causal, 8**-0.5, sl) is not None:
            continue
        fn = lambda q, k, v: ops.attention(q, k, v, causal=causal, alibi_slopes=sl, backend=backend)  # noqa: E731,B023
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- swiglu -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 5, 97), (4, 1000)], ids=str)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_swiglu_matches_float64(backend, dtype_name, shape):
    obj, dev = require_backend(backend)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(4)
    gate, up, dout = (
        (4 * torch.randn(shape, generator=g)).to(dev, dtype),
        torch.randn(shape, generator=g).to(dev, dtype),
        torch.randn(shape, generator=g).to(dev, dtype),
    )
    why = obj.swiglu_unsupported(gate, up)
    if why is not None:
        pytest.skip(f"backend {backend!r} does not support this call: {why}")
    out, grads = run_with_grads(lambda a, b: ops.swiglu(a, b, backend=backend), (gate, up), dout)
    base, base_grads = run_with_grads(lambda a, b: F.silu(a) * b, (gate, up), dout)
    ref, ref_grads = run_with_grads(lambda a, b: F.silu(a) * b, (gate.double(), up.double()), dout.double())
    assert out.shape == shape and out.dtype == dtype
    if dtype == torch.float32:  # eager fp32 is itself accurate: hold every backend to 1e-6
        assert ((out.double().cpu() - ref.cpu()).abs().max() / ref.abs().max()).item() <= 1e-6
    assert_two_x(out, base, ref, "swiglu out")
    for name, gr, bg, rg in zip(("d_gate", "d_up"), grads, base_grads, ref_grads):
        assert gr.dtype == dtype
        assert_two_x(gr, bg, rg, name)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_swiglu_gradcheck_float64(backend):
    obj, _ = require_backend(backend)
    g = torch.Generator().manual_seed(5)
    gate = (3 * torch.randn(3, 11, generator=g, dtype=torch.float64)).requires_grad_()
    up = torch.randn(3, 11, generator=g, dtype=torch.float64).requires_grad_()
    if obj.swiglu_unsupported(gate, up) is not None:
        pytest.skip(f"backend {backend!r} does not take float64")
    assert torch.autograd.gradcheck(
        lambda a, b: ops.swiglu(a, b, backend=backend), (gate, up), eps=1e-6, atol=1e-8, rtol=1e-6
    )


def test_swiglu_strided_input():
    h = torch.randn(2, 7, 2 * 24)
    gate, up = h.chunk(2, dim=-1)  # non-contiguous halves of a fused projection
    assert not gate.is_contiguous()
    out = ops.swiglu(gate, up)
    torch.testing.assert_close(out, F.silu(gate) * up)


@pytest.mark.parametrize(
    "gate,up,exc,words",
    [
        (torch.randn(3, 4), torch.randn(3, 5), ValueError, "shapes differ"),
        (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), TypeError, "dtypes differ"),
        (torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64), TypeError, "int64"),
        ([1.0, 2.0], torch.randn(2), TypeError, "torch.Tensor"),
        (torch.randn(3, 4), torch.randn(3, 4, device="meta"), ValueError, "meta"),
    ],
)
def test_swiglu_rejects_bad_input(gate, up, exc, words):
    with pytest.raises(exc, match=words):
        ops.swiglu(gate, up)


# ---- non-finite input on every CPU backend: propagate where the math says, never hang or crash -----
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_attention_nan_key_reaches_only_the_rows_that_see_it(backend):
    require_backend(backend)
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, torch.float32)
    k[0, 1, 5, 3] = float("nan")
    out = ops.attention(q, k, v, causal=True, backend=backend)
    assert torch.isfinite(out[0, 0]).all()  # the other head never sees it
    assert torch.isfinite(out[0, 1, :5]).all()  # rows 0..4 are before key 5
    assert torch.isnan(out[0, 1, 5:]).all()


# (Not "torch": SDPA's CPU flash kernel returns zeros for a NaN query row; fastlm's own kernels
# keep the NaN, so a poisoned input cannot silently train on zeros.)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_attention_non_finite_query_row_does_not_leak(backend, bad):
    require_backend(backend)
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2, 6, 6, 8, torch.float32))
    with torch.no_grad():
        q[0, 1, 2, 0] = bad
    out = ops.attention(q, k, v, causal=False, backend=backend)
    assert not torch.isfinite(out[0, 1, 2]).all()
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 1, 2] = False
    assert torch.isfinite(out[keep]).all()
    out.sum().backward()  # finishes; the poisoned row's own gradient is non-finite
    assert not torch.isfinite(q.grad[0, 1, 2]).all() and torch.isfinite(q.grad[0, 0]).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_swiglu_non_finite_propagates_on_every_backend(backend):
    require_backend(backend)
    x = torch.tensor([[0.5, float("nan"), float("inf"), -3.0, 1.0, 1.0, 1.0, float("nan")]])
    out = ops.swiglu_packed(x, backend=backend)[0]
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and out[2] == float("inf")
    assert torch.isnan(out[3])  # silu(-3) * nan


# ---- swiglu_packed: one [..., 2H] tensor holding [gate | up] --------------------------------------
def _packed_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("shape", [(2,), (3, 2 * 17), (2, 5, 2 * 97), (4, 2 * 344)], ids=str)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_swiglu_packed_matches_float64(backend, dtype_name, shape):
    obj, dev = require_backend(backend)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(shape, generator=g)).to(dev, dtype)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dev, dtype)
    why = obj.swiglu_packed_unsupported(x)
    if why is not None:
        pytest.skip(f"backend {backend!r} does not support this call: {why}")
    out, (dx,) = run_with_grads(lambda t: ops.swiglu_packed(t, backend=backend), (x,), dout)
    base, (bdx,) = run_with_grads(_packed_ref, (x,), dout)
    ref, (rdx,) = run_with_grads(_packed_ref, (x.double(),), dout.double())
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_two_x(out, base, ref, "swiglu_packed out")
    assert_two_x(dx, bdx, rdx, "swiglu_packed dx")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_swiglu_packed_gradcheck_float64(backend):
    obj, _ = require_backend(backend)
    x = (3 * torch.randn(3, 4, 22, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).requires_grad_()
    assert obj.swiglu_packed_unsupported(x) is None
    assert torch.autograd.gradcheck(
        lambda t: ops.swiglu_packed(t, backend=backend), (x,), eps=1e-6, atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_swiglu_packed_strided_rows(backend):
    require_backend(backend)
    big = torch.randn(3, 5, 60)
    x = big[..., 7 : 7 + 2 * 20]  # rows 60 apart, last dim contiguous: read in place
    cols = torch.randn(3, 40, 5).transpose(1, 2)  # last dim strided: copied, still right
    for t in (x, cols):
        torch.testing.assert_close(ops.swiglu_packed(t, backend=backend), _packed_ref(t))


@pytest.mark.parametrize(
    "x,exc,words",
    [
        (torch.randn(3, 5), ValueError, "even"),
        (torch.tensor(1.0), ValueError, "even"),
        (torch.ones(3, 4, dtype=torch.int32), TypeError, "int32"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
    ],
)
def test_swiglu_packed_rejects_bad_input(x, exc, words):
    with pytest.raises(exc, match=words):
        ops.swiglu_packed(x)


# ---- dispatch -----------------------------------------------------------------------------------
@pytest.fixture
def calls(monkeypatch):
    """Record which backend object runs each op (wrapping every loadable backend)."""
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    monkeypatch.setattr(ops.backend, "_logged", set())
    record = []
    for name in ops.BACKENDS:
        obj = ops.backend._load(name)
        if obj is None:
            continue
        for op in ("attention", "swiglu"):
            real = getattr(obj, op, None)
            if real is None:
                continue

            def wrapper(*args, _real=real, _name=name, _op=op):
                record.append((_op, _name))
                return _real(*args)

            monkeypatch.setattr(obj, op, wrapper)
    return record


def test_unknown_backend_is_a_value_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.attention(q, q, q, backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.swiglu(q, q, backend="nope")


def test_unknown_backend_in_env_is_a_value_error(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", "nope")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="nope"):
        ops.attention(q, q, q)


def test_unavailable_backend_raises_with_reason():
    status = ops.backend_status()
    missing = [(n, why) for n, why in status.items() if why is not None]
    if not missing:
        pytest.skip("every backend is available here")
    q = torch.randn(1, 1, 4, 8)
    for name, why in missing:
        with pytest.raises(BackendUnavailableError) as info:
            ops.attention(q, q, q, backend=name)
        assert name in str(info.value) and why in str(info.value)
        with pytest.raises(BackendUnavailableError, match=name):
            ops.swiglu(q, q, backend=name)


def test_explicit_backend_that_cannot_run_the_call_raises():
    q = torch.randn(1, 2, 9, 8)
    k = torch.randn(1, 2, 4, 8)
    reason = ops.torch_backend.BACKEND.attention_unsupported(q, k, k, True, 0.3, None)
    assert reason is not None  # SDPA cannot give zeros for fully masked rows
    with pytest.raises(BackendUnavailableError, match="fully masked"):
        ops.attention(q, k, k, causal=True, backend="torch")


def test_backend_status_and_available_backends():
    status = ops.backend_status()
    assert list(status) == list(ops.BACKENDS)
    assert status["reference"] is None and status["torch"] is None
    for why in status.values():
        assert why is None or (isinstance(why, str) and why)
    assert ops.available_backends() == [n for n, w in status.items() if w is None]


def test_env_overrides_auto(calls, monkeypatch):
    q = torch.randn(1, 2, 5, 8)
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    ops.attention(q, q, q)
    ops.swiglu(q, q)
    assert calls == [("attention", "reference"), ("swiglu", "reference")]
    # an explicit backend argument wins over the environment
    ops.attention(q, q, q, backend="torch")
    assert calls[-1] == ("attention", "torch")


def _cpp_gemm_max_tk() -> int:
    if ops.backend_status()["cpp"] is not None:
        return 0
    from fastlm.ops.extension import CPP_BACKEND

    return CPP_BACKEND.gemm_max_tk


def test_auto_on_cpu_in_float32(calls, caplog):
    """float32 on CPU: the C++ kernel's BLAS path for causal calls where it runs (T_k <= gemm_max_tk,
    more than one query row), else SDPA: non-causal calls, single-query decoding steps, long keys."""
    fast = "cpp" if _cpp_gemm_max_tk() >= 17 else "torch"
    q = torch.randn(2, 4, 17, 16)
    k = torch.randn(2, 2, 17, 16)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        ops.attention(q, q, q)
        ops.attention(q, k, k, causal=False)
        ops.attention(q, k, k, alibi_slopes=alibi_slopes(4))
        ops.attention(q[:, :, -1:], k, k)  # one query row (a decoding step)
    assert calls == [("attention", fast), ("attention", "torch"), ("attention", fast), ("attention", "torch")]
    assert not caplog.records  # the preferred backend ran: nothing to say
    if _cpp_gemm_max_tk():
        long_k = torch.randn(1, 2, _cpp_gemm_max_tk() + 1, 16)
        assert ops.attention_backend(q[:1], long_k, long_k) == "torch"
        assert ops.attention_backend(q.double(), q.double(), q.double()) == "cpp"


def test_auto_picks_cpp_for_cpu_training_in_reduced_precision(calls, caplog):
    if ops.backend_status()["cpp"] is not None:
        pytest.skip(f"cpp backend unavailable: {ops.backend_status()['cpp']}")
    q = torch.randn(2, 4, 17, 16, requires_grad=True)
    qb = q.detach().bfloat16().requires_grad_()
    assert ops.attention_backend(qb, qb, qb) == "cpp"
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        ops.attention(qb, qb, qb).sum().backward()
        ops.attention(q.detach().half().requires_grad_(), q.detach().half(), q.detach().half())
        with torch.no_grad():  # inference: SDPA's forward is the faster one
            ops.attention(qb, qb, qb)
    assert calls == [("attention", "cpp"), ("attention", "cpp"), ("attention", "torch")]
    assert not caplog.records
    assert ops.attention_backend(q, q, q, backend="reference") == "reference"


def test_auto_falls_back_and_logs_once(calls, caplog):
    # keys longer than the C++ BLAS path takes, so auto tries SDPA first (which cannot run this)
    t_k = _cpp_gemm_max_tk() + 4
    q = torch.randn(1, 2, t_k + 5, 8)
    k = torch.randn(1, 2, t_k, 8)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        out1 = ops.attention(q, k, k, causal=True)
        out2 = ops.attention(q, k, k, causal=True)
    used = [name for op, name in calls]
    assert len(used) == 2 and used[0] == used[1] and used[0] != "torch"
    msgs = [r.getMessage() for r in caplog.records if r.name == "fastlm"]
    assert len(msgs) == 1, msgs
    assert f"using backend {used[0]!r}" in msgs[0] and "torch skipped" in msgs[0]
    ref = naive_attention(q, k, k, causal=True)
    assert ((out1.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    assert torch.equal(out1, out2)
    assert torch.equal(out1[:, :, :5], torch.zeros_like(out1[:, :, :5]))


# ---- attention input validation -----------------------------------------------------------------
def _qkv(shape_q=(1, 4, 5, 8), shape_kv=(1, 2, 5, 8), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


def test_rejects_integer_dtype():
    q, k, v = (x.to(torch.int32) for x in _qkv())
    with pytest.raises(TypeError, match="int32"):
        ops.attention(q, k, v)


def test_rejects_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="dtypes differ"):
        ops.attention(q, k.half(), v)


def test_rejects_non_tensor():
    _, k, v = _qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ops.attention([[1.0]], k, v)


def test_rejects_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="different devices"):
        ops.attention(q.to("meta"), k, v)
    with pytest.raises(ValueError, match="alibi_slopes on meta"):
        ops.attention(q, k, v, alibi_slopes=alibi_slopes(4).to("meta"))


@pytest.mark.parametrize(
    "shape_q,shape_k,shape_v,words",
    [
        ((1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 6, 8), "k and v shapes differ"),
        ((1, 4, 5, 8), (1, 2, 5, 16), (1, 2, 5, 16), "differ in batch or head dim"),
        ((2, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), "differ in batch or head dim"),
        ((4, 5, 8), (2, 5, 8), (2, 5, 8), "must be 4-D"),
        ((1, 4, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8), r"multiple of kv heads \(3\)"),
        ((1, 4, 0, 8), (1, 2, 5, 8), (1, 2, 5, 8), "empty input"),
        ((1, 4, 5, 8), (1, 2, 0, 8), (1, 2, 0, 8), "empty input"),
        ((0, 4, 5, 8), (0, 2, 5, 8), (0, 2, 5, 8), "empty input"),
        ((1, 4, 5, 0), (1, 2, 5, 0), (1, 2, 5, 0), "empty input"),
    ],
)
def test_rejects_bad_shapes(shape_q, shape_k, shape_v, words):
    q, k, v = torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_v)
    with pytest.raises(ValueError, match=words):
        ops.attention(q, k, v)


@pytest.mark.parametrize("slopes", [torch.ones(3), torch.ones(4, 1), torch.ones(2), [0.5] * 4])
def test_rejects_bad_alibi(slopes):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"alibi_slopes must be a tensor of shape \(4,\)"):
        ops.attention(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_rejects_non_finite_scale(scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.attention(q, k, v, scale=scale)
