"""The speedrun options (issue 24), each against a hand computation on the reference path, with the
KV cache, and through an interrupted-and-resumed training run that must equal an uninterrupted one
bit for bit: qk_norm, mlp=relu2, logit_softcap, zero_init_proj, value_embed, unet_skips, smear, x0_mix,
an untied head, the wsd schedule and the batch-size warm-up. (Their Hugging Face export rules: tests/test_hf.py.)"""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_train import CtrlCAfter
from tiny_run import tiny_train_config

from fastlm.errors import ConfigError, TrainError, TrainingInterrupted
from fastlm.io import checkpoint
from fastlm.io.checkpoint import CheckpointError
from fastlm.model import GPT, PLAIN_OPTIONS, GPTConfig
from fastlm.training.optim import muon_param_names
from fastlm.training.schedule import LRSchedule
from fastlm.training.settings import TrainConfig
from fastlm.training.trainer import Trainer

TINY = dict(vocab_size=37, block_size=32, n_layer=2, n_head=4, n_embd=32, backend="reference")


def tiny(**kw):
    """A tiny plain model (no option on) with ``kw`` on top."""
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**PLAIN_OPTIONS, "tie_embeddings": True, **TINY, **kw}))


def perturbed(model, scale=0.3):
    """Every parameter moved off its init (unit gains, zero projections, 0.5 mixes, unit skips)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def tokens(b, t, seed=0):
    return torch.randint(0, 37, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- hand computations (float64, no fastlm op) ----------------------------------------------------
def hand_norm(x, kind, gain, eps=1e-5):
    if kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gain


def hand_rope(x, theta=10000.0):
    """(B, T, H, D): rotate the half-split pairs by position * theta^(-2i/D)."""
    T, D = x.shape[1], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, D/2)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def hand_attention(attn, x, q_map=lambda q: q, k_map=lambda k: k, v_map=lambda v: v):
    """The attention module's output with explicit softmax, computed in float64 from its weights."""
    w = attn.qkv.weight.double()
    B, T, _ = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    qkv = x.double() @ w.t()
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    q = hand_rope(q_map(q.view(B, T, H, D)))
    k = hand_rope(k_map(k.view(B, T, Hkv, D)))
    v = v_map(v).view(B, T, Hkv, D)
    rep = H // Hkv
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * D)
    return y @ attn.proj.weight.double().t()


def close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * (1 + want.abs().max().item()))


# ---- model options ------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_qk_norm_normalises_each_head_before_rope(norm):
    model = perturbed(tiny(qk_norm=True, norm=norm, n_kv_head=2))
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == (8,) and attn.k_norm.weight.shape == (8,)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = attn(x, rope=model._rope(0, 11, x.device))
        want = hand_attention(
            attn,
            x,
            lambda q: hand_norm(q, norm, attn.q_norm.weight.double()),
            lambda k: hand_norm(k, norm, attn.k_norm.weight.double()),
        )
        plain = hand_attention(attn, x)
    close(got, want)
    assert (want - plain).abs().max() > 1e-2  # the norm changes the result: the check can fail


def test_relu2_mlp():
    model = perturbed(tiny(mlp="relu2"))
    mlp = model.blocks[0].mlp
    assert mlp.fc.weight.shape == (128, 32)  # 4 x n_embd: the same parameters as the swiglu default
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = (x.double() @ mlp.fc.weight.double().t()).clamp(min=0).pow(2) @ mlp.proj.weight.double().t()
        close(mlp(x), want)


def test_logit_softcap_caps_the_logits_and_the_loss_uses_them():
    capped = perturbed(tiny(logit_softcap=2.0, tie_embeddings=False), scale=2.0)
    plain = tiny(tie_embeddings=False)
    plain.load_state_dict(capped.state_dict())
    idx, tgt = tokens(2, 13), tokens(2, 13, seed=1)
    with torch.no_grad():
        raw = plain(idx)[0].double()
        got, loss = capped(idx, tgt)
    assert raw.abs().max() > 4  # the cap is active
    close(got, 2.0 * torch.tanh(raw / 2.0))
    assert got.abs().max() <= 2.0
    close(loss, F.cross_entropy(2.0 * torch.tanh(raw / 2.0).view(-1, 37), tgt.view(-1)))


