"""Tokenizers: round trips (hypothesis), JSON save/load, error messages, C++ vs Python BPE merges."""

import base64
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm.text import data
from fastlm.text import tokenizers as T
from fastlm.text.tokenizers import (
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

SHAKESPEARE = data.default_corpus()
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cpp_trainer():
    try:
        from fastlm import _C
    except ImportError as e:
        return None, f"fastlm._C not importable ({e})"
    if not hasattr(_C, "bpe_train"):
        return None, "fastlm._C has no bpe_train"
    return _C.bpe_train, ""


needs_cpp = pytest.mark.skipif(_cpp_trainer()[0] is None, reason=_cpp_trainer()[1] or "C++ BPE available")


@pytest.fixture(scope="module")
def shakespeare():
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_tok(shakespeare):
    return build_tokenizer("char", shakespeare)


@pytest.fixture(scope="module")
def word_tok(shakespeare):
    return build_tokenizer("word", shakespeare[:200_000], min_freq=2)


@pytest.fixture(scope="module")
def bpe_tok(shakespeare):
    return build_tokenizer("bpe", shakespeare[:100_000], vocab_size=400)


def _tiny_tiktoken_file(path, merges=(b"ab", b"abc", b" a")):
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    lines += [base64.b64encode(m) + b" %d" % (256 + i) for i, m in enumerate(merges)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ------------------------------------------------------------------------------------- char


def test_char_vocab_sorted_with_eos(char_tok, shakespeare):
    assert char_tok.kind == "char"
    assert char_tok.chars == sorted(set(shakespeare))
    assert char_tok.eos_id == len(char_tok.chars) == 65
    assert char_tok.vocab_size == 66
    assert char_tok.encode("\n") == [0]  # '\n' has the smallest code point
    assert char_tok.decode([char_tok.eos_id]) == "\n\n"


@HYP
@given(data=st.data())
def test_char_roundtrip_any_text_over_alphabet(char_tok, data):
    text = data.draw(st.text(alphabet="".join(char_tok.chars), max_size=300))
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < char_tok.eos_id for i in ids)
    assert char_tok.decode(ids) == text


def test_char_unknown_characters_error(char_tok):
    with pytest.raises(TokenizerError) as ei:
        char_tok.encode("abc é\t€ é")
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "\n" not in msg
    assert "'é'" in msg and "'€'" in msg and "'\\t'" in msg
    assert "another corpus" in msg
    assert msg.startswith("3 character(s)")


def test_char_encode_whole_corpus(char_tok, shakespeare):
    ids = char_tok.encode_array(shakespeare)
    assert ids.dtype == np.int64 and len(ids) == len(shakespeare)
    assert ids[:2000].tolist() == [char_tok.chars.index(c) for c in shakespeare[:2000]]
    assert char_tok.decode(ids) == shakespeare


# ------------------------------------------------------------------------------------- word


def test_word_specials_and_unk(word_tok):
    assert word_tok.tokens[:4] == ["<bos>", "<eos>", "<unk>", "<pad>"]
    assert (word_tok.bos_id, word_tok.eos_id, word_tok.unk_id, word_tok.pad_id) == (0, 1, 2, 3)
    ids = word_tok.encode("the king zorblaxian.")
    assert ids.count(word_tok.unk_id) == 1
    assert word_tok.decode(ids) == "the king <unk>."
    # the literal text "<unk>" is not the special token: '<' and '>' are punctuation
    lit = build_tokenizer("word", "a <unk> b <eos>")
    assert lit.encode("<unk>") == [lit.tokens.index(t) for t in ("<", "unk", ">")]
    assert word_tok.decode([0, 3, 1]) == "\n\n"


def test_word_min_freq_vocab_size_lowercase_clean():
    text = "The cat saw the cat.\r\nThe\tDOG ran!"
    tok = build_tokenizer("word", text, min_freq=2)
    assert set(tok.tokens[4:]) == {"The", "cat", " "}  # each seen >= 2 times; ' ' many times
    low = build_tokenizer("word", text, lowercase=True)
    assert "the" in low.tokens and "The" not in low.tokens and "dog" in low.tokens
    assert low.decode(low.encode(text)) == "the cat saw the cat.\nthe dog ran!"
    capped = build_tokenizer("word", text, vocab_size=6)
    assert capped.vocab_size == 6
    assert capped.tokens[4:] == [" ", "The"]  # most frequent first, ties alphabetical
    with pytest.raises(ValueError, match="min_freq"):
        build_tokenizer("word", text, min_freq=0)


@HYP
@given(data=st.data())
def test_word_roundtrip_documented(word_tok, data):
    # Texts from vocabulary tokens round-trip exactly (after cleaning); anything else round-trips
    # with every out-of-vocabulary piece shown as "<unk>".
    known = data.draw(st.lists(st.sampled_from(word_tok.tokens[4:]), max_size=40))
    text = " ".join(known)  # separated, so that e.g. two words do not fuse into one piece
    ids = word_tok.encode(text)
    space = word_tok.tokens.index(" ")
    assert ids == [i for t in known for i in (space, word_tok.tokens.index(t))][1:]
    assert word_tok.decode(ids) == text
    other = data.draw(st.text(max_size=60))
    vocab = set(word_tok.tokens)
    pieces = re.findall(r"\w+|[^\w\s]|\s", word_tok.normalize(other))
    expected = "".join(p if p in vocab else "<unk>" for p in pieces)
    assert word_tok.decode(word_tok.encode(other)) == expected


def test_word_clean_normalises_whitespace(word_tok):
    assert word_tok.normalize("a\r\nb\rc\td\u00a0e") == "a\nb\nc d e"


# -------------------------------------------------------------------------------------- bpe


def test_bpe_has_all_bytes_and_eos(bpe_tok):
    assert bpe_tok.kind == "bpe"
    assert bpe_tok.vocab_size == 400
    assert bpe_tok.eos_id == 399
    ranks = bpe_tok.encoding._mergeable_ranks
    assert len(ranks) == 399
    for b in range(256):
        assert ranks[bytes([b])] == b
    assert len(bpe_tok.merges) == 399 - 256
    assert bpe_tok.decode([bpe_tok.eos_id]) == "<|endoftext|>"


@HYP
@given(text=st.text(max_size=200))
def test_bpe_roundtrip_any_unicode(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert all(0 <= i < bpe_tok.eos_id for i in ids)
    assert bpe_tok.decode(ids) == text


def test_bpe_endoftext_literal_is_ordinary_text(bpe_tok, shakespeare):
    text = "First Citizen:<|endoftext|>\nBefore we proceed <|endoftext|>"
    ids = bpe_tok.encode(text)
    assert bpe_tok.eos_id not in ids
    assert bpe_tok.decode(ids) == text
    # a training text containing the literal trains fine too
    tok = build_tokenizer("bpe", shakespeare[:20_000] + "<|endoftext|>" * 50, vocab_size=300)
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.decode(ids) == text


def test_bpe_compresses_and_trains_4k_on_shakespeare(shakespeare):
    # correctness only: wall-clock limits flake on a loaded machine (the benchmarks measure speed)
    tok = build_tokenizer("bpe", shakespeare, vocab_size=4096)
    ids = tok.encode(shakespeare)
    assert tok.vocab_size == 4096 and len(tok.merges) == 4096 - 257
    assert len(shakespeare) / len(ids) > 3.0  # ~3.24 chars per token at 4k
    assert tok.decode(ids) == shakespeare


def test_bpe_vocab_size_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", "some text", vocab_size=256)
    tok = build_tokenizer("bpe", "ab ab", vocab_size=257)  # no merges: bytes + EOS
    assert tok.vocab_size == 257 and tok.decode(tok.encode("hé!")) == "hé!"
    small = build_tokenizer("bpe", "abab", vocab_size=1000)  # runs out of pairs: fewer merges
    assert small.vocab_size == 257 + len(small.merges) < 1000


# ------------------------------------------------------------------- BPE trainer (C++ / Python)

HAND_WORDS = [b"aaabdaaabac"]
# aa:4 -> 256; then (256,'a'):2 ties ('a','b'):2 and b"a" < b"aa" -> ('a','b')=257; (256,257)=258;
# all counts 1: ('a','c') has the smallest bytes -> 259; (258,259) (b"aaab",b"ac" < b"aaab",b"d");
# (258,'d')=261; (261,260)=262; then no pair is left.
HAND_MERGES = [(97, 97), (97, 98), (256, 257), (97, 99), (258, 259), (258, 100), (261, 260)]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_bpe_train_tie_breaking_by_hand(backend):
    assert T.bpe_train(HAND_WORDS, [1], 10, backend=backend) == HAND_MERGES
    assert T.bpe_train(HAND_WORDS, [1], 3, backend=backend) == HAND_MERGES[:3]
    # counts weight the chunks: 'cd' x5 beats 'ab' x1; zero-count chunks are ignored
    assert T.bpe_train([b"ab", b"cd", b"ef"], [1, 5, 0], 5, backend=backend) == [(99, 100), (97, 98)]
    assert T.bpe_train([], [], 5, backend=backend) == []


@needs_cpp
@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.integers(0, 20)), max_size=25),
    num_merges=st.integers(0, 60),
    small_alphabet=st.booleans(),
)
def test_bpe_train_cpp_equals_python_random(chunks, num_merges, small_alphabet):
    words = [bytes(b % 3 + 97 for b in w) if small_alphabet else w for w, _ in chunks]
    counts = [c for _, c in chunks]
    py = T.bpe_train(words, counts, num_merges, backend="python")
    cc = T.bpe_train(words, counts, num_merges, backend="cpp")
    assert cc == py


