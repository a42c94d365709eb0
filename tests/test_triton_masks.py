"""Sliding-window and document masks in the Triton attention kernels (fastlm.kernels.attention):
forward, backward (dK/dV and dQ) and the split-KV decode path against the float64 oracle of
tests/mask_rule.py, under FlashAttention's rule ``max|out - ref64| <= 2 * max|base - ref64| + eps``
(``base``: the torch backend, SDPA with the dense mask, in the tested dtype, where it can express the
call, and in float32 also the textbook formula in float32; ``eps`` half an ulp at the reference's
magnitude).

Runs on a CUDA GPU when there is one, otherwise in Triton's interpreter (an autouse fixture sets
``TRITON_INTERPRET=1`` for these tests only), where the tiles are fwd 32x16, dK/dV 16x32, dQ 32x16,
decode 16x16 (kernels.attention._INTERP_BLOCKS): the shapes below are chosen against those tiles so
that blocks skip key tiles on the left and on the right, cut tiles on both sides of an unmasked run,
and have no fully visible tile at all.
"""

import random

import pytest
import torch

triton = pytest.importorskip("triton")
if not hasattr(torch.library, "triton_op"):
    pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)

from mask_rule import doc_ids, oracle, visible  # noqa: E402

from fastlm import ops  # noqa: E402
from fastlm.errors import BackendUnavailableError  # noqa: E402
from fastlm.kernels import attention as A  # noqa: E402

