"""benchmarks.gpu_check --dry-run: every step runs on CPU at tiny shapes (Triton interpreter) and
writes a row with a value or a reason for every case; a row with an error, a failed check or a
case that vanished fails here, and so does a failed or empty test step. Hang guards are subprocess
time-outs (a hung run fails the test, never the suite's clock)."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DRY_TIMEOUT_S = 1500  # the hang guard of the dry run (its own budget is 900 s; it takes ~2 min)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**__import__("os").environ, "FASTLM_COMMIT": "c0ffee1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--budget-s", "900"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DRY_TIMEOUT_S,
        env=env,
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc, rows, out


def _by_name(rows):
    return {(r["step"], r["name"]): r for r in rows}


def test_every_step_finishes_with_no_error_or_failed_row(dry_run):
    from benchmarks.gpu_check import STEPS

    proc, rows, _ = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in STEPS:
        end = _by_name(rows).get((step, "step"))
        assert end is not None and end["status"] == "ok", (step, end)
        assert [r for r in rows if r["step"] == step and r["name"] != "step"], f"step {step} recorded nothing"
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    assert not bad, bad
    assert all(r.get("reason") for r in rows if r["status"] == "skipped")
    assert rows[-1]["name"] == "summary" and {r["commit"] for r in rows} == {"c0ffee1"}


def test_every_correctness_case_has_its_row(dry_run):
    """No case drops out silently: one ok row per case and dtype (float16 in the interpreter), an
    explicit skip for bfloat16 and for the CUDA kernels; each row carries the four outputs' errors."""
    from types import SimpleNamespace

    from benchmarks import gpu_steps

    _, rows, _ = dry_run
    expected = {f"triton/{c.label}/float16" for c in gpu_steps._attn_cases(SimpleNamespace(dry=True))}
    got = {r["name"]: r for r in rows if r["step"] == "correct" and r["name"].startswith("triton/")}
    assert set(got) == expected | {"triton/bf16"}
    assert got.pop("triton/bf16")["status"] == "skipped"
    for r in got.values():
        assert r["status"] == "ok" and set(r["errors"]) == (
            {"out", "dq", "dk", "dv"} if r["mode"] == "full" else {"out"}
        ), r
        assert all(e["ok"] and e["err"] <= e["bound"] for e in r["errors"].values()), r
    assert _by_name(rows)[("correct", "cuda")]["status"] == "skipped"


def test_timings_follow_their_checks(dry_run):
    """Headline configs, sweep points, SwiGLU and the training step: each timed row (ms > 0) has a
    passing check before it; the registers/spills of every pinned kernel come from the sm_90
    compile with no spills."""
    _, rows, _ = dry_run
    by = _by_name(rows)
    headline = [r for r in rows if r["step"] == "headline" and r["name"].startswith("triton_fwd/")]
    assert len(headline) == 4 and all(r["status"] == "ok" and r["ms"] > 0 for r in headline), headline
    for r in headline:
        d = r["shape"][3]
        assert by[("headline", f"config/fwd/{r['config']}/d{d}")]["status"] == "ok"
    for point in ("d16/t64", "d32/t128"):
        assert by[("sweep", f"sweep/check/{point}")]["status"] == "ok"
        for timed in ("triton/fwd", "sdpa_default/fwd", "triton/fwd+bwd", "sdpa_default/fwd+bwd"):
            r = by[("sweep", f"sweep/{timed}/{point}")]
            assert r["status"] == "ok" and r["ms"] > 0 and "TFLOPs" in r, r
    for case in ("t64/w16", "t64/docs4"):  # masked attention: checked against float64, then timed
        assert by[("sweep", f"masked/{case}/check")]["status"] == "ok"
        assert all(
            by[("sweep", f"masked/{case}/{label}")]["ms"] > 0
            for label in ("fastlm", "sdpa_dense_mask", "fastlm_dense_causal")
        )
    for name in ("triton_split", "triton_packed", "eager_split"):
        assert by[("swiglu", f"check/{name}")]["status"] == "ok"
        assert by[("swiglu", f"{name}/fwd")]["ms"] > 0
    assert by[("train_step", "gpt2_small/check")]["status"] == "ok"
    assert by[("train_step", "gpt2_small/auto")]["tokens_per_s"] > 0
    resources = [
        r for r in rows if r["step"] == "resources" and r["name"].startswith("resources/") and r["status"] == "ok"
    ]
    assert {(r["kind"], r["head_dim"], r["masks"]) for r in resources} == {
        (k, d, m) for k in ("fwd", "dkdv", "dq", "decode") for d in (64, 128) for m in ("none", "window+docs")
    }
    assert all(r["ptxas_regs"] > 0 and r["ptxas_spill_store_bytes"] == 0 for r in resources)
    configs = [r for r in rows if r["name"].startswith("config/")]  # fwd's were checked before the headline
    assert {r["kind"] for r in configs} == {"fwd", "dkdv", "dq", "decode"}
    assert {r["kind"] for r in rows if r["step"] == "configs" and "kind" in r} == {"dkdv", "dq", "decode"}


