"""``fastlm.ops.layer_norm``: the fused C++ op (``cpp``, autograd in C++) against the float64 composed
form (forward and every gradient, with and without the residual add, LayerNorm and RMSNorm, bf16/fp16
output from float32), float64 gradcheck, ``torch.library.opcheck``, thread-count independence, the
composed form on the other backends, clear errors, and the model running it (one op per norm, the
residual adds inside it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fused_and_reference_step

from fastlm import ops
from fastlm.model import GPT, GPTConfig
from fastlm.ops import composed
from fastlm.ops import extension as _ext

needs_cpp = pytest.mark.skipif(_ext._C is None, reason=f"{_ext._IMPORT_ERROR}")
OPS = torch.ops.fastlm if _ext._C is not None else None

# (name, shape): C a multiple of the vector width or not, row counts not a multiple of the row group
SHAPES = [("default_c96", (3, 11, 96)), ("tail_c37", (2, 5, 37)), ("rows_c16", (19, 16)), ("one_row_c5", (5,))]
PARAMS = [(True, True), (True, False), (False, False)]  # (weight, bias)


def make(shape, weight=True, bias=True, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = 2 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    w = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)) if weight else None
    b = 0.2 * torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    r = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    return x, w, b, r


def run(backend, x, w, b, r, dout, dsum=None, norm="layernorm", out_dtype=None, dtype=None, res_dtype=None):
    """Forward and backward -> [out, s (or None), d x, d weight, d bias, d residual] (None where absent).
    dsum: a gradient for s too (s used downstream), else s only feeds the norm."""
    dtype = dtype or x.dtype
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    res = None if r is None else r.detach().to(res_dtype or dtype).requires_grad_()
    got = ops.layer_norm(*leaves, residual=res, norm=norm, out_dtype=out_dtype, backend=backend)
    out, s = got if r is not None else (got, None)
    loss = (out.float() * dout.to(out.dtype).float()).sum()
    if s is not None and dsum is not None:
        loss = loss + (s.float() * dsum.float()).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves + [res]]
    return [out.detach(), None if s is None else s.detach()] + grads


def close(got, want, tol):
    assert (got is None) == (want is None)
    if got is not None:
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@needs_cpp
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("params", PARAMS, ids=["w+b", "w", "none"])
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_gradcheck_float64(shape, params, residual, norm):
    x, w, b, r = make(shape, *params, residual=residual)
    inputs = [t.requires_grad_() for t in (x, w, b, r) if t is not None]

    def f(*ts):
        it = iter(ts)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        rr = next(it) if r is not None else None
        got = ops.layer_norm(xx, ww, bb, residual=rr, norm=norm, backend="cpp")
        return got if rr is None else (got[0], got[1] * 0.7)  # s feeds a second use: a d sum

    assert torch.autograd.gradcheck(f, inputs)


@needs_cpp
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("params", PARAMS, ids=["w+b", "w", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_float64_composed(dtype, params, residual, norm):
    """Each dtype against the float64 composed form of the same (rounded) inputs: within float32
    rounding for float32, within the output's rounding (one bf16/fp16 ulp) for the reduced ones."""
    shape = (4, 13, 40)
    x, w, b, r = (None if t is None else t.to(dtype).double() for t in make(shape, *params, residual=residual))
    if r is not None:  # x, r multiples of 1/16 below 8: s = x + r is exact in bf16 too, as in the float64 oracle
        x, r = ((t.clamp(-7.9, 7.9) * 16).round() / 16 for t in (x, r))
    dout = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dsum = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) if residual else None
    if dtype != torch.float32:  # the gradients land in the reduced dtype: give them representable inputs
        dout, dsum = (None if t is None else t.to(dtype).double() for t in (dout, dsum))
    want = run("reference", x, w, b, r, dout, dsum, norm=norm, dtype=torch.float64)
    got = run("cpp", x, w, b, r, dout, dsum, norm=norm, dtype=dtype)
    tol = 2e-5 if dtype == torch.float32 else (1e-2 if dtype == torch.bfloat16 else 2e-3)
    for g, wnt in zip(got, want):
        close(g, wnt, tol)


