// Input checks shared by the CPU glue files: every failure names the argument and what was
// expected, and surfaces in Python as ValueError (TORCH_CHECK_VALUE) or TypeError.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <string>

#include "lckv/dtypes.h"  // half_bits, bfloat16_bits

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

// A float32 CPU tensor of rank `dim` (layout names the expected shape in the message).
inline void check_cpu_f32(const torch::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  check_dim(t, name, dim, layout);
}

// q [batch, kv_heads * group, head_dim] for `kv_heads` kv heads of `head_dim`.
inline void check_group_query(const torch::Tensor& q, int64_t batch, int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK_VALUE(q.size(0) == batch && q.size(2) == head_dim && kv_heads > 0 && q.size(1) % kv_heads == 0,
                    "q must have shape [", batch, ", kv_heads * group, ", head_dim, "] with kv_heads = ", kv_heads,
                    ", got ", q.sizes());
}

// Calls fn(T{}) with T the row type of a float tensor checked by check_cpu_float: float for
// float32, half_bits for float16, bfloat16_bits for bfloat16 (kernels templated on the row type).
template <typename Fn>
void with_row_type(torch::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case torch::kFloat32:
      fn(float{});
      break;
    case torch::kFloat16:
      fn(half_bits{});
      break;
    default:
      fn(bfloat16_bits{});
      break;
  }
}

// An index holding `size` keys may take `extra` more: ids must fit in 32 bits.
inline void check_index_growth(int64_t size, int64_t extra) {
  TORCH_CHECK_VALUE(size + extra < std::numeric_limits<uint32_t>::max(), "keys would grow the index past 2^32 - 1 keys");
}

}  // namespace lckv
