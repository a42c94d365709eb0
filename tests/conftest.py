"""Shared pytest configuration of the test suite: fixtures, helpers for child processes, the ``gpu``
marker, and three switches (environment variables) that other tests set for a child pytest:

* ``FASTLM_TEST_CUDA_VISIBLE=1`` (``0``): torch reports a CUDA device (none), as on the other kind of
  machine, to any code that asks ``torch.cuda.is_available()``. Where no GPU is, the first CUDA tensor
  then fails: a CPU test that would change meaning on a GPU machine fails (tests/test_suite.py).
* ``FASTLM_TEST_EXTENSION=PATH``: that build of ``fastlm._C`` (another CPU vector level, built in a
  folder of its own) is the one ``fastlm`` loads (tests/test_cpu_levels.py).
* ``FASTLM_TEST_MARKS_OUT=PATH``: the collection writes, per test, its ``gpu`` flag and whether a
  skip mark skips it on this machine (JSON), for tests/test_suite.py.

Where no system CUDA toolkit is present, the one that the test extras install from NVIDIA's pip
wheels (``nvidia/cu13``: nvcc, headers) is put on PATH / CUDA_HOME, so the csrc/cuda checks run.
"""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

# `benchmarks/` is not installed: plain `pytest` (which, unlike `python -m pytest`, does not put the
# working directory on sys.path) must still import it. Appended, so an installed fastlm stays first.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

_VISIBLE = {"1": True, "0": False}.get(os.environ.get("FASTLM_TEST_CUDA_VISIBLE", ""))
SIMULATED_CUDA = _VISIBLE is not None and _VISIBLE != torch.cuda.is_available()
if SIMULATED_CUDA:  # before any test module asks (module-level skipif conditions included)
    torch.cuda.is_available = lambda: _VISIBLE
    torch.cuda.device_count = lambda: int(_VISIBLE)
    torch.cuda.is_bf16_supported = lambda including_emulation=True: _VISIBLE


def _preload_extension(path: str) -> None:
    """Load the build at ``path`` as ``fastlm._C`` before fastlm imports its own (the import system
    then finds it in sys.modules)."""
    spec = importlib.util.spec_from_file_location("fastlm._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastlm._C"] = module
    spec.loader.exec_module(module)


if os.environ.get("FASTLM_TEST_EXTENSION"):
    _preload_extension(os.environ["FASTLM_TEST_EXTENSION"])


def _wheel_cuda_home():
    """The CUDA toolkit of NVIDIA's pip wheels (``nvidia/cu13`` in site-packages), or None."""
    for base in sys.path:
        home = Path(base or ".") / "nvidia" / "cu13"
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_fp16.h").is_file():
            return home
    return None


def _use_wheel_cuda_toolkit() -> None:
    if shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return  # a system toolkit (or the user's choice) wins
    home = _wheel_cuda_home()
    if home is not None:  # (the wheels keep the libraries in lib/, where nvcc's profile looks in lib64/)
        os.environ["CUDA_HOME"] = str(home)
        for var, sub in (("PATH", "bin"), ("LIBRARY_PATH", "lib")):
            os.environ[var] = os.pathsep.join(p for p in (str(home / sub), os.environ.get(var)) if p)


_use_wheel_cuda_toolkit()

import fastlm  # noqa: E402
from fastlm.ops import extension as _ext  # noqa: E402
from fastlm.text import data  # noqa: E402


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


@pytest.fixture(scope="session", autouse=True)
def _peak_cache(tmp_path_factory):
    """Training runs measure the CPU peak for MFU once and cache it: in a folder of this session, not
    the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLM_CACHE_DIR", str(tmp_path_factory.mktemp("fastlm-cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add barrier waits (30x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fused_and_reference_step(cfg, tokens):
    """The default backends' model and a ``backend="reference"`` copy with the same weights, one
    forward/backward each on ``tokens`` (as inputs and targets) -> ``(models, [(loss, {name: grad})
    for each])``: what the tests of a fused op compare the model's use of it with."""
    import dataclasses

    from fastlm.model import GPT

    torch.manual_seed(0)
    fused = GPT(cfg)
    reference = GPT(dataclasses.replace(cfg, backend="reference"))
    reference.load_state_dict(fused.state_dict())
    out = []
    for model in (fused, reference):
        _, loss = model(tokens, tokens)
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    return (fused, reference), out


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


# ==== child processes =============================================================================
def _installed(root: Path) -> bool:
    paths = sysconfig.get_paths()
    return any(Path(paths[k]).resolve() == root for k in ("purelib", "platlib"))


#: the folder holding the fastlm package under test (a checkout's root, or site-packages)
FASTLM_ROOT = Path(fastlm.__file__).resolve().parents[1]


