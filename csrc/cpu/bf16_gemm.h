// Small bfloat16 GEMMs with float32 accumulation for the CPU kernels (attention's per-head products
// on bfloat16 inputs): on a CPU with AVX512-BF16, VDPBF16PS micro-kernels (chosen at run time, so
// any build level carries them); elsewhere a plain loop with the same operands and the same
// float32 sums of exact bf16 products, only summed in another order.
//
// Operands are bf16 bit patterns (uint16_t) in "pair" layouts, as VDPBF16PS consumes them: the
// reduction index k runs over pairs p = k / 2.
//   A(r, p): the two bf16 at A + r * a_rs + p * a_ps. Row-major rows (a_rs = lda, a_ps = 2) or a
//            pair pack read transposed (a_rs = 2, a_ps = ldp).
//   B(p, c): the two bf16 at B + p * ldb + 2 c, columns readable up to a multiple of 16 (zero padded).
// The packers make them from float32 rows, rounding to nearest even (odd k and short columns are
// zero padded, so they add nothing to a sum).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_BF16_DOT 1
#define FASTLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define FASTLM_BF16_DOT 0
#endif

namespace fastlm {
namespace bf16 {

inline float to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t from_float(float f) { return c10::detail::round_to_nearest_even(f); }

// Whether this CPU runs VDPBF16PS (and the OS saves zmm state).
inline bool dot_supported() {
#if FASTLM_BF16_DOT
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}
// The micro-kernels in use: on where supported, unless FASTLM_CPU_BF16_DOT=0 (then a bfloat16 qkv
// takes the float32 path, as on CPUs without them); tests switch them off to run the plain loops.
inline bool& dot_switch() {
  static bool on = [] {
    const char* env = std::getenv("FASTLM_CPU_BF16_DOT");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}
inline bool use_dot() { return dot_switch() && dot_supported(); }

// The operations, each on the micro-kernels or in plain loops as use_dot() says (bf16_gemm.cpp).
// dst rows (ldd) = bf16(src rows (lds)) for cols columns, zeros in [cols, cols_pad).
void rows(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd, int64_t cols_pad);
// dst[p * ldp + 2 c + e] = bf16(src[(2 p + e) * lds + c]) for p < ceil(k / 2), c < n_pad (multiple of
// 16): rows k.. and columns n.. are zeros. Read as B, the reduction runs over src's rows; read as A
// (a_rs = 2, a_ps = ldp), A = src^T.
void pairs(const float* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ldp, int64_t n_pad);
// dst[p * ldp + 2 c + e] = bf16(src[c * lds + 2 p + e]) for c < n_pad (zeros from n), p < ceil(k / 2):
// B = src^T, the reduction running along src's rows of k.
void pairs_t(const float* src, int64_t lds, int64_t n, int64_t k, uint16_t* dst, int64_t ldp, int64_t n_pad);
// dst rows (ldd, float32) = the bf16 rows src (lds), cols columns: exact.
void to_float(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);
// C[m x n] (ldc) = alpha * sum_{p < k2} A(r, p) . B(p, c), plus C's values when accumulate.
void gemm(int64_t m, int64_t n, int64_t k2, const uint16_t* A, int64_t a_rs, int64_t a_ps, const uint16_t* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate, float alpha);

}  // namespace bf16
}  // namespace fastlm
