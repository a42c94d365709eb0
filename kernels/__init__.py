"""fastlm.kernels: Triton kernels (installed from the repository's kernels/ folder)."""


class _TritonBackend:
    name = "triton"

    def unavailable_reason(self):
        return "Triton kernels not implemented yet"

    def attention_unsupported(self, q, k, v, causal, scale, alibi_slopes):
        return "not implemented"

    def swiglu_unsupported(self, gate, up):
        return "not implemented"


BACKEND = _TritonBackend()
