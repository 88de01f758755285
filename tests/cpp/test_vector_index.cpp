// FlatIndex equals a naive top-k; SIMD kernels (also the row and blocked ones) agree with the
// scalar one; ClusterIndex is exact when its scan covers every key; IVF and the graph index
// reach their recall on random data; keys added later are found; concurrent search during add.
#include <lckv/cluster_index.h>
#include <lckv/flat_index.h>
#include <lckv/graph_index.h>
#include <lckv/ivf_index.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "check.h"

namespace {

std::vector<float> gaussian(std::mt19937_64& rng, int64_t rows, int64_t dim, float mean, float sd) {
  std::normal_distribution<float> dist(mean, sd);
  std::vector<float> v(static_cast<std::size_t>(rows * dim));
  for (float& x : v) x = dist(rng);
  return v;
}

double recall(const std::vector<int64_t>& truth, const std::vector<int64_t>& got, int64_t m, int64_t k) {
  int64_t hits = 0;
  for (int64_t q = 0; q < m; ++q) {
    std::set<int64_t> t(truth.begin() + q * k, truth.begin() + (q + 1) * k);
    for (int64_t j = 0; j < k; ++j) hits += t.count(got[q * k + j]);
  }
  return static_cast<double>(hits) / static_cast<double>(m * k);
}

// Every key as (-inner product in double, id), sorted: the exact ranking, best first.
std::vector<std::pair<double, int64_t>> naive_ranking(const std::vector<float>& keys, int64_t n, const float* query,
                                                      int64_t dim) {
  std::vector<std::pair<double, int64_t>> all;
  for (int64_t j = 0; j < n; ++j) {
    double s = 0.0;
    for (int64_t d = 0; d < dim; ++d) s += static_cast<double>(query[d]) * keys[j * dim + d];
    all.emplace_back(-s, j);
  }
  std::sort(all.begin(), all.end());
  return all;
}

void test_kernels(std::mt19937_64& rng) {
  for (int64_t dim : {1, 7, 8, 15, 16, 33, 59, 128}) {
    auto a = gaussian(rng, 1, dim, 0.0f, 1.0f);
    auto b = gaussian(rng, 1, dim, 0.0f, 1.0f);
    double exact = 0.0;
    for (int64_t d = 0; d < dim; ++d) exact += static_cast<double>(a[d]) * b[d];
    for (auto level : {lckv::SimdLevel::kScalar, lckv::detect_simd_level()}) {
      const float got = lckv::inner_product_for(level)(a.data(), b.data(), dim);
      EXPECT(lckv_test::close(got, exact, 1e-5 * dim, 1e-5));
    }
  }
}

void test_row_kernels(std::mt19937_64& rng) {
  // n not a multiple of the 8-row block; 3, 13 and 17 blocks: every step size of the AVX2 block
  // kernels (8 / 4 / 2 / 1 blocks for one query, 4 / 2 / 1 for a pair)
  for (int64_t n : {21, 101, 133})
  for (int64_t dim : {1, 7, 8, 15, 16, 33, 59, 128}) {
    auto q = gaussian(rng, 1, dim, 0.0f, 1.0f);
    auto rows = gaussian(rng, n, dim, 0.0f, 1.0f);
    const int64_t n_blocks = (n + 7) / 8;
    std::vector<float> blocks(static_cast<std::size_t>(n_blocks * 8 * dim), 0.0f);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t d = 0; d < dim; ++d) blocks[(r / 8) * 8 * dim + d * 8 + r % 8] = rows[r * dim + d];
    auto q1 = gaussian(rng, 1, dim, 0.0f, 1.0f);
    for (auto level : {lckv::SimdLevel::kScalar, lckv::detect_simd_level()}) {
      std::vector<float> by_rows(n), by_blocks(n_blocks * 8), pair0(n_blocks * 8), pair1(n_blocks * 8);
      lckv::inner_product_rows_for(level)(q.data(), rows.data(), n, dim, by_rows.data());
      lckv::inner_product_blocks_for(level)(q.data(), blocks.data(), n_blocks, dim, by_blocks.data());
      lckv::inner_product_blocks_pair_for(level)(q.data(), q1.data(), blocks.data(), n_blocks, dim, pair0.data(),
                                                 pair1.data());
      for (int64_t r = 0; r < n; ++r) {
        double exact = 0.0, exact1 = 0.0;
        for (int64_t d = 0; d < dim; ++d) {
          exact += static_cast<double>(q[d]) * rows[r * dim + d];
          exact1 += static_cast<double>(q1[d]) * rows[r * dim + d];
        }
        EXPECT(lckv_test::close(by_rows[r], exact, 1e-5 * dim, 1e-5));
        EXPECT(lckv_test::close(by_blocks[r], exact, 1e-5 * dim, 1e-5));
        EXPECT(lckv_test::close(pair0[r], exact, 1e-5 * dim, 1e-5));
        EXPECT(lckv_test::close(pair1[r], exact1, 1e-5 * dim, 1e-5));
      }
    }
  }
}

