"""The CUDA kernels without ``fastlm._C``: build ``csrc/cuda/*.cu`` into a torch-free shared library
with nvcc at run time, load it with ctypes, and call the kernels on torch CUDA tensors.

The GPU check uses this to measure the kernels on a machine where building the torch extension
would cost minutes (or where the installed torch has no CUDA headers)::

    lib = build_and_load(build_dir, timeout_s)      # raises Unavailable("reason")
    out, lse = lib.attention_fwd(q, k, v, causal, scale)          # (B, H, T, D) fp16/bf16
    dq, dk, dv = lib.attention_bwd(dout, q, k, v, out, lse, causal, scale)
    y = lib.swiglu_fwd(gate, up);  y = lib.swiglu_packed_fwd(x)
    dg, du = lib.swiglu_bwd(dy, gate, up);  dx = lib.swiglu_packed_bwd(dy, x)

Every call launches on ``torch.cuda.current_stream()`` of the inputs' device and returns fresh
tensors; bad arguments raise ``TypeError``/``ValueError`` naming the problem before any launch.
Causal masking is bottom-right aligned (query row i sees keys j <= i + T_k - T_q), as in
``fastlm.ops.attention``. The library is cached in ``build_dir`` under a name that hashes the
sources and flags, so a rebuild happens only when they change; the three ``.cu`` files compile in
parallel, and ptxas's register/spill report of every kernel is kept beside the library
(``<library>.ptxas.txt``).

Prebuilt: ``python -m benchmarks.cuda_direct --prebuild`` builds it here (nvcc, no GPU needed) for
sm_90a and sm_80 into the git-ignored ``.gpu_prebuilt/`` at the repository root; a device call
that carries that folder loads it first (:func:`build_and_load`), and builds only when it is
missing, fails to load, or was built from other sources (its name hashes them).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = tuple(CSRC / "cuda" / name for name in ("attention.cu", "swiglu.cu", "direct.cu"))
HEADERS = (CSRC / "attention_common.h", CSRC / "cuda" / "kernels.h")
BASE_ARCH = "sm_90a"  # H100/H200 with the arch-specific features
PREBUILT_DIR = ROOT / ".gpu_prebuilt"  # git-ignored; carried to the GPU machine
PREBUILT_ARCHS = (BASE_ARCH, "sm_80")  # sm_80's cubin also runs on sm_86/89
NVCC_FLAGS = (
    "-Xcompiler",
    "-fPIC",
    "-std=c++17",
    "-O3",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-Xptxas",
    "-v",
)
ATTN_HEAD_DIMS = (64, 128)
MAX_SEQ_LEN = 65535 * 64  # kernels.h kMaxAttnSeqLen


class Unavailable(RuntimeError):
    """The library cannot be built or loaded here; ``str(exc)`` says why."""


# ---- build ---------------------------------------------------------------------------------------
def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    return str(candidate) if candidate and candidate.is_file() else None


def gencode(arch: str) -> str:
    """``sm_90a`` -> ``-gencode=arch=compute_90a,code=sm_90a``."""
    if not arch.startswith("sm_") or not arch[3:].rstrip("a").isdigit():
        raise ValueError(f"arch must look like sm_90 or sm_90a, got {arch!r}")
    return f"-gencode=arch=compute_{arch[3:]},code={arch}"


def _library_name(archs: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(NVCC_FLAGS + tuple(archs)).encode())
    return f"libfastlm_direct-{digest.hexdigest()[:16]}.so"


def build_library(build_dir, timeout_s: float, archs: Sequence[str] = (BASE_ARCH,), nvcc: Optional[str] = None) -> Path:
    """Compiles the kernels into ``build_dir`` (reused when already built): each ``.cu`` to an
    object in parallel, then one link; returns the .so path, ptxas's report beside it."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise Unavailable("nvcc not found (put it on PATH or set CUDA_HOME)")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / _library_name(archs)
    if target.is_file():
        return target
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".build-") as tmp:
        objects = [Path(tmp) / (src.stem + ".o") for src in SOURCES]
        gencodes = [gencode(a) for a in archs]
        logs = _run_all(
            [
                [nvcc, "-c", *NVCC_FLAGS, *gencodes, "-I", str(CSRC), str(src), "-o", str(obj)]
                for src, obj in zip(SOURCES, objects)
            ],
            deadline,
            timeout_s,
        )
        partial = Path(tmp) / target.name
        _run_all([[nvcc, "-shared", *gencodes, *map(str, objects), "-o", str(partial)]], deadline, timeout_s)
        report = target.with_name(target.name + ".ptxas.txt")
        report.write_text("".join(f"==== {src.name}\n{log}" for src, log in zip(SOURCES, logs)))
        os.replace(partial, target)  # atomic: a concurrent build never sees half a library
    return target


