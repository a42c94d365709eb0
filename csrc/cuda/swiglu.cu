// CUDA SwiGLU: out = silu(gate) * up and its backward, fp32 math, 16-byte vector loads/stores.
// No torch headers: see kernels.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace fastlm {
namespace cuda {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC elements of T in one register pack (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T, int VEC>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ out, int64_t n) {
  using P = Pack<T, VEC>;
  const int64_t n_vec = n / VEC;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    const P g = reinterpret_cast<const P*>(gate)[i];
    const P u = reinterpret_cast<const P*>(up)[i];
    P o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = to_f(g.v[e]);
      o.v[e] = from_f<T>(x * sigmoidf_(x) * to_f(u.v[e]));
    }
    reinterpret_cast<P*>(out)[i] = o;
  }
  // tail (n % VEC elements), handled by the first threads
  const int64_t t = n_vec * VEC + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n) {
    const float x = to_f(gate[t]);
    out[t] = from_f<T>(x * sigmoidf_(x) * to_f(up[t]));
  }
}

template <typename T, int VEC>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ gate,
                                  const T* __restrict__ up, T* __restrict__ dgate,
                                  T* __restrict__ dup, int64_t n) {
  using P = Pack<T, VEC>;
  const int64_t n_vec = n / VEC;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    const P d = reinterpret_cast<const P*>(dout)[i];
    const P g = reinterpret_cast<const P*>(gate)[i];
    const P u = reinterpret_cast<const P*>(up)[i];
    P dg, du;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = to_f(g.v[e]), dy = to_f(d.v[e]), s = sigmoidf_(x);
      du.v[e] = from_f<T>(dy * x * s);
      dg.v[e] = from_f<T>(dy * to_f(u.v[e]) * s * (1.0f + x * (1.0f - s)));
    }
    reinterpret_cast<P*>(dgate)[i] = dg;
    reinterpret_cast<P*>(dup)[i] = du;
  }
  const int64_t t = n_vec * VEC + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n) {
    const float x = to_f(gate[t]), dy = to_f(dout[t]), s = sigmoidf_(x);
    dup[t] = from_f<T>(dy * x * s);
    dgate[t] = from_f<T>(dy * to_f(up[t]) * s * (1.0f + x * (1.0f - s)));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int grid_for(int64_t n_vec, int threads) {
  int64_t blocks = (n_vec + threads - 1) / threads;
  if (blocks < 1) blocks = 1;  // the tail still needs one block
  return (int)(blocks > 65535 * 8 ? 65535 * 8 : blocks);
}

template <typename T>
cudaError_t launch_fwd(const void* gate, const void* up, void* out, int64_t n, cudaStream_t st) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* o = static_cast<T*>(out);
  if (aligned16(g) && aligned16(u) && aligned16(o)) {
    swiglu_fwd_kernel<T, VEC><<<grid_for(n / VEC, kThreads), kThreads, 0, st>>>(g, u, o, n);
  } else {
    swiglu_fwd_kernel<T, 1><<<grid_for(n, kThreads), kThreads, 0, st>>>(g, u, o, n);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup,
                       int64_t n, cudaStream_t st) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const T* d = static_cast<const T*>(dout);
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* dg = static_cast<T*>(dgate);
  T* du = static_cast<T*>(dup);
  if (aligned16(d) && aligned16(g) && aligned16(u) && aligned16(dg) && aligned16(du)) {
    swiglu_bwd_kernel<T, VEC><<<grid_for(n / VEC, kThreads), kThreads, 0, st>>>(d, g, u, dg, du, n);
  } else {
    swiglu_bwd_kernel<T, 1><<<grid_for(n, kThreads), kThreads, 0, st>>>(d, g, u, dg, du, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dtype,
                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16: return launch_fwd<__half>(gate, up, out, n, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(gate, up, out, n, stream);
    case DType::kFloat32: return launch_fwd<float>(gate, up, out, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup,
                       int64_t n, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16: return launch_bwd<__half>(dout, gate, up, dgate, dup, n, stream);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(dout, gate, up, dgate, dup, n, stream);
    case DType::kFloat32: return launch_bwd<float>(dout, gate, up, dgate, dup, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
