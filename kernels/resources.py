"""Compile a fastlm Triton kernel for a GPU target (no GPU needed) and read its resource usage.

* :func:`compile_for_target` -- ``triton.compile`` of a kernel function down to a cubin for
  ``cuda:<capability>``, specialized like the JIT does at run time (unit last-dim strides,
  16-divisible pointers and strides).
* :func:`resource_usage` -- registers per thread, spills and shared memory of a compiled kernel,
  read from the compiled binary: ``cuobjdump --dump-resource-usage`` on the cubin (registers,
  stack frame), ``ptxas -v`` (spill stores/loads), and the CUDA driver when a GPU is present (what
  Triton's own ``n_regs`` / ``n_spills`` report). Spills never show in PTX, which has unlimited
  virtual registers: a PTX check for ``ld.local`` passes kernels that spill kilobytes.

* :func:`config_usage`, :func:`pinned_usage` -- those numbers for an attention kernel at a tile
  config, and for every pinned default at D=64 and 128 (bf16, causal, sm_90);
  :func:`other_triton_usage` -- the same under another Triton install (a folder of site-packages
  holding it, e.g. ``pip install --no-deps --target DIR triton==3.6.0``, the GPU image's version),
  run in a subprocess; ``FASTLM_OTHER_TRITONS`` names such folders (``os.pathsep``-separated) for
  the tests and ``benchmarks.gpu_check --dry-run``. ``python -m fastlm.kernels.resources`` prints
  :func:`pinned_usage` as JSON lines.

Used by the tests (compile-only checks on CPU machines) and by ``benchmarks.gpu_check``.
"""

import contextlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import triton

__all__ = [
    "compile_for_target",
    "resource_usage",
    "ptxas_path",
    "launched_kernels",
    "launched_usage",
    "config_usage",
    "pinned_usage",
    "other_triton_usage",
    "other_triton_sites",
    "OTHER_TRITONS_ENV",
    "PINNED_HEAD_DIMS",
]

OTHER_TRITONS_ENV = "FASTLM_OTHER_TRITONS"
PINNED_HEAD_DIMS = (64, 128)  # GPT-2 small's head dim and the headline's

_FP32_POINTERS = {"LSE", "DELTA", "SLOPES", "O_PART", "LSE_PART"}
_INT32_POINTERS = {"DOCS"}
_INT_ARGS = {
    "H",
    "H_KV",
    "GROUP",
    "T_Q",
    "T_K",
    "HEAD_DIM",
    "T_Q_BUCKET",
    "T_K_BUCKET",
    "CHUNK",
    "N_SPLITS",
    "N",
    "HIDDEN",
    "WINDOW",
}


def _signature(names, constexprs, dtype):
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        elif n in _INT_ARGS or n.startswith("stride"):
            sig[n] = "i32"
        elif n in _INT32_POINTERS:
            sig[n] = "*i32"
        else:
            sig[n] = "*fp32" if n in _FP32_POINTERS else "*" + dtype
    return sig


def compile_for_target(fn, dtype: str, constexprs: dict, capability: int, num_warps: int = 4, num_stages: int = 2):
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
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("stride"))
    }
    # a compiled JITFunction even inside an interpreter run; Triton's own ptxas run (no cache hit)
    # prints its -v report, which describes the very cubin returned
    with (
        _environ(TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"),
        contextlib.redirect_stdout(io.StringIO()) as log,
    ):
        src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=ce, attrs=attrs)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    kernel.fastlm_ptxas_log = log.getvalue()
    return kernel


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        return {"cuobjdump_error": text.strip()[-200:] or "no resource usage line"}
    return {"cubin_regs": int(m.group(1)), "cubin_stack_bytes": int(m.group(2)), "cubin_local_bytes": int(m.group(4))}


