"""The steps of :mod:`benchmarks.gpu_check` (each ``step_<name>(run, deadline)``; rows through
``run.row``). Shapes shrink to tiny CPU ones under ``--dry-run`` (Triton interpreter).

Correctness is FlashAttention's rule against a float64 oracle: ``max|x - ref64| <= 2 * max|base -
ref64| + eps``, ``base`` PyTorch's result in the same dtype (SDPA where it can express the call, else
the textbook formula; in float32 the worse of both), ``eps`` half an ulp of the dtype at the
reference's magnitude. At long sequences the oracle sees a slice (the first kv head's query heads,
the last query rows, against every key) of the full-size launch. A case the step's time cuts is a
``skipped`` row with the reason, never a silent drop.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import re
import subprocess
import time
from collections import namedtuple

import torch
import torch.nn.functional as F

from benchmarks.common import attention_flops, peak_bf16_tflops, swiglu_bytes
from benchmarks.gpu_background import cuda_lib

ON_GPU = torch.cuda.is_available()
Case = namedtuple("Case", "label b h h_kv t_q t_k d causal alibi mode")  # mode: full | fwd_slice
SLICE_ROWS = 128


# ---- shared -------------------------------------------------------------------------------------
def _dev(run) -> str:
    return "cpu" if run.dry or not ON_GPU else "cuda"


def _sync(run):
    if _dev(run) == "cuda":
        torch.cuda.synchronize()


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtypes(run):
    """The dtypes checked: bf16 and fp16 on a GPU; fp16 in the interpreter (its bf16 tl.dot is
    wrong; float32 parity is tests/test_triton_attention.py's)."""
    return [torch.float16] if run.dry else [torch.bfloat16, torch.float16]


def bench(run, fn) -> dict:
    """``{"ms": median, "ms_q20", "ms_q80"}`` of ``fn`` after a warm-up call (compilation and
    autotuning happen there). CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    fn()
    _sync(run)
    if _dev(run) == "cuda":
        from triton.testing import do_bench

        kw = {"warmup": 25, "rep": 100}
        if "quantiles" in inspect.signature(do_bench).parameters:
            q20, med, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], **kw)
        else:
            med = q20 = q80 = do_bench(fn, **kw)
        return {"ms": med, "ms_q20": q20, "ms_q80": q80}
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"ms": times[1], "ms_q20": times[0], "ms_q80": times[2], "timer": "perf_counter (dry run)"}


def _out_of_time(run, name, stop_at) -> bool:
    """True (and a skipped row) when the step's time for this case is used up."""
    if time.monotonic() <= stop_at:
        return False
    run.skip(name, "the step's time is used up")
    return True


# ---- 1. environment and ceilings ----------------------------------------------------------------
def _versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable ({e})"
    return info


def _nvidia_smi() -> dict:
    q = "name,driver_version,clocks.max.sm,clocks.sm,clocks.max.mem,power.limit,memory.total"
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": f"unavailable ({type(e).__name__})"}
    return dict(zip(q.split(","), [v.strip() for v in out[0].split(",")])) if out else {}


def step_env(run, deadline):
    run.row("versions", status="ok", **_versions())
    if _dev(run) == "cuda":
        props = torch.cuda.get_device_properties(0)
        run.row(
            "gpu",
            status="ok",
            name=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 2**30, 1),
            **_nvidia_smi(),
        )
    else:
        run.skip("gpu", "dry run / no CUDA device")
    dev = _dev(run)
    n = (1 << 29) if dev == "cuda" else (1 << 20)  # 1 GiB of bf16 on the GPU
    src = torch.randn(n, device=dev).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(run, lambda: dst.copy_(src))
    gbps = 2 * src.numel() * src.element_size() / (t["ms"] * 1e-3) / 1e9
    run.facts["copy_GBps"] = gbps
    run.row("copy_bandwidth", status="ok", GBps=round(gbps, 1), bytes=2 * n * 2, **t)
    m = 8192 if dev == "cuda" else 256
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=dev, dtype=dtype), torch.randn(m, m, device=dev, dtype=dtype)
    t = bench(run, lambda: a @ b)
    tflops = 2 * m**3 / (t["ms"] * 1e-3) / 1e12
    run.facts["matmul_TFLOPs"] = tflops
    run.row("matmul_rate", status="ok", TFLOPs=round(tflops, 2), n=m, dtype=_name(dtype), **t)


# ---- the 2x rule against the float64 oracle ------------------------------------------------------
def two_x(got, ref, bases, dtype) -> dict:
    """``{"err", "bound", "ok"}`` of FlashAttention's rule for one tensor (half-ulp eps)."""
    err = (got.double() - ref).abs().max().item() if got.numel() else 0.0
    base_err = max((b.double() - ref).abs().max().item() for b in bases) if got.numel() else 0.0
    bound = 2 * base_err + torch.finfo(dtype).eps / 2 * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    return {"err": err, "bound": bound, "ok": bool(math.isfinite(err) and err <= bound)}