@needs_cpp
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_float32_in_reduced_out_is_the_rounded_float32_norm(out_dtype, residual):
    """The autocast step's case: float32 x (the residual stream), the residual in the output dtype (the
    branch's Linear output), out_dtype bf16/fp16. s is bitwise torch's x + residual; out is the float32
    norm rounded once (at most one ulp from rounding the float32 composed form); d x is float32 and
    d residual is d x rounded, as autograd's cast would give it."""
    shape = (3, 17, 96)
    x, w, b, r = make(shape, residual=residual, seed=3)
    x, w, b = x.float(), w.float(), b.float()
    r = None if r is None else r.to(out_dtype)
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(out_dtype)
    dsum = torch.randn(shape, generator=torch.Generator().manual_seed(5)) if residual else None
    got = run("cpp", x, w, b, r, dout, dsum, out_dtype=out_dtype, res_dtype=out_dtype)
    assert got[0].dtype == out_dtype and got[2].dtype == torch.float32
    s = x if r is None else x + r
    if r is not None:
        assert torch.equal(got[1], s)
        assert got[5].dtype == out_dtype and torch.equal(got[5], got[2].to(out_dtype))
    ref = F.layer_norm(s.double(), (96,), w.double(), b.double())
    ulp = (ref.abs() * (2**-7 if out_dtype == torch.bfloat16 else 2**-10)).clamp_min(1e-6)
    assert ((got[0].double() - ref).abs() <= ulp).all()
    want = run("reference", x.double(), w.double(), b.double(), None if r is None else r.double(), dout.double(), dsum)
    for g, wnt in zip(got[2:5], want[2:5]):
        close(g, wnt, 2e-5)


@needs_cpp
def test_strided_input_and_thread_count_independence():
    """A non-contiguous x gives the contiguous result; the parameter gradients (row chunks summed in a
    fixed order) are bitwise the same on 1 and 2 threads."""
    x, w, b, r = (t.float() for t in make((64, 9, 48), residual=True, seed=7))
    dout = torch.randn(64, 9, 48, generator=torch.Generator().manual_seed(8))
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.equal(ops.layer_norm(strided, w, b, backend="cpp"), ops.layer_norm(x, w, b, backend="cpp"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpp", x, w, b, r, dout, dout)
        torch.set_num_threads(2)
        two = run("cpp", x, w, b, r, dout, dout)
    finally:
        torch.set_num_threads(before)
    for p, q in zip(one, two):
        assert torch.equal(p, q)


@needs_cpp
def test_opcheck():
    x, w, b, r = (t.float() for t in make((2, 5, 24), residual=True, seed=9))
    for t in (x, w, b, r):
        t.requires_grad_()
    torch.library.opcheck(OPS.layer_norm_fwd.default, (x, w, b, False, 1e-5))
    torch.library.opcheck(OPS.layer_norm_fwd.default, (x, None, None, True, 1e-5))
    low = r.detach().bfloat16().requires_grad_()
    torch.library.opcheck(OPS.layer_norm_fwd.default, (x, w, b, False, 1e-5), {"out_dtype": torch.bfloat16})
    torch.library.opcheck(
        OPS.layer_norm_fwd.default, (x, w, b, False, 1e-5), {"out_dtype": torch.bfloat16, "residual": low}
    )
    torch.library.opcheck(OPS.layer_norm_fwd.default, (x, w, None, True, 1e-5), {"residual": r})
    dout = torch.randn(x.shape)
    torch.library.opcheck(OPS.layer_norm_bwd.default, (dout, x.detach(), w.detach(), b.detach(), False, 1e-5))
    torch.library.opcheck(
        OPS.layer_norm_bwd.default,
        (dout.bfloat16(), x.detach(), w.detach(), None, False, 1e-5),
        {"dsum": torch.randn(x.shape), "residual_dtype": torch.bfloat16},
    )


@needs_cpp
def test_the_model_runs_one_op_per_norm_with_the_residual_adds_inside(monkeypatch):
    """auto takes the cpp op on CPU: the default model calls it once per norm (2 per block + ln_f), every
    one adding the residual but the first and (x0_mix: the mix makes the stream) each later block's
    first; without the x0 mix every one but the first; under CPU autocast the norms write bf16; loss and
    gradients equal the composed form's (backend="reference") to float32 rounding, with and without
    autocast."""
    calls = []
    real = OPS.layer_norm_fwd
    monkeypatch.setattr(OPS, "layer_norm_fwd", lambda *a: calls.append(a) or real(*a))
    x = torch.randint(0, 40, (3, 32))
    plain = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32, x0_mix=False)
    fused_and_reference_step(plain, x)
    assert [a[-1] is not None for a in calls] == [False] + [True] * (2 * plain.n_layer)
    calls.clear()
    cfg = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)
    assert cfg.x0_mix
    (fused, reference), grads = fused_and_reference_step(cfg, x)
    assert len(calls) == 2 * cfg.n_layer + 1
    assert [a[-1] is not None for a in calls] == [False, True] * cfg.n_layer + [True]
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fused.blocks[0].ln1(torch.randn(2, 5, 32))
        logits, loss = fused(x, x)
    assert h.dtype == torch.bfloat16 and calls and all(a[5] == torch.bfloat16 for a in calls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_loss = reference(x, x)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    # the autocast step's gradients: every parameter gets one, within bf16 rounding of the composed form's
    for model, l in ((fused, loss), (reference, ref_loss)):
        model.zero_grad(set_to_none=True)
        l.backward()
    for name, p in fused.named_parameters():
        q = dict(reference.named_parameters())[name]
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).norm() <= 3e-2 * q.grad.norm(), name


