"""fastlm.training.optim: batched Newton-Schulz, the Muon update against a plain per-matrix reference and
torch.optim.Muon, the Muon+AdamW composite (groups, state through fastlm's checkpoints, GradScaler,
grad accumulation) and --optimizer muon end to end (a loss that falls, an exact resume)."""

import json
import math

import pytest
import torch
from tiny_run import TINY_RUN
from train_hooks import CtrlCAfter

from fastlm.io import checkpoint
from fastlm.model import GPT, GPTConfig
from fastlm.ops import muon_bf16_products, muon_step
from fastlm.ops.extension import CPP_BACKEND, cpu_bf16_products
from fastlm.ops.reference_muon import NS_COEFFICIENTS, newton_schulz
from fastlm.training.optim import (
    Muon,
    MuonWithAdamW,
    build_optimizer,
    embedding_param_names,
    muon_param_names,
    run_ns_dtype,
)

A, B, C = 3.4445, -4.7750, 2.0315


def reference_ns(g: torch.Tensor, steps: int) -> torch.Tensor:
    """One matrix, the formula written out with plain 2-D matmuls in float64."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(float(x.norm()), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


def reference_muon_step(params, grads, bufs, *, lr, momentum, weight_decay, steps=5):
    """torch.optim.Muon's formula (nesterov, adjust_lr 'original'), one matrix at a time, float64."""
    for p, g, buf in zip(params, grads, bufs):
        buf.mul_(momentum).add_(g, alpha=1 - momentum)
        update = (1 - momentum) * g + momentum * buf
        o = reference_ns(update, steps)
        p.mul_(1 - lr * weight_decay)
        p.sub_(lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])) * o)


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 9, 4), (2, 6, 6), (1, 1, 8), (5, 17, 3)])
def test_batched_ns_equals_per_matrix_float64(shape):
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, steps=5, dtype=torch.float64)
    assert out.shape == g.shape and out.dtype == torch.float64
    ref = torch.stack([reference_ns(m, 5) for m in g])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_ns_orthogonalises_and_fp32_bf16_track_float64():
    g = torch.randn(6, 96, 288, generator=torch.Generator().manual_seed(1))
    ref = newton_schulz(g.double(), steps=5, dtype=torch.float64)
    sv = torch.linalg.svdvals(ref)
    assert sv.min() > 0.5 and sv.max() < 1.5  # U S' V^T with S' near 1, as Muon's quintic gives
    assert (newton_schulz(g, dtype=torch.float32).double() - ref).abs().max() < 1e-4
    err_bf16 = (newton_schulz(g, dtype=torch.bfloat16).double() - ref).abs().max()
    assert 1e-4 < err_bf16 < 0.1  # bf16 is really used, and still close
    with pytest.raises(ValueError, match="stack"):
        newton_schulz(g[0])


def _mixed_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(2)
    shapes = [(12, 4), (4, 4), (12, 4), (4, 10), (4, 4), (12, 4)]  # repeated shapes batch together
    return [torch.randn(s, dtype=dtype, generator=gen) for s in shapes], gen


