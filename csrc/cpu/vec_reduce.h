// Vector reductions shared by the CPU kernels (at::vec::Vectorized lanes: a plain loop would be one
// serial chain, as the compiler may not reorder a floating-point sum).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace fastlm {

// sum_i (a[i] - shift) * b[i] for i < n; b == nullptr: sum_i (a[i] - shift)^2.
template <typename acc_t>
inline acc_t vdot(const acc_t* a, const acc_t* b, int64_t n, acc_t shift = acc_t(0)) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec sv(shift);
  Vec acc(acc_t(0));
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const Vec x = Vec::loadu(a + i) - sv;
    acc = at::vec::fmadd(x, b ? Vec::loadu(b + i) : x, acc);
  }
  if (i < n) {  // the tail: lanes >= n - i stay 0
    const Vec x = Vec::set(Vec(acc_t(0)), Vec::loadu(a + i, n - i) - sv, n - i);
    acc = at::vec::fmadd(x, b ? Vec::loadu(b + i, n - i) : x, acc);
  }
  return at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, acc);
}

template <typename acc_t>
inline acc_t vsum(const acc_t* a, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc(acc_t(0));
  int64_t i = 0;
  for (; i + V <= n; i += V) acc = acc + Vec::loadu(a + i);
  if (i < n) acc = acc + Vec::set(Vec(acc_t(0)), Vec::loadu(a + i, n - i), n - i);
  return at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, acc);
}

}  // namespace fastlm
