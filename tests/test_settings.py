"""One source of truth for a run's settings: profiles fill only what the caller left unset, every value
given is honoured (even one equal to a default), ``GPTConfig()`` is the default run's model, the
resolved run is printed by ``--print-config`` and saved before training, and the training loss is
read on the host only when it is logged, evaluated after or watched."""

import json

import pytest
import torch
from conftest import one_error_line
from tiny_run import TINY_RUN

from fastlm.model import GPTConfig
from fastlm.train import main
from fastlm.training import trainer as trainer_mod
from fastlm.training.settings import PROFILES, TrainConfig, resolve_settings
from fastlm.training.trainer import Callback, Trainer

TINY = [*TINY_RUN, "--eval-iters", "1"]


def test_gptconfig_is_the_default_runs_model():
    resolved = resolve_settings(TrainConfig(), {}, "cpu")
    assert resolved.profile == "cpu"
    default = GPTConfig().to_dict()
    default.pop("vocab_size")
    assert resolved.model == default
    assert (GPTConfig().n_layer, GPTConfig().n_embd, GPTConfig().pos, GPTConfig().mlp) == (3, 96, "rope", "swiglu")


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_a_value_given_is_honoured_under_either_profile(device_type):
    """max_iters=950 and batch_size=16 equal the cpu recipe; under the gpu one they are still the run's."""
    given = TrainConfig(max_iters=950, batch_size=16, lr=2e-3)
    resolved = resolve_settings(given, {"n_layer": 3}, device_type)
    assert resolved.profile == ("gpu" if device_type == "cuda" else "cpu")
    assert (resolved.train.max_iters, resolved.train.batch_size, resolved.train.lr) == (950, 16, 2e-3)
    assert resolved.model["n_layer"] == 3
    unset = {k: v for k, v in PROFILES[resolved.profile]["train"].items() if k not in ("max_iters", "batch_size", "lr")}
    assert {k: getattr(resolved.train, k) for k in unset} == unset  # the rest: the profile's
    assert set(resolved.from_profile) >= set(unset) and not {"max_iters", "batch_size", "lr"} & set(
        resolved.from_profile
    )


@pytest.mark.parametrize(
    "native, dtype, recipe",
    [("1", "auto", "train_bf16"), ("0", "auto", "train"), ("1", "float32", "train"), ("0", "bfloat16", "train_bf16")],
)
def test_the_cpu_profile_takes_more_steps_where_it_trains_in_bfloat16(monkeypatch, native, dtype, recipe):
    """``--dtype auto`` trains in bfloat16 on a CPU with native bf16 (FASTLM_CPU_BF16 stands in for the
    CPU's flags), and the cpu profile's step count is then its bfloat16 one; a dtype or a step count
    given is honoured."""
    from fastlm.training.runtime import resolve_dtype

    monkeypatch.setenv("FASTLM_CPU_BF16", native)
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native == "1" else torch.float32)
    steps = PROFILES["cpu"][recipe]["max_iters"]
    assert PROFILES["cpu"]["train_bf16"]["max_iters"] > PROFILES["cpu"]["train"]["max_iters"]
    resolved = resolve_settings(TrainConfig(dtype=dtype), {}, "cpu")
    assert resolved.train.max_iters == steps and resolved.from_profile["max_iters"] == steps
    assert resolve_settings(TrainConfig(dtype=dtype, max_iters=5), {}, "cpu").train.max_iters == 5
    assert (
        resolve_settings(TrainConfig(dtype=dtype), {}, "cuda").train.max_iters == PROFILES["gpu"]["train"]["max_iters"]
    )


def test_the_cpu_recipe_speeds_up_the_embeddings_and_a_fine_tune_keeps_lr(monkeypatch, tmp_path, corpus, capsys):
    """The cpu profile trains its embedding tables at 5x lr, in bfloat16 and in float32 (the gpu profile:
    1x); a fine-tune (init_from) keeps 1x; a value given is honoured, a bad one refused in one line
    before anything is written."""
    for native, ratio in (("1", 5.0), ("0", 5.0)):
        monkeypatch.setenv("FASTLM_CPU_BF16", native)
        resolved = resolve_settings(TrainConfig(), {}, "cpu")
        assert resolved.train.embed_lr_ratio == resolved.from_profile["embed_lr_ratio"] == ratio
        assert resolve_settings(TrainConfig(), {}, "cuda").train.embed_lr_ratio == 1.0
        assert resolve_settings(TrainConfig(init_from="some/run"), {}, "cpu").train.embed_lr_ratio == 1.0
        for given in ({}, dict(init_from="some/run")):
            for device in ("cpu", "cuda"):
                chosen = resolve_settings(TrainConfig(embed_lr_ratio=2.5, **given), {}, device)
                assert chosen.train.embed_lr_ratio == 2.5 and "embed_lr_ratio" not in chosen.from_profile
    assert (PROFILES["cpu"]["train"]["embed_lr_ratio"], PROFILES["gpu"]["train"]["embed_lr_ratio"]) == (5.0, 1.0)
    run = tmp_path / "bad"
    for bad in ("0", "-2", "nan", "inf", "1e9"):
        rc = main(["--data", str(corpus), "--out-dir", str(run), *TINY, "--embed-lr-ratio", bad])
        assert rc == 2 and "embed_lr_ratio must be a finite number in (0, 1000]" in one_error_line(capsys.readouterr())
        assert not run.exists()


