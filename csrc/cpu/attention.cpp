// CPU attention: a blocked, flash-style loop (online softmax, no T x T buffer), vectorised with
// at::vec::Vectorized and parallel with at::parallel_for.
//
//   forward : parallel over (batch, head, block of BQ query rows); for each block of BK keys the
//             scores S = scale * q k^T + ALiBi are masked, the running row max/sum are updated
//             and O += P V. Returns out and the row log-sum-exp (float32; float64 for float64).
//   masks   : causal, sliding window and documents leave each row one interval of keys
//             (attn::row_keys); a block of rows visits only the key tiles its rows see, and within a
//             tile only the rows that see one of its keys do any math (forward and backward).
//   backward: parallel over (batch, kv head). A task owns dK/dV of its kv head and dQ of the query
//             heads of its GQA group, so no two threads write the same gradient (no atomics, no
//             races); P is recomputed from the saved LSE.
// Math is in float32 for float32/bfloat16/float16 inputs and float64 for float64 inputs, except the
// packed op on a bfloat16 qkv, whose products take bf16 operands (float32 sums; see below). Inputs may
// have any strides (they are read through their strides into small per-thread tiles).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_common.h"
#include "cpu/bf16_gemm.h"
#include "cpu/blas.h"
#include "cpu/vec_reduce.h"
#include "op_checks.h"

namespace fastlm {
namespace {

using at::vec::Vectorized;

constexpr int64_t BQ = 32;  // query rows per forward task
constexpr int64_t BK = 64;  // keys per tile (a multiple of every Vectorized size)

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A strided (B, H, T, D) view.
template <typename scalar_t>
struct View4 {
  const scalar_t* p;
  int64_t sb, sh, st, sd;
  View4(const at::Tensor& t)
      : p(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)),
        sd(t.stride(3)) {}
  const scalar_t* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

// dst[0..D) = src row * mul (converted to acc_t), zero padded to Dp.
template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t sd, int64_t D, int64_t Dp, acc_t mul) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]) * mul;
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * sd]) * mul;
  }
  for (int64_t d = D; d < Dp; ++d) dst[d] = acc_t(0);
}

// Transposed tile: dstT[d * BK + c] = src[row j0 + c][d] for c < nc, zero for c >= nc.
template <typename scalar_t, typename acc_t>
inline void load_tile_t(acc_t* dstT, const View4<scalar_t>& src, int64_t b, int64_t h, int64_t j0,
                        int64_t nc, int64_t D, int64_t Dp) {
  std::fill(dstT, dstT + Dp * BK, acc_t(0));
  for (int64_t c = 0; c < nc; ++c) {
    const scalar_t* r = src.row(b, h, j0 + c);
    for (int64_t d = 0; d < D; ++d) dstT[d * BK + c] = static_cast<acc_t>(r[d * src.sd]);
  }
}

// s[0..BK) = sum_d x[d] * yT[d][0..BK)   (x: one row, yT: transposed key tile)
template <typename acc_t>
inline void row_times_tile(acc_t* s, const acc_t* x, const acc_t* yT, int64_t D) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  static_assert(BK % V == 0, "BK must be a multiple of the vector width");
  Vec acc[BK / V];
  for (int64_t c = 0; c < BK / V; ++c) acc[c] = Vec(acc_t(0));
  for (int64_t d = 0; d < D; ++d) {
    const Vec xd(x[d]);
    const acc_t* y = yT + d * BK;
    for (int64_t c = 0; c < BK / V; ++c) acc[c] = at::vec::fmadd(xd, Vec::loadu(y + c * V), acc[c]);
  }
  for (int64_t c = 0; c < BK / V; ++c) acc[c].store(s + c * V);
}

// S[r][0..BK) = X[r] . yT for nr rows of X (row stride Dp). Rows are taken in pairs over half
// tiles so each loaded key vector feeds two FMAs (halves the loads of row_times_tile).
template <typename acc_t>
inline void rows_times_tile(acc_t* S, const acc_t* X, int64_t nr, const acc_t* yT, int64_t D,
                            int64_t Dp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t NH = BK / V / 2;  // vectors per half tile
  static_assert(NH >= 1 && 2 * NH * V == BK, "BK must be an even number of vectors");
  int64_t r = 0;
  for (; r + 2 <= nr; r += 2) {
    const acc_t* x0 = X + r * Dp;
    const acc_t* x1 = x0 + Dp;
    for (int64_t half = 0; half < 2; ++half) {
      Vec a0[NH], a1[NH];
      for (int64_t u = 0; u < NH; ++u) a0[u] = a1[u] = Vec(acc_t(0));
      const acc_t* yh = yT + half * NH * V;
      for (int64_t d = 0; d < D; ++d) {
        const Vec b0(x0[d]), b1(x1[d]);
        const acc_t* y = yh + d * BK;
        for (int64_t u = 0; u < NH; ++u) {
          const Vec yv = Vec::loadu(y + u * V);
          a0[u] = at::vec::fmadd(b0, yv, a0[u]);
          a1[u] = at::vec::fmadd(b1, yv, a1[u]);
        }
      }
      for (int64_t u = 0; u < NH; ++u) {
        a0[u].store(S + r * BK + half * NH * V + u * V);
        a1[u].store(S + (r + 1) * BK + half * NH * V + u * V);
      }
    }
  }
  for (; r < nr; ++r) row_times_tile(S + r * BK, X + r * Dp, yT, D);
}

// y[0..Dp) += sum_{c < n} coef[c * cs] * X[c * Dp + 0..Dp): the n terms are summed in NV registers
// of their own and added to y once (a blocked sum: y, which runs over every block of a long
// reduction such as dV over all query rows, takes one rounding per block instead of one per term).
template <typename acc_t, int NV>
inline void accum_chunk(acc_t* y, const acc_t* coef, int64_t cs, const acc_t* X, int64_t n,
                        int64_t Dp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = Vec(acc_t(0));
  for (int64_t c = 0; c < n; ++c) {
    const acc_t a = coef[c * cs];
    if (a == acc_t(0)) continue;  // masked keys / rows
    const Vec av(a);
    const acc_t* x = X + c * Dp;
    for (int u = 0; u < NV; ++u) acc[u] = at::vec::fmadd(av, Vec::loadu(x + u * V), acc[u]);
  }
  for (int u = 0; u < NV; ++u) (acc[u] + Vec::loadu(y + u * V)).store(y + u * V);
}

template <typename acc_t>
inline void accum_rows(acc_t* y, const acc_t* coef, int64_t cs, const acc_t* X, int64_t n,
                       int64_t Dp) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  int64_t d = 0;
  for (; d + 8 * V <= Dp; d += 8 * V) accum_chunk<acc_t, 8>(y + d, coef, cs, X + d, n, Dp);
  for (; d + 4 * V <= Dp; d += 4 * V) accum_chunk<acc_t, 4>(y + d, coef, cs, X + d, n, Dp);
  for (; d < Dp; d += V) accum_chunk<acc_t, 1>(y + d, coef, cs, X + d, n, Dp);
}

// s[c] = exp(s[c] - shift) for the whole tile (masked -inf entries become 0).
template <typename acc_t>
inline void exp_shift(acc_t* s, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  const Vec sv(shift);
  for (int64_t c = 0; c < BK; c += Vec::size()) (Vec::loadu(s + c) - sv).exp().store(s + c);
}

template <typename acc_t>
inline acc_t vec_max(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec mx(-INFINITY);
  int64_t j = 0;
  for (; j + V <= n; j += V) mx = at::vec::maximum(mx, Vec::loadu(x + j));
  if (j < n) mx = at::vec::maximum(mx, Vec::set(Vec(-INFINITY), Vec::loadu(x + j, n - j), n - j));
  return at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, mx);
}

// x[c] = x[c] * scale + ALiBi(i, j0 + c) for c < n (keys j0.. that row i sees).
template <typename acc_t>
inline void scale_bias(acc_t* x, int64_t n, acc_t scale, acc_t slope, bool has_alibi, int64_t i, int64_t j0,
                       int64_t t_q, int64_t t_k) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if (has_alibi) {
    for (int64_t c = 0; c < n; ++c) x[c] = x[c] * scale + attn::alibi_bias<acc_t>(slope, i, j0 + c, t_q, t_k);
    return;
  }
  const Vec sv(scale);
  int64_t c = 0;
  for (; c + V <= n; c += V) (Vec::loadu(x + c) * sv).store(x + c);
  if (c < n) (Vec::loadu(x + c, n - c) * sv).store(x + c, n - c);
}

// The scores of row i over the keys [j0, j0 + BK) of a tile, of which it sees the columns [a, e):
// scaled and biased there, -inf elsewhere (the CPU twin of the CUDA kernels' masked_score); returns
// the max.
template <typename acc_t>
inline acc_t mask_tile(acc_t* s, acc_t scale, acc_t slope, bool has_alibi, int64_t i, int64_t j0, int64_t a,
                       int64_t e, int64_t t_q, int64_t t_k) {
  std::fill(s, s + a, acc_t(-INFINITY));
  std::fill(s + e, s + BK, acc_t(-INFINITY));
  scale_bias(s + a, e - a, scale, slope, has_alibi, i, j0 + a, t_q, t_k);
  return vec_max(s + a, e - a);
}

