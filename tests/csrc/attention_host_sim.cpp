// csrc/cuda/attention.cu compiled for the host on top of cuda_host_sim.h: C entry points that run
// the forward and backward kernels on CPU memory, CTA by CTA, exactly as the launchers would
// launch them (same grids, blocks and kernels). For tests/test_cuda_host_sim.py.
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

template <typename T, int D>
void run_fwd(const AttnParams& p, void* out, float* lse) {
  const dim3 grid(p.B * p.H, (p.T_q + FWD_BM - 1) / FWD_BM);
  fastlm_sim::launch(grid, dim3(FWD_THREADS),
                     [&] { attention_fwd_kernel<T, D>(p, static_cast<T*>(out), lse); });
}

template <typename T, int D>
void run_bwd(const AttnBwdParams& p) {
  const AttnParams& f = p.fwd;
  const int64_t rows = (int64_t)f.B * f.H * f.T_q;
  fastlm_sim::launch(dim3((unsigned)((rows * 32 + 255) / 256)), dim3(256),
                     [&] { attention_bwd_delta_kernel<T>(p); });
  fastlm_sim::launch(dim3(f.B * f.H_kv, (f.T_k + BWD_BN - 1) / BWD_BN), dim3(BWD_THREADS),
                     [&] { attention_bwd_dkdv_kernel<T, D>(p); });
  fastlm_sim::launch(dim3(f.B * f.H, (f.T_q + BWD_BM - 1) / BWD_BM), dim3(BWD_THREADS),
                     [&] { attention_bwd_dq_kernel<T, D>(p); });
}

template <typename T>
int fwd_dim(const AttnParams& p, void* out, float* lse) {
  if (p.D == 64) return run_fwd<T, 64>(p, out, lse), 0;
  if (p.D == 128) return run_fwd<T, 128>(p, out, lse), 0;
  return 1;
}

template <typename T>
int bwd_dim(const AttnBwdParams& p) {
  if (p.fwd.D == 64) return run_bwd<T, 64>(p), 0;
  if (p.fwd.D == 128) return run_bwd<T, 128>(p), 0;
  return 1;
}

}  // namespace
}  // namespace cuda
}  // namespace fastlm

using fastlm::cuda::AttnBwdParams;
using fastlm::cuda::AttnParams;

extern "C" {

// dtype 0 float16, 1 bfloat16; strides (b, h, t) of q, k, v; shape B, H, H_kv, T_q, T_k, D.
int sim_attention_fwd(int dtype, const void* q, const void* k, const void* v,
                      const int64_t* strides, const int32_t* shape, int causal, float scale,
                      const float* alibi, void* out, float* lse) {
  fastlm_sim::smem_base() = fastlm::cuda::smem_raw;
  const AttnParams p = fastlm::cuda::make_params(q, k, v, strides, shape, causal, scale, alibi);
  return dtype == 0 ? fastlm::cuda::fwd_dim<__half>(p, out, lse)
                    : fastlm::cuda::fwd_dim<__nv_bfloat16>(p, out, lse);
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
  return dtype == 0 ? fastlm::cuda::bwd_dim<__half>(p) : fastlm::cuda::bwd_dim<__nv_bfloat16>(p);
}

}  // extern "C"
