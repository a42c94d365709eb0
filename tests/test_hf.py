"""Hugging Face interop (fastlm.io.hf_import, fastlm.export, hf:DIR everywhere a checkpoint is read).

Tiny random transformers models built here (from_config + save_pretrained, tokenizers trained with
the tokenizers library): logits parity on every CPU backend, greedy decoding with and without the
KV cache, export -> transformers -> import round trips, tokenizer ids, refusals, CLIs.
"""

import csv
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fastlm import export as export_cli
from fastlm import ops
from fastlm.io import checkpoint, loading
from fastlm.text import data

evaluate_cli = importlib.import_module("fastlm.evaluate")  # the CLI module (fastlm.evaluate is the API function)
generate_cli = importlib.import_module("fastlm.generate")  # likewise
from conftest import one_error_line  # noqa: E402

from fastlm.errors import HFError  # noqa: E402
from fastlm.io import hf_common, hf_export, hf_import  # noqa: E402
from fastlm.model import GPT, PLAIN_OPTIONS, GPTConfig
from fastlm.sampling import generate  # noqa: E402
from fastlm.text.tokenizers import HFTokenizer, TokenizerError, build_tokenizer  # noqa: E402
from fastlm.training.settings import train_command  # noqa: E402

TEXT = data.default_corpus().read_text(encoding="utf-8")[:12000]
ATOL = 1e-4  # the bound for fp32 logits
SAMPLES = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "  two  spaces\nand\n\nlines  ",
    "tab\there\r\nand\rcarriage \u00c9lan caf\u00e9 don't",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "",
]


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (vocab < 300) trained with the tokenizers library."""
    tk = tokenizers
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok


def _perturb(model, scale=0.05):
    """Random init has zero biases and unit norms: make every parameter non-trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def hf_model(kind, vocab, **over):
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=96, bos_token_id=0, eos_token_id=0, **over
        )
        return _perturb(transformers.GPT2LMHeadModel(cfg))
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        bos_token_id=0,
        eos_token_id=0,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **{**common, "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-6, **over}
        )
        return _perturb(transformers.LlamaForCausalLM(cfg))
    cfg = transformers.StableLmConfig(**{**common, "partial_rotary_factor": 1.0, "use_qkv_bias": True, **over})
    return _perturb(transformers.StableLmForCausalLM(cfg))


def save_hf(model, tok, folder):
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


HF_KINDS = {  # name -> (model_type, constructor overrides)
    "gpt2": ("gpt2", {}),
    "gpt2-untied-gelu": ("gpt2", {"tie_word_embeddings": False, "activation_function": "gelu"}),
    "llama-gqa-untied": ("llama", {}),
    "llama-bias-tied": ("llama", {"attention_bias": True, "tie_word_embeddings": True, "num_key_value_heads": 4}),
    "stablelm-qkv-bias": ("stablelm", {}),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, (kind, over) in HF_KINDS.items():
        model = hf_model(kind, bpe_tokenizer.get_vocab_size(), **over)
        out[name] = (save_hf(model, bpe_tokenizer, root / name), model)
    return out


def cpu_backends():
    status = ops.backend_status()
    return [
        pytest.param(b, marks=pytest.mark.skip(reason=f"backend {b!r} unavailable: {status[b]}"))
        if status[b] is not None
        else pytest.param(b, marks=pytest.mark.skip(reason=f"backend {b!r} runs on CUDA tensors; CPU test"))
        if b == "cuda" or (b == "triton" and os.environ.get("TRITON_INTERPRET") != "1")
        else b
        for b in ops.BACKENDS
    ]


def ids_batch(vocab, T=40, B=2, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- import: hf:DIR -> fastlm ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", list(HF_KINDS))
def test_import_logits_match_transformers(hf_dirs, name, backend):
    folder, ref = hf_dirs[name]
    ours, tok, run_config = hf_import.load_hf_model(str(folder), backend=backend)
    cfg = ours.config
    assert cfg.backend == backend and run_config["model"]["backend"] == backend
    idx = ids_batch(cfg.vocab_size)
    with torch.no_grad():
        diff = (ours(idx)[0] - ref(idx).logits).abs().max().item()
    print(f"parity {name} backend={backend}: max abs logit diff {diff:.2e}")
    assert diff <= ATOL
    assert run_config["tokenizer"]["kind"] == "hf" and tok.vocab_size == cfg.vocab_size


def test_import_maps_config_fields(hf_dirs):
    cfg = loading.load_model(f"hf:{hf_dirs['llama-gqa-untied'][0]}")[0].config
    assert (cfg.pos, cfg.mlp, cfg.norm, cfg.n_kv_head, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps, cfg.bias) == (
        "rope",
        "swiglu",
        "rmsnorm",
        2,
        False,
        500000.0,
        1e-6,
        False,
    )
    cfg = loading.load_model(f"hf:{hf_dirs['gpt2'][0]}")[0].config
    assert (cfg.pos, cfg.mlp, cfg.norm, cfg.tie_embeddings, cfg.bias, cfg.block_size) == (
        "learned",
        "gelu_tanh",
        "layernorm",
        True,
        True,
        96,
    )
    cfg = loading.load_model(f"hf:{hf_dirs['stablelm-qkv-bias'][0]}")[0].config
    assert (cfg.norm, cfg.bias, cfg.n_kv_head) == ("layernorm", True, 2)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "stablelm-qkv-bias"])
