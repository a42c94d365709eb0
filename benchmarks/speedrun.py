"""The CPU speedrun: a training recipe run with several seeds, whole-val loss / wall time / tokens /
FLOPs / MFU as mean +- std (sample std over the seeds), one row per recipe in ``results.jsonl``.

    python -m benchmarks.speedrun [--seeds 3] [--config FILE ...] [--steps N] [--corpus FILE ...]
                                  [--threads N] [--jobs N] [--equal-wall] [--quick]

A recipe is a ``python -m fastlm.train --config`` file (TOML or JSON; ``benchmarks/recipes/`` holds the
default, ``plain`` (the model without speedrun options, the default before 2026-12-07) and one file per
speedrun option, each ``plain`` plus that option: the ablations); no ``--config``: the default run. Several ``--config``
files run in alternating order (recipe A seed 1, B seed 1, A seed 2, ...), so drift in the machine's
load hits them alike. Seeds are ``--seed0``, ``--seed0 + 1``, ... ``--jobs N`` runs N trainings at
once (separate processes; give each ``--threads``): the loss at a given step count does not depend
on it, the wall times do.

``--equal-wall`` (ablations at equal wall time): before the loss runs, every recipe's optimizer step
(sampled windows, forward, backward, clipping, optimizer: what the Trainer does per step) is timed in
one process, the recipes taking turns a few steps at a time (``--time-rounds`` rounds of
``--time-steps`` steps per recipe and batch size; with a batch-size warm-up the step time is fitted as
``a + b * batch`` from the smallest and the full batch), and every recipe after the first gets the
number of steps whose predicted step times add up to the first recipe's (evaluations and checkpoints
are not counted). Recipes whose model and batch schedule equal the first one's (a schedule or init
option) take its steps unmeasured. Steps are timed by the process's CPU time, not wall time: on a
shared machine a step's wall time is mostly the other jobs' (seen here: 80 ms of CPU in 500 ms of
wall at a load of 14 on 2 cores; wall-time ratios of equal-cost recipes from 0.5 to 2.4 across
rounds), while with ``--threads 1`` a step's CPU time is the wall time it takes on an idle core.
(With more threads CPU time also counts their spin-waits: time such recipes on an idle machine.)

``--quick``: a tiny model on the first 20,000 characters of the bundled corpus, one seed, a few
steps: what the test suite runs (``tests/test_speedrun_bench.py``). This module is not a pytest file,
so plain ``pytest`` never collects it.

Rows (``suite: "speedrun"``) carry the per-seed values, their mean and std, the recipe's settings, the
machine's load (``os.getloadavg``, 1-minute, before and after each run) and, with ``--equal-wall``,
the step-time ratio to the first recipe with its spread over the rounds. ``python -m benchmarks.report``
shows them as the "CPU speedrun" table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from fastlm.model import GPT, GPTConfig
from fastlm.text import data as data_mod
from fastlm.train import resolve_config
from fastlm.training import rundir
from fastlm.training.optim import clip_grad_norm, optimizer_for
from fastlm.training.runtime import autocast, resolve_dtype
from fastlm.training.settings import resolve_settings
from fastlm.training.trainer import Callback, Trainer

from .common import append_row, results_path, run_info

QUICK_MODEL = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16"]
QUICK_TRAIN = ["--batch-size", "4", "--eval-iters", "1", "--sample-tokens", "0", "--warmup-iters", "2"]


@dataclasses.dataclass
class Recipe:
    """A label and the ``python -m fastlm.train`` arguments that define it (seed and paths excluded)."""

    label: str
    args: list
    steps: Optional[int] = None  # set by --steps or --equal-wall (else the recipe's max_iters)
    step_ratio: Optional[dict] = None  # --equal-wall: step time vs the first recipe


def settings(recipe: Recipe, extra: list):
    """``(TrainConfig, model dict)`` of a recipe with ``extra`` flags on top."""
    train, model, _, _ = resolve_config([*recipe.args, *extra])
    return train, model


# ---- one training run -------------------------------------------------------------------------------
class CpuClock(Callback):
    """The process's CPU time when the training loop starts and at its last step."""

    def __init__(self):
        self.start = self.last = 0.0

    def on_start(self, trainer):
        self.start = time.process_time()

    def on_step(self, trainer, step, loss):
        self.last = time.process_time()


