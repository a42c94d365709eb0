// CPU QK-norm and value-embedding mix on the packed projection qkv = (B, T, (H + 2 H_kv) D), the
// step between the model's qkv Linear and its attention (fastlm.ops.qk_norm_value_mix):
//   q heads: norm(q_h) * q_gain,  k heads: norm(k_h) * k_gain   (norm over the head dim D:
//            LayerNorm without bias, (x - mean) / sqrt(var + eps), or RMSNorm, x / sqrt(mean(x^2) + eps))
//   v      : ve_mix[0] * v + ve_mix[1] * ve                    (ve: (B, T, H_kv D), or with ve_idx (B, T)
//            the (V, H_kv D) table whose rows ve_idx picks: the lookup in this pass, the table's gradient
//            summed per row in token order, as an embedding's index_add backward does)
// One pass over each row (no split, no concatenation, no separate upcast: a bf16/fp16 qkv may be
// written as float32), math in float32 (float64 for float64). The backward recomputes the norm
// statistics from qkv and writes d(qkv) in one pass; the reductions over rows (d q_gain, d k_gain,
// d ve_mix) go into a fixed number of row chunks summed in order, so the result does not depend on
// the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/row_ops.h"

namespace fastlm {
namespace {

constexpr int64_t kChunks = 64;  // row chunks of the backward's reductions (fixed: thread-count independent)

struct QkvNormShape {
  int64_t B, T, H, H_kv, D, W;
  bool norm, mix, table;
};

QkvNormShape check_args(const char* op, const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head,
                        const c10::optional<at::Tensor>& q_gain, const c10::optional<at::Tensor>& k_gain,
                        const c10::optional<at::Tensor>& ve, const c10::optional<at::Tensor>& ve_mix,
                        const c10::optional<at::Tensor>& ve_idx) {
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be (B, T, (H + 2 H_kv) D), got ", qkv.sizes());
  TORCH_CHECK(qkv.device().is_cpu(), op, ": expected CPU tensors, got ", qkv.device());
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), op, ": qkv must be floating point, got ", qkv.scalar_type());
  TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0, op, ": n_head (", n_head,
              ") must be a positive multiple of n_kv_head (", n_kv_head, ")");
  const int64_t W = qkv.size(2);
  TORCH_CHECK(n_kv_head <= W / 2 && n_head <= W - 2 * n_kv_head && W % (n_head + 2 * n_kv_head) == 0, op,
              ": qkv width ", W, " is not (", n_head, " + 2 * ", n_kv_head, ") heads of one size");
  QkvNormShape s{qkv.size(0), qkv.size(1), n_head, n_kv_head, W / (n_head + 2 * n_kv_head), W,
                 q_gain.has_value(), ve.has_value(), ve_idx.has_value()};
  TORCH_CHECK(q_gain.has_value() == k_gain.has_value(), op, ": q_gain and k_gain go together");
  TORCH_CHECK(ve.has_value() == ve_mix.has_value(), op, ": ve and ve_mix go together");
  if (s.norm) {
    for (const at::Tensor* g : {&*q_gain, &*k_gain}) {
      TORCH_CHECK(g->dim() == 1 && g->size(0) == s.D, op, ": q_gain/k_gain must be (D,) = (", s.D, ",), got ",
                  g->sizes());
      TORCH_CHECK(g->device().is_cpu() && at::isFloatingType(g->scalar_type()), op,
                  ": q_gain/k_gain must be floating-point CPU tensors");
    }
  }
  TORCH_CHECK(!s.table || s.mix, op, ": ve_idx needs ve (the table) and ve_mix");
  if (s.table) {
    TORCH_CHECK(ve->dim() == 2 && ve->size(0) > 0 && ve->size(1) == s.H_kv * s.D, op,
                ": with ve_idx, ve must be a (V, H_kv D) table, H_kv D = ", s.H_kv * s.D, ", got ", ve->sizes());
    TORCH_CHECK(ve_idx->dim() == 2 && ve_idx->size(0) == s.B && ve_idx->size(1) == s.T && ve_idx->device().is_cpu() &&
                    (ve_idx->scalar_type() == at::kLong || ve_idx->scalar_type() == at::kInt),
                op, ": ve_idx must be a (B, T) = (", s.B, ", ", s.T, ") int64/int32 CPU tensor, got ",
                ve_idx->sizes(), " ", ve_idx->scalar_type());
  } else if (s.mix) {
    TORCH_CHECK(ve->dim() == 3 && ve->size(0) == s.B && ve->size(1) == s.T && ve->size(2) == s.H_kv * s.D, op,
                ": ve must be (B, T, H_kv D) = (", s.B, ", ", s.T, ", ", s.H_kv * s.D, "), got ", ve->sizes());
  }
  if (s.mix) {
    TORCH_CHECK(ve_mix->dim() == 1 && ve_mix->size(0) == 2, op, ": ve_mix must be (2,), got ", ve_mix->sizes());
    for (const at::Tensor* t : {&*ve, &*ve_mix}) {
      TORCH_CHECK(t->device().is_cpu() && at::isFloatingType(t->scalar_type()), op,
                  ": ve/ve_mix must be floating-point CPU tensors");
    }
  }
  return s;
}

