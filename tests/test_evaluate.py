"""``python -m fastlm.evaluate``: loss / perplexity / bits per char on a run split or a text file."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import child_env

from fastlm import train
from fastlm.evaluate import evaluate, main
from fastlm.io import checkpoint, loading
from fastlm.text import data, tokenizers

TEXT = (
    "MENENIUS:\nEither you must confess yourselves wondrous malicious,\nOr be accused of folly.\n\n"
    "SICINIUS:\nNature teaches beasts to know their friends.\n\n"
) * 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def make_run(run_dir, tokenizer="char", block_size=32, seed=0, text=TEXT, **tok_kw):
    """A run directory written with the checkpoint API around an untrained tiny GPT."""
    from fastlm.model import GPT, GPTConfig

    tok = tokenizers.build_tokenizer(tokenizer, text, **tok_kw)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32, pos="alibi")
    model = GPT(cfg)
    checkpoint.write_run_files(run_dir, {"model": cfg.to_dict(), "train": {"split": [0.8, 0.2, 0.0]}}, tok)
    checkpoint.save_weights(os.path.join(run_dir, "model.safetensors"), checkpoint.model_tensors(model))
    ids, _ = data.encode_documents(tok, [text])
    data.save_splits(run_dir, data.split_tokens(ids, (0.8, 0.2, 0.0)), tok.vocab_size)
    return str(run_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def cli(capsys, *argv):
    """main(argv) on the CPU unless argv picks a device (auto would take CUDA where a GPU is visible)."""
    argv = list(argv) if "--device" in argv else [*argv, "--device", "cpu"]
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def brute_force_loss(model, ids, block):
    """Mean next-token cross-entropy over non-overlapping windows, written out plainly."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, block):
            x = ids[s : s + block]
            y = ids[s + 1 : s + block + 1]
            x = x[: len(y)]
            logits, _ = model(x[None])
            total += float(F.cross_entropy(logits[0].double(), y, reduction="sum"))
            n += len(y)
    return total / n


# ---------------------------------------------------------------------------------------------


def test_help_in_a_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "fastlm.evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert r.returncode == 0
    for flag in ("--checkpoint", "--split", "--data", "--batch-size", "--json"):
        assert flag in r.stdout


def test_val_split_json_matches_brute_force(run, capsys):
    rc, out, err = cli(capsys, "--checkpoint", run, "--split", "val", "--json", "--batch-size", "3")
    assert rc == 0, err
    res = json.loads(out)
    model, tok, _ = loading.load_model(run)
    val = data.load_split(run, "val")
    ref = brute_force_loss(model, val, 32)
    assert res["loss"] == pytest.approx(ref, rel=1e-5)
    assert res["tokens"] == len(val) - 1
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    assert res["bits_per_token"] == pytest.approx(res["loss"] / math.log(2), rel=1e-12)
    assert res["bits_per_char"] == pytest.approx(res["bits_per_token"], rel=1e-12)  # char: 1 token = 1 char
    # an untrained GPT (std 0.02 init) predicts nearly uniformly
    assert abs(res["loss"] - math.log(tok.vocab_size)) < 0.05


def test_table_and_default_split(run, capsys):
    rc, out, err = cli(capsys, "--checkpoint", os.path.join(run, "model.safetensors"))
    assert rc == 0, err
    keys = [line.split()[0] for line in out.splitlines()]
    assert keys == ["checkpoint", "data", "loss", "perplexity", "bits/token", "bits/char", "time"]
    assert "val split" in out


def test_text_file_equals_the_same_split(run, capsys, tmp_path):
    tok = loading.load_model(run)[1]
    val = data.load_split(run, "val")
    path = tmp_path / "val.txt"
    path.write_text(tok.decode(val.astype(np.int64).tolist()), encoding="utf-8")
    rc, out, err = cli(capsys, "--checkpoint", run, "--data", str(path), "--json")
    assert rc == 0, err
    on_file = json.loads(out)
    rc, out, err = cli(capsys, "--checkpoint", run, "--split", "val", "--json")
    assert on_file["loss"] == pytest.approx(json.loads(out)["loss"], rel=1e-9)
    rc, out, err = cli(capsys, "--checkpoint", run, "--split", "val", "--json", "--max-tokens", "40")
    assert json.loads(out)["tokens"] == 39


