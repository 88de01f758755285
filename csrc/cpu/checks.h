// Input checks shared by the CPU glue files: every failure names the argument and what was
// expected, and surfaces in Python as ValueError (TORCH_CHECK_VALUE) or TypeError.
#pragma once

#include <torch/extension.h>

#include <string>

namespace lckv {

inline void check_cpu_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kFloat16 ||
                       t.scalar_type() == torch::kBFloat16,
                   name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dim(const torch::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have shape ", layout, ", got ", t.sizes());
}

}  // namespace lckv
