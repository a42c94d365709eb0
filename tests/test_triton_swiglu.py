"""Triton SwiGLU kernels (fastlm.kernels.swiglu): split ``silu(gate) * up`` and packed ``[..., 2H]``.

GPU: compiled kernels on CUDA tensors. Without a GPU: CPU tensors in Triton's interpreter, with
``TRITON_INTERPRET=1`` set per test by an autouse fixture (kernel objects are built at launch time
from the current setting, so the order of test modules does not matter).

Tolerance rule: ``max|out - ref64| <= 2 * max|eager - ref64| + eps`` with ``ref64`` the float64
math (on the inputs rounded to the tested dtype) and ``eager`` plain PyTorch (``F.silu(g) * u`` and
its autograd) in the tested dtype; ``eps`` is half an ulp of the dtype at the reference's magnitude
(``finfo.eps / 2 * max(1, max|ref64|)``: a correctly rounded output is within it). Every comparison
here (extreme values, dispatch, torch.compile) follows the rule. bfloat16 is elementwise here (no
tl.dot), so it runs in the interpreter too.
"""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
if not hasattr(torch.library, "triton_op"):
    pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)

from fastlm import ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def S():
    from fastlm.kernels import swiglu as mod

    return mod


def _check(name, got, ref64, base, dtype):
    assert got.dtype == dtype and got.shape == ref64.shape, (name, got.dtype, got.shape)
    assert torch.isfinite(got).all(), name
    if ref64.numel() == 0:
        return
    err = (got.double() - ref64).abs().max().item()
    base_err = (base.double() - ref64).abs().max().item()
    bound = 2 * base_err + torch.finfo(dtype).eps / 2 * max(1.0, ref64.abs().max().item())  # half an ulp
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e}"


def _eager(gate, up, dout):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = F.silu(gate) * up
    return (out,) + torch.autograd.grad(out, (gate, up), dout) if out.numel() else (out, gate * 0, up * 0)


def _data(shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (2, 1500), (4, 0)], ids=str)
def test_swiglu_parity(S, shape, dtype):
    gate, up, dout = _data(shape)
    args = [t.to(DEVICE, dtype) for t in (gate, up, dout)]
    ref = _eager(*(a.double() for a in args))  # the oracle sees the same (rounded) inputs
    base = _eager(*args)
    g, u = (t.detach().requires_grad_() for t in args[:2])
    out = S.swiglu(g, u)
    grads = torch.autograd.grad(out, (g, u), args[2]) if out.numel() else (g * 0, u * 0)
    for name, got, r, b in zip(("out", "d_gate", "d_up"), (out,) + tuple(grads), ref, base):
        _check(name, got, r, b, dtype)


def test_swiglu_extreme_values(S):
    """Large |gate| saturates the sigmoid without inf/NaN (exp overflow handled)."""
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    dout = torch.ones_like(gate)
    got = (S.swiglu_forward(gate, up),) + tuple(S.swiglu_backward(dout, gate, up))
    ref = _eager(gate.double(), up.double(), dout.double())
    for name, g, r, b in zip(("out", "d_gate", "d_up"), got, ref, _eager(gate, up, dout)):
        _check(name, g, r, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_non_contiguous(S, dtype):
    gate, up, dout = _data((6, 33), seed=1)
    args = [t.to(DEVICE, dtype).t() for t in (gate, up, dout)]  # (33, 6) transposed views
    assert not args[0].is_contiguous()
    g, u = (t.detach().requires_grad_() for t in args[:2])
    out = S.swiglu(g, u)
    grads = torch.autograd.grad(out, (g, u), args[2])
    ref = _eager(*(a.double() for a in args))
    base = _eager(*args)
    for name, got, r, b in zip(("out", "d_gate", "d_up"), (out,) + grads, ref, base):
        _check(name, got, r, b, dtype)


def test_swiglu_backward_fresh_and_inputs_untouched(S):
    gate, up, dout = (t.to(DEVICE) for t in _data((5, 9), seed=2))
    before = [t.clone() for t in (gate, up, dout)]
    dg, du = S.swiglu_backward(dout, gate, up)
    for a, b in zip((gate, up, dout), before):
        assert torch.equal(a, b)
    ptrs = {t.data_ptr() for t in (gate, up, dout)}
    assert dg.data_ptr() not in ptrs and du.data_ptr() not in ptrs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 7), (2, 3, 2 * 300), (1, 2 * 16)], ids=str)
def test_swiglu_packed_parity(S, shape, dtype):
    x, _, _ = _data(shape, seed=3)
    hidden = shape[-1] // 2
    dout = torch.randn(*shape[:-1], hidden, generator=torch.Generator().manual_seed(4))

    def eager(xx, do):
        xx = xx.detach().requires_grad_()
        out = F.silu(xx[..., :hidden]) * xx[..., hidden:]
        return out, torch.autograd.grad(out, xx, do)[0]

    xd, dod = x.to(DEVICE, dtype), dout.to(DEVICE, dtype)
    ref = eager(xd.double(), dod.double())
    base = eager(xd, dod)
    xl = xd.detach().requires_grad_()
    out = S.swiglu_packed(xl)
    (dx,) = torch.autograd.grad(out, xl, dod)
    assert out.shape == (*shape[:-1], hidden) and dx.shape == shape
    _check("out", out, ref[0], base[0], dtype)
    _check("dx", dx, ref[1], base[1], dtype)


