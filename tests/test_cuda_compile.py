"""The CUDA kernels compile: each csrc/cuda/*.cu through nvcc for sm_80 and sm_90a.

The .cu files include no torch headers (see csrc/cuda/kernels.h), so this runs on machines without
a GPU or a CUDA build of torch; it is skipped only when nvcc is absent. Both architectures of all
files compile concurrently to keep CI fast.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")

pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC),
                                reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def test_there_are_cuda_sources():
    names = {p.name for p in CU_FILES}
    assert {"attention.cu", "swiglu.cu"} <= names


def test_cu_files_compile(tmp_path):
    procs = []
    for src in CU_FILES:
        for arch in ARCHS:
            obj = tmp_path / f"{src.stem}_{arch.rsplit('=', 1)[1]}.o"
            cmd = [NVCC, "-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr", arch,
                   "-I", str(ROOT / "csrc"), str(src), "-o", str(obj)]
            procs.append((src.name, arch, obj, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    for name, arch, obj, proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or not obj.exists():
            failures.append(f"{name} [{arch}] rc={proc.returncode}\n{out[-4000:]}")
    assert not failures, "\n\n".join(failures)


# ---- the torch glue (csrc/cuda/*.cpp) ------------------------------------------------------------
# A CPU-only torch wheel lacks ATen/cuda and c10/cuda headers, so the glue cannot be built here. A
# syntax-and-types check against two tiny stand-ins for the missing headers (the stream getter and
# the device guard, the only CUDA-torch APIs the glue uses) still catches most mistakes.
_STUB_CONTEXT = """#pragma once
#include <cuda_runtime.h>
namespace at { namespace cuda {
struct CUDAStream { operator cudaStream_t() const { return nullptr; } };
inline CUDAStream getCurrentCUDAStream() { return {}; }
} }
"""
_STUB_GUARD = """#pragma once
#include <c10/core/Device.h>
namespace c10 { namespace cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; } }
"""


def _cuda_include_dir():
    from torch.utils import cpp_extension

    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             str(Path(NVCC).resolve().parents[1])]
    candidates = [Path(h) / sub for h in homes if h for sub in ("include", "targets/x86_64-linux/include")]
    return next((str(c) for c in candidates if (c / "cuda_runtime.h").exists()), None)


def test_cuda_glue_type_checks(tmp_path):
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    cxx = shutil.which("c++") or shutil.which("g++")
    cuda_inc = _cuda_include_dir()
    if cxx is None or cuda_inc is None:
        pytest.skip("no C++ compiler or no cuda_runtime.h next to nvcc")
    (tmp_path / "ATen" / "cuda").mkdir(parents=True)
    (tmp_path / "c10" / "cuda").mkdir(parents=True)
    if not torch.version.cuda:  # a CUDA torch has the real headers: use them
        (tmp_path / "ATen" / "cuda" / "CUDAContext.h").write_text(_STUB_CONTEXT)
        (tmp_path / "c10" / "cuda" / "CUDAGuard.h").write_text(_STUB_GUARD)
    incs = [str(tmp_path), cuda_inc, str(ROOT / "csrc"), sysconfig.get_paths()["include"]]
    incs += cpp_extension.include_paths()
    failures = []
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cpp")):
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
               "-DFASTLM_WITH_CUDA"] + [f"-I{i}" for i in incs] + [str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failures.append(f"{src.name}\n{proc.stderr[-4000:]}")
    assert not failures, "\n\n".join(failures)