def child_env(base=None, **extra) -> dict:
    """The environment (``base``, default os.environ, plus ``extra``) for a child process that imports
    fastlm (``python -m fastlm.train``, a script, torchrun): when the fastlm under test is a checkout
    rather than an install (the GPU image has none), its root goes first on PYTHONPATH, so the child
    imports the very package these tests import, whatever its working directory."""
    env = dict(os.environ if base is None else base)
    env.update({k: str(v) for k, v in extra.items()})
    if not _installed(FASTLM_ROOT):
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != FASTLM_ROOT]
        env["PYTHONPATH"] = os.pathsep.join([str(FASTLM_ROOT), *rest])
    return env


def _descendants(pid: int) -> list:
    """The processes below ``pid`` (from /proc; none where there is no /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_bounded(cmd, timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` as a hang guard: past ``timeout_s`` the
    child and every process below it (torchrun's ranks run in sessions of their own) are killed and the
    test fails saying so. Make what is guarded against take far longer than ``timeout_s`` and the work
    itself far less: a loaded machine then cannot trip it."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:  # listed before the launcher dies and orphans them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(map(str, cmd[:6]))} ... still running after {timeout_s:g} s (killed); "
            f"stderr tail:\n{err[-2000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ==== the gpu marker ==============================================================================
# `pytest -m gpu` selects the tests that use a CUDA device when one is present (they skip without one,
# or run Triton's interpreter on the CPU); `pytest -m "not gpu"` the rest, which never touch a CUDA
# device and mean the same on every machine (a few run only where no GPU is visible). A test is `gpu`
# when it is marked @pytest.mark.gpu; else not when marked @pytest.mark.cpu_only; else when it is in a
# Triton module, is parametrized with backend/device "cuda", or has a skip mark whose reason says it
# needs a CUDA device / GPU. A test outside the gpu half that skips itself for want of a GPU fails
# (mark it gpu); tests/test_suite.py checks both halves against a simulated GPU machine.
_GPU_MODULES = {"test_triton_attention.py", "test_triton_swiglu.py"}
NEEDS_GPU_REASON = re.compile(r"\bneeds? a (CUDA )?(GPU|device)\b")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: uses a CUDA device where one is present (skips without one, or runs "
        "Triton's interpreter); pytest -m gpu / -m 'not gpu' split the suite",
    )
    config.addinivalue_line(
        "markers", "cpu_only: never uses a CUDA device, also in a Triton module: not in the gpu half"
    )


def _skip_reasons(item):
    return [str(m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")) for m in item.iter_markers("skipif")] + [
        str(m.kwargs.get("reason", m.args[0] if m.args else "")) for m in item.iter_markers("skip")
    ]


def _runs_on_gpu(item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    if item.get_closest_marker("cpu_only") is not None:
        return False
    if item.path.name in _GPU_MODULES or any(NEEDS_GPU_REASON.search(r) for r in _skip_reasons(item)):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "cuda" in (params.get("backend"), params.get("device"))


def _skipped_here(item) -> bool:
    """A skip mark skips the test on this machine (conditions that are not plain booleans count as no)."""
    return any(item.iter_markers("skip")) or any(
        any(c is True for c in m.args[:1]) or m.kwargs.get("condition") is True for m in item.iter_markers("skipif")
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _runs_on_gpu(item) and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
    out = os.environ.get("FASTLM_TEST_MARKS_OUT")
    if out:
        rows = {
            it.nodeid: {"gpu": it.get_closest_marker("gpu") is not None, "skipped": _skipped_here(it)} for it in items
        }
        Path(out).write_text(json.dumps(rows))
    for item in items if SIMULATED_CUDA and _VISIBLE else ():
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="FASTLM_TEST_CUDA_VISIBLE: the CUDA device is simulated"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and call.excinfo is not None and item.get_closest_marker("gpu") is None:
        reason = str(call.excinfo.value)
        if NEEDS_GPU_REASON.search(reason):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped for want of a GPU ({reason}) but not in the gpu half: "
                f"mark it @pytest.mark.gpu (see tests/conftest.py)"
            )


def pytest_report_header(config):
    level = getattr(_ext._C, "cpu_capability", lambda: None)()
    where = _ext._C.__file__ if _ext._C is not None else _ext._IMPORT_ERROR
    return [
        f"fastlm: {fastlm.__file__}",
        f"fastlm._C: {where} (CPU level {level})",
        f"CUDA: {torch.cuda.is_available()}{' (simulated)' if SIMULATED_CUDA else ''}, nvcc: {shutil.which('nvcc')}",
    ]


# ==== end gpu marker ==============================================================================