needs_fused = pytest.mark.skipif(
    CPP_BACKEND.muon_step_unsupported([torch.zeros(2, 2)], [torch.zeros(2, 2)], [torch.zeros(2, 2)], "auto")
    is not None,
    reason="fastlm._C with BLAS not built",
)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_fused), False])
def test_muon_step_matches_reference(fused):
    """Both forms of the step, the fused C++ op and the PyTorch one, against the float64 oracle."""
    params, gen = _mixed_params()
    ref_params = [p.clone() for p in params]
    ref_bufs = [torch.zeros_like(p) for p in params]
    params = [torch.nn.Parameter(p) for p in params]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype="float64", fused=fused)
    for _ in range(3):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference_muon_step(ref_params, grads, ref_bufs, lr=0.05, momentum=0.9, weight_decay=0.1)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    for p, b in zip(params, ref_bufs):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_matches_torch_optim_muon():
    """Same conventions as torch.optim.Muon (which runs Newton-Schulz in bf16): compare in bf16, in the
    PyTorch form (bf16 tensors, as torch's; the fused step's bf16 products keep float32 iterates, another
    rounding, checked against float64 below)."""
    base, gen = _mixed_params(torch.float32)
    ours = [torch.nn.Parameter(p.clone()) for p in base]
    theirs = [torch.nn.Parameter(p.clone()) for p in base]
    opt_ours = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype="bfloat16", fused=False)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q, b in zip(ours, theirs, base):
        moved = (q.detach() - b).abs().max()
        assert (p.detach() - q.detach()).abs().max() <= 0.02 * moved  # bf16 matmul rounding only
        torch.testing.assert_close(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"])


DEFAULT_SHAPES = [(288, 96), (96, 96), (512, 96), (96, 256)] * 3  # the default model's hidden matrices


def _run_muon(params, grads, steps=3, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Muon(params, **kw)
    for it in range(steps):
        for p, g in zip(params, grads):
            p.grad = g * (it + 1)
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]


@needs_fused
@pytest.mark.parametrize("nesterov, ns_steps, wd", [(True, 5, 0.1), (False, 1, 0.0), (True, 3, 0.0)])
def test_fused_muon_step_matches_pytorch_form_float32(nesterov, ns_steps, wd):
    """float32 at the default model's shapes (Gram, direct, tall and wide matrices): the fused op and
    the PyTorch form agree to float32 rounding, a millionth of what a step moves the weights."""
    gen = torch.Generator().manual_seed(3)
    params = [0.02 * torch.randn(s, generator=gen) for s in DEFAULT_SHAPES]
    grads = [torch.randn(s, generator=gen) for s in DEFAULT_SHAPES]
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=wd, ns_steps=ns_steps)
    fused, fused_bufs = _run_muon(params, grads, fused=True, **kw)
    plain, plain_bufs = _run_muon(params, grads, fused=False, **kw)
    for f, q, p0 in zip(fused, plain, params):
        moved = (q - p0).abs().max()
        assert moved > 1e-3
        assert (f - q).abs().max() <= 2e-5 * moved
    for f, q in zip(fused_bufs, plain_bufs):
        torch.testing.assert_close(f, q, rtol=1e-6, atol=1e-6)


@needs_fused
def test_fused_muon_step_is_reproducible_whichever_thread_runs_a_matrix():
    """Each matrix runs start to finish on one thread with single-threaded BLAS: the same bits run
    after run and for any order of the list, i.e. whichever thread a matrix is dealt to (what an exact
    resume and identical DDP ranks rest on)."""
    gen = torch.Generator().manual_seed(4)
    params = [0.02 * torch.randn(s, generator=gen) for s in DEFAULT_SHAPES]
    grads = [torch.randn(s, generator=gen) for s in DEFAULT_SHAPES]
    first, first_bufs = _run_muon(params, grads, fused=True, weight_decay=0.1)
    again, again_bufs = _run_muon(params, grads, fused=True, weight_decay=0.1)
    for a, b in zip(first + first_bufs, again + again_bufs):
        assert torch.equal(a, b)
    order = [5, 11, 0, 7, 2, 9, 4, 1, 10, 3, 8, 6]
    shuffled, _ = _run_muon([params[i] for i in order], [grads[i] for i in order], fused=True, weight_decay=0.1)
    for j, i in enumerate(order):
        assert torch.equal(shuffled[j], first[i])


