"""``python -m fastlm.generate``: sampling from a run directory, streaming, beams, --from-split, errors."""

import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import child_env

from fastlm.generate import SEPARATOR, main
from fastlm.inference import _Streamer
from fastlm.io import checkpoint, loading
from fastlm.text import data, tokenizers

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def make_run(run_dir, tokenizer="char", block_size=32, seed=0, text=TEXT, **tok_kw):
    """A run directory written with the checkpoint API (config.json, tokenizer.json,
    model.safetensors, data/{train,val,test}.npy) around an untrained tiny GPT."""
    from fastlm.model import GPT, GPTConfig

    tok = tokenizers.build_tokenizer(tokenizer, text, **tok_kw)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, pos="rope")
    model = GPT(cfg)
    checkpoint.write_run_files(run_dir, {"model": cfg.to_dict(), "train": {"split": [0.8, 0.2, 0.0]}}, tok)
    checkpoint.save_weights(os.path.join(run_dir, "model.safetensors"), checkpoint.model_tensors(model))
    ids, _ = data.encode_documents(tok, [text])
    data.save_splits(run_dir, data.split_tokens(ids, (0.8, 0.2, 0.0)), tok.vocab_size)
    return str(run_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def cli(capsys, *argv):
    """main(argv) on the CPU unless argv picks a device (auto would take CUDA where a GPU is visible)."""
    argv = list(argv) if "--device" in argv else [*argv, "--device", "cpu"]
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------------------------------------


def test_help_in_a_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "fastlm.generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert r.returncode == 0
    for flag in ("--checkpoint", "--prompt-file", "--top-p", "--beam-size", "--from-split", "--output-file"):
        assert flag in r.stdout


def test_sample_matches_the_api_and_seed(run, capsys):
    from fastlm.sampling import generate

    flags = ["--checkpoint", run, "--prompt", "First", "--max-new-tokens", "25", "--top-k", "10", "--device", "cpu"]
    rc, out, err = cli(capsys, *flags, "--seed", "3")
    assert rc == 0, err
    model, tok, _ = loading.load_model(run)
    ids = generate(
        model,
        torch.tensor([tok.encode("First")]),
        25,
        temperature=0.8,
        top_k=10,
        generator=torch.Generator().manual_seed(3),
    )
    assert out == "First" + tok.decode(ids[0, 5:].tolist()) + "\n"
    rc, again, _ = cli(capsys, *flags, "--seed", "3")
    assert again == out
    rc, other, _ = cli(capsys, *flags, "--seed", "4")
    assert other != out


def test_weights_file_num_samples_and_greedy(run, capsys):
    weights = os.path.join(run, "model.safetensors")
    rc, out, err = cli(
        capsys, "--checkpoint", weights, "--prompt", "All:", "--num-samples", "3", "--max-new-tokens", "12", "--greedy"
    )
    assert rc == 0, err
    samples = out.split(SEPARATOR + "\n")
    assert len(samples) == 3
    assert all(s.startswith("All:") for s in samples)
    assert samples[0] == samples[1] == samples[2], "greedy samples of one prompt are identical"


def test_beam_search_cli(run, capsys):
    rc, out, err = cli(capsys, "--checkpoint", run, "--prompt", "Speak", "--beam-size", "3", "--max-new-tokens", "6")
    assert rc == 0, err
    heads = [line for line in out.splitlines() if line.startswith("[beam ")]
    assert len(heads) == 3
    scores = [float(h.split("score ")[1]) for h in heads]
    assert scores == sorted(scores, reverse=True)


def test_empty_prompt_starts_at_document_boundary(run, capsys):
    from fastlm.sampling import generate

    rc, out, err = cli(capsys, "--checkpoint", run, "--max-new-tokens", "10", "--device", "cpu")
    assert rc == 0, err
    model, tok, _ = loading.load_model(run)
    ids = generate(
        model, torch.tensor([[tok.eos_id]]), 10, temperature=0.8, generator=torch.Generator().manual_seed(1337)
    )
    assert ids.shape == (1, 11) and ids[0, 0] == tok.eos_id
    assert out == tok.decode(ids[0, 1:].tolist()) + "\n"  # the start token itself is not printed


def test_prompt_newlines_are_normalised_unless_raw(run, capsys, tmp_path):
    """A CRLF prompt means what the LF prompt means (the corpus was normalised the same way);
    --raw-newlines keeps the '\\r', which this char vocabulary lacks."""
    lf = "All:\nSpeak"
    rc, want, err = cli(capsys, "--checkpoint", run, "--prompt", lf, "--max-new-tokens", "8", "--device", "cpu")
    assert rc == 0, err
    assert want.startswith(lf) and len(want) > len(lf) + 1
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_bytes(b"All:\r\nSpeak")
    for argv in (["--prompt", "All:\r\nSpeak"], ["--prompt", "All:\rSpeak"], ["--prompt-file", str(prompt_file)]):
        rc, out, err = cli(capsys, "--checkpoint", run, *argv, "--max-new-tokens", "8", "--device", "cpu")
        assert rc == 0, err
        assert out == want, argv
        rc, out, err = cli(capsys, "--checkpoint", run, *argv, "--max-new-tokens", "8", "--raw-newlines")
        assert_one_line_error(rc, err, "not in the char vocabulary", "'\\r'")


def test_output_file_is_never_overwritten(run, capsys, tmp_path):
    path = tmp_path / "samples.txt"
    rc, out, err = cli(
        capsys, "--checkpoint", run, "--prompt", "You", "--max-new-tokens", "8", "--output-file", str(path)
    )
    assert rc == 0, err
    assert path.read_text(encoding="utf-8") == out
    rc, out2, err = cli(
        capsys,
        "--checkpoint",
        run,
        "--prompt",
        "You",
        "--max-new-tokens",
        "8",
        "--output-file",
        str(path),
        "--seed",
        "9",
    )
    assert_one_line_error(rc, err, "already exists")
    assert out2 == ""
    assert path.read_text(encoding="utf-8") == out


def test_from_split_shows_prompt_model_and_truth(run, capsys):
    rc, out, err = cli(
        capsys,
        "--checkpoint",
        run,
        "--from-split",
        "val",
        "--examples",
        "2",
        "--prompt-tokens",
        "10",
        "--max-new-tokens",
        "7",
    )
    assert rc == 0, err
    assert out.count("--- prompt ---") == out.count("--- model ---") == out.count("--- true ---") == 2
    tok = loading.load_model(run)[1]
    val = data.load_split(run, "val")
    val_text = tok.decode(val.astype("int64").tolist())
    blocks = out.split("=== example ")[1:]
    for b in blocks:
        prompt = b.split("--- prompt ---\n")[1].split("\n--- model ---")[0]
        true = b.split("--- true ---\n")[1].rstrip("\n")
        assert len(prompt) == 10 and prompt + true[:7] in val_text


def test_stream_waits_for_whole_characters():
    tok = tokenizers.build_tokenizer("bpe", "héllo wörld 日本語 " * 5, vocab_size=257)  # bytes only
    text = "héllo wörld 日本語"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    buf = io.StringIO()
    s = _Streamer(tok, buf, eos_id=None)
    seen = []
    for i in ids:
        s(torch.tensor([i]))
        seen.append(buf.getvalue())
    assert all("\ufffd" not in v for v in seen)
    assert seen[-1] == text and s.finish() == text
    assert buf.getvalue() == text + "\n"
    # tokens after an eos are not printed
    buf = io.StringIO()
    s = _Streamer(tok, buf, eos_id=tok.eos_id)
    for i in ids[:3] + [tok.eos_id] + ids[3:]:
        s(torch.tensor([i]))
    assert s.finish() == "hé"


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit status 2


def test_unknown_character_in_prompt_subprocess(run):
    r = subprocess.run(
        [sys.executable, "-m", "fastlm.generate", "--checkpoint", run, "--prompt", "zebra ☃", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert_one_line_error(r.returncode, r.stderr, "not in the char vocabulary")
    assert r.stdout == ""


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--temperature", "0"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "0"], "top_k"),
        (["--max-new-tokens", "-1"], "max-new-tokens"),
        (["--num-samples", "0"], "num-samples"),
        (["--beam-size", "2", "--num-samples", "2"], "beam-size"),
        (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "device"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "No such file"),
    ],
)
def test_bad_arguments(run, capsys, argv, needle):
    rc, out, err = (
        cli(capsys, "--checkpoint", run, "--prompt", "A", *argv)
        if "--prompt-file" not in argv
        else cli(capsys, "--checkpoint", run, *argv)
    )
    assert_one_line_error(rc, err, needle)


def test_bad_checkpoints(capsys, tmp_path):
    rc, _, err = cli(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "A")
    assert_one_line_error(rc, err, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli(capsys, "--checkpoint", str(empty), "--prompt", "A")
    assert_one_line_error(rc, err, str(empty))
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04junk")
    rc, _, err = cli(capsys, "--checkpoint", str(pickle), "--prompt", "A")
    assert_one_line_error(rc, err)


def test_usage_error_returns_2(capsys):
    assert main(["--prompt", "x"]) == 2  # --checkpoint is required
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_on_cuda(run, capsys):
    rc, out, err = cli(
        capsys,
        "--checkpoint",
        run,
        "--prompt",
        "First",
        "--max-new-tokens",
        "40",
        "--device",
        "cuda",
        "--num-samples",
        "2",
        "--top-p",
        "0.9",
    )
    assert rc == 0, err
    assert all(s.startswith("First") for s in out.split(SEPARATOR + "\n"))


def _unavailable_backend():
    from fastlm import ops

    missing = [name for name, why in ops.backend_status().items() if why is not None]
    if not missing:
        pytest.skip("every backend can run here")
    return missing[0]


def test_saved_backend_that_cannot_run_here_falls_back_to_auto(tmp_path, capsys):
    import json

    backend = _unavailable_backend()
    run = make_run(tmp_path / "r")
    cfg_path = os.path.join(run, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["backend"] = backend  # as if trained with --backend cuda on a GPU machine
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    rc, out, err = cli(capsys, "--checkpoint", run, "--prompt", "First", "--max-new-tokens", "5", "--greedy")
    assert rc == 0 and out.startswith("First"), err
    assert f"trained with backend '{backend}'" in err and "using auto" in err
    rc, out, err = cli(
        capsys, "--checkpoint", run, "--prompt", "First", "--max-new-tokens", "5", "--greedy", "--backend", "reference"
    )
    assert rc == 0 and err == ""


def test_explicit_backend_that_cannot_run_is_one_line_exit_2(tmp_path, capsys):
    backend = _unavailable_backend()
    run = make_run(tmp_path / "r")
    rc, out, err = cli(capsys, "--checkpoint", run, "--prompt", "First", "--max-new-tokens", "5", "--backend", backend)
    assert_one_line_error(rc, err, f"backend '{backend}'")
    rc, out, err = cli(capsys, "--checkpoint", run, "--backend", "fastest")
    assert_one_line_error(rc, err, "unknown backend 'fastest'")
