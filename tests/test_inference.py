"""The Python inference API (fastlm.load / generate / evaluate) and the CLIs over it, --prompt-file's bound."""

import ast
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from test_generate import TEXT, make_run  # a run directory around an untrained tiny GPT (32-token context)

import fastlm
from fastlm import inference
from fastlm.errors import CheckpointError, DataError, InputError
from fastlm.evaluate import main as evaluate_main
from fastlm.generate import main as generate_main
from fastlm.io import checkpoint
from fastlm.sampling import generate as sample_ids
from fastlm.text import data, tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def loaded(run):
    return fastlm.load(run, device="cpu")


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---- the package ---------------------------------------------------------------------------------


def test_exported_at_the_top_and_import_stays_light():
    assert {"load", "generate", "evaluate"} <= set(fastlm.__all__)
    assert fastlm.load is inference.load and fastlm.generate is inference.generate
    code = (
        "import sys, fastlm; heavy = [m for m in ('fastlm.inference', 'fastlm.io.loading', 'transformers') "
        "if m in sys.modules]; import fastlm.generate, fastlm.evaluate; "
        "ok = callable(fastlm.generate) and callable(fastlm.evaluate) and fastlm.generate.__module__ == "
        "'fastlm.inference'; print(heavy, ok); sys.exit(0 if ok and not heavy else 1)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_cli_imports_another():
    clis = ("train", "generate", "evaluate", "export", "info")
    for name in clis:
        path = ROOT / "fastlm" / f"{name}.py"
        imported = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert not imported & {f"fastlm.{c}" for c in clis}, (name, imported)


def test_cli_flags_come_from_the_dataclasses(capsys):
    from fastlm.config import dataclass_from_args
    from fastlm.generate import build_parser

    values = vars(build_parser().parse_args(["--checkpoint", "r", "--no-kv-cache", "--top-k", "5", "--seed", "none"]))
    want = fastlm.GenerateConfig(kv_cache=False, top_k=5, seed=None)
    assert dataclass_from_args(fastlm.GenerateConfig, values) == want
    assert dataclass_from_args(inference.LoadConfig, values) == inference.LoadConfig("r")
    one_line_error(
        generate_main(["--checkpoint", "r", "--prompt", "a", "--from-split", "val"]),
        capsys.readouterr().err,
        "--from-split: not allowed with argument --prompt",
    )
    one_line_error(evaluate_main(["--split", "val"]), capsys.readouterr().err, "required", "--checkpoint")


# ---- load ----------------------------------------------------------------------------------------


def test_load_a_run_directory_and_its_weights_file(run, loaded):
    model, tok, info = loaded
    assert isinstance(model, fastlm.GPT) and not model.training and tok.kind == "char"
    assert info == inference.ModelInfo(
        run,
        pathlib.Path(run),
        torch.device("cpu"),
        model.config.backend,
        json.loads((pathlib.Path(run) / "config.json").read_text()),
    )
    weights = os.path.join(run, "model.safetensors")
    model2, _, info2 = fastlm.load(pathlib.Path(weights), device="cpu", backend="reference")
    assert info2.run_dir == pathlib.Path(run) and info2.source == weights and info2.backend == "reference"
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert len(info.split("val")) == len(data.load_split(run, "val")) and not info.raw_newlines


def test_a_weights_file_is_read_and_checked_for_pickle_once(run, monkeypatch):
    """Planted: the loader used to check one weights file for pickle three times and open it twice."""
    calls = {"pickle_name": 0, "reads": 0}
    real_refuse, real_read = checkpoint.refuse_pickle_path, checkpoint.read_bounded

    def refuse(path):
        calls["pickle_name"] += 1
        return real_refuse(path)

    def read(path, *a, **k):
        calls["reads"] += str(path).endswith(".safetensors")
        return real_read(path, *a, **k)

    monkeypatch.setattr(checkpoint, "refuse_pickle_path", refuse)
    monkeypatch.setattr(checkpoint, "read_bounded", read)
    monkeypatch.setattr(checkpoint, "open_regular", lambda *a, **k: pytest.fail("the header was read separately"))
    fastlm.load(os.path.join(run, "model.safetensors"), device="cpu")
    assert calls == {"pickle_name": 1, "reads": 1}


def test_load_errors(tmp_path, run):
    with pytest.raises(CheckpointError, match="not found"):
        fastlm.load(tmp_path / "nope")
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle"):
        fastlm.load(pickle)
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        fastlm.load(run, device="cpu", backend="fastest")
    with pytest.raises(InputError, match="device"):
        fastlm.load(run, device="tpu")


# ---- generate ------------------------------------------------------------------------------------


def test_generate_matches_the_sampler_and_its_seed(loaded):
    model, tok, _ = loaded
    texts = fastlm.generate(model, tok, "First", max_new_tokens=20, seed=3, top_k=10, num_samples=2)
    ids = sample_ids(
        model,
        torch.tensor([tok.encode("First")] * 2),
        20,
        temperature=0.8,
        top_k=10,
        generator=torch.Generator().manual_seed(3),
    )
    assert texts == ["First" + tok.decode(row[5:].tolist()) for row in ids]
    assert fastlm.generate(model, tok, "First", max_new_tokens=20, seed=4, top_k=10) != texts[:1]
    config = fastlm.GenerateConfig(max_new_tokens=20, seed=3, top_k=10, num_samples=2)
    assert fastlm.generate(model, tok, "First", config) == texts
    one = fastlm.generate(model, tok, "First", config, num_samples=1)
    assert fastlm.generate(model, tok, torch.tensor(tok.encode("First")), config, num_samples=1) == one


def test_cached_and_uncached_greedy_decoding_agree_past_the_context(loaded):
    model, tok, _ = loaded
    for prompt in ("All:\nSpeak", ""):  # 70 new tokens slide the 32-token window twice
        cached = fastlm.generate(model, tok, prompt, max_new_tokens=70, greedy=True)
        uncached = fastlm.generate(model, tok, prompt, max_new_tokens=70, greedy=True, kv_cache=False)
        assert cached == uncached and cached[0].startswith(prompt) and len(cached[0]) >= len(prompt) + 70


def test_stream_receives_the_returned_text(loaded):
    model, tok, _ = loaded
    pieces = []
    text = fastlm.generate(model, tok, "You", max_new_tokens=15, stream=pieces.append)[0]
    assert "".join(pieces) == text and pieces[0] == "You" and len(pieces) > 2
    buf = io.StringIO()
    assert fastlm.generate(model, tok, "You", max_new_tokens=15, stream=buf) == [text] == [buf.getvalue()]
    assert fastlm.generate(model, tok, "You", max_new_tokens=15) == [text]


def test_newlines_of_a_text_prompt(loaded):
    model, tok, _ = loaded
    assert fastlm.generate(model, tok, "All:\r\nSpeak", max_new_tokens=5, greedy=True) == fastlm.generate(
        model, tok, "All:\nSpeak", max_new_tokens=5, greedy=True
    )
    with pytest.raises(InputError, match="not in the char vocabulary"):
        fastlm.generate(model, tok, "All:\r\nSpeak", max_new_tokens=5, raw_newlines=True)


def test_stop_at_eos(loaded):
    """A model made to emit the end-of-text token: stop_at_eos ends each sample there."""
    model, tok, _ = loaded
    push = torch.zeros(tok.vocab_size)
    push[tok.eos_id] = 1e4
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: out + push)
    try:
        assert fastlm.generate(model, tok, "All:", max_new_tokens=4, stop_at_eos=True, num_samples=2) == ["All:"] * 2
        assert fastlm.generate(model, tok, "All:", max_new_tokens=4) == ["All:" + tok.decode([tok.eos_id] * 4)]
        assert fastlm.beam_search(model, tok, "All:", beam_size=2, stop_at_eos=True)[0][0] == "All:"
    finally:
        hook.remove()