@needs_fused
def test_fused_muon_falls_back_or_refuses_where_it_does_not_apply():
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(8, 4, generator=gen).bfloat16(), torch.randn(4, 4, generator=gen).bfloat16()]
    grads = [torch.randn(p.shape, generator=gen).bfloat16() for p in params]
    # bf16 parameters (and an NS dtype that is not the parameters'): the PyTorch form, same numbers
    auto, _ = _run_muon(params, grads, ns_dtype="float32")
    plain, _ = _run_muon(params, grads, ns_dtype="float32", fused=False)
    for a, b in zip(auto, plain):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="fused=True.*dtype"):
        _run_muon(params, grads, ns_dtype="float32", fused=True)
    f32 = [p.float() for p in params]
    before = cpu_bf16_products()
    cpu_bf16_products(False)  # a CPU without AVX512-BF16: a bf16 Newton-Schulz is the PyTorch form's
    try:
        assert not muon_bf16_products()
        with pytest.raises(RuntimeError, match="fused=True.*bfloat16"):
            _run_muon(f32, [g.float() for g in grads], ns_dtype="bfloat16", fused=True)
    finally:
        cpu_bf16_products(before)
    with pytest.raises(ValueError, match="fused"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], fused="yes")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def bf16_products_ns(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The fused step's bfloat16 Newton-Schulz in float64: every product of operands rounded to bf16,
    all else (sums, the polynomial, the iterate) exact; the direct iteration."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = (x.T if tall else x).float()
    x = (x / x.norm().clamp_min(1e-7)).double()
    for _ in range(steps):
        gram = _bf16(x) @ _bf16(x).T
        x = A * x + _bf16(B * gram + C * _bf16(gram) @ _bf16(gram)) @ _bf16(x)
    return x.T if tall else x


def _bf16_op(grads, steps: int) -> list:
    """The orthogonalised updates of ``fastlm::muon_step_`` with bf16 products (lr 1, no momentum)."""
    params = [torch.zeros_like(g) for g in grads]
    torch.ops.fastlm.muon_step_(
        params, grads, [torch.zeros_like(g) for g in grads], 1.0, 0.0, False, 0.0, steps, [A, B, C], 1e-7, True
    )
    return [-p / math.sqrt(max(1.0, p.shape[0] / p.shape[1])) for p in params]


@needs_fused
@pytest.mark.parametrize("micro_kernels", [True, False])
def test_fused_bf16_newton_schulz_is_its_formula(micro_kernels):
    """Two steps of the op's bf16 Newton-Schulz, on the AVX512-BF16 micro-kernels and on the plain loops
    (any CPU), against its formula in float64: what is left is float32 summation and the rare product
    input rounded to the other bf16 neighbour (measured: 4e-8..6e-5 of the update, vs 6e-4..1e-3
    between the formula and the float64 iteration)."""
    if micro_kernels and not muon_bf16_products():
        pytest.skip("this CPU has no AVX512-BF16 (the plain loops are the other case)")
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(s, generator=gen) for s in DEFAULT_SHAPES[:4]]
    before = cpu_bf16_products()
    cpu_bf16_products(micro_kernels)
    try:
        out = _bf16_op(grads, steps=2)
    finally:
        cpu_bf16_products(before)
    for o, g in zip(out, grads):
        ref = bf16_products_ns(g, 2)
        bf16_error = float((ref - reference_ns(g, 2)).norm() / ref.norm())
        assert bf16_error > 1e-4  # the formula's products really are in bf16
        assert float((o.double() - ref).norm() / ref.norm()) < 0.2 * bf16_error


@pytest.mark.skipif(not muon_bf16_products(), reason="no AVX512-BF16 here: a bf16 Newton-Schulz is the PyTorch form's")
def test_fused_bf16_newton_schulz_tracks_float64_on_low_rank_gradients():
    """Training's gradients are near low rank, where a bf16 Newton-Schulz in the Gram form drifts (0.2-1.1
    relative error on the default model's first gradients): the op's bf16 products take the direct
    iteration, and stay within 3e-2 of the float64 update at the default model's shapes, with the
    auto backend choosing the op."""
    gen = torch.Generator().manual_seed(9)
    grads = [
        torch.randn(r, 3, generator=gen) @ torch.randn(3, c, generator=gen) + 1e-3 * torch.randn(r, c, generator=gen)
        for r, c in DEFAULT_SHAPES[:4]
    ]
    params = [torch.zeros_like(g) for g in grads]
    kw = dict(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, ns_steps=5, eps=1e-7)
    assert (
        muon_step(
            params, grads, [torch.zeros_like(g) for g in grads], ns_coefficients=(A, B, C), ns_dtype="bfloat16", **kw
        )
        == "cpp"
    )
    for p, g in zip(params, grads):
        ref = reference_ns(g, 5)
        out = -p.double() / math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        err = float((out - ref).norm() / ref.norm())
        assert 1e-4 < err < 3e-2, (tuple(g.shape), err)


