"""MFU in every run (issue 24): the peak (CPU measurement and its cache, the CUDA table, the override),
the training summary's FLOP fields and their consistency, and ``fastlm.info``'s peak line. No timing is
asserted: the CPU measurement is replaced by a fixed figure wherever a number is checked."""

import json

import pytest
import torch
from tiny_run import tiny_train_config

from fastlm import info
from fastlm.model import GPT, GPTConfig
from fastlm.training import mfu
from fastlm.training.runtime import resolve_dtype
from fastlm.training.trainer import Trainer


@pytest.fixture
def fake_gemm(tmp_path, monkeypatch):
    """A fresh cache folder and a CPU 'measurement' that returns 50 GFLOP/s and counts its calls."""
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTLM_PEAK_TFLOPS", raising=False)
    calls = []

    def measure(*args, **kwargs):
        calls.append(torch.get_num_threads())
        return 50e9 + len(calls)  # each measurement a little higher: shows which one is used

    monkeypatch.setattr(mfu, "measure_cpu_gemm", measure)
    return calls


def test_cpu_peak_is_measured_once_and_cached(fake_gemm, monkeypatch):
    first = mfu.calibrate_cpu(threads=2)
    assert first.flops_per_s == 2 * (50e9 + 1) and len(fake_gemm) == 1
    assert mfu.calibrate_cpu(threads=2).flops_per_s == first.flops_per_s and len(fake_gemm) == 1
    assert mfu.calibrate_cpu(threads=3).flops_per_s == 3 * (50e9 + 1) and len(fake_gemm) == 1  # per thread
    stored = json.loads(mfu.cache_path().read_text())
    ((key, entry),) = stored.items()
    assert mfu.cpu_model() in key and torch.__version__ in key and entry["flops_per_s_one_thread"] == 50e9 + 1
    assert "2 thread(s)" in first.source and str(mfu.cache_path()) in first.source
    forced = mfu.calibrate_cpu(threads=1, force=True)  # measures again, keeps the higher figure
    assert len(fake_gemm) == 2 and forced.flops_per_s == 50e9 + 2
    monkeypatch.setattr(mfu, "measure_cpu_gemm", lambda *a, **k: 10e9)  # a measurement under load
    assert mfu.calibrate_cpu(threads=1, force=True).flops_per_s == 50e9 + 2
    assert json.loads(mfu.cache_path().read_text())[key]["flops_per_s_one_thread"] == 50e9 + 2


CPUINFO = (
    "processor\t: {p}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
    "model name\t: AMD EPYC\n\n"
)


def test_cpus_sharing_a_bare_name_keep_their_own_peaks(fake_gemm, tmp_path, monkeypatch):
    """Two CPU generations behind one bare model name (a VM's "AMD EPYC": Zen 4 and Zen 5, whose GEMM
    rates differ twofold) are told apart by family and model, so one's cached peak is never the other's."""
    zen4, zen5 = tmp_path / "zen4", tmp_path / "zen5"
    zen4.write_text(CPUINFO.format(p=0, family=25, model=17) + CPUINFO.format(p=1, family=25, model=17))
    zen5.write_text(CPUINFO.format(p=0, family=26, model=2))
    assert mfu.cpu_model(str(zen4)) == "AMD EPYC (family 25, model 17)"
    assert mfu.cpu_model(str(zen5)) == "AMD EPYC (family 26, model 2)"
    padded = tmp_path / "padded"  # blank lines before the first block
    padded.write_text("\n\n" + CPUINFO.format(p=0, family=26, model=2))
    assert mfu.cpu_model(str(padded)) == "AMD EPYC (family 26, model 2)"
    no_numbers = tmp_path / "arm"
    no_numbers.write_text("processor\t: 0\nmodel name\t: Some CPU\nmodel\t\t: n/a\n")
    assert mfu.cpu_model(str(no_numbers)) == "Some CPU"
    assert mfu.cpu_model(str(tmp_path / "missing")) not in ("", None)  # falls back to platform's name
    real = mfu.cpu_model
    for path in (zen4, zen5, zen4):  # the cache is keyed by the name: a machine per name
        monkeypatch.setattr(mfu, "cpu_model", lambda path=path: real(str(path)))
        mfu.calibrate_cpu(threads=1)
    assert len(fake_gemm) == 2  # one measurement each, the first reused on its return
    assert len(json.loads(mfu.cache_path().read_text())) == 2


def test_a_bfloat16_run_is_measured_against_the_bfloat16_gemm(fake_gemm, monkeypatch):
    """CPU bfloat16 runs get their own peak: the bf16 GEMM rate, cached beside the fp32 one (an
    entry written before it existed keeps its fp32 figure)."""
    dtypes = []
    monkeypatch.setattr(
        mfu,
        "measure_cpu_gemm",
        lambda *a, dtype=torch.float32, **k: dtypes.append(dtype) or 40e9 * (5 if dtype == torch.bfloat16 else 1),
    )
    key = f"{mfu.cpu_model()} | torch {torch.__version__}"
    mfu.cache_path().parent.mkdir(parents=True)
    mfu.cache_path().write_text(json.dumps({key: {"flops_per_s_one_thread": 30e9}}))  # an older cache
    bf16 = mfu.peak_flops("cpu", torch.bfloat16)
    assert dtypes == [torch.bfloat16] and bf16.flops_per_s == 200e9 * torch.get_num_threads()
    assert "bf16 GEMM" in bf16.source
    fp32 = mfu.peak_flops("cpu", None)
    assert dtypes == [torch.bfloat16] and fp32.flops_per_s == 30e9 * torch.get_num_threads() and "fp32" in fp32.source
    entry = json.loads(mfu.cache_path().read_text())[key]
    assert entry["flops_per_s_one_thread"] == 30e9 and entry["bf16_flops_per_s_one_thread"] == 200e9
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        mfu.calibrate_cpu(dtype=torch.float64)


