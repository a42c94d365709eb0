"""``fastlm.ops.qk_norm_value_mix``: the fused C++ op (``cpp``) against the float64 composed form
(forward and every gradient), float64 gradcheck, ``torch.library.opcheck``, strided input, thread-count
independence, the composed form on the other backends, clear errors, and the model running it."""

from __future__ import annotations

import pytest
import torch
from conftest import fused_and_reference_step

from fastlm import ops
from fastlm.model import GPTConfig
from fastlm.ops import composed
from fastlm.ops import extension as _ext

needs_cpp = pytest.mark.skipif(_ext._C is None, reason=f"{_ext._IMPORT_ERROR}")
OPS = torch.ops.fastlm if _ext._C is not None else None

# (name, B, T, H, H_kv, D)
SHAPES = [("mha_d32", 2, 9, 3, 3, 32), ("gqa_d8", 1, 7, 4, 2, 8), ("mqa_d20_tail", 2, 5, 4, 1, 20)]
OPTIONS = [(True, True), (True, False), (False, True), (False, False)]  # (qk norm, value mix)


def make(b, t, h, h_kv, d, norm=True, mix=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, generator=g, dtype=torch.float64).to(dtype)
    qg = (1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)) if norm else None
    kg = (1 - 0.3 * torch.randn(d, generator=g, dtype=torch.float64)) if norm else None
    ve = torch.randn(b, t, h_kv * d, generator=g, dtype=torch.float64) if mix else None
    vm = torch.tensor([0.7, -0.4], dtype=torch.float64) if mix else None
    return qkv, qg, kg, ve, vm


def run(backend, qkv, qg, kg, ve, vm, h, h_kv, dout, norm="layernorm", cast=None, out_dtype=None):
    """Forward and backward; returns [out, d qkv, d q_gain, d k_gain, d ve, d ve_mix] (None where absent)."""
    leaves = [None if t is None else t.detach().clone() for t in (qkv, qg, kg, ve, vm)]
    if cast is not None:  # the parameters' dtype (qkv keeps its own)
        leaves = [leaves[0]] + [None if t is None else t.to(cast) for t in leaves[1:]]
    leaves = [None if t is None else t.requires_grad_() for t in leaves]
    x, g1, g2, e, m = leaves
    y = ops.qk_norm_value_mix(
        x, h, h_kv, q_gain=g1, k_gain=g2, norm=norm, ve=e, ve_mix=m, out_dtype=out_dtype, backend=backend
    )
    y.backward(dout.to(y.dtype))
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


