"""benchmarks/cuda_direct.py: the torch-free CUDA library the GPU check loads with ctypes.

Here (no GPU needed): the library compiles and links with nvcc and exports the entry points the
wrapper binds; build_and_load says clearly why it cannot run (no nvcc, no GPU); every argument
error is a one-line ValueError/TypeError raised before anything is launched.
"""
from __future__ import annotations

import ctypes
import os

import pytest
import torch

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
    return (torch.randn(b, h, t_q, d).to(dtype), torch.randn(b, h_kv, t_k, d).to(dtype),
            torch.randn(b, h_kv, t_k, d).to(dtype))


def test_build_and_load_without_nvcc(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(cd.Unavailable, match="nvcc not found"):
        cd.build_and_load(tmp_path / "build", timeout_s=10)
    assert not (tmp_path / "build").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the library would load")
@pytest.mark.skipif(cd.find_nvcc() is None, reason="nvcc not found")
def test_build_and_load_without_gpu(tmp_path):
    with pytest.raises(cd.Unavailable, match="no CUDA GPU"):
        cd.build_and_load(tmp_path / "build", timeout_s=600)
    assert not (tmp_path / "build").exists()  # refused before compiling anything


def test_build_timeout_is_unavailable(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\nsleep 5\n")
    fake.chmod(0o755)
    with pytest.raises(cd.Unavailable, match="did not finish within 0.5 s"):
        cd.build_library(tmp_path / "build", timeout_s=0.5, nvcc=str(fake))
    assert not any((tmp_path / "build").iterdir())  # no partial library left behind


def test_gencode_flags():
    assert cd.gencode("sm_90a") == "-gencode=arch=compute_90a,code=sm_90a"
    assert cd.gencode("sm_80") == "-gencode=arch=compute_80,code=sm_80"
    with pytest.raises(ValueError, match="sm_90"):
        cd.gencode("90")


@pytest.mark.skipif(cd.find_nvcc() is None, reason="nvcc not found")
def test_library_builds_links_and_binds(tmp_path):
    path = cd.build_library(tmp_path, timeout_s=900)  # one arch (sm_90a) keeps this short
    assert path.is_file() and path.parent == tmp_path
    stamp = path.stat().st_mtime_ns
    assert cd.build_library(tmp_path, timeout_s=1) == path  # cached: no second nvcc run
    assert path.stat().st_mtime_ns == stamp
    wrapper = cd.DirectLib(ctypes.CDLL(str(path)))  # every entry point the wrapper binds exists
    assert wrapper._lib.fastlm_error_string(0) == b"no error"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q.float(), k.float(), v.float()), "dtype float32 not supported"),
    (lambda q, k, v: (q, k.half(), v.bfloat16()), "dtypes differ"),
    (lambda q, k, v: (q[..., :40], k[..., :40], v[..., :40]), "head dim 40"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "must match"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of kv heads"),
    (lambda q, k, v: (q[0], k, v), "must be 4-D"),
    (lambda q, k, v: (torch.randn(1, 4, 64, 9).half().transpose(2, 3), k, v),
     "q needs a contiguous last dim"),
    (lambda q, k, v: (torch.randn(1, 4, 9, 68).half()[..., :64], k, v), "multiples of 8"),
    (lambda q, k, v: (q, k, v), "must be a CUDA tensor, got cpu"),
])
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