// The columns [a, e) of a tile of keys [j0, j0 + nc) that a row with keys r sees.
inline std::pair<int64_t, int64_t> tile_cols(const attn::KeyRange& r, int64_t j0, int64_t nc) {
  return {std::clamp<int64_t>(r.lo - j0, 0, nc), std::clamp<int64_t>(r.hi - j0, 0, nc)};
}

template <typename acc_t>
inline acc_t tile_sum(const acc_t* s) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc(acc_t(0));
  for (int64_t c = 0; c < BK; c += V) acc = acc + Vec::loadu(s + c);
  acc_t tmp[V];
  acc.store(tmp);
  acc_t r = 0;
  for (int64_t u = 0; u < V; ++u) r += tmp[u];
  return r;
}

template <typename acc_t>
inline int64_t padded(int64_t D) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  return (D + V - 1) / V * V;
}

template <typename acc_t>
std::vector<acc_t> slopes_of(const c10::optional<at::Tensor>& alibi, int64_t H) {
  std::vector<acc_t> s(H, acc_t(0));
  if (alibi.has_value()) {
    at::Tensor a = alibi->to(at::kDouble).contiguous();
    const double* p = a.const_data_ptr<double>();
    for (int64_t h = 0; h < H; ++h) s[h] = static_cast<acc_t>(p[h]);
  }
  return s;
}

// The rows [first, end) of a block (row key ranges rk[0..nr)) that see a key of the tile
// [j0, j0 + nc): the ranges are monotone, so rows before see only earlier keys, rows after later ones.
inline std::pair<int64_t, int64_t> tile_rows(const attn::KeyRange* rk, int64_t nr, int64_t j0, int64_t nc) {
  int64_t first = 0, end = nr;
  while (first < nr && rk[first].hi <= j0) ++first;
  while (end > first && rk[end - 1].lo >= j0 + nc) --end;
  return {first, end};
}

// One tile of the online softmax for one row: s (scores of keys j0.., the row sees columns [a, e))
// becomes P, the row's max m / sum l move, and its output accumulator o (Dp) is rescaled and += P V.
template <typename acc_t>
inline void online_row(acc_t* s, acc_t& m, acc_t& l, acc_t* o, const acc_t* vtile, acc_t scale, acc_t slope,
                       bool has_alibi, int64_t i, int64_t j0, int64_t a, int64_t e, int64_t t_q, int64_t t_k,
                       int64_t Dp) {
  using Vec = Vectorized<acc_t>;
  const acc_t m_new = std::max(m, mask_tile(s, scale, slope, has_alibi, i, j0, a, e, t_q, t_k));
  const acc_t alpha = attn::rescale_factor(m, m_new);
  exp_shift(s, attn::safe_max(m_new));
  l = l * alpha + tile_sum(s);
  m = m_new;
  if (alpha != acc_t(1)) {
    const Vec av(alpha);
    for (int64_t d = 0; d < Dp; d += Vec::size()) (Vec::loadu(o + d) * av).store(o + d);
  }
  accum_rows(o, s + a, 1, vtile + a * Dp, e - a, Dp);
}

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, at::Tensor& lse, const AttnShape& s, bool causal,
                          double scale_d, const c10::optional<at::Tensor>& alibi, const MaskArgs& masks) {
  using acc_t = acc_type_t<scalar_t>;
  const View4<scalar_t> Q(q), K(k), Vv(v);
  scalar_t* O = out.mutable_data_ptr<scalar_t>();  // contiguous (B, H, T_q, D)
  acc_t* L = lse.mutable_data_ptr<acc_t>();        // contiguous (B, H, T_q)
  const int64_t D = s.D, Dp = padded<acc_t>(D), Tq = s.T_q, Tk = s.T_k;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const std::vector<acc_t> slopes = slopes_of<acc_t>(alibi, s.H);
  const bool has_alibi = alibi.has_value();
  const int64_t n_qblk = (Tq + BQ - 1) / BQ;

  at::parallel_for(0, s.B * s.H * n_qblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(BQ * Dp), obuf(BQ * Dp), kT(Dp * BK), vbuf(BK * Dp), sbuf(BQ * BK),
        m(BQ), l(BQ);
    std::vector<attn::KeyRange> rk(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblk, bh = task / n_qblk, h = bh % s.H, b = bh / s.H;
      const int64_t hk = attn::kv_head(h, s.H, s.H_kv);
      const int64_t i0 = qb * BQ, nr = std::min(BQ, Tq - i0);
      const attn::Mask mask = masks.of(b, s, causal);
      for (int64_t r = 0; r < nr; ++r) {
        load_row(&qbuf[r * Dp], Q.row(b, h, i0 + r), Q.sd, D, Dp, acc_t(1));
        rk[r] = attn::row_keys(i0 + r, mask);
      }
      std::fill(obuf.begin(), obuf.end(), acc_t(0));
      std::fill(m.begin(), m.end(), acc_t(-INFINITY));
      std::fill(l.begin(), l.end(), acc_t(0));
      const attn::KeyRange keys = attn::block_keys(i0, i0 + nr, mask);  // tiles outside: skipped
      for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += BK) {
        const int64_t nc = std::min(BK, keys.hi - j0);
        load_tile_t(kT.data(), K, b, hk, j0, nc, D, Dp);
        for (int64_t c = 0; c < nc; ++c) load_row(&vbuf[c * Dp], Vv.row(b, hk, j0 + c), Vv.sd, D, Dp, acc_t(1));
        const auto [r_first, r_end] = tile_rows(rk.data(), nr, j0, nc);
        rows_times_tile(&sbuf[r_first * BK], &qbuf[r_first * Dp], r_end - r_first, kT.data(), D, Dp);
        for (int64_t r = r_first; r < r_end; ++r) {
          const auto [a, e] = tile_cols(rk[r], j0, nc);
          online_row(&sbuf[r * BK], m[r], l[r], &obuf[r * Dp], vbuf.data(), scale, slopes[h], has_alibi, i0 + r, j0,
                     a, e, Tq, Tk, Dp);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        const acc_t inv = attn::inv_sum(l[r]);
        scalar_t* orow = O + ((b * s.H + h) * Tq + i) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(obuf[r * Dp + d] * inv);
        L[(b * s.H + h) * Tq + i] = attn::row_lse(m[r], l[r]);
      }
    }
  });
}

// Per-task state of the flash backward: the GQA group's rows (G * T_q of them, row g * T_q + i) of q
// and dout, their dQ accumulators, the row terms delta = rowsum(dO * O) and the shift of
// P = exp(s - shift); and one key tile [j0, j0 + nc) with its dK/dV sums and the P/dS of a row block.
template <typename acc_t>
struct BwdState {
  std::vector<acc_t> q, dout, dq, delta, shift;
  std::vector<uint8_t> masked;  // lse == -inf: the row sees no key at all
  int64_t j0 = 0, nc = 0;
  std::vector<acc_t> kT, vT, k, dk, dv, p, ds;  // kT, vT: (Dp, BK); k, dk, dv: (BK, Dp); p, ds: (BQ, BK)
  BwdState(int64_t rows, int64_t Dp)
      : q(rows * Dp), dout(rows * Dp), dq(rows * Dp), delta(rows), shift(rows), masked(rows), kT(Dp * BK),
        vT(Dp * BK), k(BK * Dp), dk(BK * Dp), dv(BK * Dp), p(BQ * BK), ds(BQ * BK) {}
};

