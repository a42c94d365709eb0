"""Attention: every fastlm backend vs SDPA (default dispatch and each named SDPA kernel).

Grid
* CUDA ("full"): FlashAttention papers' grid, bf16, B*T = 16k, H*D = 2048, D in {64, 128},
  T in {512 .. 16k}, causal and not; plus a GQA case (H_kv = H/8) and an ALiBi case (SDPA gets
  the equivalent additive bias). "quick" (FASTLM_BENCH_GRID=quick): D = 128, T in {1k, 4k, 16k}.
* CPU: the default training model's attention shape (fp32, causal and not, all passes); fwd+bwd
  only for: one 4x longer (same B*T, causal), GQA (H_kv = H/4), ALiBi, and bf16.

Passes: ``fwd`` (the training forward, inputs requiring grad), ``bwd`` (``autograd.grad`` through a
retained graph) and ``fwd+bwd``. FLOPs: 4*B*H*Tq*Tk*D forward, halved when causal; 2.5x for
backward. Backends that a device or a call cannot run are skipped with the reason.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.ops.positions import alibi_slopes
from fastlm.ops.reference import alibi_bias, causal_mask

from .common import (
    DEVICE,
    ON_GPU,
    attention_flops,
    default_train_setup,
    dtype_name,
    gpu_oom_skip,
    grid,
    skip_unless_fastlm_backend,
)

FASTLM_BACKENDS = ("auto", "reference", "torch", "triton", "cuda", "cpp")
SDPA_KERNELS = {  # our name -> SDPBackend member name (None: SDPA's own dispatch)
    "sdpa": None,
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
BACKENDS = FASTLM_BACKENDS + tuple(SDPA_KERNELS)
# Backends that build the (B, H, Tq, Tk) score matrix: skipped above this many bytes of fp32 scores.
MATERIALISING = ("reference", "sdpa-math")
MAX_SCORE_BYTES = 4 << 30
PASSES = ("fwd+bwd", "fwd", "bwd")
CUDA_ONLY_SDPA = ("sdpa-efficient", "sdpa-cudnn")


def _case(b, h, t, d, causal, dtype, variant="dense", h_kv=None, passes=PASSES):
    return {
        "B": b,
        "H": h,
        "H_kv": h_kv or h,
        "T": t,
        "D": d,
        "causal": causal,
        "dtype": dtype,
        "variant": variant,
        "passes": passes,
    }


def _cases():
    if ON_GPU:
        ds, ts = (
            ((128,), (1024, 4096, 16384)) if grid() == "quick" else ((64, 128), (512, 1024, 2048, 4096, 8192, 16384))
        )
        cases = [
            _case(16384 // t, 2048 // d, t, d, causal, torch.bfloat16)
            for d in ds
            for causal in (True, False)
            for t in ts
        ]
        cases.append(_case(8, 16, 2048, 128, True, torch.bfloat16, "gqa", h_kv=2))
        cases.append(_case(8, 16, 2048, 128, True, torch.bfloat16, "alibi"))
        return cases
    cfg, batch, _ = default_train_setup()
    b, h, t, d = batch, cfg.n_head, cfg.block_size, cfg.head_dim
    t_big = 4 * t
    b_big = max(1, b * t // t_big)
    cases = [_case(b, h, t, d, causal, torch.float32) for causal in (True, False)]
    cases.append(_case(b_big, h, t_big, d, True, torch.float32, passes=("fwd+bwd",)))
    h_kv = max(1, h // 4) if h % max(1, h // 4) == 0 else 1
    cases.append(_case(b, h, t, d, True, torch.float32, "gqa", h_kv=h_kv, passes=("fwd+bwd",)))
    cases.append(_case(b, h, t, d, True, torch.float32, "alibi", passes=("fwd+bwd",)))
    cases.append(_case(b, h, t, d, True, torch.bfloat16, passes=("fwd+bwd",)))
    return cases


def _case_id(c):
    kv = f"kv{c['H_kv']}" if c["H_kv"] != c["H"] else ""
    return (
        f"b{c['B']}h{c['H']}{kv}t{c['T']}d{c['D']}-{'causal' if c['causal'] else 'full'}-"
        f"{dtype_name(c['dtype'])}-{c['variant']}"
    )


def _params():
    cases = _cases()
    out = []
    for pass_ in PASSES:  # fwd+bwd first: a GPU run cut short by its timeout keeps the headline rows
        for c in cases:
            if pass_ not in c["passes"]:
                continue
            for backend in BACKENDS:
                out.append(pytest.param(pass_, c, backend, id=f"{pass_}-{_case_id(c)}-{backend}"))
    return out


def _sdpa_context(backend):
    member = SDPA_KERNELS[backend]
    if member is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, member, None)
    if kernel is None:
        pytest.skip(f"this torch has no SDPBackend.{member}")
    return sdpa_kernel(kernel)


def _make_call(case, backend, q, k, v, slopes):
    """The attention call for ``backend`` (a zero-argument closure) and the resolved backend name."""
    causal = case["causal"]
    if backend in FASTLM_BACKENDS:
        try:  # what this very call resolves to (auto depends on dtype, options and grad mode)
            name = ops.attention_backend(q, k, v, causal=causal, alibi_slopes=slopes, backend=backend)
        except ops.BackendUnavailableError as e:
            pytest.skip(str(e))
        if backend == "auto" and name == "triton" and not ON_GPU:
            pytest.skip("auto resolves to the Triton interpreter on CPU: not benchmarked")
        return (lambda: ops.attention(q, k, v, causal=causal, alibi_slopes=slopes, backend=backend)), name
    # SDPA: ALiBi as an additive float mask (plus -inf above the diagonal when causal)
    kwargs = {}
    if case["H_kv"] != case["H"]:
        kwargs["enable_gqa"] = True  # torch >= 2.5; older: TypeError -> skipped below
    if slopes is not None:
        t = q.shape[2]
        mask = alibi_bias(slopes, t, t, dtype=torch.float32)
        if causal:
            mask = mask.masked_fill(~causal_mask(t, t, q.device), float("-inf"))
        kwargs["attn_mask"] = mask.to(q.dtype).unsqueeze(0)  # (1, H, T, T)
    else:
        kwargs["is_causal"] = causal
    return (lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)), backend


@pytest.mark.parametrize("pass_,case,backend", _params())
def test_attention(bench, pass_, case, backend):
    B, H, H_kv, T, D = case["B"], case["H"], case["H_kv"], case["T"], case["D"]
    dtype = case["dtype"]
    if backend in MATERIALISING and B * H * T * T * 4 > MAX_SCORE_BYTES:
        pytest.skip(
            f"{backend} materialises the (B,H,T,T) scores: {B * H * T * T * 4 / 2**30:.0f} GiB "
            f"> {MAX_SCORE_BYTES / 2**30:.0f} GiB"
        )
    if backend in FASTLM_BACKENDS:
        skip_unless_fastlm_backend(backend)
    if backend in CUDA_ONLY_SDPA and not ON_GPU:
        pytest.skip(f"{backend}: SDPA has this kernel only for CUDA")

    def make():
        q = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H_kv, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H_kv, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
        dout = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
        return q, k, v, dout

    q, k, v, dout = gpu_oom_skip(make)
    slopes = alibi_slopes(H).to(DEVICE) if case["variant"] == "alibi" else None
    call, resolved = _make_call(case, backend, q, k, v, slopes)

    with _sdpa_context(backend) if backend in SDPA_KERNELS else nullcontext():
        # one try-out call: a named SDPA kernel that cannot run this call raises here
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = gpu_oom_skip(call)
                if pass_ != "fwd":
                    gpu_oom_skip(lambda: torch.autograd.grad(out, (q, k, v), dout))
            except (RuntimeError, TypeError) as e:
                if backend not in SDPA_KERNELS:
                    raise
                # SDPA explains itself in warnings ("... kernel not used because:", then the reasons)
                why = [" ".join(str(w.message).split()) for w in caught]
                why = [w for w in why if not w.endswith("because:")] or [str(e).splitlines()[0]]
                pytest.skip(f"{backend} cannot run this call on {DEVICE.type}: {' / '.join(why)}"[:400])

        if pass_ == "fwd":
            fn = call
        elif pass_ == "bwd":
            out = call()
            fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        else:
            fn = lambda: torch.autograd.grad(call(), (q, k, v), dout)  # noqa: E731
        bench.benchmark.group = f"attention {pass_} {_case_id(case)}"
        median = gpu_oom_skip(lambda: bench.time(fn))

    bench.record(
        suite="attention",
        op="attention",
        pass_=pass_,
        backend=backend,
        resolved=resolved,
        median_s=median,
        dtype=dtype_name(dtype),
        causal=case["causal"],
        variant=case["variant"],
        shape={"B": B, "H": H, "H_kv": H_kv, "T_q": T, "T_k": T, "D": D},
        flops=attention_flops(B, H, T, T, D, case["causal"], pass_),
    )