@pytest.mark.parametrize("tie", [True, False])
def test_zero_init_proj_zeroes_only_the_output_projections(tie):
    base, zero = tiny(tie_embeddings=tie), tiny(tie_embeddings=tie, zero_init_proj=True)
    zeroed = {n for n, p in zero.named_parameters() if not p.any()}
    want = {f"blocks.{i}.{m}.proj.weight" for i in range(2) for m in ("attn", "mlp")} | (
        set() if tie else {"lm_head.weight"}
    )
    assert zeroed == want
    for (name, p), q in zip(base.named_parameters(), zero.parameters()):
        if name not in want:  # every other weight draws the same random numbers as without the option
            assert torch.equal(p, q), name
    if not tie:
        _, loss = zero(tokens(2, 9), tokens(2, 9, seed=1))
        assert loss.item() == pytest.approx(math.log(37), abs=1e-6)  # a zero head: uniform predictions


def test_value_embed_mixes_a_token_embedding_into_the_values():
    model = perturbed(tiny(value_embed=True, n_kv_head=2))
    assert [tuple(e.weight.shape) for e in model.value_embeds] == [(37, 16)] * 2
    attn, idx = model.blocks[1].attn, tokens(2, 10)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    a, b = attn.ve_mix.double()
    ve = model.value_embeds[1](idx)
    with torch.no_grad():
        got = attn(x, rope=model._rope(0, 10, x.device), ve=ve)
        want = hand_attention(attn, x, v_map=lambda v: a * v + b * ve.double())
    close(got, want)
    # embeddings stay with AdamW; the mix and tables get gradients
    assert not any(n.startswith("value_embeds") for n in muon_param_names(model))
    model.train()
    model(idx, tokens(2, 10, seed=4))[1].backward()
    assert model.value_embeds[0].weight.grad.abs().sum() > 0 and attn.ve_mix.grad.abs().sum() > 0


def test_unet_skips_add_the_mirrored_outputs():
    model = perturbed(tiny(unet_skips=True, n_layer=5))
    assert model.skip_weights.shape == (2,)
    idx = tokens(2, 12)
    with torch.no_grad():
        rope = model._rope(0, 12, idx.device)
        x, outs = model.wte(idx), []
        for i, block in enumerate(model.blocks):
            if i >= 3:  # blocks 3, 4 take the outputs of blocks 1, 0
                x = x + model.skip_weights[4 - i] * outs[4 - i]
            x = block(x, rope=rope)
            outs.append(x)
        want = model.lm_head(model.ln_f(x))
        close(model(idx)[0], want.double())
    with pytest.raises(ConfigError, match="unet_skips needs n_layer >= 2"):
        GPTConfig(**{**TINY, "n_layer": 1, "unet_skips": True})


def hand_blocks(model, x, rope, mix=None):
    """The blocks one after another on ``x`` (``mix(i, x, x0)`` before block i), then the head."""
    x0 = x
    for i, block in enumerate(model.blocks):
        x = block(mix(i, x, x0) if mix else x, rope=rope)
    return model.lm_head(model.ln_f(x))


def test_smear_adds_the_previous_token_embedding_times_a_gain():
    model = perturbed(tiny(smear=True))
    assert model.smear_gain.shape == (32,)
    idx = tokens(2, 12)
    with torch.no_grad():
        e = model.wte(idx).double()
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)  # nothing before the first token
        x = (e + model.smear_gain.double() * prev).float()
        close(model(idx)[0], hand_blocks(model, x, model._rope(0, 12, idx.device)).double())
    # it starts off: an unperturbed model is the plain one with the same weights
    fresh, plain = tiny(smear=True), tiny()
    with torch.no_grad():
        assert torch.equal(fresh.smear_gain, torch.zeros(32)) and torch.equal(fresh(idx)[0], plain(idx)[0])
    model.train()
    model(idx, tokens(2, 12, seed=4))[1].backward()
    assert model.smear_gain.grad.abs().sum() > 0


