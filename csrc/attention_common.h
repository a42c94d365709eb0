// Attention math shared by the CPU kernels (csrc/cpu/attention.cpp) and the CUDA kernels
// (csrc/cuda/attention.cu): head mapping, bottom-right causal masking, ALiBi and the online-softmax
// bookkeeping. Everything is a FASTLM_HD inline function so that CPU CI exercises the exact code
// the GPU runs.
//
// Conventions (see fastlm/reference.py):
//   * query row i sits at key position i + (T_k - T_q) (bottom-right aligned causal diagonal);
//     with causal=true it sees keys j <= i + T_k - T_q; a sliding window and documents narrow that
//     to one interval of keys per row (Mask, row_keys below);
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

// ---- Masks: causal, sliding window, documents ----------------------------------------------------
// Query row i sits at key position p = i + T_k - T_q (bottom-right aligned) and sees the keys j
//   * causal:            j <= p;
//   * window w (>= 1):   p - w < j (with causal), |p - j| < w (without);
//   * documents:         j in the document of key position p (none when p is outside [0, T_k)).
// Every combination leaves each row one interval of keys [lo, hi), and lo and hi never decrease from
// one row to the next (documents are contiguous and packed left to right, the window slides, causal
// is a prefix). Rows with p >= 0 contain their own position (rows with p < 0 start at key 0 or see
// nothing), so the intervals of a block of rows overlap or touch and their union is one interval
// too: a block of rows needs the keys from the lo
// of its first row to the hi of its last, and a tile of (rows, keys) is fully visible, partly
// visible or empty by its corner rows alone. The kernels skip empty tiles and mask partial ones.
struct Mask {
  int64_t t_q, t_k;
  bool causal;
  int64_t window;      // >= 1; 0: no window
  const int64_t* doc;  // this batch's document bounds, (2, T_k): doc[t] = first key of t's document,
                       // doc[t_k + t] = one past its last (document_bounds in op_checks.h); or nullptr
};

FASTLM_HD Mask causal_mask(int64_t t_q, int64_t t_k, bool causal) {
  return Mask{t_q, t_k, causal, 0, nullptr};
}

// The keys lo <= j < hi that a row sees; an empty range is {0, 0} (only a prefix of the rows can be
// empty: those whose key position p is negative, when T_q > T_k).
struct KeyRange {
  int64_t lo, hi;
};

FASTLM_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
FASTLM_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

FASTLM_HD KeyRange row_keys(int64_t i, const Mask& m) {
  const int64_t p = i + (m.t_k - m.t_q);
  if (i < 0 || i >= m.t_q || (m.doc != nullptr && p < 0)) return KeyRange{0, 0};
  int64_t lo = 0, hi = m.t_k;
  if (m.causal) hi = imin(hi, p + 1);
  if (m.window > 0) {
    lo = imax(lo, p - m.window + 1);
    if (!m.causal) hi = imin(hi, p + m.window);
  }
  if (m.doc != nullptr) {
    lo = imax(lo, m.doc[p]);
    hi = imin(hi, m.doc[m.t_k + p]);
  }
  return hi > lo ? KeyRange{lo, hi} : KeyRange{0, 0};
}

FASTLM_HD bool sees(const KeyRange& r, int64_t j) { return j >= r.lo && j < r.hi; }

// Keys seen by any of the rows [i0, i1) (clamped to [0, T_q)): the union of their intervals.
FASTLM_HD KeyRange block_keys(int64_t i0, int64_t i1, const Mask& m) {
  i0 = imax(i0, 0);
  i1 = imin(i1, m.t_q);
  if (i1 <= i0) return KeyRange{0, 0};
  const KeyRange last = row_keys(i1 - 1, m);
  return last.hi > 0 ? KeyRange{row_keys(i0, m).lo, last.hi} : KeyRange{0, 0};
}

// A tile of keys [j0, j1) (j1 > j0) against a block of rows, from the key ranges of the block's first
// and last rows (kernels that hold the per-row ranges call these directly):
//   * fully visible: every pair is visible, per-element masking can be skipped (the last row has the
//     largest lo, the first the smallest hi);
//   * fully masked: no pair is visible, the tile is skipped (the rows' union is [first.lo, last.hi);
//     an empty first row makes that a superset, never a miss).
FASTLM_HD bool tile_visible(const KeyRange& first, const KeyRange& last, int64_t j0, int64_t j1) {
  return last.lo <= j0 && first.hi >= j1;
}
FASTLM_HD bool tile_masked(const KeyRange& first, const KeyRange& last, int64_t j0, int64_t j1) {
  return last.hi <= last.lo || last.hi <= j0 || first.lo >= j1;
}

// The same for the rows [i0, i1) clamped to [0, T_q) (none: masked).
FASTLM_HD bool tile_fully_visible(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const Mask& m) {
  i0 = imax(i0, 0);
  i1 = imin(i1, m.t_q);
  return i1 > i0 && tile_visible(row_keys(i0, m), row_keys(i1 - 1, m), j0, j1);
}
FASTLM_HD bool tile_fully_masked(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const Mask& m) {
  i0 = imax(i0, 0);
  i1 = imin(i1, m.t_q);
  return i1 <= i0 || tile_masked(row_keys(i0, m), row_keys(i1 - 1, m), j0, j1);
}

// The rows [first, end) that see at least one key of [j0, j1) (empty: first >= end), by binary search
// over the monotone interval ends: rows before `first` have hi <= j0, rows from `end` have lo >= j1.
FASTLM_HD int64_t first_row_seeing(int64_t j0, const Mask& m) {
  int64_t a = 0, b = m.t_q;  // the answer is in [a, b]
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (row_keys(mid, m).hi > j0) b = mid; else a = mid + 1;
  }
  return a;
}

FASTLM_HD int64_t end_row_seeing(int64_t j1, const Mask& m) {
  int64_t a = 0, b = m.t_q;
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    const KeyRange r = row_keys(mid, m);
    if (r.hi > r.lo && r.lo >= j1) b = mid; else a = mid + 1;
  }
  return a;
}

// ALiBi bias of (query i, key j); slope 0 means no ALiBi.
template <typename acc_t>
FASTLM_HD acc_t alibi_bias(acc_t slope, int64_t i, int64_t j, int64_t t_q, int64_t t_k) {
  int64_t dist = i + (t_k - t_q) - j;
  if (dist < 0) dist = -dist;
  return -slope * static_cast<acc_t>(dist);
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

// Scaled, biased, masked score in log2 units (scale_log2 = scale * log2(e), slope_log2 = slope *
// log2(e)) of query i, key j, where `keys` = row_keys(i): -inf where the key is not visible.
template <typename acc_t>
FASTLM_HD acc_t masked_score_log2(acc_t qk, acc_t scale_log2, acc_t slope_log2, int64_t i,
                                  int64_t j, int64_t t_q, int64_t t_k, const KeyRange& keys) {
  if (!sees(keys, j)) return -INFINITY;
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

}  // namespace attn
}  // namespace fastlm