@needs_cpp
def test_bpe_train_cpp_equals_python_shakespeare(shakespeare):
    words, counts = T._count_chunks(shakespeare[:300_000], T.GPT2_PAT_STR)
    py = T.bpe_train(words, counts, 1500, backend="python")
    cc = T.bpe_train(words, counts, 1500, backend="cpp")
    assert len(py) == 1500
    assert cc == py


@HYP
@given(
    text=st.lists(st.sampled_from(list("ab1 \n\t'.é") + ["\r\n", "'s"]), max_size=200).map("".join),
    block_chars=st.integers(1, 40),
)
def test_chunk_counting_in_blocks_matches_whole_text(text, block_chars):
    whole = {}
    for chunk in regex.findall(T.GPT2_PAT_STR, text):
        whole[chunk.encode()] = whole.get(chunk.encode(), 0) + 1
    words, counts = T._count_chunks(text, T.GPT2_PAT_STR, block_chars=block_chars)
    assert dict(zip(words, counts)) == whole
    assert "".join(T._text_blocks(text, block_chars)) == text


def test_bpe_train_input_validation():
    with pytest.raises(ValueError, match="differ in length"):
        T.bpe_train([b"ab"], [1, 2], 3)
    with pytest.raises(ValueError, match="num_merges"):
        T.bpe_train([b"ab"], [1], -1)
    with pytest.raises(ValueError, match="backend"):
        T.bpe_train([b"ab"], [1], 1, backend="rust")


