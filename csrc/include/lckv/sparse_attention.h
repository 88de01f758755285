// Decode-time sparse attention over per-kv-head gathered keys, with log-sum-exp.
//
// For every (batch b, kv head h) the query heads of h's GQA group attend to the key/value rows
// listed in indices[b, h, :] (-1 = padding, skipped):
//   s_gj = scale * q_g . k_j,   lse_g = log sum_j exp(s_gj),   out_g = sum_j exp(s_gj - lse_g) v_j
// A group whose indices are all -1 gets out = 0 and lse = -inf.
//
// Torch-free core. K/V are read in their stored element type (fp32, fp16 or bf16 bits) with
// arbitrary batch/head/row strides (the head_dim axis must be contiguous), converted to fp32 on
// load; all accumulation is fp32. The gathered K row and V row are each read once per GQA group.
// Work is split over (batch, kv head) with OpenMP. Rows are prefetched in batches ahead of use
// (random gathers defeat the hardware prefetchers). The portable inner loops are written for the
// compiler to vectorise (`omp simd` reductions, branch-free fp16 conversion, a polynomial exp); on
// x86 an AVX2+FMA+F16C path is selected once at start-up (hand-written intrinsics for head_dim a
// multiple of 8, the portable loops compiled for AVX2 otherwise; where AVX-512VL exists the same
// code is compiled again with 32 vector registers and wider register blocks, and bf16 K with
// AVX512_BF16 scores rows by VDPBF16PS), with the portable build as the fallback. sparse_attention_kv_head() runs one kv head's query group on its own (no OpenMP) for
// callers that parallelise themselves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "lckv/cpu_features.h"
#include "lckv/dtypes.h"
#include "lckv/exp_weights.h"  // exp_nonpositive, exp_nonpositive8

namespace lckv {

// Sizes and strides (in elements) of one sparse attention call.
struct SparseAttentionProblem {
  int64_t batch = 0;         // B
  int64_t q_heads = 0;       // Hq, a multiple of kv_heads
  int64_t kv_heads = 0;      // Hkv
  int64_t head_dim = 0;      // D
  int64_t n_selected = 0;    // indices per (batch, kv head)
  int64_t seq = 0;           // rows per (batch, kv head) in K/V; indices lie in [-1, seq)
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;  // K element strides
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;  // V element strides
  float scale = 1.0f;        // softmax scale applied to q . k
};

namespace detail {

// Per-thread scratch, reused across the (batch, kv head) tasks a thread runs.
struct GroupScratch {
  std::vector<float> scores;  // [group, n_selected] scores, then probabilities
  std::vector<float> row;     // [(tile + 1) * head_dim] K or V rows converted to fp32, a zero row
  std::vector<float> acc;     // [group, head_dim] output accumulators
  std::vector<uint16_t> q_bf16;  // [group, head_dim] the unscaled queries as bf16 (bf16 dot path)
  const float* query = nullptr;  // the task's unscaled queries [group, head_dim] fp32
};

LCKV_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
LCKV_ALWAYS_INLINE const float* load_row(const T* src, float* buffer, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) buffer[d] = to_float(src[d]);
  return buffer;
}
LCKV_ALWAYS_INLINE const float* load_row(const float* src, float*, int64_t) { return src; }

// Row loaders: how a K/V row becomes fp32. The portable one is plain C++; the x86 one converts
// fp16 with the F16C instruction (8 values per instruction) and is used only by the AVX2 path.
struct PortableLoad {
  template <typename T>
  static LCKV_ALWAYS_INLINE const float* row(const T* src, float* buffer, int64_t n) {
    return load_row(src, buffer, n);
  }
};

#ifdef LCKV_X86_DISPATCH
LCKV_TARGET_AVX2 inline const float* load_row_f16c(const half_bits* src, float* buffer,
                                                                           int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
    _mm256_storeu_ps(buffer + d, _mm256_cvtph_ps(h));
  }
  for (; d < n; ++d) buffer[d] = to_float(src[d]);
  return buffer;
}

struct F16cLoad {
  template <typename T>
  static LCKV_ALWAYS_INLINE const float* row(const T* src, float* buffer, int64_t n) {
    return load_row(src, buffer, n);
  }
  static LCKV_ALWAYS_INLINE const float* row(const half_bits* src, float* buffer, int64_t n) {
    return load_row_f16c(src, buffer, n);
  }
};
#endif

// Software prefetch of gathered rows. Random rows defeat the hardware prefetchers, so each pass
// requests its rows ahead of use, in batches: when it starts on rows [j, j + kPrefetchBatch) it
// prefetches all of [j + kPrefetchBatch, j + 2 kPrefetchBatch) at once. A batch of back-to-back
// prefetches lets their TLB misses and cache misses overlap each other; spread one row at a time
// between the arithmetic, each miss stalled the pipeline on its own (measured on an EPYC VM: a
// 1M-token fp16 layer took 1.9 ms with per-row prefetch 16 rows ahead, 1.3 ms with batches of
// 32). The hint is "into L2" (T1): it sustains more misses in flight than T0 or NTA here.
constexpr int64_t kPrefetchBatch = 32;

