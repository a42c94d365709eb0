// A host (CPU) stand-in for the CUDA features csrc/cuda/attention.cu uses, so that the kernels
// themselves run in tests without a GPU (tests/test_cuda_host_sim.py). Compiled as plain C++ with
// -DFASTLM_HOST_SIM; attention.cu then takes its PTX helpers from here.
//
// * The threads of one CTA are cooperative user-level threads (ucontext), scheduled round-robin;
//   __syncthreads and the warp collectives are barriers, so every thread sees the same values a
//   real CTA would at those points. CTAs of a grid run one after another.
// * ldmatrix (.x4, optional .trans), mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate) and
//   __shfl_xor_sync follow their PTX ISA definitions: each lane posts its operands, the warp
//   meets at a barrier, each lane assembles its own result from the posted values.
// * cp.async copies synchronously (its wait_group is then trivially satisfied); ex2 is exp2f.
// What this cannot see: timing, races between the async copies and compute (the copies are
// instant), bank conflicts, register limits. Those are for the GPU and ptxas checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __launch_bounds__(...)

namespace fastlm_sim {

constexpr size_t kSmemBytes = 232448;  // the largest dynamic shared memory of an sm_90 CTA
constexpr size_t kStackBytes = 256 * 1024;

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 idx;
  int linear = 0;
  bool done = false;
  uint32_t slot[8];  // what this lane posts to a warp collective
};

struct Cta {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<std::unique_ptr<Thread>> threads;
  ucontext_t scheduler;
  int current = -1;
  long progress = 0;  // arrivals and completions: a round without any means a deadlock
  int cta_arrived = 0;
  long cta_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<long> warp_gen;
  std::function<void()> body;
};

inline Cta*& cta() {
  static Cta* c = nullptr;
  return c;
}
inline unsigned char*& smem_base() {
  static unsigned char* base = nullptr;
  return base;
}
inline Thread& me() { return *cta()->threads[cta()->current]; }
inline const uint3& thread_idx() { return me().idx; }
inline const uint3& block_idx() { return cta()->block_idx; }
inline const dim3& grid_dim() { return cta()->grid; }
inline const dim3& block_dim() { return cta()->block; }

inline void yield() { swapcontext(&me().ctx, &cta()->scheduler); }

// Generic barrier: `arrived`/`gen` of a group of `size` threads.
inline void barrier(int& arrived, long& gen, int size) {
  Cta* c = cta();
  ++c->progress;
  const long seen = gen;
  if (++arrived == size) {
    arrived = 0;
    ++gen;
    return;
  }
  while (gen == seen) yield();
}

inline void syncthreads() {
  Cta* c = cta();
  barrier(c->cta_arrived, c->cta_gen, (int)c->threads.size());
}

inline void syncwarp() {
  Cta* c = cta();
  const int w = me().linear / 32, n = (int)c->threads.size();
  barrier(c->warp_arrived[w], c->warp_gen[w], n - w * 32 < 32 ? n - w * 32 : 32);
}

inline Thread& lane_thread(int lane) {
  return *cta()->threads[(me().linear / 32) * 32 + lane];
}

inline void entry() {
  cta()->body();
  me().done = true;
  ++cta()->progress;
}

// Runs every thread of CTA `block_idx` of a launch to completion.
inline void run_cta(dim3 grid, dim3 block, uint3 block_idx, const std::function<void()>& body) {
  Cta c;
  c.grid = grid;
  c.block = block;
  c.block_idx = block_idx;
  c.body = body;
  const int n = (int)(block.x * block.y * block.z);
  c.warp_arrived.assign((n + 31) / 32, 0);
  c.warp_gen.assign((n + 31) / 32, 0);
  for (int i = 0; i < n; ++i) {
    auto t = std::make_unique<Thread>();
    t->linear = i;
    t->idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    t->stack.resize(kStackBytes);
    getcontext(&t->ctx);
    t->ctx.uc_stack.ss_sp = t->stack.data();
    t->ctx.uc_stack.ss_size = t->stack.size();
    t->ctx.uc_link = &c.scheduler;
    makecontext(&t->ctx, entry, 0);
    c.threads.push_back(std::move(t));
  }
  cta() = &c;
  for (;;) {
    bool running = false;
    const long before = c.progress;
    for (int i = 0; i < n; ++i) {
      if (c.threads[i]->done) continue;
      running = true;
      c.current = i;
      swapcontext(&c.scheduler, &c.threads[i]->ctx);
    }
    if (!running) break;
    if (c.progress == before) {
      std::fprintf(stderr, "fastlm_sim: deadlock (threads wait at different barriers)\n");
      std::abort();
    }
  }
  cta() = nullptr;
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_cta(grid, block, make_uint3(x, y, z), body);
}