// The rows [r0, r0 + nr) of query head g against the key tile: P and dS masked to each row's keys,
// dQ += dS K per row, then dV += P^T dO and dK += dS^T Q summed over the block in registers.
template <typename acc_t>
void bwd_block(BwdState<acc_t>& st, int64_t g, int64_t r0, int64_t nr, const attn::Mask& mask, acc_t scale,
               acc_t slope, bool has_alibi, int64_t D, int64_t Dp) {
  const int64_t row0 = g * mask.t_q + r0;
  rows_times_tile(st.p.data(), &st.q[row0 * Dp], nr, st.kT.data(), D, Dp);       // S (unscaled)
  rows_times_tile(st.ds.data(), &st.dout[row0 * Dp], nr, st.vT.data(), D, Dp);   // dP = dO V^T
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r, row = row0 + r;
    acc_t* pr = &st.p[r * BK];
    acc_t* dsr = &st.ds[r * BK];
    if (st.masked[row]) {
      std::fill(pr, pr + BK, acc_t(0));
      std::fill(dsr, dsr + BK, acc_t(0));
      continue;
    }
    const auto [a, e] = tile_cols(attn::row_keys(i, mask), st.j0, st.nc);
    mask_tile(pr, scale, slope, has_alibi, i, st.j0, a, e, mask.t_q, mask.t_k);
    exp_shift(pr, st.shift[row]);  // P
    const acc_t dl = st.delta[row];
    for (int64_t c = 0; c < BK; ++c) dsr[c] = pr[c] * (dsr[c] - dl);  // dS = P (dP - delta)
    std::fill(dsr, dsr + a, acc_t(0));  // exactly 0 off the row's keys (not 0 * dP: dP may be inf/NaN)
    std::fill(dsr + e, dsr + BK, acc_t(0));
    accum_rows(&st.dq[row * Dp], dsr + a, 1, st.k.data() + a * Dp, e - a, Dp);  // dQ += dS K
  }
  for (int64_t c = 0; c < st.nc; ++c) {
    accum_rows(&st.dv[c * Dp], &st.p[c], BK, &st.dout[row0 * Dp], nr, Dp);  // dV += P^T dO
    accum_rows(&st.dk[c * Dp], &st.ds[c], BK, &st.q[row0 * Dp], nr, Dp);    // dK += dS^T Q
  }
}

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse_in,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const AttnShape& s,
                          bool causal, double scale_d, const c10::optional<at::Tensor>& alibi,
                          const MaskArgs& masks) {
  using acc_t = acc_type_t<scalar_t>;
  const View4<scalar_t> Q(q), K(k), Vv(v), dO(dout), Out(out);
  const at::Tensor lse_c = lse_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* LSE = lse_c.const_data_ptr<acc_t>();
  scalar_t* dQ = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dK = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dV = dv.mutable_data_ptr<scalar_t>();
  const int64_t D = s.D, Dp = padded<acc_t>(D), Tq = s.T_q, Tk = s.T_k, G = s.H / s.H_kv;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const std::vector<acc_t> slopes = slopes_of<acc_t>(alibi, s.H);
  const bool has_alibi = alibi.has_value();

  at::parallel_for(0, s.B * s.H_kv, 1, [&](int64_t begin, int64_t end) {
    BwdState<acc_t> st(G * Tq, Dp);
    std::vector<acc_t> orow(Dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % s.H_kv, b = task / s.H_kv;
      const attn::Mask mask = masks.of(b, s, causal);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t row = g * Tq + i;
          load_row(&st.q[row * Dp], Q.row(b, h, i), Q.sd, D, Dp, acc_t(1));
          load_row(&st.dout[row * Dp], dO.row(b, h, i), dO.sd, D, Dp, acc_t(1));
          load_row(orow.data(), Out.row(b, h, i), Out.sd, D, Dp, acc_t(1));
          acc_t dl = 0;
          for (int64_t d = 0; d < D; ++d) dl += st.dout[row * Dp + d] * orow[d];
          st.delta[row] = dl;
          const acc_t row_lse = LSE[(b * s.H + h) * Tq + i];
          st.masked[row] = row_lse == -std::numeric_limits<acc_t>::infinity();
          st.shift[row] = attn::backward_shift(row_lse);
        }
      }
      std::fill(st.dq.begin(), st.dq.end(), acc_t(0));
      for (st.j0 = 0; st.j0 < Tk; st.j0 += BK) {
        st.nc = std::min(BK, Tk - st.j0);
        std::fill(st.dk.begin(), st.dk.end(), acc_t(0));
        std::fill(st.dv.begin(), st.dv.end(), acc_t(0));
        // the rows that see a key of this tile; none: dK = dV = 0 without any work
        const int64_t i_first = attn::first_row_seeing(st.j0, mask), i_end = attn::end_row_seeing(st.j0 + st.nc, mask);
        if (i_first < i_end) {
          load_tile_t(st.kT.data(), K, b, hk, st.j0, st.nc, D, Dp);
          load_tile_t(st.vT.data(), Vv, b, hk, st.j0, st.nc, D, Dp);
          for (int64_t c = 0; c < st.nc; ++c) load_row(&st.k[c * Dp], K.row(b, hk, st.j0 + c), K.sd, D, Dp, acc_t(1));
        }
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t r0 = i_first; r0 < i_end; r0 += BQ) {
            bwd_block(st, g, r0, std::min(BQ, i_end - r0), mask, scale, slopes[hk * G + g], has_alibi, D, Dp);
          }
        }
        for (int64_t c = 0; c < st.nc; ++c) {
          const int64_t off = ((b * s.H_kv + hk) * Tk + st.j0 + c) * D;
          for (int64_t d = 0; d < D; ++d) {
            dK[off + d] = static_cast<scalar_t>(st.dk[c * Dp + d] * scale);
            dV[off + d] = static_cast<scalar_t>(st.dv[c * Dp + d]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t off = ((b * s.H + h) * Tq + i) * D;
          const acc_t* src = &st.dq[(g * Tq + i) * Dp];
          for (int64_t d = 0; d < D; ++d) dQ[off + d] = static_cast<scalar_t>(src[d] * scale);
        }
      }
    }
  });
}

// ---- Short keys: per-head BLAS GEMMs ------------------------------------------------------------
// For float32/float64 with T_k <= kGemmMaxTk, each task takes whole score rows of one head: the
// products of attention (S = Q K^T, O = P V; backward dP = dO V^T, dV += P^T dO, dK += dS^T Q,
// dQ = dS K) go to the BLAS torch links (sgemm_/dgemm_: MKL on x86 Linux; single-threaded inside
// our parallel region), reading q/k/v/dout through their row strides, and only the row math
// (scale, ALiBi, mask, softmax, P and dS) is ours, one vectorised pass per block of rows. Blocks of
// kGemmRows query rows multiply only against the keys they can see (attn::block_keys: causal, window,
// documents). Where the BLAS symbols are not
// there (resolved weakly at load), the flash loop above runs instead.
// Measured (benchmarks/REPORT.md): see the CPU attention rows at the default model's shape.

constexpr int64_t kGemmMaxTk = 512;  // longer keys: the flash loop (scores of a block stay small)
constexpr int64_t kGemmRows = 64;    // query rows per block

bool use_gemm_path(const at::Tensor& q, const AttnShape& s) {
  const auto dt = q.scalar_type();
  if (s.T_k > kGemmMaxTk || s.T_q <= 0 || s.T_k <= 0 || s.D <= 0) return false;
  if (dt == at::kFloat) return blas_linked(static_cast<float*>(nullptr));
  if (dt == at::kDouble) return blas_linked(static_cast<double*>(nullptr));
  return false;
}

// A (B, H, T, D) tensor BLAS can read row by row: unit stride along D and rows that do not overlap.
at::Tensor blas_rows(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3));
  return ok ? t : t.contiguous();
}

// Row pointers of a (B, H, T, D) tensor with unit D stride; ld = the row stride (>= D).
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  int64_t sb, sh, ld;
  explicit Rows(const at::Tensor& t)
      : p(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)),
        ld(std::max<int64_t>(t.size(2) <= 1 ? t.size(3) : t.stride(2), 1)) {}
  const scalar_t* at(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * ld; }
};

// exp of a vector: Sleef's (1 ulp), or with Fast (float) torch's exp_u20, the one its CPU flash
// attention takes: about twice as fast, within 2e-6 relative (see Fast below).
template <bool Fast, typename Vec>
inline Vec vexp(const Vec& x) {
  if constexpr (Fast) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// x[j] = exp(x[j] * scale - shift) for j < n (one FMA; with scale 1 exactly x[j] - shift); returns
// their sum, or with w their dot product with w[0..n) (the backward's delta, in the same pass).
template <typename acc_t, bool Fast = false>
inline acc_t exp_sum(acc_t* x, int64_t n, acc_t shift, acc_t scale = acc_t(1), const acc_t* w = nullptr) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec sv(-shift), sc(scale);
  Vec acc(acc_t(0));
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec e = vexp<Fast>(at::vec::fmadd(Vec::loadu(x + j), sc, sv));
    e.store(x + j);
    acc = w ? at::vec::fmadd(e, Vec::loadu(w + j), acc) : acc + e;
  }
  if (j < n) {
    const Vec e = vexp<Fast>(at::vec::fmadd(Vec::loadu(x + j, n - j), sc, sv));
    e.store(x + j, n - j);
    acc = acc + Vec::set(Vec(acc_t(0)), w ? e * Vec::loadu(w + j, n - j) : e, n - j);
  }
  return at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; }, acc);
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t c) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec cv(c);
  int64_t j = 0;
  for (; j + V <= n; j += V) (Vec::loadu(x + j) * cv).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) * cv).store(x + j, n - j);
}