def test_beam_search(loaded):
    model, tok, _ = loaded
    beams = fastlm.beam_search(model, tok, "Speak", max_new_tokens=6, beam_size=3)
    scores = [s for _, s in beams]
    assert len(beams) == 3 and scores == sorted(scores, reverse=True)
    assert all(t.startswith("Speak") and len(t) >= 11 for t, _ in beams)  # 6 tokens of >= 1 character
    assert fastlm.generate(model, tok, "Speak", max_new_tokens=6, beam_size=3) == [t for t, _ in beams]


def test_sample_split(loaded):
    model, tok, info = loaded
    val = info.split("val")
    samples = inference.sample_split(model, tok, val, examples=3, prompt_tokens=10, max_new_tokens=7)
    text = tok.decode(np.asarray(val, dtype=np.int64).tolist())
    assert len(samples) == 3 and [s.start for s in samples] == sorted(s.start for s in samples)
    for s in samples:
        assert s.stop - s.start == 10 and len(s.prompt) == 10 and len(s.model) >= 7
        assert text[s.start : s.stop + 7] == s.prompt + s.true
    assert inference.sample_split(model, tok, val, examples=3, prompt_tokens=10, max_new_tokens=7) == samples


@pytest.mark.parametrize(
    "settings, error, needle",
    [
        ({"max_new_tokens": -1}, InputError, "max_new_tokens (--max-new-tokens) must be >= 0"),
        ({"num_samples": 0}, InputError, "--num-samples"),
        ({"temperature": 0}, ValueError, "temperature"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"beam_size": 2, "num_samples": 2}, InputError, "--beam-size"),
        ({"length_penalty": float("nan")}, InputError, "--length-penalty"),
        ({"seed": 2**64}, InputError, "--seed"),
        ({"tempreature": 1.0}, TypeError, "tempreature"),
    ],
)
def test_bad_generate_settings(loaded, settings, error, needle):
    model, tok, _ = loaded
    with pytest.raises(error, match=None) as ei:
        fastlm.generate(model, tok, "A", **settings)
    assert needle in str(ei.value)
    if error is not TypeError:
        with pytest.raises(error):
            fastlm.GenerateConfig(**settings)


