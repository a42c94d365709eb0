// csrc/cuda/swiglu.cu compiled for the host on top of cuda_host_sim.h: its public launchers (the
// same grids, blocks and kernels as on the GPU) run on CPU memory. For tests/test_cuda_host_sim.py.
#include "cuda_host_sim.h"

#include "cuda/swiglu.cu"

namespace fc = fastlm::cuda;

extern "C" {

// dtype 0 float16, 1 bfloat16, 2 float32; returns the cudaError_t.
int sim_swiglu_fwd(int dtype, const void* gate, const void* up, void* out, int64_t n) {
  return fc::swiglu_fwd(gate, up, out, n, static_cast<fc::DType>(dtype), nullptr);
}
int sim_swiglu_bwd(int dtype, const void* dout, const void* gate, const void* up, void* dgate,
                   void* dup, int64_t n) {
  return fc::swiglu_bwd(dout, gate, up, dgate, dup, n, static_cast<fc::DType>(dtype), nullptr);
}
int sim_swiglu_packed_fwd(int dtype, const void* x, int64_t rows, int64_t hidden, int64_t stride,
                          void* out) {
  return fc::swiglu_packed_fwd(x, rows, hidden, stride, out, static_cast<fc::DType>(dtype),
                               nullptr);
}
int sim_swiglu_packed_bwd(int dtype, const void* dout, const void* x, int64_t rows, int64_t hidden,
                          int64_t stride, void* dx) {
  return fc::swiglu_packed_bwd(dout, x, rows, hidden, stride, dx, static_cast<fc::DType>(dtype),
                               nullptr);
}

}  // extern "C"
