"""One process per run directory: an OS advisory lock on ``RUN/.lock``.

Training (a new run, ``--resume``, ``--overwrite``) holds the lock for the whole run and export holds
it while it reads, so a second process on the same run is refused at once with
``RUN is in use by pid N`` (:class:`~fastlm.errors.RunInUse`) instead of both writing into it.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the open lock file: the OS releases it when the holder
exits in any way (SIGKILL and power cuts included), so a lock never outlives its process, and the pid
left in the file of a dead holder blocks nothing. The holder writes its pid into the file for the
second comer's message and empties it on release. The lock file stays in a run; it is deleted
only by the process that created it, while holding the lock on it, when it leaves nothing else
behind (a new run refused before writing anything, with the folder if the lock made it; an
export of a run that had no lock file). A process that opened the file meanwhile and locks it
after the deletion notices that the path no longer names its file, and starts over.

The lock file is opened without following a symbolic link and must be a regular file: a shared run
cannot redirect it elsewhere. A folder the user may read but not write (a run shared read-only) can
still be exported: without a lock file to open, export reads it unlocked, since no one who could
train into it is this user. Where the OS has no ``flock`` (Windows), runs are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from pathlib import Path
from typing import Optional

from fastlm.errors import InputError, RunInUse

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lock"
_PID_WAIT_S = 2.0  # how long a second comer waits for the holder to write its pid (a fresh lock)


class RunLock:
    """``with RunLock(run_dir):`` or ``lock = RunLock(run_dir).acquire(); ...; lock.release()``.

    ``create``: make the run directory when it is missing (a new run; see :meth:`release`).
    ``required``: refuse (instead of going on unlocked) when the lock file can be neither created
    nor opened (read-only folders; export passes False).
    """

    def __init__(self, run_dir, *, create: bool = False, required: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.create, self.required = create, required
        self._fd: Optional[int] = None
        self._made_dir = self._made_file = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release(keep_file=False)  # a reader (export) leaves no lock file it created behind

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        for _ in range(100):  # the lock file is replaced only by a failed new run's cleanup: rare
            self._make_dir()
            fd = self._open()
            if fd is None:
                return self
            if self._lock(fd) and self._still_the_lock_file(fd):
                self._fd = fd
                _write_pid(fd, os.getpid())
                return self
            os.close(fd)
        raise InputError(f"cannot lock {self.run_dir}: its lock file {self.path} keeps being replaced")

    def _make_dir(self) -> None:
        if self.create and not self.run_dir.exists():
            with contextlib.suppress(FileExistsError):
                self.run_dir.mkdir(parents=True)
                self._made_dir = True
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise InputError(f"{self.run_dir} exists and is not a directory")

    def release(self, keep_file: bool = True) -> None:
        """Unlock. ``keep_file=False`` (a run that wrote nothing) also removes the lock file if this
        lock created it, and the run directory if this lock made it and it is empty."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _write_pid(fd, None)
            if self._made_file and not keep_file:
                os.unlink(self.path)  # still locked: a waiter that opened it sees it gone and retries
                if self._made_dir:
                    os.rmdir(self.run_dir)
        except OSError:
            pass  # the folder is left as it is; the lock itself goes with the descriptor
        finally:
            os.close(fd)

    def _open(self) -> Optional[int]:
        """The lock file's descriptor (created if missing); None to go on unlocked (see ``required``)."""
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        while True:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
                self._made_file = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, flags)
                    self._made_file = False
                except FileNotFoundError:
                    continue  # removed in between: create it
                except OSError as e:
                    fd = self._open_failed(e)
            except OSError as e:
                fd = self._open_failed(e)
            break
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{self.path} is not a regular file; fastlm locks the run with this file")
        return fd

    def _open_failed(self, error: OSError) -> Optional[int]:
        if isinstance(error, FileNotFoundError):
            raise InputError(f"run directory not found: {self.run_dir}") from None
        if error.errno == errno.ELOOP:
            raise InputError(f"{self.path} is a symbolic link; fastlm locks the run with this file") from None
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            with contextlib.suppress(OSError):  # a read-only run: flock needs no write access
                return os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            if not self.required:
                return None
        raise InputError(f"cannot lock {self.run_dir} with {self.path}: {error.strerror or error}") from None

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "another process"
            raise RunInUse(f"{self.run_dir} is in use by {who}") from None

    def _still_the_lock_file(self, fd: int) -> bool:
        """False when the file was unlinked (or replaced) between our open and our lock."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_pid(fd: int, pid: Optional[int]) -> None:
    with contextlib.suppress(OSError):  # a read-only lock file: the second comer says "another process"
        os.ftruncate(fd, 0)
        if pid is not None:
            os.pwrite(fd, f"{pid}\n".encode(), 0)


def _holder_pid(fd: int) -> Optional[int]:
    """The pid the holder wrote (it writes it just after locking: wait a moment for it)."""
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            text = os.pread(fd, 32, 0).decode("ascii").strip()
            if text.isdigit():
                return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
