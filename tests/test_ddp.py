"""Distributed training on CPU (gloo) through torchrun: two processes give the same losses as one
process with the same global batch, grad accumulation uses no_sync, and a 2-process run resumes."""

import csv
import json
import os
import sys

import pytest
import torch
from conftest import child_env, run_bounded

from fastlm.io import checkpoint
from fastlm.train import main

pytestmark = pytest.mark.slow

# --device cpu: gloo on CPU also where a GPU is visible (NCCL would want one GPU per process)
COMMON = [  # float32: one process and two agree to rounding only where the step is not bf16-rounded
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--n-layer",
    "1",
    "--n-embd",
    "16",
    "--n-head",
    "2",
    "--block-size",
    "16",
    "--eval-iters",
    "2",
    "--eval-interval",
    "3",
    "--sample-tokens",
    "0",
    "--no-progress",
    "--threads",
    "1",
    "--log-interval",
    "1",
    "--lr-schedule",
    "constant",
    "--warmup-iters",
    "0",
    "--lr",
    "0.01",
]


def _gloo_ok():
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _torchrun(args, nproc=2, script=None, timeout_s=300, **env):
    """torchrun over ``fastlm.train`` (or ``script``); the launcher and its ranks are killed, and the test
    fails, past ``timeout_s``."""
    target = [script] if script else ["-m", "fastlm.train"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        *target,
        *map(str, args),
    ]
    return run_bounded(cmd, timeout_s, env=child_env(OMP_NUM_THREADS="1", **env))


def _losses(run):
    with open(run / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _evals(run):
    with open(run / "metrics.csv", newline="") as f:
        return [(float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


@pytest.mark.skipif(not _gloo_ok(), reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_match_one_process_and_resume(tmp_path, corpus, capsys, optimizer):
    common = [*COMMON, "--optimizer", optimizer]
    # 1 process: micro-batch 8, no accumulation, 9 steps
    one = tmp_path / "one"
    assert main(["--data", str(corpus), "--out-dir", str(one), *common, "--batch-size", "8", "--max-iters", "9"]) == 0
    capsys.readouterr()
    # 2 processes: micro-batch 2 x grad_accum 2 x world 2 = the same 8 sequences per step; 6 steps, then resume to 9
    two = tmp_path / "two"
    res = _torchrun(
        ["--data", corpus, "--out-dir", two, *common, "--batch-size", "2", "--grad-accum", "2", "--max-iters", "6"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 x grad_accum 2 x world 2 = 8 sequences" in res.stdout
    assert res.stdout.count("done: best val loss") == 1  # only rank 0 reports and writes
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["world_size"] == 2
    ck = checkpoint.load_checkpoint(two)
    assert len(ck["ranks"]) == 2 and ck["state"]["step"] == 6
    # saved weights are the plain model's (no 'module.' prefix from DDP)
    assert ck["model"] and all(not k.startswith("module.") for k in ck["model"])
    res = _torchrun(["--resume", two, "--max-iters", "9", "--no-progress", "--device", "cpu"])
    assert res.returncode == 0, res.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 9
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    e1, e2 = _evals(one), _evals(two)
    assert len(e1) == len(e2) == 3
    assert [x for pair in e1 for x in pair] == pytest.approx([x for pair in e2 for x in pair], rel=1e-5, abs=1e-6)
    w1, _ = checkpoint.load_weights(one / "model.safetensors")
    w2, _ = checkpoint.load_weights(two / "model.safetensors")
    assert w1 and set(w1) == set(w2)
    # Muon: Newton-Schulz lifts the update's small singular directions by ~1/sigma, so the last-bit
    # differences of a 2-rank gradient sum reach ~2e-5 in the weights (moves of lr 0.02 per step).
    # AdamW divides each gradient by its running RMS: an element whose gradient is near rounding level
    # (the default model's smear feeds each token's embedding row a second, small gradient) moves by a
    # step its last bits decide, up to the rate (0.05 for the embeddings here). So: every element
    # within 1e-3, and all but 1% of each weight's within the rounding of the one-process run.
    atol = 1e-4 if optimizer == "muon" else 1e-5
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-3)
        off = ((w1[k] - w2[k]).abs() > atol + 1e-4 * w2[k].abs()).float().mean().item()
        assert off <= 0.01, (k, off)
    # the whole-split evaluation is shared by the ranks and gives the one-process figure
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-5)
    # resuming a 2-process run with one process is refused with one line
    assert main(["--resume", str(two), "--max-iters", "12", "--device", "cpu"]) == 2
    assert "2 process(es)" in capsys.readouterr().err


@pytest.mark.skipif(not _gloo_ok(), reason="torch.distributed with gloo is not available")
def test_a_failed_save_on_rank0_ends_every_rank(tmp_path, corpus):
    """Rank 0's save fails (disk full) at step 3: every rank stops at once (no rank waits at a
    collective until the timeout), the error is printed once, and the failed save leaves nothing.
    A rank left waiting would sit out the hour's collective timeout: the 240 s guard kills the job
    and fails the test long before (the job itself takes seconds)."""
    run = tmp_path / "run"
    hooks = os.path.join(os.path.dirname(__file__), "train_hooks.py")
    res = _torchrun(
        [
            "--data",
            corpus,
            "--out-dir",
            run,
            *COMMON,
            "--batch-size",
            "2",
            "--max-iters",
            "9",
            "--dist-timeout-s",
            "3600",
        ],
        script=hooks,
        timeout_s=240,
        HOOK_FAIL_SAVE_AT=3,
    )
    assert res.returncode != 0
    assert res.stderr.count("error: I/O error: No space left on device") == 1, res.stderr[-3000:]
    assert "fastlm/" not in res.stderr  # no traceback from the ranks (torchrun's own report may follow)
    assert json.loads((run / "latest").read_text())["step"] == 0  # the last good checkpoint stays
    assert [p.name for p in run.glob("ckpt-*")] == [checkpoint.latest_checkpoint_dir(run).name]
