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
  // Masks beyond causal (csrc/attention_common.h): keys within `window` positions of the query's
  // (0: none), and documents: doc = (B, 2, T_k) int64 bounds (document_bounds in op_checks.h) or
  // nullptr. attn_params_from_arrays leaves both off.
  int64_t window;
  const int64_t* doc;
};

// AttnParams from flat arrays, the layout of the torch-free C entry points (csrc/cuda/direct.cu and
// the host simulator of the tests): strides = q, k, v strides of (B, H, T) (9 values; D stride 1),
// shape = (B, H, H_kv, T_q, T_k, D).
inline AttnParams attn_params_from_arrays(const void* q, const void* k, const void* v, const int64_t* strides,
                                          const int32_t* shape, int causal, float scale, const float* alibi) {
  AttnParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = strides[i];
    p.k_stride[i] = strides[3 + i];
    p.v_stride[i] = strides[6 + i];
  }
  p.B = shape[0];
  p.H = shape[1];
  p.H_kv = shape[2];
  p.T_q = shape[3];
  p.T_k = shape[4];
  p.D = shape[5];
  p.scale = scale;
  p.alibi = alibi;
  p.causal = causal != 0;
  return p;
}

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

inline int64_t elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// SwiGLU over `rows` rows of `cols` elements; gate and up share the row stride in_stride, the
// output rows are out_stride apart (all strides in elements).
struct SwigluRows {
  const void* gate;
  const void* up;
  int64_t in_stride;
  void* out;
  int64_t out_stride;
  int64_t rows, cols;
};

// Split layout: n contiguous elements of gate and up; out, dgate, dup fresh and contiguous.
cudaError_t swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dtype,
                       cudaStream_t stream);
cudaError_t swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup,
                       int64_t n, DType dtype, cudaStream_t stream);

// Packed layout: x is [rows, 2 * hidden] = [gate | up] with a contiguous last dim and row stride
// x_row_stride, read in place; out is contiguous [rows, hidden]; dout contiguous [rows, hidden];
// dx is a fresh contiguous [rows, 2 * hidden].
cudaError_t swiglu_packed_fwd(const void* x, int64_t rows, int64_t hidden, int64_t x_row_stride,
                              void* out, DType dtype, cudaStream_t stream);
cudaError_t swiglu_packed_bwd(const void* dout, const void* x, int64_t rows, int64_t hidden,
                              int64_t x_row_stride, void* dx, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