LCKV_ALWAYS_INLINE void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

// Prefetches every cache line of one gathered row (also the last one of a row not 64-byte aligned).
template <typename T>
LCKV_ALWAYS_INLINE void prefetch_row(const T* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t misalignment = int64_t(reinterpret_cast<uintptr_t>(bytes) & 63u);
  for (int64_t offset = 0; offset < dim * int64_t(sizeof(T)) + misalignment; offset += 64) {
    prefetch(bytes - misalignment + offset);
  }
}

// Prefetches the rows idx[begin, min(end, n)) of one head (padding skipped).
template <typename T>
LCKV_ALWAYS_INLINE void prefetch_rows(const T* head, int64_t stride, const int64_t* idx, int64_t begin,
                                      int64_t end, int64_t n, int64_t dim) {
  for (int64_t j = begin; j < end && j < n; ++j) {
    if (idx[j] >= 0) prefetch_row(head + idx[j] * stride, dim);
  }
}

// The score of a selected row as the softmax sees it: -inf there means "no key", so a selected
// row whose q . k is -inf (an inf in its K) becomes NaN and poisons its query's row like any other
// non-finite score, instead of silently getting weight 0.
LCKV_ALWAYS_INLINE float selected_score(float s) {
  return s == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::quiet_NaN() : s;
}

// Softmax over the rows of scores [group, stride] (first n entries used, -inf = no key): writes
// lse per row and turns scores into probabilities. A row with no key gets lse = -inf and all-zero
// probabilities (so the V pass adds nothing); a NaN score makes the whole row NaN.
LCKV_ALWAYS_INLINE void softmax_in_place(float* scores, int64_t group, int64_t stride, int64_t n, float* lse) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * stride;
    float m = neg_inf;
    int nan_count = 0;
#pragma omp simd reduction(max : m) reduction(+ : nan_count)
    for (int64_t j = 0; j < n; ++j) {
      m = s[j] > m ? s[j] : m;
      nan_count += s[j] != s[j];
    }
    if (nan_count > 0) m = std::numeric_limits<float>::quiet_NaN();  // a NaN score poisons the row
    if (m == neg_inf) {  // nothing selected
      lse[g] = neg_inf;
      std::memset(s, 0, sizeof(float) * size_t(n));
      continue;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_nonpositive(s[j] - m);
      total += s[j];
    }
    lse[g] = m + std::log(total);
    const float inv = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
}

