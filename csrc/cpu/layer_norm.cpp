// CPU LayerNorm / RMSNorm over the last dim (fastlm.ops.layer_norm: the model's pre-norms), with the
// residual add before it:
//   s = x + residual                (when a residual is given; s in x's dtype, returned)
//   LayerNorm: y = (s - mean) / sqrt(var + eps) * weight + bias
//   RMSNorm:   y = s / sqrt(mean(s^2) + eps) * weight (+ bias)
// weight and bias (C,) optional. Math in float32 (float64 for float64). A float32 x may be written
// as bfloat16/float16 (out_dtype: the CPU autocast step's cast for the next Linear, in the same pass),
// and a residual may have x's dtype or out_dtype (a bfloat16 branch added to the float32 stream).
// The rows go in groups of kGroup, each step of the statistics over all of a group's rows before the
// next (rowops::norm_stats), so that the reductions of short rows overlap. The backward recomputes
// the statistics from s and writes ds = d(norm) + d(sum) once as dx and once as d residual; d weight
// and d bias are summed over a fixed number of row chunks, then in chunk order, so they do not depend
// on the thread count. Autograd is wired here, in C++ (LayerNormFn).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/row_ops.h"

namespace fastlm {
namespace {

using at::vec::Vectorized;
using namespace rowops;

constexpr int64_t kGroup = 8;    // rows whose statistics are computed together
constexpr int64_t kChunks = 64;  // row chunks of the backward's reductions (fixed: thread-count independent)

template <typename T>
using acc_of_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// dst = src (n elements of the compute type) in dst's type
template <typename dst_t, typename acc_t>
inline void store_as(dst_t* dst, const acc_t* src, int64_t n) {
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// The pointers and sizes of one call. Each kernel copies it into a local (a by-value parameter), so
// that the compiler keeps its fields in registers across the vector stores (may_alias: through a
// captured reference they would be reloaded after every store).
template <typename in_t, typename out_t, typename res_t>
struct NormArgs {
  using in_type = in_t;
  using out_type = out_t;
  using res_type = res_t;
  using acc_t = acc_of_t<in_t>;
  const in_t* x;       // forward: x; backward: the normalised input (s)
  const res_t* res;    // forward: the residual (or null)
  in_t* sum;           // forward: s = x + residual (null without a residual)
  out_t* y;            // forward: the output
  const out_t* dy;     // backward: d output
  const in_t* dsum;    // backward: d s from its other uses (or null)
  in_t* dx;            // backward: d x
  res_t* dres;         // backward: d residual (or null)
  const acc_t* w;      // weight (or null)
  const acc_t* b;      // bias (or null)
  int64_t rows, C;
  bool rms;
  acc_t eps;
};

template <typename in_t, typename out_t, typename res_t>
void fwd_rows(const NormArgs<in_t, out_t, res_t> a, int64_t gbegin, int64_t gend) {
  using acc_t = acc_of_t<in_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = a.C;
  std::vector<acc_t> xbuf(kGroup * C), rbuf(kGroup * C), sbuf(kGroup * C), ybuf(kGroup * C), mu(kGroup),
      rstd(kGroup);
  for (int64_t g = gbegin; g < gend; ++g) {
    const int64_t r0 = g * kGroup, n = std::min(kGroup, a.rows - r0), next = std::min(kGroup, a.rows - r0 - n);
    if (g + 1 < gend) {  // the next group's rows
      prefetch(a.x + (r0 + n) * C, next * C * int64_t(sizeof(in_t)));
      if (a.res) prefetch(a.res + (r0 + n) * C, next * C * int64_t(sizeof(res_t)));
    }
    const acc_t* xg = as_acc(a.x + r0 * C, xbuf.data(), n * C);
    if (a.res) {  // s = x + residual, rounded to x's dtype; the norm reads the rounded s
      const acc_t* rg = as_acc(a.res + r0 * C, rbuf.data(), n * C);
      acc_t* sg = out_row(a.sum + r0 * C, sbuf.data());
      for (int64_t i = 0; i < n * C; i += V) {
        const int64_t cnt = std::min(V, n * C - i);
        vstore(sg + i, vload(xg + i, cnt) + vload(rg + i, cnt), cnt);
      }
      flush(a.sum + r0 * C, sg, n * C);
      xg = as_acc(a.sum + r0 * C, xbuf.data(), n * C);
    }
    acc_t* yg = out_row(a.y + r0 * C, ybuf.data());
    norm_stats(xg, n, C, a.rms, a.eps, mu.data(), rstd.data());
    for (int64_t h = 0; h < n; ++h) {
      const acc_t* xr = xg + h * C;
      acc_t* yr = yg + h * C;
      const Vec muv(mu[h]), rv(rstd[h]);
      for (int64_t i = 0; i < C; i += V) {
        const int64_t cnt = std::min(V, C - i);
        Vec y = (vload(xr + i, cnt) - muv) * rv;
        if (a.w) y = y * vload(a.w + i, cnt);
        if (a.b) y = y + vload(a.b + i, cnt);
        vstore(yr + i, y, cnt);
      }
    }
    flush(a.y + r0 * C, yg, n * C);
  }
}

// Rows [r_begin, r_end) of the backward; pw, pb: this chunk's sums of dy * xhat and dy (C each).
template <typename in_t, typename out_t, typename res_t>
void bwd_rows(const NormArgs<in_t, out_t, res_t> a, int64_t r_begin, int64_t r_end, acc_of_t<in_t>* pw,
              acc_of_t<in_t>* pb) {
  using acc_t = acc_of_t<in_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const auto add = [](const Vec& p, const Vec& q) { return p + q; };
  const int64_t C = a.C;
  std::vector<acc_t> xbuf(kGroup * C), dybuf(kGroup * C), dxbuf(kGroup * C), dsbuf(kGroup * C), xhat(kGroup * C),
      gdy(kGroup * C), mu(kGroup), rstd(kGroup), m1(kGroup), m2(kGroup);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kGroup) {
    const int64_t n = std::min(kGroup, r_end - r0), next = std::min(kGroup, a.rows - r0 - n);
    if (next > 0) {  // the next group's rows (in this chunk or the next one)
      prefetch(a.x + (r0 + n) * C, next * C * int64_t(sizeof(in_t)));
      prefetch(a.dy + (r0 + n) * C, next * C * int64_t(sizeof(out_t)));
      if (a.dsum) prefetch(a.dsum + (r0 + n) * C, next * C * int64_t(sizeof(in_t)));
    }
    const acc_t* xg = as_acc(a.x + r0 * C, xbuf.data(), n * C);
    const acc_t* dyg = as_acc(a.dy + r0 * C, dybuf.data(), n * C);
    acc_t* dxg = out_row(a.dx + r0 * C, dxbuf.data());
    norm_stats(xg, n, C, a.rms, a.eps, mu.data(), rstd.data());
    // per row, one pass: xhat, d xhat = dy * weight, the parameter sums, and the lanes of
    // sum(d xhat) and sum(d xhat * xhat) (a masked tail's lanes are zero in dy: they add nothing)
    for (int64_t h = 0; h < n; ++h) {
      const acc_t* xr = xg + h * C;
      const acc_t* dyr = dyg + h * C;
      acc_t* xh = xhat.data() + h * C;
      acc_t* gd = gdy.data() + h * C;
      const Vec muv(mu[h]), rv(rstd[h]);
      Vec s1(acc_t(0)), s2(acc_t(0));
      for (int64_t i = 0; i < C; i += V) {
        const int64_t cnt = std::min(V, C - i);
        const Vec xn = (vload(xr + i, cnt) - muv) * rv, dyv = vload(dyr + i, cnt);
        const Vec gv = a.w ? dyv * vload(a.w + i, cnt) : dyv;
        vstore(xh + i, xn, cnt);
        vstore(gd + i, gv, cnt);
        vstore(pw + i, at::vec::fmadd(dyv, xn, vload(pw + i, cnt)), cnt);  // d weight += dy * xhat
        vstore(pb + i, vload(pb + i, cnt) + dyv, cnt);                      // d bias += dy
        s1 = s1 + gv;
        s2 = at::vec::fmadd(gv, xn, s2);
      }
      m1[h] = a.rms ? acc_t(0) : at::vec::vec_reduce_all<acc_t>(add, s1) / acc_t(C);
      m2[h] = at::vec::vec_reduce_all<acc_t>(add, s2) / acc_t(C);
    }
    const acc_t* dsg = a.dsum ? as_acc(a.dsum + r0 * C, dsbuf.data(), n * C) : nullptr;
    for (int64_t h = 0; h < n; ++h) {  // d x = rstd * (d xhat - mean(d xhat) - xhat * mean(d xhat * xhat)) (+ d s)
      const acc_t* xh = xhat.data() + h * C;
      const acc_t* gd = gdy.data() + h * C;
      acc_t* dxr = dxg + h * C;
      const Vec rv(rstd[h]), m1v(m1[h]), m2v(m2[h]);
      for (int64_t i = 0; i < C; i += V) {
        const int64_t cnt = std::min(V, C - i);
        Vec d = rv * (vload(gd + i, cnt) - m1v - vload(xh + i, cnt) * m2v);
        if (dsg) d = d + vload(dsg + h * C + i, cnt);
        vstore(dxr + i, d, cnt);
      }
    }
    flush(a.dx + r0 * C, dxg, n * C);
    if (a.dres) store_as(a.dres + r0 * C, dxg, n * C);
  }
}

struct NormShape {
  int64_t rows, C;
};

NormShape check_args(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim (the normalised one), got a scalar");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  const int64_t C = x.size(-1);
  for (const c10::optional<at::Tensor>* t : {&weight, &bias}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK(p.dim() == 1 && p.size(0) == C, op, ": weight/bias must be (C,) = (", C, ",), got ", p.sizes());
    TORCH_CHECK(p.device().is_cpu() && at::isFloatingType(p.scalar_type()), op,
                ": weight/bias must be floating-point CPU tensors");
  }
  return {C > 0 ? x.numel() / C : 0, C};
}

// The output dtype: x's, or bfloat16/float16 for a float32 x.
at::ScalarType out_of(const char* op, const at::Tensor& x, c10::optional<at::ScalarType> out_dtype) {
  const at::ScalarType in = x.scalar_type();
  const at::ScalarType out = out_dtype.value_or(in);
  TORCH_CHECK(out == in || (in == at::kFloat && (out == at::kBFloat16 || out == at::kHalf)), op,
              ": out_dtype must be x's dtype (", in, ") or bfloat16/float16 for a float32 x, got ", out);
  return out;
}

// The residual's dtype: x's or the output's.
at::ScalarType res_of(const char* op, at::ScalarType in, at::ScalarType out, c10::optional<at::ScalarType> res) {
  const at::ScalarType r = res.value_or(in);
  TORCH_CHECK(r == in || r == out, op, ": the residual must have x's dtype (", in, ") or the output's (", out,
              "), got ", r);
  return r;
}

at::ScalarType acc_of(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// weight or bias in the compute type, contiguous (undefined when absent)
at::Tensor param_of(at::ScalarType acc, const c10::optional<at::Tensor>& p) {
  return p.has_value() ? p->to(acc).contiguous() : at::Tensor();
}

// f(NormArgs<in_t, out_t, res_t>) for the dtypes the op takes (out == in, or float32 in with bf16 /
// fp16 out; the residual's dtype is in's or out's), with the fields both directions share set.
template <typename F>
void dispatch_io(at::ScalarType in, at::ScalarType out, at::ScalarType res, const NormShape& s, bool rms,
                 double eps, const at::Tensor& w, F f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "layer_norm", [&] {
    using in_t = scalar_t;
    const auto call = [&](auto* out_p, auto* res_p) {
      NormArgs<in_t, std::remove_pointer_t<decltype(out_p)>, std::remove_pointer_t<decltype(res_p)>> a{};
      using acc_t = acc_of_t<in_t>;
      a.w = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
      a.rows = s.rows;
      a.C = s.C;
      a.rms = rms;
      a.eps = static_cast<acc_t>(eps);
      f(a);
    };
    const auto with_out = [&](auto* out_p) {
      if (res == in) {
        call(out_p, static_cast<in_t*>(nullptr));
      } else {
        call(out_p, out_p);
      }
    };
    if (out == in) {
      with_out(static_cast<in_t*>(nullptr));
    } else if constexpr (std::is_same_v<in_t, float>) {
      if (out == at::kBFloat16) {
        with_out(static_cast<at::BFloat16*>(nullptr));
      } else {
        with_out(static_cast<at::Half*>(nullptr));
      }
    }
  });
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                      const c10::optional<at::Tensor>& bias, bool rms, double eps,
                                                      c10::optional<at::ScalarType> out_dtype,
                                                      const c10::optional<at::Tensor>& residual) {
  const char* op = "layer_norm_fwd";
  const NormShape s = check_args(op, x_in, weight, bias);
  const at::ScalarType in_t = x_in.scalar_type(), out_t = out_of(op, x_in, out_dtype), acc = acc_of(in_t);
  at::Tensor r;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), op, ": residual must be x's shape ", x_in.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->device().is_cpu(), op, ": residual on ", residual->device());
    r = residual->contiguous();
  }
  const at::ScalarType res_t =
      res_of(op, in_t, out_t, r.defined() ? c10::optional<at::ScalarType>(r.scalar_type()) : c10::nullopt);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_t));
  at::Tensor sum = r.defined() ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (out.numel() == 0) return {out, sum};
  const at::Tensor w = param_of(acc, weight), b = param_of(acc, bias);
  dispatch_io(in_t, out_t, res_t, s, rms, eps, w, [&](auto a) {
    using Args = decltype(a);
    a.x = x.const_data_ptr<typename Args::in_type>();
    a.res = ptr_or_null<const typename Args::res_type>(r);
    a.sum = r.defined() ? sum.mutable_data_ptr<typename Args::in_type>() : nullptr;
    a.y = out.mutable_data_ptr<typename Args::out_type>();
    a.b = ptr_or_null<const typename Args::acc_t>(b);
    at::parallel_for(0, (s.rows + kGroup - 1) / kGroup, 4,
                     [&](int64_t gbegin, int64_t gend) { fwd_rows(a, gbegin, gend); });
  });
  return {out, sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, bool rms, double eps, const c10::optional<at::Tensor>& dsum_in,
    c10::optional<at::ScalarType> residual_dtype) {
  const char* op = "layer_norm_bwd";
  const NormShape s = check_args(op, x_in, weight, bias);
  TORCH_CHECK(dout_in.sizes() == x_in.sizes(), op, ": dout must be x's shape ", x_in.sizes(), ", got ",
              dout_in.sizes());
  TORCH_CHECK(dout_in.device().is_cpu(), op, ": dout on ", dout_in.device());
  const at::ScalarType in_t = x_in.scalar_type(), out_t = out_of(op, x_in, dout_in.scalar_type());
  const at::ScalarType acc = acc_of(in_t), res_t = res_of(op, in_t, out_t, residual_dtype);
  at::Tensor dsum;
  if (dsum_in.has_value()) {
    TORCH_CHECK(dsum_in->sizes() == x_in.sizes() && dsum_in->scalar_type() == in_t && dsum_in->device().is_cpu(),
                op, ": dsum must be a CPU tensor of x's shape and dtype");
    dsum = dsum_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous(), dout = dout_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dres = residual_dtype.has_value() ? at::empty(x.sizes(), x.options().dtype(res_t))
                                               : at::empty({0}, x.options());
  const at::Tensor w = param_of(acc, weight);
  const int64_t C = s.C, n_chunks = std::min<int64_t>(kChunks, s.rows);
  // per chunk: [d weight (C) | d bias (C)], the sums over its rows in row order
  at::Tensor part = at::zeros({n_chunks, 2 * C}, x.options().dtype(acc));
  std::vector<double> sums(2 * C, 0.0);
  if (dx.numel() > 0) {
    dispatch_io(in_t, out_t, res_t, s, rms, eps, w, [&](auto a) {
      using Args = decltype(a);
      using I = typename Args::in_type;
      a.x = x.const_data_ptr<I>();
      a.dy = dout.const_data_ptr<typename Args::out_type>();
      a.dsum = ptr_or_null<const I>(dsum);
      a.dx = dx.mutable_data_ptr<I>();
      a.dres = residual_dtype.has_value() ? dres.mutable_data_ptr<typename Args::res_type>() : nullptr;
      typename Args::acc_t* P = part.mutable_data_ptr<typename Args::acc_t>();
      const int64_t per = (s.rows + n_chunks - 1) / n_chunks;
      at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
        for (int64_t c = cbegin; c < cend; ++c) {
          bwd_rows(a, std::min(s.rows, c * per), std::min(s.rows, (c + 1) * per), P + c * 2 * C, P + c * 2 * C + C);
        }
      });
      for (int64_t c = 0; c < n_chunks; ++c) {  // the chunks' partials, summed in chunk order
        for (int64_t i = 0; i < 2 * C; ++i) sums[i] += P[c * 2 * C + i];
      }
    });
  }
  const at::Tensor all = at::tensor(sums, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor dw = weight.has_value() ? all.slice(0, 0, C).to(weight->scalar_type()) : at::empty({0}, x.options());
  const at::Tensor db = bias.has_value() ? all.slice(0, C, 2 * C).to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db, dres};
}

