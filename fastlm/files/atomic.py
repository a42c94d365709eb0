"""Crash-safe file writes: the one home of every writer's temp-file + fsync + ``os.replace``.

A reader never sees a half-written file: the bytes go to a temp file beside the target, are
fsynced, the temp file replaces the target atomically, and the folder is fsynced so the rename
itself survives a power cut. Errors (disk full, read-only, EIO) are raised, never swallowed; the
temp file is removed when the write fails.

Modes follow the umask like any ``open``/``mkdir`` (files ``0666 & ~umask``, folders ``0777 &
~umask``), although the temp files and folders (``mkstemp``/``mkdtemp``) start private: a run shared
with a group stays readable by it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

__all__ = [
    "fsync_dir",
    "write_fsync",
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "current_umask",
    "make_temp_dir",
]

# fsync of a directory is not supported everywhere: these errors mean "cannot", not "failed"
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOTSUP}


def current_umask() -> int:
    """The process's umask, read from /proc where the OS has it (setting it to read it back would
    change it for other threads for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make_temp_dir(prefix: str, dir) -> Path:
    """``tempfile.mkdtemp`` with the mode ``mkdir`` would give (``0777 & ~umask``), not 0700."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def fsync_dir(path) -> None:
    """fsync a directory (so renames and new entries in it are durable).

    Filesystems that cannot open or fsync a directory are skipped; real I/O errors (EIO, ENOSPC,
    ...) are raised.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_fsync(path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a new file in a private folder) and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_writer(path):
    """``with atomic_writer(path) as f: f.write(...)``: the file appears complete at ``path`` when
    the block ends (temp file beside it, fsync, os.replace, fsync of the folder), or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp's files are 0600 (POSIX)
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, os.replace it, fsync the folder."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode("utf-8"))
