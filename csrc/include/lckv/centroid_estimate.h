// Estimate of the attention over the keys a selection did NOT retrieve, from per-cluster state
// (RetroInfer-style; lckv/policies/retrieval.py documents the policy side). Per (batch, kv head)
// and query head of its group:
//   s_c  = scale * q . centroid_c                      (clusters with count_c > 0)
//   den  = sum_c e^{s_c - m} count_c - sum_{retrieved rows j} e^{s_{c(j)} - m}
//   num  = sum_c e^{s_c - m} vsum_c  - sum_{retrieved rows j} e^{s_{c(j)} - m} v_j
//   out  = num / den,  lse = log(den) + m,  m = max_c s_c
// i.e. every non-retrieved key sits at its cluster's centroid and carries the mean value of its
// cluster's non-retrieved keys. A rest below 1e-6 of the clusters' total weight (everything
// retrieved, up to rounding) gives out = 0, lse = -inf. Centroid scores by the contiguous-rows
// inner product, weights by the branch-free polynomial exp (vectorised loops), sums in double.
// Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "lckv/per_thread.h"
#include "lckv/simd_ip.h"
#include "lckv/dtypes.h"       // to_float
#include "lckv/exp_weights.h"  // ClusterWeightsFn

namespace lckv {

struct EstimateProblem {
  int64_t batch = 0, kv_heads = 0, group = 0, head_dim = 0, clusters = 0, n_selected = 0;
  const float* q = nullptr;           // [batch, kv_heads * group, head_dim] contiguous
  const float* centroids = nullptr;   // [batch, kv_heads, clusters, head_dim] contiguous
  const float* counts = nullptr;      // [batch, kv_heads, clusters] contiguous
  const float* value_sums = nullptr;  // [batch, kv_heads, clusters, head_dim] contiguous
  const int64_t* assign = nullptr;    // cluster of row r of (b, h): assign[b*as0 + h*as1 + r]
  int64_t as0 = 0, as1 = 0;
  const void* values = nullptr;       // value row r of (b, h): values + b*vs0 + h*vs1 + r*vs2 elements of
                                      // centroid_estimate's V (float, half_bits or bfloat16_bits)
  int64_t vs0 = 0, vs1 = 0, vs2 = 0;
  const int64_t* indices = nullptr;   // [batch, kv_heads, n_selected] retrieved rows, -1 = none
                                      // (a row listed twice counts once)
  int64_t rows = 0;                   // rows per (batch, kv head), the bound of `indices`: when > 0,
                                      // repeats are dropped with a bitmap of the rows (O(n_selected));
                                      // 0: by sorting the retrieved rows
  float scale = 1.0f;
  float* out = nullptr;               // [batch, kv_heads * group, head_dim]; nullptr: lse only (no
                                      // value sums or value rows are read)
  float* lse = nullptr;               // [batch, kv_heads * group]
};

// The first retrieved row (as b * kv_heads * n_selected + h * n_selected + j) whose cluster id is
// outside [0, clusters), or -1 when all are valid. Only the rows a step retrieved are read, so the
// check costs O(batch * kv_heads * n_selected), not O(rows): run it before centroid_estimate.
inline int64_t first_bad_assignment(const EstimateProblem& p) {
  for (int64_t bh = 0; bh < p.batch * p.kv_heads; ++bh) {
    const int64_t* assign = p.assign + (bh / p.kv_heads) * p.as0 + (bh % p.kv_heads) * p.as1;
    for (int64_t j = 0; j < p.n_selected; ++j) {
      const int64_t r = p.indices[bh * p.n_selected + j];
      if (r >= 0 && (assign[r] < 0 || assign[r] >= p.clusters)) return bh * p.n_selected + j;
    }
  }
  return -1;
}

// out[d] = sum_c w[c] * vsums[c * D + d] in double. Blocks of 8 values keep two sets of 8
// accumulators (even and odd clusters) in registers, so no sum goes through memory per cluster
// (which made this loop a store-to-load chain and ~40% of a hot estimate).
inline void weighted_value_sums(const float* w, const float* vsums, int64_t C, int64_t D, double* out) {
  int64_t d0 = 0;
  for (; d0 + 8 <= D; d0 += 8) {
    double even[8] = {}, odd[8] = {};
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      const double w0 = w[c], w1 = w[c + 1];
      const float* v0 = vsums + c * D + d0;
      const float* v1 = v0 + D;
#pragma omp simd
      for (int64_t d = 0; d < 8; ++d) {
        even[d] += w0 * v0[d];
        odd[d] += w1 * v1[d];
      }
    }
    if (c < C) {
      const double w0 = w[c];
      const float* v0 = vsums + c * D + d0;
      for (int64_t d = 0; d < 8; ++d) even[d] += w0 * v0[d];
    }
    for (int64_t d = 0; d < 8; ++d) out[d0 + d] = even[d] + odd[d];
  }
  for (; d0 < D; ++d0) {  // a head_dim that is not a multiple of 8: the last values one by one
    double sum = 0.0;
    for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(w[c]) * vsums[c * D + d0];
    out[d0] = sum;
  }
}

