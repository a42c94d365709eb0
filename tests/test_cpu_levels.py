"""The C++ CPU kernels at every vector level a user's build can have. The rest of the suite tests the
build machine's best (the installed or in-tree ``fastlm._C``: AVX-512 where the CPU has it); here the
extension is compiled again at AVX2 (``FASTLM_CPU_AVX512=0``: what a machine without AVX-512 builds)
and at the portable baseline (``FASTLM_CPU_AVX2=0``), each in a folder of its own (the tree and the
install stay untouched), and the C++ parity tests (tests/test_cpp_ops.py, tests/test_qk_norm.py,
tests/test_layer_norm.py, tests/test_attention_bf16.py, the fused Muon tests of tests/test_optim.py)
run against that build in a child pytest (``FASTLM_TEST_EXTENSION``, see tests/conftest.py). About 1-2
minutes per level on 2 cores (debug info off: ``-g0``). The bf16 products' micro-kernels are chosen at
run time, so every level's build runs them where the CPU has AVX512-BF16."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import pytest
from conftest import child_env, run_bounded

from fastlm.ops._buildinfo import CPU_LEVEL_FLAGS, cpu_flags

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"AVX2": {"FASTLM_CPU_AVX512": "0"}, "DEFAULT": {"FASTLM_CPU_AVX2": "0"}}
PARITY = [
    str(ROOT / "tests" / t)
    for t in ("test_cpp_ops.py", "test_optim.py", "test_qk_norm.py", "test_layer_norm.py", "test_attention_bf16.py")
]
# all of test_cpp_ops, test_qk_norm, test_layer_norm and test_attention_bf16; the Muon op's tests in test_optim
SELECT = "test_cpp_ops or test_qk_norm or test_layer_norm or test_attention_bf16 or fused or muon_step"
#: failures known at a level (reported; each must still fail: a fixed one is taken off here)
KNOWN_FAILURES = {
    # the fused backward's dV error is 3.2x SDPA's at the baseline level (2.1x at AVX2 and AVX-512)
    "DEFAULT": {"tests/test_cpp_ops.py::test_attention_qkv_fused_matches_float64[rope_t130_d16]"},
}


def _skip_unless_this_cpu_runs(level):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the vector levels are x86-64's (elsewhere every build is the baseline)")
    flags = cpu_flags()
    missing = [f for f in CPU_LEVEL_FLAGS.get(level, ()) if flags is None or f not in flags]
    if missing:
        pytest.skip(f"this CPU cannot run the {level} build (lacks {', '.join(missing)})")


def build_level(level, folder: Path) -> Path:
    """``setup.py build_ext`` at ``level`` into ``folder`` -> the built extension's path."""
    env = child_env(
        **LEVELS[level],
        FASTLM_CPP="1",
        FASTLM_CUDA="0",
        CFLAGS="-DNDEBUG -g0",
        MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
    )
    cmd = [
        sys.executable,
        "setup.py",
        "-q",
        "build_ext",
        "--build-lib",
        str(folder / "lib"),
        "--build-temp",
        str(folder / "tmp"),
    ]
    proc = run_bounded(cmd, 1200, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (built,) = (folder / "lib" / "fastlm").glob("_C.*")
    return built


def _tree_builds():
    """The tree's own build: its extension files and its build/ folder (``pip install -e .`` leaves one)."""
    files = [*(ROOT / "fastlm").glob("_C.*"), *(p for p in (ROOT / "build").rglob("*") if p.is_file())]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def run_parity(extension: Path):
    """The C++ parity tests in a child pytest that loads ``extension`` -> (stdout, counts, failed tests)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not gpu", "-k", SELECT, *PARITY]
    proc = run_bounded(cmd, 900, cwd=ROOT / "tests", env=child_env(FASTLM_TEST_EXTENSION=str(extension)))
    counts = {
        word: int(n)
        for n, word in re.findall(
            r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout.strip().splitlines()[-1]
        )
    }
    failed = set(re.findall(r"^FAILED (\S+)", proc.stdout, re.M))
    return proc.stdout, counts, {f"tests/{name}" for name in failed}


@pytest.mark.parametrize("level", list(LEVELS))
def test_cpp_parity_at_each_vector_level(level, tmp_path):
    _skip_unless_this_cpu_runs(level)
    before = _tree_builds()
    built = build_level(level, tmp_path / "build")
    assert _tree_builds() == before  # the main build is untouched
    out, counts, failed = run_parity(built)
    assert f"fastlm._C: {built} (CPU level {level})" in out, out[:3000]
    known = KNOWN_FAILURES.get(level, set())
    assert failed == known, (
        f"failed: {sorted(failed - known)}; known but passing now: {sorted(known - failed)}\n" + out[-6000:]
    )
    assert counts.get("passed", 0) >= 100 and set(counts) <= {"passed", "failed", "deselected"}, counts
    assert counts.get("failed", 0) == len(known), counts
