// CPU Muon step: the whole update of fastlm.optim.Muon for a list of 2-D float32/float64 matrices
// in one op, each matrix start to finish on one thread:
//
//   buf <- lerp(buf, g, 1 - mu);  u = lerp(g, buf, mu) (Nesterov) or buf
//   O = NS_k(u)                   k quintic Newton-Schulz steps on the wide orientation of u / ||u||_F
//   p <- p (1 - lr wd) - lr sqrt(max(1, rows / cols)) O
//
// The Newton-Schulz iteration is the one of fastlm.optim.newton_schulz_many (its PyTorch code is the
// reference): X <- a X + (b A + c A^2) X with A = X X^T, or, when the matrix is more than 1.5x wider
// than high and k > 1, the same polynomial in its Gram form (every iterate is Q X_0 with Q a
// polynomial in A_0 = X_0 X_0^T: P = a + b A + c A^2, Q <- P Q, A <- P A P; then O = Q X_0).
//
// bf16_products (float32 parameters; a CPU bfloat16 run's): every product's operands rounded to bf16
// (nearest even) and summed in float32 by the VDPBF16PS micro-kernels of bf16_gemm.h (plain loops where
// the CPU lacks them), all else in float32 as above, and always the direct iteration (see gram_form).
//
// Why an op: at the default model's sizes (96 x 96 .. 96 x 512) the products are small, and the
// PyTorch form spends as much time in dispatch, stacking and elementwise passes as in the GEMMs, and
// its batched matmuls split each product across threads. Here the matrices are dealt to the threads
// by their flop counts (longest first, each to the least loaded thread) and every product is one
// single-threaded BLAS call (csrc/cpu/blas.h) on per-thread workspaces, so a matrix's result does not
// depend on which thread ran it, nor on the other matrices of the call. (It may differ in the last
// bit between one thread and several: MKL's single-thread calls outside a parallel region take
// another path; any one thread count gives the same bits run after run.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/blas.h"