// One (batch, kv head) task: q_group [G, D] fp32 (already scaled), out_group [G, D], lse_group [G].
// Portable code for any head_dim: rows are processed in tiles of kTile = 4 and query heads in
// pairs: a tile's K rows are dotted with two queries in one loop (8 independent accumulators, each
// loaded element used twice), and a tile's V rows update two output rows in one pass.
template <typename Load, typename T>
LCKV_ALWAYS_INLINE void attend_group_impl(const float* q_group, const T* k_head, const T* v_head,
                                          const int64_t* idx, const SparseAttentionProblem& p,
                                          float* out_group, float* lse_group, GroupScratch& scratch) {
  constexpr int64_t kTile = 4;
  static_assert(kPrefetchBatch % kTile == 0, "prefetch batches start on tile boundaries");
  const int64_t group = p.q_heads / p.kv_heads, n = p.n_selected, dim = p.head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  scratch.scores.resize(size_t(group * n));
  scratch.row.assign(size_t((kTile + 1) * dim), 0.0f);  // kTile converted rows + one zero row
  scratch.acc.assign(size_t(group * dim), 0.0f);
  float* scores = scratch.scores.data();
  float* tile_rows = scratch.row.data();
  const float* zero_row = tile_rows + kTile * dim;
  float* acc = scratch.acc.data();

  // Loads the tile starting at j0 (padding and the tail read the zero row); returns valid flags.
  auto load_tile = [&](const T* head, int64_t stride, int64_t j0, const float* rows[kTile], bool valid[kTile]) {
    if (j0 % kPrefetchBatch == 0) prefetch_rows(head, stride, idx, j0 + kPrefetchBatch, j0 + 2 * kPrefetchBatch, n, dim);
    for (int64_t u = 0; u < kTile; ++u) {
      const int64_t j = j0 + u;
      valid[u] = j < n && idx[j] >= 0;
      rows[u] = valid[u] ? Load::row(head + idx[j] * stride, tile_rows + u * dim, dim) : zero_row;
    }
  };

  // Pass 1: scores; each gathered K row is read once for the whole group.
  prefetch_rows(k_head, p.k_stride_s, idx, 0, kPrefetchBatch, n, dim);
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const float* r[kTile];
    bool valid[kTile];
    load_tile(k_head, p.k_stride_s, j0, r, valid);
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    auto store = [&](int64_t g, float s0, float s1, float s2, float s3) {
      const float tile_scores[kTile] = {s0, s1, s2, s3};
      for (int64_t u = 0; u < kTile && j0 + u < n; ++u) scores[g * n + j0 + u] = valid[u] ? selected_score(tile_scores[u]) : neg_inf;
    };
    int64_t g = 0;
    for (; g + 2 <= group; g += 2) {
      const float* qa = q_group + g * dim;
      const float* qb = qa + dim;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t d = 0; d < dim; ++d) {
        const float xa = qa[d], xb = qb[d];
        a0 += xa * r0[d];
        a1 += xa * r1[d];
        a2 += xa * r2[d];
        a3 += xa * r3[d];
        b0 += xb * r0[d];
        b1 += xb * r1[d];
        b2 += xb * r2[d];
        b3 += xb * r3[d];
      }
      store(g, a0, a1, a2, a3);
      store(g + 1, b0, b1, b2, b3);
    }
    if (g < group) {
      const float* qa = q_group + g * dim;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t d = 0; d < dim; ++d) {
        const float xa = qa[d];
        a0 += xa * r0[d];
        a1 += xa * r1[d];
        a2 += xa * r2[d];
        a3 += xa * r3[d];
      }
      store(g, a0, a1, a2, a3);
    }
  }
  prefetch_rows(v_head, p.v_stride_s, idx, 0, kPrefetchBatch, n, dim);  // overlaps the softmax
  softmax_in_place(scores, group, n, n, lse_group);
  // Pass 2: weighted sum of V rows; each gathered V row is read once for the whole group.
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const float* r[kTile];
    bool valid[kTile];
    load_tile(v_head, p.v_stride_s, j0, r, valid);
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    auto weights = [&](int64_t g, float w[kTile]) {
      for (int64_t u = 0; u < kTile; ++u) w[u] = valid[u] ? scores[g * n + j0 + u] : 0.0f;
    };
    int64_t g = 0;
    for (; g + 2 <= group; g += 2) {
      float wa[kTile], wb[kTile];
      weights(g, wa);
      weights(g + 1, wb);
      float* a = acc + g * dim;
      float* b = a + dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const float v0 = r0[d], v1 = r1[d], v2 = r2[d], v3 = r3[d];
        a[d] += wa[0] * v0 + wa[1] * v1 + wa[2] * v2 + wa[3] * v3;
        b[d] += wb[0] * v0 + wb[1] * v1 + wb[2] * v2 + wb[3] * v3;
      }
    }
    if (g < group) {
      float wa[kTile];
      weights(g, wa);
      float* a = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += wa[0] * r0[d] + wa[1] * r1[d] + wa[2] * r2[d] + wa[3] * r3[d];
    }
  }
  std::memcpy(out_group, acc, sizeof(float) * size_t(group * dim));  // zeros for an empty group
}

template <typename T>
using AttendGroupFn = void (*)(const float*, const T*, const T*, const int64_t*,
                               const SparseAttentionProblem&, float*, float*, GroupScratch&);

template <typename T>
void attend_group_portable(const float* q, const T* k, const T* v, const int64_t* idx,
                           const SparseAttentionProblem& p, float* out, float* lse,
                           GroupScratch& scratch) {
  attend_group_impl<PortableLoad>(q, k, v, idx, p, out, lse, scratch);
}

#ifdef LCKV_X86_DISPATCH
// 8 consecutive row elements as fp32, converted in registers.
LCKV_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LCKV_TARGET_AVX2 inline __m256 load8(const half_bits* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
LCKV_TARGET_AVX2 inline __m256 load8(const bfloat16_bits* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// [sum a0, sum a1, sum a2, sum a3, sum b0, sum b1, sum b2, sum b3]: eight horizontal sums at once.
LCKV_TARGET_AVX2 inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 b0, __m256 b1,
                                    __m256 b2, __m256 b3) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// softmax_in_place for rows whose length `stride` is a multiple of 8, on 8 lanes.
LCKV_TARGET_AVX2 inline void softmax_in_place8(float* scores, int64_t group, int64_t stride, float* lse) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * stride;
    __m256 m8 = _mm256_set1_ps(neg_inf), nan8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < stride; j += 8) {
      const __m256 x = _mm256_loadu_ps(s + j);
      m8 = _mm256_max_ps(m8, x);
      nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    float m = horizontal_max(m8);
    if (_mm256_movemask_ps(nan8) != 0) m = std::numeric_limits<float>::quiet_NaN();  // NaN poisons the row
    if (m == neg_inf) {  // nothing selected
      lse[g] = neg_inf;
      std::memset(s, 0, sizeof(float) * size_t(stride));
      continue;
    }
    const __m256 max8 = _mm256_set1_ps(m);
    __m256 total8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < stride; j += 8) {
      const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), max8));
      _mm256_storeu_ps(s + j, e);
      total8 = _mm256_add_ps(total8, e);
    }
    const float total = horizontal_sum(total8);
    lse[g] = m + std::log(total);
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int64_t j = 0; j < stride; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
  }
}