def test_swiglu_packed_strided_rows(S):
    """Rows with padding (a slice of a wider buffer) are read in place; a non-contiguous last dim
    is copied; both give the same result as the contiguous input."""
    wide = torch.randn(6, 40, device=DEVICE)
    x = wide[:, :30]  # row stride 40, last dim contiguous
    xc = x.contiguous()
    torch.testing.assert_close(S.swiglu_packed_forward(x), S.swiglu_packed_forward(xc), rtol=0, atol=0)
    xt = torch.randn(30, 6, device=DEVICE).t()  # last-dim stride 6
    torch.testing.assert_close(S.swiglu_packed_forward(xt), S.swiglu_packed_forward(xt.contiguous()), rtol=0, atol=0)
    do = torch.randn(6, 15, device=DEVICE)
    torch.testing.assert_close(S.swiglu_packed_backward(do, x), S.swiglu_packed_backward(do, xc), rtol=0, atol=0)


def test_swiglu_packed_bad_input():
    from fastlm.kernels.swiglu import swiglu_packed

    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.zeros(3, 7, device=DEVICE))


def test_ops_dispatch_triton_backend():
    gate, up, _ = (t.to(DEVICE) for t in _data((4, 10), seed=5))
    out = ops.swiglu(gate, up, backend="triton")
    _check("out", out, F.silu(gate.double()) * up.double(), F.silu(gate) * up, torch.float32)


def test_backend_reasons():
    from fastlm.ops.triton_backend import BACKEND

    x = torch.zeros(3, device=DEVICE)
    assert BACKEND.swiglu_unsupported(x, x) is None
    assert "float64" in BACKEND.swiglu_unsupported(x.double(), x.double())


def test_opcheck(S):
    gate, up, _ = (t.to(DEVICE).requires_grad_() for t in _data((3, 8), seed=6))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastlm.triton_swiglu_fwd.default, (gate, up), test_utils=utils)
    torch.library.opcheck(torch.ops.fastlm.triton_swiglu_packed_fwd.default, (gate,), test_utils=utils)
    plain = (torch.randn(3, 8, device=DEVICE), gate.detach(), up.detach())
    torch.library.opcheck(torch.ops.fastlm.triton_swiglu_bwd.default, plain, test_utils=utils[::2])
    torch.library.opcheck(
        torch.ops.fastlm.triton_swiglu_packed_bwd.default,
        (torch.randn(3, 4, device=DEVICE), gate.detach()),
        test_utils=utils[::2],
    )


@pytest.mark.skipif(
    not CUDA,
    reason="opcheck's test_aot_dispatch_dynamic runs the op inside an AOT "
    "graph of FunctionalTensors, which the CPU interpreter cannot execute; GPU only",
)
def test_opcheck_aot_dispatch():
    gate, up = (torch.randn(3, 8, device=DEVICE, requires_grad=True) for _ in range(2))
    utils = ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.fastlm.triton_swiglu_fwd.default, (gate, up), test_utils=utils)
    torch.library.opcheck(torch.ops.fastlm.triton_swiglu_packed_fwd.default, (gate,), test_utils=utils)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large(S, dtype):
    gate, up, dout = _data((4096, 11008), seed=7, scale=1.0)
    args = [t.to("cuda", dtype) for t in (gate, up, dout)]
    ref = _eager(*(a.double() for a in args))
    base = _eager(*args)
    g, u = (t.detach().requires_grad_() for t in args[:2])
    out = S.swiglu(g, u)
    grads = torch.autograd.grad(out, (g, u), args[2])
    for name, got, r, b in zip(("out", "d_gate", "d_up"), (out,) + grads, ref, base):
        _check(name, got, r, b, dtype)


@needs_gpu
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) over the split and packed ops: value and gradients against the
    float64 oracle under the 2x rule (baseline: the same function in eager float32 PyTorch)."""
    from fastlm.kernels.swiglu import swiglu, swiglu_packed

    def f(x, g, u, ops_=(swiglu_packed, swiglu)):
        packed, split = ops_
        return packed(x).sum() + split(g, u).square().sum()

    def eager_packed(x):
        return F.silu(x[..., : x.shape[-1] // 2]) * x[..., x.shape[-1] // 2 :]

    def run(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return (out,) + torch.autograd.grad(out, leaves)

    inputs = [torch.randn(8, 64, device="cuda") for _ in range(3)]
    eager_ops = (eager_packed, lambda g, u: F.silu(g) * u)
    ref = run(lambda *a: f(*a, ops_=eager_ops), [t.double() for t in inputs])
    base = run(lambda *a: f(*a, ops_=eager_ops), inputs)
    got = run(torch.compile(f, fullgraph=True), inputs)
    for name, g, r, b in zip(("value", "dx", "dgate", "dup"), got, ref, base):
        _check(name, g, r, b, torch.float32)
