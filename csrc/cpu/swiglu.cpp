// CPU SwiGLU: out = silu(gate) * up, and its backward
//   d_up = dout * silu(g),  d_gate = dout * up * sig(g) * (1 + g * (1 - sig(g))).
// Two layouts: split (gate and up are separate tensors of one shape) and packed (one tensor
// x = [..., 2 * hidden] holding [gate | up] along the last dim, what the model's fused
// up-projection produces; read in place with its row stride, gradient written as one fresh
// [..., 2 * hidden] tensor, so neither direction copies or concatenates).
// Fused (one pass over memory), vectorised with at::vec::Vectorized, parallel with
// at::parallel_for; math in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "op_checks.h"

namespace fastlm {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 16384;  // elements per parallel chunk

// Load/store one vector of scalar_t (`count` < kStep elements at a row's tail) as compute-type
// vectors. For fp32/fp64 that is one vector; for bf16/fp16 one Vectorized<scalar_t> becomes two
// Vectorized<float>. The tensor counts are template parameters: the loops over them unroll and the
// vectors stay in registers (with runtime counts they went through the stack: measured 2-3x slower).
template <typename scalar_t>
struct VecIO {  // float, double: compute type == storage type
  using acc_t = scalar_t;
  using AVec = Vectorized<acc_t>;
  static constexpr int64_t kStep = AVec::size();
  template <int NIn, int NOut, typename F>
  static inline void apply(const scalar_t* const* in, scalar_t* const* out, int64_t count, F f) {
    AVec a[NIn], r[NOut];
    if (count == kStep) {
      for (int t = 0; t < NIn; ++t) a[t] = AVec::loadu(in[t]);
      f(a, r);
      for (int t = 0; t < NOut; ++t) r[t].store(out[t]);
    } else {
      for (int t = 0; t < NIn; ++t) a[t] = AVec::loadu(in[t], count);
      f(a, r);
      for (int t = 0; t < NOut; ++t) r[t].store(out[t], count);
    }
  }
};

template <typename scalar_t>
struct ReducedVecIO {  // bf16, fp16: compute in float
  using acc_t = float;
  using AVec = Vectorized<float>;
  using SVec = Vectorized<scalar_t>;
  static constexpr int64_t kStep = SVec::size();  // == 2 * AVec::size()
  template <int NIn, int NOut, typename F>
  static inline void apply(const scalar_t* const* in, scalar_t* const* out, int64_t count, F f) {
    AVec lo[NIn], hi[NIn], rlo[NOut], rhi[NOut];
    for (int t = 0; t < NIn; ++t) {
      SVec s = count == kStep ? SVec::loadu(in[t]) : SVec::loadu(in[t], count);
      std::tie(lo[t], hi[t]) = at::vec::convert_to_float<scalar_t>(s);
    }
    f(lo, rlo);
    f(hi, rhi);
    for (int t = 0; t < NOut; ++t) {
      SVec s = at::vec::convert_from_float<scalar_t>(rlo[t], rhi[t]);
      if (count == kStep) s.store(out[t]); else s.store(out[t], count);
    }
  }
};

template <typename scalar_t>
using IO = std::conditional_t<std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>,
                              VecIO<scalar_t>, ReducedVecIO<scalar_t>>;

// `cols` elements of NIn inputs -> NOut outputs, all contiguous from the given pointers.
template <typename scalar_t, int NIn, int NOut, typename F>
inline void span(const scalar_t* const* in, scalar_t* const* out, int64_t cols, F f) {
  using io = IO<scalar_t>;
  const scalar_t* ip[NIn];
  scalar_t* op[NOut];
  for (int64_t i = 0; i < cols; i += io::kStep) {
    for (int t = 0; t < NIn; ++t) ip[t] = in[t] + i;
    for (int t = 0; t < NOut; ++t) op[t] = out[t] + i;
    io::template apply<NIn, NOut>(ip, op, std::min<int64_t>(io::kStep, cols - i), f);
  }
}

template <typename scalar_t, int NIn, int NOut, typename F>
void elementwise(const scalar_t* const* in, scalar_t* const* out, int64_t n, F f) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const scalar_t* ip[NIn];
    scalar_t* op[NOut];
    for (int t = 0; t < NIn; ++t) ip[t] = in[t] + begin;
    for (int t = 0; t < NOut; ++t) op[t] = out[t] + begin;
    span<scalar_t, NIn, NOut>(ip, op, end - begin, f);
  });
}