def test_x0_mix_feeds_the_embeddings_to_every_later_block():
    model = perturbed(tiny(x0_mix=True, n_layer=3))
    assert model.x0_keep.shape == model.x0_add.shape == (2,)
    idx = tokens(2, 12)
    keep, add = model.x0_keep.detach(), model.x0_add.detach()
    with torch.no_grad():
        want = hand_blocks(
            model,
            model.wte(idx),
            model._rope(0, 12, idx.device),
            mix=lambda i, x, x0: x if i == 0 else keep[i - 1] * x + add[i - 1] * x0,
        )
        close(model(idx)[0], want.double())
    fresh, plain = tiny(x0_mix=True, n_layer=3), tiny(n_layer=3)
    assert (fresh.x0_keep.tolist(), fresh.x0_add.tolist()) == ([1.0, 1.0], [0.0, 0.0])
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], plain(idx)[0])
    # one block: nothing to mix, no weights (the option stays valid, as in the default config)
    assert tiny(x0_mix=True, n_layer=1).x0_keep is None


def test_smear_never_crosses_into_the_next_document():
    """With segment_ids, a document's first token takes nothing from the one before: its logits are those
    of the document alone (RoPE is relative; the masked attention sees only the document)."""
    model = perturbed(tiny(smear=True, x0_mix=True, qk_norm=True, value_embed=True))
    a, b = tokens(1, 7), tokens(1, 9, seed=2)
    seg = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        alone = model(b)[0]
        both = model(torch.cat([a, b], 1), segment_ids=seg)[0][:, 7:]
        unmasked = model(torch.cat([a, b], 1))[0][:, 7:]
    torch.testing.assert_close(both, alone, rtol=0, atol=1e-5 * alone.abs().max().item())
    assert (unmasked[0, 0] - alone[0, 0]).abs().max() > 1e-3  # without the mask it would see a's last token


def test_smear_widens_a_windowed_models_reach_by_one_token():
    """With window w and L layers a position sees L (w - 1) tokens back; the smear adds the one before."""
    model = perturbed(tiny(smear=True, window=4, block_size=16))
    x = tokens(1, 16, seed=1)
    reach = 2 * (4 - 1) + 1
    with torch.no_grad():
        last = model(x)[0][0, -1]
        outside, inside = x.clone(), x.clone()
        outside[0, 15 - reach - 1] = (x[0, 15 - reach - 1] + 1) % 37
        inside[0, 15 - reach] = (x[0, 15 - reach] + 1) % 37
        assert torch.equal(model(outside)[0][0, -1], last)
        assert not torch.equal(model(inside)[0][0, -1], last)


def test_the_kv_cache_carries_the_last_token_through_reorder_and_reset():
    model = perturbed(tiny(smear=True))
    idx = tokens(3, 10)
    with torch.no_grad():
        cache = model.new_kv_cache(3)
        model(idx[:, :6], kv_cache=cache)
        assert cache.last_token.tolist() == idx[:, 5].tolist()
        cache.reorder(torch.tensor([2, 2, 0]))  # beam search keeps rows 2, 2, 0
        assert cache.last_token.tolist() == idx[[2, 2, 0], 5].tolist()
        got = model(idx[[2, 2, 0], 6:7], kv_cache=cache)[0][:, -1]
        want = model(idx[[2, 2, 0], :7])[0][:, -1]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        cache.reset()
        assert cache.last_token is None  # a refeed starts a sequence: no token before its first
        torch.testing.assert_close(model(idx[:, 4:8], kv_cache=cache)[0], model(idx[:, 4:8])[0], rtol=0, atol=1e-6)