def test_greedy_decoding_matches_transformers_with_and_without_cache(hf_dirs, name):
    folder, ref = hf_dirs[name]
    model = loading.load_model(f"hf:{folder}")[0]
    prompt = ids_batch(model.config.vocab_size, T=5, B=2, seed=3)
    cached = generate(model, prompt, 32, greedy=True, use_cache=True)
    uncached = generate(model, prompt, 32, greedy=True, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 5 + 32)
    with torch.no_grad():  # a greedy sequence is its own fixed point: each token is transformers' argmax
        hf_choice = ref(cached).logits[:, 4:-1].argmax(-1)
    assert torch.equal(hf_choice, cached[:, 5:])


def _logits_match(folder, ref):
    model = loading.load_model(f"hf:{folder}")[0]
    idx = ids_batch(model.config.vocab_size, T=20)
    with torch.no_grad():
        return (model(idx)[0] - ref(idx).logits.float()).abs().max().item() <= ATOL


def test_hub_gpt2_file_layout(tmp_path, hf_dirs):
    """openai-community/gpt2's model.safetensors: no "transformer." prefix, attention-mask buffers."""
    from safetensors.torch import load_file, save_file

    src, ref = hf_dirs["gpt2"]
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(src / "model.safetensors")).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(96, 96)).view(1, 1, 96, 96)
    folder = tmp_path / "hub-gpt2"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    assert _logits_match(folder, ref)


def test_sharded_and_bf16_weights(tmp_path, hf_dirs, bpe_tokenizer):
    ref = hf_dirs["llama-gqa-untied"][1]
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="40KB")
    bpe_tokenizer.save(str(sharded / "tokenizer.json"))
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    assert _logits_match(sharded, ref)
    half = transformers.AutoModelForCausalLM.from_pretrained(str(sharded)).to(torch.bfloat16)
    save_hf(half, bpe_tokenizer, tmp_path / "bf16")
    assert load_file_dtype(tmp_path / "bf16" / "model.safetensors") == torch.bfloat16
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)
    assert _logits_match(tmp_path / "bf16", ref32.eval())  # bf16 values, computed in fp32 on both sides


def load_file_dtype(path):
    from safetensors.torch import load_file

    return next(iter(load_file(str(path)).values())).dtype


def test_imported_tokenizer_matches_autotokenizer(hf_dirs):
    folder = hf_dirs["gpt2"][0]
    tok = loading.load_model(f"hf:{folder}")[1]
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in SAMPLES + ["a literal <|endoftext|> inside"]:
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids and tok.decode(ids) == auto.decode(ids)
    assert tok.eos_id == 0 and tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_vocab_and_merges_without_tokenizer_json(tmp_path, hf_dirs, bpe_tokenizer):
    folder = tmp_path / "gpt2-files"
    hf_dirs["gpt2"][1].save_pretrained(folder)
    bpe_tokenizer.model.save(str(folder))  # vocab.json + merges.txt only
    assert not (folder / "tokenizer.json").exists()
    tok = loading.load_model(f"hf:{folder}")[1]
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))  # GPT-2's own vocab + merges reader
    for text in SAMPLES:
        assert tok.encode(text) == auto(text, add_special_tokens=False)["input_ids"]


def test_hf_tokenizer_round_trips_through_its_json(hf_dirs, tmp_path):
    tok = loading.load_model(f"hf:{hf_dirs['gpt2'][0]}")[1]
    tok.save(tmp_path / "tok.json")
    from fastlm.text.tokenizers import load_tokenizer

    again = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(again, HFTokenizer) and again.eos_id == tok.eos_id
    assert all(again.encode(t) == tok.encode(t) for t in SAMPLES)
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer"):
        HFTokenizer('{"model": 3}')
    with pytest.raises(TokenizerError, match="cannot hold"):
        HFTokenizer(tok.tokenizer_json, vocab_size=5)


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("sliding_window", 16),
        ("hidden_act", "gelu"),
        ("head_dim", 8),
        ("model_type", "qwen2"),
    ],
)
def test_import_refuses_what_fastlm_cannot_represent(hf_dirs, tmp_path, field, value):
    src = hf_dirs["llama-gqa-untied"][0]
    folder = tmp_path / "m"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    if field == "rope_scaling":
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError) as e:
        loading.load_model(f"hf:{folder}")
    msg = str(e.value)
    assert "\n" not in msg and (field if field != "rope_scaling" else "rope") in msg


@pytest.mark.parametrize(
    "field,value", [("qk_layernorm", True), ("use_parallel_residual", True), ("partial_rotary_factor", 0.25)]
)
def test_import_refuses_stablelm_variants(hf_dirs, tmp_path, field, value):
    src = hf_dirs["stablelm-qkv-bias"][0]
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    cfg.get("rope_parameters", {}).pop("partial_rotary_factor", None)
    with pytest.raises(HFError, match=field):
        hf_import.from_hf_config(cfg)


