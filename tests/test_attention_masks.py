"""Sliding-window and document (segment) masks through the public op, ``fastlm.ops.attention``:
the rule of fastlm.ops.masks against a brute-force reading of its docstring, every CPU backend
against the float64 oracle under the 2x rule (forward and gradients), gradcheck, validation (the
Triton kernels' masks: tests/test_triton_masks.py)."""

import math
import random

import pytest
import torch

from fastlm import ops
from fastlm.errors import BackendUnavailableError
from fastlm.ops.masks import visible_mask
from fastlm.ops.reference import naive_attention

EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def brute_force_mask(t_q, t_k, causal, window, seg):
    """The rule of fastlm.ops.masks, read literally, one (query, key) pair at a time."""
    rows = []
    for b in range(seg.shape[0] if seg is not None else 1):
        grid = []
        for i in range(t_q):
            p = i + t_k - t_q
            row = []
            for j in range(t_k):
                ok = not causal or j <= p
                if window is not None:
                    ok = ok and ((p - window < j) if causal else abs(p - j) < window)
                if seg is not None:
                    ok = ok and p >= 0 and int(seg[b, p]) == int(seg[b, j])
                row.append(ok)
            grid.append(row)
        rows.append(grid)
    return torch.tensor(rows, dtype=torch.bool)


def random_segments(batch, t, rng, max_docs=6):
    """Non-decreasing ids: random document lengths, including length-1 documents and edge boundaries."""
    out = []
    for _ in range(batch):
        cuts = sorted(rng.sample(range(1, t), min(t - 1, rng.randint(0, max_docs)))) if t > 1 else []
        ids, doc = [], 0
        for pos in range(t):
            if pos in cuts:
                doc += 1
            ids.append(doc)
        out.append(ids)
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("seed", range(12))
def test_the_rule_is_what_its_docstring_says(seed):
    rng = random.Random(seed)
    t_k = rng.randint(1, 24)
    t_q = rng.choice([t_k, 1, rng.randint(1, 30)])
    causal = rng.random() < 0.7
    window = rng.choice([None, 1, 2, rng.randint(1, 30)])
    seg = rng.choice([None, random_segments(2, t_k, rng)])
    got = visible_mask(t_q, t_k, causal, window, seg)
    want = brute_force_mask(t_q, t_k, causal, window, seg)
    if got is None:
        assert bool(want.all())
    else:
        assert torch.equal(got.expand_as(want), want)


def test_the_docstring_picture():
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    grid = visible_mask(8, 8, True, 3, seg)[0]
    drawn = [
        "x . . . . . . .",
        "x x . . . . . .",
        "x x x . . . . .",
        ". . . x . . . .",
        ". . . x x . . .",
        ". . . x x x . .",
        ". . . . x x x .",
        ". . . . . . . x",
    ]
    assert [" ".join("x" if v else "." for v in row) for row in grid.tolist()] == drawn


def _inputs(b, h, h_kv, t_q, t_k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t_q, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h_kv, t_k, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h_kv, t_k, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _cpu_backends():
    status = ops.backend_status()
    return [
        b if status[b] is None else pytest.param(b, marks=pytest.mark.skip(reason=f"{b}: {status[b]}"))
        for b in ("reference", "torch", "cpp")
    ]


CASES = [  # (b, h, h_kv, t_q, t_k, d, causal, window, documents, alibi)
    (2, 4, 2, 37, 37, 16, True, 5, True, False),
    (1, 2, 2, 97, 97, 32, True, 16, False, True),
    (2, 2, 1, 17, 40, 16, True, 9, True, False),  # T_q < T_k (a KV cache)
    (1, 3, 3, 33, 33, 8, False, 6, True, False),  # not causal
    (2, 4, 4, 64, 64, 16, True, None, True, True),  # documents only, with ALiBi
    (1, 2, 1, 1, 50, 16, True, 7, True, False),  # one query (decoding)
]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_backends_match_the_float64_oracle(backend, dtype, case):
    b, h, h_kv, t_q, t_k, d, causal, window, documents, alibi = case
    rng = random.Random(hash(case) % 1000)
    seg = random_segments(b, t_k, rng) if documents else None
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)]) if alibi else None
    q, k, v = _inputs(b, h, h_kv, t_q, t_k, d, dtype)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, causal, None, slopes, torch.float64, window, seg)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)

    def run(name):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*x, causal=causal, window=window, segment_ids=seg, alibi_slopes=slopes, backend=name)
        return out, torch.autograd.grad(out, x, dout.to(dtype))

    out, grads = run(backend)
    base_out, base_grads = run("torch")  # SDPA with the dense mask: the same-dtype baseline
    for got, base, want, what in [(out, base_out, ref, "out")] + list(zip(grads, base_grads, ref_grads, "qkv")):
        err = (got.double() - want).abs().max().item()
        bound = 2 * (base.double() - want).abs().max().item() + 4 * EPS[dtype] * max(1.0, want.abs().max().item())
        assert err <= bound, f"{backend} {dtype} d{what}: {err:.3e} > {bound:.3e}"


