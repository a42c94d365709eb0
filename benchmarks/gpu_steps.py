"""The steps of :mod:`benchmarks.gpu_check` (each ``step_<name>(run, deadline)``; rows through
``run.row``). Shapes shrink to tiny CPU ones under ``--dry-run``."""
from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from benchmarks.common import attention_flops, peak_bf16_tflops, swiglu_bytes

ON_GPU = torch.cuda.is_available()


# ---- shared -------------------------------------------------------------------------------------
def _dev(run) -> str:
    return "cpu" if run.dry or not ON_GPU else "cuda"


def _sync(run):
    if _dev(run) == "cuda":
        torch.cuda.synchronize()


def bench(run, fn) -> dict:
    """``{"ms": median, "ms_q20", "ms_q80"}`` of ``fn`` after a warm-up call (compilation and
    autotuning happen there). CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    fn()
    _sync(run)
    if _dev(run) == "cuda":
        import inspect
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


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                              ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start(run) -> None:
    """Facts every row carries; the CUDA library build starts in the background."""
    run.facts["device"] = torch.cuda.get_device_name(0) if _dev(run) == "cuda" else f"cpu ({platform.machine()})"
    run.facts["commit"] = _git_commit()
    threading.Thread(target=_build_cuda_lib, args=(run,), daemon=True).start()


def _build_cuda_lib(run) -> None:
    facts = run.facts
    try:
        from benchmarks import cuda_direct
    except ImportError as e:
        facts["cuda_lib_error"] = f"benchmarks.cuda_direct not importable ({e})"
        return
    if run.dry or not ON_GPU:
        facts["cuda_lib_error"] = "dry run / no CUDA device: the CUDA C++ kernels need a GPU"
        return
    try:
        facts["cuda_lib"] = cuda_direct.build_and_load(str(run.out / "cuda_build"), 240)
    except Exception as e:  # cuda_direct.Unavailable or a build failure
        facts["cuda_lib_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]


def cuda_lib(run, deadline):
    """The CUDA library (waiting for the background build up to ``deadline``), or None with a reason."""
    while "cuda_lib" not in run.facts and "cuda_lib_error" not in run.facts and time.monotonic() < deadline - 5:
        time.sleep(0.5)
    return run.facts.get("cuda_lib"), run.facts.get("cuda_lib_error", "CUDA library build still running")


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
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": f"unavailable ({type(e).__name__})"}
    return dict(zip(q.split(","), [v.strip() for v in out[0].split(",")])) if out else {}


def step_env(run, deadline):
    run.row("versions", status="ok", **_versions())
    if _dev(run) == "cuda":
        props = torch.cuda.get_device_properties(0)
        run.row("gpu", status="ok", name=props.name, sm_count=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                **_nvidia_smi())
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
    tflops = 2 * m ** 3 / (t["ms"] * 1e-3) / 1e12
    run.facts["matmul_TFLOPs"] = tflops
    run.row("matmul_rate", status="ok", TFLOPs=round(tflops, 2), n=m, dtype=str(dtype), **t)


# ---- 2. correctness ------------------------------------------------------------------------------
def _attn_cases(run):
    """(label, B, H, H_kv, T_q, T_k, D, causal, alibi)"""
    if run.dry:
        return [("causal", 1, 2, 2, 40, 40, 32, True, False), ("gqa", 1, 4, 2, 33, 33, 32, True, False),
                ("alibi", 1, 2, 2, 33, 33, 16, True, True), ("tq_ne_tk", 1, 2, 2, 17, 40, 32, True, False),
                ("d80", 1, 2, 2, 33, 33, 80, True, False), ("odd_t", 1, 1, 1, 97, 97, 16, True, False)]
    return [("headline", 2, 16, 16, 8192, 8192, 128, True, False), ("gqa", 2, 16, 4, 2048, 2048, 128, True, False),
            ("alibi", 2, 16, 16, 2048, 2048, 128, True, True), ("tq_ne_tk", 2, 16, 16, 1000, 3000, 128, True, False),
            ("d80", 2, 16, 16, 2048, 2048, 80, True, False), ("odd_t", 2, 16, 16, 1025, 1025, 128, True, False)]


def _qkv(b, h, h_kv, t_q, t_k, d, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(b, h, t_q, d, device=dev, generator=g)
    k = torch.randn(b, h_kv, t_k, d, device=dev, generator=g)
    v = torch.randn(b, h_kv, t_k, d, device=dev, generator=g)
    do = torch.randn(b, h, t_q, d, device=dev, generator=g)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def _max_err(got, ref) -> float:
    return (got.float() - ref).abs().max().item()


def _two_x_rule(got, ref, base, dtype) -> dict:
    """FlashAttention's rule per output: err(got) <= 2 err(base) + eps, ref in fp32."""
    eps = {torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float32: 2e-6}[dtype]
    res = {}
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        err, bound = _max_err(g, r), 2 * _max_err(b, r) + eps * max(1.0, r.abs().max().item())
        res[name] = {"err": err, "bound": bound, "ok": bool(math.isfinite(err) and err <= bound)}
    return res


