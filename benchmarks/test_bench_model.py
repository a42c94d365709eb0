"""GPT training step: tokens/s (and on CUDA peak memory and MFU) with fastlm kernels
(``backend="auto"``) vs the same GPT on SDPA + eager MLP (``backend="torch"``) and on the reference.

* CUDA: GPT-2 small (12 x 768, 12 heads, block 1024, vocab 50304), batch 8, bf16 autocast, fused
  AdamW; peak memory measured.
* CPU: the default training config of ``python -m fastlm.train`` (see common.default_train_setup),
  fp32; peak memory is not measured on CPU (reported as n/a).

MFU = ``GPT.flops_per_token()`` (6N + 12·L·H·D·T, PaLM's rule, what every training run reports) x
tokens / step time / the peak of :func:`fastlm.training.mfu.peak_flops` (CUDA: dense bf16 of the
device; CPU: threads x the one-thread fp32 GEMM rate).

Both the model's default MLP (gelu) and a SwiGLU variant run, so the SwiGLU kernel is exercised.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from fastlm.model import GPT, PLAIN_OPTIONS, GPTConfig
from fastlm.training.mfu import peak_flops
from fastlm.training.optim import build_optimizer, clip_grad_norm
from fastlm.training.settings import PROFILES

from .common import DEVICE, ON_GPU, default_train_setup, gpu_oom_skip, skip_unless_fastlm_backend, sync

BACKENDS = ("auto", "torch", "reference")
PEAK = peak_flops(DEVICE, torch.bfloat16 if ON_GPU else None).flops_per_s  # FLOP/s
MLPS = ("gelu", "swiglu")


def model_setup(mlp: str):
    """``(GPTConfig without backend, batch, name)`` for this device."""
    if ON_GPU:
        gpt2 = dict(PLAIN_OPTIONS, tie_embeddings=True)  # GPT-2-small's shape, a plain block
        cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, mlp=mlp, **gpt2)
        return cfg, 8, "gpt2-small"
    cfg, batch, _ = default_train_setup()
    return dataclasses.replace(cfg, mlp=mlp, dropout=0.0), batch, "default-cpu"


def auto_choice(cfg: GPTConfig) -> str:
    """What ``backend="auto"`` picks for this model's attention (and SwiGLU) on this device."""
    from fastlm import ops

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    # a training step: activations that require grad
    q = torch.randn(1, cfg.n_head, 2, cfg.head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    kv = torch.randn(1, cfg.n_kv_head, 2, cfg.head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    parts = []
    try:
        parts.append("attention:" + ops.attention_backend(q, kv, kv, causal=True))
        if cfg.mlp == "swiglu":
            x = torch.randn(2, 2 * cfg.mlp_hidden, device=DEVICE, dtype=dtype)
            parts.append(
                "swiglu:"
                + ops.resolve_backend(
                    "swiglu_packed", "auto", DEVICE.type, lambda o: o.swiglu_packed_unsupported(x)
                ).name
            )
    except ops.BackendUnavailableError as e:
        parts.append(f"unresolved ({e})")
    return ",".join(parts)


def training_step(model, opt, x, y):
    """One training step as a zero-argument callable: forward (bf16 autocast on GPU), backward, step."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU else torch.autocast("cpu", enabled=False)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp", MLPS)
def test_train_step(bench, mlp, backend):
    skip_unless_fastlm_backend(backend)
    base, batch, name = model_setup(mlp)
    cfg = dataclasses.replace(base, backend=backend)
    T = cfg.block_size

    def build():
        model = GPT(cfg).to(DEVICE)
        model.train()
        opt = build_optimizer(model, optimizer="adamw", weight_decay=0.1, lr=3e-4, device_type=DEVICE.type)
        x = torch.randint(0, cfg.vocab_size, (batch, T), device=DEVICE)
        y = torch.randint(0, cfg.vocab_size, (batch, T), device=DEVICE)
        return model, opt, x, y

    model, opt, x, y = gpu_oom_skip(build)
    step = training_step(model, opt, x, y)

    if ON_GPU:
        gpu_oom_skip(step)  # the first step allocates the optimizer state
        torch.cuda.reset_peak_memory_stats(DEVICE)
    bench.benchmark.group = f"model train step {name} mlp={mlp}"
    # CPU: no extra warm-up: the step that sizes the rounds (untimed) allocates the optimizer state
    median = gpu_oom_skip(lambda: bench.time(step, warmup=2 if ON_GPU else 0))
    peak_mb = torch.cuda.max_memory_allocated(DEVICE) / 2**20 if ON_GPU else None

    tokens = batch * T
    n_params = model.num_params(non_embedding=True)
    flops = model.flops_per_token() * tokens
    mfu = flops / median / PEAK if median and PEAK else None
    resolved = auto_choice(cfg) if backend == "auto" else backend
    bench.record(
        suite="model",
        op=f"train_step-{name}",
        pass_="fwd+bwd+step",
        backend=backend,
        resolved=resolved,
        median_s=median,
        dtype="bf16-autocast" if ON_GPU else "float32",
        shape={
            "batch": batch,
            "block": T,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "vocab": cfg.vocab_size,
            "mlp": mlp,
        },
        variant=mlp,
        flops=flops,
        tokens=tokens,
        params=n_params,
        peak_mem_mb=peak_mb,
        mfu=mfu,
    )


@pytest.mark.parametrize("optimizer", ("adamw", "muon", "muon-pytorch", "muon-bf16"))
def test_optimizer_step(bench, optimizer):
    """``optimizer.step()`` alone on the default model's gradients, and the whole training step
    (forward, backward, step) with that optimizer, timed side by side in one test: the row's
    ``step_fraction`` is the optimizer's share of the training step (issue 14: Muon <= 10%).
    Muon (fastlm.training.optim) with its defaults: 5 Newton-Schulz steps, float32 on CPU, bf16 on CUDA;
    ``muon`` its fused C++ step on CPU, ``muon-pytorch`` its PyTorch form, ``muon-bf16`` the fused step's
    bf16 products (a CPU bfloat16 run's, where the CPU has AVX512-BF16)."""
    from fastlm.ops import muon_bf16_products

    if optimizer == "muon-bf16" and (ON_GPU or not muon_bf16_products()):
        pytest.skip("the fused step's bf16 products: a CPU with AVX512-BF16")

    base, batch, name = model_setup("swiglu")
    cfg = dataclasses.replace(base, backend="auto")
    T = cfg.block_size
    model = gpu_oom_skip(lambda: GPT(cfg).to(DEVICE))
    opt = build_optimizer(model, optimizer=optimizer.split("-")[0], lr=1e-3, weight_decay=0.1, device_type=DEVICE.type)
    for group in opt.muon.param_groups if optimizer != "adamw" else ():
        if optimizer == "muon-pytorch":
            group["fused"] = False
        if optimizer == "muon-bf16":
            group["ns_dtype"] = "bfloat16"
    x = torch.randint(0, cfg.vocab_size, (batch, T), device=DEVICE)
    y = torch.randint(0, cfg.vocab_size, (batch, T), device=DEVICE)
    train_step = training_step(model, opt, x, y)

    gpu_oom_skip(train_step)  # allocates the optimizer state; leaves gradients for opt.step alone
    bench.benchmark.group = f"optimizer step {name}"
    step_s = bench.time(opt.step, warmup=2 if ON_GPU else 1)
    step_min = bench.min_s
    rounds = []  # the training step right after, best of a few rounds
    for _ in range(5 if ON_GPU else 3):
        t0 = time.perf_counter()
        train_step()
        sync()
        rounds.append(time.perf_counter() - t0)
    train_s = min(rounds)
    headline = step_s if ON_GPU or step_min is None else step_min
    bench.record(
        suite="model",
        op=f"optimizer_step-{name}",
        pass_="step",
        backend=optimizer,
        resolved=optimizer,
        median_s=step_s,
        dtype="float32 params" if not ON_GPU else "bf16-autocast",
        shape={"batch": batch, "block": T, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "mlp": cfg.mlp},
        variant=optimizer,
        train_step_ms=train_s * 1e3,
        step_fraction=headline / train_s if step_s else None,
    )


@pytest.mark.parametrize("steps", (5, 4, 3))
@pytest.mark.parametrize("ns_dtype", ("float32", "bfloat16"))
def test_newton_schulz(bench, ns_dtype, steps):
    """Muon's Newton-Schulz alone on the default model's hidden matrices (same-shape stacks, as
    ``fastlm.training.optim.Muon`` runs them): the precision / iteration-count trade of issue 14."""
    from fastlm.ops.reference_muon import newton_schulz
    from fastlm.training.optim import muon_param_names

    base, _, name = model_setup("swiglu")
    model = GPT(dataclasses.replace(base, backend="auto"))
    hidden = set(muon_param_names(model))
    shapes = {}
    for n, p in model.named_parameters():
        if n in hidden:
            shapes.setdefault(tuple(p.shape), []).append(p)
    stacks = [torch.randn(len(ps), *shape, device=DEVICE) for shape, ps in shapes.items()]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ns_dtype]
    bench.benchmark.group = f"newton-schulz {name}"
    median = bench.time(lambda: [newton_schulz(s, steps, dtype=dtype) for s in stacks])
    bench.record(
        suite="model",
        op=f"newton_schulz-{name}",
        pass_="ns",
        backend="fastlm",
        median_s=median,
        dtype=ns_dtype,
        shape={"matrices": {str(k): len(v) for k, v in shapes.items()}, "steps": steps},
        variant=f"{ns_dtype}-ns{steps}",
    )


def _plain_pytorch_optimizer(model, optimizer: str, cfg):
    """The same optimizer as ``fastlm.training.optim.build_optimizer`` from torch.optim alone: AdamW, or
    ``torch.optim.Muon`` (per-matrix Newton-Schulz, its defaults: 5 steps in bfloat16) on the same
    hidden matrices with the same lr/momentum/decay/Nesterov/lr adjustment, and AdamW on the rest."""
    from fastlm.training.optim import _adamw_groups, adamw_kwargs, muon_param_names

    kwargs = adamw_kwargs(DEVICE.type)  # torch's fastest AdamW on both sides
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (cfg.beta1, cfg.beta2)
    if optimizer == "adamw":
        return torch.optim.AdamW(
            _adamw_groups([p for _, p in named], cfg.weight_decay), lr=cfg.lr, betas=betas, **kwargs
        )
    if not hasattr(torch.optim, "Muon"):
        pytest.skip(f"torch {torch.__version__} has no torch.optim.Muon")
    hidden = set(muon_param_names(model))
    muon = torch.optim.Muon(
        [p for n, p in named if n in hidden],
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        weight_decay=cfg.weight_decay,
        nesterov=True,
        adjust_lr_fn="original",
    )
    adamw = torch.optim.AdamW(
        _adamw_groups([p for n, p in named if n not in hidden], cfg.weight_decay), lr=cfg.lr, betas=betas, **kwargs
    )

    class _Both:
        def zero_grad(self, set_to_none=True):
            muon.zero_grad(set_to_none=set_to_none)
            adamw.zero_grad(set_to_none=set_to_none)

        def step(self):
            muon.step()
            adamw.step()

    return _Both()


def test_default_step_vs_plain_pytorch(bench):
    """Issue 14's target row: the default model's whole training step (forward, backward, optimizer)
    as ``python -m fastlm.train`` runs it (fastlm kernels via ``auto``, fastlm's optimizer: Muon + AdamW
    on CPU, the GPU profile's AdamW on CUDA) against the same model and optimizer on plain PyTorch
    (SDPA, eager MLP, torch.optim). Both are timed in alternating rounds in this one test, so machine
    drift hits both; the row's ``speedup_median``/``speedup_min`` are plain time / fastlm time."""
    from fastlm.training.settings import TrainConfig, resolve_settings

    tcfg = resolve_settings(TrainConfig(), {}, DEVICE.type).train  # the profile of this device
    optimizer = tcfg.optimizer
    base, batch, name = model_setup("swiglu")
    T = base.block_size

    def variant(backend: str, plain: bool):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(base, backend=backend)).to(DEVICE)
        model.train()
        opt = (
            _plain_pytorch_optimizer(model, optimizer, tcfg)
            if plain
            else build_optimizer(
                model,
                optimizer=optimizer,
                lr=tcfg.lr,
                weight_decay=tcfg.weight_decay,
                betas=(tcfg.beta1, tcfg.beta2),
                muon_lr=tcfg.muon_lr,
                muon_momentum=tcfg.muon_momentum,
                device_type=DEVICE.type,
            )
        )
        return training_step(model, opt, x, y)

    x = torch.randint(0, base.vocab_size, (batch, T), device=DEVICE)
    y = torch.randint(0, base.vocab_size, (batch, T), device=DEVICE)
    fast = gpu_oom_skip(lambda: variant("auto", plain=False))
    plain = gpu_oom_skip(lambda: variant("torch", plain=True))
    for _ in range(3 if ON_GPU else 2):  # optimizer state, caches, first-call costs
        fast()
        plain()
    sync()
    times = {"fast": [], "plain": []}
    for _ in range(20 if ON_GPU else 12):
        for key, fn in (("fast", fast), ("plain", plain)):
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    bench.benchmark.group = f"default step vs plain pytorch {name}"
    median = bench.time(fast, warmup=0)
    bench.record(
        suite="model",
        op=f"default_step-{name}",
        pass_="fwd+bwd+step",
        backend="auto",
        resolved=auto_choice(dataclasses.replace(base, backend="auto")),
        median_s=median,
        dtype="bf16-autocast" if ON_GPU else "float32",
        variant=optimizer,
        shape={"batch": batch, "block": T, "n_layer": base.n_layer, "n_embd": base.n_embd, "mlp": base.mlp},
        tokens=batch * T,
        flops=GPT(base).flops_per_token() * batch * T,
        mfu=GPT(base).flops_per_token() * batch * T / best["fast"] / PEAK if PEAK else None,
        fastlm_median_ms=med["fast"] * 1e3,
        plain_median_ms=med["plain"] * 1e3,
        fastlm_min_ms=best["fast"] * 1e3,
        plain_min_ms=best["plain"] * 1e3,
        speedup_median=med["plain"] / med["fast"],
        speedup_min=best["plain"] / best["fast"],
    )


@pytest.mark.skipif(ON_GPU, reason="the CPU default run's precision (--dtype auto on a CPU)")
def test_default_step_bf16_vs_fp32(bench):
    """The default run's training step as the Trainer takes it (its model, Muon with the run's
    Newton-Schulz dtype, clipping) under bfloat16 autocast vs float32, vs bfloat16 with attention in
    float32 (the fused qkv op's bf16 products switched off) and a float32 Newton-Schulz (the step before
    both), and vs bfloat16 with only the Newton-Schulz in float32, side by side in alternating rounds
    (best round of each): the speed-ups behind the cpu profile's step counts in bfloat16 and float32."""
    from fastlm.training.optim import run_ns_dtype
    from fastlm.training.runtime import autocast, cpu_native_bf16

    if not cpu_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): --dtype auto trains in float32 here")
    cfg, batch, name = default_train_setup()
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg, backend="auto"))
    # the cpu recipe's optimizer: its embedding tables in an AdamW group of their own
    ratio = PROFILES["cpu"]["train"]["embed_lr_ratio"]
    opt = build_optimizer(model, optimizer="muon", lr=2e-3, muon_lr=0.02, weight_decay=0.1, embed_lr_ratio=ratio)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))

    def step_in(dtype, ns_dtype=None):
        amp = autocast("cpu", dtype)

        def step():
            # the Newton-Schulz dtype of a run in this precision (checked at call time, with the switches)
            ns = ns_dtype or run_ns_dtype("auto", "cpu", dtype)
            for group in opt.muon.param_groups:
                group["ns_dtype"] = ns
            with amp():
                _, loss = model(x, y)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def with_float32_attention(step):  # the bf16 step before the fused qkv op took bf16 (its products off)
        def run():
            from fastlm.ops.extension import cpu_bf16_products

            before = cpu_bf16_products()
            cpu_bf16_products(False)
            try:
                step()
            finally:
                cpu_bf16_products(before)

        return run

    steps = {"float32": step_in(torch.float32), "bfloat16": step_in(torch.bfloat16)}
    steps["bfloat16, fp32 attention"] = with_float32_attention(step_in(torch.bfloat16, "float32"))
    steps["bfloat16, fp32 Newton-Schulz"] = step_in(torch.bfloat16, "float32")
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(8):  # alternating rounds of 5 steps: load drift hits both alike
        for key, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            best[key] = min(best[key], (time.perf_counter() - t0) / 5)
    bench.benchmark.group = f"default CPU step precision {name}"
    median = bench.time(steps["bfloat16"], warmup=1)
    tokens = batch * cfg.block_size
    # MFU of the bf16 step (the row's headline: its best round; and its median) against the peak a
    # bf16 run reports: what a default run on this CPU achieves per step (issue 24's step target)
    flops = model.flops_per_token() * tokens
    bf16_peak = peak_flops(DEVICE, torch.bfloat16).flops_per_s
    headline = bench.min_s or median
    bench.record(
        suite="model",
        op="train_step-default-cpu-precision",
        pass_="fwd+bwd+clip+muon",
        backend="auto",
        resolved=auto_choice(cfg),
        median_s=median,
        dtype="bf16-autocast",
        shape={"batch": batch, "block": cfg.block_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd},
        variant="bf16 vs fp32",
        tokens=tokens,
        fp32_best_ms=best["float32"] * 1e3,
        bf16_best_ms=best["bfloat16"] * 1e3,
        bf16_fp32_attention_best_ms=best["bfloat16, fp32 attention"] * 1e3,
        bf16_fp32_ns_best_ms=best["bfloat16, fp32 Newton-Schulz"] * 1e3,
        speedup_vs_fp32=best["float32"] / best["bfloat16"],
        speedup_vs_fp32_attention=best["bfloat16, fp32 attention"] / best["bfloat16"],
        speedup_vs_fp32_ns=best["bfloat16, fp32 Newton-Schulz"] / best["bfloat16"],
        flops=flops,
        peak_flops=bf16_peak,
        mfu=flops / headline / bf16_peak if bf16_peak else None,
        mfu_median=flops / median / bf16_peak if bf16_peak and median else None,
    )