namespace fastlm {
namespace {

using at::vec::Vectorized;

// torch's lerp, as its vectorised kernel computes it: fma(w, end - start, start) for |w| < 0.5, else
// fma(w - 1, end - start, end).
template <typename T>
struct Lerp {
  T coeff;
  bool small;
  explicit Lerp(T w) : coeff(std::abs(w) < T(0.5) ? w : w - T(1)), small(std::abs(w) < T(0.5)) {}
  T operator()(T start, T end) const { return std::fma(coeff, end - start, small ? start : end); }
  Vectorized<T> operator()(const Vectorized<T>& start, const Vectorized<T>& end) const {
    return at::vec::fmadd(Vectorized<T>(coeff), end - start, small ? start : end);
  }
};

// Is the Gram form used for a wide m x n matrix (m <= n)? The rule of newton_schulz_many: never with
// bf16 products (A squares the singular values: in bf16 the polynomial drifts, measured 0.2-1.1
// relative error on the default model's gradients, 1.1-1.5e-2 for the direct form).
inline bool gram_form(int64_t m, int64_t n, int64_t steps, bool bf16) { return !bf16 && 2 * n > 3 * m && steps > 1; }

// Flops of one matrix's Newton-Schulz (the thread dealing's weights).
double ns_flops(int64_t rows, int64_t cols, int64_t steps, bool bf16) {
  const double m = double(std::min(rows, cols)), n = double(std::max(rows, cols));
  if (gram_form(int64_t(m), int64_t(n), steps, bf16)) return 4 * m * m * n + (8.0 * steps - 6) * m * m * m;
  return steps * (4 * m * m * n + 2 * m * m * m);
}

// Per-thread buffers, 64-byte aligned (MKL's results may depend on the alignment of its operands).
template <typename T>
struct Buffer {
  std::unique_ptr<T, void (*)(void*)> ptr{nullptr, c10::free_cpu};
  int64_t size = 0;
  T* data() { return ptr.get(); }
  void resize(int64_t n) {
    if (n > size) {
      ptr.reset(static_cast<T*>(c10::alloc_cpu(n * sizeof(T))));
      size = n;
    }
  }
};

template <typename T>
struct Workspace {
  Buffer<T> X, Y, A, P, Q, R;
  Buffer<uint16_t> pa, pb;  // bf16 operands of the bf16 products
  bool bf16 = false;        // the products take bf16 operands (float32 sums): float only
  void reserve(int64_t m, int64_t n) {
    for (auto* v : {&X, &Y}) v->resize(m * n);
    for (auto* v : {&A, &P, &Q, &R}) v->resize(m * m);
  }
};

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// C = alpha op(X) op(Y) + beta C (row-major, op = transpose where tx/ty; op(X) m x k, op(Y) k x n):
// one single-threaded BLAS call, or with ws.bf16 the same product of X and Y rounded to bf16 (to
// nearest even) summed in float32 (bf16_gemm.h; plain loops where the CPU lacks AVX512-BF16).
template <typename T>
void product(Workspace<T>& ws, bool tx, bool ty, int64_t m, int64_t n, int64_t k, T alpha, const T* X,
             int64_t ldx, const T* Y, int64_t ldy, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (ws.bf16) {
      const int64_t k2 = (k + 1) / 2, n_pad = pad16(n);
      const uint16_t* A;
      int64_t a_rs, a_ps;
      if (!tx) {  // X: m rows of k, packed as bf16 rows (even length)
        ws.pa.resize(m * 2 * k2);
        bf16::rows(X, ldx, m, k, ws.pa.data(), 2 * k2, 2 * k2);
        A = ws.pa.data(), a_rs = 2 * k2, a_ps = 2;
      } else {  // X: k rows of m; its pair pack read transposed
        const int64_t ldp = 2 * pad16(m);
        ws.pa.resize(k2 * ldp);
        bf16::pairs(X, ldx, k, m, ws.pa.data(), ldp, pad16(m));
        A = ws.pa.data(), a_rs = 2, a_ps = ldp;
      }
      ws.pb.resize(k2 * 2 * n_pad);
      if (!ty) {
        bf16::pairs(Y, ldy, k, n, ws.pb.data(), 2 * n_pad, n_pad);
      } else {
        bf16::pairs_t(Y, ldy, n, k, ws.pb.data(), 2 * n_pad, n_pad);
      }
      if (beta != T(0) && beta != T(1)) {
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j < n; ++j) C[r * ldc + j] *= beta;
      }
      bf16::gemm(m, n, k2, A, a_rs, a_ps, ws.pb.data(), 2 * n_pad, C, ldc, beta != T(0), alpha);
      return;
    }
  }
  gemm_rm(tx, ty, m, n, k, alpha, X, ldx, Y, ldy, beta, C, ldc);
}

// P = b A + c A A + a I (m x m, A symmetric): baddbmm(A, A, A, beta=b, alpha=c) then the diagonal.
template <typename T>
inline void quintic(Workspace<T>& ws, T* P, const T* A, int64_t m, T a, T b, T c) {
  std::copy(A, A + m * m, P);
  product(ws, false, false, m, m, m, c, A, m, A, m, b, P, m);
  for (int64_t i = 0; i < m; ++i) P[i * m + i] += a;
}

