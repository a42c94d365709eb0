// bfloat16 pair GEMMs and packers (see bf16_gemm.h): the plain loops, and the AVX512-BF16 forms
// compiled for that target whatever the build level, called only where the CPU has it.
#include "cpu/bf16_gemm.h"

#include <algorithm>

#if FASTLM_BF16_DOT
#include <immintrin.h>
#endif

namespace fastlm {
namespace bf16 {
namespace {

void rows_plain(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd,
                int64_t cols_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * ldd + c] = from_float(src[r * lds + c]);
    for (int64_t c = cols; c < cols_pad; ++c) dst[r * ldd + c] = 0;
  }
}

// dst[p * ldp + 2 c + e] = bf16(src[(2 p + e) * k_stride + c * n_stride]), zeros from k and from n.
void pairs_strided(const float* src, int64_t k_stride, int64_t n_stride, int64_t k, int64_t n, uint16_t* dst,
                   int64_t ldp, int64_t n_pad) {
  for (int64_t p = 0; 2 * p < k; ++p) {
    for (int64_t c = 0; c < n_pad; ++c) {
      for (int64_t e = 0; e < 2; ++e) {
        const int64_t i = 2 * p + e;
        dst[p * ldp + 2 * c + e] = (i < k && c < n) ? from_float(src[i * k_stride + c * n_stride]) : uint16_t(0);
      }
    }
  }
}

void pairs_plain(const float* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ldp, int64_t n_pad) {
  pairs_strided(src, lds, 1, k, n, dst, ldp, n_pad);
}

void pairs_t_plain(const float* src, int64_t lds, int64_t n, int64_t k, uint16_t* dst, int64_t ldp, int64_t n_pad) {
  pairs_strided(src, 1, lds, k, n, dst, ldp, n_pad);
}

void to_float_plain(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ldd + c] = to_float(src[r * lds + c]);
}

void gemm_plain(int64_t m, int64_t n, int64_t k2, const uint16_t* A, int64_t a_rs, int64_t a_ps, const uint16_t* B,
                int64_t ldb, float* C, int64_t ldc, bool accumulate, float alpha) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      float acc = 0.f;
      for (int64_t p = 0; p < k2; ++p) {
        const uint16_t* a = A + r * a_rs + p * a_ps;
        const uint16_t* b = B + p * ldb + 2 * c;
        acc += to_float(a[0]) * to_float(b[0]) + to_float(a[1]) * to_float(b[1]);
      }
      float& out = C[r * ldc + c];
      out = (accumulate ? out : 0.f) + alpha * acc;
    }
  }
}

#if FASTLM_BF16_DOT

FASTLM_BF16_TARGET inline __m256i cvt16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// One MR x (16 NV) tile of C; the last vector column stores only the lanes in `last`.
template <int MR, int NV>
FASTLM_BF16_TARGET inline void tile(int64_t k2, const uint16_t* A, int64_t a_rs, int64_t a_ps, const uint16_t* B,
                                    int64_t ldb, float* C, int64_t ldc, __mmask16 last, bool accumulate,
                                    float alpha) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * ldb + 32 * v);
    for (int r = 0; r < MR; ++r) {
      int32_t w;
      std::memcpy(&w, A + r * a_rs + p * a_ps, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(w);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      float* c = C + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], al);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mk, c));
      _mm512_mask_storeu_ps(c, mk, x);
    }
  }
}

template <int NV>
FASTLM_BF16_TARGET void column_panel(int64_t m, int64_t k2, const uint16_t* A, int64_t a_rs, int64_t a_ps,
                                     const uint16_t* B, int64_t ldb, float* C, int64_t ldc, __mmask16 last,
                                     bool accumulate, float alpha) {
  constexpr int MR = NV <= 2 ? 8 : 4;  // at most 16 accumulators
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile<MR, NV>(k2, A + i * a_rs, a_rs, a_ps, B, ldb, C + i * ldc, ldc, last, accumulate, alpha);
  const int64_t rest = m - i;
  const uint16_t* a = A + i * a_rs;
  float* c = C + i * ldc;
  switch (rest) {
#define FASTLM_TAIL(R) \
  case R:              \
    if constexpr (R < MR) tile<R, NV>(k2, a, a_rs, a_ps, B, ldb, c, ldc, last, accumulate, alpha); \
    break;
    FASTLM_TAIL(1)
    FASTLM_TAIL(2)
    FASTLM_TAIL(3)
    FASTLM_TAIL(4)
    FASTLM_TAIL(5)
    FASTLM_TAIL(6)
    FASTLM_TAIL(7)
#undef FASTLM_TAIL
    default:
      break;
  }
}

FASTLM_BF16_TARGET void rows_dot(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst,
                                 int64_t ldd, int64_t cols_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) _mm256_storeu_si256((__m256i*)(d + c), cvt16(_mm512_loadu_ps(s + c)));
    if (c < cols) {
      const __mmask16 mk = __mmask16((1u << (cols - c)) - 1);
      _mm256_mask_storeu_epi16(d + c, mk, cvt16(_mm512_maskz_loadu_ps(mk, s + c)));
    }
    std::fill(d + cols, d + cols_pad, uint16_t(0));
  }
}