def test_text_file_newlines_follow_the_run(run, capsys, tmp_path):
    """evaluate --data reads text as the run read its corpus: CRLF normalised by default (the
    same loss as the LF file); a run trained with raw_newlines keeps the '\\r' (here: unknown)."""
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(TEXT.encode())
    crlf.write_bytes(TEXT.replace("\n", "\r\n").encode())
    results = []
    for path in (lf, crlf):
        rc, out, err = cli(capsys, "--checkpoint", run, "--data", str(path), "--json")
        assert rc == 0, err
        results.append(json.loads(out))
    assert results[0]["loss"] == results[1]["loss"] and results[0]["tokens"] == results[1]["tokens"]
    raw_run = make_run(tmp_path / "raw")
    cfg = json.loads((tmp_path / "raw" / "config.json").read_text())
    cfg["train"]["raw_newlines"] = True
    (tmp_path / "raw" / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli(capsys, "--checkpoint", raw_run, "--data", str(crlf))
    assert_one_line_error(rc, err, "'\\r'")


def test_bits_per_char_for_bpe(tmp_path):
    run = make_run(tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
    model, tok, _ = loading.load_model(run)
    ids = np.asarray(tok.encode(TEXT[:300]), dtype=np.int64)
    res = evaluate(model, tok, ids, batch_size=2)
    assert res["tokens"] == len(ids) - 1
    chars = len(tok.decode(ids[1:].tolist()))
    assert res["chars"] == chars and chars > res["tokens"], "bpe tokens span several characters"
    assert res["bits_per_char"] == pytest.approx(res["loss"] * (len(ids) - 1) / chars / math.log(2), rel=1e-12)
    assert res["loss"] == pytest.approx(brute_force_loss(model, ids, 32), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_are_one_line(run, capsys, tmp_path):
    rc, _, err = cli(capsys, "--checkpoint", run, "--split", "test")  # the test fraction is 0
    assert_one_line_error(rc, err, "test split")
    rc, _, err = cli(capsys, "--checkpoint", run, "--data", str(tmp_path / "missing.txt"))
    assert_one_line_error(rc, err, "missing.txt")
    rc, _, err = cli(capsys, "--checkpoint", run, "--batch-size", "0")
    assert_one_line_error(rc, err, "--batch-size")
    rc, _, err = cli(capsys, "--checkpoint", str(tmp_path / "no-run"))
    assert_one_line_error(rc, err, "not found")
    bad = tmp_path / "bad.txt"
    bad.write_text("Zebra ☃ quagga\n", encoding="utf-8")  # characters the char tokenizer lacks
    rc, _, err = cli(capsys, "--checkpoint", run, "--data", str(bad))
    assert_one_line_error(rc, err, "not in the char vocabulary")


def test_unknown_split_in_subprocess(run):
    r = subprocess.run(
        [sys.executable, "-m", "fastlm.evaluate", "--checkpoint", run, "--data", "/nonexistent", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert_one_line_error(r.returncode, r.stderr, "/nonexistent")
    assert "Traceback" not in r.stderr


def test_end_to_end_with_the_train_cli(tmp_path, capsys):
    """train.main -> evaluate reproduces the whole-split val loss the run reports; generate samples."""
    from fastlm.generate import main as generate_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    run = str(tmp_path / "run")
    rc = train.main(
        [
            "--data",
            str(corpus),
            "--out-dir",
            run,
            "--max-iters",
            "30",
            "--block-size",
            "32",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--batch-size",
            "16",
            "--eval-interval",
            "30",
            "--eval-iters",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--sample-tokens",
            "0",
            "--warmup-iters",
            "5",
            "--lr",
            "0.01",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    summary = json.load(open(os.path.join(run, "summary.json")))
    rc, out, err = cli(capsys, "--checkpoint", run, "--json")
    assert rc == 0, err
    res = json.loads(out)
    vocab = loading.load_model(run)[1].vocab_size
    assert res["loss"] < math.log(vocab) - 0.5, "30 steps of training must beat a uniform guess"
    assert res["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert (
        generate_main(["--checkpoint", run, "--prompt", "SICINIUS:", "--max-new-tokens", "20", "--device", "cpu"]) == 0
    )
    assert capsys.readouterr().out.startswith("SICINIUS:")
