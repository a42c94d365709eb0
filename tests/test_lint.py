"""The tree passes ruff's lint and format checks under pyproject.toml's ``[tool.ruff]`` (the checks
that ``.pre-commit-config.yaml`` runs before a commit), and the hook's ruff is the test extra's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cpu_only  # reads files only


def _ruff(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("ruff", reason="ruff comes with the test extras: pip install -e '.[test]'")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_lint_passes():
    result = _ruff("check", "--output-format", "concise")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def test_ruff_format_leaves_the_tree_as_it_is():
    result = _ruff("format", "--check")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def test_pre_commit_runs_the_test_extras_ruff():
    hook = re.search(r"ruff-pre-commit\s+rev: v(\d+)\.(\d+)\.\d+", (ROOT / ".pre-commit-config.yaml").read_text())
    extra = re.search(r'"ruff==(\d+)\.(\d+)\.\*"', (ROOT / "pyproject.toml").read_text())
    assert hook and extra and hook.groups() == extra.groups(), (hook, extra)
    ids = re.findall(r"- id: (\S+)", (ROOT / ".pre-commit-config.yaml").read_text())
    assert ids == ["ruff-check", "ruff-format"]
