"""Python side of the C++/CUDA extension ``fastlm._C``: fake and autograd registrations and the
``cpp`` / ``cuda`` backend objects used by :mod:`fastlm.ops`."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401  (registers the torch.ops.fastlm.* schemas and kernels)
    _IMPORT_ERROR = None
except ImportError as e:  # pure-Python install, or a broken build
    _C = None
    _IMPORT_ERROR = f"fastlm._C not importable ({e})"


class _CppBackend:
    name = "cpp"

    def unavailable_reason(self):
        return _IMPORT_ERROR or "C++ CPU ops not implemented yet"

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes):
        return "not implemented"

    def swiglu_unsupported(self, gate, up):
        return "not implemented"


class _CudaBackend(_CppBackend):
    name = "cuda"

    def unavailable_reason(self):
        return _IMPORT_ERROR or "CUDA ops not implemented yet"


CPP_BACKEND = _CppBackend()
CUDA_BACKEND = _CudaBackend()
