"""The CUDA kernels (csrc/cuda/attention.cu, csrc/cuda/swiglu.cu) executed on the CPU.

tests/csrc/cuda_host_sim.h stands in for the GPU: the threads of a CTA run as cooperative
user-level threads, and ldmatrix, mma.sync m16n8k16, shuffles and cp.async follow their PTX
definitions. The kernel code itself (fragment layouts, swizzled tiles, masking, online softmax,
block order, GQA, the dK/dV and dQ loops) is the code the GPU runs, compiled with the host C++
compiler, and is checked against the float64 oracle with the 2x rule of tests/test_ops.py; the
SwiGLU launchers run with their real grid/block choice (vectorised and scalar paths). What
only a GPU can show (timing, async-copy races, register limits) is out of reach here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mask_rule import doc_bounds, doc_ids, oracle, visible

from fastlm.ops.positions import alibi_slopes
from fastlm.ops.reference import attention_forward, naive_attention

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++")


def _cuda_include():
    """The CUDA headers: under $CUDA_HOME (tests/conftest.py sets it to the toolkit of the test extras'
    pip wheels where no system one is found), beside the nvcc on PATH, or in /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    homes = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        str(Path(nvcc).resolve().parents[1]) if nvcc else None,
        "/usr/local/cuda",
    ]
    for home in filter(None, homes):
        for sub in ("include", "targets/x86_64-linux/include"):
            if (Path(home) / sub / "cuda_fp16.h").exists():
                return str(Path(home) / sub)
    return None


CUDA_INC = _cuda_include()
pytestmark = pytest.mark.skipif(
    CXX is None or CUDA_INC is None, reason="needs a host C++ compiler and the CUDA headers"
)
_P, _F = ctypes.c_void_p, ctypes.c_float