void test_cluster(std::mt19937_64& rng) {
  const int64_t n = 3000, dim = 16, m = 4, k = 50;
  auto keys = gaussian(rng, n, dim, 0.0f, 1.0f);
  auto queries = gaussian(rng, m, dim, 0.0f, 1.0f);
  lckv::ClusterBuildParams params;
  params.cluster_size = 16;
  params.segment = 1024;
  lckv::ClusterIndex index(dim, params);
  index.build(keys.data(), 2000);
  EXPECT(index.n_clustered() == 2000);  // a segment and a partial one of 976 >= 4 * 16 keys
  index.add(keys.data() + 2000 * dim, n - 2000);
  EXPECT(index.size() == n && index.n_clustered() == 2000);  // the 1000 added keys wait in the tail
  lckv::SearchParams full;
  full.scan = static_cast<double>(n) / k;  // covers every key: exact
  for (int64_t q = 0; q < m; ++q) {
    std::vector<float> s(k);
    std::vector<int64_t> ids(k);
    const int64_t scored = index.search(queries.data() + q * dim, k, full, s.data(), ids.data());
    EXPECT(scored == n + index.n_clusters());
    const auto all = naive_ranking(keys, n, queries.data() + q * dim, dim);
    for (int64_t j = 0; j < k; ++j) EXPECT(lckv_test::close(s[j], -all[j].first, 1e-4, 1e-5));
  }
}

// A plain matmul for ClusterIndex's hook (the bindings register torch's BLAS).
void naive_matmul(const float* a, int64_t m, const float* b, int64_t n, int64_t dim, float* out) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum += a[i * dim + d] * b[j * dim + d];
      out[i * n + j] = sum;
    }
}

// A batch of queries (matmul hook set) returns what the same queries searched one by one return,
// at a small k (the tail's heap) and a larger one, with a tail and clusters to scan.
void test_cluster_batch(std::mt19937_64& rng) {
  const int64_t n = 5000, dim = 24, m = 40;
  auto keys = gaussian(rng, n, dim, 0.0f, 1.0f);
  auto queries = gaussian(rng, m, dim, 0.0f, 1.0f);
  lckv::ClusterBuildParams params;
  params.segment = 1024;
  lckv::ClusterIndex index(dim, params);
  index.build(keys.data(), 4000);
  index.add(keys.data() + 4000 * dim, n - 4000);  // a tail of 1000 keys
  lckv::ClusterIndex::matmul_hook() = &naive_matmul;
  EXPECT(index.batches_searches(m) && !index.batches_searches(1));
  lckv::SearchParams params_scan;
  params_scan.scan = 8.0;
  for (const int64_t k : {4, 100}) {
    std::vector<float> s(m * k), one(k);
    std::vector<int64_t> ids(m * k), one_ids(k), scored(m);
    index.search_batch(queries.data(), m, k, params_scan, s.data(), ids.data(), scored.data());
    for (int64_t q = 0; q < m; ++q) {
      const int64_t one_scored = index.search(queries.data() + q * dim, k, params_scan, one.data(), one_ids.data());
      EXPECT(scored[q] == one_scored);
      for (int64_t j = 0; j < k; ++j) EXPECT(lckv_test::close(s[q * k + j], one[j], 1e-4, 1e-5));
    }
  }
  lckv::ClusterIndex::matmul_hook() = nullptr;
}

