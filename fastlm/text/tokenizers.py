"""Tokenizers: text <-> token ids, saved as JSON.

Five kinds, all behind one small API (:class:`Tokenizer`):

``char``
    Vocabulary = the sorted set of characters of the training text (ids in code-point order), plus
    one reserved end-of-document id right after them (``eos_id = number of characters``). Encoding a
    character the vocabulary lacks raises :class:`TokenizerError`. ``decode(encode(s)) == s`` for
    every ``s`` over the vocabulary; the EOS id decodes as ``"\\n\\n"`` (a blank line between
    documents), so generated text that crosses a document boundary stays readable.

``word``
    Words (``\\w+``), single punctuation characters (``[^\\w\\s]``) and single whitespace characters
    are the tokens, so no separator has to be invented at decode time. Specials come first:
    ``<bos>=0, <eos>=1, <unk>=2, <pad>=3``. Options: ``lowercase``; ``clean`` (on by default:
    ``\\r\\n`` and ``\\r`` become ``\\n``, any other whitespace character becomes a space); ``min_freq``;
    ``vocab_size`` (caps the vocabulary, most frequent tokens first). Words outside the vocabulary
    encode as ``<unk>``. Round trip: ``decode(encode(s)) == normalize(s)`` (``normalize`` = the
    cleaning and lowercasing above) whenever every token of ``normalize(s)`` is in the vocabulary;
    each unknown token decodes as the text ``"<unk>"``, ``<eos>`` as ``"\\n\\n"``, ``<bos>`` and
    ``<pad>`` as ``""``.

``bpe``
    Byte-level BPE trained on the corpus (default ``vocab_size`` 512 = 256 bytes + 255 merges + EOS)
    and executed by ``tiktoken.Encoding`` with GPT-2's pre-tokenisation regex. The ranks hold all
    256 single bytes, so ANY text round-trips exactly. ``<|endoftext|>`` is a special token (the
    last id, ``eos_id``); text is encoded with ``encode_ordinary``, so a literal ``<|endoftext|>``
    inside a text is ordinary characters. Training: the merge loop is C++ (``fastlm._C.bpe_train``)
    with a pure-Python fallback that gives identical merges (see :func:`bpe_train`).

``tiktoken:NAME`` / ``tiktoken:/path/to/file.tiktoken``
    A ready-made tiktoken encoding. Named encodings (gpt2, cl100k_base, ...) are used only when
    tiktoken's cache already holds their files (no download is attempted: this raises a
    :class:`TokenizerError` that says where to put the file; set ``FASTLM_TIKTOKEN_DOWNLOAD=1`` to let
    tiktoken download). A local ``.tiktoken`` file (``base64(token) rank`` lines) is run with GPT-2's
    regex and ``<|endoftext|>`` appended after the highest rank. The JSON stores the name, or the
    file's ranks inline (with its name and sha256), so a saved tokenizer needs no other file.

Untrusted files: ``tokenizer.json`` comes with run directories that users download and share, so
:func:`load_tokenizer` reads it as an attacker may have written it. Files are read only when they
are regular files under a size limit (checked before reading: ``/dev/zero`` or a FIFO is refused
unread); a tiktoken tokenizer may reference only a file beside its ``tokenizer.json``, by plain
name and with its sha256 (or carry the ranks inline); vocabulary sizes, merges and token lengths
are checked against the ``MAX_*`` limits below before anything large is built; ``pat_str`` must be
one of :data:`KNOWN_PAT_STRS`. Refusals are one-line :class:`TokenizerError` messages that name
the file and the problem and echo no content of other files.

``hf``
    A Hugging Face ``tokenizers`` tokenizer (a model imported with ``hf:DIR``, or a run fine-tuned
    from one), its ``tokenizer.json`` stored inline; needs the ``tokenizers`` package
    (``pip install 'fastlm[hf]'``). Encodes as ``AutoTokenizer`` does with ``add_special_tokens=False``.

Decoding of EOS: ``char`` and ``word`` give ``"\\n\\n"``; ``bpe`` and ``tiktoken`` give
``"<|endoftext|>"`` (tiktoken's convention). Encoding never produces EOS: the data pipeline inserts
``eos_id`` between documents.

Files are JSON (never pickle) written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import re
import tempfile
import threading
from typing import Any

import numpy as np

from fastlm.errors import TokenizerError
from fastlm.files.atomic import atomic_write_text
from fastlm.files.safeio import is_plain_file_name, read_bounded
from fastlm.ops import bpe_train

__all__ = [
    "TokenizerError",
    "Tokenizer",
    "CharTokenizer",
    "WordTokenizer",
    "BPETokenizer",
    "TiktokenTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "tokenizer_from_dict",
    "load_tokenizer",
    "bpe_train",
    "GPT2_PAT_STR",
    "KNOWN_PAT_STRS",
    "DEFAULT_BPE_VOCAB_SIZE",
]

FORMAT = "fastlm-tokenizer"
FORMAT_VERSION = 1

#: GPT-2's pre-tokenisation regex (tiktoken's r50k_base / gpt2 ``pat_str``).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: tiktoken's cl100k_base (GPT-3.5/4) and o200k_base (GPT-4o) pre-tokenisation regexes.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
#: The only pre-tokenisation regexes a bpe tokenizer may use. A pattern from a file is run by
#: tiktoken's Rust regex engine (fancy-regex, a backtracking engine for look-arounds), where a
#: crafted pattern can backtrack catastrophically on ordinary text; proving an arbitrary pattern
#: safe is not practical, so only these well-known, widely used ones are accepted (fastlm itself
#: writes only GPT2_PAT_STR). To use another, add it here.
KNOWN_PAT_STRS = (GPT2_PAT_STR, CL100K_PAT_STR, O200K_PAT_STR)
ENDOFTEXT = "<|endoftext|>"
DEFAULT_BPE_VOCAB_SIZE = 512

# Limits for files read from disk (generous for real tokenizers, bounded against hostile ones).
MAX_TOKENIZER_FILE_BYTES = 64 << 20  #: tokenizer.json (a 1M-id bpe with indent=1: ~30 MB)
MAX_TIKTOKEN_FILE_BYTES = 16 << 20  #: a .tiktoken file (o200k_base: 3.6 MB, 200k ranks)
MAX_VOCAB = 1 << 20  #: ids of any tokenizer (bpe, word, tiktoken ranks)
MAX_TOKEN_BYTES = 4096  #: longest bpe / tiktoken token (GPT-4o's longest: 128 bytes)
MAX_VOCAB_BYTES = 64 << 20  #: all bpe / tiktoken token bytes together
MAX_CHARS = 0x110000  #: every Unicode code point
_DOC_SEPARATOR = "\n\n"  # what char/word EOS decodes to


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _as_id_list(ids, vocab_size: int) -> list[int]:
    """ids: list/tuple of ints, or a 1-D tensor/array -> list[int], range-checked."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # torch.Tensor (any device)
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise TokenizerError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise TypeError(f"decode expects int ids, got {arr.dtype} values")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise TokenizerError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    return arr.tolist()


