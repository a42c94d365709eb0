// CUDA attention kernels. No torch headers: see kernels.h.
//
// Forward: FlashAttention-2 style. One CTA = 4 warps = BM (64) query rows of one (batch, head);
// each warp owns 16 rows. K/V tiles of BN (64) keys stream through shared memory with cp.async
// double buffering; S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
// fp32 accumulate) with operands fetched by ldmatrix from an XOR-swizzled (bank-conflict-free)
// layout; the online softmax (row max, row sum) stays in fp32 registers. Writes O and the row LSE.
//
// Backward: a simpler fp32 SIMT implementation (correct first): a delta = rowsum(dO * O) kernel,
// a dK/dV kernel (one CTA per block of keys of one kv head, looping over the query heads of its
// GQA group, so dK/dV need no atomics) and a dQ kernel (one CTA per block of query rows).
//
// Masking, ALiBi, GQA head mapping and the online-softmax bookkeeping come from
// csrc/attention_common.h, which the CPU kernels use too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../attention_common.h"
#include "kernels.h"

namespace fastlm {
namespace cuda {
namespace {

namespace at_ = ::fastlm::attn;

// ------------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills (rows past the end).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Element offset of (row, 8-element chunk) in a [rows][D] tile whose 16-byte chunks are XOR
// swizzled by row % 8: ldmatrix's 8 row addresses then hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copy rows [row0, row0 + ROWS) of a (T, D) matrix with row stride `rs` (elements) into a swizzled
// shared tile; rows >= n_rows are zero-filled.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t rs, int row0,
                                                int n_rows, int tid) {
  constexpr int CHUNKS = D / 8;
#pragma unroll
  for (int idx = tid; idx < ROWS * CHUNKS; idx += THREADS) {
    const int r = idx / CHUNKS, c = idx % CHUNKS;
    const bool ok = row0 + r < n_rows;
    const T* src = base + (ok ? (int64_t)(row0 + r) * rs : 0) + c * 8;
    cp_async_16(smem_u32(tile + swz<D>(r, c)), src, ok ? 16 : 0);
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
constexpr int FWD_BM = 64;
constexpr int FWD_BN = 64;
constexpr int FWD_WARPS = 4;
constexpr int FWD_THREADS = FWD_WARPS * 32;

template <int D>
constexpr int fwd_smem_elems() {
  return FWD_BM * D + 4 * FWD_BN * D;  // Q + 2 x K + 2 x V
}

template <typename T, int D>
__global__ void __launch_bounds__(FWD_THREADS)
    attention_fwd_kernel(const AttnParams p, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + FWD_BM * D;       // 2 buffers
  T* sV = sK + 2 * FWD_BN * D;   // 2 buffers

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // mma fragment coordinates
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int hk = (int)at_::kv_head(h, p.H, p.H_kv);
  const int m0 = blockIdx.x * FWD_BM;
  const int Tq = p.T_q, Tk = p.T_k;
  const int m_end = min(m0 + FWD_BM, Tq);

  const T* Qb = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* Kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* Vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const float slope = p.alibi ? p.alibi[h] : 0.0f;
  const bool has_alibi = p.alibi != nullptr;

  const int n_tiles = (int)at_::key_blocks_for_rows(m_end, Tq, Tk, p.causal, FWD_BN);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];
  const int row_a = m0 + warp * 16 + g;  // this thread's two rows: row_a, row_a + 8

  if (n_tiles > 0) {
    load_tile_async<T, FWD_BM, D, FWD_THREADS>(sQ, Qb, p.q_stride[2], m0, Tq, tid);
    load_tile_async<T, FWD_BN, D, FWD_THREADS>(sK, Kb, p.k_stride[2], 0, Tk, tid);
    load_tile_async<T, FWD_BN, D, FWD_THREADS>(sV, Vb, p.v_stride[2], 0, Tk, tid);
    cp_async_commit();
  }

  for (int n = 0; n < n_tiles; ++n) {
    const int buf = n & 1;
    if (n + 1 < n_tiles) {
      const int nb = buf ^ 1;
      load_tile_async<T, FWD_BN, D, FWD_THREADS>(sK + nb * FWD_BN * D, Kb, p.k_stride[2],
                                                 (n + 1) * FWD_BN, Tk, tid);
      load_tile_async<T, FWD_BN, D, FWD_THREADS>(sV + nb * FWD_BN * D, Vb, p.v_stride[2],
                                                 (n + 1) * FWD_BN, Tk, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (n == 0) {  // Q fragments stay in registers for the whole key loop
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int r = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        const int chunk = kk * 2 + lane / 16;
        ldmatrix_x4(qf[kk], smem_u32(sQ + swz<D>(r, chunk)));
      }
    }

    const T* tK = sK + buf * FWD_BN * D;
    const T* tV = sV + buf * FWD_BN * D;

    // S = Q K^T for this warp's 16 rows x 64 keys
    float s[FWD_BN / 8][4];
#pragma unroll
    for (int i = 0; i < FWD_BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int np = 0; np < FWD_BN / 16; ++np) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kb[4];
        const int key = np * 16 + (lane % 8) + (lane / 16) * 8;
        const int chunk = kk * 2 + (lane / 8) % 2;
        ldmatrix_x4(kb, smem_u32(tK + swz<D>(key, chunk)));
        Mma<T>::run(s[2 * np], qf[kk], kb[0], kb[1]);
        Mma<T>::run(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // scale, bias, mask; the fast path skips per-element masking for interior tiles
    const int j0 = n * FWD_BN;
    const bool interior = j0 + FWD_BN <= Tk &&
                          (!p.causal || j0 + FWD_BN - 1 <= m0 + (Tk - Tq)) && !has_alibi;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < FWD_BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row_a + (e >= 2 ? 8 : 0);
        const int j = j0 + nt * 8 + 2 * t4 + (e & 1);
        float val = interior ? s[nt][e] * p.scale
                             : at_::masked_score<float>(s[nt][e], p.scale, slope, i, j, Tq, Tk,
                                                        p.causal);
        s[nt][e] = val;
        mx[e >> 1] = fmaxf(mx[e >> 1], val);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      alpha[r] = at_::rescale_factor(m_run[r], m_new);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
    const float shift[2] = {at_::safe_max(m_run[0]), at_::safe_max(m_run[1])};
#pragma unroll
    for (int nt = 0; nt < FWD_BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = __expf(s[nt][e] - shift[e >> 1]);  // masked: exp(-inf) = 0
        s[nt][e] = pv;
        l_run[e >> 1] += pv;  // partial: this thread's columns; reduced over the quad at the end
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V: the S accumulator layout is the A-operand layout of the next mma
#pragma unroll
    for (int kk = 0; kk < FWD_BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        const int chunk = dp * 2 + lane / 16;
        ldmatrix_x4_trans(vb, smem_u32(tV + swz<D>(key, chunk)));
        Mma<T>::run(o[2 * dp], a, vb[0], vb[1]);
        Mma<T>::run(o[2 * dp + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // everyone is done with buffer `buf` before it is refilled
  }

  // finalize: full row sums, normalise, store O and LSE
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  const float inv[2] = {at_::inv_sum(l_run[0]), at_::inv_sum(l_run[1])};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_a + r * 8;
    if (i >= Tq) continue;
    T* orow = out + ((int64_t)bh * Tq + i) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t packed = Mma<T>::pack(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
      *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t4) = packed;
    }
    if (t4 == 0) lse[(int64_t)bh * Tq + i] = at_::row_lse(m_run[r], l_run[r]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward (fp32 SIMT)
// ------------------------------------------------------------------------------------------------
constexpr int BWD_BM = 32;  // query rows per tile
constexpr int BWD_BN = 32;  // keys per tile
constexpr int BWD_THREADS = 128;

// delta[b, h, i] = sum_d dO * O; one warp per row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const AttnBwdParams p) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  const int64_t rows = (int64_t)p.fwd.B * p.fwd.H * p.fwd.T_q;
  if (warp >= rows) return;
  const int i = warp % p.fwd.T_q, bh = warp / p.fwd.T_q, b = bh / p.fwd.H, h = bh % p.fwd.H;
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
  const T* d = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + i * p.do_stride[2];
  float acc = 0.f;
  for (int c = lane; c < p.fwd.D; c += 32) acc += to_f(o[c]) * to_f(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[warp] = acc;
}

template <int D>
struct BwdSmem {
  static constexpr int LD = D + 1;  // padded rows: conflict-free column walks
  static constexpr int elems = 4 * 32 * LD + 2 * 32 * (32 + 1) + 2 * 32;
};

// Load `rows` rows (row0..) of a strided (T, D) matrix into a padded fp32 tile; zero past n_rows.
template <typename T, int D>
__device__ __forceinline__ void load_f32(float* tile, const T* base, int64_t rs, int row0, int n_rows,
                                         int tid) {
  for (int idx = tid; idx < 32 * D; idx += BWD_THREADS) {
    const int r = idx / D, c = idx % D;
    tile[r * (D + 1) + c] = row0 + r < n_rows ? to_f(base[(int64_t)(row0 + r) * rs + c]) : 0.f;
  }
}

// P and dS of a (32 query rows) x (32 keys) tile from fp32 tiles in shared memory.
template <int D>
__device__ __forceinline__ void tile_p_ds(const float* sQ, const float* sDO, const float* sK,
                                          const float* sV, const float* sShift, const float* sDelta,
                                          float* sP, float* sDS, int i0, int j0, float scale,
                                          float slope, int Tq, int Tk, bool causal, int tid) {
  constexpr int LD = D + 1;
  for (int e = tid; e < 32 * 32; e += BWD_THREADS) {
    const int r = e / 32, c = e % 32;
    const int i = i0 + r, j = j0 + c;
    float p = 0.f, ds = 0.f;
    if (i < Tq && at_::is_visible(i, j, Tq, Tk, causal)) {
      float qk = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        qk += sQ[r * LD + d] * sK[c * LD + d];
        dp += sDO[r * LD + d] * sV[c * LD + d];
      }
      const float sc = at_::masked_score<float>(qk, scale, slope, i, j, Tq, Tk, causal);
      p = __expf(sc - sShift[r]);
      ds = p * (dp - sDelta[r]);
    }
    sP[r * 33 + c] = p;
    sDS[r * 33 + c] = ds;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BWD_THREADS) attention_bwd_dkdv_kernel(const AttnBwdParams p) {
  using S = BwdSmem<D>;
  constexpr int LD = S::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + 32 * LD;
  float* sQ = sV + 32 * LD;
  float* sDO = sQ + 32 * LD;
  float* sP = sDO + 32 * LD;
  float* sDS = sP + 32 * 33;
  float* sShift = sDS + 32 * 33;
  float* sDelta = sShift + 32;

  const AttnParams& f = p.fwd;
  const int tid = threadIdx.x;
  const int bhk = blockIdx.y, b = bhk / f.H_kv, hk = bhk % f.H_kv;
  const int j0 = blockIdx.x * BWD_BN;
  const int G = f.H / f.H_kv, Tq = f.T_q, Tk = f.T_k;

  // thread -> (head-dim column d, KPT consecutive keys starting at c0)
  constexpr int KPT = 32 * D / BWD_THREADS;
  const int d = tid % D, c0 = (tid / D) * KPT;
  float dk[KPT], dv[KPT];
#pragma unroll
  for (int x = 0; x < KPT; ++x) dk[x] = dv[x] = 0.f;

  load_f32<T, D>(sK, static_cast<const T*>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1],
                 f.k_stride[2], j0, Tk, tid);
  load_f32<T, D>(sV, static_cast<const T*>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1],
                 f.v_stride[2], j0, Tk, tid);

  const int i_first = (int)at_::first_row_seeing_key(j0, Tq, Tk, f.causal);
  for (int gi = 0; gi < G; ++gi) {
    const int h = hk * G + gi;
    const float slope = f.alibi ? f.alibi[h] : 0.f;
    const T* Qh = static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1];
    const T* DOh = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1];
    const int64_t row_base = ((int64_t)b * f.H + h) * Tq;
    for (int i0 = (i_first / BWD_BM) * BWD_BM; i0 < Tq; i0 += BWD_BM) {
      __syncthreads();  // previous tile fully consumed
      load_f32<T, D>(sQ, Qh, f.q_stride[2], i0, Tq, tid);
      load_f32<T, D>(sDO, DOh, p.do_stride[2], i0, Tq, tid);
      if (tid < 32) {
        const int i = i0 + tid;
        sShift[tid] = i < Tq ? at_::backward_shift(p.lse[row_base + i]) : INFINITY;
        sDelta[tid] = i < Tq ? p.delta[row_base + i] : 0.f;
      }
      __syncthreads();
      tile_p_ds<D>(sQ, sDO, sK, sV, sShift, sDelta, sP, sDS, i0, j0, f.scale, slope, Tq, Tk,
                   f.causal, tid);
      __syncthreads();
#pragma unroll 4
      for (int r = 0; r < BWD_BM; ++r) {
        const float qv = sQ[r * LD + d], dov = sDO[r * LD + d];
#pragma unroll
        for (int x = 0; x < KPT; ++x) {
          dv[x] += sP[r * 33 + c0 + x] * dov;
          dk[x] += sDS[r * 33 + c0 + x] * qv;
        }
      }
    }
  }
  T* dK = static_cast<T*>(p.dk) + ((int64_t)bhk * Tk) * D;
  T* dV = static_cast<T*>(p.dv) + ((int64_t)bhk * Tk) * D;
#pragma unroll
  for (int x = 0; x < KPT; ++x) {
    const int j = j0 + c0 + x;
    if (j < Tk) {
      dK[(int64_t)j * D + d] = from_f<T>(dk[x] * f.scale);
      dV[(int64_t)j * D + d] = from_f<T>(dv[x]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BWD_THREADS) attention_bwd_dq_kernel(const AttnBwdParams p) {
  using S = BwdSmem<D>;
  constexpr int LD = S::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + 32 * LD;
  float* sQ = sV + 32 * LD;
  float* sDO = sQ + 32 * LD;
  float* sP = sDO + 32 * LD;
  float* sDS = sP + 32 * 33;
  float* sShift = sDS + 32 * 33;
  float* sDelta = sShift + 32;

  const AttnParams& f = p.fwd;
  const int tid = threadIdx.x;
  const int bh = blockIdx.y, b = bh / f.H, h = bh % f.H;
  const int hk = (int)at_::kv_head(h, f.H, f.H_kv);
  const int i0 = blockIdx.x * BWD_BM;
  const int Tq = f.T_q, Tk = f.T_k;
  const float slope = f.alibi ? f.alibi[h] : 0.f;
  const int64_t row_base = (int64_t)bh * Tq;

  constexpr int RPT = 32 * D / BWD_THREADS;  // rows per thread
  const int d = tid % D, r0 = (tid / D) * RPT;
  float dq[RPT];
#pragma unroll
  for (int x = 0; x < RPT; ++x) dq[x] = 0.f;

  load_f32<T, D>(sQ, static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1],
                 f.q_stride[2], i0, Tq, tid);
  load_f32<T, D>(sDO, static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1],
                 p.do_stride[2], i0, Tq, tid);
  if (tid < 32) {
    const int i = i0 + tid;
    sShift[tid] = i < Tq ? at_::backward_shift(p.lse[row_base + i]) : INFINITY;
    sDelta[tid] = i < Tq ? p.delta[row_base + i] : 0.f;
  }
  const T* Kh = static_cast<const T*>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1];
  const T* Vh = static_cast<const T*>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1];
  const int last_row = min(i0 + BWD_BM, Tq) - 1;
  const int k_end = (int)at_::key_end(last_row, Tq, Tk, f.causal);
  for (int j0 = 0; j0 < k_end; j0 += BWD_BN) {
    __syncthreads();
    load_f32<T, D>(sK, Kh, f.k_stride[2], j0, Tk, tid);
    load_f32<T, D>(sV, Vh, f.v_stride[2], j0, Tk, tid);
    __syncthreads();
    tile_p_ds<D>(sQ, sDO, sK, sV, sShift, sDelta, sP, sDS, i0, j0, f.scale, slope, Tq, Tk,
                 f.causal, tid);
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < BWD_BN; ++c) {
      const float kv = sK[c * LD + d];
#pragma unroll
      for (int x = 0; x < RPT; ++x) dq[x] += sDS[(r0 + x) * 33 + c] * kv;
    }
  }
  T* dQ = static_cast<T*>(p.dq) + row_base * D;
#pragma unroll
  for (int x = 0; x < RPT; ++x) {
    const int i = i0 + r0 + x;
    if (i < Tq) dQ[(int64_t)i * D + d] = from_f<T>(dq[x] * f.scale);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
template <typename T, int D>
cudaError_t launch_fwd(const AttnParams& p, void* out, float* lse, cudaStream_t st) {
  const size_t smem = fwd_smem_elems<D>() * sizeof(T);
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid((p.T_q + FWD_BM - 1) / FWD_BM, p.B * p.H);
  kernel<<<grid, FWD_THREADS, smem, st>>>(p, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const AttnBwdParams& p, cudaStream_t st) {
  const AttnParams& f = p.fwd;
  const int64_t rows = (int64_t)f.B * f.H * f.T_q;
  const int delta_threads = 256;
  attention_bwd_delta_kernel<T><<<(unsigned)((rows * 32 + delta_threads - 1) / delta_threads),
                                  delta_threads, 0, st>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = BwdSmem<D>::elems * sizeof(float);
  auto dkdv = attention_bwd_dkdv_kernel<T, D>;
  auto dq = attention_bwd_dq_kernel<T, D>;
  if ((err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) != cudaSuccess) return err;
  if ((err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) != cudaSuccess) return err;
  dkdv<<<dim3((f.T_k + BWD_BN - 1) / BWD_BN, f.B * f.H_kv), BWD_THREADS, smem, st>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  dq<<<dim3((f.T_q + BWD_BM - 1) / BWD_BM, f.B * f.H), BWD_THREADS, smem, st>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_by_dim(const AttnParams& p, void* out, float* lse, cudaStream_t st) {
  switch (p.D) {
    case 64: return launch_fwd<T, 64>(p, out, lse, st);
    case 128: return launch_fwd<T, 128>(p, out, lse, st);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bwd_by_dim(const AttnBwdParams& p, cudaStream_t st) {
  switch (p.fwd.D) {
    case 64: return launch_bwd<T, 64>(p, st);
    case 128: return launch_bwd<T, 128>(p, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_fwd(const AttnParams& p, DType dtype, void* out, float* lse,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return fwd_by_dim<__half>(p, out, lse, stream);
    case DType::kBFloat16: return fwd_by_dim<__nv_bfloat16>(p, out, lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_bwd(const AttnBwdParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return bwd_by_dim<__half>(p, stream);
    case DType::kBFloat16: return bwd_by_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastlm
