"""fastlm.io.checkpoint: safetensors + JSON checkpoints, crash-safe publishing, refusal of pickles,
truncated / corrupted / incompatible files."""

import json
import os
import pickle

import pytest
import torch
from tiny_run import TINY_RUN

from fastlm.io import checkpoint, loading
from fastlm.io.checkpoint import CheckpointError
from fastlm.model import GPT, GPTConfig
from fastlm.text.tokenizers import build_tokenizer
from fastlm.train import main
from fastlm.training.optim import build_optimizer

# --device cpu: the same CPU run also where a GPU is visible
TINY = [*TINY_RUN, "--eval-iters", "1", "--eval-interval", "3", "--max-iters", "6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    corpus = root / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60, encoding="utf-8")
    out = root / "run"
    # tied embeddings (the default run's head is untied): the tests below check that tying survives
    assert main(["--data", str(corpus), "--out-dir", str(out), *TINY, "--tie-embeddings"]) == 0
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
    model, tok, cfg = loading.load_model(run_dir)
    assert isinstance(model, GPT) and not model.training
    assert tok.kind == "char" and tok.vocab_size == model.config.vocab_size
    assert cfg["model"]["n_layer"] == 1 and cfg["train"]["max_iters"] == 6
    model2, _, _ = loading.load_model(run_dir / "model.safetensors")
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1 and set(sd1) == set(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert model.lm_head.weight is model.wte.weight  # tying survives the round trip


def test_state_roundtrip_restores_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg)
    opt = build_optimizer(model, optimizer="adamw", weight_decay=0.1, lr=1e-2)
    x = torch.randint(0, 7, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    (tmp_path / "run").mkdir()
    js, tens = checkpoint.rng_state()
    checkpoint.save_checkpoint(
        tmp_path / "run",
        model,
        opt,
        {"step": 2, "extra": [1, 2]},
        [(js, tens)],
        is_best=True,
        model_config=cfg.to_dict(),
    )
    expected = torch.rand(3)
    ck = checkpoint.load_checkpoint(tmp_path / "run")
    assert ck["state"]["step"] == 2 and ck["state"]["extra"] == [1, 2]
    model2 = GPT(cfg)
    checkpoint.load_model_tensors(model2, ck["model"])
    opt2 = build_optimizer(model2, optimizer="adamw", weight_decay=0.1, lr=1e-2)
    opt2.load_state_dict(ck["optimizer"])
    # compare per parameter name: both states must cover every parameter, with the same keys
    # (step, exp_avg, exp_avg_sq) and equal values; an empty state on either side fails
    names1 = {id(p): n for n, p in model.named_parameters()}
    names2 = {id(p): n for n, p in model2.named_parameters()}
    state1 = {names1[id(p)]: st for p, st in opt.state.items()}
    state2 = {names2[id(p)]: st for p, st in opt2.state.items()}
    assert set(state1) == set(state2) == set(names1.values())
    for name, st in state1.items():
        assert set(st) == set(state2[name]) == {"step", "exp_avg", "exp_avg_sq"}, name
        for k in st:
            assert torch.equal(st[k], state2[name][k]), (name, k)
    assert any(bool(st["exp_avg"].abs().sum() > 0) for st in state2.values())
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
    loading.load_model(run)
    # the next successful save publishes a new dir and cleans the debris
    model, _, cfg = loading.load_model(run)
    opt = build_optimizer(model, optimizer="adamw", weight_decay=0.1, lr=1e-3)
    js, tens = checkpoint.rng_state()
    new = checkpoint.save_checkpoint(
        run, model, opt, {"step": 7}, [(js, tens)], is_best=False, model_config=cfg["model"]
    )
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
            loading.load_model(run)
    bad = bytearray(good)
    bad[-3] ^= 0xFF  # flip a byte of tensor data
    weights.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupted"):
        loading.load_model(run)
    bad = bytearray(good)
    bad[20] ^= 0x55  # inside the JSON header
    weights.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError):
        loading.load_model(run)
    os.unlink(weights)
    loading.load_model(run)  # falls back to the latest checkpoint's best weights


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
        loading.load_model(run)
    cfg["model"]["n_embd"] = 16
    cfg["model"]["n_heads"] = 2
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model config key"):
        loading.load_model(run)
    del cfg["model"]["n_heads"]
    cfg["model"]["vocab_size"] += 1
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer has"):
        loading.load_model(run)
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
        loading.load_model(run)
    # 2) a .pt / .bin path given directly
    for name in ("model.pt", "pytorch_model.bin", "x.ckpt"):
        (run / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match="pickle"):
            loading.load_model(run / name)
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
    assert main(["--resume", str(run2), "--no-progress", "--device", "cpu"]) == 2
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
        loading.load_model(run)
    os.unlink(run / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        loading.load_model(run)
    build_tokenizer("char", "xyz").save(run / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer has 4 ids"):
        loading.load_model(run)


# ----------------------------------------------------------------- hostile run directories
# A run directory is downloaded and shared: each case is something an attacker could ship.


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_manifest_entries_must_be_plain_names_of_regular_files(run_dir, tmp_path, monkeypatch):
    run = _copy_run(run_dir, tmp_path / "run")
    ck = checkpoint.latest_checkpoint_dir(run)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 12345)
    good = json.loads((ck / "manifest.json").read_text())
    hashed = []
    real_sha = checkpoint._sha256_file
    monkeypatch.setattr(checkpoint, "_sha256_file", lambda p: hashed.append(str(p)) or real_sha(p))
    for name in (str(secret), "../../secret.bin", "sub/x", "..", ""):
        (ck / "manifest.json").write_text(json.dumps({**good, name: {"sha256": "0" * 64, "size": 12345}}))
        with pytest.raises(CheckpointError) as ei:
            checkpoint.load_checkpoint(run)
        msg = _one_line(ei, "not a plain file name")
        assert "12345" not in msg and "secret" not in msg
    assert not any("secret" in h for h in hashed), "a file outside the checkpoint was hashed"
    # the checkpoint's own files must all be listed (an empty manifest would verify nothing)
    (ck / "manifest.json").write_text(json.dumps({k: v for k, v in good.items() if k != "optim.safetensors"}))
    with pytest.raises(CheckpointError) as ei:
        checkpoint.load_checkpoint(run)
    _one_line(ei, "does not list optim.safetensors")
    (ck / "manifest.json").write_text(json.dumps({**good, "state.json": "abc"}))
    with pytest.raises(CheckpointError) as ei:
        checkpoint.load_checkpoint(run)
    _one_line(ei, "needs a sha256 string and an integer size")
    # a listed file that is a symlink (here to a copy of itself, outside the directory)
    (ck / "manifest.json").write_text(json.dumps(good))
    outside = tmp_path / "state-copy.json"
    outside.write_bytes((ck / "state.json").read_bytes())
    os.unlink(ck / "state.json")
    os.symlink(outside, ck / "state.json")
    with pytest.raises(CheckpointError) as ei:
        checkpoint.load_checkpoint(run)
    _one_line(ei, "not a regular file")


def test_latest_may_not_point_at_a_symlinked_directory(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    ck = checkpoint.latest_checkpoint_dir(run)
    elsewhere = tmp_path / "elsewhere"
    os.rename(ck, elsewhere)
    os.symlink(elsewhere, ck)
    with pytest.raises(CheckpointError) as ei:
        checkpoint.load_checkpoint(run)
    _one_line(ei, "symlink")


def _strip_config_metadata(run):
    """Rewrite model.safetensors without the model config in its metadata (an attacker's file)."""
    tensors, _ = checkpoint.load_weights(run / "model.safetensors")
    os.unlink(run / "model.safetensors")  # a hard link into the checkpoint: do not write through it
    checkpoint.save_weights(run / "model.safetensors", tensors)


def _set_model_config(run, **changes):
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"].update(changes)
    (run / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"n_embd": 1 << 16, "n_head": 2}, "describes a larger model"),
        ({"n_layer": 1 << 20}, "describes a larger model"),
        ({"n_layer": 2}, "the weights file lacks tensor blocks.1."),
        ({"mlp_hidden": 32}, "holds blocks.0.mlp.fc.weight with shape (96, 16), the config implies (64, 16)"),
        ({"tie_embeddings": False}, "lacks tensor lm_head.weight"),
        ({"pos": "learned"}, "lacks tensor wpe.weight"),
    ],
)
def test_config_is_checked_against_the_weights_header_before_allocating(
    run_dir, tmp_path, monkeypatch, changes, needle
):
    run = _copy_run(run_dir, tmp_path / "run")
    _strip_config_metadata(run)
    _set_model_config(run, **changes)
    import fastlm.model

    real_init = fastlm.model.GPT.__init__
    devices = []

    def spy(self, cfg):
        devices.append(torch.empty(0).device.type)  # the device new tensors go to
        real_init(self, cfg)

    monkeypatch.setattr(fastlm.model.GPT, "__init__", spy)
    with pytest.raises(CheckpointError) as ei:
        loading.load_model(run)
    _one_line(ei, "config.json", needle)
    assert all(d == "meta" for d in devices), f"a real model was built: {devices}"
    # the untouched run still loads, building the real model once
    monkeypatch.undo()
    run2 = _copy_run(run_dir, tmp_path / "run2")
    _strip_config_metadata(run2)
    assert isinstance(loading.load_model(run2)[0], GPT)