def test_a_run_takes_bf16_newton_schulz_where_it_trains_in_bf16_on_the_fused_step(monkeypatch):
    from fastlm.training import optim

    for fused_bf16 in (True, False):
        monkeypatch.setattr(optim, "muon_bf16_products", lambda device_type, fused_bf16=fused_bf16: fused_bf16)
        want = "bfloat16" if fused_bf16 else "auto"
        assert run_ns_dtype("auto", "cpu", torch.bfloat16) == want
        assert run_ns_dtype("auto", "cpu", torch.float32) == "auto"  # Muon's own rule: float32 on a CPU
        assert run_ns_dtype("auto", "cuda", torch.bfloat16) == "auto"
        for name in ("float32", "bfloat16", "float64"):
            assert run_ns_dtype(name, "cpu", torch.bfloat16) == name


def test_a_forced_backend_other_than_cpp_keeps_the_float32_newton_schulz(monkeypatch):
    """FASTLM_BACKEND=reference runs Muon in its PyTorch form: a run's ``auto`` Newton-Schulz stays
    float32 there (the fused op's bf16 products are not what that form would compute)."""
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    assert not muon_bf16_products()
    assert run_ns_dtype("auto", "cpu", torch.bfloat16) == "auto"


@needs_fused
def test_opcheck_muon_step():
    gen = torch.Generator().manual_seed(6)
    shapes = [(12, 4), (4, 10), (4, 4)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    bufs = [torch.randn(s, generator=gen) for s in shapes]
    args = (params, grads, bufs, 0.02, 0.95, True, 0.1, 5, [A, B, C], 1e-7)
    torch.library.opcheck(torch.ops.fastlm.muon_step_.default, args)
    torch.library.opcheck(torch.ops.fastlm.muon_step_.default, (*args, True))  # bf16 products


@needs_fused
def test_muon_step_op_rejects_bad_input():
    op = torch.ops.fastlm.muon_step_
    p, g = torch.zeros(4, 3), torch.zeros(4, 3)
    args = (0.02, 0.95, True, 0.0, 5, [A, B, C], 1e-7)
    with pytest.raises(RuntimeError, match="one length"):
        op([p], [g, g], [g.clone()], *args)
    with pytest.raises(RuntimeError, match="shape"):
        op([p], [torch.zeros(3, 4)], [g.clone()], *args)
    with pytest.raises(RuntimeError, match="float32/float64"):
        op([p.half()], [g.half()], [g.half()], *args)
    with pytest.raises(RuntimeError, match="must be Float, got Double"):
        op([p], [g.double()], [g.clone()], *args)
    with pytest.raises(RuntimeError, match="contiguous"):
        op([p], [torch.zeros(3, 4).T], [g.clone()], *args)
    with pytest.raises(RuntimeError, match="2-D"):
        op([torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], *args)
    with pytest.raises(RuntimeError, match=r"\(a, b, c\)"):
        op([p], [g], [g.clone()], 0.02, 0.95, True, 0.0, 5, [A, B], 1e-7)


def test_muon_rejects_bad_settings():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], momentum=1.0)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], ns_dtype="float8")


def tiny_gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, mlp="swiglu", pos="rope", backend="reference"
    )
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_build_optimizer_groups_cover_every_parameter_once():
    model = tiny_gpt(bias=True)
    opt = build_optimizer(model, optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    assert (
        muon_names
        == set(muon_param_names(model))
        == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    )
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))  # tied wte/lm_head once
    assert [g["lr_ratio"] for g in opt.param_groups] == [20.0, 1.0, 1.0]
    adamw = build_optimizer(model, optimizer="adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon"):
        build_optimizer(model, optimizer="sgd", lr=1e-3, weight_decay=0.1)


def _group_names(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (sorted(names[id(p)] for p in g["params"]), g["lr_ratio"], g["weight_decay"])
        for g in opt.param_groups
        if "momentum" not in g  # the AdamW groups
    ]