// A (B, T, W) tensor readable row by row: unit last stride.
at::Tensor rows_of(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

using at::vec::Vectorized;
using namespace rowops;

template <typename in_t, typename out_t>
void fwd_kernel(const at::Tensor& qkv, at::Tensor& out, const QkvNormShape& s, const at::Tensor& qg,
                const at::Tensor& kg, bool rms, double eps_d, const at::Tensor& ve, const int64_t* IDS, double a_d,
                double b_d) {
  using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
  using Vec = Vectorized<acc_t>;
  const in_t* X = qkv.const_data_ptr<in_t>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1);
  out_t* Y = out.mutable_data_ptr<out_t>();  // contiguous (B, T, W)
  const acc_t* QG = s.norm ? qg.const_data_ptr<acc_t>() : nullptr;
  const acc_t* KG = s.norm ? kg.const_data_ptr<acc_t>() : nullptr;
  const acc_t* VE = s.mix ? ve.const_data_ptr<acc_t>() : nullptr;  // contiguous (B, T, H_kv D) or (V, H_kv D)
  const acc_t eps = static_cast<acc_t>(eps_d);
  const Vec av(static_cast<acc_t>(a_d)), bv(static_cast<acc_t>(b_d));
  const int64_t D = s.D, W = s.W, T = s.T, nqk = s.H + s.H_kv, VW = s.H_kv * D;
  const bool norm = s.norm, mix = s.mix;
  at::parallel_for(0, s.B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(W), yrow(W), mu(nqk), rstd(nqk);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* x = as_acc(X + (r / T) * sb + (r % T) * st, row.data(), W);
      acc_t* y = out_row(Y + r * W, yrow.data());
      if (norm) {
        norm_stats(x, nqk, D, rms, eps, mu.data(), rstd.data());
        for (int64_t h = 0; h < nqk; ++h) {
          const acc_t* xh = x + h * D;
          const acc_t* g = h < s.H ? QG : KG;
          const Vec muv(mu[h]), rv(rstd[h]);
          acc_t* yh = y + h * D;
          vmap<acc_t>(D, [&](int64_t i, int64_t n) {
            vstore(yh + i, (vload(xh + i, n) - muv) * rv * vload(g + i, n), n);
          });
        }
      } else {
        std::copy(x, x + nqk * D, y);
      }
      const acc_t* xv = x + nqk * D;
      acc_t* yv = y + nqk * D;
      if (mix) {
        const acc_t* e = VE + (IDS ? IDS[r] : r) * VW;
        vmap<acc_t>(VW, [&](int64_t i, int64_t n) {
          vstore(yv + i, av * vload(xv + i, n) + bv * vload(e + i, n), n);
        });
      } else {
        std::copy(xv, xv + VW, yv);
      }
      flush(Y + r * W, y, W);
    }
  });
}

