// Inner product of two float vectors, with the SIMD path picked once at run time.
//
// The AVX2 and AVX-512 kernels are compiled per function with target attributes; `*_for(level)`
// returns the kernel of a level from cpu_features.h (an index picks its kernels once, at
// construction, as hnswlib's space_ip.h does). Every path accumulates in fp32; they differ from
// each other only by summation order. Torch-free.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "lckv/cpu_features.h"

namespace lckv {

// dot(a, b) over dim floats.
using InnerProductFn = float (*)(const float* a, const float* b, std::size_t dim);

// Portable fallback; four accumulators so the compiler can vectorize it.
inline float inner_product_scalar(const float* a, const float* b, std::size_t dim) {
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  std::size_t i = 0;
  for (; i + 4 <= dim; i += 4) {
    acc[0] += a[i] * b[i];
    acc[1] += a[i + 1] * b[i + 1];
    acc[2] += a[i + 2] * b[i + 2];
    acc[3] += a[i + 3] * b[i + 3];
  }
  for (; i < dim; ++i) acc[0] += a[i] * b[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

#ifdef LCKV_X86_DISPATCH

LCKV_TARGET_AVX2 inline float inner_product_avx2(const float* a, const float* b,
                                                                     std::size_t dim) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  std::size_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i + 8 <= dim) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    i += 8;
  }
  acc0 = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float sum = _mm_cvtss_f32(s);
  for (; i < dim; ++i) sum += a[i] * b[i];
  return sum;
}

LCKV_TARGET_AVX512 inline float inner_product_avx512(const float* a, const float* b,
                                                                      std::size_t dim) {
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  std::size_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  if (i + 16 <= dim) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    i += 16;
  }
  if (i < dim) {  // masked tail: no scalar loop
    const __mmask16 mask = static_cast<__mmask16>((1u << (dim - i)) - 1u);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc1);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(acc0, acc1));
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

#endif  // LCKV_X86_DISPATCH

// out[j] = dot(query, base + ids[j] * dim) for j < n: one call per graph expansion, so the
// per-key kernel is inlined instead of called through a pointer.
using InnerProductBatchFn = void (*)(const float* query, const float* base, const uint32_t* ids,
                                     std::size_t n, std::size_t dim, float* out);

inline void inner_product_batch_scalar(const float* query, const float* base, const uint32_t* ids,
                                       std::size_t n, std::size_t dim, float* out) {
  for (std::size_t j = 0; j < n; ++j) out[j] = inner_product_scalar(query, base + ids[j] * dim, dim);
}

#ifdef LCKV_X86_DISPATCH
// [sum of a[0], ..., sum of a[7]]: eight horizontal sums in one register.
LCKV_TARGET_AVX2 inline __m256 horizontal_sums8(const __m256 a[8]) {
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // per 128-bit half
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// out[j] = dot(query, row(j)) for j < n, eight rows at a time when dim is a multiple of 8: the
// eight dot products share each query load, and their horizontal sums are one shuffle tree
// instead of eight (for head_dim 8 that tree was most of the work).
template <typename Row>
LCKV_TARGET_AVX2 inline void inner_products8_avx2(const float* query, std::size_t n,
                                                                     std::size_t dim, float* out, Row row) {
  std::size_t j = 0;
  if (dim % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      const float* r[8];
      __m256 acc[8];
      for (int u = 0; u < 8; ++u) {
        r[u] = row(j + u);
        acc[u] = _mm256_setzero_ps();
      }
      for (std::size_t d = 0; d < dim; d += 8) {
        const __m256 q = _mm256_loadu_ps(query + d);
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(q, _mm256_loadu_ps(r[u] + d), acc[u]);
      }
      _mm256_storeu_ps(out + j, horizontal_sums8(acc));
    }
  }
  for (; j < n; ++j) out[j] = inner_product_avx2(query, row(j), dim);
}

LCKV_TARGET_AVX2 inline void inner_product_batch_avx2(
    const float* query, const float* base, const uint32_t* ids, std::size_t n, std::size_t dim, float* out) {
  inner_products8_avx2(query, n, dim, out, [&](std::size_t j) { return base + ids[j] * dim; });
}

LCKV_TARGET_AVX512 inline void inner_product_batch_avx512(
    const float* query, const float* base, const uint32_t* ids, std::size_t n, std::size_t dim, float* out) {
  for (std::size_t j = 0; j < n; ++j) out[j] = inner_product_avx512(query, base + ids[j] * dim, dim);
}
#endif  // LCKV_X86_DISPATCH

