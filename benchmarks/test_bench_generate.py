"""Greedy generation: tokens/s with the KV cache (prefill once, then one token per step) vs
without (the whole sequence re-fed every step), batch 1 and 8.

* CUDA: GPT-2 small in bf16, prompt 128 tokens, 128 new tokens.
* CPU: the default training config, fp32, prompt 16 tokens, 32 new tokens.

Runs ``fastlm.sampling.generate(model, ids, n, greedy=True, use_cache=...)`` (falls back to a
plain loop over ``GPT.forward`` if that module is missing). tokens/s = batch * new tokens / time,
prefill included; the model is untrained (random weights), which does not change the cost.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastlm.model import GPT, PLAIN_OPTIONS, GPTConfig

from .common import DEVICE, ON_GPU, default_train_setup, gpu_oom_skip

BATCHES = (1, 8)


def _setup():
    if ON_GPU:
        gpt2 = dict(PLAIN_OPTIONS, tie_embeddings=True)  # GPT-2-small's shape, a plain block
        cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, **gpt2)
        return cfg, 128, 128, torch.bfloat16, "gpt2-small"
    cfg, _, _ = default_train_setup()
    prompt = min(16, cfg.block_size // 4)
    new = min(32, cfg.block_size - prompt)
    return dataclasses.replace(cfg, dropout=0.0), prompt, new, torch.float32, "default-cpu"


def _generate_fn():
    try:
        from fastlm.sampling import generate

        return generate, "fastlm.sampling.generate"
    except ImportError:
        pass

    @torch.inference_mode()
    def loop(model, ids, n, greedy=True, use_cache=True):
        seq = ids
        cache = model.new_kv_cache(ids.shape[0], max_len=ids.shape[1] + n) if use_cache else None
        logits, _ = model(ids, kv_cache=cache, last_only=True)
        for i in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if i + 1 < n:
                logits, _ = model(nxt, kv_cache=cache, last_only=True) if use_cache else model(seq, last_only=True)
        return seq

    return loop, "GPT.forward loop"


@pytest.mark.parametrize("cached", (True, False), ids=("cached", "uncached"))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_generate(bench, batch, cached):
    cfg, prompt, new, dtype, name = _setup()
    generate, impl = _generate_fn()

    def build():
        model = GPT(cfg).to(device=DEVICE, dtype=dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=DEVICE)
        return model, ids

    model, ids = gpu_oom_skip(build)

    def fn():
        return generate(model, ids, new, greedy=True, use_cache=cached)

    out = gpu_oom_skip(fn)
    if out.shape != (batch, prompt + new):
        pytest.fail(f"generate returned shape {tuple(out.shape)}, expected {(batch, prompt + new)}")
    bench.benchmark.group = f"generate {name} b{batch}"
    median = gpu_oom_skip(lambda: bench.time(fn, warmup=1, min_rounds=3))
    bench.record(
        suite="generate",
        op=f"generate-{name}",
        pass_="decode",
        backend=cfg.backend,
        variant="cached" if cached else "uncached",
        median_s=median,
        dtype=str(dtype).replace("torch.", ""),
        shape={
            "batch": batch,
            "prompt": prompt,
            "new_tokens": new,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "block": cfg.block_size,
        },
        tokens=batch * new,
        impl=impl,
    )