def test_bf16_gemm_measurement_is_a_plausible_rate():
    assert 1e6 < mfu.measure_cpu_gemm(seconds=0.05, size=64, dtype=torch.bfloat16) < 1e15


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"%s": {"flops_per_s_one_thread": -1}}', '{"%s": {"flops_per_s_one_thread": "fast"}}'],
)
def test_a_damaged_cache_is_measured_again(fake_gemm, content):
    mfu.cache_path().parent.mkdir(parents=True)
    key = f"{mfu.cpu_model()} | torch {torch.__version__}"
    mfu.cache_path().write_text(content.replace("%s", key) if "%s" in content else content)
    assert mfu.calibrate_cpu(threads=1).flops_per_s == 50e9 + 1 and len(fake_gemm) == 1


def test_cpu_gemm_measurement_is_a_plausible_rate():
    rate = mfu.measure_cpu_gemm(seconds=0.05, size=64)
    assert 1e6 < rate < 1e14
    assert torch.get_num_threads() >= 1  # the thread count is restored (set to 1 only inside)


def test_cuda_peaks_from_the_table(monkeypatch):
    monkeypatch.delenv("FASTLM_PEAK_TFLOPS", raising=False)
    for name, bf16, fp32 in (
        ("NVIDIA H100 80GB HBM3", 989e12, 67e12),
        ("NVIDIA H100 PCIe", 756e12, 51e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
        ("NVIDIA H200", 989e12, 67e12),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert mfu.peak_flops("cuda", torch.bfloat16).flops_per_s == bf16
        assert mfu.peak_flops("cuda", torch.float16).flops_per_s == bf16
        assert mfu.peak_flops("cuda", None).flops_per_s == fp32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    unknown = mfu.peak_flops("cuda", torch.bfloat16)
    assert unknown.flops_per_s is None and "FASTLM_PEAK_TFLOPS" in unknown.source


def test_peak_override(monkeypatch, fake_gemm):
    monkeypatch.setenv("FASTLM_PEAK_TFLOPS", "0.25")
    assert mfu.peak_flops("cpu") == mfu.Peak(0.25e12, "FASTLM_PEAK_TFLOPS") and not fake_gemm
    monkeypatch.setenv("FASTLM_PEAK_TFLOPS", "fast")
    assert mfu.peak_flops("cpu").flops_per_s is None


def test_mfu_fields_are_consistent():
    fields = mfu.mfu_fields(2e6, 3000, 2.0, mfu.Peak(1e10, "x"), devices=2)
    assert fields == {
        "flops_per_token": 2e6,
        "flops": 6e9,
        "flops_per_s": 3e9,
        "peak_flops_per_s": 2e10,
        "peak_source": "x",
        "mfu": 0.15,
    }
    assert mfu.mfu_fields(2e6, 3000, 2.0, mfu.Peak(None, "unknown"))["mfu"] is None


def test_training_summary_reports_flops_and_mfu(tmp_path, corpus, capsys, fake_gemm):
    cfg = tiny_train_config(corpus, tmp_path / "run", max_iters=6, eval_interval=3, eval_iters=1)
    model = dict(n_layer=1, n_head=2, n_embd=16, block_size=16)
    trainer = Trainer(cfg, model)
    summary = trainer.fit()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    per_token = GPT(GPTConfig(vocab_size=trainer.tokenizer.vocab_size, **model)).flops_per_token()
    assert summary["flops_per_token"] == per_token
    assert summary["flops"] == pytest.approx(per_token * summary["tokens_seen"], rel=1e-12)
    assert summary["flops_per_s"] == pytest.approx(per_token * summary["tokens_per_s"], rel=1e-9)
    assert summary["peak_flops_per_s"] == 50e9 + 1  # one thread x the (fake) one-thread rate
    auto = resolve_dtype("auto", "cpu")  # bfloat16 on a CPU with native bf16: measured against that GEMM
    assert summary["dtype"] == str(auto).replace("torch.", "")
    assert ("bf16 GEMM" if auto == torch.bfloat16 else "fp32 GEMM") in summary["peak_source"]
    assert summary["mfu"] == pytest.approx(summary["flops_per_s"] / summary["peak_flops_per_s"], rel=1e-12)
    done = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("done:")]
    assert len(done) == 1 and "FLOP/token" in done[0] and f"MFU {100 * summary['mfu']:.1f}% of 50 GFLOP/s" in done[0]


@pytest.mark.parametrize("native", ["0", "1"], ids=["fp32-cpu", "bf16-cpu"])
def test_info_prints_the_peak(fake_gemm, capsys, monkeypatch, native):
    """The fp32 peak always; on a CPU with native bf16 also the bf16 one, and the dtype auto trains in."""
    monkeypatch.setenv("FASTLM_CPU_BF16", native)
    assert info.main([]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("peak for MFU, CPU")]
    threads = torch.get_num_threads()
    assert mfu.format_flops(threads * (50e9 + 1)) in lines[0] and "one-thread fp32 GEMM" in lines[0]
    if native == "1":
        assert len(lines) == 2 and "bfloat16 runs" in lines[1] and "one-thread bf16 GEMM" in lines[1]
        assert mfu.format_flops(threads * (50e9 + 2)) in lines[1]
    else:
        assert len(lines) == 1
    assert f"CPU training dtype (--dtype auto): {'bfloat16' if native == '1' else 'float32'}" in out
    assert info.main(["--calibrate"]) == 0 and len(fake_gemm) == 2 * (1 + int(native))
