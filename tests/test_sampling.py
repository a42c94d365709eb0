"""fastlm.sampling: cached vs uncached decoding, the sliding window, top-k/top-p, eos, beam search."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from fastlm.model import GPT, GPTConfig
from fastlm.sampling import beam_search, filter_logits, generate, sample_from_logits, window_keep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_gpt(pos="learned", vocab=11, block=16, seed=0, dtype=torch.float64, backend="reference"):
    """A 2-layer GPT with weights scaled up so its next-token distributions are far from uniform
    (argmax ties would make cached/uncached comparisons meaningless), in float64."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16, pos=pos, backend=backend))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20)
    return model.to(dtype).eval()


class CountingModel(nn.Module):
    """Wraps a GPT and records the length of every forward's input."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.fed = []

    def max_context(self):
        return self.inner.max_context()

    def new_kv_cache(self, *a, **k):
        return self.inner.new_kv_cache(*a, **k)

    def forward(self, idx, **kw):
        self.fed.append(idx.shape[1])
        return self.inner(idx, **kw)


class BigramCache:
    def __init__(self, batch, max_len):
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.reorders = 0

    def reorder(self, index):
        self.batch = index.numel()
        self.reorders += 1

    def reset(self):
        self.length = 0


class Bigram(nn.Module):
    """A toy model whose next-token log-probs depend only on the previous token: ``table[prev]``."""

    def __init__(self, logp, block=64):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(logp, dtype=torch.float64), requires_grad=False)
        self.block = block

        class _C:  # what generate reads from model.config
            vocab_size = self.table.shape[0]

        self.config = _C()

    def max_context(self):
        return self.block

    def new_kv_cache(self, batch_size, max_len=None):
        return BigramCache(batch_size, max_len or self.block)

    def forward(self, idx, kv_cache=None, last_only=False, targets=None):
        if kv_cache is not None:
            assert idx.shape[0] == kv_cache.batch, "cache rows must follow the beams"
            kv_cache.length += idx.shape[1]
            assert kv_cache.length <= kv_cache.max_len
        logits = self.table[idx]  # (B, T, V)
        return (logits[:, -1:] if last_only else logits), None

    def seq_logp(self, prev, tokens):
        total = 0.0
        for t in tokens:
            total += float(self.table[prev, t])
            prev = t
        return total


# ---------------------------------------------------------------------------------------------
# cached == uncached, sliding window


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi", "sinusoidal"])
def test_cached_matches_uncached(pos):
    model = tiny_gpt(pos)
    prompt = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    n_new = 40  # 5 + 40 > block_size 16: the window slides several times
    a = generate(model, prompt, n_new, greedy=True)
    b = generate(model, prompt, n_new, greedy=True, use_cache=False)
    assert a.shape == (3, 5 + n_new)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    a = generate(model, prompt, n_new, temperature=0.9, top_k=6, top_p=0.95, generator=torch.Generator().manual_seed(7))
    b = generate(
        model,
        prompt,
        n_new,
        temperature=0.9,
        top_k=6,
        top_p=0.95,
        use_cache=False,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(a, b)
    c = generate(model, prompt, n_new, temperature=0.9, top_k=6, top_p=0.95, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c), "a different seed should give different samples"


def test_float32_cached_matches_uncached():
    model = tiny_gpt("rope", dtype=torch.float32)
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        generate(model, prompt, 20, greedy=True), generate(model, prompt, 20, greedy=True, use_cache=False)
    )


def test_within_context_matches_plain_full_forward():
    """Before the window is full, decoding equals argmax over a plain full-sequence forward."""
    model = tiny_gpt("learned")
    seq = torch.tensor([[3, 1, 4]])
    out = generate(model, seq, 13, greedy=True)  # 16 tokens = block_size: no slide
    with torch.no_grad():
        for _ in range(13):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_sliding_window_feeds_prefill_then_single_tokens():
    block = 16
    model = CountingModel(tiny_gpt("alibi", block=block))
    prompt = torch.randint(0, 11, (2, 20))  # longer than the context: cropped to 16 for the prefill
    out = generate(model, prompt, 30, greedy=True)
    assert out.shape == (2, 50)
    keep = window_keep(block)
    assert keep == 12
    # prefill of 16, then every (block - keep) = 4 steps a re-prefill of `keep`, else 1 token
    assert model.fed[0] == block
    assert set(model.fed[1:]) == {1, keep}
    assert all(n <= block for n in model.fed)
    assert len(model.fed) == 30  # one forward per new token except the last
    # the token after a slide depends only on the last `keep` tokens: check one slide directly
    first_slide = model.fed.index(keep)  # forward #k predicts token 20 + k
    n = 20 + first_slide
    with torch.no_grad():
        logits, _ = model.inner(out[:, n - keep : n])
    assert torch.equal(out[:, n], logits[:, -1].argmax(-1))


def test_block_size_one_slides_every_step():
    model = tiny_gpt("learned", block=1)
    out = generate(model, torch.tensor([[2, 5]]), 6, greedy=True)
    seq = [2, 5]
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(torch.tensor([[seq[-1]]]))
            seq.append(int(logits[0, -1].argmax()))
    assert out[0].tolist() == seq


def test_stream_and_mode_restored():
    model = tiny_gpt("rope").train()
    got = []
    out = generate(model, torch.tensor([[1, 2], [3, 4]]), 9, greedy=True, stream=lambda t: got.append(t.clone()))
    assert model.training, "generate must restore the caller's train/eval mode"
    assert torch.equal(torch.stack(got, 1), out[:, 2:])


def test_empty_prompt_starts_from_eos():
    model = tiny_gpt()
    out = generate(model, torch.zeros(2, 0, dtype=torch.long), 5, greedy=True, eos_id=10)
    ref = generate(model, torch.full((2, 1), 10), 5, greedy=True, eos_id=10)
    assert out.shape[0] == 2 and torch.equal(out, ref[:, 1:])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)


def test_zero_new_tokens_returns_prompt():
    model = tiny_gpt()
    p = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, p, 0), p)


# ---------------------------------------------------------------------------------------------
# logits filtering and the draw


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = filter_logits(logits, top_k=5)
    for row in range(4):
        kept = set(torch.nonzero(torch.isfinite(out[row])).flatten().tolist())
        assert kept == set(torch.topk(logits[row], 5).indices.tolist())
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])
    # sampling many times never leaves the top-k set, and visits all of it
    big = logits[:1].expand(20000, 50)
    s = sample_from_logits(big, top_k=5, temperature=3.0, generator=torch.Generator().manual_seed(1))
    top = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(s.tolist()) == top


def test_top_p_keeps_minimal_prefix_with_mass_p():
    gen = torch.Generator().manual_seed(3)
    for p in (0.05, 0.3, 0.5, 0.77, 0.9, 0.99):
        logits = torch.randn(8, 40, generator=gen, dtype=torch.float64) * 2
        out = filter_logits(logits, top_p=p)
        probs = torch.softmax(logits, -1)
        for row in range(8):
            kept = torch.isfinite(out[row])
            m = int(kept.sum())
            order = probs[row].argsort(descending=True)
            # the kept set is the m most likely tokens
            assert set(order[:m].tolist()) == set(torch.nonzero(kept).flatten().tolist())
            mass = probs[row][order].cumsum(0)
            assert mass[m - 1] >= p
            if m > 1:
                assert mass[m - 2] < p, "a smaller prefix already had mass >= p"


def test_top_p_hand_example_and_edges():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-9) == [False, True, False, False]  # always at least one token
    # top-p runs on the distribution renormalised after top-k: top-2 -> (0.625, 0.375)
    both = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6))[0].tolist()
    assert both == [False, True, False, False]
    both = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.7))[0].tolist()
    assert both == [False, True, False, True]


def test_draw_matches_distribution_and_skips_zero_probability():
    logits = torch.tensor([float("-inf"), 0.0, 1.0, float("-inf"), 2.0, float("-inf")])
    n = 40000
    s = sample_from_logits(logits.expand(n, 6), temperature=1.5, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(s, minlength=6).double()
    assert counts[0] == counts[3] == counts[5] == 0
    expect = torch.softmax(logits.double() / 1.5, -1) * n
    sigma = (expect * (1 - expect / n)).sqrt()
    ok = expect > 0
    assert ((counts[ok] - expect[ok]).abs() <= 5 * sigma[ok]).all(), (counts, expect)


def test_greedy_is_argmax():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_from_logits(logits, greedy=True), logits.argmax(-1))


# ---------------------------------------------------------------------------------------------
# eos


def test_eos_stops_rows_and_pads():
    V, EOS = 5, 2
    table = torch.full((V, V), -20.0, dtype=torch.float64)
    table[0, 1] = 0.0  # 0 -> 1 -> eos
    table[1, EOS] = 0.0
    table[3, 3] = 0.0  # 3 -> 3 forever
    table[EOS, 4] = 0.0  # after eos the model would say 4: must be padded with eos instead
    table[4, 4] = 0.0
    model = Bigram(table)
    out = generate(model, torch.tensor([[0], [3]]), 5, greedy=True, eos_id=EOS)
    assert out.tolist() == [[0, 1, EOS, EOS, EOS, EOS], [3, 3, 3, 3, 3, 3]]
    out = generate(model, torch.tensor([[0], [1]]), 10, greedy=True, eos_id=EOS)
    assert out.tolist() == [[0, 1, EOS], [1, EOS, EOS]], "stops once every row has finished"
    out = generate(model, torch.tensor([[0]]), 4, greedy=True)  # no eos_id: keeps going
    assert out.tolist() == [[0, 1, EOS, 4, 4]]


# ---------------------------------------------------------------------------------------------
# beam search


def greedy_not_optimal_table():
    p = torch.full((4, 4), 1e-6, dtype=torch.float64)
    p[0] = torch.tensor([0.01, 0.50, 0.48, 0.01])  # greedy picks 1 ...
    p[1] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # ... and then has only flat choices
    p[2] = torch.tensor([0.01, 0.01, 0.01, 0.97])  # 0 -> 2 -> 3 is far more likely
    p[3] = torch.tensor([0.01, 0.01, 0.01, 0.97])
    return (p / p.sum(-1, keepdim=True)).log()


@pytest.mark.parametrize("length", [2, 3])
def test_beam_search_beats_greedy_and_matches_exhaustive(length):
    model = Bigram(greedy_not_optimal_table())
    prompt = torch.tensor([[0]])
    best = max(itertools.product(range(4), repeat=length), key=lambda s: model.seq_logp(0, s))
    greedy = generate(model, prompt, length, greedy=True)[0, 1:].tolist()
    assert model.seq_logp(0, greedy) < model.seq_logp(0, best) - 0.1, "the toy must defeat greedy"
    beams = beam_search(model, prompt, length, beam_size=2, length_penalty=0.0)
    assert beams[0][0][1:].tolist() == list(best)
    assert beams[0][1] == pytest.approx(model.seq_logp(0, best), abs=1e-12)
    assert beams[0][1] >= beams[1][1]


def _exhaustive(model, prompt, V, L, eos, alpha):
    """All hypotheses: eos only as the last token, non-eos ones of length L; score like beam_search."""
    hyps = []
    with torch.no_grad():
        for n in range(1, L + 1):
            for toks in itertools.product(range(V), repeat=n):
                if eos is not None and eos in toks[:-1]:
                    continue
                if n < L and (eos is None or toks[-1] != eos):
                    continue
                ids = torch.tensor([prompt + list(toks)])
                logits, _ = model(ids)
                logp = torch.log_softmax(logits[0].double(), -1)
                total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks))
                hyps.append((prompt + list(toks), total / n**alpha))
    hyps.sort(key=lambda h: h[1], reverse=True)
    return hyps


@pytest.mark.parametrize("eos,alpha", [(None, 1.0), (3, 1.0), (3, 0.0), (3, 2.0)])
def test_wide_beam_equals_exhaustive_search_on_gpt(eos, alpha):
    V, L = 5, 3
    model = tiny_gpt("rope", vocab=V, block=8, seed=5)
    prompt = [1, 4]
    K = V ** (L - 1)  # wide enough to keep every live prefix: the search becomes exact
    beams = beam_search(model, torch.tensor([prompt]), L, beam_size=K, length_penalty=alpha, eos_id=eos)
    ref = _exhaustive(model, prompt, V, L, eos, alpha)[:K]
    assert [b[0].tolist() for b in beams] == [h[0] for h in ref]
    for (_, score), (_, ref_score) in zip(beams, ref):
        assert score == pytest.approx(ref_score, abs=1e-9)


def test_beam_size_one_is_greedy_and_slides():
    model = tiny_gpt("alibi", block=8)
    prompt = torch.tensor([[2, 7, 1]])
    beams = beam_search(model, prompt, 20, beam_size=1)  # 23 > block_size 8: the window slides
    assert len(beams) == 1
    assert torch.equal(beams[0][0], generate(model, prompt, 20, greedy=True)[0])


def test_beam_search_follows_beams_in_cache():
    model = Bigram(greedy_not_optimal_table())
    beam_search(model, torch.tensor([[0]]), 5, beam_size=3)  # Bigram asserts cache rows == beams
    beams = beam_search(model, torch.tensor([[0, 1]]), 4, beam_size=3, eos_id=0)
    assert 1 <= len(beams) <= 3
    assert all(a[1] >= b[1] for a, b in zip(beams, beams[1:]))


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(eos_id=11), "eos_id"),
        (dict(prompt=torch.tensor([[1, 11]])), "outside the model's vocabulary"),
        (dict(prompt=torch.tensor([[[1]]])), "shape"),
    ],
)
def test_generate_validation(kwargs, match):
    model = tiny_gpt()
    prompt = kwargs.pop("prompt", torch.tensor([[1, 2]]))
    n = kwargs.pop("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, n, **kwargs)


def test_greedy_ignores_temperature_and_type_errors():
    model = tiny_gpt()
    generate(model, torch.tensor([[1]]), 2, greedy=True, temperature=0.0)  # allowed with greedy
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, torch.tensor([[1.0]]), 2)
    with pytest.raises(TypeError, match="top_k"):
        generate(model, torch.tensor([[1]]), 2, top_k=2.5)


def test_beam_search_validation():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, torch.tensor([[1]]), 3, beam_size=0)
    with pytest.raises(ValueError, match="batch size"):
        beam_search(model, torch.tensor([[1], [2]]), 3, beam_size=2)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, torch.tensor([[1]]), 3, beam_size=2, length_penalty=math.inf)
    with pytest.raises(ValueError, match="empty prompt"):
        beam_search(model, torch.zeros(1, 0, dtype=torch.long), 3, beam_size=2)
    assert beam_search(model, torch.tensor([[4]]), 0, beam_size=2)[0][0].tolist() == [4]


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_cached_decoding_on_each_backend(backend, pos):
    """Single-token decode steps (T_q = 1 against a longer cache) exercise each backend's
    bottom-right causal alignment; tokens must match uncached decoding and the reference backend."""
    from fastlm import ops

    why = ops.backend_status().get(backend)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    device = "cuda" if backend == "triton" else "cpu"  # the Triton kernels take CUDA tensors
    ref = tiny_gpt(pos, dtype=torch.float32, seed=3).to(device)
    model = tiny_gpt(pos, dtype=torch.float32, seed=3, backend=backend).to(device)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    prompt = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(5)).to(device)
    out = generate(model, prompt, 24, greedy=True)
    assert torch.equal(out, generate(model, prompt, 24, greedy=True, use_cache=False))
    assert torch.equal(out, generate(ref, prompt, 24, greedy=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_cached_decoding_on_cuda(pos):
    """On the GPU (backend auto: the Triton/CUDA kernels where available) the KV-cached decode
    steps give the tokens of uncached decoding, sliding window included, and so does sampling."""
    model = tiny_gpt(pos, dtype=torch.float32, seed=4, backend="auto").cuda()
    prompt = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(6)).cuda()
    out = generate(model, prompt, 40, greedy=True)
    assert out.device.type == "cuda"
    assert torch.equal(out, generate(model, prompt, 40, greedy=True, use_cache=False))
    g = lambda: torch.Generator(device="cuda").manual_seed(11)  # noqa: E731
    assert torch.equal(
        generate(model, prompt, 40, top_p=0.9, generator=g()),
        generate(model, prompt, 40, top_p=0.9, generator=g(), use_cache=False),
    )
    beams = beam_search(model, prompt[:1], 12, beam_size=1)
    assert torch.equal(beams[0][0], generate(model, prompt[:1], 12, greedy=True)[0])


def test_nan_logits_raise():
    with pytest.raises(ValueError, match="NaN"):
        sample_from_logits(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN"):
        sample_from_logits(torch.full((1, 3), float("-inf")), greedy=True)
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        generate(model, torch.tensor([[1, 2]]), 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1e-3, 1e-8, 1e-30, 1e-45, 5e-324])
def test_tiny_temperature_acts_as_greedy(dtype, temperature):
    """logits / T used to overflow to inf -> NaN probabilities -> silently token 0. Now a tiny T
    is greedy decoding, for every logits dtype, with top-k / top-p too."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 50, generator=g) * 30).to(dtype)
    logits[:, 0] = logits.float().min(-1).values.to(dtype)  # token 0 (what NaN used to give) never wins
    want = logits.float().argmax(-1)
    for kw in ({}, {"top_k": 5}, {"top_p": 0.9}):
        got = sample_from_logits(logits, temperature=temperature, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(got, want), (temperature, kw)


def test_huge_temperature_is_uniform_and_probabilities_stay_finite():
    logits = torch.tensor([[0.0, 1e4, -1e4, 5.0]]).expand(40000, 4)
    s = sample_from_logits(logits, temperature=1e300, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(s, minlength=4).double()
    assert ((counts - 10000).abs() < 5 * math.sqrt(10000 * 0.75)).all(), counts


def test_tiny_temperature_through_generate_matches_greedy():
    model = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, 12, greedy=True)
    assert torch.equal(
        generate(model, prompt, 12, temperature=1e-30, generator=torch.Generator().manual_seed(5)), greedy
    )


def test_positive_infinite_logits_raise():
    with pytest.raises(ValueError, match=r"\+inf"):
        sample_from_logits(torch.tensor([[0.0, float("inf"), 1.0]]))