def _require(d: dict, key: str, kind: str):
    if key not in d:
        raise TokenizerError(f"{kind} tokenizer data is missing the field {key!r}")
    return d[key]


def _regex():
    try:
        import regex  # a dependency of tiktoken; needed for \p{L} in GPT-2's pattern
    except ImportError as e:  # pragma: no cover - tiktoken always brings it
        raise TokenizerError("the bpe tokenizer needs the 'regex' package (pip install regex)") from e
    return regex


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Base class. Subclasses set ``kind``, ``vocab_size`` and ``eos_id``."""

    kind: str = ""
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def _payload(self) -> dict:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """JSON-serialisable description; ``tokenizer_from_dict(t.to_dict())`` rebuilds ``t``."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, **self._payload()}

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as an int64 numpy array (char overrides it with a faster path)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def save(self, path) -> None:
        """Write the tokenizer as JSON, atomically (temp file + os.replace)."""
        d = self.to_dict()
        text = json.dumps(d, ensure_ascii=False, indent=1)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates in a vocabulary: escape them
            text = json.dumps(d, ensure_ascii=True, indent=1)
        atomic_write_text(path, text + "\n")

    def _check_text(self, text) -> str:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return text

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind!r} vocab_size={self.vocab_size} eos_id={self.eos_id}>"


# ---------------------------------------------------------------------------------------------
# char
# ---------------------------------------------------------------------------------------------


