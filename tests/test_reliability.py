"""Reliability of python -m fastlm.train as a process: SIGKILL at random moments (also inside a
checkpoint save) never leaves an unloadable run, Ctrl-C / SIGTERM save and exit cleanly, a
non-finite loss stops naming the step, and bad input gives one line and no traceback."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env
from tiny_run import TINY_RUN

from fastlm.io import checkpoint, loading
from fastlm.text import data
from fastlm.train import main
from fastlm.training.trainer import Callback

# --device cpu: the same CPU run also where a GPU is visible
TINY = [*TINY_RUN, "--eval-iters", "1"]


def _env(**extra):
    env = child_env(**extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


HOOKS = str(Path(__file__).with_name("train_hooks.py"))  # fastlm.train with sleeping test callbacks


def _spawn(args, **env):
    return subprocess.Popen(
        [sys.executable, HOOKS, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
    )


def _latest_step(run):
    return json.loads((run / "latest").read_text())["step"]


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_resumable_run(tmp_path, corpus):
    rng = random.Random(1234)
    run = tmp_path / "run"
    args = [
        "--data",
        corpus,
        *TINY,
        "--max-iters",
        "100000",
        "--eval-interval",
        "2",
        "--lr-schedule",
        "constant",
        "--log-interval",
        "1",
    ]
    # every save pauses 30 ms between writing its directory and publishing it: kills land inside saves
    proc = _spawn([*args, "--out-dir", run], HOOK_SAVE_PAUSE=0.03)
    deadline = time.time() + 120
    while not (run / "latest").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    steps = []
    for trial in range(20):
        if trial % 2 == 0:
            time.sleep(rng.uniform(0.0, 1.5))  # anywhere, start-up included
        else:  # once the child publishes a new checkpoint it is in its loop, which is mostly saving
            last = _latest_step(run)
            while _latest_step(run) == last:
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline + 60 * (trial + 1)
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # after every kill: the published checkpoint and the best model load
        ck = checkpoint.load_checkpoint(run)
        model, tok, cfg = loading.load_model(run)
        steps.append(ck["state"]["step"])
        assert steps[-1] >= max(steps[:-1], default=0)
        proc = _spawn(["--resume", run, "--no-progress", "--device", "cpu"], HOOK_SAVE_PAUSE=0.03)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    advanced = sum(b > a for a, b in zip(steps, steps[1:]))
    assert advanced >= 10, steps  # at least every other kill hit a running training loop
    # a last resume runs to the end
    final = _latest_step(run) + 4
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastlm.train",
            "--resume",
            str(run),
            "--max-iters",
            str(final),
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == final
    assert len(list(run.glob("ckpt-*"))) == 1
    # ... and 20 kills later its losses are bit for bit those of a run that was never interrupted
    clean = tmp_path / "clean"
    res = subprocess.run(
        [sys.executable, "-m", "fastlm.train", *map(str, args), "--out-dir", str(clean), "--max-iters", str(final)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr

    def rows(path, cols):
        lines = [line.split(",") for line in path.read_text().splitlines()]
        idx = [lines[0].index(c) for c in cols]
        return [[r[i] for i in idx] for r in lines[1:]]

    got = rows(run / "train_log.csv", ["step", "loss", "lr"])
    assert [int(r[0]) for r in got] == list(range(1, final + 1))  # one row per step, none repeated
    assert got == rows(clean / "train_log.csv", ["step", "loss", "lr"])
    evals = ["step", "train_loss", "val_loss", "lr", "tokens"]
    assert rows(run / "metrics.csv", evals) == rows(clean / "metrics.csv", evals)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_exits_cleanly(tmp_path, corpus, sig):
    run = tmp_path / "run"
    proc = _spawn(
        [
            "--data",
            corpus,
            "--out-dir",
            run,
            *TINY,
            "--max-iters",
            "100000",
            "--eval-interval",
            "1000",
            "--log-interval",
            "1",
        ],
        HOOK_STEP_SLEEP=0.01,
    )
    deadline = time.time() + 120
    while not (run / "train_log.csv").exists() or len((run / "train_log.csv").read_text().splitlines()) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (out, err)
    assert "Traceback" not in err
    assert f"interrupted ({sig.name})" in out and "checkpoint saved" in out
    last_logged = int((run / "train_log.csv").read_text().splitlines()[-1].split(",")[0])
    assert _latest_step(run) == last_logged >= 3  # the checkpoint holds the very last step
    assert main(["--resume", str(run), "--max-iters", str(last_logged + 2), "--no-progress", "--device", "cpu"]) == 0


class PoisonAfter(Callback):
    """Set one weight to NaN after optimizer step ``step``: the next step's loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, step, loss):
        if step == self.step:
            with torch.no_grad():
                trainer.raw_model.wte.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_naming_the_step(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    rc = main(
        ["--data", str(corpus), "--out-dir", str(run), *TINY, "--max-iters", "20", "--eval-interval", "5"],
        callbacks=[PoisonAfter(7)],
    )
    err = capsys.readouterr().err
    assert rc == 3
    assert "loss is nan at step 8" in err
    assert _latest_step(run) == 5  # the last good checkpoint is kept
    loading.load_model(run)
    assert not (run / "summary.json").exists()


HOSTILE_CLI = [
    ["--data", "/nonexistent/corpus.txt"],
    ["--lr", "nan"],
    ["--n-embd", "30", "--n-head", "4"],
    ["--batch-size", "zero"],
    ["--resume", "/nonexistent/run"],
]


@pytest.mark.parametrize("flags", HOSTILE_CLI, ids=[" ".join(f) for f in HOSTILE_CLI])
def test_cli_bad_input_one_line_no_traceback(tmp_path, flags):
    res = subprocess.run(
        [sys.executable, "-m", "fastlm.train", "--out-dir", str(tmp_path / "o"), *TINY, *flags],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr


def test_cli_binary_corpus_and_help(tmp_path):
    binary = tmp_path / "x.bin"
    binary.write_bytes(os.urandom(4096))
    res = subprocess.run(
        [sys.executable, "-m", "fastlm.train", "--data", str(binary), "--out-dir", str(tmp_path / "o"), *TINY],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and str(binary) in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "fastlm.train", "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert res.returncode == 0 and "--n-layer" in res.stdout and "profiles" in res.stdout.lower()


class FailSaveAt(Callback):
    """The save of one step fails as on a full disk, after its files were written."""

    def __init__(self, step):
        self.step = step

    def before_publish(self, trainer, folder):
        if trainer.progress.step == self.step:
            assert folder.is_dir() and (folder / "manifest.json").is_file()
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))


def test_disk_full_save_exits_4_and_cleans_up(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    rc = main(
        ["--data", str(corpus), "--out-dir", str(run), *TINY, "--max-iters", "20", "--eval-interval", "5"],
        callbacks=[FailSaveAt(10)],
    )
    err = capsys.readouterr().err
    assert rc == 4  # I/O failure, not "bad input" (2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: I/O error: No space left on device ({run}"), err
    assert _latest_step(run) == 5
    # the failed save removed its folder: only the published checkpoint is left
    assert [p.name for p in run.glob("ckpt-*")] == [checkpoint.latest_checkpoint_dir(run).name]
    assert main(["--resume", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def test_resume_clears_leftovers_of_interrupted_saves(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["--data", str(corpus), "--out-dir", str(run), *TINY, "--max-iters", "4", "--eval-interval", "2"]) == 0
    (run / "ckpt-00000099-left").mkdir()
    (run / "ckpt-00000099-left" / "model.safetensors").write_bytes(b"partial")
    (run / ".model.safetensors.123.tmp").write_bytes(b"partial")
    (run / "notes.txt").write_text("mine")  # a user's file stays
    assert main(["--resume", str(run), "--max-iters", "6", "--no-progress", "--device", "cpu"]) == 0
    assert not (run / "ckpt-00000099-left").exists() and not (run / ".model.safetensors.123.tmp").exists()
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("code,raised", [(errno.EIO, True), (errno.ENOSPC, True), (errno.EINVAL, False)])
def test_fsync_dir_raises_real_errors(tmp_path, monkeypatch, code, raised):
    from fastlm.files import atomic

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    if raised:
        with pytest.raises(OSError) as e:
            atomic.fsync_dir(tmp_path)
        assert e.value.errno == code
    else:
        atomic.fsync_dir(tmp_path)  # a filesystem that cannot fsync directories: skipped


def test_token_cache_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    import numpy as np

    from fastlm.files import atomic

    synced = []
    real = atomic.fsync_dir

    def spy(path):
        synced.append(Path(path).resolve())
        real(path)

    monkeypatch.setattr(atomic, "fsync_dir", spy)
    monkeypatch.setattr(data, "fsync_dir", spy)
    data.save_splits(tmp_path, {"train": np.arange(10), "val": np.arange(5)}, 16)
    assert synced.count((tmp_path / "data").resolve()) == 2  # after each split file's rename
    assert synced[-1] == tmp_path.resolve()  # then the run folder (the data/ entry itself)
