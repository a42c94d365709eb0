// Argument checks shared by the CPU and CUDA op implementations (torch side only; the .cu kernels
// never include this). Each failure is a one-line TORCH_CHECK message naming the problem.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "attention_common.h"

namespace fastlm {

struct AttnShape {
  int64_t B, H, H_kv, T_q, T_k, D;
};

inline AttnShape check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v,
                                      const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D (B, H, T, D); got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v dtypes differ (", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type(), ")");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op,
              ": q, k, v are on different devices");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v shapes differ (", k.sizes(), " vs ",
              v.sizes(), ")");
  AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.D, op, ": q ", q.sizes(), " and k/v ", k.sizes(),
              " differ in batch or head dim");
  TORCH_CHECK(s.H_kv > 0 && s.H % s.H_kv == 0, op, ": query heads (", s.H,
              ") must be a multiple of kv heads (", s.H_kv, ")");
  TORCH_CHECK(s.B > 0 && s.H > 0 && s.T_q > 0 && s.T_k > 0 && s.D > 0, op, ": empty input (q ",
              q.sizes(), ", k ", k.sizes(), ")");
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.dim() == 1 && a.size(0) == s.H, op, ": alibi_slopes must have shape (", s.H,
                ",), got ", a.sizes());
    TORCH_CHECK(a.device() == q.device(), op, ": alibi_slopes on ", a.device(), ", q on ",
                q.device());
    TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": alibi_slopes must be floating point");
  }
  return s;
}

inline void check_attention_bwd_args(const char* op, const AttnShape& s, const at::Tensor& q,
                                     const at::Tensor& dout, const at::Tensor& out,
                                     const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": dout and out must have q's shape ", q.sizes(), "; got ", dout.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": dout/out dtype must match q (", q.scalar_type(), ")");
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              op, ": dout, out, lse must be on q's device");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.T_q,
              op, ": lse must have shape (B, H, T_q) = (", s.B, ", ", s.H, ", ", s.T_q, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble, op,
              ": lse must be float32 or float64, got ", lse.scalar_type());
}

// (B, 2, T) int64 bounds of the documents that segment ids (B, T) pack left to right:
// [b][0][t] = first position of t's document, [b][1][t] = one past its last (a document is a run of
// equal ids). Torch ops, so the CPU and CUDA glue share it; any ids give in-range bounds.
inline at::Tensor document_bounds(const at::Tensor& segment_ids) {
  const at::Tensor ids = segment_ids.to(at::kLong);
  const int64_t T = ids.size(1);
  const at::Tensor pos = at::arange(T, ids.options()).expand_as(ids);
  at::Tensor starts = at::ones_like(ids, ids.options().dtype(at::kBool));
  at::Tensor ends = at::ones_like(starts);
  if (T > 1) {
    const at::Tensor change = ids.slice(1, 1).ne(ids.slice(1, 0, T - 1));  // a document starts at t + 1
    starts.slice(1, 1).copy_(change);
    ends.slice(1, 0, T - 1).copy_(change);
  }
  const at::Tensor lo = std::get<0>(at::where(starts, pos, 0).cummax(1));
  const at::Tensor hi = std::get<0>(at::where(ends, pos + 1, T).flip({1}).cummin(1)).flip({1});
  return at::stack({lo, hi}, 1).contiguous();
}

// The optional masks of an attention call beyond causal, checked: `window` (>= 1; kept at most
// T_q + T_k, past which it hides nothing) and the document bounds of segment_ids (B, T_k).
struct MaskArgs {
  int64_t window = 0;  // 0: none
  at::Tensor bounds;   // document_bounds(segment_ids), or undefined

  // The mask of batch b (attention_common.h).
  attn::Mask of(int64_t b, const AttnShape& s, bool causal) const {
    const int64_t* doc = bounds.defined() ? bounds.const_data_ptr<int64_t>() + b * 2 * s.T_k : nullptr;
    return attn::Mask{s.T_q, s.T_k, causal, window, doc};
  }
};

inline MaskArgs check_mask_args(const char* op, const AttnShape& s, const at::Tensor& q,
                                c10::optional<int64_t> window,
                                const c10::optional<at::Tensor>& segment_ids) {
  MaskArgs m;
  if (window.has_value()) {
    TORCH_CHECK(*window >= 1, op, ": window must be >= 1 (or None), got ", *window);
    m.window = std::min<int64_t>(*window, s.T_q + s.T_k);
  }
  if (!segment_ids.has_value()) return m;
  const at::Tensor& ids = *segment_ids;
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == s.B && ids.size(1) == s.T_k, op,
              ": segment_ids must have shape (B, T_k) = (", s.B, ", ", s.T_k, "), got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
              ": segment_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == q.device(), op, ": segment_ids on ", ids.device(), ", q on ", q.device());
  if (ids.is_cpu() && s.T_k > 1) {  // (on a GPU this would wait for the device: fastlm.ops checks)
    TORCH_CHECK(!ids.slice(1, 1).lt(ids.slice(1, 0, s.T_k - 1)).any().item<bool>(), op,
                ": segment_ids must be non-decreasing along T (documents packed left to right)");
  }
  m.bounds = document_bounds(ids);
  return m;
}

inline void check_swiglu_args(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate ", gate.sizes(), " and up ", up.sizes(),
              " shapes differ");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), op, ": gate and up dtypes differ (",
              gate.scalar_type(), ", ", up.scalar_type(), ")");
  TORCH_CHECK(gate.device() == up.device(), op, ": gate on ", gate.device(), ", up on ",
              up.device());
}

// x: [..., 2 * hidden] ([gate | up]) as [rows, 2 * hidden] with a contiguous last dim (a view when
// possible; any row stride is fine). The caller checks device and dtype first.
inline at::Tensor packed_rows(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim, got a scalar");
  TORCH_CHECK(x.size(-1) % 2 == 0, op, ": the last dim of x must be even ([gate | up]), got ",
              x.sizes());
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  if (x2.size(1) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

}  // namespace fastlm