def _reference_fns(case, slopes):
    from fastlm import ops
    from fastlm.ops.reference import naive_attention
    _, b, h, h_kv, t_q, t_k, d, causal, alibi = case

    def ref(q, k, v):
        return ops.attention(q, k, v, causal=causal, alibi_slopes=slopes, backend="reference")

    def base_for(dtype):
        def base(q, k, v):
            if ops.torch_backend.BACKEND.attention_unsupported(q, k, v, causal, 1.0, slopes) is None:
                return ops.attention(q, k, v, causal=causal, alibi_slopes=slopes, backend="torch")
            return naive_attention(q, k, v, causal, None, slopes, dtype=dtype)
        return base
    return ref, base_for


def _check_case(run, backend, case, dtype, lib):
    from fastlm import ops
    label, b, h, h_kv, t_q, t_k, d, causal, alibi = case
    dev = _dev(run)
    q, k, v, do = _qkv(b, h, h_kv, t_q, t_k, d, dev)
    slopes = torch.linspace(0.05, 0.5, h, device=dev) if alibi else None
    ref_fn, base_for = _reference_fns(case, slopes)
    low = [t.to(dtype) for t in (q, k, v, do)]
    ref = _fwd_bwd(ref_fn, *[t.float() for t in low])  # fp32 math on the inputs as rounded to dtype
    base = _fwd_bwd(base_for(dtype), *low)
    if backend == "triton":
        got = _fwd_bwd(lambda a, b_, c: ops.attention(a, b_, c, causal=causal, alibi_slopes=slopes,
                                                      backend="triton"), *low)
    else:
        got = _cuda_fwd_bwd(lib, low, causal, 1.0 / math.sqrt(d))
    res = _two_x_rule(got, ref, base, dtype)
    ok = all(r["ok"] for r in res.values())
    run.row(f"{backend}/{label}/{str(dtype)[6:]}", status="ok" if ok else "fail", backend=backend,
            dtype=str(dtype)[6:], shape=[b, h, h_kv, t_q, t_k, d], causal=causal, alibi=alibi, errors=res)


def _cuda_fwd_bwd(lib, low, causal, scale):
    q, k, v, do = low
    out, lse = lib.attention_fwd(q, k, v, causal, scale)
    dq, dk, dv = lib.attention_bwd(do, q, k, v, out, lse, causal, scale)
    return [out, dq, dk, dv]


def _check_all(run, backend, lib, dtypes, stop_at):
    """Every case in every dtype (the first dtype for all cases first); rows for what time cut."""
    for dtype in dtypes:
        for case in _attn_cases(run):
            name = f"{backend}/{case[0]}/{str(dtype)[6:]}"
            if backend == "cuda" and (case[8] or case[2] != case[3] or case[6] not in (64, 128)):
                run.skip(name, "the CUDA kernel takes no ALiBi/GQA, head dim 64 or 128 only")
            elif time.monotonic() > stop_at:
                run.skip(name, f"{backend}'s share of the step's time is used up")
            else:
                try:
                    _check_case(run, backend, case, dtype, lib)
                except Exception as e:  # noqa: BLE001 -- one failing case does not end the step
                    run.error(name, e)
            if _dev(run) == "cuda":
                torch.cuda.empty_cache()


def step_correct(run, deadline):
    """Triton first (70% of the step's time at most), then the CUDA kernels."""
    dtypes = [torch.bfloat16, torch.float16] if not run.dry else [torch.float16, torch.float32]
    if run.dry:
        run.skip("triton/bf16", "bfloat16 tl.dot is wrong in the Triton interpreter: bf16 runs on the GPU only")
    start = time.monotonic()
    _check_all(run, "triton", None, dtypes, start + 0.7 * (deadline - start))
    lib, why = cuda_lib(run, deadline)
    if lib is None:
        run.skip("cuda", why)
        return
    _check_all(run, "cuda", lib, dtypes, deadline - 3)