// Per-thread scratch of estimate_pair (reused across calls, so a decode step allocates nothing).
struct EstimateScratch {
  std::vector<float> w, maxes;
  std::vector<double> num, den, totals;
  std::vector<int64_t> distinct;
  std::vector<uint64_t> seen;  // bitmap of the rows (p.rows > 0), all zero between calls
};

// The estimate of one (batch, kv head) pair `bh` for its query group q [group, head_dim] (unscaled),
// the retrieved rows rows[0..n) (-1 = none; a row listed twice counts once) and value rows read
// from `values` (row r at values + r * value_stride, element type V: float, half_bits or bfloat16_bits).
// Writes out [group, head_dim] (skipped when out is nullptr: lse only) and lse [group]. Returns
// the first retrieved row whose cluster id is outside [0, clusters) (that row is skipped), or -1.
// rows_distinct: the caller knows no row repeats (a search's results), so the set pass is skipped.
// Single-threaded; p's q, values, indices, out and lse are not used.
template <typename V>
int64_t estimate_pair(const EstimateProblem& p, int64_t bh, const float* q, const V* values, int64_t value_stride,
                      const int64_t* rows, int64_t n, float* out, float* lse, ClusterWeightsFn weights,
                      InnerProductRowsFn ip_rows, bool rows_distinct = false) {
  const int64_t D = p.head_dim, C = p.clusters, G = p.group;
  const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const float* cent = p.centroids + bh * C * D;
  const float* counts = p.counts + bh * C;
  const float* vsums = p.value_sums + bh * C * D;
  const int64_t* assign = p.assign + b * p.as0 + h * p.as1;
  EstimateScratch& s = per_thread<EstimateScratch, EstimateScratch>();
  // every query head's cluster weights first, so the retrieved rows (random reads of assign and
  // values) are visited once for the whole group
  s.w.resize(static_cast<std::size_t>(G * C));
  s.num.assign(static_cast<std::size_t>(G * D), 0.0);
  s.den.resize(static_cast<std::size_t>(G));
  s.maxes.resize(static_cast<std::size_t>(G));
  float* w = s.w.data();
  for (int64_t g = 0; g < G; ++g) {
    float* wc = w + g * C;
    ip_rows(q + g * D, cent, static_cast<std::size_t>(C), static_cast<std::size_t>(D), wc);
    s.den[g] = weights(wc, counts, C, p.scale, &s.maxes[g]);
    if (out != nullptr) weighted_value_sums(wc, vsums, C, D, s.num.data() + g * D);
  }
  s.totals = s.den;
  // the retrieved rows as a set: a row listed twice (e.g. the union of several heads' searches)
  // is retrieved once
  auto& distinct = s.distinct;
  distinct.clear();
  distinct.reserve(static_cast<std::size_t>(n));
  if (rows_distinct) {
    for (int64_t j = 0; j < n; ++j)
      if (rows[j] >= 0) distinct.push_back(rows[j]);
  } else if (p.rows > 0) {  // first occurrences, marked in the bitmap, which is cleared after
    if (s.seen.size() < static_cast<std::size_t>(p.rows / 64 + 1)) s.seen.assign(static_cast<std::size_t>(p.rows / 64 + 1), 0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = rows[j];
      if (r < 0) continue;
      uint64_t& word = s.seen[static_cast<std::size_t>(r >> 6)];
      const uint64_t bit = uint64_t{1} << (r & 63);
      if (word & bit) continue;
      word |= bit;
      distinct.push_back(r);
    }
    for (int64_t r : distinct) s.seen[static_cast<std::size_t>(r >> 6)] = 0;
  } else {
    for (int64_t j = 0; j < n; ++j)
      if (rows[j] >= 0) distinct.push_back(rows[j]);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  }
  int64_t bad = -1;
  const int64_t* set = distinct.data();
  const int64_t n_set = static_cast<int64_t>(distinct.size());
  double* num = s.num.data();
  for (int64_t j = 0; j < n_set; ++j) {
    if (j + 8 < n_set) {  // the random reads of a later row, early
      __builtin_prefetch(assign + set[j + 8]);
      if (out != nullptr) __builtin_prefetch(values + set[j + 8] * value_stride);
    }
    const int64_t r = set[j];
    const int64_t c = assign[r];
    if (c < 0 || c >= C) {
      if (bad < 0) bad = r;
      continue;
    }
    for (int64_t g = 0; g < G; ++g) s.den[g] -= w[g * C + c];
    if (out == nullptr) continue;
    const V* v = values + r * value_stride;
    for (int64_t g = 0; g < G; ++g) {
      const double wr = w[g * C + c];
      double* nd = num + g * D;
      for (int64_t d = 0; d < D; ++d) nd[d] -= wr * static_cast<double>(to_float(v[d]));
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const double den = s.den[g];
    const bool rest = den > 1e-6 * s.totals[g] && den > 0.0;
    lse[g] = rest ? static_cast<float>(std::log(den)) + s.maxes[g] : neg_inf;
    if (out == nullptr) continue;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = rest ? static_cast<float>(num[g * D + d] / den) : 0.0f;
  }
  return bad;
}

// V: the element type of p.values (a 16-bit row is converted exactly to float, so a 16-bit store
// estimates as a float32 store holding the same rounded rows).
template <typename V = float>
void centroid_estimate(const EstimateProblem& p, bool allow_simd = true) {
  const InnerProductRowsFn ip_rows = inner_product_rows_for(simd_level_for(static_cast<std::size_t>(p.head_dim)));
  const ClusterWeightsFn weights = cluster_weights_for_cpu(allow_simd);
  const int64_t D = p.head_dim, G = p.group;
  const int64_t pairs = p.batch * p.kv_heads;
#pragma omp parallel for schedule(dynamic, 1) if (pairs > 1)
  for (int64_t bh = 0; bh < pairs; ++bh) {
    const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
    const int64_t row = b * p.kv_heads * G + h * G;  // the group's first query head
    estimate_pair(p, bh, p.q + row * D, static_cast<const V*>(p.values) + b * p.vs0 + h * p.vs1, p.vs2, p.indices + bh * p.n_selected,
                  p.n_selected, p.out == nullptr ? nullptr : p.out + row * D, p.lse + row, weights, ip_rows);
  }
}

// New rows joining the estimate's clusters (a decode step offloads the token leaving the window):
// per (batch, kv head), each row goes to its nearest centroid in L2, argmax_c (k . c - |c|^2 / 2)
// (ties: the lower c), and a valid row adds 1 to that cluster's count and its value to the value
// sum. Writes each row's cluster to assign.
struct EstimateAddProblem {
  int64_t batch = 0, kv_heads = 0, head_dim = 0, clusters = 0, n = 0;
  const float* keys = nullptr;        // [batch, kv_heads, n, head_dim] contiguous
  const float* values = nullptr;      // [batch, kv_heads, n, head_dim] contiguous
  const bool* valid = nullptr;        // [batch, n]; nullptr: every row is valid
  const float* centroids = nullptr;   // [batch, kv_heads, clusters, head_dim] contiguous
  const float* half_norms = nullptr;  // [batch, kv_heads, clusters] contiguous: |c|^2 / 2
  float* counts = nullptr;            // [batch, kv_heads, clusters], updated
  float* value_sums = nullptr;        // [batch, kv_heads, clusters, head_dim], updated
  int64_t* assign = nullptr;          // [batch, kv_heads, n] out
};

inline void estimate_add_rows(const EstimateAddProblem& p) {
  const InnerProductRowsFn ip_rows = inner_product_rows_for(simd_level_for(static_cast<std::size_t>(p.head_dim)));
  const int64_t D = p.head_dim, C = p.clusters, pairs = p.batch * p.kv_heads;
#pragma omp parallel for schedule(dynamic, 1) if (pairs > 1 && p.n * C >= (1 << 13))
  for (int64_t bh = 0; bh < pairs; ++bh) {
    const int64_t b = bh / p.kv_heads;
    const float* cent = p.centroids + bh * C * D;
    const float* half = p.half_norms + bh * C;
    std::vector<float> s(static_cast<std::size_t>(C));
    for (int64_t r = 0; r < p.n; ++r) {
      const float* k = p.keys + (bh * p.n + r) * D;
      ip_rows(k, cent, static_cast<std::size_t>(C), static_cast<std::size_t>(D), s.data());
      const int64_t best = nearest_from_scores(s.data(), half, C);
      p.assign[bh * p.n + r] = best;
      if (p.valid != nullptr && !p.valid[b * p.n + r]) continue;
      p.counts[bh * C + best] += 1.0f;
      const float* v = p.values + (bh * p.n + r) * D;
      float* vs = p.value_sums + (bh * C + best) * D;
      for (int64_t d = 0; d < D; ++d) vs[d] += v[d];
    }
  }
}

}  // namespace lckv