def test_position_table_cannot_outgrow_the_weights_file(run_dir, tmp_path, monkeypatch):
    """pos=sinusoidal has no parameter but a (block_size, n_embd) table: a config may not use
    block_size to allocate far more than the weights file holds."""
    run = _copy_run(run_dir, tmp_path / "run")
    _strip_config_metadata(run)
    _set_model_config(run, pos="sinusoidal")  # same parameters as rope: the shapes match
    assert isinstance(loading.load_model(run)[0], GPT)
    _set_model_config(run, pos="sinusoidal", block_size=1 << 17)  # an 8 MiB table
    assert isinstance(loading.load_model(run)[0], GPT)  # within the slack
    monkeypatch.setattr(checkpoint, "MODEL_BYTES_SLACK", 1 << 20)
    with pytest.raises(CheckpointError) as ei:
        loading.load_model(run)
    _one_line(ei, "config.json describes a model of", "weights file")


def _forge_header(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("case", ["huge_len", "outside", "giant_shape", "bad_dtype", "unused_bytes", "not_object"])
def test_forged_safetensors_headers_are_refused(tmp_path, case):
    p = tmp_path / "w.safetensors"
    if case == "huge_len":
        p.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    elif case == "outside":
        _forge_header(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "giant_shape":
        _forge_header(p, {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "bad_dtype":
        _forge_header(p, {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "unused_bytes":
        _forge_header(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4096)
    else:
        p.write_bytes((2).to_bytes(8, "little") + b"[]")
    with pytest.raises(CheckpointError) as ei:
        checkpoint.read_safetensors_header(p)
    _one_line(ei, str(p))


def test_header_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    _forge_header(
        p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"x": "y" * 5000}}, b"\0" * 4
    )
    assert checkpoint.read_safetensors_header(p)[0] == {"w": (1,)}
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(CheckpointError) as ei:
        checkpoint.read_safetensors_header(p)
    _one_line(ei, "4096-byte limit")


@pytest.mark.parametrize("target", ["config.json", "model.safetensors", "tokenizer.json", "latest"])
@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_special_files_in_a_run_are_refused_unread(run_dir, tmp_path, no_hang, target, kind):
    run = _copy_run(run_dir, tmp_path / "run")
    os.unlink(run / target)
    if kind == "dev_zero":
        os.symlink("/dev/zero", run / target)
    else:
        os.mkfifo(run / target)
    with pytest.raises(CheckpointError) as ei:
        checkpoint.load_checkpoint(run) if target == "latest" else loading.load_model(run)
    _one_line(ei, "a device" if kind == "dev_zero" else "a FIFO", "not a regular file")


def test_run_json_files_have_size_and_depth_limits(run_dir, tmp_path, monkeypatch):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError) as ei:
        loading.load_model(run)
    _one_line(ei, "nests JSON too deeply")
    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 1000)
    (run / "config.json").write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(CheckpointError) as ei:
        loading.load_model(run)
    _one_line(ei, "too large", "limit is 1000")
