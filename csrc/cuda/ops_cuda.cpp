// Torch glue of the CUDA kernels: argument checks, output allocation, the current stream, and the
// TORCH_LIBRARY_IMPL(fastlm, CUDA, m) registration. Compiled only when FASTLM_CUDA is on (setup.py);
// the kernels themselves live in the torch-free csrc/cuda/*.cu files behind kernels.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"
#include "op_checks.h"

namespace fastlm {
namespace {

cuda::DType to_dtype(const char* op, at::ScalarType t, bool allow_fp32) {
  switch (t) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return cuda::DType::kFloat32;
      break;
    default: break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t,
              allow_fp32 ? " (float16, bfloat16, float32)"
                         : " (the CUDA attention kernel takes float16 or bfloat16; use the triton "
                           "or torch backend for float32)");
  return cuda::DType::kFloat16;  // unreachable
}

void check_cuda_status(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Checks the layout the tensor-core kernel needs and copies its (b, h, t) strides.
void attn_layout(const char* op, const char* name, const at::Tensor& t, int64_t (&stride)[3]) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " needs a contiguous last dim (stride ",
              t.stride(3), ")");
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(t.stride(i) % 8 == 0 || t.size(i) == 1, op, ": ", name,
                " strides must be multiples of 8 elements, got ", t.strides());
    stride[i] = t.size(i) == 1 ? 0 : t.stride(i);
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must be 16-byte aligned");
}