// The forward's row math between the two GEMMs, for nr query rows from i0 whose scores S (nr x kw,
// row stride kw) against the keys [k0, k0 + kw) were just computed: scale, ALiBi, mask (keys outside
// a row's interval become 0), softmax in place; each row's lse in L[r]. A row that sees no key is all
// zeros with lse -inf. Each step runs over all the rows (of up to kGemmRows) before the next, so the
// rows' max and sum reductions overlap instead of each waiting on the last.
// Fold (no ALiBi, scale > 0; the bf16 qkv op): two passes per row instead of four. The max of the raw
// scores (scale > 0 keeps the arg max), then p = exp(s * scale - max * scale) (one FMA) and its sum.
// P stays unnormalised (1 at the row's max): inv[r] = 1 / sum, by which the caller scales the row's
// output after P V, as FlashAttention does; the lse's logs are vector ones.
template <typename scalar_t, bool Fast = false, bool Fold = false>
inline void softmax_block(scalar_t* S, int64_t kw, int64_t k0, int64_t i0, int64_t nr, const attn::Mask& mask,
                          scalar_t scale, scalar_t slope, bool has_alibi, scalar_t* L, int64_t ld = -1,
                          scalar_t* inv = nullptr) {
  using Vec = Vectorized<scalar_t>;
  if (ld < 0) ld = kw;  // S's row stride
  for (int64_t c0 = 0; c0 < nr; c0 += kGemmRows) {
    const int64_t c1 = std::min(nr, c0 + kGemmRows);
    int64_t lo[kGemmRows], cnt[kGemmRows];
    scalar_t m[kGemmRows], l[kGemmRows];
    for (int64_t r = c0; r < c1; ++r) {  // the row's keys [a, a + n) of the block; zeros elsewhere; the max
      const int64_t i = i0 + r;
      const attn::KeyRange rk = attn::row_keys(i, mask);
      scalar_t* x = S + r * ld;
      lo[r - c0] = cnt[r - c0] = 0;
      m[r - c0] = scalar_t(0);
      if (rk.hi <= rk.lo) {
        std::fill(x, x + kw, scalar_t(0));
        continue;
      }
      const int64_t a = rk.lo - k0, n = rk.hi - rk.lo;
      std::fill(x, x + a, scalar_t(0));
      std::fill(x + a + n, x + kw, scalar_t(0));
      lo[r - c0] = a;
      cnt[r - c0] = n;
      if constexpr (Fold) {
        m[r - c0] = vec_max(x + a, n) * scale;
      } else {
        scale_bias(x + a, n, scale, slope, has_alibi, i, rk.lo, mask.t_q, mask.t_k);
        m[r - c0] = vec_max(x + a, n);
      }
    }
    for (int64_t r = c0; r < c1; ++r) {  // the exps and their sum; normalised unless Fold
      const int64_t n = cnt[r - c0];
      l[r - c0] = scalar_t(0);
      if (n == 0) continue;
      scalar_t* x = S + r * ld + lo[r - c0];
      l[r - c0] = exp_sum<scalar_t, Fast>(x, n, m[r - c0], Fold ? scale : scalar_t(1));
      if constexpr (!Fold) scale_row(x, n, attn::inv_sum(l[r - c0]));
    }
    if constexpr (Fold) {
      scalar_t lg[kGemmRows];
      for (int64_t r = 0; r < c1 - c0; r += Vec::size()) {
        const int64_t c = std::min<int64_t>(Vec::size(), c1 - c0 - r);
        Vec::loadu(l + r, c).log().store(lg + r, c);
      }
      for (int64_t r = c0; r < c1; ++r) {  // attn::row_lse, with the vector log
        inv[r] = attn::inv_sum(l[r - c0]);
        L[r] = l[r - c0] == scalar_t(0) ? -std::numeric_limits<scalar_t>::infinity() : m[r - c0] + lg[r - c0];
      }
    } else {
      for (int64_t r = c0; r < c1; ++r) L[r] = attn::row_lse(m[r - c0], l[r - c0]);
    }
  }
}

// The backward's row math, same block: P recomputed in place of the scores in P from the saved lse
// L[r], and dS = P * (dP - delta) in place of dP, with delta = sum_j P_j dP_j of the row: the exact
// softmax derivative of the P in hand. (dO . O, what the flash loop uses, carries the forward's
// rounding of O into every dS of the row; with whole rows here the sum over P dP is as cheap and
// keeps dQ/dK as accurate as the textbook fp32 backward, measured.) Rows that see no key (or had
// lse -inf) get P = dS = 0. P and the rows' deltas for all the rows (of up to kGemmRows) first, then
// dS: the rows' reductions overlap. Fold (no ALiBi, scale > 0): P = exp(s * scale - lse) (one FMA)
// and delta in the same pass, two passes per row instead of four.
template <typename scalar_t, bool Fast = false, bool Fold = false>
inline void softmax_bwd_block(scalar_t* P, scalar_t* dS, int64_t kw, int64_t k0, int64_t i0, int64_t nr,
                              const attn::Mask& mask, scalar_t scale, scalar_t slope, bool has_alibi,
                              const scalar_t* L, int64_t ld = -1) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  if (ld < 0) ld = kw;  // the row stride of P and dS
  for (int64_t c0 = 0; c0 < nr; c0 += kGemmRows) {
    const int64_t c1 = std::min(nr, c0 + kGemmRows);
    int64_t lo[kGemmRows], cnt[kGemmRows];
    scalar_t dl[kGemmRows];
    for (int64_t r = c0; r < c1; ++r) {
      const int64_t i = i0 + r;
      const attn::KeyRange rk = attn::row_keys(i, mask);
      scalar_t* p = P + r * ld;
      scalar_t* ds = dS + r * ld;
      lo[r - c0] = cnt[r - c0] = 0;
      dl[r - c0] = scalar_t(0);
      if (rk.hi <= rk.lo || L[r] == -std::numeric_limits<scalar_t>::infinity()) {
        std::fill(p, p + kw, scalar_t(0));
        std::fill(ds, ds + kw, scalar_t(0));
        continue;
      }
      const int64_t a = rk.lo - k0, n = rk.hi - rk.lo;
      for (scalar_t* x : {p, ds}) {
        std::fill(x, x + a, scalar_t(0));
        std::fill(x + a + n, x + kw, scalar_t(0));
      }
      lo[r - c0] = a;
      cnt[r - c0] = n;
      if constexpr (Fold) {
        dl[r - c0] = exp_sum<scalar_t, Fast>(p + a, n, attn::backward_shift(L[r]), scale, ds + a);
      } else {
        scale_bias(p + a, n, scale, slope, has_alibi, i, rk.lo, mask.t_q, mask.t_k);
        exp_sum<scalar_t, Fast>(p + a, n, attn::backward_shift(L[r]));
        dl[r - c0] = vdot(p + a, ds + a, n);
      }
    }
    for (int64_t r = c0; r < c1; ++r) {
      const int64_t n = cnt[r - c0];
      const scalar_t* p = P + r * ld + lo[r - c0];
      scalar_t* ds = dS + r * ld + lo[r - c0];
      const Vec dlv(dl[r - c0]);
      int64_t j = 0;
      for (; j + V <= n; j += V) (Vec::loadu(p + j) * (Vec::loadu(ds + j) - dlv)).store(ds + j);
      if (j < n) (Vec::loadu(p + j, n - j) * (Vec::loadu(ds + j, n - j) - dlv)).store(ds + j, n - j);
    }
  }
}

template <typename scalar_t>
void attention_fwd_gemm(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        at::Tensor& out, at::Tensor& lse, const AttnShape& s, bool causal, double scale_d,
                        const c10::optional<at::Tensor>& alibi, const MaskArgs& masks) {
  const at::Tensor q = blas_rows(q_in), k = blas_rows(k_in), v = blas_rows(v_in);
  const Rows<scalar_t> Q(q), K(k), Vr(v);
  scalar_t* O = out.mutable_data_ptr<scalar_t>();  // contiguous (B, H, T_q, D)
  scalar_t* L = lse.mutable_data_ptr<scalar_t>();  // contiguous (B, H, T_q)
  const int64_t D = s.D, Tq = s.T_q, Tk = s.T_k, n_blk = (Tq + kGemmRows - 1) / kGemmRows;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const std::vector<scalar_t> slopes = slopes_of<scalar_t>(alibi, s.H);
  const bool has_alibi = alibi.has_value();
  at::parallel_for(0, s.B * s.H * n_blk, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> S(kGemmRows * Tk);
    for (int64_t task = begin; task < end; ++task) {
      // heaviest (last, causal) blocks first
      const int64_t blk = n_blk - 1 - task % n_blk, bh = task / n_blk, h = bh % s.H, b = bh / s.H;
      const int64_t hk = attn::kv_head(h, s.H, s.H_kv);
      const int64_t i0 = blk * kGemmRows, nr = std::min(kGemmRows, Tq - i0);
      const attn::Mask mask = masks.of(b, s, causal);
      const attn::KeyRange keys = attn::block_keys(i0, i0 + nr, mask);  // the keys the block sees
      const int64_t kw = keys.hi - keys.lo;
      scalar_t* Ob = O + ((b * s.H + h) * Tq + i0) * D;
      scalar_t* Lb = L + (b * s.H + h) * Tq + i0;
      if (kw <= 0) {
        std::fill(Ob, Ob + nr * D, scalar_t(0));
        std::fill(Lb, Lb + nr, -std::numeric_limits<scalar_t>::infinity());
        continue;
      }
      gemm_rm(false, true, nr, kw, D, scalar_t(1), Q.at(b, h, i0), Q.ld, K.at(b, hk, keys.lo), K.ld, scalar_t(0),
              S.data(), kw);
      softmax_block(S.data(), kw, keys.lo, i0, nr, mask, scale, slopes[h], has_alibi, Lb);
      gemm_rm(false, false, nr, D, kw, scalar_t(1), S.data(), kw, Vr.at(b, hk, keys.lo), Vr.ld, scalar_t(0), Ob,
              D);
    }
  });
}