def test_other_generate_refusals(loaded):
    model, tok, _ = loaded
    with pytest.raises(dataclasses.FrozenInstanceError):
        fastlm.GenerateConfig().seed = 1  # checked once, when made: no later change slips past
    with pytest.raises(InputError, match="stream takes one sample"):
        fastlm.generate(model, tok, "A", num_samples=2, stream=print)
    with pytest.raises(InputError, match="beam_search needs beam_size"):
        fastlm.beam_search(model, tok, "A")
    with pytest.raises(InputError, match="prompts from a split"):
        inference.sample_split(model, tok, np.arange(100) % 5, beam_size=2)
    with pytest.raises(DataError, match="the split has 20 tokens"):
        inference.sample_split(model, tok, np.arange(20) % 5, prompt_tokens=20)
    no_eos = tokenizers.build_tokenizer("char", TEXT)
    no_eos.eos_id = None
    with pytest.raises(InputError, match="empty prompt"):
        fastlm.generate(model, no_eos, "")
    with pytest.raises(InputError, match="stop_at_eos"):
        fastlm.generate(model, no_eos, "A", stop_at_eos=True)


# ---- evaluate ------------------------------------------------------------------------------------


def test_evaluate_equals_the_cli(run, loaded, capsys, tmp_path):
    model, tok, info = loaded
    assert evaluate_main(["--checkpoint", run, "--split", "val", "--json", "--batch-size", "3"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = fastlm.evaluate(model, tok, info.split("val"), batch_size=3)
    assert api == {k: cli[k] for k in ("loss", "perplexity", "bits_per_token", "bits_per_char", "tokens", "chars")}
    path = tmp_path / "other.txt"
    path.write_bytes(TEXT[:500].replace("\n", "\r\n").encode())
    assert evaluate_main(["--checkpoint", run, "--data", str(path), "--json", "--max-tokens", "300"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = fastlm.evaluate(model, tok, TEXT[:500].replace("\n", "\r\n"), fastlm.EvaluateConfig(max_tokens=300))
    assert api["loss"] == cli["loss"] and api["tokens"] == cli["tokens"] == 299


def test_evaluate_inputs_agree(loaded):
    model, tok, _ = loaded
    docs = [TEXT[:200], TEXT[200:400]]
    ids = np.concatenate([tok.encode(docs[0]), [tok.eos_id], tok.encode(docs[1])])
    want = fastlm.evaluate(model, tok, ids)
    assert fastlm.evaluate(model, tok, docs) == want == fastlm.evaluate(model, tok, torch.tensor(ids))
    assert want["tokens"] == 400 and fastlm.evaluate(model, tok, ids.tolist()) == want
    assert fastlm.evaluate(model, tok, TEXT[:200])["tokens"] == 199


def test_bad_evaluate_inputs(loaded, tmp_path):
    model, tok, info = loaded
    with pytest.raises(InputError, match=r"batch_size \(--batch-size\) must be > 0"):
        fastlm.evaluate(model, tok, TEXT, batch_size=0)
    with pytest.raises(InputError, match="--max-tokens"):
        fastlm.EvaluateConfig(max_tokens=1)
    with pytest.raises(DataError, match="1 token"):
        fastlm.evaluate(model, tok, [3])
    with pytest.raises(DataError, match=f"token id {tok.vocab_size} is outside"):
        fastlm.evaluate(model, tok, [1, 2, tok.vocab_size])
    with pytest.raises(DataError, match="1-D array of token ids"):
        fastlm.evaluate(model, tok, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(DataError, match="test split"):
        info.split("test")  # its fraction is 0


# ---- hf: model directories -----------------------------------------------------------------------


def test_load_a_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    tk = pytest.importorskip("tokenizers")
    transformers.utils.logging.set_verbosity_error()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT],
        tk.trainers.BpeTrainer(
            vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    model, fl_tok, info = fastlm.load(f"hf:{tmp_path / 'm'}", device="cpu")
    assert info.run_dir is None and info.source == f"hf:{tmp_path / 'm'}" and info.run_config["source"]["hf"]
    ids = torch.tensor([fl_tok.encode("First Citizen: speak")])
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], ref(ids).logits, atol=1e-4)
    text = fastlm.generate(model, fl_tok, "First", max_new_tokens=8, greedy=True)[0]
    assert text == fastlm.generate(model, fl_tok, "First", max_new_tokens=8, greedy=True, kv_cache=False)[0]
    assert fastlm.evaluate(model, fl_tok, TEXT[:300])["tokens"] > 0
    with pytest.raises(CheckpointError, match="--data"):
        info.split("val")


# ---- --prompt-file: a documented bound ------------------------------------------------------------


def test_a_huge_regular_prompt_file_is_refused_by_its_size_unread(run, tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB that take no disk
    monkeypatch.setattr(inference, "open", lambda *a, **k: pytest.fail("opened"), raising=False)
    rc = generate_main(["--checkpoint", run, "--prompt-file", str(big)])
    one_line_error(
        rc, capsys.readouterr().err, "too large", f"{8 << 30} bytes", f"limit is {inference.MAX_PROMPT_BYTES}"
    )


def _endless_writer(path):
    """Write to the FIFO ``path`` until its reader goes away."""
    try:
        with open(path, "wb", buffering=0) as f:
            while True:
                f.write(b"x" * 4096)
    except BrokenPipeError:
        pass


def test_a_prompt_fifo_is_read_up_to_the_bound(tmp_path, no_hang):
    """A FIFO works; one that never ends is read up to the bound and refused (a read to the end hangs)."""
    fifo = tmp_path / "prompt"
    for writer, want in ((lambda: fifo.write_bytes(b"First"), "First"), (lambda: _endless_writer(fifo), None)):
        os.mkfifo(fifo)
        thread = threading.Thread(target=writer)
        thread.start()
        if want is None:
            with pytest.raises(InputError, match="more than 100 bytes"):
                inference.read_prompt_file(fifo, max_bytes=100)
        else:
            assert inference.read_prompt_file(fifo, max_bytes=100) == want
        thread.join()
        fifo.unlink()
    with pytest.raises(InputError, match="is a directory"):
        inference.read_prompt_file(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(InputError, match="not UTF-8 text"):
        inference.read_prompt_file(tmp_path / "latin1.txt")


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="process substitution needs bash")
def test_process_substitution_works_and_is_bounded(run):
    cmd = (
        f"{sys.executable} -m fastlm.generate --checkpoint {run} --max-new-tokens 3 --device cpu --prompt-file "
        f"<(echo Speak) && {sys.executable} -m fastlm.generate --checkpoint {run} --device cpu --prompt-file "
        f"<(head -c {inference.MAX_PROMPT_BYTES + 1} /dev/zero | tr '\\0' a)"
    )
    r = subprocess.run(
        ["/bin/bash", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert r.stdout.startswith("Speak\n") and r.stdout.endswith("\n") and len(r.stdout) >= 10, r.stdout
    one_line_error(r.returncode, r.stderr, f"holds more than {inference.MAX_PROMPT_BYTES} bytes")
