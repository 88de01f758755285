// Ranking of retrieval candidates by a GQA group's summed attention probability (the retrieval
// policy's group_rank="probability"; lckv/policies/selection.py has the torch formulation).
// Per (batch, kv head): the candidate rows (-1 = none, repeats allowed) are made distinct; for
// each query head g of the group, s_gj = scale * q_g . k_j and
//   lse_g = log(sum_j exp(s_gj) + exp(rest_lse_g))     (rest_lse: the mass outside the candidates;
//                                                       absent: the candidates only)
//   score_j = sum_g exp(s_gj - lse_g)
// and the n_out rows of highest score are written best first (ties: lower row first), -1 where
// fewer distinct rows, or rows of zero score, exist. Keys are float32 or 16-bit floats (Key =
// half_bits / bfloat16_bits): a 16-bit row is converted exactly to float before the inner product,
// so a 16-bit store ranks as a float32 store holding the same rounded rows. Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "lckv/dtypes.h"
#include "lckv/simd_ip.h"

namespace lckv {

struct GroupRankProblem {
  int64_t batch = 0, kv_heads = 0, group = 0, head_dim = 0;
  int64_t n_candidates = 0;  // candidates per (batch, kv head)
  int64_t n_out = 0;         // rows written per (batch, kv head)
  const float* q = nullptr;  // [batch, kv_heads * group, head_dim] contiguous
  const void* keys = nullptr;   // Key rows: row r of (b, h) at keys + b*ks0 + h*ks1 + r*ks2 elements (head_dim contiguous)
  int64_t ks0 = 0, ks1 = 0, ks2 = 0;
  const int64_t* candidates = nullptr;  // [batch, kv_heads, n_candidates], each in [-1, rows)
  const float* rest_lse = nullptr;      // [batch, kv_heads * group] or nullptr
  float scale = 1.0f;
  int64_t* out = nullptr;               // [batch, kv_heads, n_out]
};

// Row `k` of D elements as float: float rows in place, 16-bit rows converted into `buffer`.
inline const float* row_as_float(const float* k, float*, int64_t) { return k; }
template <typename Key>
const float* row_as_float(const Key* k, float* buffer, int64_t D) {
  for (int64_t d = 0; d < D; ++d) buffer[d] = to_float(k[d]);
  return buffer;
}

template <typename Key>
void rank_by_group_probability(const GroupRankProblem& p) {
  const InnerProductFn ip = inner_product_for(simd_level_for(static_cast<std::size_t>(p.head_dim)));
  const int64_t pairs = p.batch * p.kv_heads, G = p.group, D = p.head_dim;
#pragma omp parallel for schedule(dynamic, 1) if (pairs > 1)
  for (int64_t bh = 0; bh < pairs; ++bh) {
    const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
    const int64_t* cand = p.candidates + bh * p.n_candidates;
    std::vector<int64_t> rows(cand, cand + p.n_candidates);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    rows.erase(rows.begin(), std::lower_bound(rows.begin(), rows.end(), int64_t{0}));  // drop -1
    const int64_t u = static_cast<int64_t>(rows.size());
    const Key* keys = static_cast<const Key*>(p.keys) + b * p.ks0 + h * p.ks1;
    std::vector<float> logits(static_cast<std::size_t>(G * u));
    std::vector<float> row(static_cast<std::size_t>(D));  // a 16-bit row as float
    for (int64_t j = 0; j < u; ++j) {
      const float* k = row_as_float(keys + rows[j] * p.ks2, row.data(), D);
      for (int64_t g = 0; g < G; ++g)
        logits[g * u + j] = p.scale * ip(p.q + ((b * p.kv_heads + h) * G + g) * D, k, static_cast<std::size_t>(D));
    }
    std::vector<std::pair<float, int64_t>> scored(static_cast<std::size_t>(u));
    for (int64_t j = 0; j < u; ++j) scored[j] = {0.0f, rows[j]};
    for (int64_t g = 0; g < G; ++g) {
      const float* s = logits.data() + g * u;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < u; ++j) m = std::max(m, s[j]);
      const float rest = p.rest_lse != nullptr ? p.rest_lse[(b * p.kv_heads + h) * G + g]
                                               : -std::numeric_limits<float>::infinity();
      const float top = std::max(m, rest);
      if (!std::isfinite(top)) continue;  // nothing to attend for this head: it adds nothing
      double total = std::isfinite(rest) ? std::exp(static_cast<double>(rest - top)) : 0.0;
      for (int64_t j = 0; j < u; ++j) total += std::exp(static_cast<double>(s[j] - top));
      const float lse = top + static_cast<float>(std::log(total));
      for (int64_t j = 0; j < u; ++j) scored[j].first += std::exp(s[j] - lse);
    }
    const int64_t take = std::min(p.n_out, u);
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& c) {
      return a.first > c.first || (a.first == c.first && a.second < c.second);
    };
    if (take < u) std::nth_element(scored.begin(), scored.begin() + take, scored.end(), better);
    std::sort(scored.begin(), scored.begin() + take, better);
    int64_t* out = p.out + bh * p.n_out;
    for (int64_t j = 0; j < p.n_out; ++j)
      out[j] = j < take && scored[j].first > 0.0f ? scored[j].second : -1;
  }
}

}  // namespace lckv