template <typename scalar_t>
void attention_bwd_gemm(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                        const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
                        at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const AttnShape& s, bool causal,
                        double scale_d, const c10::optional<at::Tensor>& alibi, const MaskArgs& masks) {
  // out_in is not read: delta comes from P and dP (softmax_bwd_block)
  const at::Tensor q = blas_rows(q_in), k = blas_rows(k_in), v = blas_rows(v_in), dout = blas_rows(dout_in);
  const Rows<scalar_t> Q(q), K(k), Vr(v), dO(dout);
  const at::Tensor lse_c = lse_in.to(q.scalar_type()).contiguous();
  const scalar_t* LSE = lse_c.const_data_ptr<scalar_t>();
  scalar_t* dQ = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dK = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dV = dv.mutable_data_ptr<scalar_t>();
  const int64_t D = s.D, Tq = s.T_q, Tk = s.T_k, G = s.H / s.H_kv;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const std::vector<scalar_t> slopes = slopes_of<scalar_t>(alibi, s.H);
  const bool has_alibi = alibi.has_value();
  at::parallel_for(0, s.B * s.H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> P(kGemmRows * Tk), dS(kGemmRows * Tk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % s.H_kv, b = task / s.H_kv;
      const attn::Mask mask = masks.of(b, s, causal);
      scalar_t* dKt = dK + (b * s.H_kv + hk) * Tk * D;  // this task's (T_k, D) slices
      scalar_t* dVt = dV + (b * s.H_kv + hk) * Tk * D;
      std::fill(dKt, dKt + Tk * D, scalar_t(0));
      std::fill(dVt, dVt + Tk * D, scalar_t(0));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i0 = 0; i0 < Tq; i0 += kGemmRows) {
          const int64_t nr = std::min(kGemmRows, Tq - i0);
          const attn::KeyRange keys = attn::block_keys(i0, i0 + nr, mask);
          const int64_t kw = keys.hi - keys.lo, j = keys.lo;
          scalar_t* dQb = dQ + ((b * s.H + h) * Tq + i0) * D;
          if (kw <= 0) {
            std::fill(dQb, dQb + nr * D, scalar_t(0));
            continue;
          }
          const scalar_t* Qb = Q.at(b, h, i0);
          const scalar_t* dOb = dO.at(b, h, i0);
          gemm_rm(false, true, nr, kw, D, scalar_t(1), Qb, Q.ld, K.at(b, hk, j), K.ld, scalar_t(0), P.data(), kw);
          gemm_rm(false, true, nr, kw, D, scalar_t(1), dOb, dO.ld, Vr.at(b, hk, j), Vr.ld, scalar_t(0), dS.data(),
                  kw);
          softmax_bwd_block(P.data(), dS.data(), kw, j, i0, nr, mask, scale, slopes[h], has_alibi,
                            LSE + (b * s.H + h) * Tq + i0);
          gemm_rm(true, false, kw, D, nr, scalar_t(1), P.data(), kw, dOb, dO.ld, scalar_t(1), dVt + j * D, D);
          gemm_rm(true, false, kw, D, nr, scalar_t(1), dS.data(), kw, Qb, Q.ld, scalar_t(1), dKt + j * D, D);
          gemm_rm(false, false, nr, D, kw, scale, dS.data(), kw, K.at(b, hk, j), K.ld, scalar_t(0), dQb, D);
        }
      }
      scale_row(dKt, Tk * D, scale);
    }
  });
}

// ---- Packed self-attention with RoPE in the kernel -----------------------------------------------
// The model's layout: qkv = (B, T, (H + 2 H_kv) D) straight from the fused projection ([q heads |
// k heads | v heads] per row), out = (B, T, H D) ready for the output projection. The kernel rotates
// q and k (RoPE, the half-split pairing of fastlm.model.apply_rope: x1' = x1 c - x2 s,
// x2' = x1 s + x2 c with cos/sin (T, D/2)) into its tiles as it reads them, so the rotated copy, the
// q/k/v views, their transposes and the (B, H, T, D) output never exist as tensors, and the backward
// writes d(qkv) in that one layout (the rotation undone on dq/dk). Self-attention (T_q = T_k = T),
// float32/float64 with T <= kGemmMaxTk (the BLAS path above), or bfloat16 with bf16 products (below);
// fastlm.ops.attention_qkv composes the plain ops for everything else.
struct QkvShape {
  int64_t B, T, H, H_kv, D, W;  // W = (H + 2 H_kv) D, the row width of qkv
};

QkvShape check_qkv(const char* op, const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head,
                   const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                   const c10::optional<at::Tensor>& alibi) {
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be (B, T, (H + 2 H_kv) D), got ", qkv.sizes());
  TORCH_CHECK(qkv.device().is_cpu(), op, ": expected CPU tensors, got ", qkv.device());
  const bool bf = qkv.scalar_type() == at::kBFloat16;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble || bf, op,
              ": takes float32/float64/bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0, op, ": n_head (", n_head,
              ") must be a positive multiple of n_kv_head (", n_kv_head, ")");
  const int64_t W = qkv.size(2);
  // n_head + 2 n_kv_head <= W, tested without overflow before the sum is formed
  TORCH_CHECK(n_kv_head <= W / 2 && n_head <= W - 2 * n_kv_head, op, ": qkv width ", W, " cannot hold ",
              n_head, " + 2 * ", n_kv_head, " heads");
  const int64_t parts = n_head + 2 * n_kv_head;
  TORCH_CHECK(W % parts == 0, op, ": qkv width ", W, " is not (", n_head, " + 2 * ", n_kv_head,
              ") heads of one size");
  QkvShape s{qkv.size(0), qkv.size(1), n_head, n_kv_head, W / parts, W};
  // bfloat16 runs its own products (bf16::gemm), float32/float64 the BLAS path
  TORCH_CHECK(s.T > 0 && s.T <= kGemmMaxTk && (bf || use_gemm_path(qkv, AttnShape{s.B, s.H, s.H_kv, s.T, s.T, s.D})),
              op, ": needs 1 <= T <= ", kGemmMaxTk, " and the BLAS path, got T=", s.T);
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin go together");
  if (cos.has_value()) {
    TORCH_CHECK(s.D % 2 == 0, op, ": RoPE needs an even head dim, got ", s.D);
    for (const at::Tensor* t : {&*cos, &*sin}) {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == s.T && t->size(1) == s.D / 2, op,
                  ": cos/sin must be (T, D/2) = (", s.T, ", ", s.D / 2, "), got ", t->sizes());
      TORCH_CHECK(t->device().is_cpu(), op, ": cos/sin on ", t->device());
    }
  }
  if (alibi.has_value()) {
    TORCH_CHECK(alibi->dim() == 1 && alibi->size(0) == s.H, op, ": alibi_slopes must be (H,) = (", s.H,
                "), got ", alibi->sizes());
  }
  return s;
}

// RoPE on rows: dst row r (stride ld_dst) = R(pos0 + r) src row r (stride ld_src), R rotating the
// pairs (x[d], x[d + D/2]) by the angle of cos/sin (T, D/2): x1' = x1 c - x2 s, x2' = x1 s + x2 c.
// `inverse` applies R^T (s -> -s), the gradient through the rotation. Without tables: a copy.
template <typename scalar_t>
inline void rotate_rows(scalar_t* dst, int64_t ld_dst, const scalar_t* src, int64_t ld_src, int64_t rows,
                        int64_t pos0, int64_t D, const scalar_t* cs, const scalar_t* sn, bool inverse) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t h = D / 2;
  const scalar_t sign = inverse ? scalar_t(-1) : scalar_t(1);
  const Vec sign_v(sign);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* x = src + r * ld_src;
    scalar_t* y = dst + r * ld_dst;
    if (cs == nullptr) {
      std::copy(x, x + D, y);
      continue;
    }
    const scalar_t* c = cs + (pos0 + r) * h;
    const scalar_t* s = sn + (pos0 + r) * h;
    int64_t d = 0;
    for (; d + V <= h; d += V) {
      const Vec x1 = Vec::loadu(x + d), x2 = Vec::loadu(x + d + h), cv = Vec::loadu(c + d);
      const Vec sv = Vec::loadu(s + d) * sign_v;
      (x1 * cv - x2 * sv).store(y + d);
      (x1 * sv + x2 * cv).store(y + d + h);
    }
    for (; d < h; ++d) {
      const scalar_t x1 = x[d], x2 = x[d + h], sd = s[d] * sign;
      y[d] = x1 * c[d] - x2 * sd;
      y[d + h] = x1 * sd + x2 * c[d];
    }
  }
}

template <typename scalar_t>
struct QkvPtrs {
  at::Tensor cos_c, sin_c;
  const scalar_t* cs = nullptr;
  const scalar_t* sn = nullptr;
  QkvPtrs(const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, at::ScalarType dt) {
    if (cos.has_value()) {
      cos_c = cos->to(dt).contiguous();
      sin_c = sin->to(dt).contiguous();
      cs = cos_c.const_data_ptr<scalar_t>();
      sn = sin_c.const_data_ptr<scalar_t>();
    }
  }
};

// One forward task of the packed op (heaviest, last blocks first): query rows [i0, i0 + nr) of head h
// in batch b, and the keys [j, j + kw) they see (self-attention: never empty).
struct QkvFwdTask {
  int64_t b, h, hk, i0, nr;
  attn::Mask mask;
  int64_t j, kw;
  QkvFwdTask(int64_t task, int64_t n_blk, const QkvShape& s, const MaskArgs& masks)
      : b(task / n_blk / s.H), h(task / n_blk % s.H), hk(attn::kv_head(h, s.H, s.H_kv)),
        i0((n_blk - 1 - task % n_blk) * kGemmRows), nr(std::min(kGemmRows, s.T - i0)),
        mask(masks.of(b, AttnShape{s.B, s.H, s.H_kv, s.T, s.T, s.D}, true)) {
    const attn::KeyRange keys = attn::block_keys(i0, i0 + nr, mask);
    j = keys.lo;
    kw = keys.hi - keys.lo;
  }
};