class CharTokenizer(Tokenizer):
    """One id per character (sorted by code point), plus EOS = len(chars), decoded as a blank line."""

    kind = "char"

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise TokenizerError("char tokenizer needs a non-empty training text")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"char vocabulary entries must be single characters, got {c!r}")
        if sorted(set(chars)) != chars:
            raise TokenizerError("char vocabulary must be sorted and without duplicates")
        self.chars = chars
        self.eos_id = len(chars)
        self.vocab_size = len(chars) + 1
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted: id = searchsorted
        self._itos = chars + [_DOC_SEPARATOR]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns an int64 numpy array (fast path for big corpora)."""
        text = self._check_text(text)
        if not text:
            return np.zeros(0, dtype=np.int64)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        idx = np.searchsorted(self._codes, codes)
        ok = self._codes[np.minimum(idx, len(self._codes) - 1)] == codes
        if not ok.all():
            unknown = sorted({chr(c) for c in codes[~ok].tolist()})
            shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise TokenizerError(
                f"{len(unknown)} character(s) not in the char vocabulary: {shown}; this tokenizer was "
                f"built on another corpus (rebuild it on text that contains them, or use bpe)"
            )
        return idx.astype(np.int64)

    def decode(self, ids) -> str:
        itos = self._itos
        return "".join([itos[i] for i in _as_id_list(ids, self.vocab_size)])

    def _payload(self) -> dict:
        return {"chars": "".join(self.chars), "eos_id": self.eos_id}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        chars = _require(d, "chars", "char")
        if not isinstance(chars, str):
            raise TokenizerError("char tokenizer field 'chars' must be a string")
        if len(chars) > MAX_CHARS:
            raise TokenizerError(
                f"char tokenizer has {len(chars)} characters, more than the {MAX_CHARS} Unicode code points"
            )
        tok = cls(list(chars))
        if d.get("eos_id", tok.eos_id) != tok.eos_id:
            raise TokenizerError(f"char tokenizer eos_id {d['eos_id']} does not match {tok.eos_id}")
        return tok


# ---------------------------------------------------------------------------------------------
# word
# ---------------------------------------------------------------------------------------------

_WORD_SPECIALS = ("<bos>", "<eos>", "<unk>", "<pad>")


class WordTokenizer(Tokenizer):
    """Words, single punctuation characters and single whitespace characters as tokens.

    Ids: ``<bos>=0 <eos>=1 <unk>=2 <pad>=3``, then the vocabulary by decreasing training frequency
    (ties alphabetical). See the module docstring for the exact round-trip guarantee.
    """

    kind = "word"
    _SPLIT = r"\w+|[^\w\s]|\s"

    def __init__(self, tokens, *, lowercase: bool = False, clean: bool = True):
        tokens = list(tokens)
        if list(tokens[: len(_WORD_SPECIALS)]) != list(_WORD_SPECIALS):
            raise TokenizerError(f"word vocabulary must start with the specials {list(_WORD_SPECIALS)}")
        if len(set(tokens)) != len(tokens):
            raise TokenizerError("word vocabulary has duplicate tokens")
        self.tokens = tokens
        self.lowercase = bool(lowercase)
        self.clean = bool(clean)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = 0, 1, 2, 3
        self.vocab_size = len(tokens)
        self._stoi = {t: i for i, t in enumerate(tokens)}
        self._itos = list(tokens)
        self._itos[self.bos_id] = ""
        self._itos[self.pad_id] = ""
        self._itos[self.eos_id] = _DOC_SEPARATOR
        # "<unk>" keeps its text so unknown words stay visible.
        self._split = re.compile(self._SPLIT).findall
        self._newlines = re.compile(r"\r\n?")
        self._other_space = re.compile(r"[^\S\n ]")

    def normalize(self, text: str) -> str:
        """The text that ``decode(encode(text))`` reproduces (when all its tokens are known)."""
        if self.clean:
            text = self._other_space.sub(" ", self._newlines.sub("\n", text))
        if self.lowercase:
            text = text.lower()
        return text

    def pieces(self, text: str) -> list[str]:
        """Split (normalised) text into word / punctuation / whitespace pieces."""
        return self._split(self.normalize(self._check_text(text)))

    @classmethod
    def train(
        cls, text: str, *, min_freq: int = 1, vocab_size: int | None = None, lowercase: bool = False, clean: bool = True
    ) -> "WordTokenizer":
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an int >= 1, got {min_freq!r}")
        if vocab_size is not None and vocab_size < len(_WORD_SPECIALS) + 1:
            raise ValueError(f"word vocab_size must be >= {len(_WORD_SPECIALS) + 1}, got {vocab_size}")
        proto = cls(_WORD_SPECIALS, lowercase=lowercase, clean=clean)
        counts = collections.Counter(proto.pieces(text))
        for s in _WORD_SPECIALS:
            counts.pop(s, None)  # cannot occur (the split breaks '<'), kept for safety
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - len(_WORD_SPECIALS)]
        if not ranked:
            raise TokenizerError(f"word tokenizer: no token occurs at least min_freq={min_freq} times")
        return cls(list(_WORD_SPECIALS) + ranked, lowercase=lowercase, clean=clean)

    def encode(self, text: str) -> list[int]:
        get, unk = self._stoi.get, self.unk_id
        return [get(p, unk) for p in self.pieces(text)]

    def decode(self, ids) -> str:
        itos = self._itos
        return "".join([itos[i] for i in _as_id_list(ids, self.vocab_size)])

    def _payload(self) -> dict:
        return {
            "tokens": self.tokens,
            "lowercase": self.lowercase,
            "clean": self.clean,
            "specials": {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        tokens = _require(d, "tokens", "word")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("word tokenizer field 'tokens' must be a list of strings")
        if len(tokens) > MAX_VOCAB:
            raise TokenizerError(f"word tokenizer has {len(tokens)} tokens; the limit is {MAX_VOCAB}")
        return cls(tokens, lowercase=bool(d.get("lowercase", False)), clean=bool(d.get("clean", True)))


# ---------------------------------------------------------------------------------------------
# BPE training (the merge loop is the op fastlm.ops.bpe_train: C++ or its Python reference)
# ---------------------------------------------------------------------------------------------


def _text_blocks(text: str, block_chars: int):
    """Cut ``text`` into blocks of about ``block_chars`` at places no pre-token spans.

    A cut goes right after a single newline that sits between two non-space characters
    (``x\ny`` -> ``x\n | y``): GPT-2's pattern never matches across it (only its whitespace
    alternatives take a newline, and they take whitespace only), and the block's final chunk,
    the lone ``\n``, is the same chunk with or without the text that follows.
    """
    safe_cut = _regex().compile(r"\S\n(?=\S)")
    start, n = 0, len(text)
    while n - start > block_chars:
        m = safe_cut.search(text, start + block_chars)
        if m is None:
            break
        yield text[start : m.end()]
        start = m.end()
    yield text[start:]


def _count_chunks(text: str, pat_str: str, block_chars: int = 1 << 20) -> tuple[list[bytes], list[int]]:
    """Distinct pre-tokenised chunks of ``text`` (UTF-8) and their counts, in sorted order.

    Blocks keep the memory at one block's chunk list plus the distinct chunks. The blocks are
    only safe for GPT-2-like patterns, so any other pattern is applied to the text as a whole.
    A chunk longer than MAX_TOKEN_BYTES (a 10k-character run of '=') is counted as pieces of at
    most that many bytes, so training never builds a token the loader would refuse.
    """
    pattern = _regex().compile(pat_str)
    counter: collections.Counter = collections.Counter()
    blocks = _text_blocks(text, block_chars) if pat_str == GPT2_PAT_STR else (text,)
    for block in blocks:
        counter.update(pattern.findall(block))
    counts: collections.Counter = collections.Counter()
    for chunk, n in counter.items():
        raw = chunk.encode("utf-8", "surrogatepass")
        for i in range(0, len(raw), MAX_TOKEN_BYTES):
            counts[raw[i : i + MAX_TOKEN_BYTES]] += n
    words = sorted(counts)  # deterministic input order (the result does not depend on it)
    return words, [counts[w] for w in words]


# ---------------------------------------------------------------------------------------------
# tiktoken-backed tokenizers
# ---------------------------------------------------------------------------------------------


class _TiktokenBase(Tokenizer):
    _enc: Any

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(self._check_text(text))

    def decode(self, ids) -> str:
        return self._enc.decode(_as_id_list(ids, self.vocab_size))

    @property
    def encoding(self):
        """The underlying ``tiktoken.Encoding``."""
        return self._enc


def _checked_merges(merges) -> list[tuple[int, int]]:
    """Validate bpe merges BEFORE any token is built: each merge is a pair of earlier ids, and the
    token lengths it implies (computed as numbers, not bytes) stay under MAX_TOKEN_BYTES each and
    MAX_VOCAB_BYTES together. Chained merges otherwise build tokens whose length grows with their
    index: 100k merges in 1 MB of JSON would allocate gigabytes."""
    if not isinstance(merges, (list, tuple)):
        raise TokenizerError("bpe merges must be a list of [left, right] pairs")
    if len(merges) > MAX_VOCAB - 257:
        raise TokenizerError(f"bpe tokenizer has {len(merges)} merges; the limit is {MAX_VOCAB - 257}")
    lengths = [1] * 256
    total = 256
    out = []
    for i, m in enumerate(merges):
        ok = isinstance(m, (list, tuple)) and len(m) == 2
        if not ok or not all(_is_plain_int(x) and 0 <= x < 256 + i for x in m):
            raise TokenizerError(f"bpe merge {i} is invalid: expected a pair of ids below {256 + i}")
        n = lengths[m[0]] + lengths[m[1]]
        if n > MAX_TOKEN_BYTES:
            raise TokenizerError(f"bpe merge {i} builds a token of {n} bytes; the limit is {MAX_TOKEN_BYTES}")
        total += n
        if total > MAX_VOCAB_BYTES:
            raise TokenizerError(f"bpe merges build more than {MAX_VOCAB_BYTES} bytes of tokens (at merge {i})")
        lengths.append(n)
        out.append((int(m[0]), int(m[1])))
    return out


def _is_plain_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_pat_str(pat_str) -> None:
    if pat_str not in KNOWN_PAT_STRS:
        shown = f"a {type(pat_str).__name__}" if not isinstance(pat_str, str) else f"a {len(pat_str)}-character pattern"
        raise TokenizerError(
            f"bpe pat_str is {shown} that is not one of the known pre-tokenisation "
            f"regexes (GPT-2, cl100k_base, o200k_base); only those are accepted "
            f"(see fastlm.text.tokenizers.KNOWN_PAT_STRS)"
        )


class BPETokenizer(_TiktokenBase):
    """Byte-level BPE trained here, executed by tiktoken. Ids: bytes 0..255, merges, then EOS."""

    kind = "bpe"

    def __init__(self, merges, *, pat_str: str = GPT2_PAT_STR):
        import tiktoken

        merges = _checked_merges(merges)
        _check_pat_str(pat_str)
        vocab: list[bytes] = [bytes([b]) for b in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
        ranks = {tok: i for i, tok in enumerate(vocab)}
        if len(ranks) != len(vocab):
            raise TokenizerError("bpe merges produce the same token twice")
        self.merges = merges
        self.pat_str = pat_str
        self.eos_id = len(vocab)
        self.vocab_size = len(vocab) + 1
        try:
            self._enc = tiktoken.Encoding(
                f"fastlm-bpe-{self.vocab_size}",
                pat_str=pat_str,
                mergeable_ranks=ranks,
                special_tokens={ENDOFTEXT: self.eos_id},
            )
        except Exception as e:
            raise TokenizerError(f"tiktoken rejected the bpe tokenizer: {e}") from e

    @classmethod
    def train(
        cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB_SIZE, *, pat_str: str = GPT2_PAT_STR, backend: str = "auto"
    ) -> "BPETokenizer":
        """Train to ``vocab_size`` ids in total (256 bytes + merges + EOS); fewer if the text runs
        out of pairs."""
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"bpe vocab_size must be an int >= 257 (256 bytes + EOS), got {vocab_size!r}")
        words, counts = _count_chunks(text, pat_str)
        merges = bpe_train(words, counts, vocab_size - 257, backend=backend)
        return cls(merges, pat_str=pat_str)

    def token_bytes(self, i: int) -> bytes:
        return self._enc.decode_single_token_bytes(i)

    def _payload(self) -> dict:
        return {
            "pat_str": self.pat_str,
            "merges": [list(m) for m in self.merges],
            "special_tokens": {ENDOFTEXT: self.eos_id},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        merges = _require(d, "merges", "bpe")
        if not isinstance(merges, list):
            raise TokenizerError("bpe tokenizer field 'merges' must be a list of [left, right] pairs")
        tok = cls(merges, pat_str=d.get("pat_str", GPT2_PAT_STR))
        specials = d.get("special_tokens", {ENDOFTEXT: tok.eos_id})
        if specials != {ENDOFTEXT: tok.eos_id}:
            raise TokenizerError(f"bpe special tokens {specials!r} do not match {{{ENDOFTEXT!r}: {tok.eos_id}}}")
        return tok


_TIKTOKEN_PATCH_LOCK = threading.Lock()


class _NotCached(Exception):
    pass


def _tiktoken_cache_dir() -> str:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _named_encoding(name: str):
    """``tiktoken.get_encoding(name)`` without network access (unless FASTLM_TIKTOKEN_DOWNLOAD=1).

    tiktoken reads every remote file through ``tiktoken.load.read_file`` (after looking in its cache,
    keyed by sha1 of the URL); for the duration of the call that function is swapped for one that
    refuses URLs, so a missing cache entry fails at once instead of trying the network.
    """
    import tiktoken
    import tiktoken.load as tl

    known = tiktoken.list_encoding_names()
    if name not in known:
        raise TokenizerError(
            f"unknown tiktoken encoding {name!r}; known: {', '.join(sorted(known))} "
            f"(or give a file: tiktoken:/path/to/file.tiktoken)"
        )
    if os.environ.get("FASTLM_TIKTOKEN_DOWNLOAD", "") == "1":
        return tiktoken.get_encoding(name)
    with _TIKTOKEN_PATCH_LOCK:
        original = tl.read_file

        def offline_read_file(blobpath: str) -> bytes:
            if "://" in blobpath:
                raise _NotCached(blobpath)
            return original(blobpath)

        tl.read_file = offline_read_file
        try:
            return tiktoken.get_encoding(name)
        except _NotCached as e:
            url = str(e)
            cache = _tiktoken_cache_dir() or "<TIKTOKEN_CACHE_DIR>"
            key = hashlib.sha1(url.encode()).hexdigest()
            raise TokenizerError(
                f"tiktoken encoding {name!r} is not available offline: no cached copy of {url}; "
                f"download it elsewhere and save it as {os.path.join(cache, key)} (TIKTOKEN_CACHE_DIR "
                f"sets the cache folder; the name is the sha1 of the URL, repeat for every file the "
                f"encoding needs), or use tiktoken:/path/to/file.tiktoken, or set "
                f"FASTLM_TIKTOKEN_DOWNLOAD=1 to let tiktoken download it"
            ) from None
        finally:
            tl.read_file = original


def _parse_tiktoken_ranks(data: bytes, label: str) -> dict[bytes, int]:
    """Parse ``.tiktoken`` bytes (``base64(token) rank`` per line) -> ranks, checked against the
    MAX_* limits. Errors name ``label`` and the line, never the line's content."""
    ranks: dict[bytes, int] = {}
    first_line: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        if len(ranks) >= MAX_VOCAB:
            raise TokenizerError(f"{label}: more than {MAX_VOCAB} ranks")
        try:
            tok_b64, rank = line.split()
            tok = base64.b64decode(tok_b64, validate=True)
            r = int(rank)
        except Exception:
            raise TokenizerError(f"{label}:{n}: expected 'base64_token rank'") from None
        if not 0 < len(tok) <= MAX_TOKEN_BYTES or not 0 <= r < MAX_VOCAB:
            raise TokenizerError(
                f"{label}:{n}: token of {len(tok)} bytes or rank {r} out of range "
                f"(1..{MAX_TOKEN_BYTES} bytes, ranks 0..{MAX_VOCAB - 1})"
            )
        if tok in ranks:
            raise TokenizerError(f"{label}:{n}: repeats the token of line {first_line[tok]}")
        ranks[tok] = r
        first_line[tok] = n
    if not ranks:
        raise TokenizerError(f"{label} holds no tokens")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{label} gives the same rank to two tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{label} lacks {len(missing)} of the 256 single bytes (first: {missing[0]}); byte-level BPE needs them all"
        )
    return ranks