@needs_cpp
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("options", OPTIONS, ids=["norm+mix", "norm", "mix", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_gradcheck_float64(shape, options, norm):
    _, b, t, h, h_kv, d = shape
    inputs = [x for x in make(b, t, h, h_kv, min(d, 8), *options) if x is not None]
    inputs = [x.requires_grad_() for x in inputs]

    def f(*xs):
        it = iter(xs)
        x = next(it)
        g1, g2 = (next(it), next(it)) if options[0] else (None, None)
        e, m = (next(it), next(it)) if options[1] else (None, None)
        return ops.qk_norm_value_mix(x, h, h_kv, q_gain=g1, k_gain=g2, norm=norm, ve=e, ve_mix=m, backend="cpp")

    assert torch.autograd.gradcheck(f, inputs)


@needs_cpp
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize(
    "dtype,out_dtype,out_tol,dqkv_tol",
    [
        (torch.float32, None, 2e-6, 2e-6),
        # the CPU autocast step: bf16 in, the math and the output in fp32, d(qkv) rounded to bf16
        (torch.bfloat16, torch.float32, 2e-6, 4e-3),
        (torch.bfloat16, None, 4e-3, 4e-3),  # the gain/mix gradients stay fp32-exact
        (torch.float16, torch.float32, 2e-6, 5e-4),
    ],
    ids=["fp32", "bf16->fp32", "bf16", "fp16->fp32"],
)
def test_matches_float64_composed(dtype, out_dtype, out_tol, dqkv_tol, norm):
    """Every output against the composed form in float64 on the same (rounded) input, relative to
    the largest reference value; the fused op is at least as accurate as the composed form in dtype."""
    b, t, h, h_kv, d = 3, 40, 3, 3, 32
    qkv, qg, kg, ve, vm = make(b, t, h, h_kv, d, dtype=dtype, seed=1)
    dout = torch.randn(b, t, (h + 2 * h_kv) * d, generator=torch.Generator().manual_seed(2))
    dout = dout.to(out_dtype or dtype)  # the gradient arrives in the output's dtype
    ref = run("reference", qkv.double(), qg, kg, ve, vm, h, h_kv, dout.double(), norm)
    got = run("cpp", qkv, qg, kg, ve, vm, h, h_kv, dout, norm, cast=torch.float32, out_dtype=out_dtype)
    base = run("reference", qkv, qg, kg, ve, vm, h, h_kv, dout, norm, cast=torch.float32, out_dtype=out_dtype)
    assert got[0].dtype == (out_dtype or dtype) and got[1].dtype == dtype
    for name, a, bb, r in zip(("out", "dqkv", "dq_gain", "dk_gain", "dve", "dve_mix"), got, base, ref):
        scale = r.abs().max().item()
        err = (a.double() - r).abs().max().item() / scale
        base_err = (bb.double() - r).abs().max().item() / scale
        tol = {"out": out_tol, "dqkv": dqkv_tol}.get(name, 2e-6)  # the rest: float32 math and outputs
        assert err <= tol, f"{name}: relative error {err:.3g}"
        assert err <= base_err + 2e-6, f"{name}: {err:.3g} worse than the composed form's {base_err:.3g}"


@needs_cpp
def test_strided_rows_and_dout_are_read_in_place():
    """A qkv that is a column slice of a wider tensor, and a non-contiguous dout, give exactly what
    their contiguous copies give."""
    b, t, h, h_kv, d = 2, 11, 2, 1, 16
    qkv, qg, kg, ve, vm = (None if x is None else x.float() for x in make(b, t, h, h_kv, d, seed=3))
    wide = torch.randn(b, t, 3 * qkv.shape[-1])
    wide[..., : qkv.shape[-1]] = qkv
    strided = wide[..., : qkv.shape[-1]]
    dout_t = torch.randn(qkv.shape[-1], t, b).permute(2, 1, 0)
    assert not strided.is_contiguous() and not dout_t.is_contiguous()
    a = run("cpp", strided, qg, kg, ve, vm, h, h_kv, dout_t)
    c = run("cpp", qkv, qg, kg, ve, vm, h, h_kv, dout_t.contiguous())
    for x, y in zip(a, c):
        assert torch.equal(x, y)


@needs_cpp
def test_gradients_do_not_depend_on_the_thread_count():
    """The gain and mix gradients are summed over fixed row chunks in order: bit-identical on 1 and
    2 threads."""
    b, t, h, h_kv, d = 4, 128, 3, 3, 32
    qkv, qg, kg, ve, vm = (x.float() for x in make(b, t, h, h_kv, d, seed=4))
    dout = torch.randn(qkv.shape)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpp", qkv, qg, kg, ve, vm, h, h_kv, dout)
        torch.set_num_threads(2)
        two = run("cpp", qkv, qg, kg, ve, vm, h, h_kv, dout)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


@needs_cpp
def test_opcheck():
    b, t, h, h_kv, d = 2, 5, 4, 2, 8
    qkv, qg, kg, ve, vm = (x.float() for x in make(b, t, h, h_kv, d, seed=5))
    for x in (qkv, qg, kg, ve, vm):
        x.requires_grad_()
    torch.library.opcheck(OPS.qk_norm_value_mix_fwd.default, (qkv, h, h_kv, qg, kg, False, 1e-5, ve, vm))
    torch.library.opcheck(OPS.qk_norm_value_mix_fwd.default, (qkv, h, h_kv, None, None, True, 1e-5, None, None))
    low = qkv.detach().bfloat16().requires_grad_()
    torch.library.opcheck(
        OPS.qk_norm_value_mix_fwd.default, (low, h, h_kv, qg, kg, False, 1e-5, ve, vm), {"out_dtype": torch.float32}
    )
    args = (
        torch.randn(qkv.shape),
        qkv.detach(),
        h,
        h_kv,
        qg.detach(),
        kg.detach(),
        True,
        1e-5,
        ve.detach(),
        vm.detach(),
    )
    torch.library.opcheck(OPS.qk_norm_value_mix_bwd.default, args)


@needs_cpp
def test_auto_runs_the_fused_op_on_cpu_and_the_model_uses_it(monkeypatch):
    """auto takes the cpp op on CPU; the default model's forward calls it once per layer, and its loss
    and gradients equal the composed form's (backend="reference") to float32 rounding."""
    calls = []
    real = OPS.qk_norm_value_mix_fwd
    monkeypatch.setattr(OPS, "qk_norm_value_mix_fwd", lambda *a: calls.append(1) or real(*a))
    cfg = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)
    assert cfg.qk_norm and cfg.value_embed  # the default model's options
    _, grads = fused_and_reference_step(cfg, torch.randint(0, 40, (3, 32)))
    assert len(calls) == cfg.n_layer
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_composed_form_on_the_other_backends():
    """torch and reference (and any backend without the kernel) run the composed form: split,
    F.layer_norm / F.rms_norm, mix, concatenation; a wider out_dtype upcasts first."""
    b, t, h, h_kv, d = 2, 6, 2, 1, 8
    qkv, qg, kg, ve, vm = (x.float() for x in make(b, t, h, h_kv, d, seed=6))
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    want = torch.cat(
        [
            torch.nn.functional.rms_norm(q.view(b, t, h, d), (d,), qg, 1e-6).view(b, t, -1),
            torch.nn.functional.rms_norm(k.view(b, t, h_kv, d), (d,), kg, 1e-6).view(b, t, -1),
            vm[0] * v + vm[1] * ve,
        ],
        dim=-1,
    )
    for backend in ("torch", "reference"):
        got = ops.qk_norm_value_mix(
            qkv, h, h_kv, q_gain=qg, k_gain=kg, norm="rmsnorm", eps=1e-6, ve=ve, ve_mix=vm, backend=backend
        )
        assert torch.equal(got, want)
    low = composed.qk_norm_value_mix(qkv.bfloat16(), h, h_kv, None, None, "layernorm", 1e-5, None, None, torch.float32)
    assert low.dtype == torch.float32 and torch.equal(low, qkv.bfloat16().float())


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"qkv": torch.randn(2, 3)}, ValueError, "must be a \\(B, T"),
        ({"qkv": torch.randn(1, 2, 50)}, ValueError, "heads of one size"),
        ({"qkv": torch.randn(1, 2, 0)}, ValueError, "heads of one size"),
        ({"n_head": 3, "n_kv_head": 2}, ValueError, "positive multiple"),
        ({"q_gain": torch.ones(8)}, ValueError, "go together"),
        ({"q_gain": torch.ones(7), "k_gain": torch.ones(7)}, ValueError, "q_gain must be \\(8,\\)"),
        ({"ve": torch.ones(1, 2, 8)}, ValueError, "go together"),
        ({"ve": torch.ones(1, 2, 9), "ve_mix": torch.ones(2)}, ValueError, "ve must be"),
        ({"ve": torch.ones(1, 2, 8), "ve_mix": torch.ones(3)}, ValueError, "ve_mix must be"),
        ({"norm": "batchnorm"}, ValueError, "norm must be one of"),
        ({"eps": 0.0}, ValueError, "eps must be a positive number"),
        ({"out_dtype": torch.float64}, ValueError, "out_dtype must be"),
        ({"qkv": torch.ones(1, 2, 32, dtype=torch.int64)}, TypeError, "float16/bfloat16/float32/float64"),
        ({"q_gain": torch.ones(8, dtype=torch.int32), "k_gain": torch.ones(8)}, TypeError, "q_gain must be"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, error, words):
    args = {"qkv": torch.randn(1, 2, 32), "n_head": 2, "n_kv_head": 1, **kwargs}
    qkv, h, h_kv = args.pop("qkv"), args.pop("n_head"), args.pop("n_kv_head")
    with pytest.raises(error, match=words):
        ops.qk_norm_value_mix(qkv, h, h_kv, **args)