# ---- 3. headline: Triton forward per pinned config, SDPA's kernels --------------------------------
def _headline_shape(run):
    return (1, 2, 64, 32) if run.dry else (2, 16, 8192, 128)  # B, H, T, D


def _attn_row(run, name, t, shape, pass_, **extra):
    b, h, t_len, d = shape
    tflops = attention_flops(b, h, t_len, t_len, d, True, pass_) / (t["ms"] * 1e-3) / 1e12
    ceiling = run.facts.get("matmul_TFLOPs")
    run.row(name, status="ok", pass_=pass_, shape=list(shape), causal=True, TFLOPs=round(tflops, 2),
            pct_of_matmul=round(100 * tflops / ceiling, 1) if ceiling else None, **t, **extra)


def _config_resources(run, config, shape):
    """Registers/spills of the forward kernel compiled with ``config`` for this GPU (or sm_90)."""
    from fastlm.kernels import attention as A
    from fastlm.kernels.resources import compile_for_target, resource_usage
    cap = 90
    if _dev(run) == "cuda":
        major, minor = torch.cuda.get_device_capability()
        cap = 10 * major + minor
    m, n, w, s = config
    d = shape[3]
    ce = dict(HEAD_DIM=d, CAUSAL=True, HAS_ALIBI=False, EVEN_D=True, BLOCK_D=d, DOT_PREC="tf32",
              NEG_SCALE=False, BLOCK_M=m, BLOCK_N=n)
    kernel = compile_for_target(A._attn_fwd_kernel, "bf16", ce, cap, num_warps=w, num_stages=s)
    return resource_usage(kernel, cap, use_driver=_dev(run) == "cuda")


def _pinned(config_text):
    """Set FASTLM_TRITON_CONFIGS; returns the previous value (None: unset)."""
    previous = os.environ.get("FASTLM_TRITON_CONFIGS")
    if config_text is None:
        os.environ.pop("FASTLM_TRITON_CONFIGS", None)
    else:
        os.environ["FASTLM_TRITON_CONFIGS"] = config_text
    return previous


def step_headline(run, deadline):
    """Timings of every pinned config (with the launched kernel's registers and spills on a GPU)
    first, then SDPA, then registers/spills per config from sm_90 compiles (what a time-out cuts
    last is the least important)."""
    from fastlm.kernels import attention as A
    from fastlm.kernels.launch import jit
    from fastlm.kernels.resources import launched_kernels, launched_usage
    shape = _headline_shape(run)
    b, h, t_len, d = shape
    dtype = torch.float16 if run.dry else torch.bfloat16
    q, k, v, _ = (x.to(dtype) for x in _qkv(b, h, h, t_len, t_len, d, _dev(run)))
    configs = A.configs("fwd", d, 2)
    configs = configs[:2] if run.dry else configs
    for config in configs:
        label = "x".join(map(str, config))
        previous = _pinned(f"fwd={label}")
        try:
            before = {id(x) for x in launched_kernels(jit(A._attn_fwd_kernel))}
            t = bench(run, lambda: A.attention(q, k, v, True))
            new = [x for x in launched_kernels(jit(A._attn_fwd_kernel)) if id(x) not in before]
            launched = {f"launched_{key}": val for key, val in launched_usage(new[0]).items()} if new else {}
            _attn_row(run, f"triton_fwd/{label}", t, shape, "fwd", backend="triton", config=label,
                      dtype=str(dtype)[6:], **launched)
        except Exception as e:  # noqa: BLE001 -- e.g. a config that needs more shared memory
            run.error(f"triton_fwd/{label}", e)
        finally:
            _pinned(previous)
    _sdpa_rows(run, q, k, v, shape, dtype)
    for config in configs:
        label = "x".join(map(str, config))
        try:
            run.row(f"triton_fwd_resources/{label}", status="ok", config=label, head_dim=d,
                    **_config_resources(run, config, shape))
        except Exception as e:  # noqa: BLE001 -- no ptxas / compile API here
            run.error(f"triton_fwd_resources/{label}", e)


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
    return {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}


def _sdpa_call(choice, q, k, v):
    from torch.nn.attention import sdpa_kernel
    if choice is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def call():
        with sdpa_kernel(choice):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return call


