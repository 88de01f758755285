// Merge of two partial attention states computed over disjoint key sets.
//
// A partial state over a key set S is (o, lse) with lse = log sum_{j in S} exp(s_j) and
// o = sum_{j in S} softmax_S(s)_j v_j. Two disjoint parts merge exactly:
//   m = max(lse_a, lse_b), w_a = exp(lse_a - m), w_b = exp(lse_b - m)
//   o = (w_a o_a + w_b o_b) / (w_a + w_b),   lse = m + log(w_a + w_b)
// An empty part has lse = -inf and contributes nothing; two empty parts give o = 0, lse = -inf.
// Torch-free: raw pointers, row-major, fp32 accumulation.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace lckv {

// Merges one row of head_dim values. Inputs may alias outputs (in-place merge into a).
inline void merge_state_row(const float* out_a, float lse_a, const float* out_b, float lse_b,
                            float* out, float* lse, int64_t head_dim) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (lse_a == neg_inf && lse_b == neg_inf) {
    for (int64_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
    *lse = neg_inf;
    return;
  }
  const float m = lse_a > lse_b ? lse_a : lse_b;
  const float w_a = std::exp(lse_a - m);  // exp(-inf) == 0 for an empty part
  const float w_b = std::exp(lse_b - m);
  const float inv = 1.0f / (w_a + w_b);
  const float c_a = w_a * inv;
  const float c_b = w_b * inv;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = c_a * out_a[d] + c_b * out_b[d];
  *lse = m + std::log(w_a + w_b);
}

// Merges `rows` independent rows; row r of out is at out + r * head_dim.
inline void merge_states(const float* out_a, const float* lse_a, const float* out_b,
                         const float* lse_b, float* out, float* lse, int64_t rows,
                         int64_t head_dim) {
#pragma omp parallel for schedule(static) if (rows * head_dim > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    merge_state_row(out_a + r * head_dim, lse_a[r], out_b + r * head_dim, lse_b[r],
                    out + r * head_dim, lse + r, head_dim);
  }
}

}  // namespace lckv
