// lckv::kmeans (kmeans.h) against a plain Lloyd loop in double: the same assignments and
// centroids from the same initial points; points read through a row list equal the same points
// stored contiguously; empty clusters keep their centroid or restart at the generator's point;
// the initial points.
#include <lckv/kmeans.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "check.h"

namespace {

// `count` distinct points of n, drawn by mt19937_64(seed) (a partial Fisher-Yates shuffle).
std::vector<int64_t> random_points(int64_t n, int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids(static_cast<std::size_t>(n));
  std::iota(ids.begin(), ids.end(), int64_t{0});
  for (int64_t c = 0; c < count; ++c) std::swap(ids[c], ids[c + static_cast<int64_t>(rng() % static_cast<uint64_t>(n - c))]);
  ids.resize(static_cast<std::size_t>(count));
  return ids;
}

std::vector<float> gaussian(std::mt19937_64& rng, int64_t n, int64_t dim) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(n * dim));
  for (float& x : v) x = dist(rng);
  return v;
}

// Lloyd in double from the points at `init` (nearest in L2, first on ties; an empty cluster keeps
// its centroid), centroids stored in float as the kernel stores them.
void naive_lloyd(const std::vector<float>& x, int64_t n, int64_t dim, const std::vector<int64_t>& init,
                 int64_t iterations, std::vector<float>& cent, std::vector<int64_t>& assign) {
  const auto C = static_cast<int64_t>(init.size());
  cent.resize(static_cast<std::size_t>(C * dim));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t d = 0; d < dim; ++d) cent[c * dim + d] = x[init[c] * dim + d];
  assign.assign(static_cast<std::size_t>(n), 0);
  for (int64_t it = 0;; ++it) {
    for (int64_t i = 0; i < n; ++i) {
      double best = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        double dist = 0.0;
        for (int64_t d = 0; d < dim; ++d) {
          const double diff = static_cast<double>(x[i * dim + d]) - cent[c * dim + d];
          dist += diff * diff;
        }
        if (c == 0 || dist < best) {
          best = dist;
          assign[i] = c;
        }
      }
    }
    if (it == iterations) return;
    std::vector<double> sums(static_cast<std::size_t>(C * dim), 0.0);
    std::vector<int64_t> counts(static_cast<std::size_t>(C), 0);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t d = 0; d < dim; ++d) sums[assign[i] * dim + d] += x[i * dim + d];
      ++counts[assign[i]];
    }
    for (int64_t c = 0; c < C; ++c)
      if (counts[c] > 0)
        for (int64_t d = 0; d < dim; ++d) cent[c * dim + d] = static_cast<float>(sums[c * dim + d] / counts[c]);
  }
}

void test_matches_naive_lloyd(std::mt19937_64& rng) {
  for (int64_t dim : {1, 8, 17, 64}) {
    for (int64_t C : {1, 5, 16}) {
      const int64_t n = 203;
      const auto x = gaussian(rng, n, dim);
      const auto init = random_points(n, C, rng());
      for (int64_t iterations : {0, 3}) {
        lckv::KMeansResult got;
        lckv::kmeans(x.data(), nullptr, n, dim, init, lckv::KMeansParams{iterations}, got);
        std::vector<float> cent;
        std::vector<int64_t> assign;
        naive_lloyd(x, n, dim, init, iterations, cent, assign);
        EXPECT(got.assign == assign);
        for (std::size_t j = 0; j < cent.size(); ++j) EXPECT(lckv_test::close(got.centroids[j], cent[j], 1e-5, 1e-5));
        std::vector<int64_t> counts(static_cast<std::size_t>(C), 0);
        for (int64_t a : assign) ++counts[a];
        EXPECT(got.counts == counts);
      }
    }
  }
}

// Points read through a row list (a sample of a larger array) equal the same points copied out.
void test_rows_equal_copied_points(std::mt19937_64& rng) {
  const int64_t total = 500, n = 180, dim = 24, C = 12;
  const auto x = gaussian(rng, total, dim);
  std::vector<int64_t> rows = random_points(total, n, rng());
  std::vector<float> copied;
  for (int64_t r : rows) copied.insert(copied.end(), x.begin() + r * dim, x.begin() + (r + 1) * dim);
  const auto init = lckv::spaced_points(n, C, /*centred=*/true);
  lckv::KMeansResult a, b;
  lckv::kmeans(x.data(), rows.data(), n, dim, init, lckv::KMeansParams{5}, a);
  lckv::kmeans(copied.data(), nullptr, n, dim, init, lckv::KMeansParams{5}, b);
  EXPECT(a.assign == b.assign && a.centroids == b.centroids && a.counts == b.counts);
}

// Every initial centroid the same point: clusters 1 and 2 get no point in the first assignment
// (ties go to cluster 0). They keep their centroid, or
// with a generator restart at point rng() % n, drawn in cluster order.
void test_empty_clusters() {
  const int64_t n = 10, dim = 3;
  std::vector<float> x(static_cast<std::size_t>(n * dim), 1.5f);
  x[(n - 1) * dim] = 2.0f;  // one point apart, so a restart is visible
  const std::vector<int64_t> init = {0, 1, 2};
  lckv::KMeansResult kept;
  lckv::kmeans(x.data(), nullptr, n, dim, init, lckv::KMeansParams{1}, kept);
  EXPECT(kept.centroids[dim] == 1.5f && kept.centroids[2 * dim] == 1.5f);
  std::mt19937_64 rng(3), replay(3);
  lckv::KMeansParams restart{1, &rng};
  lckv::KMeansResult moved;
  lckv::kmeans(x.data(), nullptr, n, dim, init, restart, moved);
  for (int64_t c = 1; c < 3; ++c) {
    const auto point = static_cast<int64_t>(replay() % static_cast<uint64_t>(n));
    EXPECT(moved.centroids[c * dim] == x[point * dim]);
  }
}

void test_initial_points() {
  EXPECT((lckv::spaced_points(10, 4, true) == std::vector<int64_t>{1, 3, 6, 8}));
  EXPECT((lckv::spaced_points(10, 4, false) == std::vector<int64_t>{0, 2, 5, 7}));
}

}  // namespace

int main() {
  std::mt19937_64 rng(std::random_device{}());
  test_matches_naive_lloyd(rng);
  test_rows_equal_copied_points(rng);
  test_empty_clusters();
  test_initial_points();
  return lckv_test::finish("test_kmeans");
}