template <typename scalar_t>
void attention_qkv_fwd_kernel(const at::Tensor& qkv, at::Tensor& out, at::Tensor& lse, const QkvShape& s,
                              const QkvPtrs<scalar_t>& rope, double scale_d, const c10::optional<at::Tensor>& alibi,
                              const MaskArgs& masks) {
  const scalar_t* X = qkv.const_data_ptr<scalar_t>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1);
  scalar_t* O = out.mutable_data_ptr<scalar_t>();  // (B, T, H D)
  scalar_t* L = lse.mutable_data_ptr<scalar_t>();  // (B, H, T)
  const int64_t D = s.D, T = s.T, HD = s.H * D, n_blk = (T + kGemmRows - 1) / kGemmRows;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const std::vector<scalar_t> slopes = slopes_of<scalar_t>(alibi, s.H);
  at::parallel_for(0, s.B * s.H * n_blk, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> S(kGemmRows * T), Qb(kGemmRows * D), Kb(T * D);
    for (int64_t task = begin; task < end; ++task) {
      const QkvFwdTask t(task, n_blk, s, masks);
      const int64_t b = t.b, h = t.h, hk = t.hk, i0 = t.i0, nr = t.nr, j = t.j, kw = t.kw;
      const attn::Mask& mask = t.mask;
      const scalar_t* row0 = X + b * sb;
      rotate_rows(Qb.data(), D, row0 + i0 * st + h * D, st, nr, i0, D, rope.cs, rope.sn, false);
      rotate_rows(Kb.data(), D, row0 + j * st + (s.H + hk) * D, st, kw, j, D, rope.cs, rope.sn, false);
      gemm_rm(false, true, nr, kw, D, scalar_t(1), Qb.data(), D, Kb.data(), D, scalar_t(0), S.data(), kw);
      softmax_block(S.data(), kw, j, i0, nr, mask, scale, slopes[h], alibi.has_value(), L + (b * s.H + h) * T + i0);
      gemm_rm(false, false, nr, D, kw, scalar_t(1), S.data(), kw, row0 + j * st + (s.H + s.H_kv + hk) * D, st,
              scalar_t(0), O + (b * T + i0) * HD + h * D, HD);
    }
  });
}

template <typename scalar_t>
void attention_qkv_bwd_kernel(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                              const at::Tensor& lse, at::Tensor& dqkv, const QkvShape& s,
                              const QkvPtrs<scalar_t>& rope, double scale_d, const c10::optional<at::Tensor>& alibi,
                              const MaskArgs& masks) {
  const scalar_t* X = qkv.const_data_ptr<scalar_t>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1);
  const scalar_t* dO = dout.const_data_ptr<scalar_t>();  // (B, T, H D), rows of stride dst
  const int64_t dsb = dout.stride(0), dst = dout.stride(1);
  (void)out;  // the op's contract keeps the forward's output, but delta comes from P and dP here
  const scalar_t* LSE = lse.const_data_ptr<scalar_t>();
  scalar_t* dX = dqkv.mutable_data_ptr<scalar_t>();  // contiguous (B, T, W)
  const int64_t D = s.D, T = s.T, W = s.W, G = s.H / s.H_kv;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const std::vector<scalar_t> slopes = slopes_of<scalar_t>(alibi, s.H);
  const bool has_alibi = alibi.has_value();
  const AttnShape as{s.B, s.H, s.H_kv, T, T, D};
  at::parallel_for(0, s.B * s.H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> P(kGemmRows * T), dS(kGemmRows * T), Qb(kGemmRows * D), dQb(kGemmRows * D),
        Kb(T * D), dKb(T * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % s.H_kv, b = task / s.H_kv;
      const attn::Mask mask = masks.of(b, as, true);
      const scalar_t* row0 = X + b * sb;
      const scalar_t* Vt = row0 + (s.H + s.H_kv + hk) * D;
      scalar_t* dXb = dX + b * T * W;
      scalar_t* dV = dXb + (s.H + s.H_kv + hk) * D;  // rows of stride W
      rotate_rows(Kb.data(), D, row0 + (s.H + hk) * D, st, T, 0, D, rope.cs, rope.sn, false);
      std::fill(dKb.begin(), dKb.end(), scalar_t(0));
      for (int64_t t = 0; t < T; ++t) std::fill(dV + t * W, dV + t * W + D, scalar_t(0));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i0 = 0; i0 < T; i0 += kGemmRows) {
          const int64_t nr = std::min(kGemmRows, T - i0);
          const attn::KeyRange keys = attn::block_keys(i0, i0 + nr, mask);
          const int64_t j = keys.lo, kw = keys.hi - keys.lo;
          rotate_rows(Qb.data(), D, row0 + i0 * st + h * D, st, nr, i0, D, rope.cs, rope.sn, false);
          const scalar_t* dOb = dO + b * dsb + i0 * dst + h * D;
          gemm_rm(false, true, nr, kw, D, scalar_t(1), Qb.data(), D, Kb.data() + j * D, D, scalar_t(0), P.data(), kw);
          gemm_rm(false, true, nr, kw, D, scalar_t(1), dOb, dst, Vt + j * st, st, scalar_t(0), dS.data(), kw);
          softmax_bwd_block(P.data(), dS.data(), kw, j, i0, nr, mask, scale, slopes[h], has_alibi,
                            LSE + (b * s.H + h) * T + i0);
          gemm_rm(true, false, kw, D, nr, scalar_t(1), P.data(), kw, dOb, dst, scalar_t(1), dV + j * W, W);
          gemm_rm(true, false, kw, D, nr, scalar_t(1), dS.data(), kw, Qb.data(), D, scalar_t(1), dKb.data() + j * D, D);
          gemm_rm(false, false, nr, D, kw, scale, dS.data(), kw, Kb.data() + j * D, D, scalar_t(0), dQb.data(), D);
          rotate_rows(dXb + i0 * W + h * D, W, dQb.data(), D, nr, i0, D, rope.cs, rope.sn, true);
        }
      }
      scale_row(dKb.data(), T * D, scale);
      rotate_rows(dXb + (s.H + hk) * D, W, dKb.data(), D, T, 0, D, rope.cs, rope.sn, true);
    }
  });
}

at::ScalarType lse_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// ---- The packed op on bfloat16: bf16 products, float32 sums ---------------------------------------
// For a bfloat16 qkv (the autocast training step) the same blocks as above, but every product takes
// bf16 operands and sums in float32 (bf16::gemm: VDPBF16PS where the CPU has AVX512-BF16): q and k
// are rotated in float32 and rounded to bf16, P and dS are rounded to bf16 for the products that
// consume them (as FlashAttention does on GPUs), and the softmax, the lse, dK and dV accumulate in
// float32. Without ALiBi the forward rounds the unnormalised P (exp(s - max)) and divides each output
// row by its sum after P V, as FlashAttention does; with ALiBi it rounds the normalised P. Output and
// d(qkv) are bfloat16, lse float32.
namespace bfa {

inline int64_t up16(int64_t n) { return (n + 15) / 16 * 16; }

// dst (rows x D floats, row stride D) = the bf16 rows src (stride ld_src), rotated by RoPE from pos0.
inline void load_rows(float* dst, const at::BFloat16* src, int64_t ld_src, int64_t rows, int64_t pos0, int64_t D,
                      const float* cs, const float* sn) {
  bf16::to_float(reinterpret_cast<const uint16_t*>(src), ld_src, rows, D, dst, D);
  if (cs != nullptr) rotate_rows(dst, D, dst, D, rows, pos0, D, cs, sn, false);
}

inline uint16_t* bits(at::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }

}  // namespace bfa

