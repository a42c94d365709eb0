// Row helpers shared by the CPU norm kernels (qk_norm.cpp: the heads of a packed qkv row; layer_norm.cpp:
// groups of rows): norm statistics over several rows at once, rows read in the compute type, rows
// written through a compute-type buffer, and masked vector loops.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/vec_reduce.h"

namespace fastlm {
namespace rowops {

using at::vec::Vectorized;

// Asks for the cache lines of [p, p + bytes) ahead of their use (the norms' rows are read once, often
// from beyond the L2 cache: without it the row loop waits on each group's loads).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// The statistics of the n rows x[h D .. (h + 1) D): xhat = (x - mu[h]) * rstd[h] (mu = 0 for RMSNorm).
// Each step runs over all the rows before the next, so their reductions, each a chain of dependent
// shuffles and a scalar square root, overlap instead of waiting on one another (a row at a time,
// the norms were bound by their latency).
template <typename acc_t>
inline void norm_stats(const acc_t* x, int64_t n, int64_t D, bool rms, acc_t eps, acc_t* mu, acc_t* rstd) {
  for (int64_t h = 0; h < n; ++h) mu[h] = rms ? acc_t(0) : vsum(x + h * D, D) / acc_t(D);
  for (int64_t h = 0; h < n; ++h) rstd[h] = vdot<acc_t>(x + h * D, nullptr, D, mu[h]);
  for (int64_t h = 0; h < n; ++h) rstd[h] = acc_t(1) / std::sqrt(rstd[h] / acc_t(D) + eps);
}

// n elements in the compute type: src itself when it already is (no copy), else converted into buf.
template <typename in_t, typename acc_t>
inline const acc_t* as_acc(const in_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<in_t, at::BFloat16> || std::is_same_v<in_t, at::Half>) {
    using SVec = Vectorized<in_t>;
    constexpr int64_t V = SVec::size();  // two float vectors
    int64_t i = 0;
    for (; i + V <= n; i += V) {
      const auto [lo, hi] = at::vec::convert_to_float<in_t>(SVec::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + V / 2);
    }
    for (; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Where output elements are computed: dst itself when it has the compute type, else buf, which
// flush() then converts into dst (rounding to nearest even for bf16 / fp16).
template <typename out_t, typename acc_t>
inline acc_t* out_row(out_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename out_t, typename acc_t>
inline void flush(out_t* dst, const acc_t* buf, int64_t n) {
  if constexpr (!std::is_same_v<out_t, acc_t>) at::vec::convert(buf, dst, n);
}

// f(i, count) over [0, n) in vectors: the vector body, then one masked tail.
template <typename acc_t, typename F>
inline void vmap(int64_t n, F f) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) f(i, V);
  if (i < n) f(i, n - i);
}

template <typename acc_t>
inline Vectorized<acc_t> vload(const acc_t* p, int64_t count) {
  using Vec = Vectorized<acc_t>;
  return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count);
}

template <typename acc_t>
inline void vstore(acc_t* p, const Vectorized<acc_t>& v, int64_t count) {
  if (count == Vectorized<acc_t>::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

}  // namespace rowops
}  // namespace fastlm