def test_reference_gradcheck_with_window_and_documents():
    q, k, v = _inputs(1, 2, 1, 9, 12, 4, torch.float64, seed=5)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3]])
    for causal in (True, False):
        fn = lambda q, k, v: ops.attention(q, k, v, causal=causal, window=3, segment_ids=seg, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, v)])


def test_rows_that_see_nothing_give_zeros_and_no_gradient():
    q, k, v = _inputs(1, 2, 2, 6, 4, 8, torch.float64)
    seg = torch.tensor([[0, 0, 1, 1]])
    x = [t.requires_grad_() for t in (q, k, v)]
    out = ops.attention(*x, causal=False, segment_ids=seg, backend="reference")  # queries 0, 1: p < 0
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2])) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(x[0].grad[:, :, :2], torch.zeros_like(x[0].grad[:, :, :2]))
    with pytest.raises(BackendUnavailableError, match="T_q > T_k"):
        ops.attention(*x, causal=False, segment_ids=seg, backend="torch")


def test_attention_qkv_takes_the_masks():
    B, T, H, Hkv, D = 2, 21, 4, 2, 8
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seg = random_segments(B, T, random.Random(4))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), torch.rand(D // 2))
    rope = (ang.cos().double(), ang.sin().double())
    got = ops.attention_qkv(qkv, H, Hkv, rope=rope, window=4, segment_ids=seg, backend="reference")
    from fastlm.ops.positions import apply_rope

    qk = apply_rope(qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D), rope[0].unsqueeze(1), rope[1].unsqueeze(1))
    q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
    v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)
    want = naive_attention(q, k, v, True, None, None, torch.float64, 4, seg).transpose(1, 2).reshape(B, T, H * D)
    assert (got - want).abs().max().item() < 1e-12


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"window": 0}, "window must be an integer >= 1"),
        ({"window": True}, "window must be an integer >= 1"),
        ({"window": 2.5}, "window must be an integer >= 1"),
        ({"segment_ids": torch.zeros(2, 9, dtype=torch.int64)}, r"shape \(B, T_k\) = \(2, 8\)"),
        ({"segment_ids": torch.zeros(2, 8)}, "int32 or int64"),
        ({"segment_ids": [[0] * 8] * 2}, "must be a tensor"),
        ({"segment_ids": torch.tensor([[0, 0, 1, 1, 2, 1, 2, 2]] * 2)}, "non-decreasing"),
    ],
)
def test_bad_masks_are_one_clear_error(kwargs, error):
    q, k, v = _inputs(2, 2, 2, 8, 8, 4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=error):
        ops.attention(q, k, v, **kwargs)


def test_triton_takes_the_masks_by_name(monkeypatch):
    """The Triton kernels (run here in the interpreter) take window and documents when asked by name
    (their parity: tests/test_triton_masks.py); on a CPU tensor auto still picks a CPU backend."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    got = ops.attention(q, k, v, window=3, segment_ids=seg, backend="triton")
    want = ops.attention(q, k, v, window=3, segment_ids=seg, backend="reference")
    assert (got - want).abs().max().item() < 1e-5
    assert ops.attention_backend(q, k, v, window=3) != "triton"


def test_the_same_call_without_masks_is_unchanged():
    """window=None and segment_ids=None take the dense causal path of every backend, bit for bit."""
    q, k, v = _inputs(2, 4, 2, 33, 33, 16, torch.float32)
    for backend in ("reference", "torch"):
        assert torch.equal(
            ops.attention(q, k, v, backend=backend),
            ops.attention(q, k, v, window=None, segment_ids=None, backend=backend),
        )
    full = ops.attention(q, k, v, window=10**6, backend="reference")  # a window longer than T hides nothing
    assert (full - ops.attention(q, k, v, backend="reference")).abs().max().item() == pytest.approx(0, abs=1e-6)
    assert math.isfinite(full.sum().item())


def test_the_torch_backend_takes_a_negative_scale():
    """SDPA's causal CPU kernel returns NaN for scale < 0 (torch 2.13); the torch backend gives it an
    explicit mask then, and agrees with the reference."""
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32, seed=9)
    for causal in (True, False):
        got = ops.attention(q, k, v, causal=causal, scale=-0.5, backend="torch")
        want = ops.attention(q, k, v, causal=causal, scale=-0.5, backend="reference")
        assert torch.isfinite(got).all() and (got - want).abs().max().item() < 1e-5