def test_pytest_step_ran_tests_and_left_per_test_results(dry_run):
    _, rows, out = dry_run
    by = _by_name(rows)
    pytest_row = by[("pytest_gpu", "pytest")]
    assert pytest_row["status"] == "ok" and pytest_row["passed"] > 0, pytest_row
    assert pytest_row["failed"] == 0 and pytest_row["error"] == 0 and pytest_row["counts_from"] == "junit"
    streamed = [json.loads(line) for line in (out / "pytest_stream.jsonl").read_text().splitlines()]
    assert sum(r["outcome"] == "passed" for r in streamed) == pytest_row["passed"]
    assert by[("pytest_gpu", "collect")]["collected"] > 0
    assert by[("pytest_gpu", "ext_build")]["status"] == "skipped"


def test_summary_is_last_and_short(dry_run):
    proc, _, out = dry_run
    tail = proc.stdout.strip().splitlines()
    start = max(i for i, line in enumerate(tail) if line.startswith("====="))
    summary = tail[start + 1 :]
    assert 3 <= len(summary) <= 41 and summary[-1].startswith("rerun: ")
    assert (out / "summary.txt").read_text().splitlines() == summary


def test_summary_keeps_to_forty_lines_with_many_failures():
    from benchmarks.gpu_check import SUMMARY_LINES, summary_lines

    rows = [
        {
            "run": "r",
            "device": "d",
            "commit": "c",
            "step": "correct",
            "name": f"case{i}",
            "status": "fail",
            "errors": {"out": {"err": 2.0, "bound": 1.0, "ok": False}},
        }
        for i in range(100)
    ]
    lines = summary_lines(rows)
    assert len(lines) == SUMMARY_LINES and "more not-ok rows" in lines[-1]
    assert "FAIL correct/case0: out 2.00e+00>1.00e+00" in lines[2]


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--steps", "env,nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1
    if not torch.cuda.is_available():  # a real run needs a GPU: one line saying to use --dry-run
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--dry-run" in proc.stderr
        assert not (tmp_path / "results.jsonl").exists()


def test_documented_commands_are_valid():
    """The docstring's and gpu_suite.sh's commands write to $OUT with the budget, name real steps,
    and pass the commit."""
    from benchmarks import gpu_check

    doc = gpu_check.__doc__
    assert 'python3 -m benchmarks.gpu_check --out "$OUT" --budget-s 420' in doc and "FASTLM_COMMIT=" in doc
    for steps in re.findall(r"--steps ([a-z_,]+)", doc):
        assert set(steps.split(",")) <= set(gpu_check.STEPS), steps
    suite = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    assert '--out "$OUT"' in suite and "--budget-s" in suite and "FASTLM_COMMIT" in suite
    assert "out/gpu" not in suite


def test_commit_without_git_hashes_the_sources(monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.delenv("FASTLM_COMMIT", raising=False)

    def no_git(*args, **kwargs):
        raise OSError("no git here")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_git)
    commit = gpu_check.source_commit()
    assert re.fullmatch(r"tree-[0-9a-f]{12}", commit) and gpu_check.source_commit() == commit
    monkeypatch.setenv("FASTLM_COMMIT", "abc1234")
    assert gpu_check.source_commit() == "abc1234"


