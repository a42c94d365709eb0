// Byte-level BPE training merge loop (placeholder: filled by the tokenizer work).
#include <pybind11/pybind11.h>

namespace fastlm {
void register_bpe(pybind11::module_& m) { (void)m; }
}  // namespace fastlm
