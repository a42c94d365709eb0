"""``python -m fastlm.info``: lists every backend with its availability."""

import re
import subprocess
import sys

from conftest import child_env

from fastlm import info, ops


def _check_report(text):
    assert re.search(r"^fastlm \S+\s+python \S+\s+torch \S+", text, re.M), text
    assert "CUDA available:" in text
    status = ops.backend_status()
    assert "\nbackends:\n" in text, text
    table = text.split("\nbackends:\n", 1)[1].splitlines()
    assert len(table) == len(ops.BACKENDS), table
    for name in ops.BACKENDS:
        lines = [ln for ln in table if ln.split()[:1] == [name]]
        assert len(lines) == 1, f"backend {name} listed {len(lines)} times:\n{text}"
        why = status[name]
        if why is None:
            assert lines[0].split()[1:] == ["available"], lines[0]
        else:
            assert f"unavailable: {why}" in lines[0], lines[0]


def test_info_cli_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "fastlm.info"], capture_output=True, text=True, timeout=120, env=child_env()
    )
    assert proc.returncode == 0, proc.stderr
    _check_report(proc.stdout)


def test_info_main_returns_zero(capsys):
    assert info.main([]) == 0
    _check_report(capsys.readouterr().out)


def test_info_rejects_unknown_arguments(capsys):
    try:
        info.main(["--bogus"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown option must be an argparse error")
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
