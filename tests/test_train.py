"""python -m fastlm.train, in-process through main(argv): run-dir artifacts, overwrite protection,
exact resume, --init-from, early stopping, plateau LR, config files, hostile input."""

import csv
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line
from tiny_run import TINY_RUN, tiny_train_config
from train_hooks import CtrlCAfter

from fastlm.config import ConfigFileError, load_config_file, merge_values
from fastlm.io import checkpoint, loading
from fastlm.model import GPTConfig
from fastlm.text import data
from fastlm.train import build_parser, main
from fastlm.training.runtime import resolve_device
from fastlm.training.schedule import LRSchedule
from fastlm.training.settings import TrainConfig, resolve_settings
from fastlm.training.trainer import Callback

TINY = [
    *TINY_RUN,
    "--eval-iters",
    "2",
    "--eval-interval",
    "5",
    "--max-iters",
    "10",
    "--log-interval",
    "1",
    "--warmup-iters",
    "2",
]


@pytest.fixture(scope="module")
def corpus(corpus_20k):
    return corpus_20k


def run(args, capsys=None):
    """main(args), with ``--device cpu`` unless the args choose a device (or a config file does): a GPU
    machine then runs the same CPU configuration (its ``auto`` would pick CUDA and the GPU profile)."""
    args = [str(a) for a in args]
    if not {"--device", "--config", "--help"} & set(args):
        args += ["--device", "cpu"]
    rc = main(args)
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_dir_artifacts(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    rc, res = run(["--data", corpus, "--out-dir", out, *TINY, "--sample-tokens", "20"], capsys)
    assert rc == 0
    assert f"run dir: {out}" in res.out and "done: best val loss" in res.out and "sample:" in res.out
    for name in (
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "metrics.csv",
        "train_log.csv",
        "loss.png",
        "summary.json",
        "latest",
        "data/train.npy",
        "data/val.npy",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_layer"] == 1 and cfg["train"]["max_iters"] == 10 and cfg["tokenizer"]["kind"] == "char"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_loss", "val_ppl", "train_loss", "steps", "tokens_per_s", "wall_s", "best_step"):
        assert key in summary, key
    assert summary["steps"] == 10 and summary["tokens_seen"] == 10 * 4 * 16
    m = rows(out / "metrics.csv")
    assert [int(r["step"]) for r in m] == [5, 10]
    assert len(rows(out / "train_log.csv")) == 10
    # val_loss is the best checkpoint's loss over the whole val split
    model, tok, run_cfg = loading.load_model(out)
    val = data.load_split(out, "val")
    assert len(val) == 2000  # last 10% of 20000 chars
    assert math.isclose(summary["val_loss"], data.split_loss(model, val, 16, 64, "cpu"), rel_tol=1e-6)
    best = min(m, key=lambda r: float(r["val_loss"]))
    assert summary["best_step"] == int(best["step"])


def test_overwrite_protection(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    (out / "config.json").write_text('{"mine": true}')
    rc, res = run(["--data", corpus, "--out-dir", out, *TINY], capsys)
    assert rc == 2 and "already exists" in one_error_line(res) and "--overwrite" in res.err
    # --overwrite replaces fastlm runs only: a folder of the user's is refused untouched
    rc, res = run(["--data", corpus, "--out-dir", out, *TINY, "--overwrite"], capsys)
    assert rc == 2 and "not a fastlm run directory" in one_error_line(res)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mine.txt"]
    assert (out / "config.json").read_text() == '{"mine": true}'
    run_dir = tmp_path / "run2"
    rc, _ = run(["--data", corpus, "--out-dir", run_dir, *TINY, "--max-iters", "5"], capsys)
    assert rc == 0
    (run_dir / "mine.txt").write_text("keep me")
    (run_dir / "data" / "notes.txt").write_text("mine too")
    rc, _ = run(["--data", corpus, "--out-dir", run_dir, *TINY, "--overwrite", "--max-iters", "5"], capsys)
    assert rc == 0 and len(list(run_dir.glob("ckpt-*"))) == 1
    assert (run_dir / "mine.txt").read_text() == "keep me"  # only run files are replaced
    assert (run_dir / "data" / "notes.txt").read_text() == "mine too"


def test_overwrite_keeps_a_corpus_inside_the_run_dir(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    text = corpus.read_text(encoding="utf-8")
    (run_dir / "data" / "corpus.txt").write_text(text, encoding="utf-8")
    args = ["--data", run_dir / "data" / "corpus.txt", "--out-dir", run_dir, *TINY, "--max-iters", "5"]
    assert run(args[:2] + ["--out-dir", tmp_path / "first", *args[4:]], capsys)[0] == 0
    # turn run_dir into a run whose own corpus lives in its data/ folder, then replace the run
    for p in (tmp_path / "first").iterdir():
        if p.is_file():
            (run_dir / p.name).write_bytes(p.read_bytes())
    rc, res = run([*args, "--overwrite"], capsys)
    assert rc == 0, res.err
    assert (run_dir / "data" / "corpus.txt").read_text(encoding="utf-8") == text


def test_overwrite_with_bad_input_leaves_the_old_run(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert run(["--data", corpus, "--out-dir", run_dir, *TINY, "--max-iters", "5"], capsys)[0] == 0
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, res = run(["--data", empty, "--out-dir", run_dir, *TINY, "--overwrite"], capsys)
    assert rc == 2 and "empty" in one_error_line(res)
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    checkpoint.load_checkpoint(run_dir)  # still a whole, loadable run


def test_run_without_a_checkpoint_says_so(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert run(["--data", corpus, "--out-dir", run_dir, *TINY, "--max-iters", "5"], capsys)[0] == 0
    # what a start killed before its first save leaves: run files, no checkpoint
    for p in run_dir.glob("ckpt-*"):
        shutil.rmtree(p)
    (run_dir / "latest").unlink()
    rc, res = run(["--resume", run_dir, "--no-progress"], capsys)
    assert rc == 2 and "no checkpoint" in one_error_line(res) and "--overwrite" in res.err
    rc, res = run(["--data", corpus, "--out-dir", run_dir, *TINY], capsys)
    assert rc == 2 and "holds no checkpoint" in one_error_line(res)
    assert run(["--data", corpus, "--out-dir", run_dir, *TINY, "--max-iters", "5", "--overwrite"], capsys)[0] == 0


def test_damaged_token_cache_is_refused(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert run(["--data", corpus, "--out-dir", run_dir, *TINY, "--max-iters", "5"], capsys)[0] == 0
    path = data.split_path(run_dir, "train")
    arr = np.load(path)
    arr[3] = 60000
    np.save(path, arr)
    rc, res = run(["--resume", run_dir, "--max-iters", "8", "--no-progress"], capsys)
    assert rc == 2 and "damaged" in one_error_line(res) and "60000" in res.err


def test_resume_is_exact(tmp_path, corpus, capsys):
    args = ["--data", corpus, *TINY, "--max-iters", "20", "--dropout", "0.1"]
    rc, _ = run([*args, "--out-dir", tmp_path / "a"], capsys)
    assert rc == 0
    rc = main([str(a) for a in [*args, "--out-dir", tmp_path / "b"]], callbacks=[CtrlCAfter(7)])
    res = capsys.readouterr()
    assert rc == 130 and "interrupted" in res.out and "--resume" in res.out
    assert json.loads((tmp_path / "b" / "latest").read_text())["step"] == 8
    rc, res = run(["--resume", tmp_path / "b", "--no-progress"], capsys)
    assert rc == 0 and "resuming" in res.out
    la, lb = rows(tmp_path / "a" / "train_log.csv"), rows(tmp_path / "b" / "train_log.csv")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 20
    ma, mb = rows(tmp_path / "a" / "metrics.csv"), rows(tmp_path / "b" / "metrics.csv")
    assert [(r["train_loss"], r["val_loss"]) for r in ma] == [(r["train_loss"], r["val_loss"]) for r in mb]
    wa, _ = checkpoint.load_weights(tmp_path / "a" / "model.safetensors")
    wb, _ = checkpoint.load_weights(tmp_path / "b" / "model.safetensors")
    assert wa and set(wa) == set(wb)  # an empty or partial file must not pass
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sa["val_loss"] == sb["val_loss"] and sb["steps"] == 20


def test_resume_refuses_other_config(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run(["--data", corpus, "--out-dir", out, *TINY, "--max-iters", "5"], capsys)[0] == 0
    rc, res = run(["--resume", out, "--n-layer", "2"], capsys)
    assert rc == 2 and "n_layer=1" in one_error_line(res)
    rc, res = run(["--resume", out, "--lr", "0.5"], capsys)
    assert rc == 2 and "lr=" in one_error_line(res)
    rc, res = run(["--resume", tmp_path / "nothing"], capsys)
    assert rc == 2 and "not found" in one_error_line(res)
    # extending a finished run is allowed
    rc, res = run(["--resume", out, "--max-iters", "10", "--no-progress"], capsys)
    assert rc == 0 and json.loads((out / "summary.json").read_text())["steps"] == 10


def test_init_from_fine_tunes_with_checkpoint_tokenizer_and_architecture(tmp_path, corpus, capsys):
    base = tmp_path / "base"
    assert run(["--data", corpus, "--out-dir", base, *TINY], capsys)[0] == 0
    new_corpus = tmp_path / "new.txt"
    new_corpus.write_text(corpus.read_text(encoding="utf-8")[::-1][:5000], encoding="utf-8")
    ft = tmp_path / "ft"
    # no --optimizer: a fine-tune defaults to AdamW, so --lr governs every weight (Muon's peak of 0.02 would not)
    rc, res = run(
        [
            "--data",
            new_corpus,
            "--out-dir",
            ft,
            *TINY,
            "--init-from",
            base,
            "--n-layer",
            "3",
            "--max-iters",
            "1",
            "--lr",
            "1e-8",
        ],
        capsys,
    )
    assert rc == 0 and "ignoring n_layer" in res.out
    assert "optimizer: adamw (peak lr 1e-08 for every parameter)" in res.out
    cb, cf = json.loads((base / "config.json").read_text()), json.loads((ft / "config.json").read_text())
    assert cb["train"]["optimizer"] == "muon" and cf["train"]["optimizer"] == "adamw"
    assert cf["model"] == cb["model"]
    assert json.loads((ft / "tokenizer.json").read_text()) == json.loads((base / "tokenizer.json").read_text())
    wb, _ = checkpoint.load_weights(base / "model.safetensors")
    wf, _ = checkpoint.load_weights(ft / "model.safetensors")
    assert wb and set(wb) == set(wf)
    assert max((wb[k] - wf[k]).abs().max().item() for k in wb) <= 1e-6  # started from the base weights
    # asking for Muon explicitly still gets it, at --muon-lr for the block matrices
    rc, res = run(
        [
            "--data",
            new_corpus,
            "--out-dir",
            tmp_path / "ft-muon",
            *TINY,
            "--init-from",
            base,
            "--max-iters",
            "1",
            "--lr",
            "1e-8",
            "--optimizer",
            "muon",
            "--muon-lr",
            "1e-8",
        ],
        capsys,
    )
    assert rc == 0 and "optimizer: muon (peak lr 1e-08 for the block matrices)" in res.out
    wm, _ = checkpoint.load_weights(tmp_path / "ft-muon" / "model.safetensors")
    assert max((wb[k] - wm[k]).abs().max().item() for k in wb) <= 1e-6
    bad = tmp_path / "bad.txt"
    bad.write_text("\u4e2d\u6587 characters the base never saw" * 20, encoding="utf-8")
    rc, res = run(["--data", bad, "--out-dir", tmp_path / "ft2", *TINY, "--init-from", base], capsys)
    assert rc == 2 and "not in the char vocabulary" in one_error_line(res)


@pytest.fixture()
def drifting_corpus(tmp_path):
    """Train text 'abab...', val text 'aabb...': the more surely the model alternates, the worse val gets."""
    p = tmp_path / "drift.txt"
    p.write_text("ab" * 900 + "aabb" * 50, encoding="utf-8")
    return p


def test_early_stopping(tmp_path, drifting_corpus, capsys):
    out = tmp_path / "run"
    rc, res = run(
        [
            "--data",
            drifting_corpus,
            "--out-dir",
            out,
            *TINY,
            "--max-iters",
            "300",
            "--lr",
            "0.03",
            "--early-stopping-patience",
            "2",
            "--lr-schedule",
            "constant",
        ],
        capsys,
    )
    assert rc == 0 and "early stopping at step" in res.out
    s = json.loads((out / "summary.json").read_text())
    m = rows(out / "metrics.csv")
    vals = [float(r["val_loss"]) for r in m]
    assert s["stopped_early"] and s["steps"] < 300 and s["steps"] == int(m[-1]["step"])
    assert s["best_step"] == s["steps"] - 10  # two evals without improvement, then stop
    assert min(vals) == vals[-3] and vals[-2] >= vals[-3] and vals[-1] >= vals[-3]


def test_plateau_schedule(tmp_path, drifting_corpus, capsys):
    out = tmp_path / "run"
    rc, res = run(
        [
            "--data",
            drifting_corpus,
            "--out-dir",
            out,
            *TINY,
            "--max-iters",
            "40",
            "--lr",
            "0.03",
            "--lr-schedule",
            "plateau",
            "--plateau-patience",
            "1",
            "--plateau-factor",
            "0.5",
            "--warmup-iters",
            "0",
            "--min-lr",
            "0.005",
        ],
        capsys,
    )
    assert rc == 0 and "plateaued" in res.out
    vals = [float(r["val_loss"]) for r in rows(out / "metrics.csv")]
    lrs = [float(r["lr"]) for r in rows(out / "train_log.csv")]
    # expected: the LR halves after every eval (each 5 steps) that does not beat the best, floored at min_lr
    expected, lr, best = [], 0.03, math.inf
    for v in vals:
        expected += [lr] * 5
        if v < best:
            best = v
        else:
            lr = max(0.005, lr * 0.5)
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert min(lrs) < 0.03  # at least one plateau seen


def test_lr_schedule_cosine_and_warmup():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    s = LRSchedule(cfg)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(60) == pytest.approx(0.55) and s.lr(110) == pytest.approx(0.1)
    assert LRSchedule(TrainConfig(lr=1.0, lr_schedule="constant", warmup_iters=0)).lr(500) == 1.0


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file(tmp_path, corpus, capsys, suffix):
    settings = {
        "model": {"n_layer": 1, "n_embd": 24, "n_head": 3, "block_size": 16},
        "train": {
            "max_iters": 4,
            "eval_interval": 2,
            "eval_iters": 1,
            "batch_size": 2,
            "sample_tokens": 0,
            "progress": False,
            "lr": 0.003,
            "device": "cpu",
        },
    }
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text(
            "\n".join(
                f"[{g}]\n"
                + "\n".join(
                    f"{k} = {json.dumps(v).lower() if isinstance(v, bool) else json.dumps(v)}" for k, v in kv.items()
                )
                for g, kv in settings.items()
            )
        )
    out = tmp_path / "run"
    rc, _ = run(["--config", path, "--data", corpus, "--out-dir", out, "--max-iters", "6"], capsys)
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_embd"] == 24 and cfg["model"]["n_head"] == 3
    assert cfg["train"]["max_iters"] == 6  # the command line wins over the file
    assert cfg["train"]["lr"] == 0.003 and cfg["train"]["eval_interval"] == 2 and cfg["train"]["device"] == "cpu"


def test_config_file_errors(tmp_path, corpus, capsys):
    cases = {
        "unknown.toml": ("n_layers = 2\n", "unknown key 'n_layers'"),
        "section.toml": ("[model]\nmax_iters = 2\n", "unknown key 'max_iters' in [model]"),
        "type.json": ('{"n_layer": "four"}', "n_layer must be an integer, got 'four'"),
        "bool.json": ('{"compile": 1}', "compile must be true or false"),
        "float.toml": ('lr = "fast"\n', "lr must be a number"),
        "broken.toml": ("n_layer = = 2\n", "bad TOML"),
        "list.json": ("[1, 2]", "must hold a table"),
        "run.yaml": ("n_layer: 2\n", "must end in .toml or .json"),
    }
    for name, (text, msg) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        rc, res = run(["--config", p, "--data", corpus, "--out-dir", tmp_path / "o"], capsys)
        assert rc == 2, name
        assert msg in one_error_line(res), (name, res.err)
    rc, res = run(["--config", tmp_path / "missing.toml"], capsys)
    assert rc == 2 and "config file not found" in one_error_line(res)


def test_merge_values_layers_and_types(tmp_path):
    merged, explicit = merge_values(
        {"train": TrainConfig, "model": GPTConfig}, {"n-layer": 3, "train": {"lr": 1}}, {"lr": 0.5, "seed": 7}
    )
    assert merged["model"] == {"n_layer": 3} and merged["train"] == {"lr": 0.5, "seed": 7}
    assert explicit == {"n_layer", "lr", "seed"}
    merged, _ = merge_values({"train": TrainConfig}, {"min_lr": "none", "data": "x.txt", "lr": 1}, {})
    assert merged["train"] == {"min_lr": None, "data": ["x.txt"], "lr": 1.0}
    with pytest.raises(ConfigFileError, match="max_iters must be an integer or none, got True"):
        merge_values({"train": TrainConfig}, {"max_iters": True}, {})
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ConfigFileError, match="bad JSON"):
        load_config_file(tmp_path / "x.json")


def test_help_lists_generated_flags():
    text = build_parser().format_help()
    for flag in (
        "--n-layer",
        "--out-dir",
        "--block-size",
        "--batch-size",
        "--max-iters",
        "--lr",
        "--eval-interval",
        "--device",
        "--seed",
        "--compile",
        "--no-compile",
        "--config",
        "--resume",
        "--init-from",
        "--text-column",
        "--max-doc-tokens",
        "--grad-accum",
        "--lr-schedule",
        "--gpu-defaults",
    ):
        assert flag in text, flag
    defaults = GPTConfig()
    # the CPU model defaults are what --help shows (not GPTConfig's)
    assert f"transformer blocks (default: {defaults.n_layer})" in " ".join(text.split())
    assert f"gelu | gelu_tanh | relu | relu2 (relu(x)^2) | swiglu (default: {defaults.mlp})" in " ".join(text.split())
    assert main(["--help"]) == 0


HOSTILE_FLAGS = [
    (["--n-layer", "0"], "n_layer must be positive"),
    (["--block-size", "-1"], "block_size must be positive"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--max-iters", "0"], "max_iters must be a positive integer"),
    (["--n-embd", "30", "--n-head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--n-head", "4", "--n-kv-head", "3"], "n_head (4) must be divisible by n_kv_head (3)"),
    (["--lr", "0"], "lr must be a finite number in (0, 10]"),
    (["--lr=-1e-3"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "100"], "lr must be a finite number in (0, 10]"),
    (["--lr", "fast"], "--lr expects a number"),
    (["--n-layer", "2.5"], "--n-layer expects an integer"),
    (["--min-lr", "1"], "min_lr must be"),
    (["--dropout", "1.5"], "dropout must be a number in [0, 1)"),
    (["--lr-schedule", "linear"], "invalid choice"),
    (["--split", "0.5,0.6"], "sum to 1"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--resume", "x", "--init-from", "y"], "either --resume or --init-from"),
    (["--dtype", "float16", "--device", "cpu"], "float16 needs CUDA"),
]


@pytest.mark.parametrize("flags,msg", HOSTILE_FLAGS, ids=[" ".join(f) for f, _ in HOSTILE_FLAGS])
def test_hostile_flags(tmp_path, corpus, capsys, flags, msg):
    try:
        rc = main(["--data", str(corpus), "--out-dir", str(tmp_path / "o"), *TINY, *flags])
    except SystemExit as e:  # argparse errors exit through SystemExit(2)
        rc = e.code
    res = capsys.readouterr()
    assert rc == 2
    assert msg in one_error_line(res)
    assert not (tmp_path / "o" / "config.json").exists()


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


HOSTILE_DATA = {
    "missing": (None, [], "corpus not found"),
    "empty": ("", [], "corpus is empty"),
    "whitespace": ("  \n\n ", [], "corpus is empty"),
    "binary": (bytes(range(256)) * 4, [], "looks binary"),
    "latin1": ("na\u00efve text ".encode("latin-1") * 50, [], "not UTF-8"),
    "short": ("tiny corpus", [], "corpus too short"),
    "csv_no_column": ("id,body\n1,hello there\n", ["--text-column", "text"], "no column 'text'"),
    "jsonl_bad": ('{"text": 1}\n', [], "must be a string"),
}


@pytest.mark.parametrize("case", list(HOSTILE_DATA))
def test_hostile_corpus(tmp_path, capsys, case):
    content, extra, msg = HOSTILE_DATA[case]
    suffix = ".csv" if case.startswith("csv") else ".jsonl" if case.startswith("jsonl") else ".txt"
    path = tmp_path / f"corpus{suffix}"
    if content is not None:
        _write(path, content)
    rc, res = run(["--data", path, "--out-dir", tmp_path / "o", *TINY, *extra], capsys)
    assert rc == 2
    assert msg in one_error_line(res)


def test_folder_without_text(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG....")
    rc, res = run(["--data", tmp_path / "folder", "--out-dir", tmp_path / "o", *TINY], capsys)
    assert rc == 2 and "no .txt files" in one_error_line(res)


def test_bpe_corpus_with_literal_endoftext_trains(tmp_path, capsys):
    text = "".join(f"line {i} of text <|endoftext|> more words here.\n" for i in range(300))
    corpus = _write(tmp_path / "c.txt", text)
    rc, res = run(
        [
            "--data",
            corpus,
            "--out-dir",
            tmp_path / "o",
            *TINY,
            "--tokenizer",
            "bpe",
            "--vocab-size",
            "300",
            "--max-iters",
            "4",
        ],
        capsys,
    )
    assert rc == 0, res.err


def test_csv_jsonl_folder_corpora_train(tmp_path, capsys):
    text = data.default_corpus().read_text(encoding="utf-8")[:6000]
    paras = [p for p in text.split("\n\n") if p.strip()]
    import csv as csv_mod

    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv_mod.writer(f)
        w.writerow(["id", "body"])
        for i, p in enumerate(paras):
            w.writerow([i, p])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras), encoding="utf-8")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, p in enumerate(paras):
        (folder / f"{i:03d}.txt").write_text(p, encoding="utf-8")
    results = {}
    for name, extra in (
        ("csv", [tmp_path / "c.csv", "--text-column", "body"]),
        ("jsonl", [tmp_path / "c.jsonl"]),
        ("folder", [folder]),
    ):
        out = tmp_path / name
        rc, res = run(
            [
                "--data",
                *extra,
                "--out-dir",
                out,
                *TINY,
                "--max-iters",
                "2",
                "--eval-interval",
                "2",
                "--max-doc-tokens",
                "400",
            ],
            capsys,
        )
        assert rc == 0, res.err
        cfg = json.loads((out / "config.json").read_text())
        ids = np.concatenate([data.load_split(out, "train"), data.load_split(out, "val")])
        results[name] = (cfg["data"]["documents"], cfg["data"]["dropped_documents"], ids.tolist())
        eos = cfg["tokenizer"]["eos_id"]
        long_docs = sum(len(p) > 400 for p in paras)
        assert cfg["data"]["dropped_documents"] == long_docs
        assert ids.tolist().count(eos) == len(paras) - long_docs - 1  # documents joined with EOS
    assert results["csv"] == results["jsonl"] == results["folder"]


def test_grad_accum_equals_the_larger_batch(tmp_path, corpus, capsys):
    """batch 2 x 2 micro-batches draws the same windows as batch 4 and averages the same loss."""
    base = ["--data", corpus, *TINY, "--max-iters", "6", "--grad-clip", "0"]
    assert run([*base, "--batch-size", "4", "--out-dir", tmp_path / "big"], capsys)[0] == 0
    rc, res = run([*base, "--batch-size", "2", "--grad-accum", "2", "--out-dir", tmp_path / "acc"], capsys)
    assert rc == 0 and "2 x grad_accum 2 x world 1 = 4 sequences" in res.out
    big, acc = rows(tmp_path / "big" / "train_log.csv"), rows(tmp_path / "acc" / "train_log.csv")
    assert len(big) == len(acc) == 6
    for a, b in zip(big, acc):
        assert math.isclose(float(a["loss"]), float(b["loss"]), rel_tol=1e-4), (a, b)


def test_grad_clip_changes_the_run(tmp_path, corpus, capsys):
    base = ["--data", corpus, *TINY, "--max-iters", "4", "--lr", "0.05"]
    for name, clip in (("tight", "0.01"), ("off", "0")):
        assert run([*base, "--grad-clip", clip, "--out-dir", tmp_path / name], capsys)[0] == 0
    tight, off = rows(tmp_path / "tight" / "train_log.csv"), rows(tmp_path / "off" / "train_log.csv")
    assert tight[0]["loss"] == off[0]["loss"]  # same first batch and weights
    assert tight[-1]["loss"] != off[-1]["loss"]  # clipped updates are smaller: another trajectory


def test_word_tokenizer_with_a_test_split(tmp_path, corpus, capsys):
    out = tmp_path / "w"
    rc, res = run(
        [
            "--data",
            corpus,
            "--out-dir",
            out,
            *TINY,
            "--tokenizer",
            "word",
            "--lowercase",
            "--min-freq",
            "2",
            "--split",
            "0.8,0.1,0.1",
            "--block-size",
            "8",
        ],
        capsys,
    )
    assert rc == 0, res.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"]["kind"] == "word"
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["test_loss"]) and summary["test_loss"] > 0
    n = cfg["data"]["tokens"]
    assert n["test"] > 0 and abs(n["test"] - n["val"]) <= 1
    tok = json.loads((out / "tokenizer.json").read_text())
    assert "<unk>" in json.dumps(tok)


def test_bfloat16_autocast_on_cpu(tmp_path, corpus, capsys):
    out = tmp_path / "bf16"
    rc, res = run(["--data", corpus, "--out-dir", out, *TINY, "--dtype", "bfloat16", "--mlp", "swiglu"], capsys)
    assert rc == 0, res.err
    assert "autocast bfloat16" in res.out
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])
    weights, _ = checkpoint.load_weights(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32


def test_tiktoken_file_tokenizer_through_the_cli(tmp_path, corpus, capsys):
    from test_tokenizers import _tiny_tiktoken_file

    path = _tiny_tiktoken_file(tmp_path / "tiny.tiktoken")
    out = tmp_path / "tk"
    rc, res = run(["--data", corpus, "--out-dir", out, *TINY, "--tokenizer", f"tiktoken:{path}"], capsys)
    assert rc == 0, res.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"]["kind"] == "tiktoken"
    assert cfg["model"]["vocab_size"] == cfg["tokenizer"]["vocab_size"] > 256
    os.unlink(path)  # the run's tokenizer.json carries the ranks: the run needs no outside file
    assert loading.load_model(out)[1].vocab_size == cfg["tokenizer"]["vocab_size"]


def test_crlf_corpus_gives_the_lf_tokens_unless_raw_newlines(tmp_path, corpus, capsys):
    text = Path(corpus).read_text(encoding="utf-8")
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    flags = [*TINY, "--max-iters", "1", "--eval-interval", "1"]
    for name, source, extra in (("lf", corpus, []), ("crlf", crlf, []), ("raw", crlf, ["--raw-newlines"])):
        rc, res = run(["--data", source, "--out-dir", tmp_path / name, *flags, *extra], capsys)
        assert rc == 0, res.err
    lf_ids = data.load_split(tmp_path / "lf", "train")
    assert np.array_equal(data.load_split(tmp_path / "crlf", "train"), lf_ids)
    raw_tok = loading.load_model(tmp_path / "raw")[1]
    assert "\r" in raw_tok.chars and "\r" not in loading.load_model(tmp_path / "crlf")[1].chars
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["train"]["raw_newlines"] is True


def test_progress_bar_and_device_auto(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same CPU run on a GPU machine
    flags = [f for f in TINY if f != "--no-progress"]
    rc, res = run(
        ["--data", corpus, "--out-dir", tmp_path / "p", *flags, "--device", "auto", "--no-gpu-defaults", "--progress"],
        capsys,
    )
    assert rc == 0
    assert f"device: {resolve_device('auto')}" in res.out  # auto resolved and printed
    assert "train:" in res.err and "10/10" in res.err  # tqdm's bar on stderr, to the last step


#: the model and settings of TINY for the Python API (the same run as the CLI's)
TINY_MODEL = {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}


def tiny_config(corpus, out_dir) -> TrainConfig:
    return tiny_train_config(
        corpus, out_dir, eval_iters=2, eval_interval=5, max_iters=10, log_interval=1, warmup_iters=2
    )


# ---- a GPU machine, simulated: torch.cuda.is_available() reports True (every CUDA tensor would then fail
# on this CPU-only torch, so whatever still runs never touched CUDA) -------------------------------------
no_real_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU machine; a real one is here")


def test_cpu_pinned_runs_ignore_a_visible_gpu(tmp_path, corpus, capsys, monkeypatch):
    """What every CPU training test rests on: --device cpu / device="cpu" trains where a GPU is visible
    exactly as where none is (device cpu, no GPU profile, the same losses), the CLI and the API alike."""
    rc, _ = run(["--data", corpus, "--out-dir", tmp_path / "plain", *TINY], capsys)
    assert rc == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rc, res = run(["--data", corpus, "--out-dir", tmp_path / "cli", *TINY], capsys)
    assert rc == 0, res.err
    assert "device: cpu" in res.out and "profile gpu" not in res.out
    from fastlm import Trainer

    config = tiny_config(corpus, tmp_path / "api")
    Trainer(config, TINY_MODEL).fit()
    assert "profile gpu" not in capsys.readouterr().out
    losses = [[r["loss"] for r in rows(tmp_path / name / "train_log.csv")] for name in ("plain", "cli", "api")]
    assert len(losses[0]) == 10 and losses[0] == losses[1] == losses[2]


@no_real_gpu
def test_an_unpinned_run_takes_the_gpu_and_its_profile(tmp_path, corpus, capsys, monkeypatch):
    """The other side: device auto on a machine that reports a GPU
    picks CUDA and fills the settings nobody chose from the GPU profile, so a test without a pin changes
    meaning there; on this CPU-only torch the run then fails at its first CUDA tensor."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tiny = TINY[2:]  # without --device cpu
    try:
        rc = main([str(a) for a in ["--data", corpus, "--out-dir", tmp_path / "r", *tiny]])
    except (AssertionError, RuntimeError) as e:  # raised where torch first touches CUDA
        rc = str(e)
    out = capsys.readouterr().out
    assert "profile gpu: " in out and "optimizer=adamw" in out
    assert rc != 0


@no_real_gpu
def test_resume_keeps_the_runs_device_where_a_gpu_is_visible(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "r"
    assert run(["--data", corpus, "--out-dir", out, *TINY, "--max-iters", "4"], capsys)[0] == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rc = main(["--resume", str(out), "--max-iters", "6", "--no-progress"])
    res = capsys.readouterr()
    assert rc == 0 and "device: cpu" in res.out, res.err


@pytest.mark.slow
def test_compile_flag_trains_and_saves_unwrapped_weights(tmp_path, corpus, capsys):
    """--compile wraps the model in torch.compile (inductor on CPU: ~30 s cold); the checkpoint holds
    the plain module's names, so generate/evaluate/resume load it without compiling."""
    out = tmp_path / "c"
    rc, res = run(
        ["--data", corpus, "--out-dir", out, *TINY, "--max-iters", "3", "--eval-interval", "3", "--compile"], capsys
    )
    assert rc == 0, res.err
    weights, _ = checkpoint.load_weights(out / "model.safetensors")
    assert weights and not any("_orig_mod" in k for k in weights)
    model, _, _ = loading.load_model(out)
    assert isinstance(model, torch.nn.Module)


def test_schedule_extended_on_resume_has_no_jump():
    """A cosine run planned for 100 steps, resumed at step 60 with max_iters 200: the LR continues
    from where it was and decays to the final LR at the new end (a recomputed cosine would jump up)."""
    old = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    before = LRSchedule(old)
    state = before.state()
    new = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=200)
    after = LRSchedule(new)
    after.load(state, step=60)
    assert after.lr(60) == pytest.approx(before.lr(60), rel=1e-12)
    lrs = [after.lr(s) for s in range(60, 201)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone, no jump back up
    assert lrs[-1] == pytest.approx(1e-4)
    assert LRSchedule(new).lr(61) > before.lr(60) * 1.2  # what plain recomputation would have done
    # the anchor is saved: resuming again (same max_iters) continues the same curve
    again = LRSchedule(new)
    again.load(after.state(), step=120)
    assert [again.lr(s) for s in range(120, 201)] == [after.lr(s) for s in range(120, 201)]
    # same max_iters: nothing changes (bit-exact resume)
    same = LRSchedule(old)
    same.load(state, step=60)
    assert [same.lr(s) for s in range(100)] == [before.lr(s) for s in range(100)]


def test_resume_with_more_steps_continues_the_lr(tmp_path, corpus, capsys):
    args = ["--data", corpus, *TINY, "--max-iters", "20", "--warmup-iters", "2", "--out-dir", tmp_path / "r"]
    rc = main([str(a) for a in args], callbacks=[CtrlCAfter(9)])
    assert rc == 130
    rc, _ = run(["--resume", tmp_path / "r", "--max-iters", "40", "--no-progress"], capsys)
    assert rc == 0
    lrs = [float(r["lr"]) for r in rows(tmp_path / "r" / "train_log.csv")]
    assert len(lrs) == 40
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # never rises after warm-up
    first = resolve_settings(TrainConfig(max_iters=20, warmup_iters=2, profile="cpu"), {}, "cpu").train
    planned = LRSchedule(first)  # the first session's schedule
    assert lrs[10] == pytest.approx(planned.lr(10), rel=1e-5)  # step 11 (first resumed) continues it
    assert lrs[-1] == pytest.approx(first.final_lr, rel=0.02)  # ... and ends at the final LR


TIMING_KEYS = {"tokens_per_s", "train_wall_s", "wall_s", "flops_per_s", "mfu"}  # measured, not computed


def test_python_api_runs_what_the_cli_runs(tmp_path, corpus, capsys):
    from fastlm import Trainer

    rc, _ = run(["--data", corpus, "--out-dir", tmp_path / "cli", *TINY], capsys)
    assert rc == 0
    config = tiny_config(corpus, tmp_path / "api")
    summary = Trainer(config, TINY_MODEL).fit()
    assert summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    cli_summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in TIMING_KEYS} == {
        k: v for k, v in cli_summary.items() if k not in TIMING_KEYS
    }
    assert rows(tmp_path / "api" / "train_log.csv") != [] and [
        r["loss"] for r in rows(tmp_path / "api" / "train_log.csv")
    ] == [r["loss"] for r in rows(tmp_path / "cli" / "train_log.csv")]
    # a GPTConfig works too (its vocab_size is the tokenizer's)
    model = GPTConfig(vocab_size=999, n_layer=1, n_embd=16, n_head=2, block_size=16, pos="rope", mlp="swiglu")
    again = Trainer(dataclasses.replace(config, out_dir=str(tmp_path / "api2")), model).fit()
    stored = json.loads((tmp_path / "api2" / "config.json").read_text())["model"]
    assert stored["vocab_size"] == json.loads((tmp_path / "api" / "config.json").read_text())["model"]["vocab_size"]
    assert stored["mlp"] == "swiglu" and again["steps"] == 10


class Recorder(Callback):
    def __init__(self, stop_at_eval=None):
        self.events, self.stop_at_eval = [], stop_at_eval

    def on_start(self, trainer):
        self.events.append(("start", trainer.progress.step))

    def on_step(self, trainer, step, loss):
        assert math.isfinite(loss)
        self.events.append(("step", step))

    def on_eval(self, trainer, step, losses):
        self.events.append(("eval", step, set(losses)))
        if step == self.stop_at_eval:
            trainer.request_stop()

    def before_publish(self, trainer, folder):
        assert (folder / "manifest.json").is_file()
        self.events.append(("save", trainer.progress.step))

    def on_end(self, trainer, summary):
        self.events.append(("end", summary["steps"]))


def test_callbacks_observe_and_stop_a_run(tmp_path, corpus, capsys):
    from fastlm import Trainer

    config = tiny_train_config(corpus, tmp_path / "r", eval_iters=1, eval_interval=3, max_iters=20)
    rec = Recorder(stop_at_eval=6)
    summary = Trainer(config, {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}, callbacks=[rec]).fit()
    # the request is seen at the end of the next step (where all ranks exchange it): step 7, which
    # is then evaluated and saved before the final evaluation
    assert summary["steps"] == 7 and summary["stopped_early"]
    assert rec.events == [
        ("start", 0),
        ("save", 0),
        ("step", 1),
        ("step", 2),
        ("step", 3),
        ("save", 3),
        ("eval", 3, {"train", "val"}),
        ("step", 4),
        ("step", 5),
        ("step", 6),
        ("save", 6),
        ("eval", 6, {"train", "val"}),
        ("step", 7),
        ("save", 7),
        ("eval", 7, {"train", "val"}),
        ("end", 7),
    ]
    assert json.loads((tmp_path / "r" / "latest").read_text())["step"] == 7


def test_resume_refuses_a_malformed_training_state(tmp_path, corpus, capsys):
    """state.json ships with a run: a bad scheduler/progress field (with a manifest that matches it)
    is one line and exit 2, not a traceback."""
    import hashlib

    out = tmp_path / "r"
    assert run(["--data", corpus, "--out-dir", out, *TINY], capsys)[0] == 0
    folder = checkpoint.latest_checkpoint_dir(out)
    for bad in ({"scale": "x", "bad": 0}, {"bad": 0}, [1, 2]):
        state = json.loads((folder / "state.json").read_text())
        state["scheduler"] = bad
        raw = json.dumps(state).encode()
        (folder / "state.json").write_bytes(raw)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["state.json"] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        rc, res = run(["--resume", out, "--max-iters", "12", "--no-progress"], capsys)
        assert rc == 2 and "state.json is malformed" in one_error_line(res), res.err