FASTLM_BF16_TARGET void pairs_dot(const float* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ldp,
                                  int64_t n_pad) {
  // cvtne2ps puts row 2p in the low 16 lanes and row 2p+1 in the high ones; the permute interleaves them
  alignas(64) static const int16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t p = 0; 2 * p < k; ++p) {
    const float* r0 = src + 2 * p * lds;
    const float* r1 = 2 * p + 1 < k ? r0 + lds : nullptr;
    uint16_t* d = dst + p * ldp;
    for (int64_t c = 0; c < n_pad; c += 16) {
      const int64_t left = n - c;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      const __m512 x0 = _mm512_maskz_loadu_ps(mk, r0 + c);
      const __m512 x1 = r1 ? _mm512_maskz_loadu_ps(mk, r1 + c) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
      _mm512_storeu_si512(d + 2 * c, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

FASTLM_BF16_TARGET void pairs_t_dot(const float* src, int64_t lds, int64_t n, int64_t k, uint16_t* dst, int64_t ldp,
                                    int64_t n_pad) {
  // each source row's k values, rounded 32 at a time, are 16 words (pairs) that go down a column of dst
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);  // ldp is even: pair (p, c) is word p * ldp / 2 + c
  const int64_t ldw = ldp / 2, k2 = (k + 1) / 2;
  alignas(64) uint32_t words[16];
  for (int64_t c = 0; c < n; ++c) {
    const float* s = src + c * lds;
    for (int64_t i = 0; i < k; i += 32) {
      const int64_t left = k - i;
      const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1);
      const __m512 lo = _mm512_maskz_loadu_ps(m0, s + i), hi = _mm512_maskz_loadu_ps(m1, s + i + 16);
      _mm512_store_si512(words, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // bf16 i.. in order: word w = pair w
      const int64_t p0 = i / 2, np = std::min<int64_t>(16, k2 - p0);
      for (int64_t w = 0; w < np; ++w) out[(p0 + w) * ldw + c] = words[w];
    }
  }
  for (int64_t p = 0; p < k2; ++p) std::fill(out + p * ldw + n, out + p * ldw + n_pad, 0u);
}

FASTLM_BF16_TARGET void to_float_dot(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                                     int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = src + r * lds;
    float* d = dst + r * ldd;
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t left = cols - c;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512i x = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, s + c));
      _mm512_mask_storeu_ps(d + c, mk, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
    }
  }
}

FASTLM_BF16_TARGET void gemm_dot(int64_t m, int64_t n, int64_t k2, const uint16_t* A, int64_t a_rs, int64_t a_ps,
                                 const uint16_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate, float alpha) {
  if (m <= 0 || n <= 0) return;
  const int64_t nv = (n + 15) / 16;
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    const int64_t w = std::min<int64_t>(4, nv - v0);
    const int64_t tail = n - 16 * (v0 + w - 1);  // lanes of the panel's last vector column
    const __mmask16 last = tail >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
    const uint16_t* b = B + 32 * v0;
    float* c = C + 16 * v0;
    switch (w) {
      case 1: column_panel<1>(m, k2, A, a_rs, a_ps, b, ldb, c, ldc, last, accumulate, alpha); break;
      case 2: column_panel<2>(m, k2, A, a_rs, a_ps, b, ldb, c, ldc, last, accumulate, alpha); break;
      case 3: column_panel<3>(m, k2, A, a_rs, a_ps, b, ldb, c, ldc, last, accumulate, alpha); break;
      default: column_panel<4>(m, k2, A, a_rs, a_ps, b, ldb, c, ldc, last, accumulate, alpha); break;
    }
  }
}

#endif  // FASTLM_BF16_DOT

}  // namespace

// Each operation on the micro-kernels where use_dot() says so, else in the plain loops.
#if FASTLM_BF16_DOT
#define FASTLM_DISPATCH(name, ...) return use_dot() ? name##_dot(__VA_ARGS__) : name##_plain(__VA_ARGS__)
#else
#define FASTLM_DISPATCH(name, ...) return name##_plain(__VA_ARGS__)
#endif

void rows(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd, int64_t cols_pad) {
  FASTLM_DISPATCH(rows, src, lds, rows, cols, dst, ldd, cols_pad);
}
void pairs(const float* src, int64_t lds, int64_t k, int64_t n, uint16_t* dst, int64_t ldp, int64_t n_pad) {
  FASTLM_DISPATCH(pairs, src, lds, k, n, dst, ldp, n_pad);
}
void pairs_t(const float* src, int64_t lds, int64_t n, int64_t k, uint16_t* dst, int64_t ldp, int64_t n_pad) {
  FASTLM_DISPATCH(pairs_t, src, lds, n, k, dst, ldp, n_pad);
}
void to_float(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  FASTLM_DISPATCH(to_float, src, lds, rows, cols, dst, ldd);
}
void gemm(int64_t m, int64_t n, int64_t k2, const uint16_t* A, int64_t a_rs, int64_t a_ps, const uint16_t* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate, float alpha) {
  FASTLM_DISPATCH(gemm, m, n, k2, A, a_rs, a_ps, B, ldb, C, ldc, accumulate, alpha);
}
#undef FASTLM_DISPATCH

}  // namespace bf16
}  // namespace fastlm
