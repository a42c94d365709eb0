"""Sliding-window models (``GPTConfig.window``) and document masking (``--doc-mask``) end to end:
the model's receptive field, KV-cached generation past the context at constant memory, training,
evaluation and resume with documents masked, and the Hugging Face export of a windowed model."""

import csv
import json

import pytest
import torch
from conftest import one_error_line
from tiny_run import TINY_RUN
from train_hooks import CtrlCAfter

from fastlm.errors import ConfigError, HFError
from fastlm.io.hf_export import architecture_of
from fastlm.model import GPT, PLAIN_OPTIONS, GPTConfig
from fastlm.sampling import generate
from fastlm.text import data
from fastlm.train import main

TINY = [
    *TINY_RUN,
    "--block-size",
    "32",
    "--eval-iters",
    "1",
    "--log-interval",
    "1",
    "--eval-interval",
    "5",
    "--warmup-iters",
    "2",
]


def _model(**over):
    torch.manual_seed(0)
    cfg = dict(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, window=4)
    return GPT(GPTConfig(**{**cfg, **over})).eval()


@pytest.mark.parametrize("window", [0, -3, True, 2.5])
def test_window_must_be_a_positive_integer(window):
    with pytest.raises(ConfigError, match="window must be a positive integer"):
        GPTConfig(window=window)


def test_a_token_beyond_the_receptive_field_changes_nothing():
    """With window w and L layers, position t sees tokens t - L (w - 1) .. t and nothing earlier."""
    model = _model()
    x = torch.randint(0, 29, (1, 16), generator=torch.Generator().manual_seed(1))
    reach = 2 * (4 - 1)  # L (w - 1)
    y = x.clone()
    y[0, 15 - reach - 1] = (x[0, 15 - reach - 1] + 1) % 29  # just outside the last position's field
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.equal(a[0, -1], b[0, -1])
    z = x.clone()
    z[0, 15 - reach] = (x[0, 15 - reach] + 1) % 29  # just inside
    with torch.no_grad():
        assert not torch.equal(a[0, -1], model(z)[0][0, -1])
    ref = dict(backend="reference")  # one backend for both: the same arithmetic
    assert torch.equal(
        _model(window=16, **ref)(x)[0], _model(window=None, **ref)(x)[0]
    )  # a window of the whole context


def test_generation_runs_past_the_context_at_constant_memory():
    model = _model()
    prompt = torch.randint(0, 29, (2, 21), generator=torch.Generator().manual_seed(2))  # longer than block_size
    cached = generate(model, prompt, 60, greedy=True, use_cache=True)
    assert cached.shape == (2, 81)
    assert torch.equal(cached, generate(model, prompt, 60, greedy=True, use_cache=False))
    with torch.no_grad():  # the cached decode equals one forward over the whole sequence
        full = model(cached[:, :-1])[0][:, -1].argmax(-1)
    assert torch.equal(full, cached[:, -1])
    cache = model.new_kv_cache(2, 10_000)
    assert cache.k.shape[3] == 2 * 4  # 2 x window entries, whatever the length asked for
    with torch.no_grad():
        for t in range(40):
            model(cached[:, t : t + 1], kv_cache=cache)
    assert cache.length == 40 and cache.fill <= 8


def test_a_learned_position_model_with_a_window_still_slides():
    model = _model(pos="learned")
    assert not model.unbounded
    prompt = torch.randint(0, 29, (1, 5), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, 30, greedy=True)
    assert torch.equal(out, generate(model, prompt, 30, greedy=True, use_cache=False))


def test_segment_ids_start_a_document_at_each_end_of_text():
    x = torch.tensor([[5, 3, 0, 7, 0, 0, 2]])
    assert data.segment_ids(x, 0).tolist() == [[0, 0, 1, 1, 2, 3, 3]]