// t itself when the tensor-core kernels can read it in place (contiguous last dim, strides that are
// multiples of 8 elements, 16-byte aligned base), otherwise a contiguous, aligned copy.
at::Tensor tensor_core_readable(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  return ok ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

// The kernel parameters of a call; alibi_f32 and masks keep the tensors they point into alive.
cuda::AttnParams make_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, bool causal, double scale,
                             const c10::optional<at::Tensor>& alibi, c10::optional<int64_t> window,
                             const c10::optional<at::Tensor>& segment_ids, at::Tensor& alibi_f32,
                             MaskArgs& masks) {
  const AttnShape s = check_attention_args(op, q, k, v, alibi);
  TORCH_CHECK(s.D == 64 || s.D == 128, op, ": head dim ", s.D,
              " not supported by the CUDA kernel (64 or 128)");
  cuda::AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  attn_layout(op, "q", q, p.q_stride);
  attn_layout(op, "k", k, p.k_stride);
  attn_layout(op, "v", v, p.v_stride);
  TORCH_CHECK(s.T_q <= cuda::kMaxAttnSeqLen && s.T_k <= cuda::kMaxAttnSeqLen, op,
              ": sequence length must be <= ", cuda::kMaxAttnSeqLen, " for the CUDA kernel, got T_q ",
              s.T_q, ", T_k ", s.T_k);
  TORCH_CHECK(s.B * s.H < (int64_t(1) << 31), op, ": batch * heads too large (", s.B * s.H, ")");
  p.B = (int)s.B;
  p.H = (int)s.H;
  p.H_kv = (int)s.H_kv;
  p.T_q = (int)s.T_q;
  p.T_k = (int)s.T_k;
  p.D = (int)s.D;
  p.scale = (float)scale;
  p.causal = causal;
  p.alibi = nullptr;
  if (alibi.has_value()) {
    alibi_f32 = alibi->to(at::kFloat).contiguous();
    p.alibi = alibi_f32.data_ptr<float>();
  }
  masks = check_mask_args(op, s, q, window, segment_ids);
  p.window = masks.window;
  p.doc = masks.bounds.defined() ? masks.bounds.const_data_ptr<int64_t>() : nullptr;
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, bool causal,
                                                      double scale,
                                                      const c10::optional<at::Tensor>& alibi,
                                                      c10::optional<int64_t> window,
                                                      const c10::optional<at::Tensor>& segment_ids) {
  const char* op = "attention_fwd";
  const cuda::DType dt = to_dtype(op, q.scalar_type(), /*allow_fp32=*/false);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor alibi_f32;
  MaskArgs masks;
  const cuda::AttnParams p =
      make_params(op, q, k, v, causal, scale, alibi, window, segment_ids, alibi_f32, masks);
  at::Tensor out = at::empty({p.B, p.H, p.T_q, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.T_q}, q.options().dtype(at::kFloat));
  check_cuda_status(op, cuda::attention_fwd(p, dt, out.data_ptr(), lse.data_ptr<float>(),
                                            at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    const c10::optional<at::Tensor>& alibi, c10::optional<int64_t> window,
    const c10::optional<at::Tensor>& segment_ids) {
  const char* op = "attention_bwd";
  const cuda::DType dt = to_dtype(op, q.scalar_type(), /*allow_fp32=*/false);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor alibi_f32;
  MaskArgs masks;
  cuda::AttnBwdParams p{};
  p.fwd = make_params(op, q, k, v, causal, scale, alibi, window, segment_ids, alibi_f32, masks);
  const AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  check_attention_bwd_args(op, s, q, dout, out, lse);
  // dout feeds the tensor cores through 16-byte async copies; out only a row sum.
  const at::Tensor dout_c = tensor_core_readable(dout);
  const at::Tensor out_c = out.stride(3) == 1 ? out : out.contiguous();
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  for (int i = 0; i < 3; ++i) {
    p.o_stride[i] = out_c.stride(i);
    p.do_stride[i] = dout_c.stride(i);
  }
  at::Tensor delta = at::empty({s.B, s.H, s.T_q}, q.options().dtype(at::kFloat));
  at::Tensor dq = at::empty({s.B, s.H, s.T_q, s.D}, q.options());
  at::Tensor dk = at::empty({s.B, s.H_kv, s.T_k, s.D}, k.options());
  at::Tensor dv = at::empty({s.B, s.H_kv, s.T_k, s.D}, v.options());
  p.out = out_c.data_ptr();
  p.dout = dout_c.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  check_cuda_status(op, cuda::attention_bwd(p, dt, at::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "swiglu_fwd";
  check_swiglu_args(op, gate, up);
  const cuda::DType dt = to_dtype(op, gate.scalar_type(), /*allow_fp32=*/true);
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  check_cuda_status(op, cuda::swiglu_fwd(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), dt,
                                         at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dout, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  const char* op = "swiglu_bwd";
  check_swiglu_args(op, gate, up);
  TORCH_CHECK(dout.sizes() == gate.sizes() && dout.scalar_type() == gate.scalar_type() &&
                  dout.device() == gate.device(),
              op, ": dout must match gate's shape, dtype and device");
  const cuda::DType dt = to_dtype(op, gate.scalar_type(), /*allow_fp32=*/true);
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor d = dout.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(up.sizes(), up.options());
  check_cuda_status(op, cuda::swiglu_bwd(d.data_ptr(), g.data_ptr(), u.data_ptr(), dgate.data_ptr(),
                                         dup.data_ptr(), g.numel(), dt,
                                         at::cuda::getCurrentCUDAStream()));
  return {dgate, dup};
}

at::Tensor cuda_packed_rows(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  return packed_rows(op, x);
}

at::Tensor swiglu_packed_fwd_cuda(const at::Tensor& x) {
  const char* op = "swiglu_packed_fwd";
  const at::Tensor x2 = cuda_packed_rows(op, x);
  const cuda::DType dt = to_dtype(op, x.scalar_type(), /*allow_fp32=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x2.size(0), hidden = x2.size(1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, x.options());
  check_cuda_status(op, cuda::swiglu_packed_fwd(x2.data_ptr(), rows, hidden, x2.stride(0),
                                                out.data_ptr(), dt,
                                                at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor swiglu_packed_bwd_cuda(const at::Tensor& dout, const at::Tensor& x) {
  const char* op = "swiglu_packed_bwd";
  const at::Tensor x2 = cuda_packed_rows(op, x);
  const cuda::DType dt = to_dtype(op, x.scalar_type(), /*allow_fp32=*/true);
  const int64_t rows = x2.size(0), hidden = x2.size(1) / 2;
  TORCH_CHECK(dout.dim() == x.dim() && dout.scalar_type() == x.scalar_type() &&
                  dout.device() == x.device() && dout.numel() == rows * hidden &&
                  dout.size(-1) == hidden,
              op, ": dout must have x's shape with the last dim halved and x's dtype; got dout ",
              dout.sizes(), " for x ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor d = dout.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());  // fresh, contiguous: [rows, 2 * hidden]
  check_cuda_status(op, cuda::swiglu_packed_bwd(d.data_ptr(), x2.data_ptr(), rows, hidden,
                                                x2.stride(0), dx.data_ptr(), dt,
                                                at::cuda::getCurrentCUDAStream()));
  return dx;
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_fwd", &fastlm::attention_fwd_cuda);
  m.impl("attention_bwd", &fastlm::attention_bwd_cuda);
  m.impl("swiglu_fwd", &fastlm::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &fastlm::swiglu_bwd_cuda);
  m.impl("swiglu_packed_fwd", &fastlm::swiglu_packed_fwd_cuda);
  m.impl("swiglu_packed_bwd", &fastlm::swiglu_packed_bwd_cuda);
}