ALL_MODEL_OPTIONS = dict(
    qk_norm=True,
    mlp="relu2",
    logit_softcap=5.0,
    zero_init_proj=True,
    value_embed=True,
    unet_skips=True,
    smear=True,
    x0_mix=True,
    tie_embeddings=False,
)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_kv_cache_matches_the_full_forward_with_every_option(backend):
    model = perturbed(tiny(**ALL_MODEL_OPTIONS, n_layer=3, n_kv_head=2, backend=backend))
    idx = tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2)
        steps = [model(idx[:, :6], kv_cache=cache)[0]] + [
            model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(6, 20)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5 * full.abs().max().item())


def test_option_values_are_checked():
    for bad in (-1.0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ConfigError, match="logit_softcap"):
            GPTConfig(logit_softcap=bad)
    for name in ("qk_norm", "smear", "x0_mix"):
        with pytest.raises(ConfigError, match=f"{name} must be true or false"):
            GPTConfig(**{name: 1})
    with pytest.raises(TrainError, match="batch_warmup_start .* must not exceed batch_size"):
        TrainConfig(batch_size=4, batch_warmup_start=8).validate()
    with pytest.raises(TrainError, match="decay_frac"):
        TrainConfig(decay_frac=0.0).validate()


# ---- model FLOPs ----------------------------------------------------------------------------------
def test_flops_per_token_by_hand():
    # TINY with swiglu: hidden = 8/3 * 32 rounded up to 88. Linear weights per layer: qkv 32 x 96, proj
    # 32 x 32, fc 32 x 176, proj 88 x 32 = 3072 + 1024 + 5632 + 2816 = 12544; two layers, and the head
    # 37 x 32 = 1184: N = 26272. Attention: 12 * L 2 * H 4 * D 8 * T 32 = 24576.
    want = 6 * 26272 + 24576
    assert tiny().flops_per_token() == want
    assert tiny(tie_embeddings=False).flops_per_token() == want  # the head once; the lookup table is free
    assert tiny(value_embed=True, unet_skips=True, qk_norm=True, smear=True, x0_mix=True).flops_per_token() == want
    assert tiny().flops_per_token(seq_len=16) == 6 * 26272 + 24576 // 2
    assert tiny(n_kv_head=1).flops_per_token() == want - 6 * 2 * 32 * 48  # GQA: k and v of one head, not four
    # the default model: about 2.47 MFLOP per token (issue 24 says "about 2.4")
    assert (
        GPT(GPTConfig(vocab_size=65)).flops_per_token()
        == 6 * (3 * (96 * 288 + 96 * 96 + 96 * 512 + 256 * 96) + 65 * 96) + 12 * 3 * 3 * 32 * 128
    )


# ---- schedules --------------------------------------------------------------------------------------
def test_wsd_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_schedule="wsd", decay_frac=0.2)
    s = LRSchedule(cfg)
    assert s.lr(4) == pytest.approx(0.5)  # warm-up as every schedule
    assert [s.lr(t) for t in (10, 50, 87)] == [1.0, 1.0, 1.0]  # stable until 110 - 22 = 88
    assert s.lr(88) == 1.0 and s.lr(99) == pytest.approx(1 - 0.9 * 11 / 22)
    assert s.lr(109) == pytest.approx(1 - 0.9 * 21 / 22) and s.lr(110) == pytest.approx(0.1)


def test_wsd_resumed_with_another_max_iters_has_no_jump():
    old = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_schedule="wsd", decay_frac=0.2)
    for step, new_max in ((50, 200), (90, 200), (90, 95)):
        before = LRSchedule(old)
        state = before.state()
        new = TrainConfig(**{**old.__dict__, "max_iters": new_max})
        after = LRSchedule(new)
        after.load(state, step)
        assert after.lr(step) == pytest.approx(before.lr(step)), (step, new_max)
        assert after.lr(new_max) == pytest.approx(0.1)
        lrs = [after.lr(t) for t in range(step, new_max)]
        assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))  # never back up
    after = LRSchedule(TrainConfig(**{**old.__dict__, "max_iters": 200}))
    after.load(LRSchedule(old).state(), 50)
    assert after.lr(159) == 1.0 and after.lr(170) < 1.0  # both plans stable at 50: the new one's decay