def test_split_loss_with_documents_masks_only_across_boundaries():
    model = _model(window=None)
    plain = torch.randint(1, 29, (100,), generator=torch.Generator().manual_seed(4)).numpy()
    assert data.split_loss(model, plain, 16, 4, "cpu", eos_id=0) == data.split_loss(model, plain, 16, 4, "cpu")
    docs = plain.copy()
    docs[::9] = 0
    assert data.split_loss(model, docs, 16, 4, "cpu", eos_id=0) != data.split_loss(model, docs, 16, 4, "cpu")


@pytest.fixture
def jsonl_corpus(tmp_path):
    """The bundled text cut into its speeches, one JSON line each (many short documents)."""
    text = data.default_corpus().read_text(encoding="utf-8")[:30000]
    speeches = [s.strip() for s in text.split("\n\n") if s.strip()]
    path = tmp_path / "speeches.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches), encoding="utf-8")
    return path


def _losses(run):
    with open(run / "train_log.csv", newline="") as f:
        return [r["loss"] for r in csv.DictReader(f)]


def test_training_masks_documents_when_the_corpus_has_several(tmp_path, jsonl_corpus, corpus, capsys):
    args = ["--data", str(jsonl_corpus), *TINY, "--max-iters", "6"]
    assert main(args + ["--out-dir", str(tmp_path / "on")]) == 0
    out = capsys.readouterr().out
    assert "documents: attention masked" in out
    assert json.loads((tmp_path / "on" / "config.json").read_text())["train"]["doc_mask"] is True
    assert main(args + ["--out-dir", str(tmp_path / "off"), "--no-doc-mask"]) == 0
    assert json.loads((tmp_path / "off" / "config.json").read_text())["train"]["doc_mask"] is False
    assert _losses(tmp_path / "on") != _losses(tmp_path / "off")  # the mask changes the training
    one = ["--data", str(corpus), *TINY, "--max-iters", "4"]  # one document: off, the run unchanged
    assert main(one + ["--out-dir", str(tmp_path / "one")]) == 0
    assert main(one + ["--out-dir", str(tmp_path / "one-off"), "--no-doc-mask"]) == 0
    assert json.loads((tmp_path / "one" / "config.json").read_text())["train"]["doc_mask"] is False
    assert _losses(tmp_path / "one") == _losses(tmp_path / "one-off")


def test_a_run_with_documents_and_a_window_resumes_exactly(tmp_path, jsonl_corpus, capsys):
    args = ["--data", str(jsonl_corpus), *TINY, "--max-iters", "12", "--window", "6"]
    assert main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--out-dir", str(tmp_path / "b")], callbacks=[CtrlCAfter(7)]) == 130
    assert main(["--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 12
    rc = main(["--resume", str(tmp_path / "b"), "--no-doc-mask", "--max-iters", "13"])
    assert rc == 2 and "doc_mask" in one_error_line(capsys.readouterr())


def test_doc_mask_needs_an_end_of_text_token(tmp_path, jsonl_corpus, capsys):
    rc = main(
        [
            "--data",
            str(jsonl_corpus),
            *TINY,
            "--out-dir",
            str(tmp_path / "r"),
            "--tokenizer",
            "word",
            "--doc-mask",
            "--max-iters",
            "2",
        ]
    )
    if rc == 0:  # the word tokenizer has <eos>: then it ran with the mask
        assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["doc_mask"] is True
    else:
        assert "end-of-text" in one_error_line(capsys.readouterr())


def test_windowed_models_export_as_mistral_or_are_refused():
    base = dict(PLAIN_OPTIONS, vocab_size=30, n_layer=1, n_head=2, n_embd=16, pos="rope", mlp="swiglu", window=5)
    assert architecture_of(GPTConfig(**base, norm="rmsnorm")) == "mistral"
    with pytest.raises(HFError, match="window=5 .* exports only as mistral"):
        architecture_of(GPTConfig(**base, norm="layernorm"))
    with pytest.raises(HFError, match="bias=True"):
        architecture_of(GPTConfig(**base, norm="rmsnorm", bias=True))