def test_report_turns_the_rows_into_tables_and_a_plot(dry_run, tmp_path):
    _, rows, out = dry_run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.report",
            "--gpu-check",
            str(out / "results.jsonl"),
            "--plots",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "**headline**" in text and "**swiglu**" in text and "**train_step**" in text and "**sweep**" in text
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
        "print(a.__file__); print(ops.backend._load('triton') is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == repr([str(ROOT / "kernels")])  # mapped from the tree by `import fastlm`
    assert lines[1] == str(ROOT / "kernels" / "attention.py") and lines[2] == "True"


def test_a_failing_or_slow_step_is_recorded_and_the_run_goes_on(tmp_path):
    """Each step runs under its own time limit; an error or a time-out becomes the step's row and
    the next step still runs. Rows are on disk the moment they are written. (In a subprocess with
    a time-out: a limit that failed to fire fails this test instead of hanging the suite.)"""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from benchmarks import gpu_check as G
        run = G.Run(Path({str(tmp_path)!r}), budget_s=20, dry_run=True)
        G.STEP_SHARE["headline"] = 0.01  # the 5 s floor

        def boom(r, deadline):
            r.row("partial", status="ok", value=1)
            raise ValueError("boom")

        G.run_step(run, "env", boom)
        G.run_step(run, "headline", lambda r, deadline: time.sleep(600))
        G.run_step(run, "swiglu", lambda r, deadline: r.row("value", status="ok", x=2))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["name"], r["status"]) for r in rows]
    assert steps == [
        ("env", "partial", "ok"),
        ("env", "step", "error"),
        ("headline", "step", "timeout"),
        ("swiglu", "value", "ok"),
        ("swiglu", "step", "ok"),
    ]
    assert "boom" in rows[1]["reason"] and "time limit" in rows[2]["reason"]


# ---- the test step: results under a time limit ---------------------------------------------------
def _test_folder(tmp_path, sleep_s=600):
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "test_a_quick.py").write_text(
        textwrap.dedent("""
        import pytest
        def test_one(): pass
        def test_two(): pass
        def test_three(): pass
        def test_fails(): assert 1 == 2
        @pytest.mark.skip(reason="not here")
        def test_skipped(): pass
    """)
    )
    (folder / "test_z_sleeps.py").write_text(f"import time\ndef test_sleeps():\n    time.sleep({sleep_s})\n")
    return folder


def test_pytest_step_killed_mid_test_still_reports_what_finished(tmp_path):
    """The step's limit runs out while a test sleeps: the whole process group is killed, there is
    no JUnit XML, and the counts come from the lines streamed as the tests finished."""
    from benchmarks.gpu_pytest import run_pytest

    fields = run_pytest(tmp_path / "out", 30, targets=(str(_test_folder(tmp_path)),), select="", test_timeout_s=3600)
    assert fields["status"] == "timeout" and fields["rc"] is None and fields["counts_from"] == "stream", fields
    assert (fields["passed"], fields["failed"], fields["skipped"]) == (3, 1, 1), fields
    assert not (tmp_path / "out" / "pytest_junit.xml").exists()
    log = (tmp_path / "out" / "pytest_gpu.log").read_text()
    assert "test_a_quick.py::test_one PASSED" in log  # names streamed to the log as they ran


def test_a_test_past_its_limit_fails_and_the_step_goes_on(tmp_path):
    from benchmarks.gpu_pytest import run_pytest

    fields = run_pytest(
        tmp_path / "out", 300, targets=(str(_test_folder(tmp_path, sleep_s=120)),), select="", test_timeout_s=2
    )
    assert fields["status"] == "fail" and fields["counts_from"] == "junit", fields
    assert (fields["passed"], fields["failed"], fields["skipped"]) == (3, 2, 1), fields
    streamed = (tmp_path / "out" / "pytest_stream.jsonl").read_text()
    assert "test_sleeps" in streamed and "Timeout" in streamed


def test_an_empty_test_step_fails(tmp_path):
    from benchmarks.gpu_pytest import run_pytest

    (tmp_path / "empty").mkdir()
    fields = run_pytest(tmp_path / "out", 120, targets=(str(tmp_path / "empty"),), select="")
    assert fields["status"] == "fail" and fields["rc"] == 5 and fields["passed"] == 0, fields


