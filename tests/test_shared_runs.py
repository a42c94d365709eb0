"""Shared run directories (issue 21): a run directory edited by someone else, or trained from two
terminals at once, never crashes fastlm, deletes a user's files or mixes two runs.

* optimizer state and training state in a checkpoint are checked before anything uses them
  (the manifest and digests are rewritten to match, as anyone editing a shared run can);
* one run per directory: an OS advisory lock held for the whole run (the second comer is refused
  naming the holder's pid; a dead holder's lock does not block);
* ``--overwrite`` removes symbolic links inside a run as links, never following them;
* every file and folder a run writes follows the umask.

Processes that may crash or hang on the unfixed code run as subprocesses with timeouts.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env, one_error_line
from tiny_run import TINY_RUN

from fastlm.io import checkpoint
from fastlm.train import main
from fastlm.training.trainer import Callback

TINY = [*TINY_RUN, "--eval-iters", "1", "--log-interval", "1"]
HOOKS = str(Path(__file__).with_name("train_hooks.py"))  # fastlm.train with sleeping test callbacks


def _env(**extra):
    """A child's environment: one OpenMP thread, and the checkout on PYTHONPATH where fastlm is not installed."""
    return child_env(OMP_NUM_THREADS="1", **extra)


def _train(*args, timeout=180, **env):
    """``python -m fastlm.train ARGS`` as a process -> CompletedProcess (TimeoutExpired if it hangs)."""
    return subprocess.run(
        [sys.executable, "-m", "fastlm.train", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=timeout,
    )


def _spawn(*args, **env):
    return subprocess.Popen(
        [sys.executable, HOOKS, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
    )


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_20k):
    """A finished 4-step run (Muon + AdamW, checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert (
        main(["--data", str(corpus_20k), "--out-dir", str(run), *TINY, "--max-iters", "4", "--eval-interval", "2"]) == 0
    )
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_checkpoint(run: Path, tensors=None, state=None) -> None:
    """Edit the latest checkpoint's optimizer tensors and/or state.json in place, then rewrite the
    weights digest and the manifest to match (what anyone editing a shared run can do)."""
    ckpt = checkpoint.latest_checkpoint_dir(run)
    if tensors is not None:
        t, _ = checkpoint.load_weights(ckpt / "optim.safetensors")
        tensors(t)
        (ckpt / "optim.safetensors").unlink()
        checkpoint.save_weights(ckpt / "optim.safetensors", t)
    if state is not None:
        s = json.loads((ckpt / "state.json").read_text())
        state(s)
        (ckpt / "state.json").write_text(json.dumps(s, allow_nan=True))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest:
        manifest[name] = {"sha256": _sha256(ckpt / name), "size": (ckpt / name).stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _first(t: dict, suffix: str, dim: int) -> str:
    return next(k for k in sorted(t) if k.endswith(suffix) and t[k].dim() == dim)


def _shrink_adam(t):  # the AdamW moment of the embedding, a few rows short
    name = _first(t, ".exp_avg", 2)
    t[name] = t[name][:3].clone()


def _transpose_muon(t):  # a Muon momentum buffer of the transposed shape
    name = _first(t, ".momentum_buffer", 2)
    t[name] = t[name].t().contiguous()


def _int_adam(t):
    name = _first(t, ".exp_avg_sq", 1)
    t[name] = t[name].to(torch.int32)


def _vector_step(t):
    name = _first(t, ".step", 0)
    t[name] = torch.ones(3)


def _huge_step(t):
    name = _first(t, ".step", 0)
    t[name] = torch.tensor(float("inf"))


OPTIMIZER_TENSOR_EDITS = {
    "adamw-moment-too-small": (_shrink_adam, "exp_avg"),
    "muon-buffer-transposed": (_transpose_muon, "momentum_buffer"),
    "adamw-moment-int32": (_int_adam, "exp_avg_sq"),
    "adamw-step-not-a-scalar": (_vector_step, "step"),
    "adamw-step-infinite": (_huge_step, "step"),
}


def _resume_refused(run, capsys, in_process: bool) -> str:
    """Resume ``run``: it must be refused with one line (returned). ``in_process=False`` runs it as a
    process (for edits that crashed or hung the process before)."""
    if in_process:
        rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"])
        line = one_error_line(capsys.readouterr())
    else:
        res = _train("--resume", run, "--max-iters", "6", "--no-progress", timeout=120)
        rc, line = res.returncode, _one_line(res.stderr)
    assert rc == 2, line
    return line


@pytest.mark.parametrize("edit", list(OPTIMIZER_TENSOR_EDITS))
def test_resume_refuses_optimizer_state_that_does_not_fit(run, edit, capsys):
    """Before: the short AdamW moment segfaulted torch's fused AdamW (exit -11); the int32 moment
    and the infinite step were accepted; the others were tracebacks. Now: one line naming the
    tensor, exit 2, before any optimizer step."""
    fn, key = OPTIMIZER_TENSOR_EDITS[edit]
    edit_checkpoint(run, tensors=fn)
    line = _resume_refused(run, capsys, in_process=edit != "adamw-moment-too-small")
    assert "optim" in line and key in line, line
    assert checkpoint.load_checkpoint(run)["state"]["step"] == 4  # nothing was written


def _group(s, kind):
    return next(g for g in s["optimizer"]["param_groups"] if kind in g)


OPTIMIZER_GROUP_EDITS = {
    # before: the C++ Muon op ran 10^9 Newton-Schulz steps, deaf to SIGTERM (the process timed out)
    "ns_steps": ("ns_steps", 10**9),
    "ns_coefficients": ("ns_coefficients", [3.4445, -4.775]),  # before: a traceback from the op
    "momentum": ("momentum", "fast"),  # before: "could not convert string to float" naming no field
    "betas": ("betas", [0.9, 2.0]),  # before: ran into a NaN loss (exit 3)
    "weight_decay": ("weight_decay", float("nan")),
}


@pytest.mark.parametrize("edit", list(OPTIMIZER_GROUP_EDITS))
def test_resume_refuses_edited_optimizer_hyperparameters(run, edit, capsys):
    key, value = OPTIMIZER_GROUP_EDITS[edit]
    edit_checkpoint(run, state=lambda s: _group(s, key).__setitem__(key, value))
    assert key in _resume_refused(run, capsys, in_process=edit != "ns_steps")


def _set_rank0(path, value):
    def edit(s):
        node = s["ranks"][0]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


STATE_EDITS = {  # state.json fields that reached int()/float()/numpy unchecked (OverflowError etc.)
    "step-infinity": (lambda s: s.update(step=float("inf")), "step"),
    "step-negative": (lambda s: s.update(step=-3), "step"),
    "tokens-2^200": (lambda s: s.update(tokens_seen=2**200), "tokens_seen"),
    "best-step-text": (lambda s: s.update(best_step="four"), "best_step"),
    "bad-evals-bool": (lambda s: s.update(bad_evals=True), "bad_evals"),
    "sampler-2^200": (_set_rank0(["sampler", "state", "state"], 2**200), "sampler"),
    "eval-sampler-2^200": (_set_rank0(["eval_sampler", "val", "state", "inc"], 2**200), "sampler"),
    "python-rng-2^200": (lambda s: s["ranks"][0]["rng"]["python"][1].__setitem__(5, 2**200), "RNG"),
    "scheduler-scale-inf": (lambda s: s["scheduler"].update(scale=float("inf")), "scheduler"),
    "scheduler-bad-2^200": (lambda s: s["scheduler"].update(bad=2**200), "scheduler"),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
def test_resume_refuses_malformed_training_state(run, edit, capsys):
    fn, word = STATE_EDITS[edit]
    edit_checkpoint(run, state=fn)
    rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"])
    line = one_error_line(capsys.readouterr())
    assert rc == 2 and "state.json" in line and word in line, line


def test_best_val_nan_is_refused_not_frozen(run, capsys):
    """Before: NaN < x is False, so a NaN best_val kept the old "best" weights for ever."""
    edit_checkpoint(run, state=lambda s: s.update(best_val=float("nan")))
    rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"])
    line = one_error_line(capsys.readouterr())
    assert rc == 2 and "best_val" in line


def test_resume_of_an_unedited_copy_still_runs(run, capsys):
    """The checks above refuse edits, not fastlm's own checkpoints (state, optimizer, samplers)."""
    edit_checkpoint(run, state=lambda s: None)
    assert main(["--resume", str(run), "--max-iters", "6", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# ---- one run per directory -------------------------------------------------------------------------


def _wait_for(cond, proc, what, limit=180):
    deadline = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended before {what}: {proc.returncode} {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _logged_steps(run: Path) -> int:
    log = run / "train_log.csv"
    return len(log.read_text().splitlines()) - 1 if log.exists() else 0


def _metric_steps(run: Path) -> list:
    return [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def test_second_resume_is_refused_while_the_first_runs(run):
    """Before: the second --resume ran to completion (exit 0), the first's cleanup then deleted its
    checkpoint and metrics.csv held two step rows of different lineages."""
    first = _spawn("--resume", run, "--max-iters", "150", "--no-progress", HOOK_STEP_SLEEP=0.1)
    _wait_for(lambda: _logged_steps(run) >= 6, first, "the first resume to train")
    second = _train("--resume", run, "--max-iters", "150", "--no-progress", timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert _one_line(second.stderr) == f"error: {run} is in use by pid {first.pid}"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    saved = checkpoint.load_checkpoint(run)  # the first run's checkpoints are intact
    assert saved["state"]["step"] == 150
    assert json.loads((run / "summary.json").read_text())["steps"] == 150
    steps = _metric_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 150  # one lineage: no repeated step rows


def test_two_new_runs_racing_for_one_directory(tmp_path, corpus_20k):
    """Both start at once; exactly one trains, the other is refused naming it."""
    out = tmp_path / "race"
    args = ["--data", corpus_20k, "--out-dir", out, *TINY, "--max-iters", "100000", "--eval-interval", "50"]
    procs = [_spawn(*args, HOOK_STEP_SLEEP=0.05) for _ in range(2)]
    deadline = time.monotonic() + 240
    while all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "neither process finished"
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    _, err = loser.communicate()
    assert loser.returncode == 2, err[-2000:]
    assert _one_line(err) == f"error: {out} is in use by pid {winner.pid}"
    _wait_for(lambda: _logged_steps(out) >= 3, winner, "the winner to train")
    winner.send_signal(signal.SIGTERM)
    winner.communicate(timeout=120)
    assert winner.returncode == 128 + signal.SIGTERM
    assert (
        main(
            [
                "--resume",
                str(out),
                "--max-iters",
                str(checkpoint.load_checkpoint(out)["state"]["step"] + 1),
                "--no-progress",
            ]
        )
        == 0
    )


HOLDER = """
import sys, time
from fastlm.files.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_names_its_holder_and_dies_with_it(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"])
        assert rc == 2 and one_error_line(capsys.readouterr()) == f"error: {run} is in use by pid {holder.pid}"
        rc = main(["--data", str(run / "config.json"), "--out-dir", str(run), *TINY, "--overwrite"])
        assert rc == 2 and "in use by pid" in one_error_line(capsys.readouterr())
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: the pid it left behind blocks nothing
    assert main(["--resume", str(run), "--max-iters", "6", "--no-progress"]) == 0


class Raise(Callback):
    """Fail when the loop starts, or stop as a signal would after the first step."""

    def __init__(self, how):
        self.how = how

    def on_start(self, trainer):
        if self.how == "error":
            raise OSError(5, "Input/output error", "somewhere")

    def on_step(self, trainer, step, loss):
        if self.how == "signal":
            trainer.request_stop(signal.SIGTERM)


@pytest.mark.parametrize("how", ["error", "signal", "done"])
def test_lock_is_released_on_every_exit_path(run, capsys, how):
    from fastlm.files.runlock import RunLock

    rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"], callbacks=[Raise(how)])
    assert rc == {"error": 4, "signal": 128 + signal.SIGTERM, "done": 0}[how]
    with RunLock(run):  # this process holds no lock on the run any more: a second one is granted
        pass
    capsys.readouterr()


def test_new_run_refused_early_leaves_no_directory(tmp_path, capsys):
    """The lock of a new run creates its folder; a run refused before writing removes it again."""
    out = tmp_path / "new"
    rc = main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(out), *TINY])
    assert rc == 2 and "missing.txt" in one_error_line(capsys.readouterr())
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # a folder the user made stays, empty
    assert main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(empty), *TINY]) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []


# ---- --overwrite and symbolic links ------------------------------------------------------------------


def test_overwrite_removes_links_and_never_writes_through_them(run, corpus_20k, tmp_path):
    """Before: with data/ a link to the user's folder, --overwrite replaced the user's .npy files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("train.npy", "val.npy", "test.npy", "notes.txt"):
        (mine / name).write_bytes(b"the user's own " + name.encode())
    shutil.rmtree(run / "data")
    (run / "data").symlink_to(mine, target_is_directory=True)
    (mine / "metrics.csv").write_text("mine\n")
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(mine / "metrics.csv")
    other = tmp_path / "other-ckpt"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    (run / "ckpt-00000099-link").symlink_to(other, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert (
        main(
            [
                "--data",
                str(corpus_20k),
                "--out-dir",
                str(run),
                *TINY,
                "--max-iters",
                "2",
                "--eval-interval",
                "2",
                "--overwrite",
            ]
        )
        == 0
    )
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert (other / "keep.txt").read_text() == "keep"
    assert not (run / "data").is_symlink() and (run / "data" / "train.npy").is_file()
    assert not (run / "metrics.csv").is_symlink() and not (run / "ckpt-00000099-link").exists()


def test_resume_never_appends_through_a_linked_log(run, tmp_path, capsys):
    mine = tmp_path / "log.csv"
    mine.write_text("step,loss,lr,tokens_per_s\n")  # no rows past the checkpoint: nothing to truncate
    (run / "train_log.csv").unlink()
    (run / "train_log.csv").symlink_to(mine)
    rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"])
    assert mine.read_text() == "step,loss,lr,tokens_per_s\n"
    if rc != 0:  # refusing the link is as good as replacing it
        assert rc == 2 and "train_log.csv" in one_error_line(capsys.readouterr())
    else:
        assert not (run / "train_log.csv").is_symlink()


# ---- file modes follow the umask ---------------------------------------------------------------------


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_every_file_of_a_run_follows_the_umask(tmp_path, corpus_20k, umask_002):
    """Before: config.json, tokenizer.json, summary.json, latest, loss.png at 0600, ckpt-* at 0700."""
    out = tmp_path / "run"
    assert (
        main(["--data", str(corpus_20k), "--out-dir", str(out), *TINY, "--max-iters", "2", "--eval-interval", "2"]) == 0
    )
    modes = {}
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            path = Path(root, name)
            modes[str(path.relative_to(out))] = (path.stat().st_mode & 0o777, path.is_dir())
    wrong = {k: oct(m) for k, (m, is_dir) in modes.items() if m != (0o775 if is_dir else 0o664)}
    assert not wrong, wrong
    assert {"config.json", "tokenizer.json", "summary.json", "latest", "loss.png"} <= set(modes)
    assert any(k.startswith("ckpt-") and is_dir for k, (_, is_dir) in modes.items())


def test_atomic_writes_follow_the_umask(tmp_path, umask_002):
    from fastlm.files import atomic

    atomic.atomic_write_text(tmp_path / "a" / "x.txt", "x")
    assert (tmp_path / "a" / "x.txt").stat().st_mode & 0o777 == 0o664
    os.umask(0o077)
    atomic.atomic_write_json(tmp_path / "y.json", {})
    assert (tmp_path / "y.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_lock_file_that_is_not_a_file_is_refused(run, tmp_path, capsys, kind):
    """A shared run cannot point the lock elsewhere (a link is not followed) nor block it (a FIFO)."""
    target = tmp_path / "elsewhere"
    target.write_text("1\n")
    lock = run / ".lock"
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    {"symlink": lambda: lock.symlink_to(target), "fifo": lambda: os.mkfifo(lock), "directory": lock.mkdir}[kind]()
    rc = main(["--resume", str(run), "--max-iters", "6", "--no-progress"])
    assert rc == 2 and ".lock" in one_error_line(capsys.readouterr())
    assert target.read_text() == "1\n"