// out[h, :] += sum_j probs[h * prob_stride + j] * rows[j][:] for the H heads h < H and the `count`
// rows j, in row order (one FMA chain per output element). The output is walked in chunks of V
// vectors; a chunk's H x V sums stay in registers for all the rows (H * V independent FMA chains,
// no load/store of the sums per row), and each loaded row vector is used by all H heads.
template <int H, int V, typename T>
LCKV_TARGET_AVX2 LCKV_ALWAYS_INLINE void weighted_rows_chunk(const T* const* rows, int64_t count, const float* probs,
                                                             int64_t prob_stride, float* out, int64_t dim,
                                                             int64_t c) {
  __m256 sums[H][V];
  for (int h = 0; h < H; ++h)
    for (int v = 0; v < V; ++v) sums[h][v] = _mm256_loadu_ps(out + h * dim + c + 8 * v);
  for (int64_t j = 0; j < count; ++j) {
    __m256 x[V];
    for (int v = 0; v < V; ++v) x[v] = load8(rows[j] + c + 8 * v);
    for (int h = 0; h < H; ++h) {
      const __m256 w = _mm256_broadcast_ss(probs + h * prob_stride + j);
      for (int v = 0; v < V; ++v) sums[h][v] = _mm256_fmadd_ps(w, x[v], sums[h][v]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + h * dim + c + 8 * v, sums[h][v]);
}

template <int H, int V, typename T>
LCKV_TARGET_AVX2 LCKV_ALWAYS_INLINE void weighted_rows(const T* const* rows, int64_t count, const float* probs,
                                                       int64_t prob_stride, float* out, int64_t dim) {
  int64_t c = 0;
  for (; c + 8 * V <= dim; c += 8 * V) weighted_rows_chunk<H, V>(rows, count, probs, prob_stride, out, dim, c);
  for (; c < dim; c += 8) weighted_rows_chunk<H, 1>(rows, count, probs, prob_stride, out, dim, c);
}

// Rows j0 .. j0 + 3 of one head's gathered rows (padding and the tail read zero_row); at the start
// of each prefetch batch, the next batch is prefetched. No target attribute: it is inlined into
// every SIMD variant's passes.
template <typename T>
LCKV_ALWAYS_INLINE void gather_tile(const T* head, int64_t row_stride, const int64_t* idx, int64_t j0, int64_t n,
                                    int64_t dim, const T* zero_row, const T* rows[4]) {
  if (j0 % kPrefetchBatch == 0) prefetch_rows(head, row_stride, idx, j0 + kPrefetchBatch, j0 + 2 * kPrefetchBatch, n, dim);
  for (int64_t u = 0; u < 4; ++u) {
    const int64_t j = j0 + u;
    rows[u] = j < n && idx[j] >= 0 ? head + idx[j] * row_stride : zero_row;
  }
}

// Scores of a 4 heads x 4 rows block, reduced as sum8 gives them (heads 0-1 in s01, 2-3 in s23),
// to out[h * stride + u].
LCKV_TARGET_AVX2 LCKV_ALWAYS_INLINE void store_scores_4x4(__m256 s01, __m256 s23, float* out, int64_t stride) {
  _mm_storeu_ps(out, _mm256_castps256_ps128(s01));
  _mm_storeu_ps(out + stride, _mm256_extractf128_ps(s01, 1));
  _mm_storeu_ps(out + 2 * stride, _mm256_castps256_ps128(s23));
  _mm_storeu_ps(out + 3 * stride, _mm256_extractf128_ps(s23, 1));
}

// The task's unscaled queries (scratch.query) as bf16 in scratch.q_bf16, when every one is a bf16
// value (its low 16 bits zero); false otherwise (then the fp32 code scores the rows).
inline bool queries_as_bf16(GroupScratch& scratch, int64_t count) {
  scratch.q_bf16.resize(size_t(count));
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t u = float_to_bits(scratch.query[i]);
    if ((u & 0xffffu) != 0u) return false;
    scratch.q_bf16[size_t(i)] = uint16_t(u >> 16);
  }
  return true;
}

// Pass 1 of the bf16 dot path: scores[h * stride + j] = scale * q_h . row j for the first
// `heads` (a multiple of 4) query heads, q [heads, dim] bf16 (dim % 16 == 0), rows taken as the
// fp32 code takes them (gather_tile). Each 4 heads x 4 rows block keeps 16 accumulators; one
// VDPBF16PS adds the products of 8 bf16 pairs to 8 lanes. Not inlined: the caller's target lacks
// AVX512_BF16.
template <typename T>
LCKV_TARGET_AVX512_BF16 void bf16_dot_scores(const uint16_t* q, int64_t heads, const T* head, int64_t row_stride,
                                           const int64_t* idx, int64_t n, int64_t dim, float scale, const T* zero_row,
                                           float* scores, int64_t stride) {
  constexpr int64_t kTile = 4;
  const __m256 scale8 = _mm256_set1_ps(scale);
  prefetch_rows(head, row_stride, idx, 0, kPrefetchBatch, n, dim);
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const T* r[kTile];
    gather_tile(head, row_stride, idx, j0, n, dim, zero_row, r);
    for (int64_t g = 0; g < heads; g += 4) {
      const uint16_t* qg = q + g * dim;
      __m256 acc[4][kTile];
      for (int h = 0; h < 4; ++h)
        for (int u = 0; u < kTile; ++u) acc[h][u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        __m256bh y[4];
        for (int h = 0; h < 4; ++h) y[h] = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + h * dim + d));
        for (int u = 0; u < kTile; ++u) {
          const __m256bh x = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[u] + d));
          for (int h = 0; h < 4; ++h) acc[h][u] = _mm256_dpbf16_ps(acc[h][u], y[h], x);
        }
      }
      const __m256 s01 = _mm256_mul_ps(sum8(acc[0][0], acc[0][1], acc[0][2], acc[0][3], acc[1][0], acc[1][1],
                                            acc[1][2], acc[1][3]), scale8);
      const __m256 s23 = _mm256_mul_ps(sum8(acc[2][0], acc[2][1], acc[2][2], acc[2][3], acc[3][0], acc[3][1],
                                            acc[3][2], acc[3][3]), scale8);
      store_scores_4x4(s01, s23, scores + g * stride + j0, stride);
    }
  }
}

