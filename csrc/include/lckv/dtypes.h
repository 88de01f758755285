// Element types of K/V rows: float32, and the 16-bit floats as raw bits (layout-compatible with
// at::Half / at::BFloat16), with their exact conversions to float. Torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "lckv/cpu_features.h"  // LCKV_ALWAYS_INLINE

namespace lckv {

struct half_bits {
  uint16_t bits;
};
struct bfloat16_bits {
  uint16_t bits;
};

LCKV_ALWAYS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
LCKV_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

LCKV_ALWAYS_INLINE float to_float(float x) { return x; }
LCKV_ALWAYS_INLINE float to_float(bfloat16_bits x) { return bits_to_float(uint32_t(x.bits) << 16); }
// Branch-free IEEE half -> float (normals, subnormals, inf, nan): shift the exponent/mantissa into
// float position, rescale by 2^112 to fix the exponent bias, then patch inf/nan.
LCKV_ALWAYS_INLINE float to_float(half_bits x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  float magnitude = bits_to_float((h & 0x7fffu) << 13) * bits_to_float(0x77800000u);  // * 2^112
  uint32_t u = float_to_bits(magnitude);
  u |= ((h & 0x7c00u) == 0x7c00u) ? 0x7f800000u : 0u;  // exponent 31: inf or nan
  return bits_to_float(u | sign);
}

}  // namespace lckv