// Row-chunk partial sums of the backward: d q_gain (D), d k_gain (D), d ve_mix (2).
template <typename acc_t>
struct Partials {
  std::vector<acc_t> qg, kg, ab;
  Partials(int64_t n, int64_t D) : qg(n * D, acc_t(0)), kg(n * D, acc_t(0)), ab(n * 2, acc_t(0)) {}
};

template <typename in_t, typename out_t>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& qkv, at::Tensor& dqkv, at::Tensor& dve_acc,
                const QkvNormShape& s, const at::Tensor& qg, const at::Tensor& kg, bool rms, double eps_d,
                const at::Tensor& ve, const int64_t* IDS, double a_d, double b_d, std::vector<double>& sums) {
  using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
  using Vec = Vectorized<acc_t>;
  const in_t* X = qkv.const_data_ptr<in_t>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1);
  const out_t* dY = dout.const_data_ptr<out_t>();
  const int64_t dsb = dout.stride(0), dst = dout.stride(1);
  in_t* dX = dqkv.mutable_data_ptr<in_t>();  // contiguous (B, T, W)
  acc_t* dVE = s.mix && !IDS ? dve_acc.mutable_data_ptr<acc_t>() : nullptr;  // the table's: table_grad()
  const acc_t* QG = s.norm ? qg.const_data_ptr<acc_t>() : nullptr;
  const acc_t* KG = s.norm ? kg.const_data_ptr<acc_t>() : nullptr;
  const acc_t* VE = s.mix ? ve.const_data_ptr<acc_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const Vec av(static_cast<acc_t>(a_d)), bv(static_cast<acc_t>(b_d));
  const int64_t D = s.D, W = s.W, T = s.T, nqk = s.H + s.H_kv, VW = s.H_kv * D, rows = s.B * T;
  const bool norm = s.norm, mix = s.mix;
  const int64_t n_chunks = std::min<int64_t>(kChunks, rows), per = (rows + n_chunks - 1) / n_chunks;
  Partials<acc_t> part(n_chunks, D);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    // per chunk: elementwise sums over its rows of v * dv and ve * dv (reduced once at the end)
    std::vector<acc_t> row(W), dy(W), dxrow(W), xhat(nqk * D), gdy(nqk * D), sa(VW), sbuf(VW), mu(nqk), rstd(nqk),
        m1(nqk), m2(nqk);
    for (int64_t c = cbegin; c < cend; ++c) {
      acc_t* pq = &part.qg[c * D];
      acc_t* pk = &part.kg[c * D];
      std::fill(sa.begin(), sa.end(), acc_t(0));
      std::fill(sbuf.begin(), sbuf.end(), acc_t(0));
      for (int64_t r = c * per; r < std::min(rows, (c + 1) * per); ++r) {
        const int64_t bi = r / T, t = r % T;
        const acc_t* x = as_acc(X + bi * sb + t * st, row.data(), W);
        const acc_t* g_out = as_acc(dY + bi * dsb + t * dst, dy.data(), W);
        acc_t* dx = out_row(dX + r * W, dxrow.data());
        if (norm) {
          // in steps over all the heads, as norm_stats (their reductions overlap)
          norm_stats(x, nqk, D, rms, eps, mu.data(), rstd.data());
          for (int64_t h = 0; h < nqk; ++h) {
            const acc_t* xh = x + h * D;
            const acc_t* dyh = g_out + h * D;
            const acc_t* g = h < s.H ? QG : KG;
            acc_t* pg = h < s.H ? pq : pk;
            acc_t* xhh = xhat.data() + h * D;
            acc_t* gdyh = gdy.data() + h * D;
            const Vec muv(mu[h]), rv(rstd[h]);
            vmap<acc_t>(D, [&](int64_t i, int64_t n) {
              const Vec xn = (vload(xh + i, n) - muv) * rv, dyv = vload(dyh + i, n);
              vstore(xhh + i, xn, n);
              vstore(gdyh + i, dyv * vload(g + i, n), n);     // d xhat
              vstore(pg + i, vload(pg + i, n) + dyv * xn, n);  // d gain += dy * xhat
            });
          }
          // mean(d xhat) (LayerNorm only) and mean(d xhat * xhat)
          for (int64_t h = 0; h < nqk; ++h) m1[h] = rms ? acc_t(0) : vsum(gdy.data() + h * D, D) / acc_t(D);
          for (int64_t h = 0; h < nqk; ++h) m2[h] = vdot(gdy.data() + h * D, xhat.data() + h * D, D) / acc_t(D);
          for (int64_t h = 0; h < nqk; ++h) {
            const acc_t* xhh = xhat.data() + h * D;
            const acc_t* gdyh = gdy.data() + h * D;
            const Vec rv(rstd[h]), m1v(m1[h]), m2v(m2[h]);
            acc_t* dxh = dx + h * D;
            vmap<acc_t>(D, [&](int64_t i, int64_t n) {
              vstore(dxh + i, rv * (vload(gdyh + i, n) - m1v - vload(xhh + i, n) * m2v), n);
            });
          }
        } else {
          std::copy(g_out, g_out + nqk * D, dx);
        }
        const acc_t* xv = x + nqk * D;
        const acc_t* dyv = g_out + nqk * D;
        acc_t* dxv = dx + nqk * D;
        if (mix) {
          const acc_t* e = VE + (IDS ? IDS[r] : r) * VW;
          acc_t* de = dVE ? dVE + r * VW : nullptr;
          vmap<acc_t>(VW, [&](int64_t i, int64_t n) {
            const Vec d = vload(dyv + i, n);
            vstore(dxv + i, av * d, n);
            if (de) vstore(de + i, bv * d, n);
            vstore(sa.data() + i, vload(sa.data() + i, n) + vload(xv + i, n) * d, n);
            vstore(sbuf.data() + i, vload(sbuf.data() + i, n) + vload(e + i, n) * d, n);
          });
        } else {
          std::copy(dyv, dyv + VW, dxv);
        }
        flush(dX + r * W, dx, W);
      }
      part.ab[2 * c] = vsum(sa.data(), VW);
      part.ab[2 * c + 1] = vsum(sbuf.data(), VW);
    }
  });
  // the chunks' partials, summed in chunk order: [d q_gain (D) | d k_gain (D) | d a | d b]
  sums.assign(2 * D + 2, 0.0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    for (int64_t d = 0; d < D; ++d) {
      sums[d] += part.qg[c * D + d];
      sums[D + d] += part.kg[c * D + d];
    }
    sums[2 * D] += part.ab[2 * c];
    sums[2 * D + 1] += part.ab[2 * c + 1];
  }
}