def _parse_ptxas(text: str) -> dict:
    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return {
        "ptxas_regs": number(r"Used (\d+) registers"),
        "ptxas_spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "ptxas_spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "ptxas_stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def _ptxas_usage(compiled, capability: int) -> dict:
    """ptxas -v's report: Triton's own run (the cubin's), else ptxas run here on the PTX with
    Triton's usual flag (-lineinfo)."""
    log = getattr(compiled, "fastlm_ptxas_log", "")
    if "Used" in log:
        return _parse_ptxas(log)
    ptxas = ptxas_path(capability)
    if ptxas is None:
        return {"ptxas_error": "no ptxas found"}
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run(
            [ptxas, "-lineinfo", "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"ptxas_error": text.strip().splitlines()[-1] if text.strip() else f"rc={proc.returncode}"}
    return _parse_ptxas(text)


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
    usage = {
        "shared_bytes": getattr(meta, "shared", None),
        "num_warps": getattr(meta, "num_warps", None),
        "num_stages": getattr(meta, "num_stages", None),
    }
    usage.update(_cubin_usage(compiled.asm.get("cubin", b"")))
    usage.update(_ptxas_usage(compiled, capability))
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
    return {
        "n_regs": getattr(kernel, "n_regs", None),
        "n_spills": getattr(kernel, "n_spills", None),
        "shared_bytes": getattr(meta, "shared", None),
        "num_warps": getattr(meta, "num_warps", None),
        "num_stages": getattr(meta, "num_stages", None),
    }


# ---- attention kernels at their configs ----------------------------------------------------------
def _attention_constexprs(kind: str, head_dim: int, config, causal: bool, alibi: bool, masks: bool = False) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    ce = dict(
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        HAS_ALIBI=alibi,
        BLOCK_D=block_d,
        DOT_PREC="tf32",
        HAS_WINDOW=masks,
        HAS_DOCS=masks,
        BLOCK_M=config[0],
        BLOCK_N=config[1],
    )
    if kind != "decode":
        ce["EVEN_D"] = head_dim == block_d
    if kind == "dq":
        ce["DELTA_ONLY"] = False
    if kind == "fwd":
        ce["NEG_SCALE"] = False
    return ce


def config_usage(
    kind: str,
    head_dim: int,
    config,
    capability: int = 90,
    dtype: str = "bf16",
    causal: bool = True,
    alibi: bool = False,
    masks: bool = False,
) -> dict:
    """:func:`resource_usage` of attention kernel ``kind`` (fwd, dkdv, dq, decode) compiled with
    ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) for ``cuda:capability``; ``masks``: with
    a sliding window and documents both on (the masked kernels' widest form)."""
    from . import attention as A

    fn = {
        "fwd": A._attn_fwd_kernel,
        "dkdv": A._attn_bwd_dkdv_kernel,
        "dq": A._attn_bwd_dq_kernel,
        "decode": A._attn_decode_kernel,
    }[kind]
    ce = _attention_constexprs(kind, head_dim, config, causal, alibi, masks)
    kernel = compile_for_target(fn, dtype, ce, capability, num_warps=config[2], num_stages=config[3])
    return resource_usage(kernel, capability)


def pinned_usage(
    head_dims=PINNED_HEAD_DIMS, kinds=("fwd", "dkdv", "dq", "decode"), capability: int = 90, masks=(False, True)
) -> list:
    """One dict per pinned default (bf16, causal), without masks and with a window and documents:
    kind, head_dim, config, masks, triton and the usage."""
    from . import attention as A

    rows = []
    for kind in kinds:
        for d in head_dims:
            for masked in masks:
                config = A.pinned_default(kind, d, 2, masked)
                row = {
                    "kind": kind,
                    "head_dim": d,
                    "config": "x".join(map(str, config)),
                    "masks": "window+docs" if masked else "none",
                    "triton": triton.__version__,
                }
                row.update(config_usage(kind, d, config, capability, masks=masked))
                rows.append(row)
    return rows


def other_triton_sites() -> list:
    """The folders named by ``FASTLM_OTHER_TRITONS`` (each holds another triton)."""
    return [p for p in os.environ.get(OTHER_TRITONS_ENV, "").split(os.pathsep) if p.strip()]


def other_triton_usage(site: str, timeout_s: float = 600) -> list:
    """:func:`pinned_usage` under the triton installed in ``site`` (a subprocess with ``site``
    first on its path); raises RuntimeError with the reason when it cannot run."""
    if not os.path.isdir(os.path.join(site, "triton")):
        raise RuntimeError(f"{OTHER_TRITONS_ENV}: no triton package in {site}")
    # the folder holding the fastlm package (a checkout or site-packages); fastlm is imported already
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["fastlm"].__file__)))
    path = [site, root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "fastlm.kernels.resources"], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}, no rows"])[-1]
        raise RuntimeError(f"resource check under {site} failed: {tail}")
    return rows


if __name__ == "__main__":
    for _row in pinned_usage():
        print(json.dumps(_row), flush=True)
