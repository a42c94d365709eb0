// CUDA attention kernels. No torch headers: see kernels.h.
//
// All matrix products run on tensor cores: mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate) with
// operands fetched by ldmatrix from XOR-swizzled (bank-conflict-free) shared tiles filled by
// cp.async with double buffering. Softmax statistics stay in fp32 registers, in log2 units: a
// score is t = qk * scale * log2(e) (+ ALiBi bias * log2(e)) and every exponential is one ex2, with
// the scale folded into the FMA that forms its argument on unmasked tiles (attention_common.h).
//
// Forward (FlashAttention-2): one CTA = 8 warps = 128 query rows of one (batch, head), 16 rows per
// warp; 64-key K/V tiles stream through shared memory; online softmax; writes O and the row LSE.
// The grid is (batch * heads, query blocks) with the query blocks reversed when causal, so the
// heaviest blocks (the last rows see the most keys) are launched first.
//
// Backward (FlashAttention-2 structure, no atomics):
//   1. delta = rowsum(dO * O), one warp per row;
//   2. dK/dV: one CTA = 4 warps = 64 keys of one (batch, kv head), 16 keys per warp; loops over the
//      query heads of its GQA group and their query blocks, computing S^T = K Q^T and
//      dP^T = V dO^T, then P^T = exp2(S^T - lse), dS^T = P^T (dP^T - delta), dV += P^T dO and
//      dK += dS^T Q, all in registers;
//   3. dQ: one CTA = 4 warps = 64 query rows of one (batch, head); loops over key blocks:
//      S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K (heaviest causal blocks first).
//
// Masks (causal, sliding window, documents) give each query row one interval of keys
// (attn::row_keys): a CTA visits only the key tiles of its rows' union (forward, dQ) or only the
// query blocks that see its keys (dK/dV); per warp, a tile is skipped when no pair is visible,
// masked per element when some are, and plain when all are, judged from the key ranges of its first
// and last rows, which each CTA keeps in shared memory (lo/hi per row).
// Masking, ALiBi, GQA head mapping, block order and the online-softmax bookkeeping come from
// csrc/attention_common.h, which the CPU kernels and tests/test_attention_common.py use too.
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
// PTX helpers. With FASTLM_HOST_SIM (tests/test_cuda_host_sim.py compiles this file as host C++)
// tests/csrc/cuda_host_sim.h provides host versions that run a CTA's threads cooperatively and
// implement ldmatrix / mma.sync / shuffles from their PTX ISA definitions.
// ------------------------------------------------------------------------------------------------
#if !defined(FASTLM_HOST_SIM)
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

// 2^x in one MUFU.EX2 (2^-inf = 0, NaN stays NaN).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// c += a * b on tensor cores: m16n8k16, fp16 or bf16 operands, fp32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#else
using ::fastlm_sim::cp_async_16;
using ::fastlm_sim::cp_async_commit;
using ::fastlm_sim::cp_async_wait;
using ::fastlm_sim::ex2;
using ::fastlm_sim::ldmatrix_x4;
using ::fastlm_sim::ldmatrix_x4_trans;
using ::fastlm_sim::mma_16816;
using ::fastlm_sim::smem_u32;
alignas(16) unsigned char smem_raw[::fastlm_sim::kSmemBytes];  // the one CTA that runs at a time
#endif

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_16816<false>(c, a, b0, b1);
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
    mma_16816<true>(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

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
// Warp-level GEMM pieces. Fragment layouts of mma.sync.m16n8k16.row.col (PTX ISA), for the thread
// `lane` of a warp with g = lane / 4 and t = lane % 4, each register holding two 16-bit values:
//   A (16 x 16, row-major):  a0 = (row g, k 2t..2t+1)   a1 = (row g+8, k 2t..2t+1)
//                            a2 = (row g, k 2t+8..2t+9) a3 = (row g+8, k 2t+8..2t+9)
//   B (16 x 8, col-major):   b0 = (k 2t..2t+1, col g)   b1 = (k 2t+8..2t+9, col g)
//   C (16 x 8, fp32):        c0, c1 = (row g, col 2t..2t+1)   c2, c3 = (row g+8, col 2t..2t+1)
// So the C tiles of a 16 x 16 block (n-tiles 2k and 2k+1), packed to 16 bits, are exactly the A
// fragment of k-step k of the next product: P (or dS) never leaves registers.
// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register m of every lane
// then holds (row g, cols 2t..2t+1) of matrix m (with .trans: (rows 2t..2t+1, col g)).
// ------------------------------------------------------------------------------------------------

// A fragment of rows [row0, row0 + 16), k-step kk, of a swizzled [rows][D] tile.
// Matrices 0..3 = (rows +0, k +0), (rows +8, k +0), (rows +0, k +8), (rows +8, k +8).
template <typename T, int D>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int row0, int kk, int lane) {
  const int r = row0 + (lane % 8) + ((lane / 8) % 2) * 8;
  ldmatrix_x4(a, smem_u32(tile + swz<D>(r, kk * 2 + lane / 16)));
}

