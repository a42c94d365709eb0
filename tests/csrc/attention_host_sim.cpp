// csrc/cuda/attention.cu compiled for the host on top of cuda_host_sim.h: C entry points over its
// public launchers (fastlm::cuda::attention_fwd/bwd: the same grids, blocks, shared memory sizes
// and kernels as on the GPU) that run on CPU memory, CTA by CTA. For tests/test_cuda_host_sim.py.
#include "cuda_host_sim.h"

#include "cuda/attention.cu"

namespace fastlm {
namespace cuda {
namespace {

AttnParams make_params(const void* q, const void* k, const void* v, const int64_t* strides,
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

}  // namespace
}  // namespace cuda
}  // namespace fastlm

using fastlm::cuda::AttnBwdParams;
using fastlm::cuda::AttnParams;

extern "C" {

// dtype 0 float16, 1 bfloat16; returns the cudaError_t. strides: (b, h, t) of q, k, v;
// shape: B, H, H_kv, T_q, T_k, D.
int sim_attention_fwd(int dtype, const void* q, const void* k, const void* v,
                      const int64_t* strides, const int32_t* shape, int causal, float scale,
                      const float* alibi, void* out, float* lse) {
  fastlm_sim::smem_base() = fastlm::cuda::smem_raw;
  const AttnParams p = fastlm::cuda::make_params(q, k, v, strides, shape, causal, scale, alibi);
  return fastlm::cuda::attention_fwd(p, static_cast<fastlm::cuda::DType>(dtype), out, lse, nullptr);
}

// strides: q, k, v, out, dout (15); delta: (B, H, T_q) float32 scratch.
int sim_attention_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                      const void* out, const float* lse, const int64_t* strides,
                      const int32_t* shape, int causal, float scale, const float* alibi,
                      float* delta, void* dq, void* dk, void* dv) {
  fastlm_sim::smem_base() = fastlm::cuda::smem_raw;
  AttnBwdParams p{};
  p.fwd = fastlm::cuda::make_params(q, k, v, strides, shape, causal, scale, alibi);
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
  return fastlm::cuda::attention_bwd(p, static_cast<fastlm::cuda::DType>(dtype), nullptr);
}

}  // extern "C"