def _sdpa_rows(run, q, k, v, shape, dtype, pass_="fwd"):
    for name, choice in _sdpa_backends().items():
        if name != "default" and (run.dry or choice is None):
            run.skip(f"sdpa_{name}/{pass_}", "dry run: SDPA's GPU kernels need CUDA" if run.dry
                     else "this torch has no such SDPA backend")
            continue
        try:
            fn = _sdpa_call(choice, q, k, v)
            if pass_ == "fwd+bwd":
                fn = _with_backward(fn, q, k, v)
            t = bench(run, fn)
            kernels = _sdpa_kernel_names(fn) if _dev(run) == "cuda" else ["cpu"]
            _attn_row(run, f"sdpa_{name}/{pass_}", t, shape, pass_, backend=f"sdpa_{name}", kernels=kernels,
                      dtype=str(dtype)[6:])
        except Exception as e:  # noqa: BLE001
            run.error(f"sdpa_{name}/{pass_}", e)


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
def step_fwdbwd(run, deadline):
    from fastlm.kernels import attention as A
    from fastlm.kernels.launch import pinned_configs
    shape = _headline_shape(run)
    b, h, t_len, d = shape
    dtype = torch.float16 if run.dry else torch.bfloat16
    q, k, v, _ = (x.to(dtype) for x in _qkv(b, h, h, t_len, t_len, d, _dev(run)))
    try:
        t = bench(run, _with_backward(lambda: A.attention(q, k, v, True), q, k, v))
        pinned = pinned_configs() or {}
        pins = {kind: "x".join(map(str, pinned.get(kind) or A.configs(kind, d, 2)[0]))
                for kind in ("fwd", "dkdv", "dq")}
        _attn_row(run, "triton/fwd+bwd", t, shape, "fwd+bwd", backend="triton", configs=pins, dtype=str(dtype)[6:])
    except Exception as e:  # noqa: BLE001
        run.error("triton/fwd+bwd", e)
    q, k, v = (x.detach() for x in (q, k, v))
    _sdpa_default_fwdbwd(run, q, k, v, shape, dtype)


def _sdpa_default_fwdbwd(run, q, k, v, shape, dtype):
    try:
        fn = _with_backward(_sdpa_call(None, q, k, v), q, k, v)
        t = bench(run, fn)
        _attn_row(run, "sdpa_default/fwd+bwd", t, shape, "fwd+bwd", backend="sdpa_default", dtype=str(dtype)[6:])
    except Exception as e:  # noqa: BLE001
        run.error("sdpa_default/fwd+bwd", e)


# ---- 5. CUDA C++ attention -----------------------------------------------------------------------
def step_cuda_attn(run, deadline):
    lib, why = cuda_lib(run, deadline)
    if lib is None:
        for d in (64, 128):
            run.skip(f"cuda_attn/d{d}", why)
        return
    for d in (64, 128):
        shape = (2, 16, 8192, d)
        q, k, v, do = (x.to(torch.bfloat16) for x in _qkv(2, 16, 16, 8192, 8192, d, "cuda"))
        scale = 1.0 / math.sqrt(d)
        try:
            out, lse = lib.attention_fwd(q, k, v, True, scale)
            _attn_row(run, f"cuda/fwd/d{d}", bench(run, lambda: lib.attention_fwd(q, k, v, True, scale)),
                      shape, "fwd", backend="cuda")
            _attn_row(run, f"cuda/bwd/d{d}", bench(run, lambda: lib.attention_bwd(do, q, k, v, out, lse, True, scale)),
                      shape, "bwd", backend="cuda")
        except Exception as e:  # noqa: BLE001
            run.error(f"cuda/d{d}", e)
        _sdpa_flash_fwd_bwd(run, q, k, v, do, shape)


def _sdpa_flash_fwd_bwd(run, q, k, v, do, shape):
    from torch.nn.attention import SDPBackend
    try:
        fwd = _sdpa_call(SDPBackend.FLASH_ATTENTION, q, k, v)
        _attn_row(run, f"sdpa_flash/fwd/d{shape[3]}", bench(run, fwd), shape, "fwd", backend="sdpa_flash")
        qg, kg, vg = (x.detach().clone() for x in (q, k, v))
        both = _with_backward(_sdpa_call(SDPBackend.FLASH_ATTENTION, qg, kg, vg), qg, kg, vg)
        _attn_row(run, f"sdpa_flash/fwd+bwd/d{shape[3]}", bench(run, both), shape, "fwd+bwd", backend="sdpa_flash")
    except Exception as e:  # noqa: BLE001
        run.error(f"sdpa_flash/d{shape[3]}", e)