// One k-step of C[16 x N] += A[16 x D] * B^T, B an [N][D] swizzled tile (S = Q K^T: B = K). A row
// of B is a column of the col-major operand, so ldmatrix needs no .trans; matrices 0..3 =
// (n +0, k +0), (n +0, k +8), (n +8, k +0), (n +8, k +8) give b0/b1 of n-tiles 2np and 2np + 1.
template <typename T, int D, int N>
__device__ __forceinline__ void mma_abt_step(float (&c)[N / 8][4], const uint32_t (&a)[4],
                                             const T* tB, int kk, int lane) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    uint32_t b[4];
    const int n = np * 16 + (lane % 8) + (lane / 16) * 8;
    ldmatrix_x4(b, smem_u32(tB + swz<D>(n, kk * 2 + (lane / 8) % 2)));
    Mma<T>::run(c[2 * np], a, b[0], b[1]);
    Mma<T>::run(c[2 * np + 1], a, b[2], b[3]);
  }
}

// C[16 x N] += A * B^T with the A rows [a_row0, a_row0 + 16) read from a swizzled [rows][D] tile.
// The k loop stays rolled: its index only moves shared addresses, and unrolling it would keep one
// register per (k-step, operand) address live next to the accumulators (spills at D = 128).
template <typename T, int D, int N>
__device__ __forceinline__ void mma_abt_smem(float (&c)[N / 8][4], const T* tA, int a_row0,
                                             const T* tB, int lane) {
#pragma unroll 1
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldsm_a<T, D>(a, tA, a_row0, kk, lane);
    mma_abt_step<T, D, N>(c, a, tB, kk, lane);
  }
}

