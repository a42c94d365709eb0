"""benchmarks.gpu_check --dry-run: every step runs on CPU at tiny shapes (Triton interpreter) and
writes, for every step, rows with a value or a reason; CUDA steps are recorded as skipped."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "correct", "headline", "fwdbwd", "cuda_attn", "swiglu", "train_step", "pytest_gpu")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                           "--budget-s", "300"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc, rows, out


def test_dry_run_writes_a_row_with_a_value_or_a_reason_for_every_step(dry_run):
    proc, rows, _ = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in STEPS:
        mine = [r for r in rows if r["step"] == step]
        assert any(r["name"] == "step" and r["status"] == "ok" for r in mine), (step, mine[-1:])
        results = [r for r in mine if r["name"] != "step"]
        assert results, f"step {step} recorded nothing"
        for r in results:
            assert r["status"] in ("ok", "skipped", "error", "fail"), r
            assert r["status"] == "ok" or r.get("reason") or r.get("errors"), r
    assert rows[-1]["name"] == "summary"


def test_dry_run_measures_what_cpu_can(dry_run):
    _, rows, _ = dry_run
    by_name = {(r["step"], r["name"]): r for r in rows}
    assert by_name[("env", "copy_bandwidth")]["GBps"] > 0
    assert by_name[("env", "matmul_rate")]["TFLOPs"] >= 0
    correct = [r for r in rows if r["step"] == "correct" and r["name"].startswith("triton/")]
    assert {r["dtype"] for r in correct if "dtype" in r} == {"float16", "float32"}
    assert all(r["status"] == "ok" for r in correct if "dtype" in r), [r for r in correct if r["status"] != "ok"]
    assert by_name[("correct", "triton/bf16")]["status"] == "skipped"
    headline = [r for r in rows if r["step"] == "headline" and r["name"].startswith("triton_fwd/")]
    assert headline and all(r["status"] == "ok" and r["ms"] > 0 for r in headline)
    # registers and spills of each timed config, from its sm_90 compile (the cubin, ptxas)
    resources = [r for r in rows if r["step"] == "headline" and r["name"].startswith("triton_fwd_resources/")]
    assert {r["name"].split("/", 1)[1] for r in resources} == {r["config"] for r in headline}
    assert all(r["status"] == "ok" and r["ptxas_regs"] > 0 for r in resources), resources
    for r in rows:
        if r["step"] in ("cuda_attn",) and r["name"] != "step":
            assert r["status"] == "skipped" and ("GPU" in r["reason"] or "cuda_direct not importable" in r["reason"])
    assert by_name[("pytest_gpu", "pytest")]["collected"] > 0


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path),
                           "--steps", "env,nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1
    if not torch.cuda.is_available():  # a real run needs a GPU: one line saying to use --dry-run
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--dry-run" in proc.stderr
        assert not (tmp_path / "results.jsonl").exists()


def test_report_turns_the_rows_into_tables_and_a_plot(dry_run, tmp_path):
    _, rows, out = dry_run
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--gpu-check", str(out / "results.jsonl"),
                           "--plots", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "**headline**" in text and "**swiglu**" in text and "**train_step**" in text
    for r in rows:
        if r["step"] == "headline" and r["name"].startswith("triton_fwd/"):
            assert f"| {r['name']} |" in text
        if r["status"] == "skipped" and r["name"] != "step":
            assert f"{r['step']}/{r['name']}: skipped" in text
    assert list(tmp_path.glob("gpu_check_headline_*.png"))


def test_tree_kernels_import_without_an_install():
    """The GPU image has no install: with the editable-install finder removed, fastlm.kernels still
    imports from the tree's kernels/ folder (and fastlm.ops reaches it)."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import fastlm\n"
        "print(list(fastlm.kernels.__path__))\n"
        "import fastlm.kernels.attention as a, fastlm.kernels.launch as l\n"
        "from fastlm import ops\n"
        "print(a.__file__); print(ops.backend._load('triton') is not None)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == repr([str(ROOT / "kernels")])  # mapped from the tree by `import fastlm`
    assert lines[1] == str(ROOT / "kernels" / "attention.py") and lines[2] == "True"


def test_a_failing_or_slow_step_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """Each step runs under its own time limit; an error or a time-out becomes the step's row and
    the next step still runs. Rows are on disk the moment they are written."""
    import time
    from benchmarks import gpu_check as G
    run = G.Run(tmp_path, budget_s=20, dry_run=True)
    monkeypatch.setitem(G.STEP_SHARE, "headline", 0.01)  # the 5 s floor

    def boom(r, deadline):
        r.row("partial", status="ok", value=1)
        raise ValueError("boom")

    G.run_step(run, "env", boom)
    t = time.monotonic()
    G.run_step(run, "headline", lambda r, deadline: time.sleep(60))
    assert time.monotonic() - t < 15
    G.run_step(run, "swiglu", lambda r, deadline: r.row("value", status="ok", x=2))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["name"], r["status"]) for r in rows]
    assert steps == [("env", "partial", "ok"), ("env", "step", "error"), ("headline", "step", "timeout"),
                     ("swiglu", "value", "ok"), ("swiglu", "step", "ok")]
    assert "boom" in rows[1]["reason"] and "time limit" in rows[2]["reason"]


def test_report_optimizer_and_default_step_sections():
    """The CPU model rows of benchmarks/report.py: the optimizer's share and the default-step ratio."""
    from benchmarks import report

    shape = {"batch": 16, "block": 128, "n_layer": 3, "n_embd": 96, "mlp": "swiglu"}
    rows = [{"suite": "model", "op": "optimizer_step-default-cpu", "variant": v, "min_ms": step, "median_ms": step,
             "train_step_ms": 50.0, "step_fraction": step / 50.0, "shape": shape}
            for v, step in (("muon", 3.0), ("muon-pytorch", 6.0))]
    rows.append({"suite": "model", "op": "default_step-default-cpu", "variant": "muon", "backend": "auto",
                 "fastlm_median_ms": 50.0, "plain_median_ms": 70.0, "speedup_median": 1.4, "fastlm_min_ms": 48.0,
                 "plain_min_ms": 66.0, "speedup_min": 66.0 / 48.0, "shape": shape})
    text = "\n".join(report.optimizer_section(rows) + report.default_step_section(rows))
    assert "| default-cpu (3x96) | muon | 3 | 3 | 50 | 6.0% |" in text
    assert "| muon-pytorch |" in text and "12.0%" in text
    assert "1.40x" in text and "1.38x" in text
    assert report.optimizer_section([]) == []
