"""What every fastlm command line does with errors: one ``error: ...`` line, no traceback, and an
exit code that says what went wrong.

Exit codes (all CLIs): 0 done; 2 bad input (settings, files, a backend that cannot run here);
3 the training loss became non-finite; 4 an I/O failure (disk full, read-only folder, EIO);
128 + N after signal N (Ctrl-C = 130). Under ``torchrun`` only rank 0 prints the error.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from fastlm.errors import BackendUnavailableError, InputError, NonFiniteLoss, RankFailed, TrainingInterrupted

__all__ = [
    "EXIT_OK",
    "EXIT_BAD_INPUT",
    "EXIT_NON_FINITE",
    "EXIT_IO",
    "run_cli",
    "run_command",
    "error_line",
    "refuse_existing",
    "write_new_file",
]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_IO = 4


def error_line(e: BaseException) -> str:
    """The exception as one line (its first non-empty line, whitespace collapsed)."""
    for line in str(e).splitlines():
        if line.strip():
            return " ".join(line.split())
    return type(e).__name__


def _io_message(e: OSError) -> str:
    what = e.strerror or error_line(e)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"I/O error: {what}{where}"


def run_cli(body: Callable[[], int]) -> int:
    """Run ``body()`` (which returns an exit code) and turn errors into one line + an exit code."""
    quiet = os.environ.get("RANK", "0") != "0"  # torchrun: rank 0 speaks for the job

    def report(msg: str, code: int) -> int:
        if not quiet:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        return code

    try:
        return body()
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    except TrainingInterrupted as e:
        return 128 + e.signum  # the trainer said where it saved and how to resume
    except NonFiniteLoss as e:
        return report(error_line(e), EXIT_NON_FINITE)
    except RankFailed:
        return 1  # the failing rank printed the error
    except BackendUnavailableError as e:
        return report(error_line(e), EXIT_BAD_INPUT)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        return report(error_line(e), EXIT_BAD_INPUT)
    except OSError as e:
        return report(_io_message(e), EXIT_IO)
    except (InputError, ValueError) as e:  # DataError, CheckpointError, ConfigError, TokenizerError, ...
        return report(error_line(e), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        if not quiet:
            print("\ninterrupted", file=sys.stderr, flush=True)
        return 130


def run_command(run: Callable[[Optional[list]], object], argv: Optional[list] = None) -> int:
    """A command line's ``main``: ``run(argv)``, then exit code 0, or one error line and its code."""

    def body() -> int:
        run(argv)
        return EXIT_OK

    return run_cli(body)


def _exists(flag: str, path) -> InputError:
    return InputError(f"{flag} {path} already exists; refusing to overwrite it")


def refuse_existing(flag: str, path: Optional[str]) -> None:
    """InputError when the output file ``path`` that ``flag`` names already exists (checked before
    any work; :func:`write_new_file` checks again as it creates the file)."""
    if path is not None and os.path.lexists(path):
        raise _exists(flag, path)


def write_new_file(flag: str, path: Optional[str], text: str) -> None:
    """Write ``text`` to a new UTF-8 file ``path`` (nothing when None); never replaces a file."""
    if path is None:
        return
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": fails if it appeared meanwhile
            f.write(text)
    except FileExistsError:
        raise _exists(flag, path) from None
