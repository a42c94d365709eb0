// CPU SwiGLU: out = silu(gate) * up, and its backward
//   d_up = dout * silu(g),  d_gate = dout * up * sig(g) * (1 + g * (1 - sig(g))).
// Fused (one pass over memory), vectorised with at::vec::Vectorized, parallel with
// at::parallel_for; math in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>

#include "op_checks.h"

namespace fastlm {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 16384;  // elements per parallel chunk

// Load/store `n` (<= one vector of scalar_t) elements as compute-type vectors. For fp32/fp64 that is
// one vector; for bf16/fp16 one Vectorized<scalar_t> becomes two Vectorized<float>.
template <typename scalar_t>
struct VecIO;

template <typename scalar_t>
struct VecIO {  // float, double: compute type == storage type
  using acc_t = scalar_t;
  using AVec = Vectorized<acc_t>;
  static constexpr int64_t kStep = AVec::size();
  template <typename F>
  static void apply(const scalar_t* const* in, scalar_t* const* out, int n_in, int n_out,
                    int64_t count, F f) {
    AVec a[3], r[2];
    for (int t = 0; t < n_in; ++t)
      a[t] = count == kStep ? AVec::loadu(in[t]) : AVec::loadu(in[t], count);
    f(a, r);
    for (int t = 0; t < n_out; ++t) {
      if (count == kStep) r[t].store(out[t]); else r[t].store(out[t], count);
    }
  }
};

template <typename scalar_t>
struct ReducedVecIO {  // bf16, fp16: compute in float
  using acc_t = float;
  using AVec = Vectorized<float>;
  using SVec = Vectorized<scalar_t>;
  static constexpr int64_t kStep = SVec::size();  // == 2 * AVec::size()
  template <typename F>
  static void apply(const scalar_t* const* in, scalar_t* const* out, int n_in, int n_out,
                    int64_t count, F f) {
    AVec lo[3], hi[3], rlo[2], rhi[2];
    for (int t = 0; t < n_in; ++t) {
      SVec s = count == kStep ? SVec::loadu(in[t]) : SVec::loadu(in[t], count);
      std::tie(lo[t], hi[t]) = at::vec::convert_to_float<scalar_t>(s);
    }
    f(lo, rlo);
    f(hi, rhi);
    for (int t = 0; t < n_out; ++t) {
      SVec s = at::vec::convert_from_float<scalar_t>(rlo[t], rhi[t]);
      if (count == kStep) s.store(out[t]); else s.store(out[t], count);
    }
  }
};

template <typename scalar_t>
using IO = std::conditional_t<std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>,
                              VecIO<scalar_t>, ReducedVecIO<scalar_t>>;

template <typename scalar_t, typename F>
void elementwise(const scalar_t* const* in, scalar_t* const* out, int n_in, int n_out, int64_t n,
                 F f) {
  using io = IO<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const scalar_t* ip[3];
    scalar_t* op[2];
    for (int64_t i = begin; i < end; i += io::kStep) {
      const int64_t count = std::min<int64_t>(io::kStep, end - i);
      for (int t = 0; t < n_in; ++t) ip[t] = in[t] + i;
      for (int t = 0; t < n_out; ++t) op[t] = out[t] + i;
      io::apply(ip, op, n_in, n_out, count, f);
    }
  });
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_args("swiglu_fwd", gate, up);
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), "swiglu_fwd: unsupported dtype ",
              gate.scalar_type());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const int64_t n = g.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_fwd_cpu", [&] {
    using AVec = Vectorized<typename IO<scalar_t>::acc_t>;
    const scalar_t* in[2] = {g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>()};
    scalar_t* o[1] = {out.mutable_data_ptr<scalar_t>()};
    elementwise<scalar_t>(in, o, 2, 1, n, [](const AVec* a, AVec* r) {
      const AVec one(1);
      const AVec sig = one / (one + a[0].neg().exp());
      r[0] = a[0] * sig * a[1];
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dout, const at::Tensor& gate,
                                                  const at::Tensor& up) {
  check_swiglu_args("swiglu_bwd", gate, up);
  TORCH_CHECK(dout.sizes() == gate.sizes() && dout.scalar_type() == gate.scalar_type(),
              "swiglu_bwd: dout must match gate's shape and dtype");
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), "swiglu_bwd: unsupported dtype ",
              gate.scalar_type());
  const at::Tensor d = dout.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(up.sizes(), up.options());
  const int64_t n = g.numel();
  if (n == 0) return {dgate, dup};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_bwd_cpu", [&] {
    using AVec = Vectorized<typename IO<scalar_t>::acc_t>;
    const scalar_t* in[3] = {d.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                             u.const_data_ptr<scalar_t>()};
    scalar_t* o[2] = {dgate.mutable_data_ptr<scalar_t>(), dup.mutable_data_ptr<scalar_t>()};
    elementwise<scalar_t>(in, o, 3, 2, n, [](const AVec* a, AVec* r) {
      const AVec one(1);
      const AVec& dy = a[0];
      const AVec& x = a[1];
      const AVec sig = one / (one + x.neg().exp());
      const AVec silu = x * sig;
      r[0] = dy * a[2] * sig * (one + x * (one - sig));
      r[1] = dy * silu;
    });
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("swiglu_fwd", &fastlm::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &fastlm::swiglu_bwd_cpu);
}
