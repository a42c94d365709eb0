"""fastlm.text.data: corpora (file / files / folder / CSV / JSONL), UTF-8 errors, splits, token cache,
batch sampling and the whole-split loss."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlm.model import GPT, GPTConfig
from fastlm.text import data
from fastlm.text.data import DataError
from fastlm.text.tokenizers import build_tokenizer


def test_default_corpus_is_bundled():
    p = data.default_corpus()
    assert p.is_file() and p.stat().st_size > 1_000_000
    docs = data.read_documents(p)
    assert len(docs) == 1 and docs[0].startswith("First Citizen")


def test_default_corpus_is_unchanged_by_newline_normalisation():
    """The default run stays bit-identical: the bundled corpus has no carriage return, so the
    normalised documents are its exact bytes (and so are its tokens)."""
    raw = data.default_corpus().read_bytes()
    assert b"\r" not in raw
    assert data.read_documents(data.default_corpus()) == [raw.decode("utf-8")]
    assert data.read_documents(data.default_corpus(), raw_newlines=True) == [raw.decode("utf-8")]


def test_newlines_are_normalised_unless_raw(tmp_path):
    crlf = "line one\r\nline two\r\n\r\nold mac\rend\r\n"
    want = "line one\nline two\n\nold mac\nend\n"
    (tmp_path / "a.txt").write_bytes(crlf.encode())
    assert data.read_documents(tmp_path / "a.txt") == [want]
    assert data.read_documents(tmp_path / "a.txt", raw_newlines=True) == [crlf]
    # CSV with CRLF rows and a CRLF inside a quoted field; JSONL with an escaped CRLF in a string
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b'id,text\r\n1,"two\r\nlines"\r\n2,"cr\ronly"\r\n')
    assert data.read_documents(csv_path) == ["two\nlines", "cr\nonly"]
    assert data.read_documents(csv_path, raw_newlines=True) == ["two\r\nlines", "cr\ronly"]
    jl = tmp_path / "d.jsonl"
    jl.write_bytes(json.dumps({"text": "a\r\nb"}).encode() + b"\r\n" + json.dumps({"text": "c\rd"}).encode() + b"\r\n")
    assert data.read_documents(jl) == ["a\nb", "c\nd"]
    assert data.read_documents(jl, raw_newlines=True) == ["a\r\nb", "c\rd"]
    # the point of it: CRLF text gives the same tokens as LF text (no '\r' token)
    tok = build_tokenizer("char", want)
    assert data.encode_documents(tok, data.read_documents(tmp_path / "a.txt"))[0].tolist() == tok.encode(want)


def test_jsonl_lines_end_only_at_newline(tmp_path):
    """A raw U+2028 / U+0085 / \\x1c inside a JSON string is text, not a line break."""
    jl = tmp_path / "u.jsonl"
    jl.write_text(json.dumps({"text": "a\u2028b\x85c\x1cd"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert data.read_documents(jl) == ["a\u2028b\x85c\x1cd"]


def test_files_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("bbb", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufeffaaa", encoding="utf-8")  # BOM dropped
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("ccc", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not read", encoding="utf-8")
    assert data.read_documents(tmp_path) == ["aaa", "bbb", "ccc"]  # sorted, recursive, .txt only
    assert data.read_documents([tmp_path / "b.txt", tmp_path / "a.txt"]) == ["bbb", "aaa"]


def test_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('id,body\n1,"hello, world"\n2,"two\nlines"\n', encoding="utf-8")
    assert data.read_documents(csv_path, text_column="body") == ["hello, world", "two\nlines"]
    with pytest.raises(DataError, match="no column 'text'.*columns: id, body"):
        data.read_documents(csv_path, text_column="text")
    with pytest.raises(DataError, match="--text-column"):
        data.read_documents(csv_path)
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n", encoding="utf-8")
    assert data.read_documents(jl) == ["one", "two"]  # 'text' used by default, blank lines skipped
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"text": "a"}\n{"other": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"e.jsonl:2: no field 'text'"):
        data.read_documents(bad)
    bad.write_text('{"text": "a"}\n{broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"e.jsonl:2: bad JSON"):
        data.read_documents(bad)


def test_bad_corpora(tmp_path):
    with pytest.raises(DataError, match="corpus not found"):
        data.read_documents(tmp_path / "nope.txt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        data.read_documents(empty_dir)
    e = tmp_path / "e.txt"
    e.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        data.read_documents(e)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8.*0xe9 at byte offset 3"):
        data.read_documents(latin)
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"ab\x00\x01\x02")
    with pytest.raises(DataError, match="binary.*byte offset 2"):
        data.read_documents(binary)


def test_encode_documents_joins_with_eos_and_drops_long():
    tok = build_tokenizer("char", "abcdef")
    ids, dropped = data.encode_documents(tok, ["ab", "", "cdef", "c"], max_doc_tokens=3)
    assert dropped == 1
    assert ids.tolist() == [0, 1, tok.eos_id, 2]
    with pytest.raises(DataError, match="no tokens left"):
        data.encode_documents(tok, ["abcdef"], max_doc_tokens=2)


def test_bpe_with_literal_endoftext():
    text = "hello <|endoftext|> world " * 20
    tok = build_tokenizer("bpe", text, vocab_size=280)
    ids, _ = data.encode_documents(tok, [text, text])
    assert (ids == tok.eos_id).sum() == 1  # only the inserted separator, the literal is plain text
    assert tok.decode(ids[: len(ids) // 2 - 1].tolist()).startswith("hello <|endoftext|> world")


def test_split_fractions_val_is_last():
    ids = np.arange(1000)
    s = data.split_tokens(ids)
    assert len(s["train"]) == 900 and len(s["val"]) == 100 and len(s["test"]) == 0
    assert s["val"].tolist() == list(range(900, 1000))  # the LAST 10%
    s = data.split_tokens(ids, "0.8,0.1,0.1")
    assert s["train"][-1] == 799 and s["val"].tolist() == list(range(800, 900)) and s["test"][0] == 900
    for bad in ("0.5,0.4", "1,0", "a,b", "0.9,0.2,-0.1", "0.3,0.3,0.2,0.2"):
        with pytest.raises(DataError):
            data.parse_split(bad)


def test_cache_dtype_and_memmap(tmp_path):
    ids = np.arange(300) % 70
    data.save_splits(tmp_path, data.split_tokens(ids), vocab_size=70)
    tr = data.load_split(tmp_path, "train")
    assert isinstance(tr, np.memmap) and tr.dtype == np.uint16 and tr.tolist() == ids[:270].tolist()
    data.save_splits(tmp_path, {"train": np.array([70000, 1])}, vocab_size=70001)
    assert data.load_split(tmp_path, "train").dtype == np.uint32
    assert len(data.load_split(tmp_path, "test")) == 0  # empty test split still cached
    with pytest.raises(DataError, match="no cached val"):
        data.load_split(tmp_path / "other", "val")
    with pytest.raises(DataError, match="split must be"):
        data.load_split(tmp_path, "dev")
    (tmp_path / "data" / "val.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read token cache"):
        data.load_split(tmp_path, "val")


def test_sampler_windows_state_and_ranks():
    ids = np.arange(50, dtype=np.uint16)
    s = data.BatchSampler(ids, block_size=8, batch_size=4, seed=[3, 0])
    state = s.state()
    x, y = s.sample()
    assert x.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: targets are inputs shifted by one
    assert int(x.max()) <= 48 and int(y.max()) <= 49
    s.set_state(json.loads(json.dumps(state)))  # JSON round trip, exact replay
    x2, _ = s.sample()
    assert torch.equal(x, x2)
    # two ranks with the same generator state: their slices make up the one-process global batch
    full = data.BatchSampler(ids, 8, 8, seed=[3, 0]).sample()[0]
    r0 = data.BatchSampler(ids, 8, 4, seed=[3, 0]).sample("cpu", 0, 2)[0]
    r1 = data.BatchSampler(ids, 8, 4, seed=[3, 0]).sample("cpu", 1, 2)[0]
    assert torch.equal(torch.cat([r0, r1]), full) and not torch.equal(r0, r1)
    with pytest.raises(DataError, match="need at least block_size"):
        data.BatchSampler(ids[:8], 8, 2, seed=0)


@pytest.mark.parametrize("n", [2, 33, 64, 65, 100])
def test_split_loss_matches_direct_computation(n):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5)
    model = GPT(cfg)
    model.train()
    ids = np.random.default_rng(0).integers(0, 11, size=n).astype(np.uint16)
    got = data.split_loss(model, ids, block_size=16, batch_size=3, device="cpu")
    assert model.training  # mode restored
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n - 1, 16):  # every prediction exactly once, last partial window included
            chunk = torch.tensor(ids[start : start + 17].astype(np.int64))
            logits, _ = model(chunk[None, :-1])
            total += F.cross_entropy(logits[0].double(), chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    assert count == n - 1
    assert math.isclose(got, total / count, rel_tol=1e-5)