# ---- 6. SwiGLU -----------------------------------------------------------------------------------
def _swiglu_row(run, name, t, numel, pass_, **extra):
    gbps = swiglu_bytes(numel, 2, pass_) / (t["ms"] * 1e-3) / 1e9
    copy = run.facts.get("copy_GBps")
    run.row(name, status="ok", pass_=pass_, numel=numel, TBps=round(gbps / 1e3, 3),
            pct_of_copy=round(100 * gbps / copy, 1) if copy else None, **t, **extra)


def _swiglu_fns(run, deadline, g, u, x, dy):
    from fastlm.kernels import swiglu as S
    fns = {"triton_split": (lambda: S.swiglu_forward(g, u), lambda: S.swiglu_backward(dy, g, u)),
           "triton_packed": (lambda: S.swiglu_packed_forward(x), lambda: S.swiglu_packed_backward(dy, x)),
           "eager_split": (lambda: F.silu(g) * u, None)}
    lib, why = cuda_lib(run, deadline)
    if lib is None:
        run.skip("cuda_swiglu", why)
    else:
        fns["cuda_split"] = (lambda: lib.swiglu_fwd(g, u), lambda: lib.swiglu_bwd(dy, g, u))
        fns["cuda_packed"] = (lambda: lib.swiglu_packed_fwd(x), lambda: lib.swiglu_packed_bwd(dy, x))
    return fns


def step_swiglu(run, deadline):
    rows, hidden = (64, 256) if run.dry else (8192, 16384)
    dtype = torch.float16 if run.dry else torch.bfloat16
    dev = _dev(run)
    x = torch.randn(rows, 2 * hidden, device=dev).to(dtype)
    g, u = x[:, :hidden].contiguous(), x[:, hidden:].contiguous()
    dy = torch.randn(rows, hidden, device=dev).to(dtype)
    for name, (fwd, bwd) in _swiglu_fns(run, deadline, g, u, x, dy).items():
        for pass_, fn in (("fwd", fwd), ("bwd", bwd)):
            if fn is None:
                continue
            try:
                _swiglu_row(run, f"{name}/{pass_}", bench(run, fn), rows * hidden, pass_, backend=name,
                            shape=[rows, hidden], dtype=str(dtype)[6:])
            except Exception as e:  # noqa: BLE001
                run.error(f"{name}/{pass_}", e)


# ---- 7. training step ----------------------------------------------------------------------------
def _train_model(run, backend):
    from fastlm.model import GPT, GPTConfig
    from fastlm.training.optim import build_optimizer
    if run.dry:
        cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, mlp="swiglu", backend=backend)
    else:
        cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, mlp="swiglu",
                        backend=backend)
    torch.manual_seed(0)
    model = GPT(cfg).to(_dev(run))
    return model, cfg, build_optimizer(model, optimizer="adamw", weight_decay=0.1, lr=3e-4, device_type=_dev(run))


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
            run.row(f"gpt2_small/{backend}", status="ok", backend=backend, batch=b, block_size=cfg.block_size,
                    params=n, tokens_per_s=round(tokens / (t["ms"] * 1e-3)), TFLOPs=round(achieved, 2),
                    mfu_pct=round(100 * achieved / peak, 1) if peak else None,
                    pct_of_matmul=round(100 * achieved / ceiling, 1) if ceiling else None, **t)
            del model, opt
        except Exception as e:  # noqa: BLE001
            run.error(f"gpt2_small/{backend}", e)


# ---- 8. pytest -m gpu ----------------------------------------------------------------------------
def _pytest_summary(text: str) -> dict:
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", text):
        counts[what] = int(n)
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    if m:
        counts["collected"] = int(m.group(1))
    return counts


def step_pytest_gpu(run, deadline):
    limit = max(5, int(deadline - time.monotonic() - 5))
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    if run.dry:
        args.append("--collect-only")  # the interpreter would take far longer than CI allows
    env = dict(os.environ, FASTLM_TRITON_CONFIGS="pinned")
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=limit, cwd=root, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        (run.out / "pytest_gpu.log").write_text(out)
        run.row("pytest", status="timeout", reason=f"{limit} s", **_pytest_summary(out))
        return
    (run.out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
    run.row("pytest", status="ok" if proc.returncode == 0 else "fail", rc=proc.returncode,
            collect_only=run.dry, summary=tail[0][:300], **_pytest_summary(proc.stdout))