at::ScalarType acc_of(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// The output dtype: qkv's, or float32 for a bf16/fp16 qkv (the upcast the CPU attention wants).
at::ScalarType out_of(const char* op, const at::Tensor& qkv, c10::optional<at::ScalarType> out_dtype) {
  const at::ScalarType in = qkv.scalar_type();
  const at::ScalarType out = out_dtype.value_or(in);
  const bool reduced = in == at::kBFloat16 || in == at::kHalf;
  TORCH_CHECK(out == in || (reduced && out == at::kFloat), op, ": out_dtype must be qkv's dtype (", in,
              ") or float32 for a bfloat16/float16 qkv, got ", out);
  return out;
}

// ve ((B, T, H_kv D), or the (V, H_kv D) table) in the compute type, contiguous; the table's row ids
// (int64, checked in range); the two mix scalars
struct MixArgs {
  at::Tensor ve, idx;
  double a = 0.0, b = 0.0;
  const int64_t* ids() const { return idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr; }
};

MixArgs mix_args(const char* op, const QkvNormShape& s, at::ScalarType acc, const c10::optional<at::Tensor>& ve,
                 const c10::optional<at::Tensor>& ve_mix, const c10::optional<at::Tensor>& ve_idx) {
  if (!s.mix) return {};
  const at::Tensor m = ve_mix->to(at::kDouble).contiguous();
  const double* p = m.const_data_ptr<double>();
  at::Tensor idx;
  if (s.table) {
    idx = ve_idx->to(at::kLong).contiguous();
    const int64_t* ids = idx.const_data_ptr<int64_t>();
    const int64_t V = ve->size(0);
    for (int64_t r = 0; r < idx.numel(); ++r) {
      TORCH_CHECK(ids[r] >= 0 && ids[r] < V, op, ": ve_idx holds ", ids[r], ", outside the table's ", V, " rows");
    }
  }
  return {ve->to(acc).contiguous(), idx, p[0], p[1]};
}

// The table's gradient: row v = sum over the tokens r with ids[r] == v, in token order, of
// ve_mix[1] * d v[r] (the order of an embedding's index_add backward; each product and add may be
// one fused multiply-add, so a float32 table's gradient can differ from the separate lookup's in the
// last bit). Parallel over the rows, so the result does not depend on the thread count.
template <typename out_t, typename acc_t>
at::Tensor table_grad(const at::Tensor& dout, const QkvNormShape& s, const int64_t* ids, int64_t V, double b_d,
                      at::ScalarType acc) {
  using Vec = Vectorized<acc_t>;
  const int64_t rows = s.B * s.T, T = s.T, VW = s.H_kv * s.D, off = (s.H + s.H_kv) * s.D;
  std::vector<int64_t> start(V + 1, 0), order(rows);
  for (int64_t r = 0; r < rows; ++r) ++start[ids[r] + 1];
  for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < rows; ++r) order[next[ids[r]]++] = r;  // each row's tokens in token order
  at::Tensor g = at::zeros({V, VW}, dout.options().dtype(acc));
  acc_t* G = g.mutable_data_ptr<acc_t>();
  const out_t* dY = dout.const_data_ptr<out_t>();
  const int64_t sb = dout.stride(0), st = dout.stride(1);
  const Vec bv(static_cast<acc_t>(b_d));
  at::parallel_for(0, V, 1, [&](int64_t vbegin, int64_t vend) {
    std::vector<acc_t> buf(VW);
    for (int64_t v = vbegin; v < vend; ++v) {
      acc_t* gv = G + v * VW;
      for (int64_t k = start[v]; k < start[v + 1]; ++k) {
        const int64_t r = order[k];
        const acc_t* d = as_acc(dY + (r / T) * sb + (r % T) * st + off, buf.data(), VW);
        vmap<acc_t>(VW, [&](int64_t i, int64_t n) { vstore(gv + i, vload(gv + i, n) + bv * vload(d + i, n), n); });
      }
    }
  });
  return g;
}