// Autograd in C++, the forward and backward ops called through the dispatcher (so that tracing sees
// them): a Python formula (torch.library.register_autograd) costs some 25 us per call on top, more
// than the kernels take at the default model's size.
class LayerNormFn : public torch::autograd::Function<LayerNormFn> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, bool rms, double eps,
                                                c10::optional<at::ScalarType> out_dtype,
                                                const c10::optional<at::Tensor>& residual) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::layer_norm_fwd", "")
                          .typed<decltype(layer_norm_fwd_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sum] = fwd.call(x, weight, bias, rms, eps, out_dtype, residual);
    const bool has_res = residual.has_value();
    // the backward normalises s = x + residual again: save s (an output) or x
    ctx->save_for_backward({has_res ? sum : x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())});
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["out_dtype"] = out.scalar_type();
    if (has_res) {
      ctx->saved_data["res_dtype"] = residual->scalar_type();
    } else {
      ctx->mark_non_differentiable({sum});
    }
    ctx->set_materialize_grads(false);
    return {out, sum};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::layer_norm_bwd", "")
                          .typed<decltype(layer_norm_bwd_cpu)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2];
    const bool has_res = ctx->saved_data.count("res_dtype") > 0;
    at::Tensor dout = grads[0];
    if (!dout.defined()) {  // only s was used: a zero d(norm)
      dout = at::zeros(x.sizes(), x.options().dtype(ctx->saved_data["out_dtype"].toScalarType()));
    }
    const c10::optional<at::Tensor> weight = w.defined() ? c10::optional<at::Tensor>(w) : c10::nullopt;
    const c10::optional<at::Tensor> bias = b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt;
    const c10::optional<at::Tensor> dsum =
        has_res && grads[1].defined() ? c10::optional<at::Tensor>(grads[1]) : c10::nullopt;
    const c10::optional<at::ScalarType> res_dtype =
        has_res ? c10::optional<at::ScalarType>(ctx->saved_data["res_dtype"].toScalarType()) : c10::nullopt;
    auto [dx, dw, db, dres] = bwd.call(dout, x, weight, bias, ctx->saved_data["rms"].toBool(),
                                       ctx->saved_data["eps"].toDouble(), dsum, res_dtype);
    return {dx,          w.defined() ? dw : at::Tensor(), b.defined() ? db : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(),                    has_res ? dres : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> layer_norm_fwd_autograd(const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias, bool rms,
                                                           double eps, c10::optional<at::ScalarType> out_dtype,
                                                           const c10::optional<at::Tensor>& residual) {
  auto outs = LayerNormFn::apply(x, weight, bias, rms, eps, out_dtype, residual);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("layer_norm_fwd", &fastlm::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &fastlm::layer_norm_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("layer_norm_fwd", &fastlm::layer_norm_fwd_autograd); }