// The AVX2 task for head_dim % 8 == 0 (64, 128, 256, ...): same two passes as attend_group_impl,
// but rows are converted in registers (no staging buffer), the dot products of a (heads x 4 rows)
// block are reduced together (sum8), the softmax runs on 8 lanes, and the tail tile reads a zero
// row. Both passes are FMA-bound once the rows are in cache, so the blocks are sized to keep the
// FMA units busy: kWide (32 vector registers, AVX-512VL encodings) scores 4 heads x 4 rows at once
// (16 independent accumulators, each converted row vector used 4 times), otherwise 2 heads x 4
// rows; the V pass keeps (heads x chunk of the output) sums in registers across a whole prefetch
// batch of rows (weighted_rows) instead of loading and storing the output for every 4 rows.
template <bool kWide, bool kBf16Dot, typename T>
LCKV_TARGET_AVX2 LCKV_ALWAYS_INLINE void attend_group_avx2_dim8(const float* q_group, const T* k_head,
                                                                const T* v_head, const int64_t* idx,
                                                                const SparseAttentionProblem& p, float* out_group,
                                                                float* lse_group, GroupScratch& scratch) {
  constexpr int64_t kTile = 4;
  static_assert(kPrefetchBatch % kTile == 0, "prefetch batches start on tile boundaries");
  const int64_t group = p.q_heads / p.kv_heads, n = p.n_selected, dim = p.head_dim;
  const int64_t stride = (n + 7) / 8 * 8;  // scores row stride: whole tiles and whole 8-lane vectors
  scratch.scores.resize(size_t(group * stride));
  scratch.row.assign(size_t(dim), 0.0f);  // all-zero bits: a zero row in every storage type
  scratch.acc.assign(size_t(group * dim), 0.0f);
  float* scores = scratch.scores.data();
  float* acc = scratch.acc.data();
  const T* zero_row = reinterpret_cast<const T*>(scratch.row.data());
  static_assert(kTile == 4, "gather_tile and the score blocks take 4 rows");
  auto tile = [&](const T* head, int64_t row_stride, int64_t j0, const T* rows[kTile]) {
    gather_tile(head, row_stride, idx, j0, n, dim, zero_row, rows);
  };

  // bf16 K with VDPBF16PS: the products of bf16 values are exact in fp32, so where the unscaled
  // queries are bf16 values (the glue casts q to K's dtype) the 4 x 4 blocks dot bf16 pairs
  // directly (no conversion, half the instructions) and the scale multiplies the sums.
  int64_t first_head = 0;  // heads [0, first_head) already scored
  if constexpr (kBf16Dot) {
    if (dim % 16 == 0 && group >= 4 && queries_as_bf16(scratch, group * dim)) {
      first_head = group / 4 * 4;
      bf16_dot_scores(scratch.q_bf16.data(), first_head, k_head, p.k_stride_s, idx, n, dim, p.scale, zero_row, scores,
                      stride);
    }
  }

  // Pass 1: scores of 4 rows x 4 heads (kWide), then 4 rows x 2 heads per step (a lone last head
  // reuses the pair code's reduction).
  if (first_head < group) prefetch_rows(k_head, p.k_stride_s, idx, 0, kPrefetchBatch, n, dim);
  for (int64_t j0 = 0; j0 < n && first_head < group; j0 += kTile) {
    const T* r[kTile];
    tile(k_head, p.k_stride_s, j0, r);
    int64_t g = first_head;
    for (; kWide && g + 4 <= group; g += 4) {  // 4 heads x 4 rows: 16 independent accumulators
      const float* q0 = q_group + g * dim;
      __m256 acc[4][kTile];
      for (int h = 0; h < 4; ++h)
        for (int u = 0; u < kTile; ++u) acc[h][u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        for (int u = 0; u < kTile; ++u) {
          const __m256 x = load8(r[u] + d);
          for (int h = 0; h < 4; ++h) acc[h][u] = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + h * dim + d), x, acc[h][u]);
        }
      }
      const __m256 s01 = sum8(acc[0][0], acc[0][1], acc[0][2], acc[0][3], acc[1][0], acc[1][1], acc[1][2], acc[1][3]);
      const __m256 s23 = sum8(acc[2][0], acc[2][1], acc[2][2], acc[2][3], acc[3][0], acc[3][1], acc[3][2], acc[3][3]);
      store_scores_4x4(s01, s23, scores + g * stride + j0, stride);
    }
    for (; g < group; g += 2) {
      const bool pair = g + 1 < group;
      const float* qa = q_group + g * dim;
      const float* qb = pair ? qa + dim : qa;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 x0 = load8(r[0] + d), x1 = load8(r[1] + d), x2 = load8(r[2] + d), x3 = load8(r[3] + d);
        const __m256 ya = _mm256_loadu_ps(qa + d), yb = _mm256_loadu_ps(qb + d);
        a0 = _mm256_fmadd_ps(ya, x0, a0);
        a1 = _mm256_fmadd_ps(ya, x1, a1);
        a2 = _mm256_fmadd_ps(ya, x2, a2);
        a3 = _mm256_fmadd_ps(ya, x3, a3);
        b0 = _mm256_fmadd_ps(yb, x0, b0);
        b1 = _mm256_fmadd_ps(yb, x1, b1);
        b2 = _mm256_fmadd_ps(yb, x2, b2);
        b3 = _mm256_fmadd_ps(yb, x3, b3);
      }
      const __m256 s = sum8(a0, a1, a2, a3, b0, b1, b2, b3);
      _mm_storeu_ps(scores + g * stride + j0, _mm256_castps256_ps128(s));
      if (pair) _mm_storeu_ps(scores + (g + 1) * stride + j0, _mm256_extractf128_ps(s, 1));
    }
  }
  for (int64_t j = 0; j < stride; ++j) {  // padding and the tail of the last tile: no key
    const bool selected = j < n && idx[j] >= 0;
    for (int64_t g = 0; g < group; ++g) {
      float& s = scores[g * stride + j];
      s = selected ? selected_score(s) : -std::numeric_limits<float>::infinity();
    }
  }
  prefetch_rows(v_head, p.v_stride_s, idx, 0, kPrefetchBatch, n, dim);  // overlaps the softmax
  softmax_in_place8(scores, group, stride, lse_group);

  // Pass 2: out += p * v over batches of kPrefetchBatch rows (the next batch prefetched), for 4, 2
  // or 1 query heads at a time; padding rows read the zero row with probability 0.
  const T* batch_rows[kPrefetchBatch];
  for (int64_t j0 = 0; j0 < n; j0 += kPrefetchBatch) {
    const int64_t count = std::min(kPrefetchBatch, n - j0);
    for (int64_t u = 0; u < count; u += kTile) tile(v_head, p.v_stride_s, j0 + u, batch_rows + u);  // + prefetch
    int64_t g = 0;
    for (; g + 4 <= group; g += 4) {
      weighted_rows<4, kWide ? 4 : 2>(batch_rows, count, scores + g * stride + j0, stride, acc + g * dim, dim);
    }
    for (; g + 2 <= group; g += 2) {
      weighted_rows<2, 4>(batch_rows, count, scores + g * stride + j0, stride, acc + g * dim, dim);
    }
    if (g < group) weighted_rows<1, 4>(batch_rows, count, scores + g * stride + j0, stride, acc + g * dim, dim);
  }
  std::memcpy(out_group, acc, sizeof(float) * size_t(group * dim));  // zeros for an empty group
}

