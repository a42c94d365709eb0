"""Packaging: the extension module, the kernels subpackage, and a pure-Python install."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile

import pytest
import torch

import fastlm

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_extension_imports_when_built():
    spec = importlib.util.find_spec("fastlm._C")
    if spec is None:
        pytest.skip("fastlm._C is not built here (pure-Python install or FASTLM_CPP=0)")
    import fastlm._C  # noqa: F401  (a built but broken extension must fail here, not skip)

    for op in ("attention_fwd", "attention_bwd", "swiglu_fwd", "swiglu_bwd"):
        assert hasattr(torch.ops.fastlm, op), f"torch.ops.fastlm.{op} not registered"
    from fastlm import ops

    assert ops.backend_status()["cpp"] is None


def test_kernels_is_a_fastlm_subpackage():
    """kernels/ is fastlm.kernels (the tree's folder, or the installed fastlm/kernels/), a namespace
    package: no __init__.py, so from the repo root it never shadows Hugging Face's ``kernels``."""
    import fastlm.kernels
    from fastlm.ops import triton_backend as _triton

    (path,) = [pathlib.Path(p).resolve() for p in fastlm.kernels.__path__]
    in_repo = path == REPO / "kernels"
    installed = path.name == "kernels" and path.parent.name == "fastlm"
    assert in_repo or installed, path
    assert not (path / "__init__.py").exists() and not (REPO / "kernels" / "__init__.py").exists()
    assert sys.modules["fastlm.kernels"] is fastlm.kernels
    assert _triton.BACKEND.name == "triton"
    # (no top-level ``kernels`` is installed: checked on the wheel below; a PyPI project has that name)


def _hf_kernels_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_import_kernels_from_the_repo_root_is_not_the_repos():
    """``python -c 'import kernels'`` typed at the repo root (first on sys.path there): Hugging Face's
    package when it is installed (transformers 5 brings it), and never a regular package of ours."""
    code = (
        "import importlib.util, json; s = importlib.util.find_spec('kernels'); "
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    if _hf_kernels_installed():
        origin = pathlib.Path(found[0]).resolve()
        assert REPO not in origin.parents, f"import kernels at the repo root found {origin}"
        proc = subprocess.run(
            [sys.executable, "-c", "import kernels; from kernels import CUDAProperties"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": ""},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:  # at most the tree's folder as a namespace portion, which any installed `kernels` outranks
        assert found is None or found[0] in (None, "namespace"), found


def test_pip_reads_the_metadata_at_the_repo_root():
    """``pip install --dry-run --no-deps .`` at the repo root: setuptools loads every installed
    ``egg_info.writers`` entry point (Hugging Face's ``kernels`` registers one) with the root on sys.path."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            ".",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTLM_CPP": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


BLOCKED_SCRIPT = textwrap.dedent("""
    import sys

    class Blocker:
        BLOCKED = ("fastlm._C", "triton")

        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                raise ImportError(f"blocked for the test: {name}")
            return None

    sys.meta_path.insert(0, Blocker())

    import torch
    import fastlm
    from fastlm import ops
    from fastlm.model import GPT, GPTConfig

    status = ops.backend_status()
    assert status["reference"] is None and status["torch"] is None, status
    assert "_C" in status["cpp"] and "_C" in status["cuda"], status
    assert status["triton"] is not None, status
    for backend in ("auto", "reference", "torch"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16,
                              mlp="swiglu", pos="alibi", backend=backend))
        idx = torch.randint(0, 20, (2, 9))
        logits, loss = model(idx, idx)
        loss.backward()
        assert logits.shape == (2, 9, 20) and torch.isfinite(loss)
    assert "fastlm._C" not in sys.modules and "triton" not in sys.modules
    print("OK", status["cpp"])
""")


def test_package_works_without_extension_and_triton():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "FASTLM_BACKEND": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK"), proc.stdout


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in out.stdout.decode().split("\0") if p]


def _tracked_copy(dest):
    """(tracked files, ``dest``) with a copy of the tracked sources in ``dest`` (skips outside a checkout)."""
    files = _tracked_files()
    if files is None:
        pytest.skip("not a git checkout: cannot list the tracked sources")
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return files, dest


def test_pure_python_wheel_layout_and_install(tmp_path):
    """FASTLM_CPP=0 wheel of the tracked sources: fastlm.kernels inside, data file, no top-level
    ``kernels``; installed alone it imports, reports why _C is missing, and runs the model."""
    pytest.importorskip("setuptools", reason="building a wheel without isolation needs setuptools here")
    _, src = _tracked_copy(tmp_path / "src")
    env = {**os.environ, "FASTLM_CPP": "0", "PIP_NO_INDEX": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=src,
    )  # from the root
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastlm/kernels/attention.py" in names and "fastlm/ops/triton_backend.py" in names
    assert "fastlm/data/tinyshakespeare.txt" in names
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must install as fastlm.kernels"
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fastlm-info = fastlm.info:main" in entry_points

    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = textwrap.dedent("""
        import pathlib, sys, torch
        import fastlm, fastlm.kernels
        from fastlm import ops
        from fastlm.model import GPT, GPTConfig
        root = pathlib.Path(sys.argv[1]).resolve()
        assert pathlib.Path(fastlm.__file__).resolve().parent == root / "fastlm", fastlm.__file__
        assert [pathlib.Path(p).resolve() for p in fastlm.kernels.__path__] == [root / "fastlm" / "kernels"]
        import importlib.util  # a kernel module of the installed folder (found, not run: no triton needed)
        spec = importlib.util.find_spec("fastlm.kernels.launch")
        assert pathlib.Path(spec.origin).resolve().parent == root / "fastlm" / "kernels"
        assert "_C" in ops.backend_status()["cpp"]
        logits, _ = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))(
            torch.zeros(1, 8, dtype=torch.long))
        assert logits.shape == (1, 8, 10)
        print("OK")
    """)
    # -S: no site hooks, so a development (editable) install of fastlm cannot shadow the wheel
    paths = [str(target)] + [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    run_env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "FASTLM_BACKEND": ""}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script, str(target)],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK"


def test_sdist_carries_every_source_the_extension_needs(tmp_path):
    """The sdist (what ``pip wheel``/``python -m build`` compile from) holds every tracked file under
    csrc/: the headers and, from a CPU machine too, the CUDA sources, so it builds anywhere."""
    pytest.importorskip("setuptools", reason="building an sdist needs setuptools here")
    files, src = _tracked_copy(tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        env={**os.environ, "FASTLM_CUDA": "0"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("fastlm-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = [rel for rel in files if rel.startswith("csrc/")]
    assert any(rel.endswith(".h") for rel in csrc) and any(rel.endswith(".cu") for rel in csrc)
    assert sorted(set(csrc) - names) == []


def test_extension_is_refused_on_a_cpu_without_its_vector_level():
    """A _C compiled for AVX-512 (or AVX2) on one machine is reported unavailable, with the way out,
    on a CPU that lacks those instructions, instead of dying of SIGILL in the first kernel."""
    from fastlm.ops import extension as _ext

    avx2_only = {"sse4_2", "avx", "avx2", "fma", "f16c"}
    msg = _ext.build_mismatch("AVX512", avx2_only)
    assert msg and "AVX512" in msg and "avx512f" in msg and "FASTLM_CPU_AVX512=0" in msg
    assert _ext.build_mismatch("AVX2", avx2_only) is None
    assert "avx2" in _ext.build_mismatch("AVX2", {"sse4_2"})
    assert _ext.build_mismatch("DEFAULT", set()) is None
    assert _ext.build_mismatch("AVX512", None) is None  # flags unknown: no claim either way
    if _ext._C is not None:  # this build runs here, so it matches this CPU
        assert _ext.build_mismatch(_ext._C.cpu_capability(), _ext.cpu_flags()) is None


INSTALLED_BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    import fastlm, fastlm.ops.extension as e
    print(json.dumps([fastlm.__file__, None if e._C is None else e._C.__file__, e._IMPORT_ERROR,
                      e._C is not None and e.CPP_BACKEND.unavailable_reason() is None]))
""")