def test_embedding_tables_take_their_own_group_at_embed_lr_ratio():
    """The token, position and value embeddings, the smear's gains and the x0 mix's scalars train at
    embed_lr_ratio x lr in a third AdamW group (all decayed, as measured); the head, norms and a token
    embedding tied to the head keep lr; at 1 the two groups of the runs from before the setting (their
    checkpoints load), the smear and x0 weights with the undecayed 1-D ones."""
    model = tiny_gpt(value_embed=True, tie_embeddings=False, pos="learned", smear=True, x0_mix=True)
    tables = ["value_embeds.0.weight", "value_embeds.1.weight", "wpe.weight", "wte.weight"]
    side = ["smear_gain", "x0_add", "x0_keep"]
    assert sorted(embedding_param_names(model)) == sorted(tables + side)
    norms = sorted(n for n, p in model.named_parameters() if p.dim() < 2 and n not in side)
    assert norms and all(".ln" in n or "_norm" in n or n.startswith("ln_f") or "ve_mix" in n for n in norms)
    for kind in ("muon", "adamw"):
        opt = build_optimizer(model, optimizer=kind, lr=1e-3, weight_decay=0.1, embed_lr_ratio=5)
        groups = _group_names(model, opt)
        head = ["lm_head.weight"] if kind == "muon" else sorted(["lm_head.weight", *muon_param_names(model)])
        assert groups == [(head, 1.0, 0.1), (norms, 1.0, 0.0), (sorted(tables + side), 5.0, 0.1)], kind
        one = build_optimizer(model, optimizer=kind, lr=1e-3, weight_decay=0.1, embed_lr_ratio=1.0)
        assert _group_names(model, one) == [(sorted(head + tables), 1.0, 0.1), (sorted(norms + side), 1.0, 0.0)], kind
    # a tied token embedding is the head too: it stays at lr (only the value embeddings speed up)
    tied = tiny_gpt(value_embed=True, tie_embeddings=True, smear=False, x0_mix=False)
    assert embedding_param_names(tied) == ["value_embeds.0.weight", "value_embeds.1.weight"]
    groups = _group_names(tied, build_optimizer(tied, optimizer="muon", lr=1e-3, weight_decay=0.1, embed_lr_ratio=3))
    assert groups[0][0] == ["wte.weight"] and groups[2] == (
        ["value_embeds.0.weight", "value_embeds.1.weight"],
        3.0,
        0.1,
    )
    # nothing to speed up: no third group
    plain = tiny_gpt(tie_embeddings=True, value_embed=False, smear=False, x0_mix=False)
    assert len(build_optimizer(plain, optimizer="adamw", lr=1e-3, weight_decay=0.1, embed_lr_ratio=3).param_groups) == 2
    for bad in (0, -1.0, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="embed_lr_ratio must be a finite number > 0"):
            build_optimizer(model, optimizer="muon", lr=1e-3, weight_decay=0.1, embed_lr_ratio=bad)


def _batch(seed, n=4, T=8, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, vocab, (n, T), generator=g)