def train_once(recipe: Recipe, common: list, seed: int, out_dir: Path, steps: Optional[int]) -> dict:
    """One run of the recipe (its output in ``out_dir.log``); returns the summary, the load and the
    CPU seconds of its training loop (``cpu_train_s``: from the loop's start to the last step) with
    the MFU they give (``mfu_cpu``: what the run would reach alone on the machine with one thread)."""
    extra = [*common, "--seed", str(seed), "--out-dir", str(out_dir), "--overwrite", "--no-progress"]
    if steps is not None:
        extra += ["--max-iters", str(steps)]
    train, model = settings(recipe, extra)
    load_before = os.getloadavg()[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f"{out_dir.name}.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        clock = CpuClock()
        summary = Trainer(train, model, callbacks=[clock]).fit()
    cpu_s = clock.last - clock.start
    peak = summary["peak_flops_per_s"]
    return {
        **summary,
        "load_1min": (load_before + os.getloadavg()[0]) / 2,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "cpu_train_s": cpu_s,
        "mfu_cpu": summary["flops"] / cpu_s / peak if peak and cpu_s > 0 else None,
    }


# ---- --equal-wall: step times -------------------------------------------------------------------------
def timing_key(recipe: Recipe, common: list) -> tuple:
    """What a step's time depends on: the model (init-only fields aside) and the batch schedule."""
    train, model = settings(recipe, common)
    resolved = resolve_settings(train, model, "cpu")
    m = {k: v for k, v in resolved.model.items() if k not in ("zero_init_proj",)}
    t = resolved.train
    return (
        tuple(sorted(m.items())),
        t.batch_size,
        t.grad_accum,
        t.batch_warmup_iters,
        t.batch_at(0) if t.batch_warmup_iters else None,
        t.threads,
        resolve_dtype(t.dtype, "cpu"),
    )


def step_runner(recipe: Recipe, common: list, tokenizer, train_ids):
    """``(step(batch), resolved TrainConfig)``: one optimizer step of the recipe's model and optimizer as
    the Trainer takes it (sampled windows, forward and loss under the run's autocast, backward,
    clipping, step), at a given batch."""
    train, model = settings(recipe, common)
    resolved = resolve_settings(train, model, "cpu")
    t = resolved.train
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{**resolved.model, "vocab_size": tokenizer.vocab_size}))
    opt = optimizer_for(gpt, t, "cpu")
    sampler = data_mod.BatchSampler(train_ids, gpt.config.block_size, t.batch_size, [0, 0])

    amp = autocast("cpu", resolve_dtype(t.dtype, "cpu"))

    def step(batch: int) -> None:
        for _ in range(t.grad_accum):
            x, y = sampler.sample("cpu", batch_size=batch)
            with amp():
                loss = gpt(x, y)[1]
            (loss / t.grad_accum).backward()
        if t.grad_clip > 0:
            clip_grad_norm(gpt.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, t


def cpu_seconds(fn, *args) -> float:
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


def fit_step_time(samples: list):
    """``t(batch)``: the median step time, or with several batch sizes a least-squares line."""
    sizes = sorted({b for b, _ in samples})
    medians = {b: statistics.median([t for bb, t in samples if bb == b]) for b in sizes}
    if len(sizes) < 2:
        return lambda batch: medians[sizes[0]]
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(medians.values()) / n
    slope = sum((b - mx) * (medians[b] - my) for b in sizes) / sum((b - mx) ** 2 for b in sizes)
    return lambda batch: my + slope * (batch - mx)


def predicted_wall(step_time, train, steps: int) -> float:
    return sum(step_time(train.batch_at(s)) for s in range(steps))


def steps_within(step_time, train, budget: float) -> int:
    """The most steps (at least 1) whose predicted times add up to at most ``budget`` seconds."""
    total, steps = 0.0, 0
    while total + step_time(train.batch_at(steps)) <= budget:
        total += step_time(train.batch_at(steps))
        steps += 1
    return max(1, steps)


def equal_wall_steps(recipes: list, common: list, rounds: int, n_steps: int, log) -> None:
    """Set each recipe's ``steps`` so its predicted step time adds up to the first recipe's."""
    base = recipes[0]
    base_train, base_model = settings(base, common)
    base_steps = base.steps or resolve_settings(base_train, base_model, "cpu").train.max_iters
    base.steps = base_steps
    keys = {r.label: timing_key(r, common) for r in recipes}
    timed = [r for r in recipes if r is base or keys[r.label] != keys[base.label]]
    tokenizer, splits, _ = rundir.build_data(base_train, 1)
    runners = {r.label: step_runner(r, common, tokenizer, splits["train"]) for r in timed}
    sizes = {k: sorted({t.batch_at(0), t.batch_size}) for k, (_, t) in runners.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(base_train.threads or threads)
    samples = {r.label: [] for r in timed}
    per_round = {r.label: [] for r in timed}
    try:
        for step, t in runners.values():  # optimizer state, first-call costs
            step(t.batch_size)
        for _ in range(rounds):
            for r in timed:  # alternating, a few steps at a time: load drift hits every recipe alike
                step = runners[r.label][0]
                got = [(b, cpu_seconds(step, b)) for b in sizes[r.label] for _ in range(n_steps)]
                samples[r.label] += got
                per_round[r.label].append(sum(t for b, t in got if b == runners[r.label][1].batch_size))
    finally:
        torch.set_num_threads(threads)
    log(
        f"timing: {rounds} rounds of {n_steps} steps per batch size, median CPU ms/step: "
        + ", ".join(f"{k} {1e3 * statistics.median(t for _, t in v):.1f}" for k, v in samples.items())
    )
    base_fit = fit_step_time(samples[base.label])
    budget = predicted_wall(base_fit, resolve_settings(base_train, base_model, "cpu").train, base_steps)
    for r in recipes[1:]:
        if keys[r.label] == keys[base.label]:
            r.steps, r.step_ratio = base_steps, {"ratio": 1.0, "measured": False}
            continue
        train, model = settings(r, common)
        resolved = resolve_settings(train, model, "cpu").train
        steps = steps_within(fit_step_time(samples[r.label]), resolved, budget)
        ratios = [a / b for a, b in zip(per_round[r.label], per_round[base.label])]
        r.steps = steps
        r.step_ratio = {
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "measured": True,
            "base_cpu_ms": 1e3 * statistics.median(per_round[base.label]),
            "cpu_ms": 1e3 * statistics.median(per_round[r.label]),
        }
        log(
            f"{r.label}: step time x{r.step_ratio['ratio']:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}) "
            f"-> {steps} steps at the wall time of {base_steps} {base.label} steps"
        )


# ---- statistics, rows, table ----------------------------------------------------------------------------
def mean_std(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pm(values: list, fmt: str, scale: float = 1.0) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "n/a"
    return format(mean * scale, fmt) + (" ± " + format(std * scale, fmt) if std is not None else "")


def recipe_row(recipe: Recipe, runs: list, corpus: str, common: list) -> dict:
    train, model = settings(recipe, common)
    resolved = resolve_settings(train, model, "cpu")
    row = {
        "suite": "speedrun",
        "op": recipe.label,
        "pass": None,
        "backend": "auto",
        "dtype": runs[0].get("dtype") or train.dtype,  # the autocast dtype the runs resolved
        "shape": {k: resolved.model[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
        | {"batch": resolved.train.batch_size},
        "causal": True,
        "variant": corpus,
        "steps": runs[0]["steps"],
        "seeds": [r["seed"] for r in runs],
        "recipe_args": recipe.args,
        "step_ratio": recipe.step_ratio,
        "threads": train.threads or runs[0].get("threads"),
        "peak_flops_per_s": runs[0].get("peak_flops_per_s"),
        "peak_source": runs[0].get("peak_source"),
    }
    for key in (
        "val_loss",
        "train_wall_s",
        "wall_s",
        "cpu_train_s",
        "tokens_seen",
        "flops",
        "mfu",
        "mfu_cpu",
        "load_1min",
    ):
        values = [r.get(key) for r in runs]
        mean, std = mean_std(values)
        row.update({key: values, f"{key}_mean": mean, f"{key}_std": std})
    return row


def print_table(rows: list) -> None:
    head = [
        "recipe",
        "steps",
        "seeds",
        "whole-val loss",
        "train wall s",
        "train CPU s",
        "tokens",
        "FLOPs",
        "MFU %",
        "MFU (CPU time) %",
        "load",
    ]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["op"],
                str(r["steps"]),
                str(len(r["seeds"])),
                pm(r["val_loss"], ".4f"),
                pm(r["train_wall_s"], ".1f"),
                pm(r["cpu_train_s"], ".1f"),
                f"{r['tokens_seen_mean']:,.0f}",
                f"{r['flops_mean']:.3g}",
                pm(r["mfu"], ".1f", 100),
                pm(r["mfu_cpu"], ".1f", 100),
                pm(r["load_1min"], ".1f"),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speedrun", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a recipe (python -m fastlm.train --config file); repeat to compare (alternating runs)",
    )
    p.add_argument("--seeds", type=int, default=3, help="runs per recipe (seeds seed0, seed0 + 1, ...)")
    p.add_argument("--seed0", type=int, default=1337, help="the first seed (1337: the default run's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's max_iters)")
    p.add_argument(
        "--corpus", nargs="+", default=None, metavar="FILE", help="training text (default: Tiny Shakespeare)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run (default: torch's)")
    p.add_argument(
        "--equal-wall",
        action="store_true",
        help="time every recipe's step (alternating) and give each the steps of the first one's wall time",
    )
    p.add_argument(
        "--time-only",
        action="store_true",
        help="with --equal-wall: print the step counts and stop (no loss runs, no rows)",
    )
    p.add_argument("--time-rounds", type=int, default=10, help="--equal-wall: alternating timing rounds")
    p.add_argument(
        "--time-steps", type=int, default=3, help="--equal-wall: steps per recipe (and batch size) per round"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings at once (processes; the loss at a fixed step count does not depend on it, the "
        "wall time and MFU of each run do; --equal-wall timing always runs alone)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps, one seed (the test suite's run)")
    p.add_argument("--results", type=Path, default=None, help="results file (default: benchmarks/results.jsonl)")
    p.add_argument("--no-record", action="store_true", help="print only; append no rows")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories in this folder")
    args = p.parse_args(argv)
    if args.time_only and not args.equal_wall:
        p.error("--time-only goes with --equal-wall")
    for name in ("seeds", "time_rounds", "time_steps", "steps", "threads", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def _setup(args, root: Path) -> tuple:
    """``(recipes, common flags, corpus label)``."""
    recipes = [Recipe(Path(c).stem, ["--config", c]) for c in args.config] or [Recipe("default", [])]
    labels = [r.label for r in recipes]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"error: two recipes share the name {max(labels, key=labels.count)!r} (file names)")
    common = ["--device", "cpu"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    corpus = args.corpus
    if args.quick:
        if corpus is None:
            corpus = [str(root / "quick.txt")]
            Path(corpus[0]).write_text(data_mod.default_corpus().read_text(encoding="utf-8")[:20000], encoding="utf-8")
        common += [*QUICK_MODEL, *QUICK_TRAIN]
        args.steps = args.steps or 5
        args.seeds = 1
        args.time_steps, args.time_rounds = 1, 1
    if corpus:
        common += ["--data", *corpus]
    label = ",".join(Path(c).name for c in corpus) if corpus else "tinyshakespeare"
    for r in recipes:
        r.steps = args.steps
    return recipes, common, label


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fastlm-speedrun-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        recipes, common, corpus = _setup(args, root)
        if args.equal_wall and len(recipes) > 1:
            equal_wall_steps(recipes, common, args.time_rounds, args.time_steps, log)
        if args.time_only:
            return 0
        rows = loss_runs(recipes, common, corpus, root, args, log)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print_table(rows)
    if not args.no_record:
        print(f"\nappended {len(rows)} row(s) to {args.results or results_path()}")
    return 0


def loss_runs(recipes: list, common: list, corpus: str, root: Path, args, log) -> list:
    """Every (recipe, seed) run, seed-major (alternating recipes), ``--jobs`` at a time; a recipe's
    row is appended as soon as its last seed is done (a later failure loses nothing)."""
    order = [(r, args.seed0 + i) for i in range(args.seeds) for r in recipes]
    runs, rows = {r.label: {} for r in recipes}, {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(train_once, r, common, seed, root / f"{r.label}-seed{seed}", r.steps): (r, seed)
            for r, seed in order
        }
        for future in concurrent.futures.as_completed(futures):
            r, seed = futures[future]
            s = runs[r.label][seed] = future.result()
            log(
                f"{r.label} seed {seed}: whole-val {s['val_loss']:.4f}, {s['steps']} steps, train wall "
                f"{s['train_wall_s']:.1f} s, MFU {100 * (s['mfu'] or 0):.1f}%, load {s['load_1min']:.1f}"
            )
            if len(runs[r.label]) == args.seeds:
                rows[r.label] = recipe_row(r, [runs[r.label][k] for k in sorted(runs[r.label])], corpus, common)
                if not args.no_record:
                    info = {**run_info(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                    append_row({**info, **rows[r.label]}, args.results or results_path())
    return [rows[r.label] for r in recipes]


if __name__ == "__main__":
    sys.exit(main())
