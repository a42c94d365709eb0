"""``python -m fastlm.export``: write a fastlm run as a Hugging Face transformers model directory.

Usage::

    python -m fastlm.export --checkpoint runs/shakespeare-char --out hf/shakespeare
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               m = AutoModelForCausalLM.from_pretrained('hf/shakespeare'); \\
               t = AutoTokenizer.from_pretrained('hf/shakespeare')"

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` and a ``README.md``
model card, and loads without custom code (no ``trust_remote_code``). The architecture mapping is
in :mod:`fastlm.hf`; a model without an exact transformers equivalent is refused.

Self-check: when transformers is installed, the written directory is loaded back and its logits
are compared with fastlm's on a few sequences (fp32, max abs diff <= 1e-4), and its tokenizer's
ids and text with fastlm's; the export fails otherwise. Everything is written into a staging
folder beside ``--out`` and moved into place only after the check: a failed export leaves
``--out`` as it was. A non-empty ``--out`` is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .hf import HF_CLASSES, HFError, architecture_of, require, to_hf_config, to_hf_tensors, to_hf_tokenizer
from .safeio import read_bounded

__all__ = ["export_model", "build_parser", "main", "PARITY_ATOL"]

PARITY_ATOL = 1e-4  # fp32 logits, transformers vs fastlm


def build_parser() -> argparse.ArgumentParser:
    from .config import OneLineParser

    p = OneLineParser(
        prog="python -m fastlm.export",
        description="Write a fastlm run as a transformers model directory (AutoModelForCausalLM / "
                    "AutoTokenizer load it without custom code).")
    p.add_argument("--checkpoint", required=True, help="run directory or its model.safetensors")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--backend", default=None,
                   help="fastlm.ops backend for the self-check's fastlm logits (default: the run's, else auto)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the self-check (reload with transformers and compare logits)")
    return p


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _special_ids(hf_tok, specials: dict) -> dict:
    ids = {k.removesuffix("_token"): hf_tok.token_to_id(v) for k, v in specials.items()}
    return {k: ids.get(k) for k in ("bos", "eos", "pad")}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_model_files(folder: Path, model, tokenizer) -> dict:
    """Write every file but the model card into ``folder``; returns the HF config dict."""
    from safetensors.torch import save_file

    from .checkpoint import model_tensors

    cfg = model.config
    hf_tok, specials, split_specials = to_hf_tokenizer(tokenizer)
    ids = _special_ids(hf_tok, specials)
    hf_cfg = to_hf_config(cfg, ids)
    _write_json(folder / "config.json", hf_cfg)
    save_file(to_hf_tensors(model_tensors(model), cfg, hf_cfg), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(folder / "generation_config.json",
                {"_from_model_config": True, **{f"{k}_token_id": v for k, v in ids.items() if v is not None}})
    (folder / "tokenizer.json").write_text(hf_tok.to_str(), encoding="utf-8")
    _write_json(folder / "tokenizer_config.json",
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                 "clean_up_tokenization_spaces": False, "split_special_tokens": split_specials, **specials})
    _write_json(folder / "special_tokens_map.json", specials)
    return hf_cfg


def _train_defaults() -> dict:
    """TrainConfig's defaults, wherever the trainer keeps it (empty when it cannot be found)."""
    import importlib

    for name in ("fastlm.train_config", "fastlm.train", "fastlm.trainer"):
        with contextlib.suppress(ImportError, AttributeError):
            cls = importlib.import_module(name).TrainConfig
            return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    return {}


def _command(run_config: dict) -> str:
    """The ``fastlm.train`` command line equivalent to the run's config.json: every architecture field
    and every training setting that differs from the defaults."""
    from .config import flag_name

    defaults = _train_defaults()
    args = ["python", "-m", "fastlm.train"]
    train = {k: v for k, v in run_config.get("train", {}).items() if k not in ("overwrite", "resume")}
    model = {k: v for k, v in run_config.get("model", {}).items() if k not in ("vocab_size", "backend")}
    for name, val in [*((k, v) for k, v in train.items() if k not in defaults or defaults[k] != v), *model.items()]:
        if val is None or val == []:
            continue
        if isinstance(val, bool):
            args.append(flag_name(name) if val else "--no-" + flag_name(name)[2:])
        else:
            args += [flag_name(name), *(map(str, val) if isinstance(val, list) else [str(val)])]
    return " ".join(shlex.quote(a) for a in args)


def _model_card(checkpoint: str, run_config: dict, hf_cfg: dict, summary: dict, max_diff) -> str:
    import fastlm

    m = run_config.get("model", {})
    train = run_config.get("train", {})
    data = train.get("data") or (["Tiny Shakespeare (bundled with fastlm)"] if train else ["unknown"])
    val = summary.get("val_loss")
    steps = summary.get("steps", summary.get("step", train.get("max_iters")))
    arch = hf_cfg["model_type"]
    parity = f"{max_diff:.2e}" if max_diff is not None else "not checked (transformers not installed)"
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [fastlm]", "---", "",
        f"# {Path(checkpoint).name or 'fastlm model'}", "",
        f"A small GPT trained and exported by fastlm {fastlm.__version__}. Load it with "
        "`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` (no custom code).", "",
        "## Training", "",
        f"- data: {', '.join(map(str, data))}",
        *([f"- fine-tuned from: `{train['init_from']}`"] if train.get("init_from") else []),
        *([f"- converted from the transformers model in `{run_config['source']['hf']}`"]
          if "source" in run_config else []),
        f"- tokenizer: {run_config.get('tokenizer', {}).get('kind', '?')}, vocabulary {hf_cfg['vocab_size']}",
        f"- steps: {steps if steps is not None else 'unknown'}",
        f"- validation loss: {f'{val:.4f} nats/token' if isinstance(val, (int, float)) else 'unknown'}",
        f"- command (from the run's config.json): `{_command(run_config)}`", "",
        "## Architecture", "",
        f"fastlm `pos={m.get('pos')}, mlp={m.get('mlp')}, norm={m.get('norm')}` maps exactly onto transformers "
        f"`{arch}` (`{HF_CLASSES[arch]}`): {m.get('n_layer')} layers, {m.get('n_head')} heads "
        f"({m.get('n_kv_head')} key/value), width {m.get('n_embd')}, context {m.get('block_size')}.", "",
        f"Max abs logit difference transformers vs fastlm at export (fp32): {parity}.", "",
        f"Exported by fastlm from `{checkpoint}`.", ""])