void test_flat(std::mt19937_64& rng) {
  const int64_t n = 777, dim = 59, m = 5, k = 10;
  auto keys = gaussian(rng, n, dim, 0.0f, 1.0f);
  auto queries = gaussian(rng, m, dim, 0.0f, 1.0f);
  lckv::FlatIndex index(dim);
  index.add(keys.data(), n);
  std::vector<float> s1(m * k), s2(m * k);
  std::vector<int64_t> i1(m * k), i2(m * k), ns(m);
  index.search_batch(queries.data(), m, k, {}, s1.data(), i1.data(), ns.data());
  for (int64_t q = 0; q < m; ++q) {
    EXPECT(ns[q] == n);
    EXPECT(index.search(queries.data() + q * dim, k, {}, s2.data() + q * k, i2.data() + q * k) == n);
    const auto all = naive_ranking(keys, n, queries.data() + q * dim, dim);
    for (int64_t j = 0; j < k; ++j) {
      EXPECT(i1[q * k + j] == all[j].second);
      EXPECT(i2[q * k + j] == all[j].second);
      EXPECT(lckv_test::close(s1[q * k + j], -all[j].first, 1e-4, 1e-5));
    }
  }
  // k larger than the index: min(k, n) results, then (-inf, -1).
  lckv::FlatIndex small(dim);
  small.add(keys.data(), 3);
  std::vector<float> s(8);
  std::vector<int64_t> ids(8);
  small.search(queries.data(), 8, {}, s.data(), ids.data());
  for (int j = 0; j < 3; ++j) EXPECT(ids[j] >= 0 && ids[j] < 3);
  for (int j = 3; j < 8; ++j) EXPECT(ids[j] == -1 && std::isinf(s[j]) && s[j] < 0);
}

// Keys and queries from different distributions: keys around 64 cluster centres, queries around
// the same centres scaled and shifted along the first axis.
void make_shifted(std::mt19937_64& rng, int64_t n, int64_t m, int64_t dim, std::vector<float>& keys,
                  std::vector<float>& queries) {
  const int64_t n_centres = 64;
  auto centres = gaussian(rng, n_centres, dim, 0.0f, 1.0f);
  keys = gaussian(rng, n, dim, 0.0f, 0.4f);
  queries = gaussian(rng, m, dim, 0.0f, 0.4f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = static_cast<int64_t>(rng() % n_centres);
    for (int64_t d = 0; d < dim; ++d) keys[i * dim + d] += centres[c * dim + d];
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t c = static_cast<int64_t>(rng() % n_centres);
    for (int64_t d = 0; d < dim; ++d) queries[i * dim + d] += 2.0f * centres[c * dim + d];
    queries[i * dim] += 3.0f;
  }
}

void test_approximate(std::mt19937_64& rng) {
  const int64_t n = 20000, dim = 32, m_build = 2000, m = 100, k = 10;
  std::vector<float> keys, queries;
  make_shifted(rng, n, m_build + m, dim, keys, queries);
  const float* decode = queries.data() + m_build * dim;
  lckv::FlatIndex flat(dim);
  flat.add(keys.data(), n);
  std::vector<float> st(m * k), s(m * k);
  std::vector<int64_t> truth(m * k), got(m * k), ns(m);
  flat.search_batch(decode, m, k, {}, st.data(), truth.data(), ns.data());

  lckv::IVFIndex ivf(dim, 128);
  ivf.build(keys.data(), n);
  lckv::SearchParams ivf_params;
  ivf_params.nprobe = 32;
  ivf.search_batch(decode, m, k, ivf_params, s.data(), got.data(), ns.data());
  const double r_ivf = recall(truth, got, m, k);
  std::printf("ivf recall@10 %.3f\n", r_ivf);
  EXPECT(r_ivf >= 0.85);

  lckv::GraphIndex graph(dim, lckv::GraphBuildParams{});
  graph.build(keys.data(), n, queries.data(), m_build);
  lckv::SearchParams graph_params;
  graph_params.ef = 64;
  graph.search_batch(decode, m, k, graph_params, s.data(), got.data(), ns.data());
  const double r_graph = recall(truth, got, m, k);
  double mean_scored = 0.0;
  for (int64_t q = 0; q < m; ++q) mean_scored += static_cast<double>(ns[q]) / m;
  std::printf("graph recall@10 %.3f scoring %.1f%% of keys\n", r_graph, 100.0 * mean_scored / n);
  EXPECT(r_graph >= 0.9);
  for (int64_t id : got) EXPECT(id >= 0 && id < n);

  // Graph without build queries still works (key-only linking).
  lckv::GraphIndex plain(dim, lckv::GraphBuildParams{});
  plain.build(keys.data(), 5000, nullptr, 0);
  plain.search_batch(decode, m, k, graph_params, s.data(), got.data(), ns.data());
  for (int64_t id : got) EXPECT(id >= 0 && id < 5000);
}