def _run_all(commands, deadline: float, timeout_s: float) -> list:
    """Runs the commands in parallel; their stderr, or Unavailable when one fails or time runs out."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in commands]
    try:
        logs = [p.communicate(timeout=max(0.01, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        raise Unavailable(f"nvcc did not finish within {timeout_s:g} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise Unavailable(f"nvcc failed (exit {p.returncode}): {tail}")
    return logs


def prebuilt_library(prebuilt_dir=PREBUILT_DIR) -> Optional[Path]:
    """The prebuilt library of these sources, if ``prebuilt_dir`` holds it."""
    path = Path(prebuilt_dir) / _library_name(PREBUILT_ARCHS)
    return path if path.is_file() else None


def device_archs(torch_module) -> list:
    """sm_90a plus the current GPU's arch when it is something else."""
    major, minor = torch_module.cuda.get_device_capability()
    archs = [BASE_ARCH]
    if (major, minor) != (9, 0):
        archs.append(f"sm_{major}{minor}")
    return archs


def build_and_load(build_dir, timeout_s: float, prebuilt_dir=PREBUILT_DIR) -> "DirectLib":
    """The prebuilt library when it is there and loads, else one built for this GPU in
    ``build_dir``; ``Unavailable`` says why neither works."""
    prebuilt = prebuilt_library(prebuilt_dir)
    nvcc = find_nvcc()
    if prebuilt is None and nvcc is None:
        raise Unavailable(
            "nvcc not found (put it on PATH or set CUDA_HOME) and no prebuilt library "
            "(python -m benchmarks.cuda_direct --prebuild)"
        )
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    why = "no prebuilt library"
    if prebuilt is not None:
        try:
            return DirectLib(ctypes.CDLL(str(prebuilt)), prebuilt)
        except OSError as e:
            why = f"prebuilt {prebuilt.name} does not load ({e})"
    if nvcc is None:
        raise Unavailable(f"{why}, and nvcc not found to build one")
    path = build_library(build_dir, timeout_s, device_archs(torch), nvcc)
    try:
        return DirectLib(ctypes.CDLL(str(path)), path)
    except OSError as e:
        raise Unavailable(f"cannot load {path.name}: {e}") from None


# ---- argument checks (shapes and dtypes first, the device last) ---------------------------------
def _dtype_code(torch, op, t, allowed):
    codes = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{op}: dtype {str(t.dtype).replace('torch.', '')} not supported ({names})")
    return codes[t.dtype]


def _check_tensors(op, named):
    import torch

    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_device(op, named):
    first = named[0][1].device
    for name, t in named:
        if t.device.type != "cuda":
            raise ValueError(f"{op}: {name} must be a CUDA tensor, got {t.device}")
        if t.device != first:
            raise ValueError(f"{op}: {name} is on {t.device}, {named[0][0]} on {first}")


def _attn_strides(op, name, t):
    """(b, h, t) element strides of a (B, H, T, D) tensor the tensor-core kernels can read."""
    if t.stride(3) != 1:
        raise ValueError(f"{op}: {name} needs a contiguous last dim (stride {t.stride(3)})")
    strides = [0 if t.size(i) == 1 else t.stride(i) for i in range(3)]
    if any(s % 8 for s in strides) or t.data_ptr() % 16:
        raise ValueError(
            f"{op}: {name} strides {tuple(t.stride())} must be multiples of 8 elements on a 16-byte aligned base"
        )
    return strides


def check_attention(op, q, k, v, check_device=True):
    """Validates q, k, v; returns (dtype code, shape (B, H, H_kv, T_q, T_k, D), 9 strides)."""
    import torch

    named = (("q", q), ("k", k), ("v", v))
    _check_tensors(op, named)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be 4-D (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    code = _dtype_code(torch, op, q, (torch.float16, torch.bfloat16))
    (b, h, t_q, d), (b_k, h_kv, t_k, d_k) = q.shape, k.shape
    if k.shape != v.shape or b_k != b or d_k != d:
        raise ValueError(
            f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must match each other "
            f"and q {tuple(q.shape)} in batch and head dim"
        )
    if min(b, h, t_q, t_k, d) == 0 or h_kv == 0 or h % h_kv:
        raise ValueError(f"{op}: empty input or query heads ({h}) not a multiple of kv heads ({h_kv})")
    if d not in ATTN_HEAD_DIMS:
        raise ValueError(f"{op}: head dim {d} not supported (64 or 128)")
    if max(t_q, t_k) > MAX_SEQ_LEN:
        raise ValueError(f"{op}: sequence length {max(t_q, t_k)} > {MAX_SEQ_LEN}")
    strides = [s for name, t in named for s in _attn_strides(op, name, t)]
    if check_device:
        _check_device(op, named)
    return code, (b, h, h_kv, t_q, t_k, d), strides


def _swiglu_pair(op, a, b, names):
    import torch

    _check_tensors(op, ((names[0], a), (names[1], b)))
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"{op}: {names[0]} {tuple(a.shape)} {a.dtype} and {names[1]} "
            f"{tuple(b.shape)} {b.dtype} must have one shape and dtype"
        )
    return _dtype_code(torch, op, a, (torch.float16, torch.bfloat16, torch.float32))