# ---------------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _transformers_loading(what: str):
    """Quiet transformers' logs and progress bars; its load errors become one-line HFErrors."""
    transformers = require("transformers", "the export self-check")
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    except HFError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HFError(f"self-check failed: transformers cannot load the exported {what}: {first}") from None
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def _check_logits(folder: Path, model) -> float:
    with _transformers_loading("model") as transformers:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))  # float32: config.json says so
    hf_model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (3, min(cfg.block_size, 48)), generator=gen)
    with torch.no_grad():
        ours = model(idx.to(next(model.parameters()).device))[0].float().cpu()
        theirs = hf_model(input_ids=idx).logits.float()
    return (ours - theirs).abs().max().item()


def _check_tokenizer(folder: Path, tokenizer, texts: list) -> None:
    with _transformers_loading("tokenizer") as transformers:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        ids = tokenizer.encode(text)
        got = hf_tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != ids:
            raise HFError(f"self-check failed: the exported tokenizer encodes {text[:40]!r} differently "
                          f"from fastlm's {tokenizer.kind} tokenizer")
        ids = ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if hf_tok.decode(ids) != tokenizer.decode(ids):
            raise HFError(f"self-check failed: the exported tokenizer decodes {text[:40]!r} differently "
                          f"from fastlm's {tokenizer.kind} tokenizer")


def _sample_texts(run_dir: Path, tokenizer) -> list:
    """A few texts the tokenizer can encode: slices of the run's val split (or of random ids)."""
    from .data import load_split

    try:
        ids = load_split(run_dir, "val", tokenizer.vocab_size)[:1200].tolist()
    except (ValueError, OSError):
        ids = torch.randint(0, tokenizer.vocab_size, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [i for i in ids if i != tokenizer.eos_id]
    return [tokenizer.decode(ids[i:i + 200]) for i in range(0, len(ids), 200)] + [""]


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HFError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFError(f"--out {out} is not empty; pass --overwrite to replace it")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out`` (the old ``out`` is removed only after)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "x")
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(checkpoint: str, out_dir, *, overwrite: bool = False, check: bool = True, log=print,
                 backend: Optional[str] = None) -> dict:
    """Export ``checkpoint`` (run dir / weights / ``hf:DIR``) to ``out_dir``; returns
    ``{"out", "model_type", "max_abs_logit_diff"}`` (the diff is None when not checked)."""
    from .checkpoint import load_model
    from .generate import run_dir_of

    out = Path(out_dir)
    _check_out(out, overwrite)
    model, tokenizer, run_config = load_model(checkpoint, "cpu", backend=backend)
    architecture_of(model.config)  # refuse before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        hf_cfg = _write_model_files(staging, model, tokenizer)
        run_dir = None if checkpoint.startswith("hf:") else Path(run_dir_of(checkpoint))
        max_diff = _self_check(staging, model, tokenizer, run_dir, log) if check else None
        summary = _read_summary(run_dir)
        (staging / "README.md").write_text(_model_card(checkpoint, run_config, hf_cfg, summary, max_diff),
                                           encoding="utf-8")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"exported {checkpoint} as transformers {hf_cfg['model_type']} to {out}")
    return {"out": str(out), "model_type": hf_cfg["model_type"], "max_abs_logit_diff": max_diff}


def _read_summary(run_dir) -> dict:
    if run_dir is None:
        return {}
    with contextlib.suppress(OSError, ValueError, RecursionError):  # the card just omits what it cannot read
        raw = read_bounded(Path(run_dir) / "summary.json", 1 << 20, "run summary")  # never a FIFO
        summary = json.loads(raw.decode("utf-8"))
        return summary if isinstance(summary, dict) else {}
    return {}


def _self_check(staging: Path, model, tokenizer, run_dir, log):
    try:
        import transformers  # noqa: F401
    except ImportError:
        log("self-check skipped: transformers is not installed (pip install 'fastlm[hf]')")
        return None
    max_diff = _check_logits(staging, model)
    if not max_diff <= PARITY_ATOL:
        raise HFError(f"self-check failed: transformers' logits differ from fastlm's by {max_diff:.2e} "
                      f"(> {PARITY_ATOL:g}); nothing was written")
    _check_tokenizer(staging, tokenizer, _sample_texts(run_dir, tokenizer) if run_dir else [""])
    log(f"self-check: transformers reloads it; max abs logit diff vs fastlm {max_diff:.2e} (fp32), "
        f"tokenizer ids and text identical")
    return max_diff


def main(argv=None) -> int:
    """CLI entry point: returns the exit code (2 and one ``error:`` line for bad input)."""
    from .cli import run_cli

    def body() -> int:
        args = build_parser().parse_args(argv)
        export_model(args.checkpoint, args.out, overwrite=args.overwrite, check=not args.no_check,
                     backend=args.backend)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
