// CUDA SwiGLU: out = silu(gate) * up and its backward, fp32 math, 16-byte vector loads/stores.
// No torch headers: see kernels.h.
//
// One pair of kernels serves both layouts: they walk `rows` rows of `cols` elements where gate,
// up and the outputs each have their own row stride. The split layout is one row of n elements;
// the packed layout x = [rows, 2 * hidden] reads gate = x and up = x + hidden in place with x's
// row stride (no copy of the halves), and its backward writes both halves of one fresh dx.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

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

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// Block (tx, ty) with tx * ty = kThreads: threadIdx.x walks a row's packs of VEC elements,
// threadIdx.y picks one of ty rows (short rows then still fill the block); grid y strides over
// the rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, int64_t in_stride,
                      T* __restrict__ out, int64_t out_stride, int64_t rows, int64_t cols) {
  using P = Pack<T, VEC>;
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  const int64_t row_step = (int64_t)gridDim.y * blockDim.y;
  for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    const P g = *reinterpret_cast<const P*>(gate + r * in_stride + c);
    const P u = *reinterpret_cast<const P*>(up + r * in_stride + c);
    P o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = to_f(g.v[e]);
      o.v[e] = from_f<T>(x * sigmoidf_(x) * to_f(u.v[e]));
    }
    *reinterpret_cast<P*>(out + r * out_stride + c) = o;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ dout, int64_t dout_stride, const T* __restrict__ gate,
                      const T* __restrict__ up, int64_t in_stride, T* __restrict__ dgate,
                      T* __restrict__ dup, int64_t grad_stride, int64_t rows, int64_t cols) {
  using P = Pack<T, VEC>;
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  const int64_t row_step = (int64_t)gridDim.y * blockDim.y;
  for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += row_step) {
    const P d = *reinterpret_cast<const P*>(dout + r * dout_stride + c);
    const P g = *reinterpret_cast<const P*>(gate + r * in_stride + c);
    const P u = *reinterpret_cast<const P*>(up + r * in_stride + c);
    P dg, du;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = to_f(g.v[e]), dy = to_f(d.v[e]), s = sigmoidf_(x);
      du.v[e] = from_f<T>(dy * x * s);
      dg.v[e] = from_f<T>(dy * to_f(u.v[e]) * s * (1.0f + x * (1.0f - s)));
    }
    *reinterpret_cast<P*>(dgate + r * grad_stride + c) = dg;
    *reinterpret_cast<P*>(dup + r * grad_stride + c) = du;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte packs are used when every base is 16-byte aligned and every stride and the row length
// are multiples of the pack; otherwise one element per thread.
template <typename T>
bool can_vectorize(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> lens) {
  constexpr int64_t VEC = 16 / sizeof(T);
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  for (int64_t n : lens)
    if (n % VEC != 0) return false;
  return true;
}

struct Launch {
  dim3 grid, block;
};

// tx: the row's packs rounded up to a warp, at most kThreads; ty = kThreads / tx rows per block.
Launch launch_for(int64_t rows, int64_t cols, int vec) {
  const int64_t packs = cols / vec;
  const int64_t tx = packs >= kThreads ? kThreads : (packs + 31) / 32 * 32;
  const int64_t ty = kThreads / tx;
  const int64_t row_blocks = (rows + ty - 1) / ty;
  return Launch{dim3((unsigned)((packs + tx - 1) / tx),
                     (unsigned)(row_blocks < kMaxGridY ? row_blocks : kMaxGridY)),
                dim3((unsigned)tx, (unsigned)ty)};
}

// Launches `kernel` with the geometry `l` on stream `st` (in the host simulator of
// tests/test_cuda_host_sim.py: runs it CTA by CTA on the CPU).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, const Launch& l, cudaStream_t st, Args... args) {
#if defined(FASTLM_HOST_SIM)
  (void)st;
  ::fastlm_sim::launch(l.grid, l.block, [&] { kernel(args...); });
  return cudaSuccess;
#else
  kernel<<<l.grid, l.block, 0, st>>>(args...);
  return cudaGetLastError();
#endif
}

