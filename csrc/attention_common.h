// Attention math shared by the CPU kernels (csrc/cpu/attention.cpp) and the CUDA kernels
// (csrc/cuda/attention.cu): head mapping, bottom-right causal masking, ALiBi and the online-softmax
// bookkeeping. Everything is a FASTLM_HD inline function so that CPU CI exercises the exact code
// the GPU runs.
//
// Conventions (see fastlm/reference.py):
//   * query row i sits at key position i + (T_k - T_q) (bottom-right aligned causal diagonal);
//     with causal=true it sees keys j <= i + T_k - T_q;
//   * ALiBi adds -slope_h * |i + T_k - T_q - j| to the scaled score;
//   * GQA: query head h reads kv head h / (H / H_kv);
//   * a row that sees no key outputs zeros and has lse = -inf.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTLM_HD __host__ __device__ __forceinline__
#else
#define FASTLM_HD inline
#endif

namespace fastlm {
namespace attn {

// kv head read by query head h.
FASTLM_HD int64_t kv_head(int64_t h, int64_t n_head, int64_t n_kv_head) {
  return h / (n_head / n_kv_head);
}

// Exclusive end of the keys visible to query row i, clamped to [0, T_k]; 0 means fully masked.
FASTLM_HD int64_t key_end(int64_t i, int64_t t_q, int64_t t_k, bool causal) {
  if (!causal) return t_k;
  const int64_t e = i + (t_k - t_q) + 1;
  return e < 0 ? 0 : (e > t_k ? t_k : e);
}

// First query row that sees key j (causal); rows before it have key j masked.
FASTLM_HD int64_t first_row_seeing_key(int64_t j, int64_t t_q, int64_t t_k, bool causal) {
  if (!causal) return 0;
  const int64_t r = j - (t_k - t_q);
  return r < 0 ? 0 : r;
}

FASTLM_HD bool is_visible(int64_t i, int64_t j, int64_t t_q, int64_t t_k, bool causal) {
  return j >= 0 && j < t_k && (!causal || j <= i + (t_k - t_q));
}

// ALiBi bias of (query i, key j); slope 0 means no ALiBi.
template <typename acc_t>
FASTLM_HD acc_t alibi_bias(acc_t slope, int64_t i, int64_t j, int64_t t_q, int64_t t_k) {
  int64_t dist = i + (t_k - t_q) - j;
  if (dist < 0) dist = -dist;
  return -slope * static_cast<acc_t>(dist);
}

// Scaled, biased, masked score: -inf where the key is not visible.
template <typename acc_t>
FASTLM_HD acc_t masked_score(acc_t qk, acc_t scale, acc_t slope, int64_t i, int64_t j, int64_t t_q,
                             int64_t t_k, bool causal) {
  if (!is_visible(i, j, t_q, t_k, causal)) return -INFINITY;
  return qk * scale + alibi_bias<acc_t>(slope, i, j, t_q, t_k);
}

FASTLM_HD float fl_exp(float x) { return expf(x); }
FASTLM_HD double fl_exp(double x) { return exp(x); }
FASTLM_HD float fl_log(float x) { return logf(x); }
FASTLM_HD double fl_log(double x) { return log(x); }

// The max used to shift exponents: a row whose max is still -inf (nothing visible yet) uses 0, so
// exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
template <typename acc_t>
FASTLM_HD acc_t safe_max(acc_t m) {
  return m == -INFINITY ? acc_t(0) : m;
}

// Online softmax: factor that rescales the running sum/accumulator when the row max moves from
// m_old to m_new (>= m_old). 0 when nothing was accumulated yet.
template <typename acc_t>
FASTLM_HD acc_t rescale_factor(acc_t m_old, acc_t m_new) {
  return m_old == -INFINITY ? acc_t(0) : fl_exp(m_old - safe_max(m_new));
}

// 1 / l for the final normalisation; 0 for a fully masked row (l == 0) so it outputs zeros. A NaN
// sum (NaN/Inf in the inputs) stays NaN: non-finite input propagates, it is never zeroed.
template <typename acc_t>
FASTLM_HD acc_t inv_sum(acc_t l) {
  return l == acc_t(0) ? acc_t(0) : acc_t(1) / l;
}

// Natural-log sum-exp of a row from its running max and sum; -inf for a fully masked row (and
// NaN for a NaN row, so that the backward pass does not mistake it for a masked one).
template <typename acc_t>
FASTLM_HD acc_t row_lse(acc_t m, acc_t l) {
  return l == acc_t(0) ? acc_t(-INFINITY) : m + fl_log(l);
}

// The value subtracted from scores in the backward pass (P = exp(s - lse)). A fully masked row has
// lse = -inf; using +inf makes every P of that row exp(-inf) = 0. (A row whose lse is +inf or NaN
// came from non-finite input: it keeps that value, so its gradients come out non-finite too.)
template <typename acc_t>
FASTLM_HD acc_t backward_shift(acc_t lse) {
  return lse == -INFINITY ? acc_t(INFINITY) : lse;
}

// ---- exp2 form (the CUDA kernels) --------------------------------------------------------------
// The GPU kernels keep scores in log2 units, t = qk * scale * log2(e) + bias * log2(e), so every
// exponential is exp2(t - m) (one MUFU.EX2) and, on unmasked tiles, the scale folds into the FMA
// that forms the exponent: exp2(fma(qk, scale * log2(e), -m)). exp(x) == exp2(x * log2(e)).
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

FASTLM_HD float fl_fma(float a, float b, float c) { return fmaf(a, b, c); }
FASTLM_HD double fl_fma(double a, double b, double c) { return fma(a, b, c); }
FASTLM_HD float fl_exp2(float x) { return exp2f(x); }
FASTLM_HD double fl_exp2(double x) { return exp2(x); }
FASTLM_HD float fl_log2(float x) { return log2f(x); }
FASTLM_HD double fl_log2(double x) { return log2(x); }

// The exponent of exp2 for a score: s * coef - shift in one FMA. Unmasked tiles pass the raw qk
// with coef = scale * log2(e); masked/ALiBi tiles pass a log2-unit score with coef = 1.
template <typename acc_t>
FASTLM_HD acc_t exp2_arg(acc_t s, acc_t coef, acc_t shift) {
  return fl_fma(s, coef, -shift);
}

// masked_score in log2 units: pass scale_log2 = scale * log2(e), slope_log2 = slope * log2(e).
template <typename acc_t>
FASTLM_HD acc_t masked_score_log2(acc_t qk, acc_t scale_log2, acc_t slope_log2, int64_t i,
                                  int64_t j, int64_t t_q, int64_t t_k, bool causal) {
  if (!is_visible(i, j, t_q, t_k, causal)) return -INFINITY;
  return fl_fma(qk, scale_log2, alibi_bias<acc_t>(slope_log2, i, j, t_q, t_k));
}

// rescale_factor for a running max kept in log2 units.
template <typename acc_t>
FASTLM_HD acc_t rescale_factor_log2(acc_t m_old, acc_t m_new) {
  return m_old == -INFINITY ? acc_t(0) : fl_exp2(m_old - safe_max(m_new));
}

// Natural-log LSE from a log2-unit running max m and the sum l of exp2(t - m): (m + log2 l) ln 2.
template <typename acc_t>
FASTLM_HD acc_t row_lse_from_log2(acc_t m, acc_t l) {
  return l == acc_t(0) ? acc_t(-INFINITY) : (m + fl_log2(l)) * acc_t(kLn2);
}

// Blocks of a (causal) grid dimension in launch order: block ids are handed out in increasing
// order, so `reverse` maps launch slot k to block n_blocks - 1 - k and the heaviest causal query
// blocks (the last ones, which see the most keys) start first instead of forming a tail.
FASTLM_HD int64_t block_for_slot(int64_t slot, int64_t n_blocks, bool reverse) {
  return reverse ? n_blocks - 1 - slot : slot;
}

// True when every (query row in [i0, i0 + rows), key in [j0, j0 + cols)) pair is visible and inside
// T_k, so the kernels may skip per-element masking.
FASTLM_HD bool tile_fully_visible(int64_t i0, int64_t j0, int64_t cols, int64_t t_q, int64_t t_k,
                                  bool causal) {
  return j0 + cols <= t_k && (!causal || j0 + cols - 1 <= i0 + (t_k - t_q));
}

// True when no pair of the tile is visible (causal): the kernels skip its math.
FASTLM_HD bool tile_fully_masked(int64_t i0, int64_t rows, int64_t j0, int64_t t_q, int64_t t_k,
                                 bool causal) {
  return causal && j0 > i0 + rows - 1 + (t_k - t_q);
}

// Number of key blocks of size block_n a block of query rows [i0, i1) must visit (causal skip).
FASTLM_HD int64_t key_blocks_for_rows(int64_t i1, int64_t t_q, int64_t t_k, bool causal,
                                      int64_t block_n) {
  const int64_t end = key_end(i1 - 1, t_q, t_k, causal);
  return (end + block_n - 1) / block_n;
}

}  // namespace attn
}  // namespace fastlm
