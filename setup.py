"""Build script for fastlm, and its own PEP 517 build backend.

Two roles in one file:

* Run as a script (``__name__ == "__main__"``, which is how ``setuptools.build_meta`` executes it),
  it calls ``setup()`` and builds the C++/CUDA extension ``fastlm._C`` with
  ``torch.utils.cpp_extension``.
* Imported as a module (``build-backend = "setup"`` with ``backend-path = ["."]`` in
  pyproject.toml), it is the PEP 517 backend: it re-exports ``setuptools.build_meta`` and appends the
  *target* environment's site-packages to ``sys.path``, so that an isolated build (plain
  ``pip install .``) compiles against the very torch that is installed and will run the extension,
  instead of downloading another one into the build environment.

Environment knobs:
  FASTLM_CUDA=auto|0|1   build the CUDA kernels (auto: torch has CUDA and nvcc is found)
  FASTLM_CPP=1|0         build the extension at all (0: pure Python install, reference path only)
  FASTLM_CPU_AVX2=auto|0|1  compile the CPU kernels with AVX2/FMA (auto: the build machine has them)
  FASTLM_CPU_AVX512=auto|0|1  with AVX-512 instead (auto: the build machine has f/bw/vl/dq)
  TORCH_CUDA_ARCH_LIST   CUDA archs (default "8.0;9.0a")
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja builder)
"""

import os
import sys
import sysconfig

if __name__ != "__main__":
    # ---- PEP 517 backend mode ---------------------------------------------------------------
    _purelib = sysconfig.get_paths()["purelib"]
    _platlib = sysconfig.get_paths()["platlib"]
    for _p in (_purelib, _platlib):
        if _p not in sys.path:
            sys.path.append(_p)  # appended: the isolated build env's setuptools still wins
    from setuptools.build_meta import *  # noqa: F401,F403,E402
    from setuptools.build_meta import __all__  # noqa: F401,E402

else:
    # ---- setup() mode -----------------------------------------------------------------------
    import glob
    import shutil

    from setuptools import setup

    ROOT = os.path.dirname(os.path.abspath(__file__))
    os.chdir(ROOT)

    def _env_flag(name, default):
        val = os.environ.get(name, default).strip().lower()
        if val not in ("auto", "0", "1", "true", "false", "yes", "no", "on", "off"):
            raise SystemExit(f"{name} must be auto, 0 or 1 (got {val!r})")
        return {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(val, val)

    def _cpu_vec_flags():
        """The widest at::vec::Vectorized level (with torch's Sleef exp) for the CPU kernels that the
        x86-64 build machine has: AVX-512 (f/bw/vl/dq: torch's AVX512 level), else AVX2+FMA, else
        none. FASTLM_CPU_AVX512=0 caps it at AVX2, FASTLM_CPU_AVX2=0 turns both off (portable); 1
        forces a level (a build for another machine). fastlm._ext refuses a build whose level the CPU
        running it lacks."""
        import platform

        want2 = _env_flag("FASTLM_CPU_AVX2", "auto")
        want512 = _env_flag("FASTLM_CPU_AVX512", "auto")
        if want2 == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
            return []
        flags, levels = BUILDINFO["cpu_flags"](), BUILDINFO["CPU_LEVEL_FLAGS"]

        def has(names):
            return flags is not None and all(n in flags for n in names)

        if want512 == "1" or (want512 == "auto" and has(levels["AVX512"])):
            return [
                "-mavx512f",
                "-mavx512bw",
                "-mavx512vl",
                "-mavx512dq",
                "-mfma",
                "-mf16c",
                "-DCPU_CAPABILITY=AVX512",
                "-DCPU_CAPABILITY_AVX512",
            ]
        if want2 == "1" or has(levels["AVX2"]):
            return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        return []

    import runpy

    BUILDINFO = runpy.run_path(os.path.join(ROOT, "fastlm", "ops", "_buildinfo.py"))  # not the package: no torch yet

    def _extensions():
        """Return (ext_modules, cmdclass); empty when torch is missing or FASTLM_CPP=0."""
        if _env_flag("FASTLM_CPP", "1") == "0":
            print("fastlm: FASTLM_CPP=0, skipping the C++ extension", file=sys.stderr)
            return [], {}
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError:
            raise SystemExit(  # noqa: B904 (a build error, not a traceback)
                "fastlm: torch must be installed before building fastlm "
                "(pip install torch), or set FASTLM_CPP=0 for a pure-Python install"
            )

        want_cuda = _env_flag("FASTLM_CUDA", "auto")
        nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
        has_cuda_torch = torch.version.cuda is not None
        if want_cuda == "auto":
            build_cuda = has_cuda_torch and nvcc
        else:
            build_cuda = want_cuda == "1"
            if build_cuda and not (has_cuda_torch and nvcc):
                raise SystemExit(f"fastlm: FASTLM_CUDA=1 but torch has CUDA={has_cuda_torch}, nvcc found={nvcc}")

        # Few translation units: every .cpp costs ~1 minute on a 2-core machine.
        sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
        # -fopenmp at compile time only: at::parallel_for is an inline OpenMP region in torch's
        # headers (without the flag it silently runs on one thread); the GOMP symbols then resolve
        # to the OpenMP runtime libtorch_cpu already loads, so no second runtime is linked in.
        cxx = ["-O3", "-std=c++17"] + _cpu_vec_flags()
        if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
            cxx.append("-fopenmp")
        # the sources' fingerprint, so that a source checkout can tell whether an installed _C is its own build
        # (a bare hex token: csrc/ops.cpp stringifies it, so no quotes have to survive the build's shell)
        source_hash = BUILDINFO["csrc_hash"](os.path.join(ROOT, "csrc"))
        define_macros = [("TORCH_EXTENSION_NAME", "_C"), ("FASTLM_SOURCE_HASH", source_hash)]
        extra = {"cxx": cxx}
        if build_cuda:
            sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
            extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
            define_macros.append(("FASTLM_WITH_CUDA", None))
            ext_cls = cpp_extension.CUDAExtension
        else:
            ext_cls = cpp_extension.CppExtension
        print(f"fastlm: building fastlm._C (cuda={build_cuda}) from {len(sources)} sources", file=sys.stderr)
        # Every other file under csrc/ (headers; the CUDA sources of a CPU build) as depends: a rebuild
        # follows their changes, and setuptools puts them in the sdist, which then builds anywhere.
        depends = sorted(p for p in glob.glob("csrc/**/*", recursive=True) if os.path.isfile(p) and p not in sources)
        ext = ext_cls(
            name="fastlm._C",
            sources=sources,
            depends=depends,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            define_macros=define_macros,
        )
        cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
        return [ext], cmdclass

    ext_modules, cmdclass = _extensions()

    setup(
        # listed one by one: kernels/ installs as fastlm.kernels, never as a top-level `kernels`
        packages=[
            "fastlm",
            "fastlm.files",
            "fastlm.io",
            "fastlm.ops",
            "fastlm.text",
            "fastlm.training",
            "fastlm.kernels",
        ],
        package_dir={"fastlm": "fastlm", "fastlm.kernels": "kernels"},
        package_data={"fastlm": ["data/*.txt"]},
        include_package_data=False,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