// out[j] = dot(query, rows + j * dim) for j < n: contiguous rows (centroids, packed lists).
using InnerProductRowsFn = void (*)(const float* query, const float* rows, std::size_t n, std::size_t dim,
                                    float* out);

inline void inner_product_rows_scalar(const float* query, const float* rows, std::size_t n, std::size_t dim,
                                      float* out) {
  for (std::size_t j = 0; j < n; ++j) out[j] = inner_product_scalar(query, rows + j * dim, dim);
}

#ifdef LCKV_X86_DISPATCH
LCKV_TARGET_AVX2 inline void inner_product_rows_avx2(
    const float* query, const float* rows, std::size_t n, std::size_t dim, float* out) {
  inner_products8_avx2(query, n, dim, out, [&](std::size_t j) { return rows + j * dim; });
}

LCKV_TARGET_AVX512 inline void inner_product_rows_avx512(
    const float* query, const float* rows, std::size_t n, std::size_t dim, float* out) {
  for (std::size_t j = 0; j < n; ++j) out[j] = inner_product_avx512(query, rows + j * dim, dim);
}
#endif  // LCKV_X86_DISPATCH

// Rows stored in blocks of 8, transposed: block b holds rows 8b..8b+7 as [dim][8] floats, so one
// query component multiplies 8 rows at once (no horizontal sums: cheap for small dim).
// out[8 * b + j] = dot(query, row 8b + j) for every block b < n_blocks.
using InnerProductBlocksFn = void (*)(const float* query, const float* blocks, std::size_t n_blocks,
                                      std::size_t dim, float* out);

inline void inner_product_blocks_scalar(const float* query, const float* blocks, std::size_t n_blocks,
                                        std::size_t dim, float* out) {
  for (std::size_t b = 0; b < n_blocks; ++b) {
    const float* blk = blocks + b * dim * 8;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t d = 0; d < dim; ++d)
      for (int j = 0; j < 8; ++j) acc[j] += query[d] * blk[d * 8 + j];
    for (int j = 0; j < 8; ++j) out[b * 8 + j] = acc[j];
  }
}

#ifdef LCKV_X86_DISPATCH
// Several blocks per step, dim outermost: one block's sum over dim is a chain of dependent FMAs
// (latency ~4 cycles each), so a block at a time ran at a fraction of the FMA throughput; kB blocks
// give kB independent chains. Short inputs (a cluster's 1-3 blocks) take steps of 2 and 1. Each
// output is summed in the same order whatever the step (bitwise the same results).
template <std::size_t kB>
LCKV_TARGET_AVX2 inline void inner_product_blocks_step_avx2(const float* query, const float* blk,
                                                                              std::size_t dim, float* out) {
  const std::size_t stride = dim * 8;
  __m256 acc[kB];
  for (std::size_t k = 0; k < kB; ++k) acc[k] = _mm256_setzero_ps();
  for (std::size_t d = 0; d < dim; ++d) {
    const __m256 x = _mm256_set1_ps(query[d]);
    for (std::size_t k = 0; k < kB; ++k) acc[k] = _mm256_fmadd_ps(x, _mm256_loadu_ps(blk + k * stride + d * 8), acc[k]);
  }
  for (std::size_t k = 0; k < kB; ++k) _mm256_storeu_ps(out + k * 8, acc[k]);
}

LCKV_TARGET_AVX2 inline void inner_product_blocks_avx2(
    const float* query, const float* blocks, std::size_t n_blocks, std::size_t dim, float* out) {
  std::size_t b = 0;
  for (; b + 8 <= n_blocks; b += 8) inner_product_blocks_step_avx2<8>(query, blocks + b * dim * 8, dim, out + b * 8);
  if (b + 4 <= n_blocks) {
    inner_product_blocks_step_avx2<4>(query, blocks + b * dim * 8, dim, out + b * 8);
    b += 4;
  }
  if (b + 2 <= n_blocks) {
    inner_product_blocks_step_avx2<2>(query, blocks + b * dim * 8, dim, out + b * 8);
    b += 2;
  }
  if (b < n_blocks) inner_product_blocks_step_avx2<1>(query, blocks + b * dim * 8, dim, out + b * 8);
}
#endif  // LCKV_X86_DISPATCH

// Two queries over the same blocks in one pass (a GQA pair shares every load):
// out0[8 * b + j] = dot(q0, row 8b + j), out1[8 * b + j] = dot(q1, row 8b + j).
using InnerProductBlocksPairFn = void (*)(const float* q0, const float* q1, const float* blocks, std::size_t n_blocks,
                                          std::size_t dim, float* out0, float* out1);