def test_batch_warmup_steps():
    cfg = TrainConfig(batch_size=16, batch_warmup_iters=8)
    assert [cfg.batch_at(s) for s in range(10)] == [4, 5, 7, 8, 10, 11, 13, 14, 16, 16]
    cfg = TrainConfig(batch_size=16, batch_warmup_iters=4, batch_warmup_start=2)
    assert [cfg.batch_at(s) for s in range(5)] == [2, 5, 9, 12, 16]
    assert [TrainConfig(batch_size=16).batch_at(s) for s in (0, 1000)] == [16, 16]


# ---- training: exact resume, summary --------------------------------------------------------------
OPTIONS = {  # name -> (TrainConfig overrides, model overrides)
    "qk_norm": ({}, dict(qk_norm=True)),
    "relu2": ({}, dict(mlp="relu2")),
    "logit_softcap": ({}, dict(logit_softcap=3.0)),
    "zero_init_proj": ({}, dict(zero_init_proj=True)),
    "value_embed": ({}, dict(value_embed=True)),
    "unet_skips": ({}, dict(unet_skips=True)),
    "smear": ({}, dict(smear=True)),
    "x0_mix": ({}, dict(x0_mix=True)),
    "untied_head": ({}, dict(tie_embeddings=False)),
    "wsd": (dict(lr_schedule="wsd", decay_frac=0.5), {}),
    "batch_warmup": (dict(batch_warmup_iters=8, batch_warmup_start=1), {}),
    "embed_lr_ratio": (dict(embed_lr_ratio=4.0), dict(value_embed=True, tie_embeddings=False)),
}


def train(corpus, out, train_kw, model_kw, callbacks=()):
    schedule = dict(max_iters=12, eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=2)
    cfg = tiny_train_config(corpus, out, **{**schedule, **train_kw})
    model = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, **model_kw)
    return Trainer(cfg, model, callbacks=callbacks).fit()


def _csv(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in csv.DictReader(f)]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path, corpus, one_thread, name):
    train_kw, model_kw = OPTIONS[name]
    whole = train(corpus, tmp_path / "a", train_kw, model_kw)
    with pytest.raises(TrainingInterrupted):
        train(corpus, tmp_path / "b", train_kw, model_kw, callbacks=[CtrlCAfter(5)])
    resumed = Trainer(TrainConfig(resume=str(tmp_path / "b"), progress=False)).fit()
    for f in ("train_log.csv", "metrics.csv"):
        assert _csv(tmp_path / "a" / f) == _csv(tmp_path / "b" / f) and len(_csv(tmp_path / "a" / f)) >= 3
    wa, _ = checkpoint.load_weights(tmp_path / "a" / "model.safetensors")
    wb, _ = checkpoint.load_weights(tmp_path / "b" / "model.safetensors")
    assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["val_loss"] == whole["val_loss"] and resumed["tokens_seen"] == whole["tokens_seen"]
    stored = json.loads((tmp_path / "b" / "config.json").read_text())
    assert all(stored["model"][k] == v for k, v in model_kw.items())
    assert all(stored["train"][k] == v for k, v in train_kw.items())