def check_packed(op, x, check_device=True):
    """Validates x = [..., 2H]; returns (dtype code, x as [rows, 2H] with a contiguous last dim)."""
    import torch

    _check_tensors(op, (("x", x),))
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x must be even ([gate | up]), got {tuple(x.shape)}")
    code = _dtype_code(torch, op, x, (torch.float16, torch.bfloat16, torch.float32))
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if check_device:
        _check_device(op, (("x", x),))
    return code, x2


# ---- the loaded library --------------------------------------------------------------------------
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "fastlm_attention_fwd": [ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_float, _P, _P, _P],
    "fastlm_attention_bwd": [
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
        ctypes.c_float,
        _P,
        _P,
        _P,
        _P,
        _P,
    ],
    "fastlm_swiglu_fwd": [ctypes.c_int, _P, _P, _P, _I64, _P],
    "fastlm_swiglu_bwd": [ctypes.c_int, _P, _P, _P, _P, _P, _I64, _P],
    "fastlm_swiglu_packed_fwd": [ctypes.c_int, _P, _I64, _I64, _I64, _P, _P],
    "fastlm_swiglu_packed_bwd": [ctypes.c_int, _P, _P, _I64, _I64, _I64, _P, _P],
    "fastlm_stream_sync": [_P],
}


class DirectLib:
    """The kernels of the loaded library, called on torch CUDA tensors."""

    def __init__(self, cdll, path: Optional[Path] = None):
        self.path = path  # the file it was loaded from (prebuilt or built here)
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(cdll, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        cdll.fastlm_error_string.argtypes = [ctypes.c_int]
        cdll.fastlm_error_string.restype = ctypes.c_char_p
        self._lib = cdll

    def _run(self, op, name, device, *args):
        import torch

        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            rc = getattr(self._lib, name)(*args, stream)
        if rc != 0:
            raise RuntimeError(f"{op}: CUDA error {rc} ({self._lib.fastlm_error_string(rc).decode()})")

    def synchronize(self, device) -> None:
        """Waits for the current stream; raises if a kernel faulted."""
        import torch

        rc = self._lib.fastlm_stream_sync(torch.cuda.current_stream(device).cuda_stream)
        if rc != 0:
            raise RuntimeError(f"CUDA error {rc} ({self._lib.fastlm_error_string(rc).decode()})")

    def attention_fwd(self, q, k, v, causal: bool, scale: float):
        import torch

        code, shape, strides = check_attention("attention_fwd", q, k, v)
        b, h, _, t_q, _, d = shape
        out = torch.empty((b, h, t_q, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, t_q), dtype=torch.float32, device=q.device)
        self._run(
            "attention_fwd",
            "fastlm_attention_fwd",
            q.device,
            code,
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            (_I64 * 9)(*strides),
            (ctypes.c_int32 * 6)(*shape),
            int(bool(causal)),
            float(scale),
            out.data_ptr(),
            lse.data_ptr(),
        )
        return out, lse

    def attention_bwd(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        import torch

        op = "attention_bwd"
        code, shape, strides = check_attention(op, q, k, v, check_device=False)
        _check_tensors(op, (("dout", dout), ("out", out), ("lse", lse)))
        b, h, h_kv, t_q, t_k, d = shape
        for name, t in (("dout", dout), ("out", out)):
            if t.shape != q.shape or t.dtype != q.dtype:
                raise ValueError(f"{op}: {name} {tuple(t.shape)} {t.dtype} must match q {tuple(q.shape)} {q.dtype}")
        if tuple(lse.shape) != (b, h, t_q) or lse.dtype != torch.float32:
            raise ValueError(f"{op}: lse must be float32 of shape {(b, h, t_q)}, got {lse.dtype} {tuple(lse.shape)}")
        _check_device(op, (("q", q), ("k", k), ("v", v), ("dout", dout), ("out", out), ("lse", lse)))
        # dout feeds the tensor cores through 16-byte copies: contiguous on an aligned base
        dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
        if dout.data_ptr() % 16:
            dout = dout.clone()
        strides += _attn_strides(op, "out", out) + _attn_strides(op, "dout", dout)
        delta = torch.empty((b, h, t_q), dtype=torch.float32, device=q.device)
        dq = torch.empty((b, h, t_q, d), dtype=q.dtype, device=q.device)
        dk = torch.empty((b, h_kv, t_k, d), dtype=q.dtype, device=q.device)
        dv = torch.empty_like(dk)
        self._run(
            op,
            "fastlm_attention_bwd",
            q.device,
            code,
            dout.data_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            lse.data_ptr(),
            (_I64 * 15)(*strides),
            (ctypes.c_int32 * 6)(*shape),
            int(bool(causal)),
            float(scale),
            delta.data_ptr(),
            dq.data_ptr(),
            dk.data_ptr(),
            dv.data_ptr(),
        )
        return dq, dk, dv

    def swiglu_fwd(self, gate, up):
        code = _swiglu_pair("swiglu_fwd", gate, up, ("gate", "up"))
        _check_device("swiglu_fwd", (("gate", gate), ("up", up)))
        gate, up = gate.contiguous(), up.contiguous()
        out = gate.new_empty(gate.shape)
        self._run(
            "swiglu_fwd",
            "fastlm_swiglu_fwd",
            gate.device,
            code,
            gate.data_ptr(),
            up.data_ptr(),
            out.data_ptr(),
            gate.numel(),
        )
        return out

    def swiglu_bwd(self, dy, gate, up):
        op = "swiglu_bwd"
        code = _swiglu_pair(op, gate, up, ("gate", "up"))
        _swiglu_pair(op, dy, gate, ("dy", "gate"))
        _check_device(op, (("dy", dy), ("gate", gate), ("up", up)))
        dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
        dg, du = gate.new_empty(gate.shape), up.new_empty(up.shape)
        self._run(
            op,
            "fastlm_swiglu_bwd",
            gate.device,
            code,
            dy.data_ptr(),
            gate.data_ptr(),
            up.data_ptr(),
            dg.data_ptr(),
            du.data_ptr(),
            gate.numel(),
        )
        return dg, du

    def swiglu_packed_fwd(self, x):
        code, x2 = check_packed("swiglu_packed_fwd", x)
        hidden = x.shape[-1] // 2
        out = x.new_empty((*x.shape[:-1], hidden))
        self._run(
            "swiglu_packed_fwd",
            "fastlm_swiglu_packed_fwd",
            x.device,
            code,
            x2.data_ptr(),
            x2.shape[0],
            hidden,
            x2.stride(0),
            out.data_ptr(),
        )
        return out

    def swiglu_packed_bwd(self, dy, x):
        op = "swiglu_packed_bwd"
        code, x2 = check_packed(op, x, check_device=False)
        hidden = x.shape[-1] // 2
        _check_tensors(op, (("dy", dy),))
        if tuple(dy.shape) != (*x.shape[:-1], hidden) or dy.dtype != x.dtype:
            raise ValueError(
                f"{op}: dy must be {x.dtype} of shape {(*x.shape[:-1], hidden)}, got {dy.dtype} {tuple(dy.shape)}"
            )
        _check_device(op, (("x", x), ("dy", dy)))
        dy = dy.contiguous()
        dx = x.new_empty(x.shape)
        self._run(
            op,
            "fastlm_swiglu_packed_bwd",
            x.device,
            code,
            dy.data_ptr(),
            x2.data_ptr(),
            x2.shape[0],
            hidden,
            x2.stride(0),
            dx.data_ptr(),
        )
        return dx


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_direct", description=__doc__.splitlines()[0])
    p.add_argument(
        "--prebuild",
        action="store_true",
        required=True,
        help=f"build for {', '.join(PREBUILT_ARCHS)} into {PREBUILT_DIR}",
    )
    p.add_argument("--timeout-s", type=float, default=1800.0)
    args = p.parse_args(argv)
    start = time.monotonic()
    try:
        path = build_library(PREBUILT_DIR, args.timeout_s, PREBUILT_ARCHS)
    except Unavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{path} ({path.stat().st_size / 2**20:.1f} MiB, {time.monotonic() - start:.0f} s); ptxas report "
        f"{path.name}.ptxas.txt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