void attention_qkv_fwd_bf16(const at::Tensor& qkv, at::Tensor& out, at::Tensor& lse, const QkvShape& s,
                            const QkvPtrs<float>& rope, double scale_d, const c10::optional<at::Tensor>& alibi,
                            const MaskArgs& masks) {
  const at::BFloat16* X = qkv.const_data_ptr<at::BFloat16>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1);
  at::BFloat16* O = out.mutable_data_ptr<at::BFloat16>();  // (B, T, H D)
  float* L = lse.mutable_data_ptr<float>();                 // (B, H, T)
  const int64_t D = s.D, T = s.T, HD = s.H * D, n_blk = (T + kGemmRows - 1) / kGemmRows;
  const int64_t Dp = D + (D & 1), Dv = bfa::up16(D), Tp = bfa::up16(T) + 16;
  const float scale = static_cast<float>(scale_d);
  const std::vector<float> slopes = slopes_of<float>(alibi, s.H);
  // without ALiBi (and with a positive scale) softmax_block's Fold rows: P normalised through the output
  const bool unnormalized = !alibi.has_value() && scale > 0.f;
  at::parallel_for(0, s.B * s.H * n_blk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kGemmRows * Tp), Qf(kGemmRows * D), KVf(T * D), Of(kGemmRows * D);
    std::vector<uint16_t> Qa(kGemmRows * Dp), Kt(Dp * Tp), Pa(kGemmRows * Tp), Vp((Tp / 2 + 1) * 2 * Dv);
    std::vector<float> inv(kGemmRows);
    for (int64_t task = begin; task < end; ++task) {
      const QkvFwdTask t(task, n_blk, s, masks);
      const int64_t b = t.b, h = t.h, hk = t.hk, i0 = t.i0, nr = t.nr, j = t.j, kw = t.kw;
      const int64_t kwp = bfa::up16(kw), kwe = kw + (kw & 1);
      const attn::Mask& mask = t.mask;
      const at::BFloat16* row0 = X + b * sb;
      bfa::load_rows(Qf.data(), row0 + i0 * st + h * D, st, nr, i0, D, rope.cs, rope.sn);
      bf16::rows(Qf.data(), D, nr, D, Qa.data(), Dp, Dp);
      bfa::load_rows(KVf.data(), row0 + j * st + (s.H + hk) * D, st, kw, j, D, rope.cs, rope.sn);
      bf16::pairs_t(KVf.data(), D, kw, D, Kt.data(), 2 * kwp, kwp);
      bf16::gemm(nr, kw, Dp / 2, Qa.data(), Dp, 2, Kt.data(), 2 * kwp, S.data(), kwp, false, 1.f);
      if (unnormalized) {  // inv: the rows' 1 / sum, applied to the output below
        softmax_block<float, true, true>(S.data(), kw, j, i0, nr, mask, scale, 0.f, false, L + (b * s.H + h) * T + i0,
                                         kwp, inv.data());
      } else {
        softmax_block<float, true>(S.data(), kw, j, i0, nr, mask, scale, slopes[h], alibi.has_value(),
                                   L + (b * s.H + h) * T + i0, kwp);
      }
      bf16::rows(S.data(), kwp, nr, kw, Pa.data(), kwe, kwe);
      bfa::load_rows(KVf.data(), row0 + j * st + (s.H + s.H_kv + hk) * D, st, kw, j, D, nullptr, nullptr);
      bf16::pairs(KVf.data(), D, kw, D, Vp.data(), 2 * Dv, Dv);
      bf16::gemm(nr, D, kwe / 2, Pa.data(), kwe, 2, Vp.data(), 2 * Dv, Of.data(), D, false, 1.f);
      if (unnormalized) {
        for (int64_t r = 0; r < nr; ++r) scale_row(Of.data() + r * D, D, inv[r]);
      }
      bf16::rows(Of.data(), D, nr, D, bfa::bits(O + (b * T + i0) * HD + h * D), HD, D);
    }
  });
}

void attention_qkv_bwd_bf16(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& lse, at::Tensor& dqkv,
                            const QkvShape& s, const QkvPtrs<float>& rope, double scale_d,
                            const c10::optional<at::Tensor>& alibi, const MaskArgs& masks) {
  const at::BFloat16* X = qkv.const_data_ptr<at::BFloat16>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1);
  const at::BFloat16* dO = dout.const_data_ptr<at::BFloat16>();  // (B, T, H D), rows of stride dst
  const int64_t dsb = dout.stride(0), dst = dout.stride(1);
  const float* LSE = lse.const_data_ptr<float>();
  at::BFloat16* dX = dqkv.mutable_data_ptr<at::BFloat16>();  // contiguous (B, T, W)
  const int64_t D = s.D, T = s.T, W = s.W, G = s.H / s.H_kv;
  const int64_t Dp = D + (D & 1), Dv = bfa::up16(D), Tp = bfa::up16(T) + 16, R2 = kGemmRows / 2 + 1;
  const float scale = static_cast<float>(scale_d);
  const std::vector<float> slopes = slopes_of<float>(alibi, s.H);
  const bool has_alibi = alibi.has_value();
  const bool fold = !has_alibi && scale > 0.f;  // softmax_bwd_block's Fold rows
  const AttnShape as{s.B, s.H, s.H_kv, T, T, D};
  at::parallel_for(0, s.B * s.H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kGemmRows * Tp), dS(kGemmRows * Tp), Qf(kGemmRows * D), dOf(kGemmRows * D),
        dQf(kGemmRows * D), Kf(T * D), Vf(T * D), dKf(T * D), dVf(T * D);
    std::vector<uint16_t> Kt(Dp * Tp), Vt(Dp * Tp), Qa(kGemmRows * Dp), dOa(kGemmRows * Dp), Pp(R2 * 2 * Tp),
        dSp(R2 * 2 * Tp), dSa(kGemmRows * Tp), dOp(R2 * 2 * Dv), Qp(R2 * 2 * Dv), Kn((Tp / 2 + 1) * 2 * Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % s.H_kv, b = task / s.H_kv;
      const attn::Mask mask = masks.of(b, as, true);
      const at::BFloat16* row0 = X + b * sb;
      at::BFloat16* dXb = dX + b * T * W;
      bfa::load_rows(Kf.data(), row0 + (s.H + hk) * D, st, T, 0, D, rope.cs, rope.sn);
      bfa::load_rows(Vf.data(), row0 + (s.H + s.H_kv + hk) * D, st, T, 0, D, nullptr, nullptr);
      bf16::pairs_t(Kf.data(), D, T, D, Kt.data(), 2 * Tp, Tp);
      bf16::pairs_t(Vf.data(), D, T, D, Vt.data(), 2 * Tp, Tp);
      std::fill(dKf.begin(), dKf.end(), 0.f);
      std::fill(dVf.begin(), dVf.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i0 = 0; i0 < T; i0 += kGemmRows) {
          const int64_t nr = std::min(kGemmRows, T - i0), nre = nr + (nr & 1);
          const attn::KeyRange keys = attn::block_keys(i0, i0 + nr, mask);
          const int64_t j = keys.lo, kw = keys.hi - keys.lo, kwp = bfa::up16(kw), kwe = kw + (kw & 1);
          bfa::load_rows(Qf.data(), row0 + i0 * st + h * D, st, nr, i0, D, rope.cs, rope.sn);
          const at::BFloat16* dOb = dO + b * dsb + i0 * dst + h * D;
          bfa::load_rows(dOf.data(), dOb, dst, nr, 0, D, nullptr, nullptr);
          bf16::rows(Qf.data(), D, nr, D, Qa.data(), Dp, Dp);
          // dO's bf16 rows are the A operand as they stand; an odd D needs the zero-padded copy
          const uint16_t* dOA = reinterpret_cast<const uint16_t*>(dOb);
          int64_t dOA_ld = dst;
          if (D & 1) {
            bf16::rows(dOf.data(), D, nr, D, dOa.data(), Dp, Dp);
            dOA = dOa.data();
            dOA_ld = Dp;
          }
          // P = Q K^T and dP = dO V^T over the block's keys (columns from j of the transposed packs)
          bf16::gemm(nr, kw, Dp / 2, Qa.data(), Dp, 2, Kt.data() + 2 * j, 2 * Tp, P.data(), kwp, false, 1.f);
          bf16::gemm(nr, kw, Dp / 2, dOA, dOA_ld, 2, Vt.data() + 2 * j, 2 * Tp, dS.data(), kwp, false, 1.f);
          if (fold) {
            softmax_bwd_block<float, true, true>(P.data(), dS.data(), kw, j, i0, nr, mask, scale, 0.f, false,
                                                 LSE + (b * s.H + h) * T + i0, kwp);
          } else {
            softmax_bwd_block<float, true>(P.data(), dS.data(), kw, j, i0, nr, mask, scale, slopes[h], has_alibi,
                                           LSE + (b * s.H + h) * T + i0, kwp);
          }
          // dV += P^T dO, dK += dS^T Q: the row pairs of P / dS read transposed as A
          bf16::pairs(P.data(), kwp, nr, kw, Pp.data(), 2 * kwp, kwp);
          bf16::pairs(dOf.data(), D, nr, D, dOp.data(), 2 * Dv, Dv);
          bf16::gemm(kw, D, nre / 2, Pp.data(), 2, 2 * kwp, dOp.data(), 2 * Dv, dVf.data() + j * D, D, true, 1.f);
          bf16::pairs(dS.data(), kwp, nr, kw, dSp.data(), 2 * kwp, kwp);
          bf16::pairs(Qf.data(), D, nr, D, Qp.data(), 2 * Dv, Dv);
          bf16::gemm(kw, D, nre / 2, dSp.data(), 2, 2 * kwp, Qp.data(), 2 * Dv, dKf.data() + j * D, D, true, 1.f);
          // dQ = scale dS K, rotated back into d(qkv)
          bf16::rows(dS.data(), kwp, nr, kw, dSa.data(), kwe, kwe);
          bf16::pairs(Kf.data() + j * D, D, kw, D, Kn.data(), 2 * Dv, Dv);
          bf16::gemm(nr, D, kwe / 2, dSa.data(), kwe, 2, Kn.data(), 2 * Dv, dQf.data(), D, false, scale);
          if (rope.cs != nullptr) rotate_rows(dQf.data(), D, dQf.data(), D, nr, i0, D, rope.cs, rope.sn, true);
          bf16::rows(dQf.data(), D, nr, D, bfa::bits(dXb + i0 * W + h * D), W, D);
        }
      }
      scale_row(dKf.data(), T * D, scale);
      if (rope.cs != nullptr) rotate_rows(dKf.data(), D, dKf.data(), D, T, 0, D, rope.cs, rope.sn, true);
      bf16::rows(dKf.data(), D, T, D, bfa::bits(dXb + (s.H + hk) * D), W, D);
      bf16::rows(dVf.data(), D, T, D, bfa::bits(dXb + (s.H + s.H_kv + hk) * D), W, D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_qkv_fwd_cpu(const at::Tensor& qkv_in, int64_t n_head, int64_t n_kv_head,
                                                         const c10::optional<at::Tensor>& cos,
                                                         const c10::optional<at::Tensor>& sin, double scale,
                                                         const c10::optional<at::Tensor>& alibi_slopes,
                                                         c10::optional<int64_t> window,
                                                         const c10::optional<at::Tensor>& segment_ids) {
  const QkvShape s = check_qkv("attention_qkv_fwd", qkv_in, n_head, n_kv_head, cos, sin, alibi_slopes);
  const MaskArgs masks = check_mask_args("attention_qkv_fwd", AttnShape{s.B, s.H, s.H_kv, s.T, s.T, s.D}, qkv_in,
                                         window, segment_ids);
  const at::Tensor qkv = qkv_in.stride(2) == 1 && qkv_in.stride(1) >= s.W ? qkv_in : qkv_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T, s.H * s.D}, qkv.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T}, qkv.options().dtype(lse_dtype(qkv.scalar_type())));
  if (qkv.scalar_type() == at::kBFloat16) {
    const QkvPtrs<float> rope(cos, sin, at::kFloat);
    attention_qkv_fwd_bf16(qkv, out, lse, s, rope, scale, alibi_slopes, masks);
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "attention_qkv_fwd_cpu", [&] {
    const QkvPtrs<scalar_t> rope(cos, sin, qkv.scalar_type());
    attention_qkv_fwd_kernel<scalar_t>(qkv, out, lse, s, rope, scale, alibi_slopes, masks);
  });
  return {out, lse};
}

