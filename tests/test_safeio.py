"""fastlm.files.safeio: bounded reads of untrusted files (the refusals every loader relies on)."""

import os

import pytest

from fastlm.files.safeio import is_plain_file_name, open_regular, read_bounded, read_exactly


class Refused(ValueError):
    pass


def test_read_bounded_limits_are_exact(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"")
    assert read_bounded(p, 0, "test file", Refused) == b""
    p.write_bytes(b"x" * 100)
    assert read_bounded(p, 100, "test file", Refused) == b"x" * 100
    with pytest.raises(Refused, match=r"test file .*f.bin is too large \(100 bytes; the limit is 99\)"):
        read_bounded(p, 99, "test file", Refused)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # several chunks' worth
    assert read_bounded(big, 3 << 20, "test file", Refused) == big.read_bytes()


@pytest.mark.parametrize(
    "kind, needle", [("dir", "a directory"), ("fifo", "a FIFO"), ("dev", "a device"), ("missing", "not found")]
)
def test_non_regular_files_are_refused_unopened(tmp_path, monkeypatch, kind, needle):
    p = tmp_path / "x"
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "dev":
        os.symlink("/dev/zero", p)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    with pytest.raises(Refused) as ei:
        read_bounded(p, 1 << 20, "test file", Refused)
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    assert not opened, "a non-regular file was opened"


def test_read_exactly_reports_truncation(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    with open_regular(p, "test file", Refused) as f:
        assert read_exactly(f, 2, p, "test file", Refused) == b"ab"
        with pytest.raises(Refused, match="truncated"):
            read_exactly(f, 5, p, "test file", Refused)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("model.safetensors", True),
        ("ckpt-00000001-ab", True),
        (".hidden", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("/etc/passwd", False),
        ("..\\x", False),
        ("c:x", False),
        ("a\x00b", False),
        (None, False),
        (5, False),
    ],
)
def test_plain_file_names(name, ok):
    assert is_plain_file_name(name) is ok
