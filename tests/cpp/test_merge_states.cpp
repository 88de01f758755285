// Merging partial softmax states over a random split of the keys equals softmax over all keys.
#include <lckv/merge_states.h>

#include <limits>
#include <random>
#include <vector>

#include "check.h"

namespace {

// Exact attention of one query over keys [begin, end): returns lse and writes out.
float attend(const std::vector<float>& scores, const std::vector<float>& values, int begin, int end,
             int dim, std::vector<float>& out) {
  out.assign(dim, 0.0f);
  if (begin == end) return -std::numeric_limits<float>::infinity();
  float m = scores[begin];
  for (int j = begin; j < end; ++j) m = std::max(m, scores[j]);
  double denom = 0.0;
  std::vector<double> acc(dim, 0.0);
  for (int j = begin; j < end; ++j) {
    const double w = std::exp(scores[j] - m);
    denom += w;
    for (int d = 0; d < dim; ++d) acc[d] += w * values[j * dim + d];
  }
  for (int d = 0; d < dim; ++d) out[d] = static_cast<float>(acc[d] / denom);
  return m + static_cast<float>(std::log(denom));
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 300);
    const int dim = 1 + static_cast<int>(rng() % 130);
    const int split = static_cast<int>(rng() % (n + 1));  // either side may be empty
    std::vector<float> scores(n), values(n * dim);
    for (auto& s : scores) s = normal(rng);
    for (auto& v : values) v = normal(rng);
    std::vector<float> full, a, b, merged(dim);
    const float lse_full = attend(scores, values, 0, n, dim, full);
    const float lse_a = attend(scores, values, 0, split, dim, a);
    const float lse_b = attend(scores, values, split, n, dim, b);
    float lse = 0.0f;
    lckv::merge_states(a.data(), &lse_a, b.data(), &lse_b, merged.data(), &lse, 1, dim);
    EXPECT(lckv_test::close(lse, lse_full, 1e-5, 1e-5));
    for (int d = 0; d < dim; ++d) EXPECT(lckv_test::close(merged[d], full[d], 1e-5, 1e-4));
  }
  // Two empty parts: zero output, -inf lse.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> x(4, 1.0f), y(4, 2.0f), o(4, 7.0f);
  float lse = 0.0f;
  lckv::merge_states(x.data(), &neg_inf, y.data(), &neg_inf, o.data(), &lse, 1, 4);
  EXPECT(lse == neg_inf);
  for (float v : o) EXPECT(v == 0.0f);
  return lckv_test::finish("test_merge_states");
}