at::Tensor attention_qkv_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& qkv_in, const at::Tensor& out_in,
                                 const at::Tensor& lse_in, int64_t n_head, int64_t n_kv_head,
                                 const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                                 double scale, const c10::optional<at::Tensor>& alibi_slopes,
                                 c10::optional<int64_t> window, const c10::optional<at::Tensor>& segment_ids) {
  const QkvShape s = check_qkv("attention_qkv_bwd", qkv_in, n_head, n_kv_head, cos, sin, alibi_slopes);
  const MaskArgs masks = check_mask_args("attention_qkv_bwd", AttnShape{s.B, s.H, s.H_kv, s.T, s.T, s.D}, qkv_in,
                                         window, segment_ids);
  const std::vector<int64_t> o_shape{s.B, s.T, s.H * s.D}, l_shape{s.B, s.H, s.T};
  TORCH_CHECK(dout_in.sizes() == o_shape && out_in.sizes() == o_shape, "attention_qkv_bwd: dout/out must be ",
              o_shape, ", got ", dout_in.sizes(), " / ", out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == l_shape, "attention_qkv_bwd: lse must be ", l_shape, ", got ", lse_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == qkv_in.scalar_type() && out_in.scalar_type() == qkv_in.scalar_type(),
              "attention_qkv_bwd: dout/out dtype differs from qkv");
  const at::Tensor qkv = qkv_in.stride(2) == 1 && qkv_in.stride(1) >= s.W ? qkv_in : qkv_in.contiguous();
  const at::Tensor dout = dout_in.stride(2) == 1 && dout_in.stride(1) >= s.H * s.D ? dout_in : dout_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.to(lse_dtype(qkv.scalar_type())).contiguous();
  at::Tensor dqkv = at::empty({s.B, s.T, s.W}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) {
    const QkvPtrs<float> rope(cos, sin, at::kFloat);
    attention_qkv_bwd_bf16(dout, qkv, lse, dqkv, s, rope, scale, alibi_slopes, masks);
    return dqkv;
  }
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "attention_qkv_bwd_cpu", [&] {
    const QkvPtrs<scalar_t> rope(cos, sin, qkv.scalar_type());
    attention_qkv_bwd_kernel<scalar_t>(dout, qkv, out, lse, dqkv, s, rope, scale, alibi_slopes, masks);
  });
  return dqkv;
}

void check_cpu(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, ": expected CPU tensors, got ", q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": unsupported dtype ", dt, " (float32, float64, bfloat16, float16)");
}


std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal, double scale,
                                                     const c10::optional<at::Tensor>& alibi_slopes,
                                                     c10::optional<int64_t> window,
                                                     const c10::optional<at::Tensor>& segment_ids) {
  const AttnShape s = check_attention_args("attention_fwd", q, k, v, alibi_slopes);
  check_cpu("attention_fwd", q);
  const MaskArgs masks = check_mask_args("attention_fwd", s, q, window, segment_ids);
  at::Tensor out = at::empty({s.B, s.H, s.T_q, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.T_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (use_gemm_path(q, s)) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu_gemm", [&] {
      attention_fwd_gemm<scalar_t>(q, k, v, out, lse, s, causal, scale, alibi_slopes, masks);
    });
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(q, k, v, out, lse, s, causal, scale, alibi_slopes, masks);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    const c10::optional<at::Tensor>& alibi_slopes, c10::optional<int64_t> window,
    const c10::optional<at::Tensor>& segment_ids) {
  const AttnShape s = check_attention_args("attention_bwd", q, k, v, alibi_slopes);
  check_cpu("attention_bwd", q);
  check_attention_bwd_args("attention_bwd", s, q, dout, out, lse);
  const MaskArgs masks = check_mask_args("attention_bwd", s, q, window, segment_ids);
  at::Tensor dq = at::empty({s.B, s.H, s.T_q, s.D}, q.options());
  at::Tensor dk = at::empty({s.B, s.H_kv, s.T_k, s.D}, k.options());
  at::Tensor dv = at::empty({s.B, s.H_kv, s.T_k, s.D}, v.options());
  if (use_gemm_path(q, s)) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd_cpu_gemm", [&] {
      attention_bwd_gemm<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, s, causal, scale, alibi_slopes, masks);
    });
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, s, causal, scale, alibi_slopes, masks);
  });
  return {dq, dk, dv};
}

// The fused qkv op's autograd in C++ (the ops called through the dispatcher, so that tracing sees
// them): a Python formula costs some 20 us per call on top (see layer_norm.cpp). qkv, out, lse and the
// RoPE tables are saved; the slopes and masks are constants of the call; lse takes no gradient.
class AttentionQkvFn : public torch::autograd::Function<AttentionQkvFn> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv,
                                                int64_t n_head, int64_t n_kv_head, const c10::optional<at::Tensor>& cos,
                                                const c10::optional<at::Tensor>& sin, double scale,
                                                const c10::optional<at::Tensor>& alibi_slopes,
                                                c10::optional<int64_t> window,
                                                const c10::optional<at::Tensor>& segment_ids) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::attention_qkv_fwd", "")
                          .typed<decltype(attention_qkv_fwd_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = fwd.call(qkv, n_head, n_kv_head, cos, sin, scale, alibi_slopes, window, segment_ids);
    ctx->save_for_backward({qkv, out, lse, cos.value_or(at::Tensor()), sin.value_or(at::Tensor())});
    ctx->saved_data["heads"] = std::vector<int64_t>{n_head, n_kv_head};
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["alibi"] = alibi_slopes;
    ctx->saved_data["window"] = window;
    ctx->saved_data["segment_ids"] = segment_ids;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::attention_qkv_bwd", "")
                          .typed<decltype(attention_qkv_bwd_cpu)>();
    const auto saved = ctx->get_saved_variables();
    const auto heads = ctx->saved_data["heads"].toIntVector();
    const auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    at::Tensor dqkv = bwd.call(grads[0], saved[0], saved[1], saved[2], heads[0], heads[1], opt(saved[3]),
                               opt(saved[4]), ctx->saved_data["scale"].toDouble(),
                               ctx->saved_data["alibi"].toOptional<at::Tensor>(),
                               ctx->saved_data["window"].toOptional<int64_t>(),
                               ctx->saved_data["segment_ids"].toOptional<at::Tensor>());
    torch::autograd::variable_list out(9);
    out[0] = dqkv;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_qkv_fwd_autograd(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head,
                                                              const c10::optional<at::Tensor>& cos,
                                                              const c10::optional<at::Tensor>& sin, double scale,
                                                              const c10::optional<at::Tensor>& alibi_slopes,
                                                              c10::optional<int64_t> window,
                                                              const c10::optional<at::Tensor>& segment_ids) {
  auto outs = AttentionQkvFn::apply(qkv, n_head, n_kv_head, cos, sin, scale, alibi_slopes, window, segment_ids);
  return {outs[0], outs[1]};
}

}  // namespace

int64_t cpu_attention_gemm_max_tk() {
  return blas_linked(static_cast<float*>(nullptr)) ? kGemmMaxTk : 0;
}

}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &fastlm::attention_fwd_cpu);
  m.impl("attention_bwd", &fastlm::attention_bwd_cpu);
  m.impl("attention_qkv_fwd", &fastlm::attention_qkv_fwd_cpu);
  m.impl("attention_qkv_bwd", &fastlm::attention_qkv_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("attention_qkv_fwd", &fastlm::attention_qkv_fwd_autograd); }