// Row-wise variant: `rows` rows of `cols` elements; tensor t's row r starts at ptr[t] + r * stride[t]
// (each row contiguous). Parallel over whole rows.
template <typename scalar_t, int NIn, int NOut, typename F>
void rowwise(const scalar_t* const* in, const int64_t* in_stride, scalar_t* const* out,
             const int64_t* out_stride, int64_t rows, int64_t cols, F f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const scalar_t* ip[NIn];
    scalar_t* op[NOut];
    for (int64_t r = begin; r < end; ++r) {
      for (int t = 0; t < NIn; ++t) ip[t] = in[t] + r * in_stride[t];
      for (int t = 0; t < NOut; ++t) op[t] = out[t] + r * out_stride[t];
      span<scalar_t, NIn, NOut>(ip, op, cols, f);
    }
  });
}

// The math of both layouts, on compute-type vectors.
template <typename AVec>
inline AVec swiglu_fwd_math(const AVec& g, const AVec& u) {
  const AVec one(1);
  const AVec sig = one / (one + g.neg().exp());
  return g * sig * u;
}

template <typename AVec>
inline void swiglu_bwd_math(const AVec& dy, const AVec& x, const AVec& u, AVec& dg, AVec& du) {
  const AVec one(1);
  const AVec sig = one / (one + x.neg().exp());
  dg = dy * u * sig * (one + x * (one - sig));
  du = dy * x * sig;
}

// Outputs of 32 MiB and more: 2 MiB-aligned memory advised as transparent huge pages (Linux). glibc
// serves blocks that large with a fresh mmap every time (32 MiB is its largest mmap threshold), so
// an elementwise kernel's time is dominated by the page faults of its new outputs (measured: filling
// a new 64 MiB tensor costs 5x filling a reused one); huge pages take 512x fewer faults. Smaller
// outputs (reused from the heap: no faults), other systems, or a failed allocation: at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= 16 * kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, rounded) == 0) {
      madvise(p, rounded, MADV_HUGEPAGE);  // advice only: fine if THP is off
      return at::from_blob(p, sizes, [](void* q) { std::free(q); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_args("swiglu_fwd", gate, up);
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), "swiglu_fwd: unsupported dtype ",
              gate.scalar_type());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = empty_output(gate.sizes(), gate.options());
  const int64_t n = g.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_fwd_cpu", [&] {
    using AVec = Vectorized<typename IO<scalar_t>::acc_t>;
    const scalar_t* in[2] = {g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>()};
    scalar_t* o[1] = {out.mutable_data_ptr<scalar_t>()};
    elementwise<scalar_t, 2, 1>(in, o, n,
                          [](const AVec* a, AVec* r) { r[0] = swiglu_fwd_math(a[0], a[1]); });
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
  at::Tensor dgate = empty_output(gate.sizes(), gate.options());
  at::Tensor dup = empty_output(up.sizes(), up.options());
  const int64_t n = g.numel();
  if (n == 0) return {dgate, dup};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_bwd_cpu", [&] {
    using AVec = Vectorized<typename IO<scalar_t>::acc_t>;
    const scalar_t* in[3] = {d.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                             u.const_data_ptr<scalar_t>()};
    scalar_t* o[2] = {dgate.mutable_data_ptr<scalar_t>(), dup.mutable_data_ptr<scalar_t>()};
    elementwise<scalar_t, 3, 2>(in, o, n, [](const AVec* a, AVec* r) {
      swiglu_bwd_math(a[0], a[1], a[2], r[0], r[1]);
    });
  });
  return {dgate, dup};
}

at::Tensor cpu_packed_rows(const char* op, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": unsupported dtype ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  return packed_rows(op, x);
}