def test_gpu_critical_tests_run_first():
    from benchmarks.pytest_stream import rank

    class Item:
        def __init__(self, file, name):
            self.path, self.name = Path("tests") / file, name

    items = [
        Item("test_train.py", "test_cli"),
        Item("test_ops.py", "test_parity"),
        Item("test_triton_attention.py", "test_gpu_torch_compile_fullgraph"),
        Item("test_cuda_direct.py", "test_direct"),
        Item("test_triton_swiglu.py", "test_parity"),
        Item("test_model.py", "test_forward"),
    ]
    order = [(i.path.name, i.name) for i in sorted(items, key=rank)]
    assert order == [
        ("test_triton_swiglu.py", "test_parity"),
        ("test_cuda_direct.py", "test_direct"),
        ("test_ops.py", "test_parity"),
        ("test_model.py", "test_forward"),
        ("test_train.py", "test_cli"),
        ("test_triton_attention.py", "test_gpu_torch_compile_fullgraph"),
    ]


# ---- the CUDA extension built in the background --------------------------------------------------
def _run_with_budget(tmp_path, budget_s):
    from benchmarks.gpu_check import Run

    return Run(tmp_path, budget_s=budget_s, dry_run=False)


def test_extension_build_is_killed_when_the_test_step_cannot_wait(tmp_path):
    from benchmarks import gpu_background as B

    run = _run_with_budget(tmp_path, 420)
    B.start_extension_build(run, "9.0a", command=[sys.executable, "-c", "import time; time.sleep(600)"])
    proc = run.facts["ext_build"]["proc"]
    fields = B.finish_extension_build(run, 0.5)
    assert fields["status"] == "timeout" and proc.poll() is not None, fields
    assert "runs without it" in fields["reason"]


def test_extension_build_result_and_its_refusals(tmp_path):
    from benchmarks import gpu_background as B

    run = _run_with_budget(tmp_path, 420)
    B.start_extension_build(run, "9.0a", command=[sys.executable, "-c", "print('built')"])
    assert B.finish_extension_build(run, 60)["status"] == "ok"
    B.start_extension_build(run, "9.0a", command=[sys.executable, "-c", "import sys; sys.exit('nvcc broke')"])
    fields = B.finish_extension_build(run, 60)
    assert fields["status"] == "error" and "nvcc broke" in fields["reason"]
    short = _run_with_budget(tmp_path, 100)
    B.start_extension_build(short, "9.0a")
    assert B.finish_extension_build(short, 1)["status"] == "skipped"
    B.start_extension_build(run, None)
    assert "no CUDA device" in B.finish_extension_build(run, 1)["reason"]
    assert B.extension_env("9.0a")["TORCH_CUDA_ARCH_LIST"] == "9.0a"


def test_report_optimizer_and_default_step_sections():
    """The CPU model rows of benchmarks/report.py: the optimizer's share and the default-step ratio."""
    from benchmarks import report

    shape = {"batch": 16, "block": 128, "n_layer": 3, "n_embd": 96, "mlp": "swiglu"}
    rows = [
        {
            "suite": "model",
            "op": "optimizer_step-default-cpu",
            "variant": v,
            "min_ms": step,
            "median_ms": step,
            "train_step_ms": 50.0,
            "step_fraction": step / 50.0,
            "shape": shape,
        }
        for v, step in (("muon", 3.0), ("muon-pytorch", 6.0))
    ]
    rows.append(
        {
            "suite": "model",
            "op": "default_step-default-cpu",
            "variant": "muon",
            "backend": "auto",
            "fastlm_median_ms": 50.0,
            "plain_median_ms": 70.0,
            "speedup_median": 1.4,
            "fastlm_min_ms": 48.0,
            "plain_min_ms": 66.0,
            "speedup_min": 66.0 / 48.0,
            "shape": shape,
        }
    )
    text = "\n".join(report.optimizer_section(rows) + report.default_step_section(rows))
    assert "| default-cpu (3x96) | muon | 3 | 3 | 50 | 6.0% |" in text
    assert "| muon-pytorch |" in text and "12.0%" in text
    assert "1.40x" in text and "1.38x" in text
    assert report.optimizer_section([]) == []
