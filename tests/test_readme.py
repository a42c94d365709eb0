"""The README matches the code: every ``python -m fastlm.X`` command it shows uses flags that CLI has,
every ``fastlm.`` name of its Python snippets exists, and the model defaults it states are
GPTConfig's."""

import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
CLIS = ("train", "generate", "evaluate", "export", "info")


def _commands():
    """(cli, [flags]) of every ``python -m fastlm.<cli>`` line of the README's bash blocks (continued
    lines joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"python -m fastlm\.(\w+)(.*)", line.split("#")[0])
            if m:
                out.append((m.group(1), re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", m.group(2))))
    return out


COMMANDS = _commands()


def test_the_readme_shows_every_cli():
    assert {cli for cli, _ in COMMANDS} >= {"train", "generate", "evaluate", "export"}


@pytest.mark.parametrize("cli, flags", COMMANDS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(COMMANDS)])
def test_every_flag_shown_exists(cli, flags):
    assert cli in CLIS, f"python -m fastlm.{cli} is not a fastlm CLI"
    module = importlib.import_module(f"fastlm.{cli}")
    if not hasattr(module, "build_parser"):
        assert not flags
        return
    known = set(module.build_parser()._option_string_actions)
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"python -m fastlm.{cli}: the README uses unknown flags {unknown}"


def test_every_fastlm_name_in_the_snippets_exists():
    import fastlm

    code = "\n".join(re.findall(r"```python\n(.*?)```", README, re.S))
    for name in sorted(set(re.findall(r"\bfastlm\.([A-Za-z_]\w*)", code))):
        assert hasattr(fastlm, name) or importlib.util.find_spec(f"fastlm.{name}"), f"fastlm.{name}"
    for name in sorted(set(re.findall(r"\bops\.([A-Za-z_]\w*)", code))):
        assert hasattr(fastlm.ops, name), f"fastlm.ops.{name}"


def test_the_model_defaults_it_states_are_gptconfigs():
    from fastlm.model import GPTConfig

    cfg = GPTConfig()
    stated = re.search(r"`block_size` (\d+), `n_layer` (\d+), `n_head` (\d+), `n_embd` (\d+)", README)
    assert stated, "the model section no longer states the defaults"
    assert tuple(map(int, stated.groups())) == (cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)


def test_the_mask_picture_is_the_ops_rule():
    import torch

    from fastlm.ops.masks import visible_mask

    m = re.search(
        r"Causal with `window=(\d+)` and two documents, T=(\d+)\s+\(`segment_ids` `([\d ]+)`.*?```\n(.*?)```",
        README,
        re.S,
    )
    assert m, "the README's mask picture is gone"
    window, t, ids = int(m.group(1)), int(m.group(2)), [int(x) for x in m.group(3).split()]
    drawn = [[c == "x" for c in line.split()] for line in m.group(4).strip().splitlines()]
    rule = visible_mask(t, t, causal=True, window=window, segment_ids=torch.tensor([ids]), device="cpu")
    assert drawn == rule.reshape(t, t).tolist()
