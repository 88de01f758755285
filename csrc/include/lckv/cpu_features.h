// What the CPU offers, decided once per process, and the target attributes of the SIMD kernels.
//
// The library is compiled with portable flags; the x86 kernels are compiled per function with a
// target attribute (LCKV_TARGET_*) and picked at run time from cpu_features(), the one place that
// asks the CPU (hnswlib's space_ip.h picks its kernel the same way). The levels form a ladder:
//   kAvx2:   AVX2 + FMA + F16C                      (LCKV_TARGET_AVX2)
//   kAvx512: kAvx2 + AVX-512F + AVX-512VL           (LCKV_TARGET_AVX512: 512-bit vectors, and the
//                                                    AVX2 code with 32 vector registers)
// plus AVX512_BF16 on top of kAvx512 (LCKV_TARGET_AVX512_BF16, the bf16 dot of sparse attention).
// Without LCKV_X86_DISPATCH (other CPUs or compilers) only the portable code exists. Torch-free.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define LCKV_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LCKV_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LCKV_X86_DISPATCH 1
#include <immintrin.h>
#define LCKV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LCKV_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
#define LCKV_TARGET_AVX512_BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bf16")))
#endif

namespace lckv {

// The widest SIMD code path this CPU runs (see the ladder above).
enum class SimdLevel { kScalar, kAvx2, kAvx512 };

inline const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "scalar";
  }
}

struct CpuFeatures {
  SimdLevel level = SimdLevel::kScalar;  // the ladder step this CPU reaches
  bool avx512_bf16 = false;              // VDPBF16PS, with level kAvx512
};

// The CPU's features, asked once per process.
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#ifdef LCKV_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      f.level = SimdLevel::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
        f.level = SimdLevel::kAvx512;
        f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
      }
    }
#endif
    return f;
  }();
  return features;
}

// The best level this CPU supports.
inline SimdLevel detect_simd_level() { return cpu_features().level; }

}  // namespace lckv