template <typename T>
cudaError_t launch_fwd(const SwigluRows& a, cudaStream_t st) {
  constexpr int VEC = 16 / sizeof(T);
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* o = static_cast<T*>(a.out);
  if (can_vectorize<T>({g, u, o}, {a.in_stride, a.out_stride, a.cols})) {
    return launch(swiglu_fwd_kernel<T, VEC>, launch_for(a.rows, a.cols, VEC), st, g, u, a.in_stride,
                  o, a.out_stride, a.rows, a.cols);
  }
  return launch(swiglu_fwd_kernel<T, 1>, launch_for(a.rows, a.cols, 1), st, g, u, a.in_stride, o,
                a.out_stride, a.rows, a.cols);
}

template <typename T>
cudaError_t launch_bwd(const SwigluRows& a, const void* dout, int64_t dout_stride, void* dgate,
                       void* dup, int64_t grad_stride, cudaStream_t st) {
  constexpr int VEC = 16 / sizeof(T);
  const T *d = static_cast<const T*>(dout), *g = static_cast<const T*>(a.gate),
          *u = static_cast<const T*>(a.up);
  T *dg = static_cast<T*>(dgate), *du = static_cast<T*>(dup);
  if (can_vectorize<T>({d, g, u, dg, du}, {dout_stride, a.in_stride, grad_stride, a.cols})) {
    return launch(swiglu_bwd_kernel<T, VEC>, launch_for(a.rows, a.cols, VEC), st, d, dout_stride, g,
                  u, a.in_stride, dg, du, grad_stride, a.rows, a.cols);
  }
  return launch(swiglu_bwd_kernel<T, 1>, launch_for(a.rows, a.cols, 1), st, d, dout_stride, g, u,
                a.in_stride, dg, du, grad_stride, a.rows, a.cols);
}

// The grid's x dimension counts blocks of one row: at most 2^31 - 1.
bool launchable(int64_t rows, int64_t cols) {
  return rows > 0 && cols > 0 && cols / kThreads < 2147483647LL;
}

cudaError_t fwd_rows(const SwigluRows& a, DType dtype, cudaStream_t st) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  if (!launchable(a.rows, a.cols)) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat16: return launch_fwd<__half>(a, st);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(a, st);
    case DType::kFloat32: return launch_fwd<float>(a, st);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bwd_rows(const SwigluRows& a, const void* dout, int64_t dout_stride, void* dgate,
                     void* dup, int64_t grad_stride, DType dtype, cudaStream_t st) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  if (!launchable(a.rows, a.cols)) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat16: return launch_bwd<__half>(a, dout, dout_stride, dgate, dup, grad_stride, st);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(a, dout, dout_stride, dgate, dup, grad_stride, st);
    case DType::kFloat32: return launch_bwd<float>(a, dout, dout_stride, dgate, dup, grad_stride, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dtype,
                       cudaStream_t stream) {
  return fwd_rows(SwigluRows{gate, up, n, out, n, 1, n}, dtype, stream);
}

cudaError_t swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup,
                       int64_t n, DType dtype, cudaStream_t stream) {
  return bwd_rows(SwigluRows{gate, up, n, nullptr, n, 1, n}, dout, n, dgate, dup, n, dtype,
                  stream);
}

cudaError_t swiglu_packed_fwd(const void* x, int64_t rows, int64_t hidden, int64_t x_row_stride,
                              void* out, DType dtype, cudaStream_t stream) {
  const char* base = static_cast<const char*>(x);
  const void* up = base + hidden * elem_size(dtype);
  return fwd_rows(SwigluRows{x, up, x_row_stride, out, hidden, rows, hidden}, dtype, stream);
}

cudaError_t swiglu_packed_bwd(const void* dout, const void* x, int64_t rows, int64_t hidden,
                              int64_t x_row_stride, void* dx, DType dtype, cudaStream_t stream) {
  const char* base = static_cast<const char*>(x);
  char* dbase = static_cast<char*>(dx);
  const int64_t half = hidden * elem_size(dtype);
  return bwd_rows(SwigluRows{x, base + half, x_row_stride, nullptr, hidden, rows, hidden}, dout,
                  hidden, dx, dbase + half, 2 * hidden, dtype, stream);
}

}  // namespace cuda
}  // namespace fastlm