def _train_steps(model, opt, steps, seed0=0):
    losses = []
    for s in range(steps):
        x, y = _batch(seed0 + s)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_state_round_trips_bit_exactly_through_checkpoint(tmp_path):
    model = tiny_gpt()
    opt = build_optimizer(model, optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    _train_steps(model, opt, 3)
    state = {"step": 3}
    checkpoint.save_checkpoint(
        tmp_path, model, opt, state, [({}, {})], is_best=True, model_config=model.config.to_dict()
    )
    ck = checkpoint.load_checkpoint(tmp_path)
    model2 = tiny_gpt(seed=1)
    checkpoint.load_model_tensors(model2, ck["model"])
    opt2 = build_optimizer(model2, optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt2.load_state_dict(ck["optimizer"])
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == [
        {**g, "ns_coefficients": tuple(g["ns_coefficients"])} if "ns_coefficients" in g else g
        for g in sd2["param_groups"]
    ]
    assert sd["state"].keys() == sd2["state"].keys()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sd2["state"][pid][k]), (pid, k)
    assert _train_steps(model, opt, 3, seed0=10) == _train_steps(model2, opt2, 3, seed0=10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_load_state_dict_refuses_another_layout():
    model = tiny_gpt()
    opt = build_optimizer(model, optimizer="muon", lr=1e-3, weight_decay=0.1)
    adamw = build_optimizer(model, optimizer="adamw", lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(adamw.state_dict())


def test_grad_accumulation_equals_one_big_batch():
    x, y = _batch(5, n=8)
    big, acc = tiny_gpt(), tiny_gpt()
    # float64 Newton-Schulz: the check is about the gradients; the fp32 Gram form's own error (~1e-4 of
    # an update at these nearly rank-deficient first-step gradients) would hide a wrong accumulation
    opt_big = build_optimizer(big, optimizer="muon", lr=1e-3, weight_decay=0.1, ns_dtype="float64")
    opt_acc = build_optimizer(acc, optimizer="muon", lr=1e-3, weight_decay=0.1, ns_dtype="float64")
    big(x, y)[1].backward()
    for half in (slice(0, 4), slice(4, 8)):
        (acc(x[half], y[half])[1] / 2).backward()
    for (name, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    opt_big.step()
    opt_acc.step()
    for (name, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-6, msg=name)


def test_grad_scaler_unscales_both_optimizers():
    model = tiny_gpt()
    opt = build_optimizer(model, optimizer="muon", lr=1e-3, weight_decay=0.0)
    x, y = _batch(0)
    model(x, y)[1].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(x, y)[1]).backward()
    scaler.unscale_(opt)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_muon_training_loss_falls():
    model = tiny_gpt()
    opt = build_optimizer(model, optimizer="muon", lr=1e-2, muon_lr=0.02, weight_decay=0.0)
    x = torch.arange(8).repeat(4, 1) % 11  # a learnable pattern: next token = this token + 1
    y = (x + 1) % 11
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


# ---- end to end through the CLI ------------------------------------------------------------------

TINY = [
    *TINY_RUN,
    "--eval-iters",
    "2",
    "--eval-interval",
    "5",
    "--max-iters",
    "12",
    "--log-interval",
    "1",
    "--warmup-iters",
    "2",
    "--optimizer",
    "muon",
    "--muon-lr",
    "0.03",
    "--grad-accum",
    "2",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from fastlm.text import data

    p = tmp_path_factory.mktemp("corpus") / "shake.txt"
    p.write_text(data.default_corpus().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return p


def _log(path):
    import csv

    with open(path, newline="") as f:
        return [(r["loss"], r["lr"]) for r in csv.DictReader(f)]


def test_cli_muon_resume_is_bit_exact(tmp_path, corpus, capsys):
    from fastlm.train import main

    args = [str(a) for a in ["--data", corpus, *TINY]]
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "b")], callbacks=[CtrlCAfter(6)]) == 130
    assert main(["--resume", str(tmp_path / "b"), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    la, lb = _log(tmp_path / "a" / "train_log.csv"), _log(tmp_path / "b" / "train_log.csv")
    assert la == lb and len(la) == 12
    first, last = float(la[0][0]), float(la[-1][0])
    assert last < first
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert (cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"]) == ("muon", 0.03, 0.95)
    ck = checkpoint.load_checkpoint(tmp_path / "b")
    bufs = [k for k in ck["optimizer"]["state"].values() if "momentum_buffer" in k]
    assert len(bufs) == 4  # qkv, attn proj, fc, mlp proj of the one block


def test_cli_rejects_bad_optimizer_settings(tmp_path, corpus, capsys):
    from fastlm.train import main

    base = [str(a) for a in ["--data", corpus, "--out-dir", tmp_path / "x", *TINY[:-6]]]
    assert main([*base, "--optimizer", "sgd"]) == 2  # argparse's choices: one line, exit 2
    assert "invalid choice: 'sgd'" in capsys.readouterr().err
    assert main([*base, "--muon-ns-dtype", "float16"]) == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err
    for flags, needle in ((["--muon-lr", "-1"], "muon_lr"), (["--muon-momentum", "1.5"], "muon_momentum")):
        rc = main([*base, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not (tmp_path / "x").exists()


def test_muon_step_refuses_a_parameter_listed_twice():
    """The fused op updates each matrix on its own thread; the PyTorch form would apply momentum
    twice: both refuse a parameter (or buffer) given twice."""
    p, g, b = torch.randn(8, 8), torch.randn(8, 8), torch.zeros(8, 8)
    kw = dict(
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.0,
        ns_steps=5,
        ns_coefficients=NS_COEFFICIENTS,
        ns_dtype="float32",
        eps=1e-7,
        backend="reference",
    )
    with pytest.raises(ValueError, match="listed twice"):
        muon_step([p, p], [g, g], [b, torch.zeros(8, 8)], **kw)
    with pytest.raises(ValueError, match="listed twice"):
        muon_step([p, torch.randn(8, 8)], [g, g], [b, b], **kw)


def _grads_of(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("case", ["under", "over", "exactly", "nan", "inf", "some without grads", "tensor"])
def test_clip_grad_norm_is_torchs_bit_for_bit(case):
    """fastlm's clip (the multiply skipped where the coefficient clamps to 1) leaves every gradient and
    returns the norm exactly as ``torch.nn.utils.clip_grad_norm_`` does, on each side of the limit."""
    from fastlm.training.optim import clip_grad_norm

    model = tiny_gpt()
    x, y = _batch(3)
    model(x, y)[1].backward()
    params = sorted(model.parameters(), key=lambda p: -p.dim())  # the matrices first (stable: model order)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    max_norm = {"under": 2 * norm, "over": norm / 3, "exactly": norm}.get(case, 1.0)
    if case == "nan":
        params[0].grad[0, 0] = float("nan")
    elif case == "inf":
        params[1].grad.view(-1)[0] = float("inf")
    elif case == "some without grads":
        params[0].grad = params[2].grad = None
    elif case == "tensor":
        params = params[3]  # a single tensor, as torch accepts
    start = _grads_of(model)
    results = []
    for fn in (torch.nn.utils.clip_grad_norm_, clip_grad_norm):
        for p, g in zip(model.parameters(), start):
            p.grad = None if g is None else g.clone()
        total = fn(params, max_norm)
        results.append((total, _grads_of(model)))
    (t_torch, g_torch), (t_ours, g_ours) = results
    assert torch.equal(t_torch, t_ours) or (t_torch.isnan() and t_ours.isnan())
    for a, b in zip(g_torch, g_ours):
        assert (a is None and b is None) or torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    if case == "under":  # no multiply at all: the very same values
        assert all(torch.equal(a, b) for a, b in zip(g_ours, start) if a is not None)
    if case == "over":
        assert not torch.equal(g_ours[0], start[0])


def test_clip_grad_norm_leaves_other_devices_to_torch(monkeypatch):
    from fastlm.training import optim

    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, m: calls.append(m) or torch.tensor(0.0))
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    p.grad = torch.ones(3, device="meta")
    optim.clip_grad_norm([p], 0.5)
    assert calls == [0.5]
    assert float(optim.clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0)) == 0.0  # no gradients


def test_a_run_clipped_by_fastlm_equals_one_clipped_by_torch(monkeypatch, tmp_path):
    """The Trainer's clip: the same weights, bit for bit, as torch's function gives (with a limit low
    enough that some steps clip and others do not)."""
    from tiny_run import tiny_train_config

    from fastlm.training import trainer as trainer_mod
    from fastlm.training.trainer import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    clipped = []

    def run(name, clip):
        monkeypatch.setattr(trainer_mod, "clip_grad_norm", clip)
        cfg = tiny_train_config(corpus, tmp_path / name, max_iters=12, eval_interval=12, eval_iters=1, grad_clip=1.0)
        t = Trainer(cfg, {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16})
        t.fit()
        return {k: v.clone() for k, v in t.raw_model.state_dict().items()}

    from fastlm.training.optim import clip_grad_norm

    def counting(params, max_norm):
        total = clip_grad_norm(params, max_norm)
        clipped.append(bool(total > max_norm))
        return total

    ours = run("ours", counting)
    theirs = run("torch", torch.nn.utils.clip_grad_norm_)
    assert True in clipped and False in clipped, clipped  # both branches taken
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
