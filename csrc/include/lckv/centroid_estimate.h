// Estimate of the attention over the keys a selection did NOT retrieve, from per-cluster state
// (RetroInfer-style; lckv/policies/retrieval.py documents the policy side). Per (batch, kv head)
// and query head of its group:
//   s_c  = scale * q . centroid_c                      (clusters with count_c > 0)
//   den  = sum_c e^{s_c - m} count_c - sum_{retrieved rows j} e^{s_{c(j)} - m}
//   num  = sum_c e^{s_c - m} vsum_c  - sum_{retrieved rows j} e^{s_{c(j)} - m} v_j
//   out  = num / den,  lse = log(den) + m,  m = max_c s_c
// i.e. every non-retrieved key sits at its cluster's centroid and carries the mean value of its
// cluster's non-retrieved keys. A rest below 1e-6 of the clusters' total weight (everything
// retrieved, up to rounding) gives out = 0, lse = -inf. Sums in double. Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "lckv/simd_ip.h"

namespace lckv {

struct EstimateProblem {
  int64_t batch = 0, kv_heads = 0, group = 0, head_dim = 0, clusters = 0, n_selected = 0;
  const float* q = nullptr;           // [batch, kv_heads * group, head_dim] contiguous
  const float* centroids = nullptr;   // [batch, kv_heads, clusters, head_dim] contiguous
  const float* counts = nullptr;      // [batch, kv_heads, clusters] contiguous
  const float* value_sums = nullptr;  // [batch, kv_heads, clusters, head_dim] contiguous
  const int64_t* assign = nullptr;    // cluster of row r of (b, h): assign[b*as0 + h*as1 + r]
  int64_t as0 = 0, as1 = 0;
  const float* values = nullptr;      // value row r of (b, h): values + b*vs0 + h*vs1 + r*vs2
  int64_t vs0 = 0, vs1 = 0, vs2 = 0;
  const int64_t* indices = nullptr;   // [batch, kv_heads, n_selected] retrieved rows, -1 = none
  float scale = 1.0f;
  float* out = nullptr;               // [batch, kv_heads * group, head_dim]
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

inline void centroid_estimate(const EstimateProblem& p) {
  const InnerProductFn ip = inner_product_for(simd_level_for(static_cast<std::size_t>(p.head_dim)));
  const int64_t D = p.head_dim, C = p.clusters, G = p.group;
  const int64_t pairs = p.batch * p.kv_heads;
#pragma omp parallel for schedule(dynamic, 1) if (pairs > 1)
  for (int64_t bh = 0; bh < pairs; ++bh) {
    const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
    const float* cent = p.centroids + bh * C * D;
    const float* counts = p.counts + bh * C;
    const float* vsums = p.value_sums + bh * C * D;
    const int64_t* assign = p.assign + b * p.as0 + h * p.as1;
    const float* values = p.values + b * p.vs0 + h * p.vs1;
    const int64_t* rows = p.indices + bh * p.n_selected;
    std::vector<float> w(static_cast<std::size_t>(C));
    std::vector<double> num(static_cast<std::size_t>(D));
    for (int64_t g = 0; g < G; ++g) {
      const int64_t qh = h * G + g;
      const float* q = p.q + (b * p.kv_heads * G + qh) * D;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < C; ++c) {
        w[c] = counts[c] > 0.0f ? p.scale * ip(q, cent + c * D, static_cast<std::size_t>(D))
                                : -std::numeric_limits<float>::infinity();
        m = std::max(m, w[c]);
      }
      if (!std::isfinite(m)) m = 0.0f;
      double total = 0.0;
      std::fill(num.begin(), num.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {
        w[c] = std::exp(w[c] - m);  // 0 for empty clusters
        if (w[c] == 0.0f) continue;
        total += static_cast<double>(w[c]) * counts[c];
        const float* vs = vsums + c * D;
        for (int64_t d = 0; d < D; ++d) num[d] += static_cast<double>(w[c]) * vs[d];
      }
      double den = total;
      for (int64_t j = 0; j < p.n_selected; ++j) {
        const int64_t r = rows[j];
        if (r < 0) continue;
        const double wr = w[assign[r]];
        den -= wr;
        const float* v = values + r * p.vs2;
        for (int64_t d = 0; d < D; ++d) num[d] -= wr * v[d];
      }
      float* out = p.out + (b * p.kv_heads * G + qh) * D;
      float& lse = p.lse[b * p.kv_heads * G + qh];
      if (den > 1e-6 * total && den > 0.0) {
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(num[d] / den);
        lse = static_cast<float>(std::log(den)) + m;
      } else {
        std::fill(out, out + D, 0.0f);
        lse = -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace lckv
