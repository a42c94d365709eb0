// csrc/cuda/attention.cu compiled for the host on top of cuda_host_sim.h: C entry points over its
// public launchers (fastlm::cuda::attention_fwd/bwd: the same grids, blocks, shared memory sizes
// and kernels as on the GPU) that run on CPU memory, CTA by CTA. For tests/test_cuda_host_sim.py.
#include "cuda_host_sim.h"

#include "cuda/attention.cu"

using fastlm::cuda::AttnBwdParams;
using fastlm::cuda::AttnParams;

extern "C" {

// dtype 0 float16, 1 bfloat16; returns the cudaError_t. strides: (b, h, t) of q, k, v;
// shape: B, H, H_kv, T_q, T_k, D; window 0: none; doc: (B, 2, T_k) document bounds or null.
int sim_attention_fwd(int dtype, const void* q, const void* k, const void* v,
                      const int64_t* strides, const int32_t* shape, int causal, float scale,
                      const float* alibi, int64_t window, const int64_t* doc, void* out, float* lse) {
  fastlm_sim::smem_base() = fastlm::cuda::smem_raw;
  AttnParams p = fastlm::cuda::attn_params_from_arrays(q, k, v, strides, shape, causal, scale, alibi);
  p.window = window;
  p.doc = doc;
  return fastlm::cuda::attention_fwd(p, static_cast<fastlm::cuda::DType>(dtype), out, lse, nullptr);
}

// strides: q, k, v, out, dout (15); delta: (B, H, T_q) float32 scratch.
int sim_attention_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                      const void* out, const float* lse, const int64_t* strides,
                      const int32_t* shape, int causal, float scale, const float* alibi,
                      int64_t window, const int64_t* doc, float* delta, void* dq, void* dk, void* dv) {
  fastlm_sim::smem_base() = fastlm::cuda::smem_raw;
  AttnBwdParams p{};
  p.fwd = fastlm::cuda::attn_params_from_arrays(q, k, v, strides, shape, causal, scale, alibi);
  p.fwd.window = window;
  p.fwd.doc = doc;
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