# ------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["char", "word", "bpe", "tiktoken-file"])
def test_save_load_json_roundtrip(kind, tmp_path, shakespeare):
    text = shakespeare[:30_000]
    if kind == "tiktoken-file":
        tok = build_tokenizer(f"tiktoken:{_tiny_tiktoken_file(tmp_path / 'tiny.tiktoken')}", text)
    else:
        tok = build_tokenizer(kind, text, vocab_size=300 if kind == "bpe" else None)
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    d = json.loads(path.read_text(encoding="utf-8"))  # plain JSON
    assert d["kind"] == tok.kind and d == tok.to_dict()
    assert json.loads(json.dumps(tok.to_dict())) == tok.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left behind
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.to_dict() == tok.to_dict()
    assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)
    sample = text[1000:3000]
    assert loaded.encode(sample) == tok.encode(sample)
    assert tokenizer_from_dict(tok.to_dict()).encode(sample) == tok.encode(sample)
    tok.save(path)  # overwriting is atomic too
    assert load_tokenizer(path).to_dict() == tok.to_dict()


def test_save_lone_surrogates_and_non_ascii(tmp_path):
    tok = build_tokenizer("char", "ab\ud800€漢")
    tok.save(tmp_path / "t.json")
    loaded = load_tokenizer(tmp_path / "t.json")
    assert loaded.chars == tok.chars and loaded.decode(loaded.encode("€\ud800b")) == "€\ud800b"
    tok = build_tokenizer("char", "b€漢")
    tok.save(tmp_path / "u.json")
    assert "漢" in (tmp_path / "u.json").read_text(encoding="utf-8")  # readable, not \u-escaped