// One matrix: momentum, Newton-Schulz, decay and update, in place on p and buf. Every buffer keeps
// the parameter's (rows x cols) layout: the wide matrix X of the iteration is S (rows <= cols) or
// S^T (a tall S), and the products take the matching BLAS transposes, so nothing is transposed in
// memory and every elementwise pass is contiguous.
template <typename T>
void muon_one(T* p, const T* g, T* buf, int64_t rows, int64_t cols, double lr, T mu, bool nesterov, double wd,
              int64_t steps, T a, T b, T c, T eps, Workspace<T>& ws) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t numel = rows * cols;
  const bool tall = rows > cols;
  const int64_t m = tall ? cols : rows, n = tall ? rows : cols;
  ws.reserve(m, n);
  T* S = ws.X.data();
  // momentum and the update u into S; ||u||^2 on the way
  const Lerp<T> to_grad(T(1) - mu), to_buf(mu);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + V <= numel; i += V) {
    const Vec gv = Vec::loadu(g + i), bv = to_grad(Vec::loadu(buf + i), gv);
    bv.store(buf + i);
    const Vec u = nesterov ? to_buf(gv, bv) : bv;
    u.store(S + i);
    acc = at::vec::fmadd(u, u, acc);
  }
  T sq = at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return x + y; }, acc);
  for (; i < numel; ++i) {
    const T bi = to_grad(buf[i], g[i]);
    buf[i] = bi;
    const T u = nesterov ? to_buf(g[i], bi) : bi;
    S[i] = u;
    sq += u * u;
  }
  const Vec norm(std::max(std::sqrt(sq), eps));
  for (i = 0; i + V <= numel; i += V) (Vec::loadu(S + i) / norm).store(S + i);
  if (i < numel) (Vec::loadu(S + i, numel - i) / norm).store(S + i, numel - i);
  // A = X X^T: S S^T, or S^T S for a tall S
  const auto gram = [&](const T* Sx, T* A) {
    product(ws, tall, !tall, m, m, n, T(1), Sx, cols, Sx, cols, T(0), A, m);
  };
  T* O = ws.Y.data();  // the result, rows x cols
  if (gram_form(m, n, steps, ws.bf16)) {
    T *A = ws.A.data(), *P = ws.P.data(), *Q = ws.Q.data(), *R = ws.R.data();
    gram(S, A);
    for (int64_t k = 0; k < steps; ++k) {
      quintic(ws, P, A, m, a, b, c);
      if (k == 0) {
        std::copy(P, P + m * m, Q);
      } else {  // Q <- P Q
        product(ws, false, false, m, m, m, T(1), P, m, Q, m, T(0), R, m);
        std::swap(ws.Q, ws.R);
        Q = ws.Q.data();
        R = ws.R.data();
      }
      if (k + 1 < steps) {  // A <- (P A) P
        product(ws, false, false, m, m, m, T(1), P, m, A, m, T(0), R, m);
        product(ws, false, false, m, m, m, T(1), R, m, P, m, T(0), A, m);
      }
    }
    if (tall) {  // O^T = Q X_0, so O = S Q^T
      product(ws, false, true, n, m, m, T(1), S, m, Q, m, T(0), O, m);
    } else {
      product(ws, false, false, m, n, m, T(1), Q, m, S, n, T(0), O, n);
    }
  } else {
    T *A = ws.A.data(), *B = ws.P.data();
    for (int64_t k = 0; k < steps; ++k) {
      gram(S, A);
      quintic(ws, B, A, m, T(0), b, c);  // B = b A + c A^2
      std::copy(S, S + numel, O);     // X <- a X + B X: O = a S + B S, or a S + S B^T when tall
      if (tall) {
        product(ws, false, true, n, m, m, T(1), S, m, B, m, a, O, m);
      } else {
        product(ws, false, false, m, n, m, T(1), B, m, S, n, a, O, n);
      }
      std::swap(ws.X, ws.Y);
      S = ws.X.data();
      O = ws.Y.data();
    }
    O = S;
  }
  // p <- p (1 - lr wd) + (-lr s) O; the two factors in double, as the PyTorch form's Python floats
  const T step = T(-lr * std::sqrt(std::max(1.0, double(rows) / double(cols))));
  const T decay = T(1.0 - lr * wd);
  const Vec step_v(step), decay_v(decay);
  for (i = 0; i + V <= numel; i += V) {
    Vec v = Vec::loadu(p + i);
    if (wd != 0) v = v * decay_v;
    (v + step_v * Vec::loadu(O + i)).store(p + i);
  }
  for (; i < numel; ++i) {
    T v = p[i];
    if (wd != 0) v = v * decay;
    p[i] = v + step * O[i];
  }
}

