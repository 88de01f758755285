// Softmax weights from scores: exp(x) for x <= 0 (scores minus their max) as a branch-free
// polynomial, on one float and on 8 lanes, and the weights of clusters (exp of scaled centroid
// scores times the cluster sizes) that the centroid estimate and the cluster index's group search
// share. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "lckv/cpu_features.h"
#include "lckv/dtypes.h"  // bits_to_float, float_to_bits

namespace lckv {

// exp(x) for x <= 0 (scores minus their max): Cody-Waite range reduction + degree-6 polynomial,
// about 2 ulp; returns exactly 0 below -87 (and for -inf), NaN for NaN (so a NaN read from K
// reaches the output instead of vanishing). Branch-free so loops vectorise.
LCKV_ALWAYS_INLINE float exp_nonpositive(float x) {
  const float underflow = -87.0f;
  const bool zero = x < underflow;  // false for NaN
  x = zero ? underflow : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |v| < 2^22 to nearest
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;  // ln2 split in a short high part and a correction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scaled = bits_to_float(float_to_bits(p) + (uint32_t(int32_t(n)) << 23));
  return zero ? 0.0f : scaled;
}

#ifdef LCKV_X86_DISPATCH
namespace detail {

// exp_nonpositive on 8 lanes, same reduction and polynomial (to rounding of the FMA contractions):
// 0 below -87 and for -inf, NaN for NaN.
LCKV_TARGET_AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 underflow = _mm256_set1_ps(-87.0f);
  const __m256 zero = _mm256_cmp_ps(x, underflow, _CMP_LT_OQ);  // false for NaN
  x = _mm256_blendv_ps(x, underflow, zero);
  const __m256 round_magic = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), round_magic), round_magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_cvttps_epi32(n), 23);
  const __m256 scaled = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), exponent));
  return _mm256_andnot_ps(zero, scaled);
}

LCKV_TARGET_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

LCKV_TARGET_AVX2 inline float horizontal_max(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

}  // namespace detail
#endif  // LCKV_X86_DISPATCH

// Cluster weights of one query head: scores w[c] (q . centroid_c) become
// w[c] = exp(scale * w[c] - m) for clusters with count > 0 and 0 for empty ones, m = the largest
// scaled score (0 when no cluster has keys). Returns sum_c w[c] * count_c (in double); writes m.
using ClusterWeightsFn = double (*)(float* w, const float* counts, int64_t C, float scale, float* m_out);

inline double cluster_weights_portable(float* w, const float* counts, int64_t C, float scale, float* m_out) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) {
    w[c] = counts[c] > 0.0f ? scale * w[c] : neg_inf;  // empty clusters weigh nothing
    m = w[c] > m ? w[c] : m;
  }
  if (!std::isfinite(m)) m = 0.0f;
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < C; ++c) {
    w[c] = exp_nonpositive(w[c] - m);
    total += static_cast<double>(w[c]) * counts[c];
  }
  *m_out = m;
  return total;
}

#ifdef LCKV_X86_DISPATCH
// The same on 8 lanes (detail::exp_nonpositive8); the last C % 8 clusters by the portable code.
LCKV_TARGET_AVX2 inline double cluster_weights_avx2(float* w, const float* counts, int64_t C, float scale,
                                                    float* m_out) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t C8 = C - C % 8;
  const __m256 ninf = _mm256_set1_ps(neg_inf), zero = _mm256_setzero_ps(), scale8 = _mm256_set1_ps(scale);
  __m256 max8 = ninf;
  for (int64_t c = 0; c < C8; c += 8) {
    const __m256 empty = _mm256_cmp_ps(_mm256_loadu_ps(counts + c), zero, _CMP_LE_OQ);
    const __m256 s = _mm256_blendv_ps(_mm256_mul_ps(scale8, _mm256_loadu_ps(w + c)), ninf, empty);
    _mm256_storeu_ps(w + c, s);
    max8 = _mm256_max_ps(s, max8);  // a NaN score leaves the max alone (as the portable loop)
  }
  float m = detail::horizontal_max(max8);
  for (int64_t c = C8; c < C; ++c) {
    w[c] = counts[c] > 0.0f ? scale * w[c] : neg_inf;
    m = w[c] > m ? w[c] : m;
  }
  if (!std::isfinite(m)) m = 0.0f;
  const __m256 m8 = _mm256_set1_ps(m);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (int64_t c = 0; c < C8; c += 8) {
    const __m256 e = detail::exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(w + c), m8));
    _mm256_storeu_ps(w + c, e);
    const __m256 ec = _mm256_mul_ps(e, _mm256_loadu_ps(counts + c));  // exact enough: one rounding
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(ec)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(ec, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(lo, hi));
  double total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (int64_t c = C8; c < C; ++c) {
    w[c] = exp_nonpositive(w[c] - m);
    total += static_cast<double>(w[c]) * counts[c];
  }
  *m_out = m;
  return total;
}
#endif

// The cluster-weights kernel for this CPU (allow_simd = false: the portable one, for tests).
inline ClusterWeightsFn cluster_weights_for_cpu(bool allow_simd = true) {
#ifdef LCKV_X86_DISPATCH
  if (allow_simd && detect_simd_level() != SimdLevel::kScalar) return cluster_weights_avx2;
#endif
  (void)allow_simd;
  return cluster_weights_portable;
}

}  // namespace lckv
