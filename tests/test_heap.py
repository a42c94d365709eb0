"""keep_cpu_heap: a CPU training run keeps its freed memory instead of faulting it in again every step."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from tiny_run import tiny_train_config

from fastlm.training import trainer as trainer_mod
from fastlm.training.trainer import Trainer

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# What a training step does to the heap, in small: allocate tensors of 256 KiB to 4 MiB (120 MiB in all),
# write them, free them all, again and again. Prints whether the thresholds were set, then the minor
# page faults per round after three rounds of warm-up.
ROUNDS = textwrap.dedent(
    """
    import resource, torch
    from fastlm.training.runtime import keep_cpu_heap

    kept = keep_cpu_heap()
    sizes = [(1 << 18) * k for k in (1, 3, 8, 2, 16, 5, 8, 1, 12, 4)] * 8

    def one_round():
        tensors = [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes]
        del tensors

    for _ in range(3):
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    """
)


def _faults_per_round(keep: str):
    env = {**os.environ, "FASTLM_KEEP_HEAP": keep}
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's (mallopt); elsewhere keep_cpu_heap does nothing")
def test_freed_memory_is_reused_without_page_faults():
    pages = 120 * 256  # written per round
    # glibc's defaults: the round's memory goes back to the system and faults in again, page by page,
    # in most processes (in some, a block left above it by chance pins the heap's top: then no fault
    # at all), so fresh processes are tried until one shows it
    baseline = []
    for _ in range(10):
        kept, faults = _faults_per_round("0")
        assert not kept
        baseline.append(faults)
        if faults > 0.5 * pages:
            break
    assert max(baseline) > 0.5 * pages, baseline
    for _ in range(2):  # kept: in every process
        kept, faults = _faults_per_round("1")
        assert kept and faults < 0.01 * pages, faults


def test_elsewhere_or_when_told_the_heap_is_left_alone(monkeypatch):
    from fastlm.training import runtime

    for libc, env in ((("", ""), "1"), (("glibc", "2.39"), "0")):  # musl/macOS/Windows; FASTLM_KEEP_HEAP=0
        monkeypatch.setattr(runtime, "_heap_kept", None)
        monkeypatch.setattr(runtime.platform, "libc_ver", lambda: libc)
        monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: pytest.fail("mallopt called"))
        monkeypatch.setenv("FASTLM_KEEP_HEAP", env)
        assert runtime.keep_cpu_heap() is False


def test_a_cpu_training_run_keeps_its_heap(monkeypatch, tmp_path, corpus):
    calls = []
    monkeypatch.setattr(trainer_mod, "keep_cpu_heap", lambda: calls.append("kept") or True)
    cfg = tiny_train_config(corpus, tmp_path / "run", max_iters=2, eval_interval=2, eval_iters=1)
    Trainer(cfg, {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}).fit()
    assert calls == ["kept"]