@pytest.mark.parametrize("edit", ["drop-hidden-size", "bad-type", "wrong-shape"])
def test_broken_model_directory_is_one_line(hf_dirs, tmp_path, capsys, edit):
    src = hf_dirs["llama-gqa-untied"][0]
    folder = tmp_path / "m"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    if edit == "drop-hidden-size":
        del cfg["hidden_size"]
    elif edit == "bad-type":
        cfg["num_hidden_layers"] = "two"
    else:
        cfg["num_key_value_heads"] = 4  # the k/v projections hold 2 heads
    (folder / "config.json").write_text(json.dumps(cfg))
    rc = evaluate_cli.main(["--checkpoint", f"hf:{folder}", "--data", str(folder / "config.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err


def test_omitted_config_fields_take_transformers_defaults(hf_dirs):
    cfg = json.loads((hf_dirs["llama-gqa-untied"][0] / "config.json").read_text())
    del cfg["tie_word_embeddings"], cfg["rms_norm_eps"]  # LlamaConfig: untied, 1e-6
    got = hf_import.from_hf_config(cfg)
    assert got.tie_embeddings is False and got.norm_eps == 1e-6
    cfg = json.loads((hf_dirs["stablelm-qkv-bias"][0] / "config.json").read_text())
    cfg["rope_parameters"].pop("partial_rotary_factor")  # StableLmConfig's default is 0.25: refused
    with pytest.raises(HFError, match="partial_rotary_factor=0.25"):
        hf_import.from_hf_config(cfg)


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(checkpoint.CheckpointError, match="pickle"):
        loading.load_model(f"hf:{tmp_path}")


def test_hub_name_not_cached_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HFError, match="hf download someone/tiny-model"):
        hf_import.resolve_hf_dir("someone/tiny-model")


def _hub_cache(cache, repo_id, src):
    """A Hugging Face cache entry as huggingface_hub writes it: snapshots/<rev>/<file> are relative
    links into the repository's blobs/ folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        blob = repo / "blobs" / f"{f.name}.blob"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snap


def test_hub_name_found_in_the_cache(tmp_path, monkeypatch, hf_dirs):
    import huggingface_hub

    cache = tmp_path / "cache"
    snap = _hub_cache(cache, "someone/tiny-gpt2", hf_dirs["gpt2"][0])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = loading.load_model("hf:someone/tiny-gpt2")[0]
    assert model.config.n_layer == 2
    assert loading.load_model(f"hf:{snap}")[0].config.n_layer == 2  # the snapshot folder itself too


def test_hub_cache_link_into_another_repository_is_refused(tmp_path, hf_dirs):
    cache = tmp_path / "cache"
    snap = _hub_cache(cache, "someone/tiny-gpt2", hf_dirs["gpt2"][0])
    other = _hub_cache(cache, "else/secret", hf_dirs["llama-gqa-untied"][0])
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(os.path.realpath(other / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="outside"):
        loading.load_model(f"hf:{snap}")


# ---- export: fastlm run -> transformers directory ------------------------------------------------

EXPORTS = {  # run name -> (tokenizer spec, GPTConfig overrides, expected model_type)
    "char-plain-recipe": ("char", dict(pos="rope", mlp="swiglu"), "stablelm"),
    "char-default-without-value-embed": (
        "char",
        dict(pos="rope", mlp="swiglu", qk_norm=True, tie_embeddings=False),
        "stablelm",
    ),
    "word-llama-gqa": (
        "word",
        dict(
            pos="rope",
            mlp="swiglu",
            norm="rmsnorm",
            n_kv_head=2,
            tie_embeddings=False,
            norm_eps=1e-6,
            rope_theta=50000.0,
        ),
        "llama",
    ),
    "bpe-gpt2-nobias": ("bpe", dict(pos="learned", mlp="gelu"), "gpt2"),
    "bpe-gpt2-bias-tanh": ("bpe", dict(pos="learned", mlp="gelu_tanh", bias=True, tie_embeddings=False), "gpt2"),
    "bpe-llama-bias": ("bpe", dict(pos="rope", mlp="swiglu", norm="rmsnorm", bias=True), "llama"),
    "char-mistral-window": ("char", dict(pos="rope", mlp="swiglu", norm="rmsnorm", n_kv_head=2, window=8), "mistral"),
    # the speedrun options that transformers represents exactly
    "char-qknorm-stablelm": ("char", dict(pos="rope", mlp="swiglu", qk_norm=True, n_kv_head=2), "stablelm"),
    "word-qknorm-qwen3": (
        "word",
        dict(pos="rope", mlp="swiglu", norm="rmsnorm", qk_norm=True, n_kv_head=2, tie_embeddings=False),
        "qwen3",
    ),
    "bpe-gpt2-relu2": ("bpe", dict(pos="learned", mlp="relu2"), "gpt2"),
    "char-gpt2-relu": ("char", dict(pos="learned", mlp="relu", tie_embeddings=False, zero_init_proj=True), "gpt2"),
}


def make_run(folder, spec, **model_kw):
    """A fastlm run directory as train writes it (config, tokenizer, weights, val split, summary)."""
    tok = build_tokenizer(spec, TEXT, vocab_size=290 if spec in ("bpe", "word") else None)
    shape = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32, block_size=64)
    cfg = GPTConfig(**{**PLAIN_OPTIONS, "tie_embeddings": True, **shape, **model_kw})  # options: model_kw's
    torch.manual_seed(0)
    model = _perturb(GPT(cfg))
    run_config = {
        "model": cfg.to_dict(),
        "train": {"data": ["shakespeare.txt"], "tokenizer": spec, "max_iters": 7},
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
    }
    run_config["command"] = train_command(run_config)
    checkpoint.write_run_files(folder, run_config, tok)
    checkpoint.save_weights(
        folder / "model.safetensors",
        checkpoint.model_tensors(model),
        {"fastlm_model_config": json.dumps(cfg.to_dict(), sort_keys=True)},
    )
    ids, _ = data.encode_documents(tok, [TEXT[:3000]])
    data.save_splits(folder, {"train": ids[:2000], "val": ids[2000:]}, tok.vocab_size)
    (folder / "summary.json").write_text(json.dumps({"val_loss": 3.25, "steps": 7}))
    return model, tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (spec, kw, _) in EXPORTS.items():
        run = root / name
        model, tok = make_run(run, spec, **kw)
        info = hf_export.export_model(run, root / f"{name}-hf")
        out[name] = (run, root / f"{name}-hf", model, tok, info)
    return out


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits(exported, name):
    run, folder, model, tok, info = exported[name]
    assert info["model_type"] == EXPORTS[name][2]
    print(f"export parity {name} -> {info['model_type']}: max abs logit diff {info['max_abs_logit_diff']:.2e}")
    assert info["max_abs_logit_diff"] <= ATOL
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder))  # no trust_remote_code
    assert type(ref).__name__ == hf_common.HF_CLASSES[info["model_type"]]
    idx = ids_batch(model.config.vocab_size, T=64, B=3, seed=7)
    with torch.no_grad():
        assert (model(idx)[0] - ref(idx).logits).abs().max().item() <= ATOL
    files = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files
    card = (folder / "README.md").read_text()
    assert "3.2500" in card and "shakespeare.txt" in card and "steps: 7" in card and "python -m fastlm.train" in card


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_tokenizer_encodes_and_decodes_like_fastlm(exported, name):
    run, folder, model, tok, info = exported[name]
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = SAMPLES + ["a literal <eos> and <|endoftext|> stay text"]
    for text in texts:
        try:
            ids = tok.encode(text)
        except TokenizerError:  # a char vocabulary without some of these characters: both refuse
            with pytest.raises(Exception):  # noqa: B017 (tokenizers raises the bare Exception)
                auto(text, add_special_tokens=False)
            continue
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        ids = ids + [tok.eos_id]
        assert auto.decode(ids) == tok.decode(ids)
    assert auto.eos_token_id == tok.eos_id


def test_tiktoken_file_tokenizer_exports_as_byte_level_bpe(tmp_path):
    import base64

    bpe = build_tokenizer("bpe", TEXT, vocab_size=290)
    ranks = bpe.encoding._mergeable_ranks
    path = tmp_path / "mine.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = build_tokenizer(f"tiktoken:{path}", "")
    hf_tok, specials, split = hf_export.to_hf_tokenizer(tok)
    assert specials == {"eos_token": "<|endoftext|>"} and split
    assert hf_tok.token_to_id("<|endoftext|>") == tok.eos_id
    spread = "".join(chr(c) + " 1a"[c % 3] for c in range(0, 0x30000, 5) if not 0xD800 <= c < 0xE000)
    for text in SAMPLES + ["caf\u00e9 \u4e2d\u6587 \U0001f600 don't  stop\t\r\n", spread]:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False).ids == ids
        assert hf_tok.decode(ids, skip_special_tokens=False) == tok.decode(ids)


@pytest.mark.parametrize("lowercase", [False, True])
def test_word_tokenizer_export_follows_python_unicode_rules(lowercase):
    """Python's \\w and \\s differ from Oniguruma's on thousands of code points (combining marks as in
    Devanagari or NFD accents, superscripts, connector punctuation): the export spells Python's classes
    out, so every code point splits as in fastlm. Lowercasing follows Rust's Unicode tables: the
    letters they lowercase and Python's do not (newer Unicode) and a final capital sigma (Python
    lowercases it to a final-form sigma) are the known gap, left out here."""
    import unicodedata

    sample = "नमस्ते दुनिया x\u00b2 a\u203fb " + unicodedata.normalize("NFD", "Élan café ΟΔΥΣΣΕΥ \u2160")
    tok = build_tokenizer("word", TEXT[:3000] + sample, lowercase=lowercase)
    hf_tok = hf_export.to_hf_tokenizer(tok)[0]
    rust_lower = tokenizers.normalizers.Lowercase().normalize_str
    everything = "".join(
        chr(c)
        for c in range(0x20, 0x30000, 3)
        if not 0xD800 <= c < 0xE000 and not (lowercase and rust_lower(chr(c)) != chr(c).lower())
    )
    for text in [sample, everything, "tab\there\u00a0nbsp\u2028line\r\n"]:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False).ids == ids
        assert hf_tok.decode(ids, skip_special_tokens=False) == tok.decode(ids)


@pytest.mark.parametrize(
    "name", ["bpe-gpt2-nobias", "word-llama-gqa", "char-plain-recipe", "word-qknorm-qwen3", "bpe-gpt2-relu2"]
)
def test_export_then_import_is_bit_identical(exported, name):
    run, folder, model, tok, info = exported[name]
    back, back_tok, _ = loading.load_model(f"hf:{folder}")
    assert {k: v for k, v in back.config.to_dict().items()} == model.config.to_dict()
    want, got = checkpoint.model_tensors(model), checkpoint.model_tensors(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    idx = ids_batch(model.config.vocab_size, T=30, seed=2)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], back(idx)[0])
    text = SAMPLES[0] if name != "char-plain-recipe" else "ROMEO: But soft"
    assert back_tok.encode(text) == tok.encode(text)


def test_imported_model_exports_again(hf_dirs, tmp_path):
    info = hf_export.export_model(f"hf:{hf_dirs['llama-gqa-untied'][0]}", tmp_path / "again")
    assert info["model_type"] == "llama" and info["max_abs_logit_diff"] <= ATOL
    card = (tmp_path / "again" / "README.md").read_text()
    assert "data: unknown" in card and "converted from the transformers model" in card


@pytest.mark.parametrize(
    "over,option",
    [
        (dict(pos="alibi"), "pos=alibi"),
        (dict(pos="sinusoidal"), "pos=sinusoidal"),
        (dict(pos="none"), "pos=none"),
        (dict(mlp="relu2"), "mlp=relu2"),
        (dict(pos="rope", mlp="gelu"), "pos=rope with mlp=gelu"),
        (dict(logit_softcap=15.0), "logit_softcap=15.0"),
        (dict(value_embed=True), "value_embed=True"),
        (
            {k: getattr(GPTConfig(), k) for k in ("qk_norm", "value_embed", "tie_embeddings", "smear", "x0_mix")},
            "value_embed=True, smear=True, x0_mix=True do not export",  # the default model: every one named
        ),
        (dict(unet_skips=True), "unet_skips=True"),
        (dict(smear=True), "smear=True does not export"),
        (dict(x0_mix=True), "trained with --no-x0-mix does"),
        (dict(pos="learned", mlp="gelu", qk_norm=True), "qk_norm=True has no gpt2"),
    ],
)
def test_export_refuses_other_architectures(tmp_path, capsys, over, option):
    make_run(tmp_path / "run", "char", **over)
    rc = export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and option in err[0] and "-> llama" in err[0]
    assert not (tmp_path / "out").exists()


def test_export_refuses_biases_stablelm_lacks(tmp_path, capsys):
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu", bias=True)  # non-zero output/MLP biases
    rc = export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "attn.proj.bias is non-zero but stablelm has no such bias" in err[0]
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_export_never_overwrites_without_flag(tmp_path, capsys):
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    out = tmp_path / "out"
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--no-check"]) == 0
    rc = export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    (out / "config.json").write_text("{}")  # an earlier export is replaced with --overwrite
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "stablelm"
    assert "max abs logit diff" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_failed_self_check_writes_nothing(tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    real = hf_export.to_hf_tensors

    def wrong_layout(tensors, cfg, hf_cfg):  # a swapped q/k layout: what an approximate export looks like
        out = real(tensors, cfg, hf_cfg)
        k = "model.layers.0.mlp.gate_proj.weight"
        out[k] = out[k].flip(0).contiguous()
        return out

    out = tmp_path / "out"
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--no-check"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(hf_export, "to_hf_tensors", wrong_layout)
    rc = export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "self-check failed" in err and "logit" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export is untouched


# ---- CLIs over hf:DIR -----------------------------------------------------------------------------


def test_generate_and_evaluate_read_hf_dirs(hf_dirs, tmp_path, capsys):
    folder, ref = hf_dirs["llama-gqa-untied"]
    rc = generate_cli.main(
        ["--checkpoint", f"hf:{folder}", "--prompt", "ROMEO:", "--max-new-tokens", "8", "--greedy", "--device", "cpu"]
    )
    assert rc == 0 and capsys.readouterr().out.startswith("ROMEO:")
    text = tmp_path / "eval.txt"
    text.write_text(TEXT[:2000], encoding="utf-8")
    rc = evaluate_cli.main(["--checkpoint", f"hf:{folder}", "--data", str(text), "--json", "--device", "cpu"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["tokenizer"] == "hf" and math_isfinite(res["loss"])
    rc = evaluate_cli.main(["--checkpoint", f"hf:{folder}", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "--data" in err and "\n" not in err


def math_isfinite(x):
    return x == x and abs(x) != float("inf")


def test_fine_tune_from_hf_starts_at_the_hf_loss(hf_dirs, tmp_path, capsys):
    from fastlm.train import main as train_main

    folder, ref = hf_dirs["gpt2"]
    corpus = tmp_path / "my.txt"
    corpus.write_text(TEXT[:6000], encoding="utf-8")
    out = tmp_path / "ft"
    rc = train_main(
        [
            "--init-from",
            f"hf:{folder}",
            "--data",
            str(corpus),
            "--out-dir",
            str(out),
            "--max-iters",
            "2",
            "--batch-size",
            "2",
            "--eval-iters",
            "1",
            "--eval-interval",
            "2",
            "--sample-tokens",
            "0",
            "--no-progress",
            "--log-interval",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--eval-batch-size",
            "4",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    run_config = json.loads((out / "config.json").read_text())
    assert run_config["tokenizer"]["kind"] == "hf"
    first = float(list(csv.DictReader(open(out / "train_log.csv")))[0]["loss"])
    train_ids = data.load_split(out, "train", run_config["tokenizer"]["vocab_size"])
    sampler = data.BatchSampler(train_ids, run_config["model"]["block_size"], 2, [run_config["train"]["seed"], 0])
    x, y = sampler.sample("cpu")
    with torch.no_grad():
        hf_loss = ref(input_ids=x).logits.float().flatten(0, 1)
        hf_loss = torch.nn.functional.cross_entropy(hf_loss, y.flatten()).item()
    assert abs(first - hf_loss) <= 1e-4, (first, hf_loss)
    model, tok, _ = loading.load_model(out)  # the fine-tuned run reads back with the HF tokenizer
    source_tok = loading.load_model(f"hf:{folder}")[1]
    assert isinstance(tok, HFTokenizer) and tok.encode(SAMPLES[0]) == source_tok.encode(SAMPLES[0])


def test_gentle_fine_tune_of_an_hf_model_moves_no_weight(hf_dirs, tmp_path, capsys):
    """``--init-from hf:DIR --lr 1e-8`` with no --optimizer: AdamW on every parameter at that rate (the
    embedding tables too: no cpu-profile embed_lr_ratio in a fine-tune), so one step leaves every weight
    within 1e-6 of the source (Muon's default peak would move them ~1e-2)."""
    from fastlm.train import main as train_main

    folder, _ = hf_dirs["llama-gqa-untied"]
    corpus = tmp_path / "my.txt"
    corpus.write_text(TEXT[:6000], encoding="utf-8")
    out = tmp_path / "ft"
    rc = train_main(
        [
            "--init-from",
            f"hf:{folder}",
            "--data",
            str(corpus),
            "--out-dir",
            str(out),
            "--lr",
            "1e-8",
            "--max-iters",
            "1",
            "--batch-size",
            "2",
            "--eval-iters",
            "1",
            "--eval-interval",
            "1",
            "--sample-tokens",
            "0",
            "--no-progress",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--eval-batch-size",
            "4",
        ]
    )
    res = capsys.readouterr()
    assert rc == 0, res.err
    assert "optimizer: adamw (peak lr 1e-08 for every parameter)" in res.out
    stored = json.loads((out / "config.json").read_text())["train"]
    assert (stored["optimizer"], stored["embed_lr_ratio"]) == ("adamw", 1.0)  # the embeddings too: at --lr
    source = checkpoint.model_tensors(loading.load_model(f"hf:{folder}")[0])
    tuned, _ = checkpoint.load_weights(out / "model.safetensors")
    assert set(tuned) == set(source)
    assert max((tuned[k] - source[k]).abs().max().item() for k in source) <= 1e-6


def test_export_from_the_repo_root(tmp_path):
    """``python -m fastlm.export`` typed at the repository root, as the README shows it: the root is
    first on sys.path there, and transformers imports Hugging Face's ``kernels`` when it is installed;
    the repo's kernels/ folder must not stand in for it (the self-check loads the export)."""
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "fastlm.export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "self-check" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# ---- packaging ------------------------------------------------------------------------------------


def test_import_fastlm_never_imports_transformers():
    code = (
        "import sys, fastlm, fastlm.io.checkpoint, fastlm.io.hf_import, fastlm.io.hf_export, fastlm.io.loading; "
        "import fastlm.export, fastlm.text.tokenizers; "
        "bad = [m for m in ('transformers', 'tokenizers', 'huggingface_hub') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_missing_extra_says_how_to_install(monkeypatch, hf_dirs):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(checkpoint.CheckpointError, match=r"pip install 'fastlm\[hf\]'"):
        loading.load_model(f"hf:{hf_dirs['gpt2'][0]}")


def test_export_without_the_extras(tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    monkeypatch.setitem(sys.modules, "transformers", None)  # no self-check, said so
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a")]) == 0
    assert "self-check skipped: transformers is not installed (pip install 'fastlm[hf]')" in capsys.readouterr().out
    assert "not checked" in (tmp_path / "a" / "README.md").read_text()
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == "error: exporting a tokenizer needs tokenizers: pip install 'fastlm[hf]'"
    assert not (tmp_path / "b").exists()


def test_runs_saved_before_norm_eps_still_load(tmp_path):
    model, tok = make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    old = {k: v for k, v in model.config.to_dict().items() if k != "norm_eps"}  # what older fastlm wrote
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["model"] = old
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    checkpoint.save_weights(
        tmp_path / "run" / "model.safetensors",
        checkpoint.model_tensors(model),
        {"fastlm_model_config": json.dumps(old, sort_keys=True)},
    )
    assert loading.load_model(tmp_path / "run")[0].config.norm_eps == 1e-5


def test_model_dir_with_a_fifo_is_refused_without_reading_it(tmp_path, no_hang):
    """A downloaded model directory is untrusted: a FIFO (or device) named config.json must not hang."""
    folder = tmp_path / "evil"
    folder.mkdir()
    os.mkfifo(folder / "config.json")
    with pytest.raises(checkpoint.CheckpointError, match="not a regular file"):
        loading.load_model(f"hf:{folder}")


# ---- downloaded model folders and exports are untrusted (issue 21) ---------------------------------


def copy_model(src, folder):
    folder.mkdir(parents=True)
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def edit_config(folder, **fields):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_links_leaving_the_model_folder_are_refused(hf_dirs, tmp_path, name):
    """Before: a link to a file anywhere on the machine was read as the model's own file."""
    folder = copy_model(hf_dirs["gpt2"][0], tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / name).rename(elsewhere / name)
    (folder / name).symlink_to(elsewhere / name)
    with pytest.raises(checkpoint.CheckpointError, match="outside"):
        loading.load_model(f"hf:{folder}")
    (folder / name).unlink()  # a link within the folder is the folder's own file
    (folder / "sub").mkdir()
    (elsewhere / name).rename(folder / "sub" / name)
    (folder / name).symlink_to(os.path.join("sub", name))
    assert loading.load_model(f"hf:{folder}")[0].config.n_layer == 2


def _index_folder(src, folder, weight_map):
    folder = copy_model(src, folder)
    (folder / "model.safetensors").rename(folder / "part-1.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_fifo_shard_is_refused_without_blocking(hf_dirs, tmp_path):
    """Before: safetensors opened the FIFO named by the index and blocked for ever."""
    folder = _index_folder(hf_dirs["gpt2"][0], tmp_path / "m", {"a": "part-1.safetensors", "b": "part-2.safetensors"})
    os.mkfifo(folder / "part-2.safetensors")
    code = "import sys; from fastlm.io import loading; loading.load_model(sys.argv[1])"
    try:
        res = subprocess.run([sys.executable, "-c", code, f"hf:{folder}"], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a model whose index names a FIFO blocked")
    assert res.returncode != 0 and "CheckpointError" in res.stderr and "FIFO" in res.stderr, res.stderr[-1500:]


@pytest.mark.parametrize(
    "weight_map", [["part-1.safetensors"], {"a": 7}, "part-1.safetensors", {"a": "../part-1.safetensors"}]
)
def test_malformed_weights_index_is_one_line(hf_dirs, tmp_path, weight_map):
    folder = _index_folder(hf_dirs["gpt2"][0], tmp_path / "m", weight_map)
    with pytest.raises(checkpoint.CheckpointError, match="index"):
        loading.load_model(f"hf:{folder}")


ABSURD_CONFIGS = {  # before: allocation errors and TypeErrors (tracebacks)
    "vocab_size": ("llama-gqa-untied", {"vocab_size": 10**12}),
    "n_embd": ("gpt2", {"n_embd": 2**40}),
    "hidden_size": ("llama-gqa-untied", {"hidden_size": 2**40, "head_dim": None}),
    "model_type": ("llama-gqa-untied", {"model_type": ["llama"]}),
    "intermediate_size": ("llama-gqa-untied", {"intermediate_size": 2**45}),
    "num_key_value_heads": ("llama-gqa-untied", {"num_key_value_heads": 2**62}),
    "max_position_embeddings": ("llama-gqa-untied", {"max_position_embeddings": 2**70}),
    "n_positions": ("gpt2", {"n_positions": 10**7}),
}


@pytest.mark.parametrize("case", list(ABSURD_CONFIGS))
def test_absurd_config_values_are_one_line(hf_dirs, tmp_path, capsys, case):
    base, fields = ABSURD_CONFIGS[case]
    folder = copy_model(hf_dirs[base][0], tmp_path / "m")
    edit_config(folder, **fields)
    rc = evaluate_cli.main(["--checkpoint", f"hf:{folder}", "--data", str(folder / "config.json"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err


def test_a_billion_layers_is_refused_at_once(hf_dirs, tmp_path):
    """Before: a billion name tuples were built (39 s, then the process died)."""
    folder = copy_model(hf_dirs["llama-gqa-untied"][0], tmp_path / "m")
    edit_config(folder, num_hidden_layers=10**9)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastlm.evaluate",
            "--checkpoint",
            f"hf:{folder}",
            "--data",
            str(folder / "config.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "layer" in res.stderr, res.stderr[-1500:]


def test_config_is_checked_against_the_weights_before_the_model_is_built(hf_dirs, tmp_path, monkeypatch):
    """Before: a 60 KB model whose config claimed 3M tokens was built (~1 GB) before the check."""
    folder = copy_model(hf_dirs["llama-gqa-untied"][0], tmp_path / "m")
    edit_config(folder, vocab_size=3_000_000)

    def too_early(*args, **kwargs):
        raise AssertionError("the model was built before its config was checked against the weights")

    monkeypatch.setattr(hf_import, "GPT", too_early)
    with pytest.raises(checkpoint.CheckpointError, match="embed_tokens|wte|vocab"):
        loading.load_model(f"hf:{folder}")


def test_weights_the_config_does_not_use_are_refused(hf_dirs, tmp_path):
    """Before: a config edited down to one layer loaded the first layer of two without a word."""
    folder = copy_model(hf_dirs["llama-gqa-untied"][0], tmp_path / "m")
    edit_config(folder, num_hidden_layers=1)
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.layers\.1\."):
        loading.load_model(f"hf:{folder}")


@pytest.mark.parametrize(
    "name,extra",
    [
        ("gpt2", ["h.0.attn.bias", "h.1.attn.masked_bias"]),
        ("llama-gqa-untied", ["model.layers.0.self_attn.rotary_emb.inv_freq"]),
        ("gpt2", ["lm_head.weight"]),
    ],
)  # tied: transformers ignores it too
def test_known_buffers_in_the_weights_are_not_unused_tensors(hf_dirs, tmp_path, name, extra):
    from safetensors.torch import load_file, save_file

    folder = copy_model(hf_dirs[name][0], tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.update({k: torch.ones(4) for k in extra})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert loading.load_model(f"hf:{folder}")[0].config.n_layer == 2


def test_tokenizer_ids_must_fit_the_vocabulary(hf_dirs, tmp_path, capsys):
    """Before: a token id equal to vocab_size reached the embedding (IndexError under evaluate --data)."""
    folder = copy_model(hf_dirs["llama-gqa-untied"][0], tmp_path / "m")
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    vocab = tok["model"]["vocab"]
    vocab["e"] = vocab_size  # a common token moved to the id just past the model's vocabulary
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:500])
    rc = evaluate_cli.main(["--checkpoint", f"hf:{folder}", "--data", str(text), "--device", "cpu"])
    assert rc == 2 and str(vocab_size) in one_error_line(capsys.readouterr())


def test_tokenizer_regex_panic_is_a_tokenizer_error():
    """Before: Oniguruma's backtracking limit panicked in Rust (PanicException, not an Exception)."""
    tk = tokenizers
    tok = tk.Tokenizer(tk.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"(a+)+b"), "isolated")
    hf_tok = HFTokenizer(tok.to_str())
    assert hf_tok.encode("a") == [0]
    with pytest.raises(TokenizerError, match="tokenizer"):
        hf_tok.encode("a" * 40 + "c")


# ---- exports never delete what they did not write --------------------------------------------------


@pytest.mark.parametrize(
    "target", ["the run", "the folder of the run", "a folder of user files", "an export with a user file"]
)
def test_export_never_deletes_what_it_did_not_write(tmp_path, capsys, target):
    """Before: --out RUN --overwrite exited 0 after replacing the run it exported; --out its parent
    deleted the run and its siblings; --overwrite deleted any folder's files."""
    runs = tmp_path / "runs"
    make_run(runs / "run", "char", pos="rope", mlp="swiglu")
    (runs / "sibling").mkdir()
    (runs / "sibling" / "notes.txt").write_text("mine")
    out = {
        "the run": runs / "run",
        "the folder of the run": runs,
        "a folder of user files": runs / "sibling",
        "an export with a user file": tmp_path / "exported",
    }[target]
    if target == "an export with a user file":
        assert export_cli.main(["--checkpoint", str(runs / "run"), "--out", str(out), "--no-check"]) == 0
        (out / "notes.txt").write_text("mine")
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc = export_cli.main(["--checkpoint", str(runs / "run"), "--out", str(out), "--overwrite", "--no-check"])
    assert rc == 2
    assert "--out" in one_error_line(capsys.readouterr())
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_export_of_an_hf_folder_onto_itself_is_refused(hf_dirs, tmp_path, capsys):
    folder = copy_model(hf_dirs["gpt2"][0], tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rc = export_cli.main(["--checkpoint", f"hf:{folder}", "--out", str(folder), "--overwrite", "--no-check"])
    assert rc == 2 and "--out" in one_error_line(capsys.readouterr())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_export_into_a_new_subfolder_of_the_run(tmp_path):
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    out = tmp_path / "run" / "hf"
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--no-check"]) == 0
    assert loading.load_model(f"hf:{out}")[0].config.n_layer == 2
    assert loading.load_model(tmp_path / "run")[0].config.n_layer == 2


def test_export_follows_the_umask(tmp_path):
    """Before: the export folder was 0700 (a staging folder from mkdtemp) whatever the umask."""
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    old = os.umask(0o002)
    try:
        assert (
            export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-check"]) == 0
        )
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o775
    assert modes and set(modes.values()) == {0o664}, modes


HOLDER = """
import sys, time
from fastlm.files.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_export_waits_for_no_one_while_a_run_trains(tmp_path, capsys):
    """Export reads a run under its lock: a run being trained is refused, naming the trainer."""
    make_run(tmp_path / "run", "char", pos="rope", mlp="swiglu")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-check"])
        line = one_error_line(capsys.readouterr())
        assert rc == 2 and line == f"error: {tmp_path / 'run'} is in use by pid {holder.pid}"
    finally:
        holder.kill()
        holder.wait()
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-check"]) == 0
