"""fastlm.checkpoint: safetensors + JSON checkpoints, crash-safe publishing, refusal of pickles,
truncated / corrupted / incompatible files."""
import json
import os
import pickle

import pytest
import torch

from fastlm import checkpoint
from fastlm.checkpoint import CheckpointError
from fastlm.model import GPT, GPTConfig
from fastlm.tokenizers import build_tokenizer
from fastlm.train import main

# --device cpu: the same CPU run also where a GPU is visible
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--eval-interval", "3", "--max-iters", "6", "--sample-tokens", "0",
        "--no-progress", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    corpus = root / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60, encoding="utf-8")
    out = root / "run"
    assert main(["--data", str(corpus), "--out-dir", str(out), *TINY]) == 0
    return out


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


class _Payload:
    """Unpickling this runs open(marker, 'w'): proof that a loader executed pickle code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_model_from_dir_and_file(run_dir):
    model, tok, cfg = checkpoint.load_model(run_dir)
    assert isinstance(model, GPT) and not model.training
    assert tok.kind == "char" and tok.vocab_size == model.config.vocab_size
    assert cfg["model"]["n_layer"] == 1 and cfg["train"]["max_iters"] == 6
    model2, _, _ = checkpoint.load_model(run_dir / "model.safetensors")
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert model.lm_head.weight is model.wte.weight  # tying survives the round trip


def test_state_roundtrip_restores_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg)
    opt = model.configure_optimizer(0.1, 1e-2)
    x = torch.randint(0, 7, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    (tmp_path / "run").mkdir()
    js, tens = checkpoint.rng_state()
    checkpoint.save_checkpoint(tmp_path / "run", model, opt, {"step": 2, "extra": [1, 2]}, [(js, tens)],
                               is_best=True, model_config=cfg.to_dict())
    expected = torch.rand(3)
    ck = checkpoint.load_checkpoint(tmp_path / "run")
    assert ck["state"]["step"] == 2 and ck["state"]["extra"] == [1, 2]
    model2 = GPT(cfg)
    checkpoint.load_model_tensors(model2, ck["model"])
    opt2 = model2.configure_optimizer(0.1, 1e-2)
    opt2.load_state_dict(ck["optimizer"])
    for (a, sa), (b, sb) in zip(opt.state.items(), opt2.state.items()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    rjs, rt = ck["ranks"][0]
    checkpoint.set_rng_state(rjs, rt)
    assert torch.equal(torch.rand(3), expected)


def test_publish_order_keeps_previous_checkpoint_valid(run_dir, tmp_path):
    """Simulate crashes inside save_checkpoint: a half-written ckpt dir is ignored, and the
    previous checkpoint and model.safetensors stay loadable until the pointer moves."""
    run = _copy_run(run_dir, tmp_path / "run")
    before = json.loads((run / "latest").read_text())
    half = run / "ckpt-00000099-crashed"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)  # a save that died mid-file
    (run / ".model.safetensors.123.tmp").write_bytes(b"partial")
    ck = checkpoint.load_checkpoint(run)
    assert ck["dir"].name == before["dir"]
    checkpoint.load_model(run)
    # the next successful save publishes a new dir and cleans the debris
    model, _, cfg = checkpoint.load_model(run)
    opt = model.configure_optimizer(0.1, 1e-3)
    js, tens = checkpoint.rng_state()
    new = checkpoint.save_checkpoint(run, model, opt, {"step": 7}, [(js, tens)], is_best=False,
                                     model_config=cfg["model"])
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))
    assert names == [new.name] and not (run / ".model.safetensors.123.tmp").exists()
    assert checkpoint.load_checkpoint(run)["state"]["step"] == 7


def test_truncated_and_corrupted_weights(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    weights = run / "model.safetensors"
    good = weights.read_bytes()
    for n in (0, 5, 8, 100, len(good) // 2, len(good) - 1):
        weights.write_bytes(good[:n])
        with pytest.raises(CheckpointError, match="truncated|not a .*safetensors"):
            checkpoint.load_model(run)
    bad = bytearray(good)
    bad[-3] ^= 0xFF  # flip a byte of tensor data
    weights.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.load_model(run)
    bad = bytearray(good)
    bad[20] ^= 0x55  # inside the JSON header
    weights.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError):
        checkpoint.load_model(run)
    os.unlink(weights)
    checkpoint.load_model(run)  # falls back to the latest checkpoint's best weights


def test_corrupted_training_state(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    ck = checkpoint.latest_checkpoint_dir(run)
    state = ck / "state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": 600'))
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.load_checkpoint(run)
    run2 = _copy_run(run_dir, tmp_path / "run2")
    opt = checkpoint.latest_checkpoint_dir(run2) / "optim.safetensors"
    opt.write_bytes(opt.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_checkpoint(run2)
    (run2 / "latest").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load_checkpoint(run2)
    (run2 / "latest").write_text('{"dir": "../../etc"}')
    with pytest.raises(CheckpointError, match="names no checkpoint"):
        checkpoint.load_checkpoint(run2)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "missing")


def test_incompatible_config(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["n_embd"] = 32
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="another model config.*n_embd"):
        checkpoint.load_model(run)
    cfg["model"]["n_embd"] = 16
    cfg["model"]["n_heads"] = 2
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model config key"):
        checkpoint.load_model(run)
    del cfg["model"]["n_heads"]
    cfg["model"]["vocab_size"] += 1
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer has"):
        checkpoint.load_model(run)
    # weights of another architecture under a matching config
    model = GPT(GPTConfig(vocab_size=5, block_size=16, n_layer=2, n_head=2, n_embd=16))
    tensors = checkpoint.model_tensors(model)
    target = GPT(GPTConfig(vocab_size=5, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(CheckpointError, match="unexpected blocks.1"):
        checkpoint.load_model_tensors(target, tensors)
    tensors = checkpoint.model_tensors(GPT(GPTConfig(vocab_size=6, block_size=16, n_layer=1, n_head=2, n_embd=16)))
    with pytest.raises(CheckpointError, match="wte.weight has shape"):
        checkpoint.load_model_tensors(target, tensors)


def test_pickle_payloads_are_refused_without_running(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": _Payload(marker)}, protocol=4)
    # 1) a planted pickle under the safetensors name
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load_model(run)
    # 2) a .pt / .bin path given directly
    for name in ("model.pt", "pytorch_model.bin", "x.ckpt"):
        (run / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match="pickle"):
            checkpoint.load_model(run / name)
    # 3) torch.save (zip) format and old protocols in the training state
    run2 = _copy_run(run_dir, tmp_path / "run2")
    ck = checkpoint.latest_checkpoint_dir(run2)
    torch.save({"x": _Payload(marker)}, ck / "optim.safetensors")
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(run2)
    (ck / "state.json").write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(run2)
    (ck / "evil.pkl").write_bytes(payload)
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load_checkpoint(run2)
    # 4) through the CLI
    assert main(["--resume", str(run2), "--no-progress"]) == 2
    assert not marker.exists()


def test_weights_file_without_fastlm_checksum_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="no fastlm checksum"):
        checkpoint.load_weights(tmp_path / "foreign.safetensors")


def test_tokenizer_problems_are_checkpoint_errors(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer"):
        checkpoint.load_model(run)
    os.unlink(run / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        checkpoint.load_model(run)
    build_tokenizer("char", "xyz").save(run / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer has 4 ids"):
        checkpoint.load_model(run)