def test_trainer_resolves_the_gpu_profile_without_a_gpu(monkeypatch, tmp_path):
    """``Trainer(TrainConfig(max_iters=N))`` runs N steps under the gpu profile too: with CUDA reported
    available, device auto resolves to cuda and the gpu recipe fills only what was left unset."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer = Trainer(TrainConfig(max_iters=7, out_dir=str(tmp_path / "r")))
    assert trainer.device_type == "cuda" and trainer.settings()["profile"] == "gpu"
    assert trainer.config.max_iters == 7 and trainer.config.batch_size == PROFILES["gpu"]["train"]["batch_size"]
    assert trainer.settings()["model"]["n_layer"] == PROFILES["gpu"]["model"]["n_layer"]
    off = Trainer(TrainConfig(max_iters=7, gpu_defaults=False, out_dir=str(tmp_path / "r")))
    assert off.settings()["profile"] == "cpu" and off.config.batch_size == PROFILES["cpu"]["train"]["batch_size"]
    cpu = Trainer(TrainConfig(max_iters=7, profile="cpu", out_dir=str(tmp_path / "r")))
    assert cpu.settings()["profile"] == "cpu"


def test_print_config_shows_the_resolved_run_without_training(tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["--print-config", "--profile", "gpu", "--max-iters", "1150", "--out-dir", str(out), "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0 and not out.exists()
    assert printed["profile"] == "gpu" and printed["train"]["max_iters"] == 1150
    assert printed["train"]["batch_size"] == PROFILES["gpu"]["train"]["batch_size"]
    assert printed["model"]["n_embd"] == PROFILES["gpu"]["model"]["n_embd"]
    assert "max_iters" not in printed["from_profile"] and printed["from_profile"]["batch_size"] == 64
    rc = main(["--print-config", "--n-head", "5"])
    assert rc == 2 and "n_embd (96) must be divisible by n_head (5)" in one_error_line(capsys.readouterr())


def test_the_saved_config_is_the_printed_one(tmp_path, corpus, capsys):
    args = [
        "--data",
        str(corpus),
        "--out-dir",
        str(tmp_path / "run"),
        *TINY,
        "--max-iters",
        "2",
        "--eval-interval",
        "2",
    ]
    assert main(args + ["--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # doc_mask is decided when the corpus is read (on with several documents): null until then
    assert printed["train"].pop("doc_mask") is None and saved["train"].pop("doc_mask") is False
    assert saved["train"] == printed["train"]
    assert {k: v for k, v in saved["model"].items() if k != "vocab_size"} == printed["model"]
    assert saved["command"].startswith("python -m fastlm.train") and "--max-iters 2" in saved["command"]


def test_a_cpu_run_records_its_precision_and_resumes_in_it(tmp_path, corpus, capsys, monkeypatch):
    """``--dtype auto`` on a CPU is resolved when the run starts and config.json records it, so a resume
    continues in that precision on a machine whose choice differs (here FASTLM_CPU_BF16 flips)."""
    run = tmp_path / "run"
    args = ["--data", str(corpus), "--out-dir", str(run), *TINY, "--eval-interval", "2"]
    monkeypatch.setenv("FASTLM_CPU_BF16", "1")
    assert main([*args, "--max-iters", "2"]) == 0
    assert "device: cpu (autocast bfloat16)" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "bfloat16"
    monkeypatch.setenv("FASTLM_CPU_BF16", "0")
    assert main(["--resume", str(run), "--max-iters", "4"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu (autocast bfloat16)" in out and "step 4" in out
    assert json.loads((run / "summary.json").read_text())["dtype"] == "bfloat16"
    assert main([*args, "--out-dir", str(tmp_path / "fp32"), "--max-iters", "2"]) == 0  # this machine: float32
    assert "device: cpu (float32)" in capsys.readouterr().out
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["train"]["dtype"] == "float32"


class NaNAtStep(Callback):
    """The embedding output turns NaN in the forward of step ``step`` (only on_start is overridden, so
    the trainer need not read every step's loss)."""

    def __init__(self, step):
        self.step = step

    def on_start(self, trainer):
        def hook(module, inputs, output):
            return output * float("nan") if trainer.progress.step + 1 == self.step else output

        trainer.raw_model.wte.register_forward_hook(hook)


def test_loss_is_read_only_when_logged_and_a_nan_still_names_its_step(tmp_path, corpus, capsys, monkeypatch):
    reads = []
    real = trainer_mod.Trainer._read_losses

    def counting(self, step):
        reads.append((step, len(self._clock.losses)))
        return real(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "_read_losses", counting)
    args = ["--data", str(corpus), *TINY, "--log-interval", "5", "--eval-interval", "10"]
    assert main(args + ["--out-dir", str(tmp_path / "a"), "--max-iters", "20"]) == 0
    assert reads == [(5, 5), (10, 5), (15, 5), (20, 5)]  # 4 host reads for 20 steps, each checking 5 losses
    reads.clear()
    rc = main(args + ["--out-dir", str(tmp_path / "b"), "--max-iters", "20"], callbacks=[NaNAtStep(8)])
    assert rc == 3 and "loss is nan at step 8" in capsys.readouterr().err
    assert reads[-1] == (10, 5)  # found at the next read, before the evaluation and checkpoint of step 10
    assert json.loads((tmp_path / "b" / "latest").read_text())["step"] == 0  # the last good checkpoint


def test_a_callback_watching_steps_gets_every_loss(tmp_path, corpus):
    seen = []

    class Watch(Callback):
        def on_step(self, trainer, step, loss):
            seen.append((step, loss))

    assert (
        main(
            [
                "--data",
                str(corpus),
                "--out-dir",
                str(tmp_path / "w"),
                *TINY,
                "--log-interval",
                "5",
                "--eval-interval",
                "10",
                "--max-iters",
                "6",
            ],
            callbacks=[Watch()],
        )
        == 0
    )
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6] and all(isinstance(v, float) for _, v in seen)