void test_add_and_concurrency(std::mt19937_64& rng) {
  const int64_t n = 5000, dim = 16, m_build = 500, k = 5;
  std::vector<float> keys, queries;
  make_shifted(rng, n, m_build, dim, keys, queries);
  lckv::GraphIndex graph(dim, lckv::GraphBuildParams{});
  graph.build(keys.data(), n, queries.data(), m_build);
  // A key far along axis 0, added last, must be found as the top-1 of queries pointing that way.
  std::vector<float> strong(dim, 0.0f);
  strong[0] = 50.0f;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> bad{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&] {
      std::vector<float> s(k);
      std::vector<int64_t> ids(k);
      while (!stop.load()) {
        const int64_t size_before = graph.size();
        graph.search(queries.data(), k, {}, s.data(), ids.data());
        for (int64_t id : ids)
          if (id < 0 || id >= graph.size() || size_before <= 0) ++bad;
      }
    });
  }
  auto extra = gaussian(rng, 2000, dim, 0.0f, 1.0f);
  for (int64_t i = 0; i < 2000; i += 50) graph.add(extra.data() + i * dim, 50);
  graph.add(strong.data(), 1);
  stop = true;
  for (auto& r : readers) r.join();
  EXPECT(bad.load() == 0);
  EXPECT(graph.size() == n + 2001);
  // A build query pushed far along axis 0: its exact top-1 is now the strong key.
  std::vector<float> probe(queries.begin(), queries.begin() + dim);
  probe[0] += 100.0f;
  std::vector<float> s(k);
  std::vector<int64_t> ids(k);
  graph.search(probe.data(), k, {}, s.data(), ids.data());
  EXPECT(ids[0] == n + 2000);
}

}  // namespace

// nearest_from_scores (the k-means assignment; AVX2 where the CPU has it) equals the scalar rule,
// argmax_c (scores[c] - half_norms[c]) with ties to the lower c, for every length, with planted
// ties (a repeated best, in the same lane and across lanes) and scores on a coarse grid.
void test_nearest(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> grid(-8, 8);
  for (int64_t C = 1; C <= 100; ++C) {
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<float> scores(static_cast<std::size_t>(C)), half(static_cast<std::size_t>(C));
      for (int64_t c = 0; c < C; ++c) {
        scores[c] = 0.25f * static_cast<float>(grid(rng));  // exact, many ties
        half[c] = 0.125f * static_cast<float>(grid(rng) + 8);
      }
      if (trial % 3 == 0 && C > 9) {  // the best value at two places
        const int64_t a = static_cast<int64_t>(rng() % static_cast<uint64_t>(C));
        const int64_t b = static_cast<int64_t>(rng() % static_cast<uint64_t>(C));
        scores[a] = scores[b] = 10.0f;
        half[a] = half[b] = 0.0f;
      }
      EXPECT(lckv::nearest_from_scores(scores.data(), half.data(), C) ==
             lckv::nearest_from_scores_scalar(scores.data(), half.data(), C));
    }
  }
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  std::random_device device;
  const uint64_t seed = (static_cast<uint64_t>(device()) << 32) | device();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  test_kernels(rng);
  test_nearest(rng);
  test_row_kernels(rng);
  test_cluster(rng);
  test_cluster_batch(rng);
  test_flat(rng);
  test_approximate(rng);
  test_add_and_concurrency(rng);
  return lckv_test::finish("test_vector_index");
}