// acc[16 x D] += P[16 x K] * V, P in C-fragment registers, V a swizzled [K][D] tile (O += P V).
// V rows are the k index of a col-major B, so ldmatrix.trans; matrices 0..3 = (k +0, n +0),
// (k +8, n +0), (k +0, n +8), (k +8, n +8) give b0/b1 of d-tiles 2dp and 2dp + 1.
template <typename T, int D, int K>
__device__ __forceinline__ void mma_pv(float (&acc)[D / 8][4], const float (&p)[K / 8][4],
                                       const T* tV, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    a[0] = Mma<T>::pack(p[2 * kk][0], p[2 * kk][1]);
    a[1] = Mma<T>::pack(p[2 * kk][2], p[2 * kk][3]);
    a[2] = Mma<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = Mma<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
      ldmatrix_x4_trans(b, smem_u32(tV + swz<D>(key, dp * 2 + lane / 16)));
      Mma<T>::run(acc[2 * dp], a, b[0], b[1]);
      Mma<T>::run(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// ------------------------------------------------------------------------------------------------
// Masks
// ------------------------------------------------------------------------------------------------
// The mask of batch b.
__device__ __forceinline__ at_::Mask mask_of(const AttnParams& p, int b) {
  return at_::Mask{p.T_q, p.T_k, p.causal, p.window, p.doc ? p.doc + (int64_t)b * 2 * p.T_k : nullptr};
}

// The key ranges of the query rows [i0, i0 + n) into shared lo/hi (threads tid < n; rows past T_q get
// the empty range). Positions fit in int: T_q, T_k <= kMaxAttnSeqLen.
__device__ __forceinline__ void store_row_keys(int* lo, int* hi, int i0, int n, const at_::Mask& m,
                                               int tid) {
  if (tid < n) {
    const at_::KeyRange r = at_::row_keys(i0 + tid, m);
    lo[tid] = (int)r.lo;
    hi[tid] = (int)r.hi;
  }
}

// What a warp does with the key tile [j0, j1) against its rows [r0, r0 + n) (indices into lo/hi;
// n = the rows inside T_q, <= 0: none): skip it, mask it per element, or take it plain.
enum TileKind { kSkip, kMasked, kPlain };

__device__ __forceinline__ TileKind tile_kind(const int* lo, const int* hi, int r0, int n, int j0,
                                              int j1) {
  if (n <= 0) return kSkip;
  const at_::KeyRange first{lo[r0], hi[r0]}, last{lo[r0 + n - 1], hi[r0 + n - 1]};
  if (at_::tile_masked(first, last, j0, j1)) return kSkip;
  return at_::tile_visible(first, last, j0, j1) ? kPlain : kMasked;
}

// Store rows (row0 + g, row0 + g + 8) of a [16 x D] C-fragment accumulator, times `mul`, into a
// contiguous [n_rows][D] matrix; rows >= n_rows are dropped.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* dst, const float (&acc)[D / 8][4], int row0,
                                           int n_rows, const float (&mul)[2], int lane) {
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + g + 8 * r;
    if (i >= n_rows) continue;
    T* row = dst + (int64_t)i * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t4) =
          Mma<T>::pack(acc[dt][2 * r] * mul[r], acc[dt][2 * r + 1] * mul[r]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
constexpr int FWD_BM = 128;
constexpr int FWD_BN = 64;
constexpr int FWD_WARPS = FWD_BM / 16;
constexpr int FWD_THREADS = FWD_WARPS * 32;

template <typename T, int D>
constexpr size_t fwd_smem_bytes() {  // Q + 2 x K + 2 x V, then the rows' key ranges (lo, hi)
  return (FWD_BM * D + 4 * FWD_BN * D) * sizeof(T) + 2 * FWD_BM * sizeof(int);
}

// Online-softmax state of the two rows (g, g + 8) a thread holds, in log2 units.
struct RowStats {
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
};

// Scores of one 16 x 64 tile -> probabilities (in place), updating the row stats and rescaling o.
// `coef` is scale * log2(e) on plain tiles (s holds raw qk) and 1 on masked ones (s holds t).
template <int D>
__device__ __forceinline__ void softmax_tile(float (&s)[FWD_BN / 8][4], float (&o)[D / 8][4],
                                             RowStats& st, float coef) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < FWD_BN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
  }
  float alpha[2], shift[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the 4 threads of a quad share a row
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(st.m[r], mx[r] * coef);  // coef > 0 keeps the argmax
    alpha[r] = at_::rescale_factor_log2(st.m[r], m_new);
    st.m[r] = m_new;
    st.l[r] *= alpha[r];
    shift[r] = at_::safe_max(m_new);
  }
#pragma unroll
  for (int nt = 0; nt < FWD_BN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = ex2(at_::exp2_arg(s[nt][e], coef, shift[e >> 1]));  // masked: 2^-inf = 0
      st.l[e >> 1] += s[nt][e];  // this thread's columns; summed over the quad at the end
    }
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    o[dt][0] *= alpha[0];
    o[dt][1] *= alpha[0];
    o[dt][2] *= alpha[1];
    o[dt][3] *= alpha[1];
  }
}

// Replace raw qk by masked, biased log2-unit scores for the rows wm0 + g (+8), keys j0 + col; lo/hi
// hold the key ranges of the warp's 16 rows.
__device__ __forceinline__ void mask_tile_fwd(float (&s)[FWD_BN / 8][4], const AttnParams& p,
                                              float scale_log2, float slope_log2, int wm0, int j0,
                                              const int* lo, const int* hi, int lane) {
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >= 2 ? 8 : 0);
    const at_::KeyRange keys{lo[r], hi[r]};
