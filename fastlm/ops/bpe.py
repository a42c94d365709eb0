"""Byte-level BPE training as an op of :mod:`fastlm.ops`: :func:`bpe_train` (the merge loop of
:class:`fastlm.text.tokenizers.BPETokenizer`). Backends: ``cpp`` (``fastlm._C.bpe_train``,
csrc/bpe.cpp) and ``reference`` (:mod:`fastlm.ops.reference_bpe`); both give identical merges.
"""

from __future__ import annotations

from fastlm.ops.backend import resolve_backend

__all__ = ["bpe_train"]


def bpe_train(
    words: list[bytes], counts: list[int], num_merges: int, *, backend: str = "auto"
) -> list[tuple[int, int]]:
    """Learn ``num_merges`` byte-level BPE merges from distinct chunks and their counts.

    The rules are :func:`fastlm.ops.reference_bpe.bpe_train`'s (ids 0..255 are bytes, each new token
    takes the next id, the most frequent pair wins, ties go to the smallest bytes). ``backend``:
    ``auto`` (C++ when the extension has it), ``cpp``, ``reference`` (``python`` is accepted for it).
    """
    if len(words) != len(counts):
        raise ValueError(f"words and counts differ in length ({len(words)} vs {len(counts)})")
    if not isinstance(num_merges, int) or isinstance(num_merges, bool) or num_merges < 0:
        raise ValueError(f"num_merges must be an int >= 0, got {num_merges!r}")
    words = [bytes(w) for w in words]
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError("counts must be >= 0")
    backend = "reference" if backend == "python" else backend
    obj = resolve_backend("bpe_train", backend, "cpu", lambda b: b.bpe_train_unsupported())
    return [(int(a), int(b)) for a, b in obj.bpe_train(words, counts, num_merges)]
