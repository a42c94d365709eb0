"""``python -m benchmarks.speedrun`` in its quick mode (a tiny model, one seed, a few steps), its
equal-wall step arithmetic, and the report's "CPU speedrun" table. Nothing here is timed."""

import json
from pathlib import Path

import pytest

from benchmarks import report, speedrun
from fastlm.training.settings import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes"


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_run_prints_and_records_the_recipe(tmp_path, corpus, capsys, one_thread):
    results = tmp_path / "results.jsonl"
    assert speedrun.main(["--quick", "--corpus", str(corpus), "--results", str(results), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "whole-val loss" in out and "\ndefault " in out and "appended 1 row(s)" in out
    (row,) = rows_of(results)
    assert row["suite"] == "speedrun" and row["op"] == "default" and row["variant"] == Path(corpus).name
    assert row["steps"] == 5 and row["seeds"] == [1337] and len(row["val_loss"]) == 1
    assert row["val_loss_mean"] == row["val_loss"][0] and row["val_loss_std"] is None
    assert row["tokens_seen"] == [5 * 4 * 16] and row["flops_mean"] > 0 and 0 < row["mfu_mean"] < 1
    assert row["cpu_train_s_mean"] > 0 and row["mfu_cpu_mean"] > 0
    assert row["shape"] == {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch": 4}
    assert row["threads"] == 1 and row["device"].startswith("CPU ") and row["load_1min_mean"] >= 0


def test_quick_equal_wall_comparison(tmp_path, corpus, capsys, one_thread):
    results = tmp_path / "results.jsonl"
    configs = [str(RECIPES / f"{name}.toml") for name in ("plain", "relu2", "wsd")]
    argv = ["--quick", "--equal-wall", "--corpus", str(corpus), "--results", str(results), "--threads", "1"]
    assert speedrun.main(argv + [a for c in configs for a in ("--config", c)]) == 0
    out = capsys.readouterr().out
    assert "timing: 1 rounds of 1 steps" in out and "relu2: step time x" in out
    by_op = {r["op"]: r for r in rows_of(results)}
    assert list(by_op) == ["plain", "relu2", "wsd"]
    assert by_op["plain"]["steps"] == 5 and by_op["plain"]["step_ratio"] is None
    assert by_op["wsd"]["steps"] == 5 and by_op["wsd"]["step_ratio"] == {"ratio": 1.0, "measured": False}
    ratio = by_op["relu2"]["step_ratio"]
    assert ratio["measured"] and ratio["ratio"] > 0 and by_op["relu2"]["steps"] >= 1
    md = "\n".join(report.speedrun_section(rows_of(results)))
    assert "## CPU speedrun" in md and "| relu2 |" in md and "| wsd |" in md


def test_equal_wall_arithmetic():
    # a step costs 1 s + 0.25 s per sequence: 5 s at batch 16, 2 s at batch 4
    step_time = speedrun.fit_step_time([(4, 2.0), (4, 2.2), (4, 1.8), (16, 5.0), (16, 5.5), (16, 4.5)])
    assert step_time(4) == pytest.approx(2.0) and step_time(16) == pytest.approx(5.0)
    plain = TrainConfig(batch_size=16)
    warm = TrainConfig(batch_size=16, batch_warmup_iters=8)  # batches 4, 5, 7, 8, 10, 11, 13, 14, then 16
    assert speedrun.predicted_wall(step_time, plain, 10) == pytest.approx(50.0)
    assert speedrun.steps_within(step_time, plain, 50.0) == 10
    assert speedrun.steps_within(step_time, plain, 49.9) == 9
    warm_wall = sum(1 + 0.25 * b for b in (4, 5, 7, 8, 10, 11, 13, 14))  # 26 s for the warm-up
    assert speedrun.steps_within(step_time, warm, 50.0) == 8 + int((50.0 - warm_wall) // 5.0)
    assert speedrun.steps_within(step_time, plain, 0.1) == 1
    one_size = speedrun.fit_step_time([(16, 3.0), (16, 1.0), (16, 2.0)])
    assert one_size(16) == 2.0


def test_report_compares_each_recipe_with_the_default():
    base = {
        "device": "CPU x",
        "suite": "speedrun",
        "backend": "auto",
        "variant": "c.txt",
        "date": "2026-01-01",
        "seeds": [1, 2, 3],
        "steps": 100,
        "val_loss_std": 0.01,
        "threads": 1,
        "commit": "abc",
    }
    rows = [
        {**base, "op": "default", "val_loss_mean": 1.60},
        {**base, "op": "qk_norm", "val_loss_mean": 1.57, "step_ratio": {"ratio": 1.05}},
        {**base, "op": "qk_norm", "val_loss_mean": 1.50, "date": "2025-01-01"},
    ]  # older: not shown
    md = "\n".join(report.speedrun_section(rows))
    (line,) = [ln for ln in md.splitlines() if "| qk_norm |" in ln]
    assert "1.5700 ± 0.0100" in line and "-0.0300" in line and "1.050" in line
    assert report.speedrun_section([{**base, "op": "x", "suite": "model", "val_loss_mean": 1.0}]) == []


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        speedrun.main(["--seeds", "0"])
    assert e.value.code == 2 and "--seeds must be at least 1" in capsys.readouterr().err


def test_each_ablation_recipe_is_the_plain_model_plus_one_option():
    """The ablation rows compare like with like: plain.toml is the plain model (every speedrun option off,
    even the ones added after it was written), and every recipe but the default*.toml ones changes
    one thing of it."""
    import tomllib

    from fastlm.model import PLAIN_OPTIONS, GPTConfig

    def settings(path):
        d = tomllib.loads(path.read_text(encoding="utf-8"))
        GPTConfig(**d.get("model", {}))  # a valid model
        return d.get("model", {}), d.get("train", {})

    plain_model, plain_train = settings(RECIPES / "plain.toml")
    resolved = GPTConfig(**plain_model).to_dict()
    assert {k: resolved[k] for k in PLAIN_OPTIONS} == PLAIN_OPTIONS and resolved["tie_embeddings"]
    ablations = sorted(p for p in RECIPES.glob("*.toml") if not p.stem.startswith(("default", "plain")))
    assert len(ablations) >= 9
    for path in ablations:
        model, train = settings(path)
        changed = [k for k in {**plain_model, **model} if model.get(k) != plain_model.get(k)]
        changed += [k for k in {**plain_train, **train} if train.get(k) != plain_train.get(k)]
        assert len(changed) == 1, (path.name, changed)