// ---- PTX stand-ins -------------------------------------------------------------------------------
inline uint32_t smem_u32(const void* p) {
  return (uint32_t)(static_cast<const unsigned char*>(p) - smem_base());
}

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  std::memcpy(smem_base() + dst, src, (size_t)src_bytes);
  std::memset(smem_base() + dst + src_bytes, 0, (size_t)(16 - src_bytes));
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline uint16_t smem_u16(uint32_t byte_addr) {
  uint16_t v;
  std::memcpy(&v, smem_base() + byte_addr, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; register i of lane L holds (row L/4, cols 2(L%4), 2(L%4)+1) of matrix i, or with
// .trans (rows 2(L%4), 2(L%4)+1, col L/4).
inline void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  Thread& t = me();
  const int lane = t.linear % 32;
  t.slot[0] = addr;
  syncwarp();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = lane_thread(8 * i + lane / 4).slot[0];
      lo = smem_u16(row + 4 * (lane % 4));
      hi = smem_u16(row + 4 * (lane % 4) + 2);
    } else {
      lo = smem_u16(lane_thread(8 * i + 2 * (lane % 4)).slot[0] + 2 * (lane / 4));
      hi = smem_u16(lane_thread(8 * i + 2 * (lane % 4) + 1).slot[0] + 2 * (lane / 4));
    }
    r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
  syncwarp();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, true); }

inline float ex2(float x) { return std::exp2(x); }

template <bool kBf16>
inline float from_bits(uint32_t reg, int half) {
  const uint16_t u = (uint16_t)(half ? reg >> 16 : reg & 0xffffu);
  if (kBf16) {
    const uint32_t bits = (uint32_t)u << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  __half_raw raw;
  raw.x = u;
  return __half2float(__half(raw));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = L/4, t = L%4 of lane L,
// A (16x16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
// B (16x8): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C (16x8): c0,c1 = (g, 2t..),
// c2,c3 = (g+8, 2t..).
template <bool kBf16>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Thread& t = me();
  const int lane = t.linear % 32;
  for (int i = 0; i < 4; ++i) t.slot[i] = a[i];
  t.slot[4] = b0;
  t.slot[5] = b1;
  syncwarp();
  for (int e = 0; e < 4; ++e) {
    const int row = lane / 4 + (e >= 2 ? 8 : 0), col = 2 * (lane % 4) + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) {
      const Thread& ta = lane_thread((row % 8) * 4 + (k % 8) / 2);
      const Thread& tb = lane_thread(col * 4 + (k % 8) / 2);
      const float av = from_bits<kBf16>(ta.slot[(row / 8) + 2 * (k / 8)], k % 2);
      const float bv = from_bits<kBf16>(tb.slot[4 + k / 8], k % 2);
      acc += av * bv;
    }
    c[e] = acc;
  }
  syncwarp();
}

inline float shfl_xor(float v, int lane_mask) {
  Thread& t = me();
  std::memcpy(&t.slot[0], &v, 4);
  syncwarp();
  float out;
  std::memcpy(&out, &lane_thread((t.linear % 32) ^ lane_mask).slot[0], 4);
  syncwarp();
  return out;
}

}  // namespace fastlm_sim

#define threadIdx (::fastlm_sim::thread_idx())
#define blockIdx (::fastlm_sim::block_idx())
#define gridDim (::fastlm_sim::grid_dim())
#define blockDim (::fastlm_sim::block_dim())
#define __syncthreads() ::fastlm_sim::syncthreads()

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return ::fastlm_sim::shfl_xor(v, lane_mask);
}
inline int min(int a, int b) { return a < b ? a : b; }
inline float __expf(float x) { return std::exp(x); }
