"""Autoregressive sampling and beam search over a :class:`fastlm.model.GPT`.

Decoding follows gpt-fast's split: one *prefill* forward over the whole prompt fills a static
KV cache, then each *decode* step feeds only the newest token.

Sliding window (generating past the context)
    A model can only attend to ``model.max_context()`` (= ``block_size``) tokens. When the
    next decode step would overflow the cache, the window slides: the last
    ``keep = block_size - max(1, block_size // 4)`` tokens (at least 1) are kept, the cache is
    reset and those tokens are prefilled again at positions ``0 .. keep-1``; decoding then goes on.
    The re-prefill costs one forward over ``keep`` tokens every ``block_size - keep`` steps, so
    ``max_new_tokens`` may be any length. A prompt longer than the context is cropped to its last
    ``block_size`` tokens for the first prefill (the returned sequence still holds all of it).
    ``use_cache=False`` recomputes the very same window from scratch at every step, so both modes
    see identical contexts and produce the same tokens (up to float rounding of the logits).
    A model with a sliding attention window and relative positions (``model.unbounded``: RoPE,
    ALiBi or none) never slides: a query cannot see further back than its window, so any length
    is in distribution; its KV cache keeps the last ``window`` keys (constant memory) and the
    prompt is prefilled in chunks of ``window`` tokens.

Sampling order (as in Hugging Face's logits processors): ``logits / temperature`` -> top-k ->
top-p (nucleus) on the renormalised top-k distribution -> one draw by inverse CDF from
``torch.rand(generator=...)``. One uniform number per row and step is consumed whatever the
logits, so a seeded generator gives the same tokens with and without the cache.

Temperature is safe for any finite value > 0: the division runs in float64 on logits shifted so
that each row's maximum is 0 (``(logits - max) / temperature``, the same distribution), so no
value can overflow to ``inf`` and make NaN probabilities. A tiny temperature sends every other
logit to ``-inf``, which is greedy decoding (ties at the maximum share the probability).

Empty prompt: a model needs at least one token to condition on. ``generate`` then starts from
``eos_id`` (used as a beginning-of-text token, the GPT-2 convention) and leaves it out of the
result; without ``eos_id`` it raises ValueError.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["generate", "beam_search", "filter_logits", "sample_from_logits", "window_keep"]


# --------------------------------------------------------------------------------------------
# validation helpers


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_common(max_new_tokens, eos_id, vocab_size: Optional[int]):
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if eos_id is not None:
        if not _is_int(eos_id):
            raise TypeError(f"eos_id must be an integer or None, got {eos_id!r}")
        if eos_id < 0 or (vocab_size is not None and eos_id >= vocab_size):
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")


def _check_sampling(temperature, top_k, top_p, greedy):
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be true or false, got {greedy!r}")
    if not greedy:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0 (use greedy for argmax), got {temperature}")
    if top_k is not None:
        if not _is_int(top_k):
            raise TypeError(f"top_k must be an integer or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a number or None, got {top_p!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _check_prompt(prompt_ids, batch_one: bool = False) -> Tensor:
    if not isinstance(prompt_ids, Tensor):
        raise TypeError(f"prompt_ids must be a torch.Tensor, got {type(prompt_ids).__name__}")
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must have shape (B, T), got {tuple(prompt_ids.shape)}")
    if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
        raise TypeError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if prompt_ids.shape[0] < 1:
        raise ValueError("prompt_ids has batch size 0")
    if batch_one and prompt_ids.shape[0] != 1:
        raise ValueError(f"beam_search takes one prompt of shape (1, T), got batch size {prompt_ids.shape[0]}")
    return prompt_ids.long()


def _vocab_size(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)


def _check_ids_in_vocab(ids: Tensor, vocab_size: Optional[int]):
    if ids.numel() and vocab_size is not None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab_size})")


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model):
    """Run in eval mode (dropout off) without grads, then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def window_keep(block_size: int) -> int:
    """How many trailing tokens survive a slide of the context window (see the module docstring)."""
    return max(1, block_size - max(1, block_size // 4))


# --------------------------------------------------------------------------------------------
# logits processing and sampling


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Mask (set to ``-inf``) the tokens that top-k and then top-p remove; ``logits`` is ``(..., V)``.

    top-k keeps the k largest logits (ties at the k-th value are broken by ``torch.topk``'s order,
    so exactly ``min(k, V)`` tokens survive). top-p keeps, over the distribution renormalised after
    top-k, the smallest prefix of tokens sorted by probability whose mass is >= ``top_p``; the most
    likely token always survives. Returns a new tensor.
    """
    _check_sampling(1.0, top_k, top_p, False)
    out = logits.clone()
    V = out.shape[-1]
    if top_k is not None and top_k < V:
        idx = torch.topk(out, top_k, dim=-1).indices
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # already reached p without this token
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_from_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    greedy: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """One token per row of ``logits`` ``(B, V)`` -> ``(B,)`` long.

    greedy takes the argmax (temperature/top-k/top-p are then irrelevant). Otherwise the draw is an
    inverse-CDF lookup of one ``torch.rand`` number per row, which never returns a token whose
    filtered probability is zero.
    """
    logits = _at_least_fp32(logits)
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    if bool(bad.any()):
        raise ValueError(
            "the model produced NaN, +inf (or all -inf) logits; cannot sample "
            "(a diverged or corrupted checkpoint, or fp16 overflow?)"
        )
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.double()
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature  # <= 0, max exactly 0: no overflow
    probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)  # (B, V) float64
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    x = u * cdf[:, -1:]
    idx = (cdf <= x).sum(-1)  # first token whose cdf exceeds x: it has probability > 0
    # rounding can push x onto the total mass: fall back to the last token with probability > 0
    V = probs.shape[-1]
    last_nonzero = V - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last_nonzero)


# --------------------------------------------------------------------------------------------
# sampling


class _Decoder:
    """Feeds a growing sequence to the model and returns next-token logits, sliding the window
    (a model whose attention window makes any length valid, ``model.unbounded``, never slides: its
    KV cache keeps the last ``window`` positions and the positions run on)."""

    def __init__(self, model, batch_size: int, use_cache: bool, total_len: int):
        self.model = model
        self.unbounded = bool(getattr(model, "unbounded", False))
        self.block = int(model.max_context())
        self.keep = window_keep(self.block)
        # the cache never holds more than the window, nor more than the whole sequence to be
        # (a short generation with a long-context model allocates only what it uses)
        size = total_len if self.unbounded else min(self.block, total_len)
        self.cache = model.new_kv_cache(batch_size, size) if use_cache else None
        self.start = 0  # index in the full sequence of the window's first token

    def _forward(self, ids: Tensor, cache) -> Tensor:
        logits, _ = self.model(ids, kv_cache=cache, last_only=True)
        return _at_least_fp32(logits[:, -1, :])

    def prefill(self, seq: Tensor) -> Tensor:
        self.start = 0 if self.unbounded else max(0, seq.shape[1] - self.block)
        return self._refeed(seq)

    def _refeed(self, seq: Tensor) -> Tensor:
        if self.cache is None:
            return self._forward(seq[:, self.start :], None)
        self.cache.reset()
        chunk = self.model.config.window if self.unbounded else seq.shape[1]  # what fits the cache at once
        for begin in range(self.start, seq.shape[1], chunk):
            logits = self._forward(seq[:, begin : begin + chunk], self.cache)
        return logits

    def step(self, seq: Tensor) -> Tensor:
        """``seq`` gained one token since the last call: logits for the token after it."""
        n = seq.shape[1]
        if not self.unbounded and n - self.start > self.block:  # the window is full: slide it, prefill again
            self.start = n - self.keep
            return self._refeed(seq)
        if self.cache is None:
            return self._forward(seq[:, self.start :], None)
        return self._forward(seq[:, -1:], self.cache)

    def reorder(self, index: Tensor):
        if self.cache is not None:
            self.cache.reorder(index)


def generate(
    model,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    greedy: bool = False,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    stream: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """Continue each row of ``prompt_ids`` ``(B, T)`` by up to ``max_new_tokens`` tokens.

    Returns ``(B, T + n)`` long on the model's device, ``n <= max_new_tokens``: with ``eos_id``, a
    row that emits ``eos_id`` is finished, its later positions are filled with ``eos_id``, and
    generation stops early once every row has finished. ``stream(tokens)`` is called after each
    step with that step's new tokens ``(B,)`` (finished rows report ``eos_id``). See the module
    docstring for the sliding window past ``model.max_context()`` and the empty-prompt rule.
    The model runs in eval mode under ``torch.inference_mode`` (its mode is restored afterwards).
    """
    _check_sampling(temperature, top_k, top_p, greedy)
    vocab = _vocab_size(model)
    _check_common(max_new_tokens, eos_id, vocab)
    prompt_ids = _check_prompt(prompt_ids)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be true or false, got {use_cache!r}")
    if stream is not None and not callable(stream):
        raise TypeError("stream must be a callable taking a (B,) tensor of token ids")
    _check_ids_in_vocab(prompt_ids, vocab)
    device = _model_device(model)
    prompt_ids = prompt_ids.to(device)
    B, T = prompt_ids.shape
    drop_start = 0
    if T == 0:
        if eos_id is None:
            raise ValueError(
                "empty prompt: the model needs at least one token; give a prompt or an eos_id to start from"
            )
        prompt_ids = torch.full((B, 1), eos_id, dtype=torch.long, device=device)
        drop_start = 1
    if max_new_tokens == 0:
        return prompt_ids[:, drop_start:].clone()

    with _eval_mode(model):
        seq = prompt_ids
        dec = _Decoder(model, B, use_cache, seq.shape[1] + max_new_tokens)
        logits = dec.prefill(seq)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            nxt = sample_from_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator
            )
            if eos_id is not None:
                nxt = nxt.masked_fill(finished, eos_id)
                finished = finished | (nxt == eos_id)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if stream is not None:
                stream(nxt)
            if i + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            logits = dec.step(seq)
    return seq[:, drop_start:]


# --------------------------------------------------------------------------------------------
# beam search


def _check_beam_args(beam_size, length_penalty) -> None:
    if not _is_int(beam_size):
        raise TypeError(f"beam_size must be an integer, got {beam_size!r}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, (int, float))
        or not math.isfinite(length_penalty)
    ):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")


def _expand_beams(
    seq: Tensor,
    sums: Tensor,
    logits: Tensor,
    beam_size: int,
    eos_id: Optional[int],
    score,
    finished: list,
    drop_start: int,
):
    """One beam-search step: expand every live beam ``seq`` ``(K, T)`` (log-prob sums ``sums``) over
    the vocabulary, set aside the eos-ending candidates among the best ``2 * beam_size`` in
    ``finished`` (scored with ``score(total)``), keep the best ``beam_size`` others.
    Returns ``(rows kept, new seq, new sums)``, or None when no live beam is left."""
    logp = F.log_softmax(logits.double(), dim=-1)  # (K, V)
    V = logp.shape[-1]
    cand = (sums[:, None] + logp).view(-1)
    n_take = min(cand.numel(), 2 * beam_size)  # enough to keep beam_size unfinished ones
    top_vals, top_idx = torch.topk(cand, n_take)
    new_rows, new_tokens, new_sums = [], [], []
    for val, flat in zip(top_vals.tolist(), top_idx.tolist()):
        row, tok = divmod(flat, V)
        if val == float("-inf"):
            break
        if eos_id is not None and tok == eos_id:
            ids = torch.cat([seq[row], seq.new_tensor([tok])])
            finished.append((ids[drop_start:], score(val)))
        elif len(new_rows) < beam_size:
            new_rows.append(row)
            new_tokens.append(tok)
            new_sums.append(val)
    if not new_rows:
        return None
    index = torch.tensor(new_rows, dtype=torch.long, device=seq.device)
    seq = torch.cat(
        [seq.index_select(0, index), torch.tensor(new_tokens, dtype=torch.long, device=seq.device)[:, None]], dim=1
    )
    return index, seq, torch.tensor(new_sums, dtype=torch.float64, device=seq.device)


def beam_search(
    model,
    prompt_ids: Tensor,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 1.0,
    eos_id: Optional[int] = None,
) -> List[Tuple[Tensor, float]]:
    """Beam search from one prompt ``(1, T)``; returns up to ``beam_size`` ``(ids, score)`` pairs,
    best first, ``ids`` being the 1-D prompt + continuation.

    score = (sum of the continuation's token log-probabilities) / ``L ** length_penalty``, L the
    number of generated tokens (the eos included). ``length_penalty`` 0 ranks by total log-prob;
    larger values favour longer hypotheses. A hypothesis ends when it emits ``eos_id`` or reaches
    ``max_new_tokens``. Every step expands each live beam over the whole vocabulary and keeps the
    best ``beam_size`` unfinished candidates among the top ``2 * beam_size`` (the eos-ending ones
    among those are set aside as finished); the search stops early
    only when no live beam can still beat the ``beam_size``-th finished hypothesis (an exact
    bound: a sum of log-probs never grows). The KV cache follows the beams with
    ``cache.reorder``; past the context the window slides as in :func:`generate`.
    """
    _check_beam_args(beam_size, length_penalty)
    vocab = _vocab_size(model)
    _check_common(max_new_tokens, eos_id, vocab)
    prompt_ids = _check_prompt(prompt_ids, batch_one=True)
    _check_ids_in_vocab(prompt_ids, vocab)
    device = _model_device(model)
    prompt_ids = prompt_ids.to(device)
    drop_start = 0
    if prompt_ids.shape[1] == 0:
        if eos_id is None:
            raise ValueError(
                "empty prompt: the model needs at least one token; give a prompt or an eos_id to start from"
            )
        prompt_ids = torch.full((1, 1), eos_id, dtype=torch.long, device=device)
        drop_start = 1
    if max_new_tokens == 0:
        return [(prompt_ids[0, drop_start:].clone(), 0.0)]

    def norm(total: float, length: int) -> float:
        return total / (length**length_penalty)

    finished: List[Tuple[Tensor, float]] = []
    with _eval_mode(model):
        seq = prompt_ids  # (K_alive, T + step)
        sums = torch.zeros(1, dtype=torch.float64, device=device)  # (K_alive,)
        dec = _Decoder(model, 1, True, seq.shape[1] + max_new_tokens)
        logits = dec.prefill(seq)
        for step in range(1, max_new_tokens + 1):
            expanded = _expand_beams(
                seq, sums, logits, beam_size, eos_id, lambda total: norm(total, step), finished, drop_start
            )
            if expanded is None:
                break
            index, seq, sums = expanded
            if step == max_new_tokens:
                for r in range(seq.shape[0]):
                    finished.append((seq[r, drop_start:].clone(), norm(float(sums[r]), step)))
                break
            if len(finished) >= beam_size:
                worst_kept = sorted(s for _, s in finished)[-beam_size]
                # the best any live beam can still reach: sums only fall, so the bound is its sum
                # over the most favourable length in [step, max_new_tokens]
                best_len = max_new_tokens if length_penalty >= 0 else step
                if norm(float(sums.max()), best_len) <= worst_kept:
                    break
            dec.reorder(index)
            logits = dec.step(seq)
    finished.sort(key=lambda item: item[1], reverse=True)
    return finished[:beam_size]