at::Tensor swiglu_packed_fwd_cpu(const at::Tensor& x) {
  const char* op = "swiglu_packed_fwd";
  const at::Tensor x2 = cpu_packed_rows(op, x);
  const int64_t rows = x2.size(0), hidden = x2.size(1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = hidden;
  at::Tensor out = empty_output(shape, x.options());
  if (rows == 0 || hidden == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "swiglu_packed_fwd", [&] {
    using AVec = Vectorized<typename IO<scalar_t>::acc_t>;
    const scalar_t* base = x2.const_data_ptr<scalar_t>();
    const int64_t sx = x2.stride(0);
    const scalar_t* in[2] = {base, base + hidden};
    const int64_t in_stride[2] = {sx, sx};
    scalar_t* o[1] = {out.mutable_data_ptr<scalar_t>()};
    const int64_t out_stride[1] = {hidden};
    rowwise<scalar_t, 2, 1>(in, in_stride, o, out_stride, rows, hidden,
                      [](const AVec* a, AVec* r) { r[0] = swiglu_fwd_math(a[0], a[1]); });
  });
  return out;
}

at::Tensor swiglu_packed_bwd_cpu(const at::Tensor& dout, const at::Tensor& x) {
  const char* op = "swiglu_packed_bwd";
  const at::Tensor x2 = cpu_packed_rows(op, x);
  const int64_t rows = x2.size(0), hidden = x2.size(1) / 2;
  TORCH_CHECK(dout.dim() == x.dim() && dout.scalar_type() == x.scalar_type() &&
                  dout.device() == x.device() && dout.numel() == rows * hidden &&
                  dout.size(-1) == hidden,
              op, ": dout must have x's shape with the last dim halved and x's dtype; got dout ",
              dout.sizes(), " for x ", x.sizes());
  const at::Tensor d = dout.contiguous();
  at::Tensor dx = empty_output(x.sizes(), x.options());  // fresh, contiguous: [rows, 2 * hidden]
  if (rows == 0 || hidden == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "swiglu_packed_bwd", [&] {
    using AVec = Vectorized<typename IO<scalar_t>::acc_t>;
    const scalar_t* base = x2.const_data_ptr<scalar_t>();
    const int64_t sx = x2.stride(0);
    const scalar_t* in[3] = {d.const_data_ptr<scalar_t>(), base, base + hidden};
    const int64_t in_stride[3] = {hidden, sx, sx};
    scalar_t* dbase = dx.mutable_data_ptr<scalar_t>();
    scalar_t* o[2] = {dbase, dbase + hidden};
    const int64_t out_stride[2] = {2 * hidden, 2 * hidden};
    rowwise<scalar_t, 3, 2>(in, in_stride, o, out_stride, rows, hidden, [](const AVec* a, AVec* r) {
      swiglu_bwd_math(a[0], a[1], a[2], r[0], r[1]);
    });
  });
  return dx;
}

// The packed op's autograd for CPU tensors in C++ (the ops called through the dispatcher, so that
// tracing sees them; registered for AutogradCPU, so CUDA tensors keep the Python formula of
// fastlm/ops/extension.py): a Python formula costs some 20 us per call on top (see layer_norm.cpp).
class SwigluPackedFn : public torch::autograd::Function<SwigluPackedFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::swiglu_packed_fwd", "")
                          .typed<decltype(swiglu_packed_fwd_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    return fwd.call(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastlm::swiglu_packed_bwd", "")
                          .typed<decltype(swiglu_packed_bwd_cpu)>();
    return {bwd.call(grads[0], ctx->get_saved_variables()[0])};
  }
};

at::Tensor swiglu_packed_fwd_autograd(const at::Tensor& x) { return SwigluPackedFn::apply(x); }

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("swiglu_fwd", &fastlm::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &fastlm::swiglu_bwd_cpu);
  m.impl("swiglu_packed_fwd", &fastlm::swiglu_packed_fwd_cpu);
  m.impl("swiglu_packed_bwd", &fastlm::swiglu_packed_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fastlm, AutogradCPU, m) { m.impl("swiglu_packed_fwd", &fastlm::swiglu_packed_fwd_autograd); }
