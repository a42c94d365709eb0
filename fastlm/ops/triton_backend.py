"""The ``triton`` backend of :mod:`fastlm.ops`: the object that decides whether the Triton kernels of
:mod:`fastlm.kernels` can run a call, and runs them.

The kernels live in the repository's top-level ``kernels/`` folder, which installs as
``fastlm.kernels`` (setup.py's ``package_dir``). That folder has no ``__init__.py`` on purpose: from
the repository root (the first entry of ``sys.path`` for every ``python -m`` run there) a regular
``kernels`` package would shadow Hugging Face's ``kernels`` (a dependency of transformers 5); a
namespace portion never does. Its modules:

* :mod:`fastlm.kernels.attention` -- FlashAttention-2 style forward/backward and a split-KV
  decode forward (causal bottom-right, sliding window, documents, ALiBi, GQA, any strides, head
  dim <= 256).
* :mod:`fastlm.kernels.swiglu` -- fused ``silu(gate) * up`` and its packed ``[..., 2H]`` variant.
* :mod:`fastlm.kernels.launch` -- the launch helpers both share (interpreter mode, kernel objects,
  ``wrap_triton``, pinned configs: ``FASTLM_TRITON_CONFIGS``).
* :mod:`fastlm.kernels.resources` -- compile a kernel for a GPU target without a GPU and read its
  registers, spills and shared memory (tests, ``benchmarks.gpu_check``).

Importing this module never imports triton: the kernel modules load on first use, so the package
works without triton installed (:data:`BACKEND` then reports why it is unavailable).

Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1``
is set (read at launch time; slow, meant for tests). In the interpreter bfloat16 ``tl.dot`` gives
wrong results (triton 3.9), so bfloat16 attention is refused there.
"""

from fastlm.ops.protocol import BackendBase

__all__ = ["BACKEND", "TritonBackend"]

_MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    from fastlm.kernels.launch import interpreting

    return interpreting()


class TritonBackend(BackendBase):
    """The ``triton`` backend of :mod:`fastlm.ops`."""

    name = "triton"

    def __init__(self):
        self._import_error = None
        self._checked = False

    def _import_reason(self):
        if not self._checked:
            self._checked = True
            try:
                import triton  # noqa: F401
            except ImportError:
                self._import_error = "triton not installed (pip install triton)"
                return self._import_error
            try:
                from fastlm.kernels import attention, swiglu  # noqa: F401
            except Exception as e:  # e.g. a torch without torch.library.triton_op (< 2.6)
                self._import_error = f"fastlm.kernels failed to load ({type(e).__name__}: {e})".splitlines()[0]
        return self._import_error

    def unavailable_reason(self):
        why = self._import_reason()
        if why is not None:
            return why
        if _interpreting():
            return None
        import torch

        if torch.cuda.is_available():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU in the interpreter)"

    def _device_reason(self, t):
        if t.device.type == "cuda":
            return None
        if t.device.type == "cpu" and _interpreting():
            return None
        if t.device.type == "cpu":
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); the kernels run on CUDA"
        return f"tensors on {t.device.type}: the Triton kernels run on CUDA (or CPU with TRITON_INTERPRET=1)"

    def _dtype_reason(self, t, what):
        import torch

        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"{what}: dtype {t.dtype} not supported by the Triton kernels (float16/bfloat16/float32)"
        if t.dtype == torch.bfloat16 and t.device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(t.device)
            if major < 8:
                return "bfloat16 needs a GPU of compute capability >= 8.0"
        return None

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        import torch

        why = self._device_reason(q) or self._dtype_reason(q, "attention")
        if why is not None:
            return why
        if q.dtype == torch.bfloat16 and _interpreting():
            return "bfloat16 tl.dot gives wrong results in the Triton interpreter (TRITON_INTERPRET=1)"
        if q.shape[-1] > _MAX_HEAD_DIM:
            return f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
        return None

    def attention(self, q, k, v, causal, scale, alibi_slopes, window=None, segment_ids=None):
        from fastlm.kernels.attention import attention

        return attention(q, k, v, causal, scale, alibi_slopes, window, segment_ids)

    def swiglu_unsupported(self, gate, up):
        return self._device_reason(gate) or self._dtype_reason(gate, "swiglu")

    def swiglu(self, gate, up):
        from fastlm.kernels.swiglu import swiglu

        return swiglu(gate, up)

    def swiglu_packed_unsupported(self, x):
        return self._device_reason(x) or self._dtype_reason(x, "swiglu")

    def swiglu_packed(self, x):
        from fastlm.kernels.swiglu import swiglu_packed

        return swiglu_packed(x)


BACKEND = TritonBackend()