at::Tensor gain_of(const QkvNormShape& s, at::ScalarType acc, const c10::optional<at::Tensor>& g) {
  return s.norm ? g->to(acc).contiguous() : at::Tensor();
}

template <typename F>
void dispatch_io(at::ScalarType in, at::ScalarType out, F f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "qk_norm_value_mix", [&] {
    if (out == in) {
      f(static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr));
    } else {
      if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
        f(static_cast<scalar_t*>(nullptr), static_cast<float*>(nullptr));
      }
    }
  });
}

at::Tensor qk_norm_value_mix_fwd_cpu(const at::Tensor& qkv_in, int64_t n_head, int64_t n_kv_head,
                                     const c10::optional<at::Tensor>& q_gain, const c10::optional<at::Tensor>& k_gain,
                                     bool rms, double eps, const c10::optional<at::Tensor>& ve,
                                     const c10::optional<at::Tensor>& ve_mix, c10::optional<at::ScalarType> out_dtype,
                                     const c10::optional<at::Tensor>& ve_idx) {
  const char* op = "qk_norm_value_mix_fwd";
  const QkvNormShape s = check_args(op, qkv_in, n_head, n_kv_head, q_gain, k_gain, ve, ve_mix, ve_idx);
  const at::ScalarType out_t = out_of(op, qkv_in, out_dtype), acc = acc_of(qkv_in.scalar_type());
  const at::Tensor qkv = rows_of(qkv_in);
  at::Tensor out = at::empty({s.B, s.T, s.W}, qkv.options().dtype(out_t));
  if (out.numel() == 0) return out;
  const at::Tensor qg = gain_of(s, acc, q_gain), kg = gain_of(s, acc, k_gain);
  const MixArgs mix = mix_args(op, s, acc, ve, ve_mix, ve_idx);
  dispatch_io(qkv.scalar_type(), out_t, [&](auto* in_p, auto* out_p) {
    using in_t = std::remove_pointer_t<decltype(in_p)>;
    using o_t = std::remove_pointer_t<decltype(out_p)>;
    fwd_kernel<in_t, o_t>(qkv, out, s, qg, kg, rms, eps, mix.ve, mix.ids(), mix.a, mix.b);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_value_mix_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& qkv_in, int64_t n_head, int64_t n_kv_head,
    const c10::optional<at::Tensor>& q_gain, const c10::optional<at::Tensor>& k_gain, bool rms, double eps,
    const c10::optional<at::Tensor>& ve, const c10::optional<at::Tensor>& ve_mix,
    const c10::optional<at::Tensor>& ve_idx) {
  const char* op = "qk_norm_value_mix_bwd";
  const QkvNormShape s = check_args(op, qkv_in, n_head, n_kv_head, q_gain, k_gain, ve, ve_mix, ve_idx);
  TORCH_CHECK(dout_in.sizes() == qkv_in.sizes(), op, ": dout must be qkv's shape ", qkv_in.sizes(), ", got ",
              dout_in.sizes());
  TORCH_CHECK(dout_in.device().is_cpu(), op, ": dout on ", dout_in.device());
  const at::ScalarType out_t = out_of(op, qkv_in, dout_in.scalar_type()), acc = acc_of(qkv_in.scalar_type());
  const at::Tensor qkv = rows_of(qkv_in), dout = rows_of(dout_in);
  at::Tensor dqkv = at::empty({s.B, s.T, s.W}, qkv.options());
  const at::Tensor qg = gain_of(s, acc, q_gain), kg = gain_of(s, acc, k_gain);
  const MixArgs mix = mix_args(op, s, acc, ve, ve_mix, ve_idx);
  at::Tensor dve_acc =
      s.mix && !s.table ? at::empty({s.B, s.T, s.H_kv * s.D}, qkv.options().dtype(acc)) : at::Tensor();
  std::vector<double> sums(2 * s.D + 2, 0.0);
  if (dqkv.numel() > 0) {
    dispatch_io(qkv.scalar_type(), out_t, [&](auto* in_p, auto* out_p) {
      using in_t = std::remove_pointer_t<decltype(in_p)>;
      using o_t = std::remove_pointer_t<decltype(out_p)>;
      bwd_kernel<in_t, o_t>(dout, qkv, dqkv, dve_acc, s, qg, kg, rms, eps, mix.ve, mix.ids(), mix.a, mix.b, sums);
      if (s.table) {
        using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
        dve_acc = table_grad<o_t, acc_t>(dout, s, mix.ids(), ve->size(0), mix.b, acc);
      }
    });
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor all = at::tensor(sums, opts);
  at::Tensor dqg, dkg, dve, dmix;
  if (s.norm) {
    dqg = all.slice(0, 0, s.D).to(q_gain->scalar_type());
    dkg = all.slice(0, s.D, 2 * s.D).to(k_gain->scalar_type());
  } else {
    dqg = dkg = at::empty({0}, qkv.options());
  }
  if (s.mix) {
    dve = dqkv.numel() > 0 ? dve_acc.to(ve->scalar_type()) : at::zeros(ve->sizes(), ve->options());
    dmix = all.slice(0, 2 * s.D, 2 * s.D + 2).to(ve_mix->scalar_type());
  } else {
    dve = dmix = at::empty({0}, qkv.options());
  }
  return {dqkv, dqg, dkg, dve, dmix};
}

// Autograd in C++ (the ops called through the dispatcher, so that tracing sees them): a Python
// formula costs some 20 us per call on top (see layer_norm.cpp). Absent inputs get no gradient.
class QkNormValueMixFn : public torch::autograd::Function<QkNormValueMixFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv, int64_t n_head,
                            int64_t n_kv_head, const c10::optional<at::Tensor>& q_gain,
                            const c10::optional<at::Tensor>& k_gain, bool rms, double eps,
                            const c10::optional<at::Tensor>& ve, const c10::optional<at::Tensor>& ve_mix,
                            c10::optional<at::ScalarType> out_dtype, const c10::optional<at::Tensor>& ve_idx) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::qk_norm_value_mix_fwd", "")
                          .typed<decltype(qk_norm_value_mix_fwd_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor none;
    ctx->save_for_backward(
        {qkv, q_gain.value_or(none), k_gain.value_or(none), ve.value_or(none), ve_mix.value_or(none)});
    ctx->saved_data["heads"] = std::vector<int64_t>{n_head, n_kv_head};
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["ve_idx"] = ve_idx;
    return fwd.call(qkv, n_head, n_kv_head, q_gain, k_gain, rms, eps, ve, ve_mix, out_dtype, ve_idx);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::qk_norm_value_mix_bwd", "")
                          .typed<decltype(qk_norm_value_mix_bwd_cpu)>();
    const auto saved = ctx->get_saved_variables();
    const auto heads = ctx->saved_data["heads"].toIntVector();
    const auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    auto [dqkv, dqg, dkg, dve, dmix] =
        bwd.call(grads[0], saved[0], heads[0], heads[1], opt(saved[1]), opt(saved[2]),
                 ctx->saved_data["rms"].toBool(), ctx->saved_data["eps"].toDouble(), opt(saved[3]), opt(saved[4]),
                 ctx->saved_data["ve_idx"].toOptional<at::Tensor>());
    const bool norm = saved[1].defined(), mix = saved[3].defined();
    const at::Tensor none;
    return {dqkv, none, none, norm ? dqg : none, norm ? dkg : none, none, none, mix ? dve : none, mix ? dmix : none,
            none, none};
  }
};

at::Tensor qk_norm_value_mix_fwd_autograd(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head,
                                          const c10::optional<at::Tensor>& q_gain,
                                          const c10::optional<at::Tensor>& k_gain, bool rms, double eps,
                                          const c10::optional<at::Tensor>& ve, const c10::optional<at::Tensor>& ve_mix,
                                          c10::optional<at::ScalarType> out_dtype,
                                          const c10::optional<at::Tensor>& ve_idx) {
  return QkNormValueMixFn::apply(qkv, n_head, n_kv_head, q_gain, k_gain, rms, eps, ve, ve_mix, out_dtype, ve_idx);
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("qk_norm_value_mix_fwd", &fastlm::qk_norm_value_mix_fwd_cpu);
  m.impl("qk_norm_value_mix_bwd", &fastlm::qk_norm_value_mix_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("qk_norm_value_mix_fwd", &fastlm::qk_norm_value_mix_fwd_autograd); }
