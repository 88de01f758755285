// centroid_estimate (SIMD and portable paths) against its definition evaluated directly in double:
// every non-retrieved key sits at its cluster's centroid and carries the mean value of its
// cluster's non-retrieved keys. Cluster counts that are not multiples of 8, empty clusters and
// -1 slots included; and the check of the retrieved rows' cluster ids.
#include <lckv/centroid_estimate.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"

namespace {

struct Case {
  int64_t batch, kv_heads, group, dim, clusters, rows, selected;
  std::vector<float> q, centroids, counts, value_sums, values;
  std::vector<int64_t> assign, indices;
};

Case make_case(std::mt19937& rng) {
  Case c;
  c.batch = 1 + rng() % 2;
  c.kv_heads = 1 + rng() % 3;
  c.group = 1 + rng() % 3;
  c.dim = 1 + rng() % 20;
  c.clusters = 1 + rng() % 70;
  c.rows = c.clusters + rng() % 300;
  c.selected = rng() % (c.rows + 1);
  std::normal_distribution<float> normal;
  auto fill = [&](std::vector<float>& x, std::size_t n) {
    x.resize(n);
    for (auto& v : x) v = normal(rng);
  };
  const int64_t pairs = c.batch * c.kv_heads;
  fill(c.q, pairs * c.group * c.dim);
  fill(c.centroids, pairs * c.clusters * c.dim);
  fill(c.values, pairs * c.rows * c.dim);
  c.assign.resize(pairs * c.rows);
  c.counts.assign(pairs * c.clusters, 0.0f);
  c.value_sums.assign(pairs * c.clusters * c.dim, 0.0f);
  for (int64_t bh = 0; bh < pairs; ++bh) {
    const int64_t used = 1 + rng() % c.clusters;  // clusters >= used stay empty
    for (int64_t r = 0; r < c.rows; ++r) {
      const int64_t cl = rng() % used;
      c.assign[bh * c.rows + r] = cl;
      c.counts[bh * c.clusters + cl] += 1.0f;
      for (int64_t d = 0; d < c.dim; ++d)
        c.value_sums[(bh * c.clusters + cl) * c.dim + d] += c.values[(bh * c.rows + r) * c.dim + d];
    }
    std::vector<int64_t> perm(c.rows);
    for (int64_t r = 0; r < c.rows; ++r) perm[r] = r;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t j = 0; j < c.selected; ++j) c.indices.push_back(rng() % 7 == 0 ? -1 : perm[j]);
  }
  return c;
}

lckv::EstimateProblem problem(Case& c, std::vector<float>& out, std::vector<float>& lse, float scale) {
  out.assign(c.batch * c.kv_heads * c.group * c.dim, 0.0f);
  lse.assign(c.batch * c.kv_heads * c.group, 0.0f);
  lckv::EstimateProblem p;
  p.batch = c.batch;
  p.kv_heads = c.kv_heads;
  p.group = c.group;
  p.head_dim = c.dim;
  p.clusters = c.clusters;
  p.n_selected = c.selected;
  p.q = c.q.data();
  p.centroids = c.centroids.data();
  p.counts = c.counts.data();
  p.value_sums = c.value_sums.data();
  p.assign = c.assign.data();
  p.as0 = c.kv_heads * c.rows;
  p.as1 = c.rows;
  p.values = c.values.data();
  p.vs0 = c.kv_heads * c.rows * c.dim;
  p.vs1 = c.rows * c.dim;
  p.vs2 = c.dim;
  p.indices = c.indices.data();
  p.scale = scale;
  p.out = out.data();
  p.lse = lse.data();
  return p;
}

