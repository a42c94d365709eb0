// Launchers of the CUDA kernels in csrc/cuda/*.cu. Plain pointers, sizes, strides and a stream:
// no torch headers, so the .cu files compile with nvcc alone (tests/test_cuda_compile.py).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Attention on (B, H, T, D) tensors addressed by element strides (batch, head, time); the last
// dim must be contiguous and every stride a multiple of 8 elements with 16-byte aligned bases.
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3];
  int64_t k_stride[3];
  int64_t v_stride[3];
  int B, H, H_kv, T_q, T_k, D;
  float scale;
  const float* alibi;  // (H,) float32 or nullptr
  bool causal;
};

// Longest T_q / T_k the attention launchers take (grid y counts 64-row blocks, at most 65535).
constexpr int kMaxAttnSeqLen = 65535 * 64;

// out: contiguous (B, H, T_q, D) of the input dtype; lse: contiguous (B, H, T_q) float32.
cudaError_t attention_fwd(const AttnParams& p, DType dtype, void* out, float* lse,
                          cudaStream_t stream);

// dout/out: strided like q (o_stride / do_stride); lse contiguous float32. delta: scratch
// (B, H, T_q) float32. dq: contiguous (B, H, T_q, D); dk, dv: contiguous (B, H_kv, T_k, D).
struct AttnBwdParams {
  AttnParams fwd;
  const void* out;
  const void* dout;
  const float* lse;
  int64_t o_stride[3];
  int64_t do_stride[3];
  float* delta;
  void* dq;
  void* dk;
  void* dv;
};

cudaError_t attention_bwd(const AttnBwdParams& p, DType dtype, cudaStream_t stream);

// Elementwise SwiGLU over n contiguous elements.
cudaError_t swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dtype,
                       cudaStream_t stream);
cudaError_t swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup,
                       int64_t n, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