// The AVX2 task: the intrinsics for head_dim % 8 == 0, the portable loops compiled for AVX2
// otherwise. Inlined into one function per target below (a target attribute is not a template
// parameter, so each register set / instruction set needs its own wrapper).
template <bool kWide, bool kBf16Dot, typename T>
LCKV_TARGET_AVX2 LCKV_ALWAYS_INLINE void attend_group_avx2_any(const float* q, const T* k, const T* v,
                                                              const int64_t* idx, const SparseAttentionProblem& p,
                                                              float* out, float* lse, GroupScratch& scratch) {
  if (p.head_dim % 8 == 0) {
    attend_group_avx2_dim8<kWide, kBf16Dot>(q, k, v, idx, p, out, lse, scratch);
  } else {
    attend_group_impl<F16cLoad>(q, k, v, idx, p, out, lse, scratch);
  }
}

template <typename T>
LCKV_TARGET_AVX2 void attend_group_avx2(const float* q, const T* k, const T* v, const int64_t* idx,
                                        const SparseAttentionProblem& p, float* out, float* lse,
                                        GroupScratch& scratch) {
  attend_group_avx2_any<false, false>(q, k, v, idx, p, out, lse, scratch);
}

// With 32 vector registers (CPUs with AVX-512VL): wider register blocks.
template <typename T>
LCKV_TARGET_AVX512 void attend_group_avx2_wide(const float* q, const T* k, const T* v, const int64_t* idx,
                                                  const SparseAttentionProblem& p, float* out, float* lse,
                                                  GroupScratch& scratch) {
  attend_group_avx2_any<true, false>(q, k, v, idx, p, out, lse, scratch);
}