// The matrices run on several threads, each writing its parameter and momentum buffer: no written
// tensor may share memory with another tensor of the call (one parameter listed twice, a buffer
// shared by two parameters, a buffer that is a parameter). Gradients are only read and may repeat.
void check_no_overlap(at::TensorList params, at::TensorList grads, at::TensorList bufs) {
  struct Span {
    uintptr_t begin, end;
    bool written;
  };
  std::vector<Span> spans;
  for (const auto& [list, written] : {std::pair{params, true}, {bufs, true}, {grads, false}}) {
    for (const at::Tensor& t : list) {
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({begin, begin + uintptr_t(t.numel()) * t.element_size(), written});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.begin < y.begin; });
  uintptr_t end_any = 0, end_written = 0;  // the furthest end of the spans so far
  for (const Span& s : spans) {
    TORCH_CHECK(s.begin >= (s.written ? end_any : end_written), "muon_step: a parameter or momentum buffer ",
                "overlaps another tensor of the call (a tensor listed twice?); each matrix is updated on its own ",
                "thread");
    end_any = std::max(end_any, s.end);
    if (s.written) end_written = std::max(end_written, s.end);
  }
}

void muon_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                   bool nesterov, double weight_decay, int64_t ns_steps, at::ArrayRef<double> coefficients,
                   double eps, bool bf16_products) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && bufs.size() == n, "muon_step: params, grads and momentum buffers must be "
              "lists of one length, got ", n, ", ", grads.size(), ", ", bufs.size());
  TORCH_CHECK(coefficients.size() == 3, "muon_step: ns_coefficients must be (a, b, c), got ",
              coefficients.size(), " numbers");
  TORCH_CHECK(ns_steps >= 1, "muon_step: ns_steps must be >= 1, got ", ns_steps);
  if (n == 0) return;
  const auto dt = params[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "muon_step: takes float32/float64 parameters, got ", dt);
  TORCH_CHECK(!bf16_products || dt == at::kFloat, "muon_step: bf16_products takes float32 parameters, got ", dt);
  TORCH_CHECK(blas_linked(static_cast<float*>(nullptr)), "muon_step: needs the BLAS torch links (sgemm_)");
  std::vector<double> cost(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = bufs[i];
    TORCH_CHECK(p.dim() == 2, "muon_step: parameter ", i, " is not 2-D: ", p.sizes());
    for (const at::Tensor* t : {&p, &g, &m}) {
      TORCH_CHECK(t->device().is_cpu(), "muon_step: expected CPU tensors, got ", t->device());
      TORCH_CHECK(t->scalar_type() == dt, "muon_step: every tensor must be ", dt, ", got ", t->scalar_type());
      TORCH_CHECK(t->sizes() == p.sizes(), "muon_step: grad/buffer ", i, " has shape ", t->sizes(),
                  ", its parameter ", p.sizes());
      TORCH_CHECK(t->is_contiguous(), "muon_step: tensor ", i, " is not contiguous");
    }
    TORCH_CHECK(p.numel() > 0, "muon_step: parameter ", i, " is empty");
    cost[i] = ns_flops(p.size(0), p.size(1), ns_steps, bf16_products);
  }
  check_no_overlap(params, grads, bufs);
  // deal the matrices to the threads: longest first, each to the least loaded (ties: lowest index)
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(n)));
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return cost[x] > cost[y]; });
  std::vector<std::vector<size_t>> share(n_threads);
  std::vector<double> load(n_threads, 0.0);
  for (size_t i : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    share[t].push_back(i);
    load[t] += cost[i];
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "muon_step_cpu", [&] {
    using T = scalar_t;
    const T a = T(coefficients[0]), b = T(coefficients[1]), c = T(coefficients[2]);
    at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws;
      ws.bf16 = bf16_products;
      for (int64_t t = begin; t < end; ++t) {
        for (size_t i : share[t]) {
          const at::Tensor &p = params[i], &g = grads[i], &m = bufs[i];
          muon_one<T>(p.mutable_data_ptr<T>(), g.const_data_ptr<T>(), m.mutable_data_ptr<T>(), p.size(0),
                      p.size(1), lr, T(momentum), nesterov, weight_decay, ns_steps, a, b, c, T(eps), ws);
        }
      }
    });
  });
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("muon_step_", &fastlm::muon_step_cpu); }
