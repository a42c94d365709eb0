"""Byte-level BPE training in Python: the reference form of :func:`fastlm.ops.bpe_train` (the C++
twin is ``fastlm._C.bpe_train``, csrc/bpe.cpp; both give identical merges)."""

from __future__ import annotations

import collections
import heapq

__all__ = ["bpe_train"]


def _merge_word(s: list[int], a: int, b: int, token: int) -> list[int]:
    """``s`` with every non-overlapping ``(a, b)`` replaced by ``token``, left to right."""
    out, i, n = [], 0, len(s)
    while i < n:
        if i + 1 < n and s[i] == a and s[i + 1] == b:
            out.append(token)
            i += 2
        else:
            out.append(s[i])
            i += 1
    return out


def _apply_merge(syms, counts, candidates, a, b, token, pair_words, seen, step) -> dict:
    """Apply the merge ``(a, b) -> token`` to the chunks in ``candidates`` (each once per step) ->
    the change of every pair's count; new pairs holding ``token`` are indexed in ``pair_words``."""
    delta: dict[tuple[int, int], int] = collections.defaultdict(int)
    for w in candidates:
        if seen[w] == step:
            continue
        seen[w] = step
        s = syms[w]
        if not any(s[i] == a and s[i + 1] == b for i in range(len(s) - 1)):
            continue
        c = counts[w]
        for p in zip(s, s[1:]):
            delta[p] -= c
        out = syms[w] = _merge_word(s, a, b, token)
        for p in zip(out, out[1:]):
            delta[p] += c
            if p[0] == token or p[1] == token:
                pair_words[p].append(w)
    return delta


def bpe_train(words: list[bytes], counts: list[int], num_merges: int) -> list[tuple[int, int]]:
    """Pure-Python twin of ``fastlm._C.bpe_train`` (csrc/bpe.cpp): same rules, identical merges.

    Rules: ids 0..255 are bytes, each new token takes the next id; the chosen pair has the highest
    count, ties -> smallest ``(bytes(left), bytes(right))``; replacement is left to right without
    overlap; if ``bytes(left) + bytes(right)`` is already a token the pair is replaced by it and no
    merge is recorded; stop after ``num_merges`` new tokens or when no pair is left.
    """
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    ids: dict[bytes, int] = {v: i for i, v in enumerate(vocab)}
    syms: list[list[int]] = [list(w) for w in words]
    pair_count: dict[tuple[int, int], int] = collections.defaultdict(int)
    pair_words: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for w, (s, c) in enumerate(zip(syms, counts)):
        if c == 0:
            continue
        for p in zip(s, s[1:]):
            pair_count[p] += c
            pair_words[p].append(w)
    pair_count = dict(pair_count)
    # min-heap on (-count, bytes(left), bytes(right)); an entry is live while its count is current
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    seen = [-1] * len(syms)
    step = 0
    while len(merges) < num_merges:
        best = None
        while heap:
            negc, _, _, a, b = heapq.heappop(heap)
            if pair_count.get((a, b), 0) == -negc:
                best = (a, b)
                break
        if best is None:
            break
        a, b = best
        joined = vocab[a] + vocab[b]
        token = ids.get(joined)
        if token is None:
            token = len(vocab)
            vocab.append(joined)
            ids[joined] = token
            merges.append((a, b))
        delta = _apply_merge(syms, counts, pair_words.pop(best, []), a, b, token, pair_words, seen, step)
        for p, d in delta.items():
            if d == 0:
                continue
            now = pair_count.get(p, 0) + d
            if now <= 0:
                pair_count.pop(p, None)
                continue
            pair_count[p] = now
            heapq.heappush(heap, (-now, vocab[p[0]], vocab[p[1]], p[0], p[1]))
        step += 1
    return merges