// The wide task plus the bf16 dot path (CPUs with AVX512_BF16; instantiated for bf16 K/V).
template <typename T>
LCKV_TARGET_AVX512_BF16 void attend_group_avx2_bf16(const float* q, const T* k, const T* v, const int64_t* idx,
                                                  const SparseAttentionProblem& p, float* out, float* lse,
                                                  GroupScratch& scratch) {
  attend_group_avx2_any<true, true>(q, k, v, idx, p, out, lse, scratch);
}
#endif

}  // namespace detail

// The sparse attention kernel for one K/V element type; the SIMD variant is picked once here.
template <typename T>
class SparseAttention {
 public:
  // allow_simd = false forces the portable loops; allow_wide = false keeps the AVX2 path to 16
  // vector registers even where AVX-512VL offers 32 (both for tests and comparisons).
  // allow_bf16_dot = false keeps bf16 K rows on the fp32 FMA code where AVX512_BF16 exists.
  explicit SparseAttention(bool allow_simd = true, bool allow_wide = true, bool allow_bf16_dot = true) {
    attend_ = &detail::attend_group_portable<T>;
    simd_name_ = "portable";
#ifdef LCKV_X86_DISPATCH
    const CpuFeatures& cpu = cpu_features();
    if (allow_simd && cpu.level != SimdLevel::kScalar) {
      attend_ = &detail::attend_group_avx2<T>;
      simd_name_ = "avx2+fma+f16c";
      if (allow_wide && cpu.level == SimdLevel::kAvx512) {
        attend_ = &detail::attend_group_avx2_wide<T>;
        simd_name_ = "avx2+fma+f16c (32 registers, avx512vl)";
        if constexpr (std::is_same_v<T, bfloat16_bits>) {
          if (allow_bf16_dot && cpu.avx512_bf16) {
            attend_ = &detail::attend_group_avx2_bf16<T>;
            simd_name_ = "avx2+fma+f16c (32 registers, avx512vl) + avx512bf16 dot";
          }
        }
      }
    }
#else
    (void)allow_simd;
    (void)allow_wide;
    (void)allow_bf16_dot;
#endif
  }

  // Name of the selected code path ("avx2+fma+f16c" or "portable").
  const char* simd_name() const { return simd_name_; }

