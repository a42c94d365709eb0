// fastlm._C: the op schemas (one TORCH_LIBRARY for the namespace) and the Python module.
// Kernels register per dispatch key in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA); fake
// (meta) kernels and autograd formulas are registered from Python in fastlm/_ext.py.
#include <torch/extension.h>

#include "cpu/bf16_gemm.h"

namespace fastlm {
// csrc/bpe.cpp: the BPE trainer's merge loop, exposed to Python with pybind11.
void register_bpe(pybind11::module_& m);
// csrc/cpu/attention.cpp: longest T_k of the float32/float64 BLAS path (0: BLAS not linked).
int64_t cpu_attention_gemm_max_tk();
}  // namespace fastlm

TORCH_LIBRARY(fastlm, m) {
  // Attention on (B, H, T, D) tensors, k/v (B, H_kv, T_k, D); causal is bottom-right aligned.
  // lse: (B, H, T_q) log-sum-exp of each row's scores, float32 (float64 for float64 inputs).
  // Query i sits at key position p = i + T_k - T_q; window w (>= 1) keeps the keys j with
  // p - w < j (causal) or |p - j| < w (not causal); segment_ids (B, T_k) int32/int64, non-decreasing,
  // keeps the keys of p's document (none when p < 0). A row that sees no key gives zeros (lse -inf).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, "
        "Tensor? alibi_slopes, int? window=None, Tensor? segment_ids=None) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "bool causal, float scale, Tensor? alibi_slopes, int? window=None, Tensor? segment_ids=None) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
  // Causal self-attention on the packed projection qkv = (B, T, (H + 2 H_kv) D) with RoPE (cos/sin
  // (T, D/2), optional) applied inside: out (B, T, H D), lse (B, H, T); the backward returns d(qkv).
  // window and segment_ids (B, T) as in attention_fwd.
  m.def("attention_qkv_fwd(Tensor qkv, int n_head, int n_kv_head, Tensor? cos, Tensor? sin, float scale, "
        "Tensor? alibi_slopes, int? window=None, Tensor? segment_ids=None) -> (Tensor out, Tensor lse)");
  m.def("attention_qkv_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int n_head, int n_kv_head, "
        "Tensor? cos, Tensor? sin, float scale, Tensor? alibi_slopes, int? window=None, "
        "Tensor? segment_ids=None) -> Tensor dqkv");
  // QK-norm and value-embedding mix on the packed qkv (B, T, (H + 2 H_kv) D): each q head normed over D
  // times q_gain (D,), each k head times k_gain (LayerNorm without bias, or RMSNorm when rms), and
  // v -> ve_mix[0] * v + ve_mix[1] * ve (ve (B, T, H_kv D), or with ve_idx (B, T) the (V, H_kv D)
  // table it indexes); absent gains / ve leave those parts as they are. out_dtype: qkv's (default) or
  // float32 for a bfloat16/float16 qkv. The backward returns d(qkv), d q_gain, d k_gain, d ve (ve's
  // shape: the table's with ve_idx), d ve_mix (empty tensors for absent inputs).
  m.def("qk_norm_value_mix_fwd(Tensor qkv, int n_head, int n_kv_head, Tensor? q_gain, Tensor? k_gain, "
        "bool rms, float eps, Tensor? ve, Tensor? ve_mix, ScalarType? out_dtype=None, Tensor? ve_idx=None) -> Tensor");
  m.def("qk_norm_value_mix_bwd(Tensor dout, Tensor qkv, int n_head, int n_kv_head, Tensor? q_gain, "
        "Tensor? k_gain, bool rms, float eps, Tensor? ve, Tensor? ve_mix, Tensor? ve_idx=None) -> (Tensor dqkv, "
        "Tensor dq_gain, Tensor dk_gain, Tensor dve, Tensor dve_mix)");
  // LayerNorm over the last dim of s = x + residual (s = x without a residual): (s - mean) /
  // sqrt(var + eps) * weight + bias, or RMSNorm when rms (s / sqrt(mean(s^2) + eps) * weight + bias);
  // weight and bias (C,) optional. out_dtype: x's (default) or bfloat16/float16 for a float32 x; the
  // residual has x's dtype or out_dtype. Returns (out, sum): sum = s in x's dtype (an empty tensor
  // without a residual). The backward takes the normalised input (s, or x) and d out (out_dtype),
  // plus d sum when s has other uses, and returns d x (x's dtype), d weight, d bias and, given
  // residual_dtype, d residual (empty tensors for absent ones).
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, bool rms, float eps, "
        "ScalarType? out_dtype=None, Tensor? residual=None) -> (Tensor out, Tensor sum)");
  m.def("layer_norm_bwd(Tensor dout, Tensor x, Tensor? weight, Tensor? bias, bool rms, float eps, "
        "Tensor? dsum=None, ScalarType? residual_dtype=None) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dresidual)");
  // silu(gate) * up and its gradients.
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  // Packed layout: x = [..., 2 * hidden] holds [gate | up]; out = [..., hidden]; dx like x.
  m.def("swiglu_packed_fwd(Tensor x) -> Tensor");
  m.def("swiglu_packed_bwd(Tensor dout, Tensor x) -> Tensor dx");
  // One Muon step (fastlm.optim.Muon) on 2-D float32/float64 matrices, in place on params and
  // momentum_buffers: momentum, Newton-Schulz (ns_coefficients = (a, b, c)), decay and update;
  // bf16_products (float32 only): the Newton-Schulz products take bf16 operands, float32 sums.
  m.def("muon_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, "
        "float momentum, bool nesterov, float weight_decay, int ns_steps, float[] ns_coefficients, "
        "float eps, bool bf16_products=False) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++/CUDA kernels (ops live in torch.ops.fastlm)";
  m.def("has_cuda", []() {
#ifdef FASTLM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the extension was built with its CUDA kernels");
  m.def("cpu_capability", []() {
#if defined(CPU_CAPABILITY_AVX512)
    return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
    return "AVX2";
#else
    return "DEFAULT";
#endif
  }, "The vector level the CPU kernels were compiled for (setup.py picks the build machine's widest)");
  m.def("source_hash", []() {
#ifdef FASTLM_SOURCE_HASH
#define FASTLM_STR2(x) #x
#define FASTLM_STR(x) FASTLM_STR2(x)
    // one literal, so fastlm._buildinfo.embedded_csrc_hash finds marker and hash together in the file
    static const char kSourceHash[] = "fastlm-csrc-sha256:" FASTLM_STR(FASTLM_SOURCE_HASH);
    return std::string(kSourceHash + sizeof("fastlm-csrc-sha256:") - 1);
#else
    return std::string();
#endif
  }, "sha256 of the csrc/ tree this extension was built from (fastlm._buildinfo.csrc_hash)");
  m.def("cpu_attention_gemm_max_tk", &fastlm::cpu_attention_gemm_max_tk,
        "Longest key length the CPU attention runs through BLAS GEMMs in float32/float64 (0: none)");
  m.def("cpu_bf16_dot", [](c10::optional<bool> enable) {
    if (enable.has_value()) fastlm::bf16::dot_switch() = *enable;
    return fastlm::bf16::use_dot();
  }, pybind11::arg("enable") = pybind11::none(),
        "Whether the bfloat16 CPU products run on AVX512-BF16 micro-kernels (this CPU has it and they are "
        "switched on); enable=False/True switches them (tests: the plain loops)");
  fastlm::register_bpe(m);
}