def test_encode_array_matches_encode(char_tok, bpe_tok, word_tok):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    for tok in (char_tok, bpe_tok, word_tok):
        arr = tok.encode_array(text)
        assert arr.dtype == np.int64 and arr.tolist() == tok.encode(text)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "char", "chars": "ab', encoding="utf-8")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(bad)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError):
        load_tokenizer(bad)
    bad.write_text('{"kind": "sentencepiece"}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(bad)
    bad.write_text('{"kind": "bpe"}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="missing the field 'merges'"):
        load_tokenizer(bad)
    bad.write_text('{"kind": "bpe", "merges": [[97, 300]]}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="merge 0 is invalid"):
        load_tokenizer(bad)
    bad.write_text('{"format": "hf-tokenizers", "kind": "bpe"}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a fastlm tokenizer"):
        load_tokenizer(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="JSON object"):
        load_tokenizer(bad)


def test_unknown_spec_and_decode_validation(char_tok):
    with pytest.raises(TokenizerError, match="unknown tokenizer spec 'sentencepiece'"):
        build_tokenizer("sentencepiece", "abc")
    with pytest.raises(TokenizerError, match="out of range"):
        char_tok.decode([0, char_tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        char_tok.decode([-1])
    with pytest.raises(TokenizerError, match="1-D"):
        char_tok.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        char_tok.decode([1.5])
    with pytest.raises(TypeError):
        char_tok.encode(b"bytes")
    import torch

    assert char_tok.decode(torch.tensor(char_tok.encode("To be"))) == "To be"


# ---------------------------------------------------------------------------------- tiktoken


def test_tiktoken_named_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    monkeypatch.delenv("FASTLM_TIKTOKEN_DOWNLOAD", raising=False)

    def no_network(*args, **kwargs):  # any connection attempt (the slow path) fails the test
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(TokenizerError) as ei:
        build_tokenizer("tiktoken:gpt2", "")
    msg = str(ei.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "gpt2" in msg and str(tmp_path) in msg
    assert "tiktoken:/path/to/file.tiktoken" in msg and "\n" not in msg
    import tiktoken.load

    assert tiktoken.load.read_file.__name__ == "read_file"  # the offline guard is undone
    with pytest.raises(TokenizerError, match="unknown tiktoken encoding 'gpt9'"):
        build_tokenizer("tiktoken:gpt9", "")


def test_tiktoken_cache_dir_default_is_tiktokens_own(monkeypatch):
    """Without TIKTOKEN_CACHE_DIR / DATA_GYM_CACHE_DIR the error names tiktoken's default folder."""
    import tempfile

    from fastlm.text.tokenizers import _tiktoken_cache_dir

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    assert _tiktoken_cache_dir() == os.path.join(tempfile.gettempdir(), "data-gym-cache")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", "/somewhere")
    assert _tiktoken_cache_dir() == "/somewhere"


def test_tiktoken_local_file(tmp_path):
    path = _tiny_tiktoken_file(tmp_path / "tiny.tiktoken")
    tok = build_tokenizer(f"tiktoken:{path}", "ignored")
    assert tok.kind == "tiktoken"
    assert tok.vocab_size == 260 and tok.eos_id == 259
    # GPT-2 split: 'abc' | ' ab' | ' a'; ' ab' -> ' ','ab' (rank of 'ab' < rank of ' a')
    assert tok.encode("abc ab a") == [257, 32, 256, 258]
    assert tok.decode(tok.encode("héllo <|endoftext|>")) == "héllo <|endoftext|>"
    d = tok.to_dict()
    data = path.read_bytes()
    # the saved tokenizer carries the ranks inline: it names no path and needs no other file
    assert "path" not in d and "merges" not in d and d["file_name"] == "tiny.tiktoken"
    assert d["ranks"] == data.decode("ascii") and d["sha256"] == hashlib.sha256(data).hexdigest()
    tok.save(tmp_path / "run" / "tokenizer.json")
    path.unlink()
    again = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert again.encode("abc ab a") == [257, 32, 256, 258] and again.to_dict() == d
    # inline ranks edited after saving: the sha256 no longer matches
    with pytest.raises(TokenizerError, match="changed since"):
        tokenizer_from_dict({**d, "ranks": d["ranks"].replace(" 258", " 259")})
    # bad files
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(base64.b64encode(b"a") + b" 0\n")
    with pytest.raises(TokenizerError, match="256 single bytes"):
        build_tokenizer(f"tiktoken:{bad}", "")
    bad.write_bytes(b"not-base64!! zero\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken:1"):
        build_tokenizer(f"tiktoken:{bad}", "")
    with pytest.raises(TokenizerError, match="not found"):
        build_tokenizer(f"tiktoken:{tmp_path / 'nope.tiktoken'}", "")


# ------------------------------------------------------------------- hostile tokenizer files
# tokenizer.json comes with run directories that users download: each case below is a file an
# attacker could ship. Every refusal is one line naming the problem, echoing no other file's bytes.

SECRET = "SECRET-MARKER-7f3a"


def _write_tokenizer_json(folder, d, name="tokenizer.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"format": "fastlm-tokenizer", "version": 1, **d}), encoding="utf-8")
    return path


def _refused(path, *needles):
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(path)
    msg = str(ei.value)
    assert "\n" not in msg and SECRET not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_tiktoken_json_may_not_name_files_outside_its_folder(tmp_path, no_hang):
    secret = tmp_path / "secret.tiktoken"
    _tiny_tiktoken_file(secret)
    with open(secret, "ab") as f:
        f.write(SECRET.encode() + b" 999\n")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    run = tmp_path / "run"
    for ref in (str(secret), "../secret.tiktoken", "sub/../../secret.tiktoken", "/etc/passwd", ".", ".."):
        p = _write_tokenizer_json(run, {"kind": "tiktoken", "file": ref, "sha256": digest})
        _refused(p, "plain name")
    # the old format (an absolute path) is refused too, with the way out
    p = _write_tokenizer_json(run, {"kind": "tiktoken", "path": str(secret), "sha256": digest})
    _refused(p, "only files beside tokenizer.json", "'file'")


def test_tiktoken_json_sibling_file_needs_sha256_and_a_regular_file(tmp_path, no_hang):
    run = tmp_path / "run"
    run.mkdir()
    data = _tiny_tiktoken_file(run / "tiny.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    ok = _write_tokenizer_json(run, {"kind": "tiktoken", "file": "tiny.tiktoken", "sha256": digest})
    assert load_tokenizer(ok).encode("abc ab a") == [257, 32, 256, 258]
    p = _write_tokenizer_json(run, {"kind": "tiktoken", "file": "tiny.tiktoken"}, "no-sha.json")
    _refused(p, "sha256")
    (run / "tiny.tiktoken").write_bytes(data.replace(b" 258", b" 259"))
    _refused(ok, "changed since")
    # a device (/dev/zero never ends) or a FIFO (an open blocks) is refused before it is opened
    os.unlink(run / "tiny.tiktoken")
    os.symlink("/dev/zero", run / "tiny.tiktoken")
    _refused(ok, "a device, not a regular file")
    os.unlink(run / "tiny.tiktoken")
    os.mkfifo(run / "tiny.tiktoken")
    _refused(ok, "a FIFO, not a regular file")


def test_tokenizer_json_itself_is_read_safely(tmp_path, no_hang, monkeypatch):
    os.symlink("/dev/zero", tmp_path / "zero.json")
    _refused(tmp_path / "zero.json", "a device")
    os.mkfifo(tmp_path / "fifo.json")
    _refused(tmp_path / "fifo.json", "a FIFO")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    _refused(deep, "nests JSON too deeply")
    big = _write_tokenizer_json(tmp_path / "big", {"kind": "char", "chars": "ab" + "c" * 5000})
    monkeypatch.setattr(T, "MAX_TOKENIZER_FILE_BYTES", 4096)
    _refused(big, "too large", "limit is 4096")


def test_tiktoken_file_limits_and_no_echo(tmp_path, monkeypatch):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(SECRET.encode() + b" garbage here\n")
    with pytest.raises(TokenizerError) as ei:
        build_tokenizer(f"tiktoken:{bad}", "")
    assert "bad.tiktoken:1" in str(ei.value) and SECRET not in str(ei.value)
    path = _tiny_tiktoken_file(tmp_path / "tiny.tiktoken")
    with open(path, "ab") as f:  # a token longer than MAX_TOKEN_BYTES
        f.write(base64.b64encode(b"x" * (T.MAX_TOKEN_BYTES + 1)) + b" 300\n")
    with pytest.raises(TokenizerError, match=r"tiny.tiktoken:260: token of 4097 bytes"):
        build_tokenizer(f"tiktoken:{path}", "")
    _tiny_tiktoken_file(path)
    with open(path, "ab") as f:  # a rank beyond the vocabulary limit (would size the vocabulary)
        f.write(base64.b64encode(b"zz") + b" %d\n" % T.MAX_VOCAB)
    with pytest.raises(TokenizerError, match="rank %d out of range" % T.MAX_VOCAB):
        build_tokenizer(f"tiktoken:{path}", "")
    _tiny_tiktoken_file(path)
    monkeypatch.setattr(T, "MAX_TIKTOKEN_FILE_BYTES", 1000)
    with pytest.raises(TokenizerError, match="too large"):
        build_tokenizer(f"tiktoken:{path}", "")
    monkeypatch.setattr(T, "MAX_TIKTOKEN_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(T, "MAX_VOCAB", 200)
    with pytest.raises(TokenizerError, match="more than 200 ranks"):
        build_tokenizer(f"tiktoken:{path}", "")


def test_tiktoken_inline_ranks_are_checked(tmp_path):
    d = build_tokenizer(f"tiktoken:{_tiny_tiktoken_file(tmp_path / 'tiny.tiktoken')}", "").to_dict()
    p = _write_tokenizer_json(tmp_path / "a", {**d, "ranks": d["ranks"] + "\u00e9"})
    _refused(p, "ASCII")
    p = _write_tokenizer_json(tmp_path / "b", {**d, "ranks": 5})
    _refused(p, "'ranks' must be a string")
    p = _write_tokenizer_json(tmp_path / "c", {**d, "file_name": "../../x", "sha256": None})
    assert load_tokenizer(p).file_name == "ranks"  # an unsafe name is never kept


def _chained_merges(n, grow="linear"):
    """Merge i joins the previous new token with 'a' (length i + 2) or with itself (doubling)."""
    out = [[97, 97]]
    for i in range(1, n):
        out.append([255 + i, 97] if grow == "linear" else [255 + i, 255 + i])
    return out


def test_bpe_chained_merges_are_refused_before_building(tmp_path, monkeypatch):
    # 100k linearly growing merges: ~5 GB of token bytes if built; refused at the length cap
    p = _write_tokenizer_json(tmp_path / "a", {"kind": "bpe", "merges": _chained_merges(100_000)})
    _refused(p, f"bpe merge {T.MAX_TOKEN_BYTES - 1} builds a token of {T.MAX_TOKEN_BYTES + 1} bytes")
    p = _write_tokenizer_json(tmp_path / "b", {"kind": "bpe", "merges": _chained_merges(40, "doubling")})
    _refused(p, "bpe merge 12 builds a token of 8192 bytes")
    # the total is capped too (lengths are summed as numbers before any bytes exist)
    monkeypatch.setattr(T, "MAX_TOKEN_BYTES", 1 << 40)
    monkeypatch.setattr(T, "MAX_VOCAB_BYTES", 1 << 20)
    _refused(p, "more than 1048576 bytes of tokens")
    monkeypatch.setattr(T, "MAX_VOCAB", 300)
    _refused(
        _write_tokenizer_json(tmp_path / "c", {"kind": "bpe", "merges": _chained_merges(44)}),
        "44 merges; the limit is 43",
    )


@pytest.mark.parametrize("merge", [[True, 97], "ab", {"a": 1}, [97], [97, 98, 99], [97, 256], [-1, 97], [97.0, 98]])
def test_bpe_invalid_merges(tmp_path, merge):
    p = _write_tokenizer_json(tmp_path, {"kind": "bpe", "merges": [merge]})
    _refused(p, "bpe merge 0 is invalid")


def test_bpe_pat_str_must_be_a_known_pattern(tmp_path):
    # catastrophic backtracking, or merely unknown: refused with the pattern's length, not its text
    for pat in (r"(a+)+$", r"(\s*)*\S", "x" * 10_000, 5):
        p = _write_tokenizer_json(tmp_path, {"kind": "bpe", "merges": [], "pat_str": pat})
        _refused(p, "not one of the known pre-tokenisation regexes")
    with pytest.raises(TokenizerError, match="known pre-tokenisation"):
        T.BPETokenizer.train("some text", 260, pat_str=r"\w+|\s")
    text = "Hello world, it's 2026!\r\n  Ünïcödé   text\n"
    for pat in T.KNOWN_PAT_STRS:
        tok = T.BPETokenizer.train(text * 20, 300, pat_str=pat)
        again = load_tokenizer(_save(tok, tmp_path / "ok.json"))
        assert again.pat_str == pat and again.decode(again.encode(text)) == text


def _save(tok, path):
    tok.save(path)
    return path


def test_known_pat_strs_are_tiktokens_own():
    """The cl100k/o200k patterns here are the ones tiktoken ships (compared with its source)."""
    import inspect

    import tiktoken_ext.openai_public as pub

    source = inspect.getsource(pub)
    assert T.CL100K_PAT_STR in source
    parts = re.findall(r'r"""(.*?)"""', inspect.getsource(pub.o200k_base))
    assert "|".join(parts) == T.O200K_PAT_STR


def test_char_and_word_vocabulary_caps(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "MAX_CHARS", 3)
    _refused(_write_tokenizer_json(tmp_path / "a", {"kind": "char", "chars": "abcd"}), "4 characters")
    monkeypatch.setattr(T, "MAX_VOCAB", 5)
    tokens = ["<bos>", "<eos>", "<unk>", "<pad>", "a", "b"]
    _refused(_write_tokenizer_json(tmp_path / "b", {"kind": "word", "tokens": tokens}), "6 tokens; the limit is 5")


def test_bpe_training_never_builds_a_token_the_loader_refuses(tmp_path, monkeypatch):
    """Long runs ('=' * 1000) are counted in pieces of at most MAX_TOKEN_BYTES, so the merges
    stop at that length and the saved tokenizer loads again."""
    monkeypatch.setattr(T, "MAX_TOKEN_BYTES", 64)
    text = ("=" * 1000 + "\nsome words here\n") * 20
    tok = build_tokenizer("bpe", text, vocab_size=300)
    longest = max(len(tok.token_bytes(i)) for i in range(tok.eos_id))
    assert longest == 64  # the run was merged as far as allowed, no further
    again = load_tokenizer(_save(tok, tmp_path / "t.json"))
    assert again.decode(again.encode(text)) == text