  // q: [B, Hq, D] fp32 contiguous, unscaled. k, v: strided per `p`. indices: [B, Hkv, n]
  // contiguous, each in [-1, seq) (the caller checks). out: [B, Hq, D] fp32, lse: [B, Hq] fp32.
  void run(const float* q, const T* k, const T* v, const int64_t* indices,
           const SparseAttentionProblem& p, float* out, float* lse) const {
    const int64_t group = p.q_heads / p.kv_heads;
    const int64_t tasks = p.batch * p.kv_heads;
#pragma omp parallel if (tasks > 1)
    {
      detail::GroupScratch scratch;
      std::vector<float> q_scaled(size_t(group * p.head_dim));
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t / p.kv_heads, h = t % p.kv_heads;
        const int64_t q_offset = (b * p.q_heads + h * group) * p.head_dim;
        attend_scaled(q + q_offset, k + b * p.k_stride_b + h * p.k_stride_h, v + b * p.v_stride_b + h * p.v_stride_h,
                      indices + t * p.n_selected, p, out + q_offset, lse + b * p.q_heads + h * group, q_scaled.data(),
                      scratch);
      }
    }
  }

  // One kv head: the `group` query heads q [group, head_dim] (fp32, unscaled) attend to the rows
  // rows[0..n) (-1 = none) of K/V, row j at k + rows[j] * k_row_stride (head_dim contiguous).
  // Writes out [group, head_dim] fp32 and lse [group] fp32 (out = 0, lse = -inf when no row is
  // selected). Single-threaded, safe to call from many threads at once.
  void attend_kv_head(const float* q, int64_t group, int64_t head_dim, const T* k, int64_t k_row_stride,
                      const T* v, int64_t v_row_stride, const int64_t* rows, int64_t n, float scale, float* out,
                      float* lse) const {
    SparseAttentionProblem p;
    p.batch = 1;
    p.q_heads = group;
    p.kv_heads = 1;
    p.head_dim = head_dim;
    p.n_selected = n;
    p.k_stride_s = k_row_stride;
    p.v_stride_s = v_row_stride;
    p.scale = scale;
    thread_local detail::GroupScratch scratch;
    thread_local std::vector<float> q_scaled;
    q_scaled.resize(size_t(group * head_dim));
    attend_scaled(q, k, v, rows, p, out, lse, q_scaled.data(), scratch);
  }

 private:
  // Scales the group's queries into q_scaled, then runs the selected task function.
  void attend_scaled(const float* q, const T* k_head, const T* v_head, const int64_t* rows,
                     const SparseAttentionProblem& p, float* out, float* lse, float* q_scaled,
                     detail::GroupScratch& scratch) const {
    const int64_t count = p.q_heads / p.kv_heads * p.head_dim;
    for (int64_t i = 0; i < count; ++i) q_scaled[i] = q[i] * p.scale;
    scratch.query = q;
    attend_(q_scaled, k_head, v_head, rows, p, out, lse, scratch);
  }

  detail::AttendGroupFn<T> attend_;  // per-(batch, kv head) worker for the chosen SIMD path
  const char* simd_name_;            // human-readable name of that path
};

// Memory-only probe for benchmarks: reads every K and V row that SparseAttention::run reads, in the
// same order and with the same batched prefetch, but does no arithmetic beyond summing the words
// into a checksum (returned so the reads cannot be optimised away). Its time is what gathering
// these random rows costs on the machine, the floor the kernel can approach. OpenMP over
// (batch, kv head) like run().
template <typename T>
uint64_t read_selected_rows(const T* k, const T* v, const int64_t* indices, const SparseAttentionProblem& p) {
  const int64_t tasks = p.batch * p.kv_heads, n = p.n_selected, dim = p.head_dim;
  const int64_t row_bytes = dim * int64_t(sizeof(T));
  uint64_t checksum = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : checksum) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / p.kv_heads, h = t % p.kv_heads;
    const int64_t* idx = indices + t * n;
    const T* heads[2] = {k + b * p.k_stride_b + h * p.k_stride_h, v + b * p.v_stride_b + h * p.v_stride_h};
    const int64_t strides[2] = {p.k_stride_s, p.v_stride_s};
    for (int which = 0; which < 2; ++which) {
      const T* head = heads[which];
      const int64_t stride = strides[which];
      detail::prefetch_rows(head, stride, idx, 0, detail::kPrefetchBatch, n, dim);
      for (int64_t j = 0; j < n; ++j) {
        if (j % detail::kPrefetchBatch == 0) {
          detail::prefetch_rows(head, stride, idx, j + detail::kPrefetchBatch, j + 2 * detail::kPrefetchBatch, n, dim);
        }
        if (idx[j] < 0) continue;
        const unsigned char* row = reinterpret_cast<const unsigned char*>(head + idx[j] * stride);
        int64_t i = 0;
        for (; i + 8 <= row_bytes; i += 8) {
          uint64_t word;
          std::memcpy(&word, row + i, sizeof word);
          checksum += word;
        }
        for (; i < row_bytes; ++i) checksum += row[i];
      }
    }
  }
  return checksum;
}

// Sparse attention of one kv head's query group over gathered rows, on the SIMD path chosen once
// per process: see SparseAttention<T>::attend_kv_head. T is float, half_bits or bfloat16_bits.
template <typename T>
void sparse_attention_kv_head(const float* q, int64_t group, int64_t head_dim, const T* k, int64_t k_row_stride,
                              const T* v, int64_t v_row_stride, const int64_t* rows, int64_t n, float scale,
                              float* out, float* lse) {
  static const SparseAttention<T> kernel;
  kernel.attend_kv_head(q, group, head_dim, k, k_row_stride, v, v_row_stride, rows, n, scale, out, lse);
}

}  // namespace lckv
