// C entry points over the kernels.h launchers, for a torch-free shared library that
// benchmarks/cuda_direct.py builds with nvcc and loads with ctypes (the GPU check calls the
// kernels without building fastlm._C). Plain pointers, sizes, element strides and a stream in;
// each returns a cudaError_t as int (0 = success). dtype: 0 float16, 1 bfloat16, 2 float32.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

using fastlm::cuda::AttnBwdParams;
using fastlm::cuda::AttnParams;
using fastlm::cuda::DType;
using fastlm::cuda::attn_params_from_arrays;  // shape: B, H, H_kv, T_q, T_k, D; strides: (b, h, t) of q, k, v

bool valid_dtype(int dtype) { return dtype >= 0 && dtype <= 2; }

}  // namespace

extern "C" {

int fastlm_attention_fwd(int dtype, const void* q, const void* k, const void* v,
                         const int64_t* strides, const int32_t* shape, int causal, float scale,
                         void* out, float* lse, void* stream) {
  if (!valid_dtype(dtype)) return cudaErrorInvalidValue;
  const AttnParams p = attn_params_from_arrays(q, k, v, strides, shape, causal, scale, nullptr);
  return fastlm::cuda::attention_fwd(p, static_cast<DType>(dtype), out, lse,
                                     static_cast<cudaStream_t>(stream));
}

// strides: (b, h, t) of q, k, v, out, dout (15 values); delta: (B, H, T_q) float32 scratch.
int fastlm_attention_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                         const void* out, const float* lse, const int64_t* strides,
                         const int32_t* shape, int causal, float scale, float* delta, void* dq,
                         void* dk, void* dv, void* stream) {
  if (!valid_dtype(dtype)) return cudaErrorInvalidValue;
  AttnBwdParams p{};
  p.fwd = attn_params_from_arrays(q, k, v, strides, shape, causal, scale, nullptr);
  for (int i = 0; i < 3; ++i) {
    p.o_stride[i] = strides[9 + i];
    p.do_stride[i] = strides[12 + i];
  }
  p.out = out;
  p.dout = dout;
  p.lse = lse;
  p.delta = delta;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  return fastlm::cuda::attention_bwd(p, static_cast<DType>(dtype), static_cast<cudaStream_t>(stream));
}

int fastlm_swiglu_fwd(int dtype, const void* gate, const void* up, void* out, int64_t n,
                      void* stream) {
  if (!valid_dtype(dtype)) return cudaErrorInvalidValue;
  return fastlm::cuda::swiglu_fwd(gate, up, out, n, static_cast<DType>(dtype),
                                  static_cast<cudaStream_t>(stream));
}

int fastlm_swiglu_bwd(int dtype, const void* dout, const void* gate, const void* up, void* dgate,
                      void* dup, int64_t n, void* stream) {
  if (!valid_dtype(dtype)) return cudaErrorInvalidValue;
  return fastlm::cuda::swiglu_bwd(dout, gate, up, dgate, dup, n, static_cast<DType>(dtype),
                                  static_cast<cudaStream_t>(stream));
}

int fastlm_swiglu_packed_fwd(int dtype, const void* x, int64_t rows, int64_t hidden,
                             int64_t x_row_stride, void* out, void* stream) {
  if (!valid_dtype(dtype)) return cudaErrorInvalidValue;
  return fastlm::cuda::swiglu_packed_fwd(x, rows, hidden, x_row_stride, out,
                                         static_cast<DType>(dtype),
                                         static_cast<cudaStream_t>(stream));
}

int fastlm_swiglu_packed_bwd(int dtype, const void* dout, const void* x, int64_t rows,
                             int64_t hidden, int64_t x_row_stride, void* dx, void* stream) {
  if (!valid_dtype(dtype)) return cudaErrorInvalidValue;
  return fastlm::cuda::swiglu_packed_bwd(dout, x, rows, hidden, x_row_stride, dx,
                                         static_cast<DType>(dtype),
                                         static_cast<cudaStream_t>(stream));
}

const char* fastlm_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// Synchronises the stream and returns the first asynchronous error (a kernel fault) as int.
int fastlm_stream_sync(void* stream) {
  return cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
}

}  // extern "C"
