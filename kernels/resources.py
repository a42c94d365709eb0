"""Compile a fastlm Triton kernel for a GPU target (no GPU needed) and read its resource usage.

* :func:`compile_for_target` -- ``triton.compile`` of a kernel function down to a cubin for
  ``cuda:<capability>``, specialized like the JIT does at run time (unit last-dim strides,
  16-divisible pointers and strides).
* :func:`resource_usage` -- registers per thread, spills and shared memory of a compiled kernel,
  read from the compiled binary: ``cuobjdump --dump-resource-usage`` on the cubin (registers,
  stack frame), ``ptxas -v`` (spill stores/loads), and the CUDA driver when a GPU is present (what
  Triton's own ``n_regs`` / ``n_spills`` report). Spills never show in PTX, which has unlimited
  virtual registers: a PTX check for ``ld.local`` passes kernels that spill kilobytes.

Used by the tests (compile-only checks on CPU machines) and by ``benchmarks.gpu_check``.
"""
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

import triton

__all__ = ["compile_for_target", "resource_usage", "ptxas_path", "launched_kernels", "launched_usage"]

_FP32_POINTERS = {"LSE", "DELTA", "SLOPES", "O_PART", "LSE_PART"}
_INT_ARGS = {"H", "H_KV", "GROUP", "T_Q", "T_K", "HEAD_DIM", "T_Q_BUCKET", "T_K_BUCKET", "CHUNK",
             "N_SPLITS", "N", "HIDDEN"}


def _signature(names, constexprs, dtype):
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        elif n in _INT_ARGS or n.startswith("stride"):
            sig[n] = "i32"
        else:
            sig[n] = "*fp32" if n in _FP32_POINTERS else "*" + dtype
    return sig


def compile_for_target(fn, dtype: str, constexprs: dict, capability: int, num_warps: int = 4,
                       num_stages: int = 2):
    """``fn`` (a plain kernel function of fastlm.kernels) compiled for ``cuda:capability``;
    ``dtype`` is Triton's name of the tensor element type (``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(inspect.signature(fn).parameters)
    ce = dict(constexprs)
    for n in names:
        if n.startswith("stride") and n.endswith("d"):
            ce[n] = 1  # unit last-dim strides, as the JIT specializes them
    sig = _signature(names, ce, dtype)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("stride"))}
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # a compiled JITFunction even inside an interpreter run
    try:
        src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=ce, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _tool(name: str, capability: int = 90) -> Optional[str]:
    """A CUDA tool as Triton finds it (its bundled copy for this architecture), else on PATH."""
    if name == "ptxas":
        try:  # triton >= 3.5: the ptxas that compiles for this architecture
            from triton.backends.nvidia.compiler import get_ptxas
            path = get_ptxas(capability).path
            if path and os.path.exists(path):
                return path
        except (ImportError, AttributeError, TypeError):
            pass
    import triton.backends.nvidia as nv
    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if os.path.exists(bundled):
        return bundled
    return shutil.which(name)


def ptxas_path(capability: int = 90) -> Optional[str]:
    return _tool("ptxas", capability)


def _cubin_usage(cubin: bytes) -> dict:
    """Registers and stack frame (where spills live) of the cubin itself, via cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None or not cubin:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                              timeout=60).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        return {"cuobjdump_error": text.strip()[-200:] or "no resource usage line"}
    return {"cubin_regs": int(m.group(1)), "cubin_stack_bytes": int(m.group(2)),
            "cubin_local_bytes": int(m.group(4))}


def _ptxas_usage(ptx: str, capability: int) -> dict:
    ptxas = ptxas_path(capability)
    if ptxas is None:
        return {"ptxas_error": "no ptxas found"}
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"ptxas_error": text.strip().splitlines()[-1] if text.strip() else f"rc={proc.returncode}"}

    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None
    return {"ptxas_regs": number(r"Used (\d+) registers"),
            "ptxas_spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "ptxas_spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "ptxas_stack_bytes": number(r"(\d+) bytes stack frame")}


def _driver_usage(compiled) -> dict:
    """Triton's own counters, filled in when the cubin is loaded on a GPU."""
    init = getattr(compiled, "_init_handles", None)
    if init is None:
        return {}
    try:
        init()
    except Exception as e:  # no GPU / driver here
        return {"driver_error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    return {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None)}


def resource_usage(compiled, capability: int, use_driver: bool = False) -> dict:
    """``{"ptxas_regs", "ptxas_spill_store_bytes", ..., "shared_bytes", "num_warps", ...}`` of a
    compiled kernel; with ``use_driver`` (a GPU of that capability present) also Triton's
    ``n_regs`` / ``n_spills`` as the driver reports them."""
    meta = compiled.metadata
    usage = {"shared_bytes": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
             "num_stages": getattr(meta, "num_stages", None)}
    usage.update(_cubin_usage(compiled.asm.get("cubin", b"")))
    usage.update(_ptxas_usage(compiled.asm["ptx"], capability))
    if use_driver:
        usage.update(_driver_usage(compiled))
    return usage


def launched_kernels(jit_fn) -> list:
    """The compiled kernels a JIT function has launched so far (its per-device caches; empty for
    an interpreted function or a triton whose cache layout differs)."""
    caches = getattr(jit_fn, "device_caches", None)
    kernels = []
    if isinstance(caches, dict):
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            if isinstance(cache, dict):
                kernels += list(cache.values())
    return kernels


def launched_usage(kernel) -> dict:
    """Registers and spills of a kernel that ran on the GPU, as the driver reported them."""
    meta = kernel.metadata
    return {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
            "shared_bytes": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None)}
