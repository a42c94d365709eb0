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