def _inputs(case, dev, dtype, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    shapes = [
        (case.b, case.h, case.t_q, case.d),
        (case.b, case.h_kv, case.t_k, case.d),
        (case.b, case.h_kv, case.t_k, case.d),
        (case.b, case.h, case.t_q, case.d),
    ]
    q, k, v, do = (torch.randn(s, device=dev, generator=g).to(dtype) for s in shapes)
    slopes = torch.linspace(0.05, 0.5, case.h, device=dev) if case.alibi else None
    return q, k, v, do, slopes


def _fwd_bwd(fn, q, k, v, do, backward=True):
    """``[out, dq, dk, dv]`` of ``fn`` (``[out]`` without ``backward``)."""
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = fn(q, k, v)
    if not backward:
        return [out.detach()]
    return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def _pytorch_fns(case, q, k, v, slopes):
    """PyTorch's ways to compute the case in the inputs' dtype (see the module docstring)."""
    from fastlm import ops
    from fastlm.ops.reference import naive_attention

    def sdpa(q, k, v):
        return ops.attention(q, k, v, causal=case.causal, alibi_slopes=slopes, backend="torch")

    def textbook(q, k, v):
        return naive_attention(q, k, v, case.causal, None, slopes, dtype=q.dtype)

    expressible = ops.torch_backend.BACKEND.attention_unsupported(q, k, v, case.causal, 1.0, slopes) is None
    return [sdpa] * expressible + [textbook] * (not expressible or q.dtype == torch.float32)


def _slice(case):
    """(q heads, kv heads, query rows) the oracle sees: all of it, or at long T the first kv
    head's group of query heads and the last rows (bottom-right causal: they see every key)."""
    if case.mode == "full":
        return slice(None), slice(None), slice(None)
    group = case.h // case.h_kv
    return slice(0, group), slice(0, 1), slice(max(0, case.t_q - SLICE_ROWS), None)


def attn_check(run, name, fn, case, dtype, **extra) -> bool:
    """One row: ``fn(q, k, v)`` (forward, and backward in mode ``full``) against the float64 oracle
    under the 2x rule; True when every output passes."""
    from fastlm.ops.reference import naive_attention

    dev = _dev(run)
    q, k, v, do, slopes = _inputs(case, dev, dtype)
    full = case.mode == "full"
    hq, hk, rows = _slice(case)
    sub = (lambda t, heads: t[:1, heads, rows]) if not full else (lambda t, heads: t)
    got = [sub(t, hq) for t in _fwd_bwd(fn, q, k, v, do, full)]
    bases = [[sub(t, hq) for t in _fwd_bwd(f, q, k, v, do, full)] for f in _pytorch_fns(case, q, k, v, slopes)]
    qs, ks, vs, dos = (q[:1, hq, rows], k[:1, hk], v[:1, hk], do[:1, hq, rows]) if not full else (q, k, v, do)
    sl = slopes[hq] if slopes is not None and not full else slopes
    ref = _fwd_bwd(
        lambda a, b, c: naive_attention(a, b, c, case.causal, None, sl),
        qs.double(),
        ks.double(),
        vs.double(),
        dos.double(),
        full,
    )
    names = ("out", "dq", "dk", "dv")
    errors = {n: two_x(g, r, [b[i] for b in bases], dtype) for i, (n, g, r) in enumerate(zip(names, got, ref))}
    ok = all(e["ok"] for e in errors.values())
    run.row(
        name,
        status="ok" if ok else "fail",
        dtype=_name(dtype),
        mode=case.mode,
        shape=[case.b, case.h, case.h_kv, case.t_q, case.t_k, case.d],
        causal=case.causal,
        alibi=case.alibi,
        errors=errors,
        **extra,
    )
    return ok


# ---- 2. correctness at the benchmark shapes ------------------------------------------------------
# label, mode, ALiBi; (B, H, H_kv, T_q, T_k, D) on the GPU and in the dry run (None: GPU only); all causal
_CASES = (
    ("headline_fwd", "fwd_slice", False, (2, 16, 16, 8192, 8192, 128), (2, 2, 2, 64, 64, 32)),
    ("d64_fwd", "fwd_slice", False, (2, 32, 32, 8192, 8192, 64), None),
    ("fwdbwd_d128", "full", False, (1, 4, 4, 2048, 2048, 128), (1, 2, 2, 40, 40, 32)),
    ("fwdbwd_d64", "full", False, (1, 4, 4, 2048, 2048, 64), None),
    ("gqa", "full", False, (1, 8, 2, 1024, 1024, 128), (1, 4, 2, 33, 33, 32)),
    ("alibi", "full", True, (1, 4, 4, 1024, 1024, 128), (1, 2, 2, 33, 33, 16)),
    ("tq_ne_tk", "full", False, (1, 4, 4, 1000, 3000, 128), (1, 2, 2, 17, 40, 32)),
    ("d80", "full", False, (1, 4, 4, 1024, 1024, 80), (1, 2, 2, 33, 33, 80)),
    ("odd_t", "full", False, (1, 4, 4, 1025, 1025, 128), (1, 1, 1, 97, 97, 16)),
    ("decode", "full", True, (2, 8, 2, 1, 4096, 128), (1, 4, 2, 1, 300, 64)),
)


def _attn_cases(run):
    """The correctness cases of this run (GQA, ALiBi, T_q != T_k, D=80, odd T, split-KV decode)."""
    return [
        Case(label, *(dry if run.dry else gpu), True, alibi, mode)
        for label, mode, alibi, gpu, dry in _CASES
        if not run.dry or dry is not None
    ]


def _triton_fn(case, slopes_of):
    from fastlm import ops

    return lambda q, k, v: ops.attention(q, k, v, causal=case.causal, alibi_slopes=slopes_of(q), backend="triton")


def _slopes_of(case):
    return lambda q: torch.linspace(0.05, 0.5, case.h, device=q.device) if case.alibi else None


def _cuda_fn(lib, case):
    scale = 1.0 / math.sqrt(case.d)

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = lib.attention_fwd(q, k, v, case.causal, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            return lib.attention_bwd(dout.contiguous(), q, k, v, out, lse, case.causal, scale)

    return _Fn.apply


def _cuda_unsupported(case):
    if case.alibi or case.d not in (64, 128):
        return "the CUDA kernel takes no ALiBi, head dim 64 or 128 only"
    return None


def _check_backend(run, backend, lib, stop_at):
    """Every case in every dtype (the first dtype for all cases first)."""
    for dtype in _dtypes(run):
        for case in _attn_cases(run):
            name = f"{backend}/{case.label}/{_name(dtype)}"
            why = _cuda_unsupported(case) if backend == "cuda" else None
            if why:
                run.skip(name, why)
            elif not _out_of_time(run, name, stop_at):
                fn = _cuda_fn(lib, case) if backend == "cuda" else _triton_fn(case, _slopes_of(case))
                try:
                    attn_check(run, name, fn, case, dtype, backend=backend)
                except Exception as e:  # noqa: BLE001 -- one failing case does not end the step
                    run.error(name, e)
            if _dev(run) == "cuda":
                torch.cuda.empty_cache()


def step_correct(run, deadline):
    """Triton first (70% of the step's time at most), then the CUDA kernels."""
    if run.dry:
        run.skip("triton/bf16", "bfloat16 tl.dot is wrong in the Triton interpreter: bf16 runs on the GPU only")
    start = time.monotonic()
    _check_backend(run, "triton", None, start + 0.7 * (deadline - start))
    lib, why = cuda_lib(run, deadline)
    if lib is None:
        run.skip("cuda", why)
        return
    _check_backend(run, "cuda", lib, deadline - 3)


# ---- each Triton tile config at a small shape ----------------------------------------------------
def _pinned(config_text):
    """Set FASTLM_TRITON_CONFIGS; returns the previous value (None: unset)."""
    previous = os.environ.get("FASTLM_TRITON_CONFIGS")
    if config_text is None:
        os.environ.pop("FASTLM_TRITON_CONFIGS", None)
    else:
        os.environ["FASTLM_TRITON_CONFIGS"] = config_text
    return previous


def _config_case(kind, config, d):
    if kind == "decode":
        return Case("decode", 1, 4, 2, 3, 4 * config[1] + 7, d, True, True, "full")
    big = max(config[:2])
    return Case(kind, 1, 4, 2, big + 3, 2 * big + big // 2 + 8, d, True, False, "full")


def config_check(run, kind, config, d, dtype) -> bool:
    """The config pinned alone, a causal GQA case with ragged T_q < T_k at head dim ``d``; one row
    (once per run: a second call returns the first result)."""
    label = "x".join(map(str, config))
    name = f"config/{kind}/{label}/d{d}"
    done = run.facts.setdefault("config_checks", {})
    if name not in done:
        case = _config_case(kind, config, d)
        previous = _pinned(f"{kind}={label}")
        try:
            done[name] = attn_check(run, name, _triton_fn(case, _slopes_of(case)), case, dtype, kind=kind, config=label)
        except Exception as e:  # noqa: BLE001 -- e.g. a tile that needs more shared memory than this GPU has
            run.error(name, e)
            done[name] = False
        finally:
            _pinned(previous)
    return done[name]


def _config_dtype(run):
    return torch.float16 if run.dry else torch.bfloat16


def step_configs(run, deadline):
    """Every entry of the forward, dK/dV, dQ and decode lists at D=64 and D=128 (the lists the
    autotuner picks from for bf16/fp16 there), compiled, each against the float64 oracle."""
    from fastlm.kernels import attention as A

    dtype = _config_dtype(run)
    for d in (64, 128):
        for kind in ("fwd", "dkdv", "dq", "decode"):
            for config in A.configs(kind, d, 2)[: 1 if run.dry else None]:  # dry run: the code path
                name = f"config/{kind}/{'x'.join(map(str, config))}/d{d}"
                if name in run.facts.get("config_checks", {}) or not _out_of_time(run, name, deadline - 3):
                    config_check(run, kind, config, d, dtype)


# ---- 3. headline: Triton forward per config, SDPA's kernels --------------------------------------
def _headline_shape(run, d=128):
    """(B, H, T, D): the FlashAttention papers' B*T = 16k, H*D = 2048 at T = 8k."""
    return (1, 2, 64, d) if run.dry else (2, 2048 // d, 8192, d)


def _attn_row(run, name, t, shape, pass_, **extra):
    b, h, t_len, d = shape
    tflops = attention_flops(b, h, t_len, t_len, d, True, pass_) / (t["ms"] * 1e-3) / 1e12
    ceiling = run.facts.get("matmul_TFLOPs")
    run.row(
        name,
        status="ok",
        pass_=pass_,
        shape=list(shape),
        causal=True,
        TFLOPs=round(tflops, 2),
        pct_of_matmul=round(100 * tflops / ceiling, 1) if ceiling else None,
        **t,
        **extra,
    )


def _bench_dtype(run):
    return torch.float16 if run.dry else torch.bfloat16


def _headline_configs(run, d):
    from fastlm.kernels import attention as A

    configs = A.configs("fwd", d, 2)
    return configs[:2] if run.dry or d != 128 else configs  # D=64: the pinned default and the former one


def step_headline(run, deadline):
    """Per forward config (D=128, and the first two at D=64): its small-shape parity, then its
    timing at the headline shape with the launched kernel's registers and spills (GPU); then SDPA."""
    from fastlm.kernels import attention as A
    from fastlm.kernels.launch import jit
    from fastlm.kernels.resources import launched_kernels, launched_usage

    dtype = _bench_dtype(run)
    for d in (128, 64):
        shape = _headline_shape(run, d)
        q, k, v = (torch.randn(shape, device=_dev(run)).to(dtype) for _ in range(3))
        for config in _headline_configs(run, d):
            label = "x".join(map(str, config))
            name = f"triton_fwd/{label}" + ("" if d == 128 else f"/d{d}")
            if _out_of_time(run, name, deadline - 5):
                continue
            if not config_check(run, "fwd", config, d, _config_dtype(run)):
                run.skip(name, f"fwd {label} failed its parity check (row config/fwd/{label}/d{d})")
                continue
            previous = _pinned(f"fwd={label}")
            try:
                before = {id(x) for x in launched_kernels(jit(A._attn_fwd_kernel))}
                t = bench(run, lambda: A.attention(q, k, v, True))
                new = [x for x in launched_kernels(jit(A._attn_fwd_kernel)) if id(x) not in before]
                launched = {f"launched_{key}": val for key, val in launched_usage(new[0]).items()} if new else {}
                _attn_row(run, name, t, shape, "fwd", backend="triton", config=label, dtype=_name(dtype), **launched)
            except Exception as e:  # noqa: BLE001 -- e.g. a config that needs more shared memory
                run.error(name, e)
            finally:
                _pinned(previous)
    shape = _headline_shape(run)
    q, k, v = (torch.randn(shape, device=_dev(run)).to(dtype) for _ in range(3))
    _sdpa_rows(run, q, k, v, shape, dtype)


def _sdpa_kernel_names(fn) -> list:
    """Names of the GPU kernels one call of ``fn`` launches (which SDPA kernel ``default`` picked)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    return sorted(n[:120] for n in names if re.search(r"flash|fmha|attention|cudnn|sdpa|efficient", n, re.I))


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
    }


def _sdpa_call(choice, q, k, v):
    from torch.nn.attention import sdpa_kernel

    if choice is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def call():
        with sdpa_kernel(choice):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return call


def _sdpa_rows(run, q, k, v, shape, dtype):
    for name, choice in _sdpa_backends().items():
        if name != "default" and (run.dry or choice is None):
            run.skip(
                f"sdpa_{name}/fwd",
                "dry run: SDPA's GPU kernels need CUDA" if run.dry else "this torch has no such SDPA backend",
            )
            continue
        try:
            fn = _sdpa_call(choice, q, k, v)
            t = bench(run, fn)
            kernels = _sdpa_kernel_names(fn) if _dev(run) == "cuda" else ["cpu"]
            _attn_row(
                run, f"sdpa_{name}/fwd", t, shape, "fwd", backend=f"sdpa_{name}", kernels=kernels, dtype=_name(dtype)
            )
        except Exception as e:  # noqa: BLE001
            run.error(f"sdpa_{name}/fwd", e)


def _with_backward(fn_of_nothing, q, k, v):
    """A forward+backward closure: inputs requiring grad, a fixed random dout."""
    for t in (q, k, v):
        t.requires_grad_(True)
    dout = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn_of_nothing().backward(dout)

    return step


# ---- 4. forward + backward -----------------------------------------------------------------------
def _timed_pair(run, prefix, q, k, v, shape, dtype, extra_name=""):
    """Triton and SDPA (default) rows, forward+backward, at one shape."""
    from fastlm.kernels import attention as A
    from fastlm.kernels.launch import pinned_configs

    pins = pinned_configs() or {}
    configs = {
        kind: "x".join(map(str, pins.get(kind) or A.configs(kind, shape[3], 2)[0])) for kind in ("fwd", "dkdv", "dq")
    }
    for backend, fn in (("triton", lambda: A.attention(q, k, v, True)), ("sdpa_default", _sdpa_call(None, q, k, v))):
        name = f"{prefix}{backend}/fwd+bwd{extra_name}"
        try:
            t = bench(run, _with_backward(fn, q, k, v))
            _attn_row(
                run,
                name,
                t,
                shape,
                "fwd+bwd",
                backend=backend,
                dtype=_name(dtype),
                **({"configs": configs} if backend == "triton" else {}),
            )
        except Exception as e:  # noqa: BLE001
            run.error(name, e)


def step_fwdbwd(run, deadline):
    shape = _headline_shape(run)
    dtype = _bench_dtype(run)
    q, k, v = (torch.randn(shape, device=_dev(run)).to(dtype) for _ in range(3))
    _timed_pair(run, "", q, k, v, shape, dtype)


# ---- 5. the sweep over T at D=64 and 128 ---------------------------------------------------------
def _sweep_points(run):
    """(B, H, T, D) with B*T = 16k and H*D = 2048 (FlashAttention's benchmark), T = 1k ... 16k."""
    if run.dry:
        return [(4, 4, 64, 16), (2, 2, 128, 32)]
    return [(16384 // t, 2048 // d, t, d) for d in (128, 64) for t in (1024, 2048, 4096, 8192, 16384)]


def _sweep_point(run, shape, dtype):
    from fastlm.kernels import attention as A

    b, h, t_len, d = shape
    tag = f"/d{d}/t{t_len}"
    case = Case(f"sweep{tag}", b, h, h, t_len, t_len, d, True, False, "fwd_slice")
    if not attn_check(run, f"sweep/check{tag}", _triton_fn(case, _slopes_of(case)), case, dtype, backend="triton"):
        run.skip(f"sweep/timings{tag}", "the Triton forward failed its float64 check at this shape")
        return
    q, k, v = (torch.randn(shape, device=_dev(run)).to(dtype) for _ in range(3))
    for backend, fn in (("triton", lambda: A.attention(q, k, v, True)), ("sdpa_default", _sdpa_call(None, q, k, v))):
        try:
            _attn_row(
                run, f"sweep/{backend}/fwd{tag}", bench(run, fn), shape, "fwd", backend=backend, dtype=_name(dtype)
            )
        except Exception as e:  # noqa: BLE001
            run.error(f"sweep/{backend}/fwd{tag}", e)
    _timed_pair(run, "sweep/", q, k, v, shape, dtype, tag)


def step_sweep(run, deadline):
    dtype = _bench_dtype(run)
    for shape in _sweep_points(run):
        name = f"sweep/d{shape[3]}/t{shape[2]}"
        if not _out_of_time(run, name, deadline - 5):
            try:
                _sweep_point(run, shape, dtype)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory at one shape
                run.error(name, e)
        if _dev(run) == "cuda":
            torch.cuda.empty_cache()
    _masked_rows(run, dtype, deadline)


# ---- 5b. masked attention (sliding windows, documents) at the CPU benchmark's shapes ---------------
def _masked_cases(run):
    """(T, window, documents) at B=2 H=4 D=64 (benchmarks/test_bench_masks.py's shapes)."""
    if run.dry:
        return [(64, 16, None), (64, None, 4)]
    return [(t, w, None) for t in (1024, 2048, 4096) for w in (128, 512)] + [
        (t, None, n) for t in (1024, 2048, 4096) for n in (8, 32)
    ]


def _documents(b, t, n, dev):
    g = torch.Generator().manual_seed(t + n)
    cuts = torch.stack([torch.randperm(t - 1, generator=g)[: n - 1] + 1 for _ in range(b)])  # (B, n-1)
    return (torch.arange(t).view(1, 1, t) >= cuts.unsqueeze(2)).sum(1).to(dev)  # non-decreasing ids


def _masked_check(run, name, q, k, v, masks, dtype) -> bool:
    """fastlm's masked forward against float64 (the first kv head, 2x rule, SDPA-dense-mask baseline)."""
    from fastlm import ops
    from fastlm.ops.reference import naive_attention

    sub = [x[:, :1].detach() for x in (q, k, v)]
    got = ops.attention(*sub, causal=True, **masks)
    base = ops.attention(*sub, causal=True, backend="torch", **masks)
    ref = naive_attention(
        *(x.double() for x in sub), True, None, None, torch.float64, masks["window"], masks["segment_ids"]
    )
    err = two_x(got, ref, [base], dtype)
    run.row(
        f"{name}/check",
        status="ok" if err["ok"] else "fail",
        errors={"out": err},
        backend=ops.attention_backend(*sub, causal=True, **masks),
    )
    return err["ok"]


def _masked_rows(run, dtype, deadline):
    from fastlm import ops
    from fastlm.ops.masks import visible_mask

    b, h, d = 2, 4, 64
    for t, window, docs in _masked_cases(run):
        name = f"masked/t{t}/" + (f"w{window}" if window else f"docs{docs}")
        if _out_of_time(run, name, deadline - 5):
            return
        try:
            q, k, v = (torch.randn(b, h, t, d, device=_dev(run)).to(dtype) for _ in range(3))
            masks = {"window": window, "segment_ids": _documents(b, t, docs, _dev(run)) if docs else None}
            if not _masked_check(run, name, q, k, v, masks, dtype):
                continue
            pairs = float(visible_mask(t, t, True, window, masks["segment_ids"], device=_dev(run)).sum())
            pairs *= h * (b if docs is None else 1)
            calls = (
                (
                    "fastlm",
                    ops.attention_backend(q, k, v, causal=True, **masks),  # triton on a GPU
                    lambda: ops.attention(q, k, v, causal=True, **masks),
                ),
                ("sdpa_dense_mask", "torch", lambda: ops.attention(q, k, v, causal=True, backend="torch", **masks)),
                (
                    "fastlm_dense_causal",
                    ops.attention_backend(q, k, v, causal=True),
                    lambda: ops.attention(q, k, v, causal=True),
                ),
            )
            for label, backend, fn in calls:
                timing = bench(run, _with_backward(fn, q, k, v))
                run.row(
                    f"{name}/{label}",
                    status="ok",
                    pass_="fwd+bwd",
                    shape=[b, h, t, d],
                    window=window,
                    documents=docs,
                    dtype=_name(dtype),
                    backend=backend,
                    TFLOPs=round(14.0 * d * pairs / (timing["ms"] * 1e-3) / 1e12, 3),
                    **timing,
                )
        except Exception as e:  # noqa: BLE001 -- e.g. no backend takes masks on this device
            run.error(name, e)


# ---- 6. CUDA C++ attention -----------------------------------------------------------------------
def step_cuda_attn(run, deadline):
    lib, why = cuda_lib(run, deadline)
    if lib is None:
        for d in (64, 128):
            run.skip(f"cuda_attn/d{d}", why)
        return
    run.row("cuda_lib", status="ok", source=run.facts.get("cuda_lib_source"), load_s=run.facts.get("cuda_lib_s"))
    for d in (64, 128):
        shape = _headline_shape(run, d)
        q, k, v, do = (torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(4))
        scale = 1.0 / math.sqrt(d)
        try:
            out, lse = lib.attention_fwd(q, k, v, True, scale)
            _attn_row(
                run,
                f"cuda/fwd/d{d}",
                bench(run, lambda: lib.attention_fwd(q, k, v, True, scale)),
                shape,
                "fwd",
                backend="cuda",
            )
            _attn_row(
                run,
                f"cuda/bwd/d{d}",
                bench(run, lambda: lib.attention_bwd(do, q, k, v, out, lse, True, scale)),
                shape,
                "bwd",
                backend="cuda",
            )
        except Exception as e:  # noqa: BLE001
            run.error(f"cuda/d{d}", e)
        _sdpa_flash_fwd_bwd(run, q, k, v, shape)


def _sdpa_flash_fwd_bwd(run, q, k, v, shape):
    from torch.nn.attention import SDPBackend

    try:
        fwd = _sdpa_call(SDPBackend.FLASH_ATTENTION, q, k, v)
        _attn_row(run, f"sdpa_flash/fwd/d{shape[3]}", bench(run, fwd), shape, "fwd", backend="sdpa_flash")
        qg, kg, vg = (x.detach().clone() for x in (q, k, v))
        both = _with_backward(_sdpa_call(SDPBackend.FLASH_ATTENTION, qg, kg, vg), qg, kg, vg)
        _attn_row(run, f"sdpa_flash/fwd+bwd/d{shape[3]}", bench(run, both), shape, "fwd+bwd", backend="sdpa_flash")
    except Exception as e:  # noqa: BLE001
        run.error(f"sdpa_flash/d{shape[3]}", e)


# ---- 7. SwiGLU -----------------------------------------------------------------------------------
def _swiglu_row(run, name, t, numel, pass_, **extra):
    gbps = swiglu_bytes(numel, 2, pass_) / (t["ms"] * 1e-3) / 1e9
    copy = run.facts.get("copy_GBps")
    run.row(
        name,
        status="ok",
        pass_=pass_,
        numel=numel,
        TBps=round(gbps / 1e3, 3),
        pct_of_copy=round(100 * gbps / copy, 1) if copy else None,
        **t,
        **extra,
    )


def _swiglu_fns(run, deadline, g, u, x, dy):
    """name: (forward, backward) closures; backward returns (d_gate, d_up) or dx."""
    from fastlm.kernels import swiglu as S

    fns = {
        "triton_split": (lambda: S.swiglu_forward(g, u), lambda: S.swiglu_backward(dy, g, u)),
        "triton_packed": (lambda: S.swiglu_packed_forward(x), lambda: S.swiglu_packed_backward(dy, x)),
        "eager_split": (lambda: F.silu(g) * u, None),
    }
    lib, why = cuda_lib(run, deadline)
    if lib is None:
        run.skip("cuda_swiglu", why)
    else:
        fns["cuda_split"] = (lambda: lib.swiglu_fwd(g, u), lambda: lib.swiglu_bwd(dy, g, u))
        fns["cuda_packed"] = (lambda: lib.swiglu_packed_fwd(x), lambda: lib.swiglu_packed_bwd(dy, x))
    return fns


def _swiglu_refs(g, u, dy):
    """(out, d_gate, d_up) in float64 and by eager PyTorch in the dtype (the 2x rule's pair)."""

    def eager(gate, up, dout):
        gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
        out = F.silu(gate) * up
        return [out.detach(), *torch.autograd.grad(out, (gate, up), dout)]

    return eager(g.double(), u.double(), dy.double()), eager(g, u, dy)


def _swiglu_check(run, name, fwd, bwd, refs, dtype) -> bool:
    ref, base = refs
    grads = () if bwd is None else bwd()
    if isinstance(grads, torch.Tensor):  # packed backward: dx = [d_gate | d_up]
        grads = grads.chunk(2, dim=-1)
    got = [fwd(), *grads]
    errors = {n: two_x(a, r, [b], dtype) for n, a, r, b in zip(("out", "d_gate", "d_up"), got, ref, base)}
    ok = all(e["ok"] for e in errors.values())
    run.row(f"check/{name}", status="ok" if ok else "fail", errors=errors, dtype=_name(dtype))
    return ok


def step_swiglu(run, deadline):
    """Each implementation checked against float64 first; timed only when it passed."""
    rows, hidden = (64, 256) if run.dry else (8192, 16384)
    dtype = _bench_dtype(run)
    dev = _dev(run)
    x = torch.randn(rows, 2 * hidden, device=dev).to(dtype)
    g, u = x[:, :hidden].contiguous(), x[:, hidden:].contiguous()
    dy = torch.randn(rows, hidden, device=dev).to(dtype)
    refs = _swiglu_refs(g, u, dy)
    for name, (fwd, bwd) in _swiglu_fns(run, deadline, g, u, x, dy).items():
        try:
            if not _swiglu_check(run, name, fwd, bwd, refs, dtype):
                run.skip(name, f"failed its float64 check (row swiglu/check/{name})")
                continue
            for pass_, fn in (("fwd", fwd), ("bwd", bwd)):
                if fn is not None:
                    _swiglu_row(
                        run,
                        f"{name}/{pass_}",
                        bench(run, fn),
                        rows * hidden,
                        pass_,
                        backend=name,
                        shape=[rows, hidden],
                        dtype=_name(dtype),
                    )
        except Exception as e:  # noqa: BLE001
            run.error(name, e)
    del refs


# ---- 8. training step ----------------------------------------------------------------------------
def _gpt_config(run, backend):
    from fastlm.model import PLAIN_OPTIONS, GPTConfig

    # GPT-2's block: learned positions, tied head, no speedrun options (GPTConfig's defaults differ)
    gpt2 = dict(PLAIN_OPTIONS, pos="learned", mlp="swiglu", tie_embeddings=True, backend=backend)
    if run.dry:
        return GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, **gpt2)
    return GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, **gpt2)


def _train_model(run, backend, dtype=None):
    from fastlm.model import GPT
    from fastlm.training.optim import build_optimizer

    cfg = _gpt_config(run, backend)
    torch.manual_seed(0)
    model = GPT(cfg).to(_dev(run))
    if dtype is not None:
        model = model.to(dtype)
    return model, cfg, build_optimizer(model, optimizer="adamw", weight_decay=0.1, lr=3e-4, device_type=_dev(run))


def _loss_and_grad_norm(run, model, batch, autocast):
    with torch.autocast(_dev(run), dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    return torch.tensor([loss.item(), norm.item()], dtype=torch.float64)


def _train_check(run) -> bool:
    """One step's loss and gradient norm of backend auto against float64 (the reference backend in
    float64, same init and batch) under the 2x rule, the torch backend as the baseline."""
    b = 2 if run.dry else 4
    cfg = _gpt_config(run, "auto")
    batch = torch.randint(0, cfg.vocab_size, (b, cfg.block_size + 1), generator=torch.Generator().manual_seed(1)).to(
        _dev(run)
    )
    autocast = not run.dry
    got = _loss_and_grad_norm(run, _train_model(run, "auto")[0], batch, autocast)
    base = _loss_and_grad_norm(run, _train_model(run, "torch")[0], batch, autocast)
    ref = _loss_and_grad_norm(run, _train_model(run, "reference", torch.float64)[0], batch, False)
    dtype = torch.bfloat16 if autocast else torch.float32
    errors = {
        n: two_x(got[i : i + 1], ref[i : i + 1], [base[i : i + 1]], dtype) for i, n in enumerate(("loss", "grad_norm"))
    }
    ok = all(e["ok"] for e in errors.values())
    run.row(
        "gpt2_small/check",
        status="ok" if ok else "fail",
        errors=errors,
        batch=b,
        loss=[round(float(x[0]), 5) for x in (got, base, ref)],
    )
    return ok


def _train_step_fn(run, model, opt, batch, targets):
    dtype = torch.bfloat16 if not run.dry else torch.float32

    def step():
        with torch.autocast(_dev(run), dtype=dtype, enabled=not run.dry):
            _, loss = model(batch, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_train_step(run, deadline):
    try:
        _train_check(run)
    except Exception as e:  # noqa: BLE001 -- the timings still run
        run.error("gpt2_small/check", e)
    for backend in ("auto", "torch"):
        try:
            model, cfg, opt = _train_model(run, backend)
            b = 2 if run.dry else 16
            batch = torch.randint(0, cfg.vocab_size, (b, cfg.block_size + 1), device=_dev(run))
            t = bench(run, _train_step_fn(run, model, opt, batch[:, :-1], batch[:, 1:]))
            tokens = b * cfg.block_size
            n = model.num_params(non_embedding=False)
            flops = 6 * n * tokens + 6 * cfg.n_layer * cfg.n_embd * cfg.block_size * tokens  # + causal attention
            peak = peak_bf16_tflops(run.facts.get("device") or "")
            ceiling = run.facts.get("matmul_TFLOPs")
            achieved = flops / (t["ms"] * 1e-3) / 1e12
            run.row(
                f"gpt2_small/{backend}",
                status="ok",
                backend=backend,
                batch=b,
                block_size=cfg.block_size,
                params=n,
                tokens_per_s=round(tokens / (t["ms"] * 1e-3)),
                TFLOPs=round(achieved, 2),
                mfu_pct=round(100 * achieved / peak, 1) if peak else None,
                pct_of_matmul=round(100 * achieved / ceiling, 1) if ceiling else None,
                **t,
            )
            del model, opt
        except Exception as e:  # noqa: BLE001
            run.error(f"gpt2_small/{backend}", e)


# ---- 9. registers and spills: compile-only, on the CPU -------------------------------------------
def _resource_row(run, row):
    spills = (row.get("ptxas_spill_store_bytes") or 0) + (row.get("cubin_stack_bytes") or 0)
    ok = (
        "ptxas_error" not in row
        and "cuobjdump_error" not in row
        and spills == 0
        and 0 < (row.get("ptxas_regs") or 0) <= 255
    )
    masks = "" if row.get("masks", "none") == "none" else f"/{row['masks']}"
    run.row(f"resources/{row['triton']}/{row['kind']}/d{row['head_dim']}{masks}", status="ok" if ok else "fail", **row)


def step_resources(run, deadline):
    """Dry run (CPU): every pinned attention kernel at D=64 and 128 compiled for sm_90 (bf16,
    causal) with this Triton and each one in FASTLM_OTHER_TRITONS, plus the headline's forward
    configs; on the GPU nothing (compiling is CPU work the dry run already did)."""
    if not run.dry:
        run.skip(
            "resources",
            "compile-only registers/spills are the dry run's (CPU) rows; the launched "
            "kernels' driver figures are in the headline rows",
        )
        return
    from fastlm.kernels.resources import config_usage, other_triton_sites, other_triton_usage, pinned_usage

    for row in pinned_usage():
        _resource_row(run, row)
    for site in other_triton_sites():
        try:
            for row in other_triton_usage(site, timeout_s=max(30.0, deadline - time.monotonic() - 5)):
                _resource_row(run, row)
        except Exception as e:  # noqa: BLE001
            run.error(f"resources/{site}", e)
    if not other_triton_sites():
        run.skip("resources/other_triton", "FASTLM_OTHER_TRITONS not set: only this Triton's compile checked")
    for config in _headline_configs(run, 128):
        label = "x".join(map(str, config))
        try:
            run.row(
                f"triton_fwd_resources/{label}",
                status="ok",
                config=label,
                head_dim=128,
                **config_usage("fwd", 128, config),
            )
        except Exception as e:  # noqa: BLE001
            run.error(f"triton_fwd_resources/{label}", e)
