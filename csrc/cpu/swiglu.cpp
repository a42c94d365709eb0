// CPU SwiGLU: silu(gate) * up with fp32 math.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace fastlm {

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu_fwd: gate and up shapes differ");
  auto g = gate.to(at::kFloat);
  return (g * at::sigmoid(g) * up.to(at::kFloat)).to(gate.scalar_type());
}

}  // namespace fastlm

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("swiglu_fwd", &fastlm::swiglu_fwd_cpu);
}
