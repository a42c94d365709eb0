"""benchmarks/cuda_direct.py: the torch-free CUDA library the GPU check loads with ctypes.

Here (no GPU needed): the library compiles (the .cu files in parallel) and links with nvcc and
exports the entry points the wrapper binds, with ptxas's report beside it; build_and_load loads a
prebuilt library first and builds only when there is none or it does not load, and says clearly
why it cannot run (no nvcc, no GPU); every argument error is a one-line ValueError/TypeError raised
before anything is launched.
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch
from attn_oracle import lse_base2_fp32

from benchmarks import cuda_direct as cd


class _RecordingLib:
    """Stands in for the loaded library: records calls (none may happen on bad arguments)."""

    def __init__(self):
        self.calls = []
        for name in (*cd._SIGNATURES, "fastlm_error_string"):
            setattr(self, name, self._entry(name))

    def _entry(self, name):
        def call(*args):
            self.calls.append(name)
            return 0

        return call


@pytest.fixture
def lib():
    return cd.DirectLib(_RecordingLib())


def _qkv(dtype=torch.float16, b=1, h=4, h_kv=2, t_q=9, t_k=12, d=64):
    return (
        torch.randn(b, h, t_q, d).to(dtype),
        torch.randn(b, h_kv, t_k, d).to(dtype),
        torch.randn(b, h_kv, t_k, d).to(dtype),
    )


def test_build_and_load_without_nvcc(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(cd.Unavailable, match="nvcc not found .* no prebuilt library"):
        cd.build_and_load(tmp_path / "build", timeout_s=10, prebuilt_dir=tmp_path / "none")
    assert not (tmp_path / "build").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the library would load")
@pytest.mark.skipif(cd.find_nvcc() is None, reason="nvcc not found")
def test_build_and_load_without_gpu(tmp_path):
    with pytest.raises(cd.Unavailable, match="no CUDA GPU"):
        cd.build_and_load(tmp_path / "build", timeout_s=600, prebuilt_dir=tmp_path / "none")
    assert not (tmp_path / "build").exists()  # refused before compiling anything


def _fake_nvcc(tmp_path, body):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    return str(fake)


def test_build_timeout_is_unavailable(tmp_path):
    with pytest.raises(cd.Unavailable, match="did not finish within 0.5 s"):
        cd.build_library(tmp_path / "build", timeout_s=0.5, nvcc=_fake_nvcc(tmp_path, "sleep 5\n"))
    assert not any((tmp_path / "build").iterdir())  # no partial library left behind


def test_sources_compile_in_parallel(tmp_path):
    """Each compile (nvcc -c) of the fake waits until all three have started (a barrier: run one
    after another, the first would give up and fail); the link writes the library."""
    marks = tmp_path / "marks"
    marks.mkdir()
    body = (
        f'case "$1" in -c) touch {marks}/$$; i=0\n'
        f"  while [ $(ls {marks} | wc -l) -lt 3 ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done;;\n"
        '  *) for a; do out=$a; done; echo lib > "$out";; esac\n'
    )
    path = cd.build_library(tmp_path / "build", timeout_s=120, nvcc=_fake_nvcc(tmp_path, body))
    assert path.read_text() == "lib\n" and len(list(marks.iterdir())) == 3


def _loadable_copy(built, tmp_path, name):
    """A copy of a real library under the prebuilt name (``built`` is one nvcc made here)."""
    folder = tmp_path / "prebuilt"
    folder.mkdir(exist_ok=True)
    shutil.copy(built, folder / name)
    return folder


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    if cd.find_nvcc() is None:
        pytest.skip("nvcc not found")
    return cd.build_library(tmp_path_factory.mktemp("lib"), timeout_s=900)  # one arch (sm_90a): short


def test_prebuilt_library_is_loaded_first(built_library, tmp_path, monkeypatch):
    """With a GPU reported and the prebuilt library of these sources present, it is loaded as is:
    no nvcc run, no build folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    folder = _loadable_copy(built_library, tmp_path, cd._library_name(cd.PREBUILT_ARCHS))
    monkeypatch.setattr(cd, "find_nvcc", lambda: None)
    lib = cd.build_and_load(tmp_path / "build", timeout_s=1, prebuilt_dir=folder)
    assert lib.path == folder / cd._library_name(cd.PREBUILT_ARCHS)
    assert not (tmp_path / "build").exists()