def test_a_checkout_run_beside_an_install_uses_the_installed_extension(tmp_path):
    """``pip install .`` then ``python -m fastlm.train`` at the repository root: the checkout's own
    fastlm/ (no built _C there) comes first on sys.path; it loads the installed _C when that was built
    from the checkout's exact csrc/, and refuses it, saying why, when the sources differ."""
    from fastlm.ops import _buildinfo
    from fastlm.ops import extension as _ext

    if _ext._C is None:
        pytest.skip(f"fastlm._C is not built here: {_ext._IMPORT_ERROR}")
    built = pathlib.Path(_ext._C.__file__)
    assert (
        _buildinfo.embedded_csrc_hash(str(built)) == _ext._C.source_hash() == _buildinfo.csrc_hash(str(REPO / "csrc"))
    )
    _, tree = _tracked_copy(tmp_path / "tree")
    site = tmp_path / "site"
    (site / "fastlm").mkdir(parents=True)
    shutil.copy2(built, site / "fastlm" / built.name)
    info = site / "fastlm-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastlm\nVersion: 0.1.0\n")
    (info / "RECORD").write_text(f"fastlm/{built.name},,\nfastlm-0.1.0.dist-info/METADATA,,\n")
    paths = [str(site)] + [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "FASTLM_BACKEND": ""}

    def run():
        proc = subprocess.run(
            [sys.executable, "-S", "-c", INSTALLED_BUILD_SCRIPT],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    package, loaded, why, usable = run()
    assert pathlib.Path(package).resolve().parent == tree / "fastlm"  # the checkout's package ...
    assert pathlib.Path(loaded).resolve() == (site / "fastlm" / built.name).resolve() and usable, (
        why
    )  # ... the install's _C
    with open(tree / "csrc" / "ops.cpp", "a") as f:
        f.write("// edited after the install\n")
    package, loaded, why, usable = run()
    assert loaded is None and not usable and "other csrc/ sources than this checkout's" in why


def test_version():
    assert isinstance(fastlm.__version__, str) and fastlm.__version__.count(".") >= 1