@needs_cpp
def test_op_level_errors():
    qkv = torch.randn(1, 2, 32)
    with pytest.raises(RuntimeError, match="go together"):
        OPS.qk_norm_value_mix_fwd(qkv, 2, 1, torch.ones(8), None, False, 1e-5, None, None)
    with pytest.raises(RuntimeError, match="out_dtype"):
        OPS.qk_norm_value_mix_fwd(qkv, 2, 1, None, None, False, 1e-5, None, None, torch.bfloat16)
    with pytest.raises(RuntimeError, match="dout must be"):
        OPS.qk_norm_value_mix_bwd(torch.randn(1, 2, 16), qkv, 2, 1, None, None, False, 1e-5, None, None)


def run_table(backend, qkv, qg, kg, table, idx, vm, h, h_kv, dout, out_dtype=None):
    """The table form (``ve_idx``): forward and backward -> [out, d qkv, d q_gain, d k_gain, d table, d ve_mix]."""
    leaves = [t.detach().clone().requires_grad_() for t in (qkv, qg, kg, table, vm)]
    x, g1, g2, tab, m = leaves
    y = ops.qk_norm_value_mix(
        x, h, h_kv, q_gain=g1, k_gain=g2, ve=tab, ve_mix=m, ve_idx=idx, out_dtype=out_dtype, backend=backend
    )
    y.backward(dout.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def make_table(b, t, h_kv, d, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, h_kv * d, generator=g, dtype=torch.float64)
    idx = torch.randint(0, vocab, (b, t), generator=g)
    idx[0, :3] = 2  # a repeated id: its gradient row sums several tokens
    return table, idx


@needs_cpp
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_table_form_matches_float64_and_the_separate_lookup_bitwise(idx_dtype):
    """ve_idx: the op looks the rows up itself. Against the float64 composed form (F.embedding, then
    the mix) within float32 rounding; and in float32 what the model computed before, the lookup as its
    own op (fastlm.ops.embedding, whose backward is an index_add) feeding ve: bitwise the same output
    and qkv/gain/mix gradients, and the table gradient summed in the same (token) order, to the last
    bit (a fused multiply-add may round once where the separate ops round twice)."""
    from fastlm.ops.embedding import embedding

    b, t, h, h_kv, d = 3, 17, 4, 2, 16
    qkv, qg, kg, _, vm = make(b, t, h, h_kv, d, mix=True, seed=11)
    table, idx = make_table(b, t, h_kv, d, seed=12)
    idx = idx.to(idx_dtype)
    dout = torch.randn(qkv.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    ref = run_table("reference", qkv, qg, kg, table, idx, vm, h, h_kv, dout)
    f32 = [x.float() for x in (qkv, qg, kg, table, vm, dout)]
    got = run_table("cpp", f32[0], f32[1], f32[2], f32[3], idx, f32[4], h, h_kv, f32[5])
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == torch.float32
        assert (a.double() - r).abs().max() <= 2e-5 * r.abs().max()
    # the separate lookup: embedding(idx, table) as ve
    leaves = [x.detach().clone().requires_grad_() for x in (f32[0], f32[1], f32[2], f32[3], f32[4])]
    x, g1, g2, tab, m = leaves
    y = ops.qk_norm_value_mix(x, h, h_kv, q_gain=g1, k_gain=g2, ve=embedding(idx, tab), ve_mix=m, backend="cpp")
    y.backward(f32[5])
    for name, a, c in zip(
        ("out", "dqkv", "dqg", "dkg", "dtable", "dmix"), got, [y.detach()] + [t.grad for t in leaves]
    ):
        if name == "dtable":
            torch.testing.assert_close(a, c, rtol=3e-7, atol=1e-6)
        else:
            assert torch.equal(a, c), name


@needs_cpp
def test_table_form_bf16_and_thread_count_independence():
    """The autocast step's case (a bf16 qkv, float32 out) against the float64 composed form; the table
    gradient is bitwise the same on 1 and 2 threads."""
    b, t, h, h_kv, d = 4, 40, 3, 3, 32
    qkv, qg, kg, _, vm = make(b, t, h, h_kv, d, dtype=torch.bfloat16, seed=14)
    table, idx = make_table(b, t, h_kv, d, vocab=65, seed=15)
    dout = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(16))
    ref = run_table("reference", qkv.double(), qg, kg, table, idx, vm, h, h_kv, dout.double())
    args = (qkv, qg.float(), kg.float(), table.float(), idx, vm.float(), h, h_kv, dout)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_table("cpp", *args, out_dtype=torch.float32)
        torch.set_num_threads(2)
        two = run_table("cpp", *args, out_dtype=torch.float32)
    finally:
        torch.set_num_threads(before)
    for p, q in zip(one, two):
        assert torch.equal(p, q)
    for name, a, r in zip(("out", "dqkv", "dq_gain", "dk_gain", "dtable", "dve_mix"), one, ref):
        tol = 4e-3 if name == "dqkv" else 2e-5
        assert (a.double() - r).abs().max() <= tol * r.abs().max(), name


@needs_cpp
def test_table_form_gradcheck_and_opcheck():
    b, t, h, h_kv, d = 2, 5, 2, 1, 8
    qkv, qg, kg, _, vm = make(b, t, h, h_kv, d, seed=17)
    table, idx = make_table(b, t, h_kv, d, vocab=4, seed=18)
    inputs = [x.requires_grad_() for x in (qkv, qg, kg, table, vm)]

    def f(x, g1, g2, tab, m):
        return ops.qk_norm_value_mix(x, h, h_kv, q_gain=g1, k_gain=g2, ve=tab, ve_mix=m, ve_idx=idx, backend="cpp")

    assert torch.autograd.gradcheck(f, inputs)
    x, g1, g2, tab, m = (y.detach().float().requires_grad_() for y in inputs)
    torch.library.opcheck(OPS.qk_norm_value_mix_fwd.default, (x, h, h_kv, g1, g2, False, 1e-5, tab, m), {"ve_idx": idx})
    args = (torch.randn(x.shape), x.detach(), h, h_kv, g1.detach(), g2.detach(), False, 1e-5, tab.detach(), m.detach())
    torch.library.opcheck(OPS.qk_norm_value_mix_bwd.default, args, {"ve_idx": idx})


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"ve": None, "ve_mix": None}, ValueError, "pass ve"),
        ({"ve_idx": torch.zeros(1, 2)}, TypeError, "int64/int32"),
        ({"ve_idx": torch.zeros(2, 1, dtype=torch.int64)}, ValueError, "ve_idx must be \\(1, 2\\)"),
        ({"ve": torch.ones(1, 2, 8)}, ValueError, "ve must be"),
        ({"ve": torch.ones(5, 9)}, ValueError, "ve must be"),
    ],
)
def test_table_form_bad_arguments(kwargs, error, words):
    args = {"ve": torch.ones(5, 8), "ve_mix": torch.ones(2), "ve_idx": torch.zeros(1, 2, dtype=torch.int64), **kwargs}
    with pytest.raises(error, match=words):
        ops.qk_norm_value_mix(torch.randn(1, 2, 32), 2, 1, **args)


@needs_cpp
def test_table_form_refuses_ids_outside_the_table():
    qkv, table, mix = torch.randn(1, 2, 32), torch.ones(5, 8), torch.ones(2)
    with pytest.raises(RuntimeError, match="ve_idx holds 5, outside the table's 5 rows"):
        ops.qk_norm_value_mix(qkv, 2, 1, ve=table, ve_mix=mix, ve_idx=torch.tensor([[0, 5]]), backend="cpp")
    with pytest.raises(RuntimeError, match="outside the table"):
        ops.qk_norm_value_mix(qkv, 2, 1, ve=table, ve_mix=mix, ve_idx=torch.tensor([[-1, 0]]), backend="cpp")