inline void inner_product_blocks_pair_scalar(const float* q0, const float* q1, const float* blocks,
                                             std::size_t n_blocks, std::size_t dim, float* out0, float* out1) {
  inner_product_blocks_scalar(q0, blocks, n_blocks, dim, out0);
  inner_product_blocks_scalar(q1, blocks, n_blocks, dim, out1);
}

#ifdef LCKV_X86_DISPATCH
// (kB blocks per step as in inner_product_blocks_avx2: 2 * kB independent chains.)
template <std::size_t kB>
LCKV_TARGET_AVX2 inline void inner_product_blocks_pair_step_avx2(
    const float* q0, const float* q1, const float* blk, std::size_t dim, float* out0, float* out1) {
  const std::size_t stride = dim * 8;
  __m256 acc0[kB], acc1[kB];
  for (std::size_t k = 0; k < kB; ++k) acc0[k] = acc1[k] = _mm256_setzero_ps();
  for (std::size_t d = 0; d < dim; ++d) {
    const __m256 x0 = _mm256_set1_ps(q0[d]), x1 = _mm256_set1_ps(q1[d]);
    for (std::size_t k = 0; k < kB; ++k) {
      const __m256 x = _mm256_loadu_ps(blk + k * stride + d * 8);
      acc0[k] = _mm256_fmadd_ps(x0, x, acc0[k]);
      acc1[k] = _mm256_fmadd_ps(x1, x, acc1[k]);
    }
  }
  for (std::size_t k = 0; k < kB; ++k) {
    _mm256_storeu_ps(out0 + k * 8, acc0[k]);
    _mm256_storeu_ps(out1 + k * 8, acc1[k]);
  }
}

LCKV_TARGET_AVX2 inline void inner_product_blocks_pair_avx2(
    const float* q0, const float* q1, const float* blocks, std::size_t n_blocks, std::size_t dim, float* out0,
    float* out1) {
  std::size_t b = 0;
  for (; b + 4 <= n_blocks; b += 4)
    inner_product_blocks_pair_step_avx2<4>(q0, q1, blocks + b * dim * 8, dim, out0 + b * 8, out1 + b * 8);
  if (b + 2 <= n_blocks) {
    inner_product_blocks_pair_step_avx2<2>(q0, q1, blocks + b * dim * 8, dim, out0 + b * 8, out1 + b * 8);
    b += 2;
  }
  if (b < n_blocks) inner_product_blocks_pair_step_avx2<1>(q0, q1, blocks + b * dim * 8, dim, out0 + b * 8, out1 + b * 8);
}
#endif  // LCKV_X86_DISPATCH

// The kernel for `level` (falls back to scalar when that level is not compiled in).
inline InnerProductFn inner_product_for(SimdLevel level) {
#ifdef LCKV_X86_DISPATCH
  if (level == SimdLevel::kAvx512) return inner_product_avx512;
  if (level == SimdLevel::kAvx2) return inner_product_avx2;
#endif
  (void)level;
  return inner_product_scalar;
}

// The batch kernel for `level` (falls back to scalar when that level is not compiled in).
inline InnerProductBatchFn inner_product_batch_for(SimdLevel level) {
#ifdef LCKV_X86_DISPATCH
  if (level == SimdLevel::kAvx512) return inner_product_batch_avx512;
  if (level == SimdLevel::kAvx2) return inner_product_batch_avx2;
#endif
  (void)level;
  return inner_product_batch_scalar;
}

// The level used for vectors of `dim` floats: AVX-512 for dim >= 16, AVX2 for dim >= 8.
inline SimdLevel simd_level_for(std::size_t dim) {
  SimdLevel level = detect_simd_level();
  if (level == SimdLevel::kAvx512 && dim < 16) level = SimdLevel::kAvx2;
  if (level == SimdLevel::kAvx2 && dim < 8) level = SimdLevel::kScalar;
  return level;
}

// The contiguous-rows kernel for `level` (falls back to scalar when that level is not compiled in).
inline InnerProductRowsFn inner_product_rows_for(SimdLevel level) {
#ifdef LCKV_X86_DISPATCH
  if (level == SimdLevel::kAvx512) return inner_product_rows_avx512;
  if (level == SimdLevel::kAvx2) return inner_product_rows_avx2;
#endif
  (void)level;
  return inner_product_rows_scalar;
}

// The blocked kernel for `level` (AVX-512 machines use the AVX2 one: 8 rows per block).
inline InnerProductBlocksFn inner_product_blocks_for(SimdLevel level) {
#ifdef LCKV_X86_DISPATCH
  if (level == SimdLevel::kAvx512 || level == SimdLevel::kAvx2) return inner_product_blocks_avx2;
#endif
  (void)level;
  return inner_product_blocks_scalar;
}

