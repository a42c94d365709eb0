"""Fixtures shared by the test modules."""
import signal

import pytest
import torch

from fastlm import data


def _corpus_file(tmp_path_factory, n_chars: int):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(data.default_corpus().read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The first 8,000 characters of Tiny Shakespeare, as a file: enough for tiny training runs."""
    return _corpus_file(tmp_path_factory, 8000)


@pytest.fixture(scope="session")
def corpus_20k(tmp_path_factory):
    """The first 20,000 characters of Tiny Shakespeare, as a file."""
    return _corpus_file(tmp_path_factory, 20000)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add barrier waits (30x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_error_line(captured) -> str:
    """The single ``error: ...`` line a CLI printed on stderr (asserts there is exactly one)."""
    lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), captured.err
    return lines[0]


class Hang(Exception):
    """A read blocked (see :func:`no_hang`)."""


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) when a read blocks: SIGALRM after 20 s."""
    def on_alarm(*_):
        raise Hang("the read blocked")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