@pytest.mark.parametrize("unet", [False, True])
def test_block_forward_is_its_residual_step_summed(unet):
    """Block.forward(x) == x' + m from residual_step(x, None); chaining residual_step with the pending
    branch gives what chaining Block.forward gives (the model's forward and a block-by-block loop)."""
    cfg = GPTConfig(vocab_size=30, block_size=16, n_layer=3, n_head=2, n_embd=32, unet_skips=unet)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        rope = model._rope(0, 16, idx.device)
        block = model.blocks[0]
        e = model.wte(idx)
        ve = model.value_embeds[0](idx)
        xs, m = block.residual_step(e, None, rope=rope, ve=ve)
        assert torch.equal(block(e, rope=rope, ve=ve), xs + m)
        x, outs = e, []
        for i, blk in enumerate(model.blocks):
            if unet and i >= 2:
                x = x + model.skip_weights[2 - i] * outs[2 - i]
            x = blk(x, rope=rope, ve=model.value_embeds[i](idx))
            outs.append(x)
        want = model.lm_head(model.ln_f(x))
        torch.testing.assert_close(model(idx)[0], want, rtol=1e-5, atol=1e-5)


def test_composed_form_on_the_other_backends():
    """torch and reference (and any backend without the kernel) run the composed form: the add,
    F.layer_norm / F.rms_norm (+ bias), the cast."""
    x, w, b, r = (t.float() for t in make((2, 6, 16), residual=True, seed=10))
    for backend in ("torch", "reference"):
        out, s = ops.layer_norm(x, w, b, residual=r, eps=1e-6, backend=backend)
        assert torch.equal(s, x + r) and torch.equal(out, F.layer_norm(x + r, (16,), w, b, 1e-6))
        got = ops.layer_norm(x, w, b, norm="rmsnorm", out_dtype=torch.bfloat16, backend=backend)
        assert torch.equal(got, (F.rms_norm(x, (16,), w, 1e-5) + b).bfloat16())
    y, s = composed.layer_norm(x, None, None, r.bfloat16(), "layernorm", 1e-5, torch.bfloat16)
    assert s.dtype == torch.float32 and torch.equal(s, x + r.bfloat16()) and y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"x": torch.tensor(1.0)}, ValueError, "at least one dim"),
        ({"x": torch.ones(2, 8, dtype=torch.int64)}, TypeError, "x must be float16"),
        ({"weight": torch.ones(7)}, ValueError, "weight must be \\(8,\\)"),
        ({"bias": torch.ones(8, dtype=torch.int32)}, TypeError, "bias must be"),
        ({"weight": [1.0] * 8}, TypeError, "weight must be a torch.Tensor"),
        ({"residual": torch.ones(2, 7)}, ValueError, "residual must be \\(2, 8\\)"),
        ({"residual": torch.ones(2, 8, dtype=torch.float64)}, TypeError, "must not be wider than x"),
        ({"norm": "batchnorm"}, ValueError, "norm must be one of"),
        ({"eps": 0.0}, ValueError, "eps must be a positive number"),
        ({"eps": True}, ValueError, "eps must be a positive number"),
        ({"out_dtype": torch.float64}, ValueError, "out_dtype must be"),
        ({"x": torch.ones(2, 8).bfloat16(), "out_dtype": torch.float32}, ValueError, "out_dtype must be"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, error, words):
    args = {"x": torch.randn(2, 8), **kwargs}
    with pytest.raises(error, match=words):
        ops.layer_norm(args.pop("x"), **args)


@needs_cpp
def test_op_level_errors_and_the_cpp_refusals():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        OPS.layer_norm_fwd(x.bfloat16(), None, None, False, 1e-5, torch.float32)
    with pytest.raises(RuntimeError, match="residual must have"):
        OPS.layer_norm_fwd(x, None, None, False, 1e-5, torch.bfloat16, torch.randn(2, 8).half())
    with pytest.raises(RuntimeError, match="dout must be"):
        OPS.layer_norm_bwd(torch.randn(2, 4), x, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="weight/bias must be"):
        OPS.layer_norm_fwd(x, torch.ones(3), None, False, 1e-5)
    # a residual the kernel does not take (fp16 into fp32 with a bf16 output): cpp refuses, auto composes
    r = torch.randn(2, 8).half()
    with pytest.raises(ops.BackendUnavailableError, match="residual of x's dtype or out_dtype"):
        ops.layer_norm(x, residual=r, out_dtype=torch.bfloat16, backend="cpp")
    out, s = ops.layer_norm(x, residual=r, out_dtype=torch.bfloat16)
    assert torch.equal(s, x + r) and torch.equal(out, F.layer_norm(x + r, (8,)).bfloat16())
