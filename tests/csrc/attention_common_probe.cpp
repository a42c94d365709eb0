// C entry points over csrc/attention_common.h for tests/test_attention_common.py (ctypes): the
// host side of the exact helpers the CUDA kernels inline. Built by the test with the host C++
// compiler; not part of the package.
#include <cstdint>

#include "attention_common.h"

namespace at_ = fastlm::attn;

extern "C" {

// The plain (causal or full) mask: what the probes without window/documents see.
static at_::Mask plain(int64_t t_q, int64_t t_k, int causal) { return at_::causal_mask(t_q, t_k, causal != 0); }

int probe_is_visible(int64_t i, int64_t j, int64_t t_q, int64_t t_k, int causal) {
  return at_::sees(at_::row_keys(i, plain(t_q, t_k, causal)), j);
}
int64_t probe_first_row_seeing_key(int64_t j, int64_t t_q, int64_t t_k, int causal) {
  return at_::first_row_seeing(j, plain(t_q, t_k, causal));
}
// Key blocks of bn a block of rows ending at i1 visits from key 0 (the causal forward's tile count).
int64_t probe_key_blocks_for_rows(int64_t i1, int64_t t_q, int64_t t_k, int causal, int64_t bn) {
  return (at_::block_keys(i1 - 1, i1, plain(t_q, t_k, causal)).hi + bn - 1) / bn;
}
int64_t probe_kv_head(int64_t h, int64_t n_head, int64_t n_kv_head) {
  return at_::kv_head(h, n_head, n_kv_head);
}
float probe_masked_score_log2(float qk, float scale_log2, float slope_log2, int64_t i, int64_t j,
                              int64_t t_q, int64_t t_k, int causal) {
  const at_::KeyRange keys = at_::row_keys(i, plain(t_q, t_k, causal));
  return at_::masked_score_log2<float>(qk, scale_log2, slope_log2, i, j, t_q, t_k, keys);
}
float probe_exp2_arg(float s, float coef, float shift) { return at_::exp2_arg(s, coef, shift); }
float probe_exp2(float x) { return at_::fl_exp2(x); }
float probe_rescale_factor_log2(float m_old, float m_new) {
  return at_::rescale_factor_log2(m_old, m_new);
}
float probe_safe_max(float m) { return at_::safe_max(m); }
float probe_row_lse_from_log2(float m, float l) { return at_::row_lse_from_log2(m, l); }
float probe_backward_shift(float lse) { return at_::backward_shift(lse); }
int64_t probe_block_for_slot(int64_t slot, int64_t n_blocks, int reverse) {
  return at_::block_for_slot(slot, n_blocks, reverse != 0);
}
// (causal: the first row of a tile sees the fewest keys, so it decides)
int probe_tile_fully_visible(int64_t i0, int64_t j0, int64_t cols, int64_t t_q, int64_t t_k,
                             int causal) {
  return at_::tile_fully_visible(i0, i0 + 1, j0, j0 + cols, plain(t_q, t_k, causal));
}
// no row of [i0, i0 + rows) sees key j0 or any later key
int probe_tile_fully_masked(int64_t i0, int64_t rows, int64_t j0, int64_t t_q, int64_t t_k,
                            int causal) {
  return at_::tile_fully_masked(i0, i0 + rows, j0, t_k, plain(t_q, t_k, causal));
}

// ---- the general mask (window, documents): doc = (2, t_k) document bounds or null ----------------
static at_::Mask general(int64_t t_q, int64_t t_k, int causal, int64_t window, const int64_t* doc) {
  return at_::Mask{t_q, t_k, causal != 0, window, doc};
}
void probe_row_keys(int64_t i, int64_t t_q, int64_t t_k, int causal, int64_t window, const int64_t* doc,
                    int64_t* lo_hi) {
  const at_::KeyRange r = at_::row_keys(i, general(t_q, t_k, causal, window, doc));
  lo_hi[0] = r.lo;
  lo_hi[1] = r.hi;
}
void probe_block_keys(int64_t i0, int64_t i1, int64_t t_q, int64_t t_k, int causal, int64_t window,
                      const int64_t* doc, int64_t* lo_hi) {
  const at_::KeyRange r = at_::block_keys(i0, i1, general(t_q, t_k, causal, window, doc));
  lo_hi[0] = r.lo;
  lo_hi[1] = r.hi;
}
int probe_tile_visible_all(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t t_q, int64_t t_k,
                           int causal, int64_t window, const int64_t* doc) {
  return at_::tile_fully_visible(i0, i1, j0, j1, general(t_q, t_k, causal, window, doc));
}
int probe_tile_masked_all(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t t_q, int64_t t_k,
                          int causal, int64_t window, const int64_t* doc) {
  return at_::tile_fully_masked(i0, i1, j0, j1, general(t_q, t_k, causal, window, doc));
}
int64_t probe_first_row_seeing(int64_t j0, int64_t t_q, int64_t t_k, int causal, int64_t window,
                               const int64_t* doc) {
  return at_::first_row_seeing(j0, general(t_q, t_k, causal, window, doc));
}
int64_t probe_end_row_seeing(int64_t j1, int64_t t_q, int64_t t_k, int causal, int64_t window,
                             const int64_t* doc) {
  return at_::end_row_seeing(j1, general(t_q, t_k, causal, window, doc));
}
float probe_log2e() { return (float)at_::kLog2e; }

}  // extern "C"
