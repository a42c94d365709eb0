"""Distributed training on CPU (gloo) through torchrun: two processes give the same losses as one
process with the same global batch, grad accumulation uses no_sync, and a 2-process run resumes."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fastlm import checkpoint, data
from fastlm.train import main

pytestmark = pytest.mark.slow

# --device cpu: gloo on CPU also where a GPU is visible (NCCL would want one GPU per process)
COMMON = ["--device", "cpu", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
          "--eval-iters", "2", "--eval-interval", "3", "--sample-tokens", "0", "--no-progress", "--threads",
          "1", "--log-interval", "1", "--lr-schedule", "constant", "--warmup-iters", "0", "--lr", "0.01"]


def _gloo_ok():
    import torch.distributed as dist
    return dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    p.write_text(data.default_corpus().read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return p


def _torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "fastlm.train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _losses(run):
    with open(run / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _evals(run):
    with open(run / "metrics.csv", newline="") as f:
        return [(float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


@pytest.mark.skipif(not _gloo_ok(), reason="torch.distributed with gloo is not available")
def test_two_processes_match_one_process_and_resume(tmp_path, corpus, capsys):
    # 1 process: micro-batch 8, no accumulation, 9 steps
    one = tmp_path / "one"
    assert main(["--data", str(corpus), "--out-dir", str(one), *COMMON, "--batch-size", "8", "--max-iters", "9"]) == 0
    capsys.readouterr()
    # 2 processes: micro-batch 2 x grad_accum 2 x world 2 = the same 8 sequences per step; 6 steps, then resume to 9
    two = tmp_path / "two"
    res = _torchrun(["--data", corpus, "--out-dir", two, *COMMON, "--batch-size", "2", "--grad-accum", "2",
                     "--max-iters", "6"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 x grad_accum 2 x world 2 = 8 sequences" in res.stdout
    assert res.stdout.count("done: best val loss") == 1  # only rank 0 reports and writes
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["world_size"] == 2
    ck = checkpoint.load_checkpoint(two)
    assert len(ck["ranks"]) == 2 and ck["state"]["step"] == 6
    # saved weights are the plain model's (no 'module.' prefix from DDP)
    assert all(not k.startswith("module.") for k in ck["model"])
    res = _torchrun(["--resume", two, "--max-iters", "9", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 9
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    e1, e2 = _evals(one), _evals(two)
    assert len(e1) == len(e2) == 3
    assert [x for pair in e1 for x in pair] == pytest.approx([x for pair in e2 for x in pair], rel=1e-5, abs=1e-6)
    w1, _ = checkpoint.load_weights(one / "model.safetensors")
    w2, _ = checkpoint.load_weights(two / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    # resuming a 2-process run with one process is refused with one line
    assert main(["--resume", str(two), "--max-iters", "12"]) == 2
    assert "2 process(es)" in capsys.readouterr().err