inline InnerProductBlocksPairFn inner_product_blocks_pair_for(SimdLevel level) {
#ifdef LCKV_X86_DISPATCH
  if (level == SimdLevel::kAvx512 || level == SimdLevel::kAvx2) return inner_product_blocks_pair_avx2;
#endif
  (void)level;
  return inner_product_blocks_pair_scalar;
}

// Writes x [dim] as row `row` of a blocks-of-8 transposed layout ([block][dim][8] floats, as
// inner_product_blocks reads it), growing `blocks` with zero rows as needed.
inline void put_blocked_row(std::vector<float>& blocks, int64_t row, const float* x, int64_t dim) {
  const auto need = static_cast<std::size_t>((row / 8 + 1) * 8 * dim);
  if (blocks.size() < need) blocks.resize(need, 0.0f);
  float* block = blocks.data() + (row / 8) * 8 * dim;
  for (int64_t d = 0; d < dim; ++d) block[d * 8 + row % 8] = x[d];
}

// out[g * out_stride + r] = queries[g] . row r of n_blocks blocks of 8 transposed rows, for the
// `group` queries [group, dim], two at a time (one pass over the rows per pair).
inline void score_blocks(InnerProductBlocksFn one, InnerProductBlocksPairFn pair, const float* queries, int64_t group,
                         int64_t dim, const float* blocks, int64_t n_blocks, float* out, int64_t out_stride) {
  const auto d = static_cast<std::size_t>(dim);
  const auto nb = static_cast<std::size_t>(n_blocks);
  int64_t g = 0;
  for (; g + 2 <= group; g += 2)
    pair(queries + g * dim, queries + (g + 1) * dim, blocks, nb, d, out + g * out_stride, out + (g + 1) * out_stride);
  if (g < group) one(queries + g * dim, blocks, nb, d, out + g * out_stride);
}

// The nearest of C centroids in L2 from inner products: argmax_c (scores[c] - half_norms[c]) with
// half_norms[c] = |c|^2 / 2 (ties: the lower c).
inline int64_t nearest_from_scores_scalar(const float* scores, const float* half_norms, int64_t C) {
  int64_t best = 0;
  float best_score = scores[0] - half_norms[0];
  for (int64_t c = 1; c < C; ++c) {
    const float s = scores[c] - half_norms[c];
    if (s > best_score) {
      best_score = s;
      best = c;
    }
  }
  return best;
}

#ifdef LCKV_X86_DISPATCH
// nearest_from_scores on 8 lanes: each lane keeps its best (strictly greater replaces, so the
// lowest c of a lane's ties), then the best lane value and the lowest c holding it.
LCKV_TARGET_AVX2 inline int64_t nearest_from_scores_avx2(const float* scores,
                                                                           const float* half_norms, int64_t C) {
  if (C < 16) return nearest_from_scores_scalar(scores, half_norms, C);
  __m256 best = _mm256_sub_ps(_mm256_loadu_ps(scores), _mm256_loadu_ps(half_norms));
  __m256i best_at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i at = best_at;
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t c = 8;
  for (; c + 8 <= C; c += 8) {
    at = _mm256_add_epi32(at, eight);
    const __m256 s = _mm256_sub_ps(_mm256_loadu_ps(scores + c), _mm256_loadu_ps(half_norms + c));
    const __m256 better = _mm256_cmp_ps(s, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, s, better);
    best_at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_at), _mm256_castsi256_ps(at), better));
  }
  alignas(32) float lane_best[8];
  alignas(32) int32_t lane_at[8];
  _mm256_store_ps(lane_best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_at), best_at);
  int64_t winner = lane_at[0];
  float winner_score = lane_best[0];
  for (int lane = 1; lane < 8; ++lane) {
    if (lane_best[lane] > winner_score || (lane_best[lane] == winner_score && lane_at[lane] < winner)) {
      winner_score = lane_best[lane];
      winner = lane_at[lane];
    }
  }
  for (; c < C; ++c) {  // the last C % 8 scores
    const float v = scores[c] - half_norms[c];
    if (v > winner_score) {
      winner_score = v;
      winner = c;
    }
  }
  return winner;
}
#endif

// nearest_from_scores_scalar on the widest SIMD this CPU has (same result for finite scores).
inline int64_t nearest_from_scores(const float* scores, const float* half_norms, int64_t C) {
#ifdef LCKV_X86_DISPATCH
  if (detect_simd_level() != SimdLevel::kScalar) return nearest_from_scores_avx2(scores, half_norms, C);
#endif
  return nearest_from_scores_scalar(scores, half_norms, C);
}

}  // namespace lckv