def _read_tiktoken_file(path: str) -> bytes:
    """The bytes of a ``.tiktoken`` file: a regular file of at most MAX_TIKTOKEN_FILE_BYTES.

    Read directly rather than with ``tiktoken.load.load_tiktoken_bpe``: that one also copies local
    files into tiktoken's cache and would serve a stale cached copy after the file changes.
    """
    return read_bounded(path, MAX_TIKTOKEN_FILE_BYTES, "tiktoken file", TokenizerError)


def _check_sha256(data: bytes, expected, label: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and expected != digest:
        raise TokenizerError(
            f"{label} changed since the tokenizer was saved (sha256 {digest[:12]}..., expected {str(expected)[:12]}...)"
        )
    return digest


class TiktokenTokenizer(_TiktokenBase):
    """A ready-made tiktoken encoding: by name (offline cache only) or from a ``.tiktoken`` file.

    A file-based tokenizer keeps the file's bytes and saves them inline in its JSON (with the
    file's name and sha256), so the saved tokenizer depends on no other file.
    """

    kind = "tiktoken"

    def __init__(self, name: str | None = None, *, path: str | None = None, sha256: str | None = None):
        if (name is None) == (path is None):
            raise TokenizerError("tiktoken tokenizer needs exactly one of a name or a file path")
        self.name = name
        self.path = self.file_name = self.sha256 = self._ranks_data = None
        if path is None:
            self._set_encoding(_named_encoding(name))
        else:
            self.path = os.path.abspath(os.fspath(path))
            self._load_ranks(_read_tiktoken_file(self.path), self.path, sha256)

    @classmethod
    def from_ranks_data(
        cls, data: bytes, *, file_name: str, label: str, sha256: str | None = None
    ) -> "TiktokenTokenizer":
        """A file-based tokenizer from the file's bytes (``label`` names their origin in errors)."""
        tok = cls.__new__(cls)
        tok.name = tok.path = None
        tok._load_ranks(data, label, sha256, file_name)
        return tok

    def _load_ranks(self, data: bytes, label: str, sha256, file_name: str | None = None) -> None:
        import tiktoken

        self.sha256 = _check_sha256(data, sha256, label)
        ranks = _parse_tiktoken_ranks(data, label)
        self._ranks_data = data
        self.file_name = file_name or os.path.basename(label)
        eos = max(ranks.values()) + 1
        try:
            enc = tiktoken.Encoding(
                f"fastlm-file-{self.sha256[:12]}",
                pat_str=GPT2_PAT_STR,
                mergeable_ranks=ranks,
                special_tokens={ENDOFTEXT: eos},
            )
        except Exception as e:
            raise TokenizerError(f"tiktoken rejected {label}: {e}") from e
        self._set_encoding(enc)

    def _set_encoding(self, enc) -> None:
        self._enc = enc
        self.vocab_size = enc.n_vocab
        self.eos_id = enc.eot_token if ENDOFTEXT in enc.special_tokens_set else None

    def _payload(self) -> dict:
        if self._ranks_data is not None:
            return {"file_name": self.file_name, "sha256": self.sha256, "ranks": self._ranks_data.decode("ascii")}
        return {"name": self.name}

    @classmethod
    def from_dict(cls, d: dict, base_dir: str | None = None) -> "TiktokenTokenizer":
        """Rebuild from :meth:`to_dict` output: inline ``ranks``, a ``file`` beside the tokenizer
        JSON (``base_dir``; plain name and sha256 required), or a named encoding."""
        if d.get("ranks") is not None:
            return cls._from_inline(d)
        if d.get("file") is not None:
            return cls._from_sibling_file(d, base_dir)
        if d.get("path") is not None:
            raise TokenizerError(
                "tiktoken tokenizer names its file by a path; only files beside tokenizer.json are read "
                "(a shared run must not make fastlm read other files): copy the file there and replace "
                "'path' by 'file': '<its name>' with its 'sha256'"
            )
        return cls(_require(d, "name", "tiktoken"))

    @classmethod
    def _from_inline(cls, d: dict) -> "TiktokenTokenizer":
        text = d["ranks"]
        if not isinstance(text, str) or len(text) > MAX_TIKTOKEN_FILE_BYTES:
            raise TokenizerError(
                f"tiktoken field 'ranks' must be a string of at most {MAX_TIKTOKEN_FILE_BYTES} characters"
            )
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise TokenizerError("tiktoken field 'ranks' must be ASCII ('base64_token rank' lines)") from None
        name = d.get("file_name")
        name = name if is_plain_file_name(name) else "ranks"
        return cls.from_ranks_data(data, file_name=name, label="inline tiktoken ranks", sha256=d.get("sha256"))

    @classmethod
    def _from_sibling_file(cls, d: dict, base_dir: str | None) -> "TiktokenTokenizer":
        name, sha256 = d["file"], d.get("sha256")
        if not is_plain_file_name(name):
            raise TokenizerError(
                "tiktoken field 'file' must be the plain name of a file beside tokenizer.json "
                "(no folders, no absolute path)"
            )
        if base_dir is None:
            raise TokenizerError("a tiktoken tokenizer that names a file can only be loaded from its JSON file")
        if not isinstance(sha256, str):
            raise TokenizerError("tiktoken field 'file' needs the file's 'sha256'")
        path = os.path.join(base_dir, name)
        return cls.from_ranks_data(_read_tiktoken_file(path), file_name=name, label=path, sha256=sha256)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers (models imported with hf:DIR, and runs fine-tuned from them)
# ---------------------------------------------------------------------------------------------

MAX_HF_TOKENIZER_CHARS = 64 << 20  # run directories are untrusted: bound what is parsed


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (Hugging Face), its JSON stored inline in the run's tokenizer.json.

    ``encode`` adds no special tokens (``AutoTokenizer(text, add_special_tokens=False)``: the data
    pipeline puts ``eos_id`` between documents); ``decode`` keeps special tokens. ``vocab_size`` is
    the model's (it may exceed the tokenizer's own count: padded embedding tables).
    """

    kind = "hf"

    def __init__(self, tokenizer_json: str, *, vocab_size: int | None = None, eos_id: int | None = None):
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError("the hf tokenizer needs tokenizers: pip install 'fastlm[hf]'") from None
        if not isinstance(tokenizer_json, str) or len(tokenizer_json) > MAX_HF_TOKENIZER_CHARS:
            raise TokenizerError(f"hf tokenizer JSON must be a string of at most {MAX_HF_TOKENIZER_CHARS} characters")
        try:
            self._tok = _rust("reading it", tokenizers.Tokenizer.from_str, tokenizer_json)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"not a valid Hugging Face tokenizer: {str(e).splitlines()[0][:200]}") from None
        self.tokenizer_json = tokenizer_json
        own = self._tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = own if vocab_size is None else vocab_size
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < own:
            raise TokenizerError(f"hf tokenizer has {own} ids; vocab_size {vocab_size!r} cannot hold them")
        largest = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if largest >= self.vocab_size:  # ids may skip numbers: the count alone does not bound them
            raise TokenizerError(
                f"hf tokenizer has token id {largest}; the model's vocab_size {self.vocab_size} needs every id below it"
            )
        if eos_id is not None and (
            isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < self.vocab_size
        ):
            raise TokenizerError(f"hf tokenizer eos_id {eos_id!r} is not an id below {self.vocab_size}")
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return _rust("encoding", self._tok.encode, self._check_text(text), add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return _rust("decoding", self._tok.decode, _as_id_list(ids, self.vocab_size), skip_special_tokens=False)

    def _payload(self) -> dict:
        return {"tokenizer_json": self.tokenizer_json, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    @classmethod
    def from_dict(cls, d: dict) -> "HFTokenizer":
        return cls(_require(d, "tokenizer_json", "hf"), vocab_size=d.get("vocab_size"), eos_id=d.get("eos_id"))

    @classmethod
    def from_model_files(cls, read, vocab_size: int | None = None, eos_id=None) -> "HFTokenizer":
        """From a transformers model directory's files: ``tokenizer.json``, else ``vocab.json`` +
        ``merges.txt`` (byte-level BPE, GPT-2 style). ``read(name)`` returns a file's bytes (at most
        ``MAX_HF_TOKENIZER_CHARS``), or None when the folder has no such file; the caller decides
        which files may be read. ``eos_id``: the model config's ``eos_token_id`` (an int, or a list
        whose first entry is used)."""
        raw = read("tokenizer.json")
        try:
            text = raw.decode("utf-8") if raw is not None else _byte_level_bpe_json(read)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"tokenizer.json is not UTF-8 (byte offset {e.start})") from None
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        return cls(text, vocab_size=vocab_size, eos_id=eos_id)


def _rust(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` of the tokenizers library, whose Rust panics (a regex past Oniguruma's
    backtracking limit, ...) arrive as ``PanicException``, a BaseException: TokenizerError instead."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        message = (str(e).strip().splitlines() or ["a panic"])[0][:200]
        raise TokenizerError(f"the hf tokenizer failed while {what}: {message}") from None


def _byte_level_bpe_json(read) -> str:
    """GPT-2-style ``vocab.json`` + ``merges.txt`` -> tokenizers JSON (what AutoTokenizer builds)."""
    import tokenizers as tk

    vocab_raw, merges_raw = read("vocab.json"), read("merges.txt")
    if vocab_raw is None or merges_raw is None:
        raise TokenizerError("the model has no tokenizer.json (nor vocab.json + merges.txt)")
    try:
        vocab = json.loads(vocab_raw.decode("utf-8"))
        lines = merges_raw.decode("utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
            raise ValueError("vocab.json must map tokens to ids and each merges.txt line hold two tokens")
        tok = _rust("reading vocab.json + merges.txt", tk.Tokenizer, tk.models.BPE(vocab, merges))
    except TokenizerError:
        raise
    except Exception as e:  # JSON, UTF-8, the BPE model's own refusals
        raise TokenizerError(f"unreadable vocab.json / merges.txt: {str(e).splitlines()[0][:200]}") from None
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    if "<|endoftext|>" in tok.get_vocab():
        tok.add_special_tokens([tk.AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------


def _tiktoken_from_spec(arg: str) -> TiktokenTokenizer:
    if not arg:
        raise TokenizerError("tiktoken spec needs a name or a file: tiktoken:gpt2 or tiktoken:/path/x.tiktoken")
    if os.sep in arg or "/" in arg or arg.endswith(".tiktoken") or os.path.isfile(arg):
        return TiktokenTokenizer(path=arg)
    return TiktokenTokenizer(arg)


def build_tokenizer(
    spec: str, text: str, *, vocab_size: int | None = None, min_freq: int = 1, lowercase: bool = False
) -> Tokenizer:
    """Build a tokenizer from a spec: ``char`` | ``word`` | ``bpe`` | ``tiktoken:NAME_OR_FILE``.

    ``text`` is the training corpus (unused by ``tiktoken``). ``vocab_size``: total ids for ``bpe``
    (default 512), a cap for ``word``; ignored by ``char`` and ``tiktoken`` (their vocabulary is
    fixed by the text / file). ``min_freq`` and ``lowercase`` apply to ``word`` only.
    """
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer spec must be a str, got {type(spec).__name__}")
    if spec != "tiktoken" and not spec.startswith("tiktoken:") and not isinstance(text, str):
        raise TypeError(f"training text must be a str, got {type(text).__name__}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
        raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
    if spec == "char":
        return CharTokenizer.train(text)
    if spec == "word":
        return WordTokenizer.train(text, min_freq=min_freq, vocab_size=vocab_size, lowercase=lowercase)
    if spec == "bpe":
        if not text:
            raise TokenizerError("bpe tokenizer needs a non-empty training text")
        return BPETokenizer.train(text, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size)
    if spec.startswith("tiktoken:") or spec == "tiktoken":
        return _tiktoken_from_spec(spec.partition(":")[2])
    raise TokenizerError(f"unknown tokenizer spec {spec!r}; expected char, word, bpe or tiktoken:NAME")


_KINDS = {
    "char": CharTokenizer,
    "word": WordTokenizer,
    "bpe": BPETokenizer,
    "tiktoken": TiktokenTokenizer,
    "hf": HFTokenizer,
}


def tokenizer_from_dict(d: dict, base_dir: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output. ``base_dir``: the folder of the
    JSON file it came from (the only place a tiktoken tokenizer may name a file in)."""
    if not isinstance(d, dict):
        raise TokenizerError(f"tokenizer data must be a JSON object, got {type(d).__name__}")
    if d.get("format", FORMAT) != FORMAT:
        raise TokenizerError(f"not a fastlm tokenizer (format {d.get('format')!r}, expected {FORMAT!r})")
    version = d.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise TokenizerError(f"unsupported tokenizer format version {version!r} (this fastlm reads {FORMAT_VERSION})")
    kind = d.get("kind")
    if kind not in _KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(_KINDS)}")
    if kind == "tiktoken":
        return TiktokenTokenizer.from_dict(d, base_dir)
    return _KINDS[kind].from_dict(d)


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer saved with :meth:`Tokenizer.save` (an untrusted file: see the module docstring)."""
    path = os.fspath(path)
    raw = read_bounded(path, MAX_TOKENIZER_FILE_BYTES, "tokenizer file", TokenizerError)
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"tokenizer file {path} is not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise TokenizerError(f"tokenizer file {path} nests JSON too deeply") from None
    try:
        return tokenizer_from_dict(d, base_dir=os.path.dirname(os.path.abspath(path)))
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
