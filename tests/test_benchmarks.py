"""The benchmark suites stay runnable (``pytest benchmarks`` collects: a renamed module breaks it) and
the report turns their rows into the tables the README points to."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_suites_collect():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    collected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    modules = {ln.split("::")[0] for ln in collected}
    assert {
        "benchmarks/test_bench_attention.py",
        "benchmarks/test_bench_masks.py",
        "benchmarks/test_bench_swiglu.py",
        "benchmarks/test_bench_model.py",
        "benchmarks/test_bench_qk_norm.py",
        "benchmarks/test_bench_layer_norm.py",
        "benchmarks/test_bench_attention_qkv.py",
    } <= modules, modules


def _row(backend, ms, t=2048, variant="w128", dtype="float32"):
    return {
        "suite": "attention_masks",
        "backend": backend,
        "median_ms": ms,
        "ms": ms,
        "stat": "median",
        "shape": {"T_q": t},
        "variant": variant,
        "dtype": dtype,
    }


def test_the_masks_table_gives_both_ratios():
    from benchmarks import report

    rows = [
        _row("cpp", 10.0),
        _row("torch", 60.0),
        _row("cpp-dense", 50.0),
        _row("flex", 90.0),
        _row("torch", 5.0, variant="docs8"),
    ]  # a case without the kernel's row: left out
    text = "\n".join(report.masks_section(rows))
    line = next(ln for ln in text.splitlines() if ln.startswith("| T2048 w128"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "cpp" and cells[5] == "6.00x" and cells[7] == "5.00x" and cells[8] != "-"
    assert "docs8" not in text
    assert report.masks_section([]) == []


def test_the_qk_norm_table_compares_with_the_composed_form():
    from benchmarks import report

    shape = {"batch": 16, "block": 128, "n_head": 3, "n_kv_head": 3, "head_dim": 32}

    def row(backend, ms, pass_="fwd+bwd"):
        return {
            "suite": "qk_norm",
            "backend": backend,
            "ms": ms,
            "median_ms": ms,
            "stat": "median",
            "shape": shape,
            "variant": "bf16->fp32",
            "pass": pass_,
        }

    text = "\n".join(report.qk_norm_section([row("cpp", 0.4), row("torch", 1.0), row("cpp", 0.1, "fwd")]))
    assert "| 16x128x3x32 | bf16->fp32 | fwd+bwd | cpp | 0.4 | 2.50x |" in text
    assert "| 16x128x3x32 | bf16->fp32 | fwd+bwd | torch | 1 | 1.00x |" in text
    assert "| 16x128x3x32 | bf16->fp32 | fwd | cpp | 0.1 | n/a |" in text  # no composed row of that pass
    assert report.qk_norm_section([]) == []


def test_the_layer_norm_table_compares_with_the_composed_form():
    from benchmarks import report

    def row(backend, ms, variant="fp32+bf16->bf16"):
        shape = {"batch": 16, "block": 128, "n_embd": 96}
        return {"suite": "layer_norm", "backend": backend, "ms": ms, "median_ms": ms, "stat": "median"} | {
            "shape": shape,
            "variant": variant,
            "pass": "fwd+bwd",
        }

    text = "\n".join(report.layer_norm_section([row("cpp", 0.05), row("torch", 0.2), row("torch", 0.1, "fp32")]))
    assert "| 16x128x96 | fp32+bf16->bf16 | fwd+bwd | cpp | 0.05 | 4.00x |" in text
    assert "| 16x128x96 | fp32 | fwd+bwd | torch | 0.1 | 1.00x |" in text
    assert report.layer_norm_section([row("cpp", 0.05, "other") | {"suite": "qk_norm"}]) == []


def test_the_attention_qkv_table_compares_with_composed_and_the_float32_route():
    from benchmarks import report

    shape = {"batch": 16, "block": 128, "n_head": 3, "n_kv_head": 3, "head_dim": 32}

    def row(backend, variant, ms, pass_="fwd+bwd"):
        return {
            "suite": "attention_qkv",
            "backend": backend,
            "ms": ms,
            "median_ms": ms,
            "stat": "median",
            "shape": shape,
            "variant": variant,
            "pass": pass_,
        }

    rows = [
        row("cpp", "bf16", 1.25),
        row("cpp", "bf16 via fp32", 2.5),
        row("torch", "bf16", 5.0),
        row("cpp", "fp32", 2.0),
        row("torch", "fp32", 4.0),
        row("cpp", "fp32", 0.5, "fwd"),
    ]
    text = "\n".join(report.attention_qkv_section(rows))
    assert "| 16x128x3x32 | fwd+bwd | bf16 | cpp | 1.25 | 4.00x | 2.00x |" in text
    assert "| 16x128x3x32 | fwd+bwd | bf16 via fp32 | cpp | 2.5 | 2.00x | - |" in text
    assert "| 16x128x3x32 | fwd+bwd | fp32 | cpp | 2 | 2.00x | - |" in text
    assert "| 16x128x3x32 | fwd | fp32 | cpp | 0.5 | n/a | - |" in text  # no composed row of that pass
    assert report.attention_qkv_section([]) == []


def test_the_model_table_shows_the_bf16_default_steps_mfu():
    """The default run's bf16 step (issue 24's step target) carries its MFU against the bf16 peak into
    the model table; a row without one reads n/a."""
    from benchmarks import report

    shape = {"batch": 16, "block": 128, "n_layer": 3, "n_embd": 96}
    precision = {"suite": "model", "op": "train_step-default-cpu-precision", "backend": "auto", "ms": 27.5}
    precision |= {"median_ms": 28.4, "variant": "bf16 vs fp32", "dtype": "bf16-autocast", "shape": shape}
    precision |= {"resolved": "attention:cpp", "mfu": 0.4099, "mfu_median": 0.3966, "tokens_per_s": 74473.4}
    plain = precision | {"op": "train_step-default-cpu", "variant": "swiglu", "dtype": "float32", "ms": 34.0}
    del plain["mfu"]
    text = "\n".join(report.model_section([precision, plain]))
    assert "| default-cpu-precision (3x96, T128, B16) | bf16 vs fp32 | bf16-autocast |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| default-cpu")]
    assert "| 27.5 | 74,473 | 41.0% |" in next(ln for ln in rows if "precision" in ln)
    assert "| 34 | 74,473 | n/a |" in next(ln for ln in rows if "float32" in ln)
    assert "bf16 GEMM rate" in text