#pragma unroll
    for (int nt = 0; nt < FWD_BN / 8; ++nt) {
      const int j = j0 + nt * 8 + 2 * t4 + (e & 1);
      s[nt][e] = at_::masked_score_log2<float>(s[nt][e], scale_log2, slope_log2, wm0 + r, j, p.T_q,
                                               p.T_k, keys);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(FWD_THREADS)
    attention_fwd_kernel(const AttnParams p, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + FWD_BM * D;      // 2 buffers
  T* sV = sK + 2 * FWD_BN * D;  // 2 buffers
  int* sLo = reinterpret_cast<int*>(sV + 2 * FWD_BN * D);  // the key range of each row
  int* sHi = sLo + FWD_BM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int hk = (int)at_::kv_head(h, p.H, p.H_kv);
  const int m0 = (int)at_::block_for_slot(blockIdx.y, gridDim.y, p.causal) * FWD_BM;
  const int wm0 = m0 + warp * 16;  // this warp's 16 rows
  const int Tq = p.T_q, Tk = p.T_k;

  const T* Qb = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* Kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* Vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const float scale_log2 = p.scale * (float)at_::kLog2e;
  const float slope_log2 = p.alibi ? p.alibi[h] * (float)at_::kLog2e : 0.f;
  const bool plain_ok = p.alibi == nullptr && p.scale > 0.f;  // raw-qk row max is the true max

  const at_::Mask mask = mask_of(p, b);
  store_row_keys(sLo, sHi, m0, FWD_BM, mask, tid);
  const at_::KeyRange keys = at_::block_keys(m0, m0 + FWD_BM, mask);  // tiles outside: never visited
  const int k0 = (int)keys.lo, n_tiles = (int)((keys.hi - keys.lo + FWD_BN - 1) / FWD_BN);
  const int w_rows = min(16, Tq - wm0);  // this warp's rows inside T_q
  float o[D / 8][4];
  zero(o);
  RowStats st;
  uint32_t qf[D / 16][4];  // Q fragments stay in registers for the whole key loop

  if (n_tiles > 0) {
    load_tile_async<T, FWD_BM, D, FWD_THREADS>(sQ, Qb, p.q_stride[2], m0, Tq, tid);
    load_tile_async<T, FWD_BN, D, FWD_THREADS>(sK, Kb, p.k_stride[2], k0, Tk, tid);
    load_tile_async<T, FWD_BN, D, FWD_THREADS>(sV, Vb, p.v_stride[2], k0, Tk, tid);
    cp_async_commit();
  }
  for (int n = 0; n < n_tiles; ++n) {
    const int buf = n & 1;
    if (n + 1 < n_tiles) {
      const int nb = buf ^ 1;
      load_tile_async<T, FWD_BN, D, FWD_THREADS>(sK + nb * FWD_BN * D, Kb, p.k_stride[2],
                                                 k0 + (n + 1) * FWD_BN, Tk, tid);
      load_tile_async<T, FWD_BN, D, FWD_THREADS>(sV + nb * FWD_BN * D, Vb, p.v_stride[2],
                                                 k0 + (n + 1) * FWD_BN, Tk, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (n == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_a<T, D>(qf[kk], sQ, warp * 16, kk, lane);
    }
    const int j0 = k0 + n * FWD_BN;
    const TileKind kind = tile_kind(sLo, sHi, warp * 16, w_rows, j0, j0 + FWD_BN);
    if (kind != kSkip) {  // warp-uniform
      float s[FWD_BN / 8][4];
      zero(s);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        mma_abt_step<T, D, FWD_BN>(s, qf[kk], sK + buf * FWD_BN * D, kk, lane);
      const bool plain = plain_ok && kind == kPlain;
      if (!plain) {
        mask_tile_fwd(s, p, scale_log2, slope_log2, wm0, j0, sLo + warp * 16, sHi + warp * 16, lane);
      }
      softmax_tile<D>(s, o, st, plain ? scale_log2 : 1.f);
      mma_pv<T, D, FWD_BN>(o, s, sV + buf * FWD_BN * D, lane);
    }
    __syncthreads();  // everyone is done with buffer `buf` before it is refilled
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
    inv[r] = at_::inv_sum(st.l[r]);
  }
  store_rows<T, D>(out + (int64_t)bh * Tq * D, o, wm0, Tq, inv, lane);
  const int g = lane / 4;
  if (lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = wm0 + g + 8 * r;
      if (i < Tq) lse[(int64_t)bh * Tq + i] = at_::row_lse_from_log2(st.m[r], st.l[r]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
constexpr int BWD_WARPS = 4;
constexpr int BWD_THREADS = BWD_WARPS * 32;
constexpr int BWD_BN = 64;  // keys per dK/dV CTA and per dQ key tile
constexpr int BWD_BM = 64;  // query rows per dQ CTA

// Query rows per dK/dV step: 32 at D = 128 keeps S^T, dP^T, dK and dV in registers without spills.
template <int D>
constexpr int dkdv_bq() {
  return D == 128 ? 32 : 64;
}

template <typename T, int D>
constexpr size_t dkdv_smem_bytes() {  // K, V + 2 x (Q, dO) + 2 x (shift, delta) + 2 x (lo, hi)
  return (2 * BWD_BN * D + 4 * dkdv_bq<D>() * D) * sizeof(T) + 4 * dkdv_bq<D>() * sizeof(float) +
         4 * dkdv_bq<D>() * sizeof(int);
}

template <typename T, int D>
constexpr size_t dq_smem_bytes() {  // Q, dO + 2 x (K, V) + (lo, hi) of the rows
  return (2 * BWD_BM * D + 4 * BWD_BN * D) * sizeof(T) + 2 * BWD_BM * sizeof(int);
}

// delta[b, h, i] = sum_d dO * O; one warp per row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const AttnBwdParams p) {
  const int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= (int64_t)p.fwd.B * p.fwd.H * p.fwd.T_q) return;
  const int64_t i = row % p.fwd.T_q, bh = row / p.fwd.T_q, b = bh / p.fwd.H, h = bh % p.fwd.H;
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
  const T* d = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + i * p.do_stride[2];
  float acc = 0.f;
  for (int c = lane; c < p.fwd.D; c += 32) acc += to_f(o[c]) * to_f(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc;
}

// Probabilities and score gradients of one warp tile (16 rows from row0, NT * 8 columns from
// col0), in place: s holds raw qk and becomes P, dp holds dO . v and becomes dS = P (dp - delta).
// kQueryIsRow: rows are queries (dQ kernel, shift/delta indexed by the thread's row r = 0, 1, lo/hi
// by 8 r from the thread's first row) or columns are (dK/dV kernel, transposed tile; shift, delta,
// lo and hi indexed by the tile column). shift is lse * log2(e) per query (+inf for rows that see
// nothing), delta = rowsum(dO * O), [lo, hi) the query's keys.
struct BwdTile {
  int t_q, t_k;
  float scale_log2, slope_log2;
  bool plain;  // no masking, no ALiBi: the scale folds into the exp2 FMA
};

template <int NT, bool kQueryIsRow>
__device__ __forceinline__ void probs_and_dscores(float (&s)[NT][4], float (&dp)[NT][4],
                                                  const BwdTile& t, int row0, int col0,
                                                  const float* shift, const float* delta,
                                                  const int* lo, const int* hi, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  const float coef = t.plain ? t.scale_log2 : 1.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rl = g + (e >= 2 ? 8 : 0), cl = nt * 8 + 2 * t4 + (e & 1);  // tile-local
      const int ql = kQueryIsRow ? (e >> 1) : cl;  // index into shift/delta
      const int i = kQueryIsRow ? row0 + rl : col0 + cl, j = kQueryIsRow ? col0 + cl : row0 + rl;
      float x = s[nt][e];
      if (!t.plain) {
        const int kq = kQueryIsRow ? (e >> 1) * 8 : cl;
        x = at_::masked_score_log2<float>(x, t.scale_log2, t.slope_log2, i, j, t.t_q, t.t_k,
                                          at_::KeyRange{lo[kq], hi[kq]});
      }
      const float pr = ex2(at_::exp2_arg(x, coef, shift[ql]));  // masked or empty row: 0
      s[nt][e] = pr;
      dp[nt][e] = pr * (dp[nt][e] - delta[ql]);
    }
  }
}

// Shared operands of the dK/dV loop, two buffers each: Q and dO tiles, and per query row the
// shift, delta and key range.
template <typename T>
struct DkdvSmem {
  T* q;
  T* dout;
  float* shift;
  float* delta;
  int* lo;
  int* hi;
};

// Loads the step-`it` operands of the dK/dV loop (query head hk * G + it / n_qb, query block
// q_first + it % n_qb) into buffer `buf`.
template <typename T, int D>
__device__ __forceinline__ void dkdv_load_step(const AttnBwdParams& p, const at_::Mask& mask, int b,
                                               int hk, int it, int q_first, int n_qb, int buf,
                                               const DkdvSmem<T>& sm, int tid) {
  constexpr int BQ = dkdv_bq<D>();
  const AttnParams& f = p.fwd;
  const int h = hk * (f.H / f.H_kv) + it / n_qb, i0 = (q_first + it % n_qb) * BQ;
  load_tile_async<T, BQ, D, BWD_THREADS>(
      sm.q + buf * BQ * D, static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1],
      f.q_stride[2], i0, f.T_q, tid);
  load_tile_async<T, BQ, D, BWD_THREADS>(
      sm.dout + buf * BQ * D,
      static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1], p.do_stride[2], i0,
      f.T_q, tid);
  cp_async_commit();
  if (tid < BQ) {
    const int i = i0 + tid;
    const int64_t row = ((int64_t)b * f.H + h) * f.T_q + i;
    sm.shift[buf * BQ + tid] =
        i < f.T_q ? at_::backward_shift(p.lse[row]) * (float)at_::kLog2e : INFINITY;
    sm.delta[buf * BQ + tid] = i < f.T_q ? p.delta[row] : 0.f;
  }
  store_row_keys(sm.lo + buf * BQ, sm.hi + buf * BQ, i0, BQ, mask, tid);
}

template <typename T, int D>
__global__ void __launch_bounds__(BWD_THREADS) attention_bwd_dkdv_kernel(const AttnBwdParams p) {
  constexpr int BQ = dkdv_bq<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BWD_BN * D;
  DkdvSmem<T> sm;
  sm.q = sV + BWD_BN * D;           // 2 buffers each from here
  sm.dout = sm.q + 2 * BQ * D;
  sm.shift = reinterpret_cast<float*>(sm.dout + 2 * BQ * D);
  sm.delta = sm.shift + 2 * BQ;
  sm.lo = reinterpret_cast<int*>(sm.delta + 2 * BQ);
  sm.hi = sm.lo + 2 * BQ;

  const AttnParams& f = p.fwd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bhk = blockIdx.x, b = bhk / f.H_kv, hk = bhk % f.H_kv;
  const int j0 = blockIdx.y * BWD_BN, kw0 = j0 + warp * 16;  // this warp's 16 keys
  const int Tq = f.T_q, Tk = f.T_k, G = f.H / f.H_kv;
  // the query rows that see one of this CTA's keys: blocks of BQ from q_first (none: dK = dV = 0)
  const at_::Mask mask = mask_of(f, b);
  const int r_first = (int)at_::first_row_seeing(j0, mask);
  const int r_end = (int)at_::end_row_seeing(min(j0 + BWD_BN, Tk), mask);
  const int q_first = r_first / BQ;
  const int n_qb = r_end > r_first ? (r_end + BQ - 1) / BQ - q_first : 0;
  const int n_steps = G * n_qb;

  if (n_steps > 0) {
    load_tile_async<T, BWD_BN, D, BWD_THREADS>(
        sK, static_cast<const T*>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1], f.k_stride[2], j0,
        Tk, tid);
    load_tile_async<T, BWD_BN, D, BWD_THREADS>(
        sV, static_cast<const T*>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1], f.v_stride[2], j0,
        Tk, tid);
    dkdv_load_step<T, D>(p, mask, b, hk, 0, q_first, n_qb, 0, sm, tid);
  }

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  BwdTile tile{Tq, Tk, f.scale * (float)at_::kLog2e, 0.f, false};
  for (int it = 0; it < n_steps; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_steps) {
      dkdv_load_step<T, D>(p, mask, b, hk, it + 1, q_first, n_qb, buf ^ 1, sm, tid);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int h = hk * G + it / n_qb, i0 = (q_first + it % n_qb) * BQ;
    const int* lo = sm.lo + buf * BQ;
    const int* hi = sm.hi + buf * BQ;
    const TileKind kind = tile_kind(lo, hi, 0, min(BQ, Tq - i0), kw0, kw0 + 16);
    if (kind != kSkip) {
      const T* tQ = sm.q + buf * BQ * D;
      const T* tDO = sm.dout + buf * BQ * D;
      float st[BQ / 8][4], dpt[BQ / 8][4];  // S^T and dP^T: 16 keys x BQ queries
      zero(st);
      zero(dpt);
      mma_abt_smem<T, D, BQ>(st, sK, warp * 16, tQ, lane);
      mma_abt_smem<T, D, BQ>(dpt, sV, warp * 16, tDO, lane);
      tile.slope_log2 = f.alibi ? f.alibi[h] * (float)at_::kLog2e : 0.f;
      tile.plain = !f.alibi && kind == kPlain;
      probs_and_dscores<BQ / 8, false>(st, dpt, tile, kw0, i0, sm.shift + buf * BQ,
                                       sm.delta + buf * BQ, lo, hi, lane);
      mma_pv<T, D, BQ>(dv, st, tDO, lane);  // dV += P^T dO
      mma_pv<T, D, BQ>(dk, dpt, tQ, lane);  // dK += dS^T Q
    }
    __syncthreads();  // buffer `buf` is refilled by the next step
  }
  const int64_t base = (int64_t)bhk * Tk * D;
  const float kscale[2] = {f.scale, f.scale}, one[2] = {1.f, 1.f};
  store_rows<T, D>(static_cast<T*>(p.dk) + base, dk, kw0, Tk, kscale, lane);
  store_rows<T, D>(static_cast<T*>(p.dv) + base, dv, kw0, Tk, one, lane);
}