// The definition, row by row: each non-retrieved row contributes exp(scale * q . centroid of its
// cluster) with its own value (the cluster mean of the rest is what this sums to).
// `conditioning` gets (weight of every row) / (weight of the rows not retrieved): the kernel takes
// the rest as (all clusters) minus (the retrieved rows), so float32 weights lose about that factor
// of relative accuracy when most of the mass was retrieved.
void reference(const Case& c, float scale, std::vector<double>& out, std::vector<double>& lse,
               std::vector<double>& conditioning) {
  out.assign(c.batch * c.kv_heads * c.group * c.dim, 0.0);
  lse.assign(c.batch * c.kv_heads * c.group, -std::numeric_limits<double>::infinity());
  conditioning.assign(c.batch * c.kv_heads * c.group, 1.0);
  for (int64_t bh = 0; bh < c.batch * c.kv_heads; ++bh) {
    std::vector<bool> taken(c.rows, false);
    for (int64_t j = 0; j < c.selected; ++j)
      if (c.indices[bh * c.selected + j] >= 0) taken[c.indices[bh * c.selected + j]] = true;
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t row = bh * c.group + g;
      const float* q = c.q.data() + row * c.dim;
      double den = 0.0, all = 0.0;
      std::vector<double> num(c.dim, 0.0);
      for (int64_t r = 0; r < c.rows; ++r) {
        const float* cent = c.centroids.data() + (bh * c.clusters + c.assign[bh * c.rows + r]) * c.dim;
        double s = 0.0;
        for (int64_t d = 0; d < c.dim; ++d) s += static_cast<double>(q[d]) * cent[d];
        const double w = std::exp(scale * s);
        all += w;
        if (taken[r]) continue;
        den += w;
        for (int64_t d = 0; d < c.dim; ++d) num[d] += w * c.values[(bh * c.rows + r) * c.dim + d];
      }
      if (den == 0.0) continue;
      conditioning[row] = all / den;
      for (int64_t d = 0; d < c.dim; ++d) out[row * c.dim + d] = num[d] / den;
      lse[row] = std::log(den);
    }
  }
}

}  // namespace

int main() {
  const unsigned seed = std::random_device{}();
  std::printf("test_centroid_estimate: seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 300; ++trial) {
    Case c = make_case(rng);
    const float scale = 0.2f + 0.1f * static_cast<float>(rng() % 8);
    std::vector<double> want_out, want_lse, conditioning;
    reference(c, scale, want_out, want_lse, conditioning);
    for (bool simd : {true, false}) {
      std::vector<float> out, lse;
      lckv::EstimateProblem p = problem(c, out, lse, scale);
      EXPECT(lckv::first_bad_assignment(p) == -1);
      lckv::centroid_estimate(p, simd);
      std::vector<float> lse_only(lse.size(), 0.0f);  // out = nullptr: the same lse, no values read
      lckv::EstimateProblem q = p;
      q.out = nullptr;
      q.lse = lse_only.data();
      lckv::centroid_estimate(q, simd);
      for (std::size_t i = 0; i < lse.size(); ++i)
        EXPECT(lse_only[i] == lse[i] || (std::isnan(lse[i]) && std::isnan(lse_only[i])));
      {  // the retrieved rows are a set: listed twice (each head's list repeated), by the bitmap
         // (rows known) or by sorting (rows = 0), the result is the same as listed once
        Case twice = c;
        twice.indices.clear();
        twice.selected = 2 * c.selected;
        for (int64_t bh = 0; bh < c.batch * c.kv_heads; ++bh)
          for (int rep = 0; rep < 2; ++rep)
            for (int64_t j = 0; j < c.selected; ++j) twice.indices.push_back(c.indices[bh * c.selected + j]);
        for (int64_t rows : {int64_t{0}, c.rows}) {
          std::vector<float> out2, lse2;
          lckv::EstimateProblem r = problem(twice, out2, lse2, scale);
          r.rows = rows;
          lckv::centroid_estimate(r, simd);
          // another order of the double subtractions: rounding at 1e-15 times the cancellation
          for (std::size_t i = 0; i < lse.size(); ++i) {
            const double tol = 1e-7 + 1e-12 * conditioning[i];
            EXPECT(lckv_test::close(lse2[i], lse[i], tol, 1e-6));
            for (int64_t d = 0; d < c.dim; ++d)
              EXPECT(lckv_test::close(out2[i * c.dim + d], out[i * c.dim + d], tol, 1e-6));
          }
        }
      }
      for (std::size_t i = 0; i < lse.size(); ++i) {
        // everything retrieved: -inf and zero output; otherwise float32 accuracy of the weights
        // (~2.4e-7 relative, 4x margin) times the cancellation of (all minus retrieved)
        const double loss = 1e-6 * conditioning[i];
        EXPECT(lckv_test::close(lse[i], want_lse[i], 1e-4 + loss, 1e-4));
        for (int64_t d = 0; d < c.dim; ++d)
          EXPECT(lckv_test::close(out[i * c.dim + d], want_out[i * c.dim + d], 1e-4 + loss, 1e-3 + loss));
      }
    }
    if (c.selected > 0 && c.indices[0] >= 0) {  // a corrupt cluster id on a retrieved row is found
      std::vector<float> out, lse;
      const int64_t saved = c.assign[c.indices[0]];
      c.assign[c.indices[0]] = c.clusters;
      EXPECT(lckv::first_bad_assignment(problem(c, out, lse, scale)) == 0);
      c.assign[c.indices[0]] = saved;
    }
  }
  return lckv_test::finish("test_centroid_estimate");
}
