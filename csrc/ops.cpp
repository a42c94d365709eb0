// fastlm._C: the op schemas (one TORCH_LIBRARY for the namespace) and the Python module.
// Kernels register per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cpp.
#include <torch/extension.h>

namespace fastlm {
// csrc/bpe.cpp: the BPE trainer's merge loop, exposed to Python with pybind11.
void register_bpe(pybind11::module_& m);
}  // namespace fastlm

TORCH_LIBRARY(fastlm, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++/CUDA kernels (ops live in torch.ops.fastlm)";
  fastlm::register_bpe(m);
}