def test_prebuilt_that_does_not_load_is_rebuilt(built_library, tmp_path, monkeypatch):
    """A prebuilt file that is no library (or one of other sources: another name) makes the
    check build its own for the GPU it finds."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cd, "device_archs", lambda _torch: [cd.BASE_ARCH])
    folder = tmp_path / "prebuilt"
    folder.mkdir()
    (folder / cd._library_name(cd.PREBUILT_ARCHS)).write_text("not a library")
    link = f'for a; do out=$a; done; cp {built_library} "$out"'
    fake = _fake_nvcc(tmp_path, f'case "$1" in -c) exit 0;; *) {link};; esac\n')
    monkeypatch.setattr(cd, "find_nvcc", lambda: fake)
    lib = cd.build_and_load(tmp_path / "build", timeout_s=60, prebuilt_dir=folder)
    assert lib.path.parent == tmp_path / "build"


def test_gencode_flags():
    assert cd.gencode("sm_90a") == "-gencode=arch=compute_90a,code=sm_90a"
    assert cd.gencode("sm_80") == "-gencode=arch=compute_80,code=sm_80"
    with pytest.raises(ValueError, match="sm_90"):
        cd.gencode("90")


def test_library_builds_links_and_binds(built_library):
    path, folder = built_library, built_library.parent
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cd.build_library(folder, timeout_s=1) == path  # cached: no second nvcc run
    assert path.stat().st_mtime_ns == stamp
    wrapper = cd.DirectLib(ctypes.CDLL(str(path)))  # every entry point the wrapper binds exists
    assert wrapper._lib.fastlm_error_string(0) == b"no error"
    report = path.with_name(path.name + ".ptxas.txt")
    assert sorted(p.name for p in folder.iterdir()) == [path.name, report.name]
    usage = [ln for ln in report.read_text().splitlines() if "spill stores" in ln]
    assert usage and all(" 0 bytes spill stores" in ln for ln in usage), usage  # no kernel spills


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "dtype float32 not supported"),
        (lambda q, k, v: (q, k.half(), v.bfloat16()), "dtypes differ"),
        (lambda q, k, v: (q[..., :40], k[..., :40], v[..., :40]), "head dim 40"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "must match"),
        (lambda q, k, v: (q[:, :3], k, v), "multiple of kv heads"),
        (lambda q, k, v: (q[0], k, v), "must be 4-D"),
        (lambda q, k, v: (torch.randn(1, 4, 64, 9).half().transpose(2, 3), k, v), "q needs a contiguous last dim"),
        (lambda q, k, v: (torch.randn(1, 4, 9, 68).half()[..., :64], k, v), "multiples of 8"),
        (lambda q, k, v: (q, k, v), "must be a CUDA tensor, got cpu"),
    ],
)
def test_attention_argument_errors(lib, change, message):
    q, k, v = change(*_qkv())
    with pytest.raises(ValueError, match=message):
        lib.attention_fwd(q, k, v, True, 0.125)
    assert lib._lib.calls == []


def test_attention_bwd_argument_errors(lib):
    q, k, v = _qkv(torch.bfloat16)
    out, lse = torch.randn_like(q), torch.zeros(1, 4, 9)
    with pytest.raises(ValueError, match="dout .* must match q"):
        lib.attention_bwd(torch.randn(1, 4, 9, 32).bfloat16(), q, k, v, out, lse, True, 0.1)
    with pytest.raises(ValueError, match="lse must be float32 of shape"):
        lib.attention_bwd(out, q, k, v, out, lse[..., :4], True, 0.1)
    with pytest.raises(TypeError, match="lse must be a torch.Tensor"):
        lib.attention_bwd(out, q, k, v, out, None, True, 0.1)
    with pytest.raises(ValueError, match="CUDA tensor"):
        lib.attention_bwd(out, q, k, v, out, lse, True, 0.1)
    assert lib._lib.calls == []


def test_swiglu_argument_errors(lib):
    g = torch.randn(4, 6)
    with pytest.raises(ValueError, match="one shape and dtype"):
        lib.swiglu_fwd(g, torch.randn(4, 5))
    with pytest.raises(ValueError, match="dtype float64 not supported"):
        lib.swiglu_fwd(g.double(), g.double())
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        lib.swiglu_fwd(g, [1.0])
    with pytest.raises(ValueError, match="one shape and dtype"):
        lib.swiglu_bwd(g.half(), g, g)
    with pytest.raises(ValueError, match="CUDA tensor"):
        lib.swiglu_bwd(g, g, g)
    with pytest.raises(ValueError, match="last dim of x must be even"):
        lib.swiglu_packed_fwd(torch.randn(3, 7))
    with pytest.raises(ValueError, match="CUDA tensor"):
        lib.swiglu_packed_fwd(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"dy must be .* shape \(3, 4\)"):
        lib.swiglu_packed_bwd(torch.randn(3, 8), torch.randn(3, 8))
    assert lib._lib.calls == []


# ---- on a GPU: the kernels against the float64 oracle (skipped without one) ----------------------
# Tolerance (FlashAttention's rule, as in tests/test_ops.py): max|x - ref64| <= 2 * max|base - ref64|
# + eps, base = the textbook formula in the same dtype, eps = half an ulp at max|ref| (+ a floor
# for gradients whose exact value is ~0).
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    try:
        return cd.build_and_load(tmp_path_factory.mktemp("direct_build"), timeout_s=600)
    except cd.Unavailable as e:
        pytest.skip(f"cuda_direct unavailable: {e}")


def _two_x(x, base, ref, what, floor=0.0):
    ref = ref.double().cpu()
    eps = torch.finfo(x.dtype).eps * ref.abs().max().item() / 2 + floor
    err = (x.double().cpu() - ref).abs().max().item()
    base_err = (base.double().cpu() - ref).abs().max().item()
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    assert err <= 2 * base_err + eps, f"{what}: error {err:.3g} > 2 x same-dtype naive {base_err:.3g}"


def _naive_with_grads(q, k, v, dout, causal, scale, dtype):
    from fastlm.ops.reference import naive_attention

    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = naive_attention(*leaves, causal=causal, scale=scale, dtype=dtype)
    out.backward(dout.to(dtype))
    return out.detach(), [x.grad for x in leaves]


def reference_mask(t_q, t_k):
    from fastlm.ops.reference import causal_mask

    return causal_mask(t_q, t_k, device="cuda")


# (B, H, H_kv, T_q, T_k): one tile, ragged multi-tile, KV-cache (T_q < T_k), masked rows (T_q > T_k)
ATTN_SHAPES = [(2, 2, 2, 1, 1), (1, 4, 2, 97, 97), (1, 2, 2, 130, 257), (1, 2, 1, 257, 130), (2, 2, 2, 300, 300)]


@needs_gpu
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
def test_direct_attention_matches_float64(gpu_lib, shape, dtype, d, causal, layout):
    b, h, h_kv, t_q, t_k = shape
    g = torch.Generator().manual_seed(t_q * 7 + t_k)

    def make(heads, t):
        if layout == "bthd":  # (B, T, H, D) storage viewed as (B, H, T, D): no copy
            return torch.randn(b, t, heads, d, generator=g).to("cuda", dtype).transpose(1, 2)
        return torch.randn(b, heads, t, d, generator=g).to("cuda", dtype)

    q, k, v = make(h, t_q), make(h_kv, t_k), make(h_kv, t_k)
    dout = torch.randn(b, h, t_q, d, generator=g).to("cuda", dtype)
    scale = d**-0.5
    out, lse = gpu_lib.attention_fwd(q, k, v, causal, scale)
    dq, dk, dv = gpu_lib.attention_bwd(dout, q, k, v, out, lse, causal, scale)
    torch.cuda.synchronize()
    ref, ref_grads = _naive_with_grads(q, k, v, dout, causal, scale, torch.float64)
    base, base_grads = _naive_with_grads(q, k, v, dout, causal, scale, dtype)
    _two_x(out, base, ref, "out")
    s = (q.double() @ k.double().repeat_interleave(h // h_kv, 1).transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~reference_mask(t_q, t_k), float("-inf"))
    ref_lse = torch.logsumexp(s, dim=-1)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    base_lse = lse_base2_fp32(q, k, causal, scale)  # float32, the kernels' base-2 formula
    _two_x(lse[fin], base_lse[fin], ref_lse[fin], "lse")
    floor = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item() * dout.abs().max().item()
    for name, x, grad, bg, rg in zip(("dq", "dk", "dv"), (q, k, v), (dq, dk, dv), base_grads, ref_grads):
        assert grad.shape == x.shape and grad.dtype == dtype, name
        _two_x(grad, bg, rg, name, floor=floor)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows,hidden,pad", [(1, 3, 0), (37, 40, 0), (64, 1024, 8), (5, 17, 3)])
def test_direct_swiglu_matches_float64(gpu_lib, dtype, rows, hidden, pad):
    g = torch.Generator().manual_seed(rows + hidden)
    big = torch.randn(rows, 2 * hidden + pad, generator=g).to("cuda", dtype)
    x = big[:, pad : pad + 2 * hidden]  # rows 2 * hidden + pad apart: read in place
    before = big.clone()
    dy = torch.randn(rows, hidden, generator=g).to("cuda", dtype)
    gate, up = x[:, :hidden], x[:, hidden:]
    x64 = x.double().requires_grad_()
    ref = torch.nn.functional.silu(x64[:, :hidden]) * x64[:, hidden:]
    ref.backward(dy.double())
    xb = x.detach().clone().requires_grad_()
    base = torch.nn.functional.silu(xb[:, :hidden]) * xb[:, hidden:]
    base.backward(dy)
    y_packed, dx = gpu_lib.swiglu_packed_fwd(x), gpu_lib.swiglu_packed_bwd(dy, x)
    y_split = gpu_lib.swiglu_fwd(gate, up)
    dg, du = gpu_lib.swiglu_bwd(dy, gate, up)
    torch.cuda.synchronize()
    for name, got in (("packed", y_packed), ("split", y_split)):
        _two_x(got, base, ref, f"{name} fwd")
    _two_x(dx, xb.grad, x64.grad, "packed dx")
    _two_x(torch.cat([dg, du], dim=-1), xb.grad, x64.grad, "split dgate|dup")
    assert dx.is_contiguous() and dx.shape == x.shape
    assert torch.equal(big, before)  # inputs never written