def test_the_embedding_tables_train_at_their_rate(tmp_path, corpus, one_thread):
    """embed_lr_ratio: every step sets the embedding tables' AdamW group to that multiple of the
    scheduled lr (the checkpoint's groups after the last step), the other AdamW groups to the lr."""
    train(corpus, tmp_path / "run", dict(embed_lr_ratio=4.0), dict(value_embed=True, tie_embeddings=False))
    groups = checkpoint.load_checkpoint(tmp_path / "run")["optimizer"]["param_groups"]
    adamw = [g for g in groups if "momentum" not in g]
    # the third group: wte, the 2 value tables, the smear's gains, the x0 mix's keep and add
    assert [g["lr_ratio"] for g in adamw] == [1.0, 1.0, 4.0] and len(adamw[2]["params"]) == 6
    assert adamw[0]["lr"] == adamw[1]["lr"] > 0 and adamw[2]["lr"] == pytest.approx(4.0 * adamw[0]["lr"], rel=1e-12)


def test_a_run_stored_before_the_embedding_rate_resumes_as_it_trained(tmp_path, corpus, one_thread):
    """A run directory from before embed_lr_ratio existed (no such key in config.json; it trained every
    AdamW weight at lr, in two groups) resumes exactly at 1x; asking it for another rate is refused."""
    whole = train(corpus, tmp_path / "a", dict(embed_lr_ratio=1.0), {})
    with pytest.raises(TrainingInterrupted):
        train(corpus, tmp_path / "b", dict(embed_lr_ratio=1.0), {}, callbacks=[CtrlCAfter(5)])
    path = tmp_path / "b" / "config.json"
    stored = json.loads(path.read_text())
    del stored["train"]["embed_lr_ratio"]
    path.write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="trained with embed_lr_ratio=1.0, not 5.0"):
        Trainer(TrainConfig(resume=str(tmp_path / "b"), embed_lr_ratio=5.0, progress=False)).fit()
    resumed = Trainer(TrainConfig(resume=str(tmp_path / "b"), progress=False)).fit()
    for f in ("train_log.csv", "metrics.csv"):
        assert _csv(tmp_path / "a" / f) == _csv(tmp_path / "b" / f)
    assert resumed["val_loss"] == whole["val_loss"]


def test_batch_warmup_counts_the_tokens_it_trains_on(tmp_path, corpus, one_thread):
    summary = train(corpus, tmp_path / "run", dict(batch_warmup_iters=8, batch_warmup_start=1), {})
    cfg = TrainConfig(batch_size=4, batch_warmup_iters=8, batch_warmup_start=1)
    assert summary["tokens_seen"] == sum(cfg.batch_at(s) for s in range(12)) * 16 < 12 * 4 * 16
    logged = [int(r["step"]) for r in _csv(tmp_path / "run" / "train_log.csv")]
    assert logged == list(range(1, 13))


def test_default_model_has_the_measured_options_and_older_configs_load_plain(tmp_path):
    """GPTConfig() is the default run's model (QK-norm, value embeddings, untied head, smear, x0 mix); a
    stored config from before those fields existed lacks them and must load as the plain model it was."""
    cfg = GPTConfig()
    assert (cfg.qk_norm, cfg.value_embed, cfg.tie_embeddings, cfg.smear, cfg.x0_mix) == (True, True, False, True, True)
    plain = tiny()  # no option on
    stored = {k: v for k, v in plain.config.to_dict().items() if k not in PLAIN_OPTIONS}
    assert GPTConfig.from_dict(stored) == plain.config
    # end to end: a run directory written before the options, read by load_model
    from fastlm.io import checkpoint, loading
    from fastlm.text.tokenizers import build_tokenizer

    tok = build_tokenizer("char", "abcdefghij klmnopqrstuvwxyz.,ABCDEFGHIJ\n" * 2)
    model = tiny(vocab_size=tok.vocab_size)
    old = {k: v for k, v in model.config.to_dict().items() if k not in PLAIN_OPTIONS}
    checkpoint.write_run_files(tmp_path, {"model": old, "train": {"max_iters": 1}}, tok)
    checkpoint.save_weights(tmp_path / "model.safetensors", checkpoint.model_tensors(model), {})
    loaded, _, _ = loading.load_model(tmp_path)
    assert loaded.config == model.config
    idx = tokens(2, 8) % tok.vocab_size
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)
