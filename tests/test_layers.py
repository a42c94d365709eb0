"""The package's layers, read from the source: every import (module level and inside functions) goes
down the stack, never up or in a circle, and only the backends reach compiled code.

    CLIs (train, generate, evaluate, export, info; cli/config helpers)
    inference API (fastlm.inference: load / generate / evaluate)
    training (Trainer, settings, run directory life, runtime, optimizers, schedules)
    io (run directories, Hugging Face import / export, loading)
    text (tokenizers, corpora)
    model (GPT, sampling)
    ops (public ops, Backend protocol, reference, backends; fastlm.kernels; fastlm._C)
    files (crash-safe writes, bounded reads of untrusted files)
    errors
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = [  # bottom first: a module may import from its own layer or any layer below it
    ("errors", ("fastlm.errors", "fastlm._version")),
    ("files", ("fastlm.files",)),
    ("ops", ("fastlm.ops", "fastlm.kernels", "fastlm._C")),
    ("model", ("fastlm.model", "fastlm.sampling")),
    ("text", ("fastlm.text",)),
    ("io", ("fastlm.io",)),
    ("training", ("fastlm.training",)),
    ("api", ("fastlm.inference",)),
    (
        "cli",
        (
            "fastlm.cli",
            "fastlm.config",
            "fastlm.train",
            "fastlm.generate",
            "fastlm.evaluate",
            "fastlm.export",
            "fastlm.info",
        ),
    ),
    ("package", ("fastlm",)),
]
#: the only modules that may import the compiled extension or its Python glue, or name torch.ops.fastlm
COMPILED_DOOR = (
    "fastlm.ops.backend",
    "fastlm.ops.extension",
    "fastlm.ops.triton_backend",
    "fastlm.ops._autograd",
    "fastlm.kernels",
)
COMPILED = ("fastlm._C", "fastlm.ops.extension", "fastlm.ops.triton_backend", "fastlm.kernels")
#: function-level imports of fastlm modules are kept for optional compiled code only
LAZY_OK = ("fastlm._C", "fastlm.ops.extension", "fastlm.ops.triton_backend", "fastlm.kernels")


def _module_files():
    for path in sorted((ROOT / "fastlm").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path, path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield f"fastlm.kernels.{path.stem}", path, False


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list:
    """What ``from P import a, b`` depends on: the submodules ``P.a``/``P.b`` it names, else ``P``
    itself (a name defined in P). Parent packages run on the way, as for every import, and are not
    counted as dependencies (``fastlm/__init__`` is the top of the stack; ``from fastlm import
    __version__`` still counts, as it reads the top package)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" if _is_module(f"{prefix}.{a.name}") else prefix for a in node.names]


def _imports(module: str, path: pathlib.Path, is_package: bool):
    """``(target, lineno, inside_a_function)`` for every import of a fastlm module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.extend((t, child.lineno, in_function) for t in _resolve(module, is_package, child))
            visit(child, nested)

    visit(tree, False)
    return [(t, line, lazy) for t, line, lazy in out if t == "fastlm" or t.startswith("fastlm.")]


MODULES = {name: (path, pkg) for name, path, pkg in _module_files()}


def _is_module(name: str) -> bool:
    return name in MODULES or name == "fastlm._C"


def _existing(target: str):
    """The module a dotted import target names (``fastlm.io.checkpoint.load_weights`` -> the module)."""
    while target and not _is_module(target):
        target = target.rpartition(".")[0]
    return target or None


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (rank, len(p))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def _edges():
    edges = []
    for module, (path, pkg) in MODULES.items():
        for target, line, lazy in _imports(module, path, pkg):
            target = _existing(target)
            if target and target != module:
                edges.append((module, target, line, lazy))
    return edges


EDGES = _edges()


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for module in MODULES:
        _layer(module)


def test_imports_only_go_down():
    up = [
        f"{m}:{line} imports {t} ({LAYERS[_layer(t)][0]} is above {LAYERS[_layer(m)][0]})"
        for m, t, line, _ in EDGES
        if _layer(t) > _layer(m)
    ]
    assert not up, "\n".join(up)


def test_no_import_cycles():
    graph = {}
    for m, t, _, _ in EDGES:
        if t != "fastlm" and not (m.startswith(t + ".")):  # a module importing its own package's __init__
            graph.setdefault(m, set()).add(t)
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "\n".join(cycles)


def test_function_level_imports_only_for_optional_compiled_code():
    lazy = [
        f"{m}:{line} imports {t} inside a function"
        for m, t, line, is_lazy in EDGES
        if is_lazy and m != "fastlm" and not any(t == p or t.startswith(p + ".") for p in LAZY_OK)
    ]
    assert not lazy, "\n".join(lazy)


def _names_torch_ops_fastlm(path) -> bool:
    """Whether the code (not a docstring or comment) reaches ``torch.ops.fastlm``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "fastlm"
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ops"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "torch"
        ):
            return True
    return False


def test_only_the_backends_reach_compiled_code():
    def door(module):
        return any(module == p or module.startswith(p + ".") for p in COMPILED_DOOR)

    reach = [
        f"{m}:{line} imports {t}"
        for m, t, line, _ in EDGES
        if any(t == c or t.startswith(c + ".") for c in COMPILED) and not door(m)
    ]
    for module, (path, _) in MODULES.items():
        if not door(module) and _names_torch_ops_fastlm(path):
            reach.append(f"{module} uses torch.ops.fastlm")
    assert not reach, "\n".join(reach)


@pytest.mark.parametrize(
    "planted, rule",
    [
        ("from fastlm.training import trainer\n", test_imports_only_go_down),
        ("def f():\n    from fastlm.text import data\n", test_function_level_imports_only_for_optional_compiled_code),
        ("import torch\nx = torch.ops.fastlm.attention_fwd\n", test_only_the_backends_reach_compiled_code),
        ("from fastlm.ops import extension\n", test_only_the_backends_reach_compiled_code),
    ],
)
def test_a_planted_violation_is_caught(planted, rule, monkeypatch, tmp_path):
    """Each rule fails on a module that breaks it (here a fake module of the model layer)."""
    fake = tmp_path / "fake.py"
    fake.write_text(planted)
    monkeypatch.setitem(MODULES, "fastlm.model.fake", (fake, False))
    monkeypatch.setattr(__import__(__name__), "EDGES", _edges())
    with pytest.raises(AssertionError, match="fastlm.model.fake"):
        rule()


def test_a_planted_cycle_is_caught(monkeypatch, tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("from fastlm import model\n")
    model_path = tmp_path / "model.py"
    model_path.write_text(MODULES["fastlm.model"][0].read_text() + "\nfrom fastlm.text import fake\n")
    monkeypatch.setitem(MODULES, "fastlm.text.fake", (fake, False))
    monkeypatch.setitem(MODULES, "fastlm.model", (model_path, False))
    monkeypatch.setattr(__import__(__name__), "EDGES", _edges())
    with pytest.raises(AssertionError, match="fastlm.model"):
        test_no_import_cycles()