pytestmark = pytest.mark.gpu  # a CUDA device where there is one, else the interpreter

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = {dt: torch.finfo(dt).eps / 2 for dt in (torch.float32, torch.float16)}  # half an ulp


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _setup(b, h, h_kv, t_q, t_k, d, causal, window, docs, alibi, seed=0):
    """Inputs (float64, CPU), dO, segment ids (or None), slopes (or None) and the visible mask."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(b, n, t, d, generator=gen, dtype=torch.float64) for n, t in ((h, t_q), (h_kv, t_k), (h_kv, t_k))
    )
    do = torch.randn(b, h, t_q, d, generator=gen, dtype=torch.float64)
    if docs == "one":
        seg = torch.full((b, t_k), 3, dtype=torch.int64)
    else:
        seg = doc_ids(b, t_k, docs, gen, window) if docs else None
    slopes = torch.rand(h, generator=gen) * 0.5 + 0.05 if alibi else None
    return (q, k, v), do, seg, slopes, visible(b, t_q, t_k, causal, window, seg)


def _grads(fn, inputs, do):
    """(out, dq, dk, dv) of fn on fresh leaves."""
    x = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*x)
    return (out,) + torch.autograd.grad(out, x, do.to(out.dtype))


def _dev(t, dtype=None):
    return None if t is None else t.to(device=DEVICE, dtype=dtype or t.dtype)


def _refs(inputs, do, mask, scale, slopes, dtype, call):
    """(float64 oracle run, same-dtype PyTorch runs) on the inputs rounded to ``dtype``; the written-out
    formula runs on the CPU (tests/mask_rule.py builds CPU tensors), its results moved to the device."""
    rounded = [t.to(dtype) for t in inputs]

    def textbook(dt):
        run = _grads(lambda *x: oracle(*x, mask, scale, slopes), [t.to(dt) for t in rounded], do.to(dt))
        return [_dev(t) for t in run]

    ref, bases = textbook(torch.float64), []
    try:
        bases.append(_grads(lambda *x: call(*x, backend="torch"), [_dev(t) for t in rounded], _dev(do, dtype)))
    except BackendUnavailableError:  # SDPA: no document mask with T_q > T_k
        pass
    if not bases or dtype == torch.float32:
        bases.append(textbook(dtype))
    return ref, bases


def _within(got, ref64, bases, dtype):
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - ref64).abs().max().item()
    bound = 2 * max((b.double() - ref64).abs().max().item() for b in bases) + EPS[dtype] * max(
        1.0, ref64.abs().max().item()
    )
    return err <= bound, err, bound


def _check(got, ref, bases, dtype, names=("out", "dq", "dk", "dv")):
    for i, name in enumerate(names):
        ok, err, bound = _within(got[i], ref[i], [run[i] for run in bases], dtype)
        assert ok, f"{name}: max err {err:.3e} > bound {bound:.3e}"


def _parity(case, dtype, seed=0):
    b, h, h_kv, t_q, t_k, d, causal, window, docs, alibi = case
    inputs, do, seg, slopes, mask = _setup(b, h, h_kv, t_q, t_k, d, causal, window, docs, alibi, seed)
    scale = d**-0.5
    sl, sg = _dev(slopes), _dev(seg)

    def call(*x, backend):
        return ops.attention(*x, causal=causal, window=window, segment_ids=sg, alibi_slopes=sl, backend=backend)

    ref, bases = _refs(inputs, do, mask, scale, slopes, dtype, call)
    got = _grads(lambda *x: call(*x, backend="triton"), [_dev(t, dtype) for t in inputs], _dev(do, dtype))
    _check(got, ref, bases, dtype)
    return got, mask


# (b, h, h_kv, t_q, t_k, d, causal, window, documents, alibi); T never a multiple of the tiles
CASES = {
    "window1": (1, 2, 2, 37, 37, 16, True, 1, None, False),
    "window_gt_T": (1, 2, 1, 33, 33, 16, True, 500, None, False),
    "window_gqa_skip_left": (1, 4, 2, 83, 83, 16, True, 7, None, False),
    "window_noncausal_cut_both_sides": (1, 2, 2, 97, 97, 16, False, 40, None, False),
    "window_noncausal_skip_both_sides": (1, 2, 1, 90, 90, 8, False, 5, None, True),
    "docs_random_window_gqa": (2, 4, 2, 61, 61, 16, True, 9, "random", False),
    "docs_len1": (2, 2, 2, 41, 41, 16, True, None, "len1", False),
    "docs_edges_noncausal": (1, 2, 2, 35, 35, 16, False, None, "edges", True),
    "docs_one": (1, 2, 1, 29, 29, 16, True, None, "one", False),
    "docs_per_window_noncausal": (1, 2, 2, 70, 70, 16, False, 16, "per_window", False),
    "kv_cache_tq_lt_tk": (2, 2, 1, 20, 75, 16, True, 11, "random", True),
    "tq_gt_tk_causal_window": (1, 2, 2, 50, 21, 16, True, 3, None, False),
    "tq_gt_tk_noncausal_window": (1, 2, 1, 50, 21, 16, False, 4, None, False),
    "tq_gt_tk_noncausal_docs": (1, 2, 2, 45, 20, 16, False, None, "random", False),
    "d40_docs_window_alibi": (1, 2, 2, 47, 47, 40, True, 12, "random", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_masked_forward_backward_fp32(name):
    _parity(CASES[name], torch.float32)


@pytest.mark.parametrize(
    "name",
    [
        "window1",
        "window_noncausal_cut_both_sides",
        "docs_random_window_gqa",
        "kv_cache_tq_lt_tk",
        "tq_gt_tk_noncausal_docs",
    ],
)
def test_masked_forward_backward_fp16(name):
    _parity(CASES[name], torch.float16)


@pytest.mark.parametrize("seed", range(12))
def test_random_masks(seed):
    """Random shapes, windows (small, larger than T) and document splits, causal or not. (Window 1
    has its own test below: with one key per row the exact dK is 0 and dV is dO, a cancellation that
    the 2x rule's max-error baseline, exact there, cannot judge.)"""
    rng = random.Random(seed)
    t_k = rng.randint(12, 80)
    t_q = rng.choice([t_k, rng.randint(12, 80)])
    h_kv = rng.choice([1, 2])
    window = rng.choice([None, rng.randint(2, 20), 200])
    docs = rng.choice([None, "random", "len1", "edges"]) if window is not None else rng.choice(["random", "len1"])
    case = (
        rng.choice([1, 2]),
        h_kv * rng.choice([1, 2]),
        h_kv,
        t_q,
        t_k,
        rng.choice([8, 16, 24]),
        rng.random() < 0.6,
        window,
        docs,
        rng.random() < 0.3,
    )
    _parity(case, torch.float32, seed)


@pytest.mark.parametrize(
    "case",
    [
        (2, 4, 2, 60, 41, 16, True, 1, None, False),
        (1, 2, 2, 30, 30, 24, False, 1, "edges", True),
        (1, 4, 2, 16, 24, 8, True, 1, "len1", False),
    ],
    ids=["tq_gt_tk", "noncausal_docs_alibi", "kv_cache_docs"],
)
def test_window1_gradients(case):
    """Window 1: out and dQ under the 2x rule; dV = dO (P = 1) and dK = 0 (a lone key's softmax
    gradient) up to the rounding of recomputing P and dP in the backward: a few ulps of the terms
    that cancel (measured up to ~1.3e-6 on dK, where PyTorch's own values are exact)."""
    b, h, h_kv, t_q, t_k, d, causal, window, docs, alibi = case
    inputs, do, seg, slopes, mask = _setup(*case)
    sl, sg = _dev(slopes), _dev(seg)

    def call(*x, backend):
        return ops.attention(*x, causal=causal, window=1, segment_ids=sg, alibi_slopes=sl, backend=backend)

    ref, bases = _refs(inputs, do, mask, d**-0.5, slopes, torch.float32, call)
    got = _grads(
        lambda *x: call(*x, backend="triton"), [_dev(t, torch.float32) for t in inputs], _dev(do, torch.float32)
    )
    _check(got[:2], ref[:2], bases, torch.float32, names=("out", "dq"))
    q, v, dout = inputs[0], inputs[2], do
    dp = (dout.abs().amax() * v.abs().amax() * d).item()  # bounds |dO . v|
    assert ref[2].abs().max().item() < 1e-12  # the exact dK is zero
    assert got[2].abs().max().item() <= 8 * EPS[torch.float32] * dp * q.abs().amax().item() * d**-0.5
    assert (got[3].double() - ref[3]).abs().max().item() <= 8 * EPS[torch.float32] * dout.abs().amax().item()


def test_rows_that_see_nothing_give_zeros_and_no_gradient():
    """T_q > T_k: queries before key 0 have no document (and no causal key): zeros, zero dq, lse -inf."""
    for causal, window, docs in ((False, None, "random"), (True, 4, None), (False, 2, None)):
        (out, dq, _, _), mask = _parity((1, 2, 2, 40, 9, 16, causal, window, docs, False), torch.float32)
        blind = ~mask[0].any(-1)  # rows that see no key
        assert blind.any()
        assert (out[:, :, blind] == 0).all() and (dq[:, :, blind] == 0).all()


def test_hidden_tiles_are_never_read():
    """The kernels skip what the mask hides: with a window in a KV cache, the keys before the rows'
    union hold NaN, which any visited tile would spread (0 * NaN) into out, dQ or their own dK/dV
    (whose programs then must visit no query tile). Also through the split-KV path, whose chunks
    cover the union only."""
    b, h, h_kv, t_q, t_k, d, window = 1, 4, 2, 20, 300, 16, 9
    inputs, do, _, _, mask = _setup(b, h, h_kv, t_q, t_k, d, True, window, None, False)
    first = t_k - t_q - window + 1  # the first key any query sees
    hidden = (first // 32) * 32  # whole tiles of every kernel's key tiling before it
    assert hidden >= 64 and not mask[..., :hidden].any()
    q, k, v = (_dev(t, torch.float32) for t in inputs)
    k[:, :, :hidden], v[:, :, :hidden] = float("nan"), float("nan")
    dout = _dev(do, torch.float32)
    for split in (False, True):
        out, lse = A.attention_forward(q, k, v, True, d**-0.5, None, window, None, split_kv=split)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), split
        dq, dk, dv = A.attention_backward(dout, q, k, v, out, lse, True, d**-0.5, None, window, None)
        assert torch.isfinite(dq).all()
        for g in (dk, dv):
            assert (g[:, :, :hidden] == 0).all() and torch.isfinite(g).all()


@pytest.mark.parametrize(
    "case",
    [
        (1, 4, 2, 3, 300, 16, True, 40, "random", False),  # the chunks split the union, not T_k
        (1, 4, 1, 2, 300, 16, False, None, "len1", True),  # documents only: all keys split
        (2, 2, 2, 1, 260, 24, True, 1, "edges", False),  # window 1: one key per row
        (1, 2, 2, 5, 300, 16, True, 1000, None, False),  # a window wider than T
        (1, 8, 2, 4, 333, 16, False, 70, None, False),  # not causal: the union reaches the end
        (1, 2, 2, 16, 300, 16, True, 17, None, False),  # the union (32 keys from a ragged tile) > window
    ],
    ids=["union", "docs", "window1", "wide", "noncausal", "union_wider_than_window"],
)
def test_masked_decode_split_kv(case):
    """Few queries against a long KV take the split-KV path (through the op: fwd and bwd)."""
    b, h, h_kv, t_q, t_k = case[:5]
    assert A.use_split_kv(t_q, t_k, h // h_kv)
    _parity(case, torch.float32)


def test_masked_decode_lse():
    """The split-KV forward's LSE with masks equals the one-pass forward's (float32 rounding apart),
    -inf exactly where a row sees no key, and the outputs agree."""
    inputs, _, seg, _, mask = _setup(1, 4, 2, 6, 290, 16, False, 30, "random", False, seed=3)
    args = [_dev(t, torch.float32) for t in inputs]
    sg = _dev(seg)
    split = A.attention_forward(*args, False, 0.25, None, 30, sg, split_kv=True)
    flash = A.attention_forward(*args, False, 0.25, None, 30, sg, split_kv=False)
    blind = ~_dev(mask).any(-1)[:, None].expand_as(split[1])
    assert torch.equal(torch.isneginf(split[1]), blind) and torch.equal(torch.isneginf(flash[1]), blind)
    assert (split[1][~blind] - flash[1][~blind]).abs().max().item() < 1e-5
    assert (split[0] - flash[0]).abs().max().item() < 1e-5


def test_bad_masks_refused_and_triton_named():
    """Bad masks are refused by the public op before any kernel runs; by name the Triton backend runs
    masked calls."""
    inputs, _, _, _, _ = _setup(1, 2, 2, 8, 8, 16, True, 3, None, False)
    q, k, v = (_dev(t, torch.float32) for t in inputs)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        ops.attention(q, k, v, window=0, backend="triton")
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.attention(q, k, v, segment_ids=_dev(torch.tensor([[0, 1, 0, 1, 1, 1, 2, 2]])), backend="triton")
    assert ops.attention_backend(q, k, v, window=3, backend="triton") == "triton"


@pytest.mark.parametrize(
    "case",
    [
        (1, 2, 1, 600, 600, 64, True, 400, "one", False),  # unmasked tiles inside runs cut on both sides
        (1, 2, 2, 270, 270, 64, False, 60, "random", True),
    ],
    ids=["causal_window_one_doc", "noncausal_window_docs_alibi"],
)
def test_masked_parity_at_the_pinned_tiles(case, monkeypatch):
    """The GPU's pinned tile sizes (FASTLM_TRITON_CONFIGS=pinned; float16 at D=64: forward 128x128,
    masked dK/dV 32x128, dQ 128x32), where blocks hold several tiles on each side of a run."""
    monkeypatch.setenv("FASTLM_TRITON_CONFIGS", "pinned")
    assert A._fixed_launch("dkdv", 64, 2, masked=True)["BLOCK_N"] == 128
    _parity(case, torch.float16)
