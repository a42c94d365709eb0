"""The CUDA kernels compile: each csrc/cuda/*.cu through nvcc for sm_80 and sm_90a, within the
register file and without spills, and the attention kernels (the backward included) run their
matrix products on tensor cores (HMMA in the SASS).

The .cu files include no torch headers (see csrc/cuda/kernels.h), so this runs on machines without
a GPU or a CUDA build of torch; it is skipped only when nvcc is absent (the SASS check also needs
cuobjdump: from the CUDA toolkit, or the copy inside Triton's wheel). All files and architectures
compile concurrently, once per session.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")

pytestmark = pytest.mark.skipif(
    NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)"
)


def _find_cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    if NVCC:
        beside = Path(NVCC).resolve().parent / "cuobjdump"
        if beside.is_file():
            return str(beside)
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def test_there_are_cuda_sources():
    names = {p.name for p in CU_FILES}
    assert {"attention.cu", "swiglu.cu", "direct.cu"} <= names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(file name, arch): (object path, returncode, nvcc + ptxas -v output)} for every .cu."""
    out_dir = tmp_path_factory.mktemp("cu_objects")
    procs = {}
    for src in CU_FILES:
        for arch in ARCHS:
            sm = arch.rsplit("=", 1)[1]
            obj = out_dir / f"{src.stem}_{sm}.o"
            cmd = [
                NVCC,
                "-c",
                "-std=c++17",
                "-O3",
                "--use_fast_math",
                "--expt-relaxed-constexpr",
                "-Xptxas",
                "-v",
                arch,
                "-I",
                str(ROOT / "csrc"),
                str(src),
                "-o",
                str(obj),
            ]
            procs[(src.name, sm)] = (
                obj,
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            )
    results = {}
    for key, (obj, proc) in procs.items():
        out, _ = proc.communicate(timeout=900)
        results[key] = (obj, proc.returncode, out)
    return results


def test_cu_files_compile(compiled):
    failures = [
        f"{name} [{sm}] rc={rc}\n{out[-4000:]}"
        for (name, sm), (obj, rc, out) in compiled.items()
        if rc != 0 or not obj.exists()
    ]
    assert not failures, "\n\n".join(failures)


def parse_ptxas(output: str) -> dict:
    """{function: {"registers": n, "spill_stores": n, "spill_loads": n, "stack": n}} from -v."""
    funcs, current = {}, None
    for line in output.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = funcs.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return funcs


def test_parse_ptxas_reads_spills_and_registers():
    sample = (
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 380 bytes cmem[0]\n"
    )
    assert parse_ptxas(sample) == {"_Z3fooPf": {"stack": 16, "spill_stores": 8, "spill_loads": 4, "registers": 96}}


def test_kernels_fit_registers_without_spills(compiled):
    problems, kernels = [], 0
    for (name, sm), (_, rc, out) in compiled.items():
        assert rc == 0, f"{name} [{sm}] did not compile"
        for fn, info in parse_ptxas(out).items():
            if "registers" not in info:
                continue
            kernels += 1
            if info["registers"] > 255 or info.get("spill_stores") or info.get("spill_loads"):
                problems.append(f"{name} [{sm}] {fn}: {info}")
    assert kernels >= 2 * (12 + 8), f"ptxas -v reported only {kernels} kernels"
    assert not problems, "\n".join(problems)


def _sass_by_function(cuobjdump: str, obj: Path) -> dict:
    proc = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    funcs, current = {}, None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            funcs[current] = []
        elif current is not None:
            funcs[current].append(line)
    return funcs


@pytest.mark.parametrize("sm", ["sm_80", "sm_90a"])
def test_attention_kernels_use_tensor_cores(compiled, sm):
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    obj, rc, _ = compiled[("attention.cu", sm)]
    assert rc == 0
    funcs = _sass_by_function(cuobjdump, obj)
    for kind in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"):
        names = [f for f in funcs if kind in f]
        assert len(names) == 4, f"{kind}: expected fp16/bf16 x D 64/128, found {names}"
        for f in names:
            sass = "\n".join(funcs[f])
            assert "HMMA.16816.F32" in sass, f"{f}: no m16n8k16 fp32-accumulate HMMA"
            assert "MUFU.EX2" in sass, f"{f}: softmax exponentials are not ex2"
            assert "LDSM" in sass, f"{f}: operands not loaded with ldmatrix"


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

    homes = [
        cpp_extension.CUDA_HOME,
        os.environ.get("CUDA_HOME"),
        "/usr/local/cuda",
        str(Path(NVCC).resolve().parents[1]),
    ]
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
        cmd = (
            [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DFASTLM_WITH_CUDA"]
            + [f"-I{i}" for i in incs]
            + [str(src)]
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failures.append(f"{src.name}\n{proc.stderr[-4000:]}")
    assert not failures, "\n\n".join(failures)