def _build(tmp_path_factory, name):
    lib = tmp_path_factory.mktemp("sim") / f"{name}.so"
    cmd = [
        CXX,
        "-std=c++17",
        "-O2",
        "-DFASTLM_HOST_SIM",
        "-shared",
        "-fPIC",
        "-I",
        str(ROOT / "csrc"),
        "-I",
        str(ROOT / "tests" / "csrc"),
        "-I",
        CUDA_INC,
        str(ROOT / "tests" / "csrc" / f"{name}.cpp"),
        "-o",
        str(lib),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    dll = _build(tmp_path_factory, "attention_host_sim")
    i64 = ctypes.c_int64
    dll.sim_attention_fwd.argtypes = [ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int, _F, _P, i64, _P, _P, _P]
    dll.sim_attention_bwd.argtypes = [
        ctypes.c_int,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        ctypes.c_int,
        _F,
        _P,
        i64,
        _P,
        _P,
        _P,
        _P,
        _P,
    ]
    return dll


def _strides(*tensors):
    vals = [0 if t.size(i) == 1 else t.stride(i) for t in tensors for i in range(3)]
    return (ctypes.c_int64 * len(vals))(*vals)


def _ptr(t):
    return None if t is None else t.data_ptr()


def run_kernels(sim, q, k, v, dout, causal, scale, slopes, window=None, seg=None):
    b, h, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    code = 0 if q.dtype == torch.float16 else 1
    shape = (ctypes.c_int32 * 6)(b, h, h_kv, t_q, t_k, d)
    alibi = None if slopes is None else slopes.float().contiguous()
    doc = None if seg is None else doc_bounds(seg).contiguous()  # what the torch glue passes
    masks = (window or 0, _ptr(doc))
    out, lse = torch.empty(b, h, t_q, d, dtype=q.dtype), torch.empty(b, h, t_q)
    assert (
        sim.sim_attention_fwd(
            code,
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            _strides(q, k, v),
            shape,
            int(causal),
            scale,
            _ptr(alibi),
            *masks,
            out.data_ptr(),
            lse.data_ptr(),
        )
        == 0
    )
    delta = torch.empty(b, h, t_q)
    dq = torch.empty_like(out)
    dk, dv = torch.empty(b, h_kv, t_k, d, dtype=q.dtype), torch.empty(b, h_kv, t_k, d, dtype=q.dtype)
    assert (
        sim.sim_attention_bwd(
            code,
            dout.data_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            lse.data_ptr(),
            _strides(q, k, v, out, dout),
            shape,
            int(causal),
            scale,
            _ptr(alibi),
            *masks,
            delta.data_ptr(),
            dq.data_ptr(),
            dk.data_ptr(),
            dv.data_ptr(),
        )
        == 0
    )
    return out, lse, (dq, dk, dv)


def _with_grads(q, k, v, dout, causal, scale, slopes, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = naive_attention(*leaves, causal=causal, scale=scale, alibi_slopes=slopes, dtype=dtype)
    out.backward(dout.to(dtype))
    return out.detach(), [x.grad for x in leaves]


def _two_x(x, base, ref, what, floor=0.0):
    eps = torch.finfo(x.dtype).eps * ref.abs().max().item() / 2 + floor
    err = (x.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    assert err <= 2 * base_err + eps, f"{what}: error {err:.3g} > 2 x same-dtype naive {base_err:.3g}"


def _inputs(g, b, h, h_kv, t_q, t_k, d, dtype, layout):
    """q, k, v (a (B, T, H, D) view when layout is "bthd") and dout, drawn from g."""

    def make(heads, t):
        if layout == "bthd":
            return torch.randn(b, t, heads, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, t, d, generator=g).to(dtype)

    q, k, v = make(h, t_q), make(h_kv, t_k), make(h_kv, t_k)
    return q, k, v, torch.randn(b, h, t_q, d, generator=g).to(dtype)


# (B, H, H_kv, T_q, T_k, D, causal, alibi, layout): ragged tails, several 128-row / 64-key blocks,
# KV cache (T_q < T_k), rows that see nothing (T_q > T_k), GQA, ALiBi, a (B, T, H, D) view.
CASES = [
    ("t1_d64", 1, 1, 1, 1, 1, 64, True, False, "bhtd"),
    ("t70_d64_causal", 1, 2, 2, 70, 70, 64, True, False, "bhtd"),
    ("t150_d128_causal_gqa", 1, 4, 2, 150, 150, 128, True, False, "bthd"),
    ("kvcache_20x140_d64", 1, 2, 1, 20, 140, 64, True, False, "bhtd"),
    ("masked_rows_140x20_d64", 1, 2, 2, 140, 20, 64, True, False, "bhtd"),
    ("full_37x90_d128", 2, 1, 1, 37, 90, 128, False, False, "bthd"),
    ("alibi_70_d64_causal", 1, 2, 2, 70, 70, 64, True, True, "bhtd"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_kernels_match_float64(sim, case, dtype):
    _, b, h, h_kv, t_q, t_k, d, causal, alibi, layout = case
    g = torch.Generator().manual_seed(t_q * 131 + t_k)
    q, k, v, dout = _inputs(g, b, h, h_kv, t_q, t_k, d, dtype, layout)
    slopes = alibi_slopes(h) if alibi else None
    scale = d**-0.5
    out, lse, grads = run_kernels(sim, q, k, v, dout, causal, scale, slopes)

    ref, ref_grads = _with_grads(q, k, v, dout, causal, scale, slopes, torch.float64)
    base, base_grads = _with_grads(q, k, v, dout, causal, scale, slopes, dtype)
    _two_x(out, base, ref, "out")
    _, ref_lse = attention_forward(q.double(), k.double(), v.double(), causal, scale, slopes)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=0, atol=2e-3)
    floor = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item() * dout.abs().max().item()
    for name, grad, bg, rg in zip(("dq", "dk", "dv"), grads, base_grads, ref_grads):
        _two_x(grad, bg, rg, name, floor=floor)
    if causal and t_q > t_k:  # rows that see no key: exact zeros, and no gradient
        n = t_q - t_k
        assert torch.equal(out[:, :, :n], torch.zeros_like(out[:, :, :n]))
        assert torch.equal(grads[0][:, :, :n], torch.zeros_like(grads[0][:, :, :n]))


# Sliding windows and documents: (name, B, H, H_kv, T_q, T_k, D, causal, window, docs, alibi, layout).
# Windows shorter than a 64-key tile and a 128-row block (tiles skipped, partly visible tiles masked,
# key-range starts off the 64-key grid), documents of random length (one of length 1 included),
# rows that see nothing (T_q > T_k with documents), a KV cache, GQA, ALiBi, both head dims.
MASK_CASES = [
    ("win40_causal_t200_d64", 1, 2, 1, 200, 200, 64, True, 40, None, False, "bhtd"),
    ("docs_noncausal_gqa_t150_d64", 1, 4, 2, 150, 150, 64, False, None, "random", False, "bthd"),
    ("docs_len1_win30_alibi_kvcache_40x200_d64", 1, 2, 1, 40, 200, 64, True, 30, "len1", True, "bhtd"),
    ("masked_rows_docs_140x60_d128", 1, 2, 2, 140, 60, 128, True, None, "random", False, "bhtd"),
    ("win12_noncausal_docs_t90_d128", 2, 1, 1, 90, 90, 128, False, 12, "per_window", False, "bthd"),
    # tiles whose one visible pair sits on their edge: T_k - T_q = 1 puts a 16-row warp's last key
    # at a 64-key tile's first key (rows 48..63 end at key 64); window 50 starts the warp of rows
    # 112..127 at key 63, the last key of the tile [0, 64)
    ("edge_first_key_causal_100x101_d64", 1, 2, 1, 100, 101, 64, True, None, None, False, "bhtd"),
    ("edge_last_key_win50_t130_d64", 1, 1, 1, 130, 130, 64, True, 50, None, False, "bhtd"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_cuda_kernels_with_masks_match_float64(sim, case, dtype):
    _, b, h, h_kv, t_q, t_k, d, causal, window, docs, alibi, layout = case
    g = torch.Generator().manual_seed(t_q * 7 + t_k)
    q, k, v, dout = _inputs(g, b, h, h_kv, t_q, t_k, d, dtype, layout)
    seg = None if docs is None else doc_ids(b, t_k, docs, g, window)
    slopes = alibi_slopes(h) if alibi else None
    scale = d**-0.5
    mask = visible(b, t_q, t_k, causal, window, seg)
    out, lse, grads = run_kernels(sim, q, k, v, dout, causal, scale, slopes, window, seg)

    def with_grads(dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        y = oracle(*leaves, mask, scale, slopes)
        y.backward(dout.to(dt))
        return y.detach(), [x.grad for x in leaves]

    (ref, ref_grads), (base, base_grads) = with_grads(torch.float64), with_grads(dtype)
    _two_x(out, base, ref, "out")
    blind = ~mask.any(-1)[:, None].expand(b, h, t_q)  # rows that see no key: lse -inf, zeros
    assert torch.equal(torch.isinf(lse), blind)
    assert (out[blind] == 0).all() and (grads[0][blind] == 0).all()
    floor = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item() * dout.abs().max().item()
    for name, grad, bg, rg in zip(("dq", "dk", "dv"), grads, base_grads, ref_grads):
        _two_x(grad, bg, rg, name, floor=floor)


# ---- SwiGLU ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_swiglu(tmp_path_factory):
    dll = _build(tmp_path_factory, "swiglu_host_sim")
    i64 = ctypes.c_int64
    dll.sim_swiglu_fwd.argtypes = [ctypes.c_int, _P, _P, _P, i64]
    dll.sim_swiglu_bwd.argtypes = [ctypes.c_int, _P, _P, _P, _P, _P, i64]
    dll.sim_swiglu_packed_fwd.argtypes = [ctypes.c_int, _P, i64, i64, i64, _P]
    dll.sim_swiglu_packed_bwd.argtypes = [ctypes.c_int, _P, _P, i64, i64, i64, _P]
    return dll


_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


# hidden % 8 == 0 with an aligned row stride takes the 16-byte path; the rest the scalar one.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "rows,hidden,pad", [(1, 3, 0), (37, 40, 0), (300, 8, 0), (9, 520, 8), (5, 17, 3), (3, 2100, 0)]
)
def test_swiglu_kernels_match_float64(sim_swiglu, dtype, rows, hidden, pad):
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    big = torch.randn(rows, 2 * hidden + pad, generator=g).to(dtype)
    x = big[:, pad : pad + 2 * hidden]  # rows 2 * hidden + pad apart: read in place
    before = big.clone()
    dy = torch.randn(rows, hidden, generator=g).to(dtype)
    code = _CODES[dtype]

    y_packed = torch.full((rows, hidden), float("nan"), dtype=dtype)
    dx = torch.full((rows, 2 * hidden), float("nan"), dtype=dtype)
    assert sim_swiglu.sim_swiglu_packed_fwd(code, x.data_ptr(), rows, hidden, x.stride(0), y_packed.data_ptr()) == 0
    assert (
        sim_swiglu.sim_swiglu_packed_bwd(code, dy.data_ptr(), x.data_ptr(), rows, hidden, x.stride(0), dx.data_ptr())
        == 0
    )
    gate, up = x[:, :hidden].contiguous(), x[:, hidden:].contiguous()
    y_split = torch.full_like(gate, float("nan"))
    dg, du = torch.full_like(gate, float("nan")), torch.full_like(up, float("nan"))
    n = gate.numel()
    assert sim_swiglu.sim_swiglu_fwd(code, gate.data_ptr(), up.data_ptr(), y_split.data_ptr(), n) == 0
    assert (
        sim_swiglu.sim_swiglu_bwd(code, dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dg.data_ptr(), du.data_ptr(), n)
        == 0
    )

    x64 = x.double().requires_grad_()
    ref = torch.nn.functional.silu(x64[:, :hidden]) * x64[:, hidden:]
    ref.backward(dy.double())
    xb = x.detach().clone().requires_grad_()
    base = torch.nn.functional.silu(xb[:, :hidden]) * xb[:, hidden:]
    base.backward(dy)
    _two_x(y_packed, base.detach(), ref.detach(), "packed fwd")
    _two_x(y_split, base.detach(), ref.detach(), "split fwd")
    _two_x(dx, xb.grad, x64.grad, "packed dx")
    _two_x(torch.cat([dg, du], dim=-1), xb.grad, x64.grad, "split dgate|dup")
    assert torch.equal(big, before)  # the input is never written
