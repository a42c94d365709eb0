"""Reading files that someone else may have written (run directories, tokenizers, model folders).

A run directory is downloaded and shared, so every file in it is untrusted: it may be a device
(``/dev/zero`` never ends), a FIFO (an open for reading blocks), a symlink to one, or simply far
larger than any real file of its kind. :func:`read_bounded` refuses all of those BEFORE reading a
byte and never reads more than its limit, and its errors name the file and the problem only:
they echo none of the file's content.
"""

from __future__ import annotations

import os
import stat

__all__ = ["read_bounded", "open_regular", "read_exactly", "regular_file_size", "is_plain_file_name"]


def _describe(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def regular_file_size(path, what: str, error=ValueError) -> int:
    """The size of ``path`` (symlinks followed); ``error`` when it is missing or not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_describe(st.st_mode)}, not a regular file; refusing to read it")
    return st.st_size


def open_regular(path, what: str, error=ValueError):
    """Open ``path`` for reading (an unbuffered binary file object) only if it is a regular file.

    The type is checked with ``stat`` before the open (a FIFO or device is never opened) and again
    on the open descriptor (the path may have been swapped in between).
    """
    path = os.fspath(path)
    regular_file_size(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{what} {path} changed into a non-regular file while it was opened; refusing to read it")
    return os.fdopen(fd, "rb", buffering=0)


def read_exactly(f, n: int, path, what: str, error=ValueError) -> bytes:
    """``n`` bytes from the binary file ``f``; ``error`` (naming the file) when it ends sooner."""
    chunks, total = [], 0
    while total < n:
        try:
            chunk = f.read(n - total)
        except OSError as e:
            raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
        if not chunk:
            raise error(f"{what} {path} is truncated ({n - total} bytes missing)")
        chunks.append(chunk)
        total += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_bounded(path, max_bytes: int, what: str, error=ValueError) -> bytes:
    """All bytes of the regular file ``path``, which must hold at most ``max_bytes``.

    Non-regular files are refused unopened (see :func:`open_regular`); the size is checked before
    reading and at most ``max_bytes + 1`` bytes are ever read, so a file that grows while it is
    read is refused too. ``what`` names the file's role in the messages ("tokenizer file", ...);
    ``error`` is the exception class raised.
    """
    path = os.fspath(path)
    size = regular_file_size(path, what, error)
    if size > max_bytes:
        raise error(f"{what} {path} is too large ({size} bytes; the limit is {max_bytes})")
    chunks, total = [], 0
    with open_regular(path, what, error) as f:
        while total <= max_bytes:
            try:  # the first read asks for one byte more than the file holds: usually one chunk
                chunk = f.read(min(max(size - total, 0) + 1, max_bytes + 1 - total))
            except OSError as e:
                raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > max_bytes:
        raise error(f"{what} {path} is too large (more than {max_bytes} bytes)")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # b"" for an empty file


def is_plain_file_name(name) -> bool:
    """True for a name that stays inside the folder it is joined to: no separator, not ``.``/``..``,
    not absolute, no NUL, no drive."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        return False
    forbidden = {"/", "\\", "\x00", ":"} | {os.sep} | ({os.altsep} if os.altsep else set())
    return not any(c in name for c in forbidden)