template <typename T, int D>
__global__ void __launch_bounds__(BWD_THREADS) attention_bwd_dq_kernel(const AttnBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sDO = sQ + BWD_BM * D;
  T* sK = sDO + BWD_BM * D;      // 2 buffers
  T* sV = sK + 2 * BWD_BN * D;   // 2 buffers
  int* sLo = reinterpret_cast<int*>(sV + 2 * BWD_BN * D);  // the key range of each row
  int* sHi = sLo + BWD_BM;

  const AttnParams& f = p.fwd;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4;
  const int bh = blockIdx.x, b = bh / f.H, h = bh % f.H;
  const int hk = (int)at_::kv_head(h, f.H, f.H_kv);
  const int m0 = (int)at_::block_for_slot(blockIdx.y, gridDim.y, f.causal) * BWD_BM;
  const int wm0 = m0 + warp * 16;
  const int Tq = f.T_q, Tk = f.T_k;
  const int64_t row_base = (int64_t)bh * Tq;

  float shift[2], delta[2];  // of this thread's rows wm0 + g, wm0 + g + 8
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = wm0 + g + 8 * r;
    shift[r] = i < Tq ? at_::backward_shift(p.lse[row_base + i]) * (float)at_::kLog2e : INFINITY;
    delta[r] = i < Tq ? p.delta[row_base + i] : 0.f;
  }
  const T* Kb = static_cast<const T*>(f.k) + b * f.k_stride[0] + hk * f.k_stride[1];
  const T* Vb = static_cast<const T*>(f.v) + b * f.v_stride[0] + hk * f.v_stride[1];
  const at_::Mask mask = mask_of(f, b);
  store_row_keys(sLo, sHi, m0, BWD_BM, mask, tid);
  const at_::KeyRange keys = at_::block_keys(m0, m0 + BWD_BM, mask);  // tiles outside: never visited
  const int k0 = (int)keys.lo, n_tiles = (int)((keys.hi - keys.lo + BWD_BN - 1) / BWD_BN);
  const int w_rows = min(16, Tq - wm0);  // this warp's rows inside T_q
  if (n_tiles > 0) {
    load_tile_async<T, BWD_BM, D, BWD_THREADS>(
        sQ, static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1], f.q_stride[2], m0,
        Tq, tid);
    load_tile_async<T, BWD_BM, D, BWD_THREADS>(
        sDO, static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1],
        p.do_stride[2], m0, Tq, tid);
    load_tile_async<T, BWD_BN, D, BWD_THREADS>(sK, Kb, f.k_stride[2], k0, Tk, tid);
    load_tile_async<T, BWD_BN, D, BWD_THREADS>(sV, Vb, f.v_stride[2], k0, Tk, tid);
    cp_async_commit();
  }
  float dq[D / 8][4];
  zero(dq);
  BwdTile tile{Tq, Tk, f.scale * (float)at_::kLog2e,
               f.alibi ? f.alibi[h] * (float)at_::kLog2e : 0.f, false};
  for (int n = 0; n < n_tiles; ++n) {
    const int buf = n & 1;
    if (n + 1 < n_tiles) {
      const int nb = buf ^ 1;
      load_tile_async<T, BWD_BN, D, BWD_THREADS>(sK + nb * BWD_BN * D, Kb, f.k_stride[2],
                                                 k0 + (n + 1) * BWD_BN, Tk, tid);
      load_tile_async<T, BWD_BN, D, BWD_THREADS>(sV + nb * BWD_BN * D, Vb, f.v_stride[2],
                                                 k0 + (n + 1) * BWD_BN, Tk, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int j0 = k0 + n * BWD_BN;
    const TileKind kind = tile_kind(sLo, sHi, warp * 16, w_rows, j0, j0 + BWD_BN);
    if (kind != kSkip) {
      const T* tK = sK + buf * BWD_BN * D;
      float s[BWD_BN / 8][4], dp[BWD_BN / 8][4];
      zero(s);
      zero(dp);
      mma_abt_smem<T, D, BWD_BN>(s, sQ, warp * 16, tK, lane);
      mma_abt_smem<T, D, BWD_BN>(dp, sDO, warp * 16, sV + buf * BWD_BN * D, lane);
      tile.plain = !f.alibi && kind == kPlain;
      probs_and_dscores<BWD_BN / 8, true>(s, dp, tile, wm0, j0, shift, delta,
                                          sLo + warp * 16 + g, sHi + warp * 16 + g, lane);
      mma_pv<T, D, BWD_BN>(dq, dp, tK, lane);  // dQ += dS K
    }
    __syncthreads();
  }
  const float qscale[2] = {f.scale, f.scale};
  store_rows<T, D>(static_cast<T*>(p.dq) + row_base * D, dq, wm0, Tq, qscale, lane);
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
// Launches `kernel` on `st` with `smem` bytes of dynamic shared memory (in the host simulator of
// tests/test_cuda_host_sim.py: runs it CTA by CTA on the CPU, with the same grid and block).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                   Args... args) {
#if defined(FASTLM_HOST_SIM)
  (void)st;
  if (smem > ::fastlm_sim::kSmemBytes) return cudaErrorInvalidValue;
  ::fastlm_sim::launch(grid, block, [&] { kernel(args...); });
  return cudaSuccess;
#else
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, block, smem, st>>>(args...);
  return cudaGetLastError();
#endif
}

template <typename T, int D>
cudaError_t launch_fwd(const AttnParams& p, void* out, float* lse, cudaStream_t st) {
  const dim3 grid(p.B * p.H, (p.T_q + FWD_BM - 1) / FWD_BM);
  return launch(attention_fwd_kernel<T, D>, grid, dim3(FWD_THREADS), fwd_smem_bytes<T, D>(), st, p,
                static_cast<T*>(out), lse);
}

template <typename T, int D>
cudaError_t launch_bwd(const AttnBwdParams& p, cudaStream_t st) {
  const AttnParams& f = p.fwd;
  const int64_t rows = (int64_t)f.B * f.H * f.T_q;
  constexpr int kDeltaThreads = 256;
  cudaError_t err = launch(attention_bwd_delta_kernel<T>,
                           dim3((unsigned)((rows * 32 + kDeltaThreads - 1) / kDeltaThreads)),
                           dim3(kDeltaThreads), 0, st, p);
  if (err != cudaSuccess) return err;
  err = launch(attention_bwd_dkdv_kernel<T, D>, dim3(f.B * f.H_kv, (f.T_k + BWD_BN - 1) / BWD_BN),
               dim3(BWD_THREADS), dkdv_smem_bytes<T, D>(), st, p);
  if (err != cudaSuccess) return err;
  return launch(attention_bwd_dq_kernel<T, D>, dim3(f.B * f.H, (f.T_q + BWD_BM - 1) / BWD_BM),
                dim3(BWD_THREADS), dq_smem_bytes<T, D>(), st, p);
}

// Grid y counts 64-row blocks (<= 65535 per launch): longer sequences are refused up front.
bool fits_grid(const AttnParams& p) {
  return p.T_q <= kMaxAttnSeqLen && p.T_k <= kMaxAttnSeqLen;
}

template <typename T>
cudaError_t fwd_by_dim(const AttnParams& p, void* out, float* lse, cudaStream_t st) {
  if (!fits_grid(p)) return cudaErrorInvalidConfiguration;
  switch (p.D) {
    case 64: return launch_fwd<T, 64>(p, out, lse, st);
    case 128: return launch_fwd<T, 128>(p, out, lse, st);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bwd_by_dim(const AttnBwdParams& p, cudaStream_t st) {
  if (!fits_grid(p.fwd)) return cudaErrorInvalidConfiguration;
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
