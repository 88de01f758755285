// Lloyd's k-means in L2, the one implementation behind every clustering in lckv: the IVF lists
// (ivf_index.h), the cluster index's segments and super-clusters (cluster_index.h), the graph
// index's cover of the build queries (graph_index.h) and the retrieval estimate's centroids
// (lckv._C.kmeans).
//
// From initial centroids at given points, each iteration assigns every point to its nearest
// centroid (argmax_c x . c - |c|^2 / 2, ties: the lower c) and moves each centroid to the mean of
// its points (summed in double); a cluster left empty keeps its centroid, or restarts at a random
// point when KMeansParams::restart gives a generator. After the last iteration the points are
// assigned once more, so `assign` and `counts` describe the returned centroids. Callers differ
// only in these parameters: the initial points (e.g. spaced_points; the Python binding takes them as positions), the iterations,
// and the empty-cluster rule.
//
// The assignment scores kChunk points at a time against the centroids stored as blocks of 8
// transposed rows (simd_ip.h), with the kernels of this CPU; it runs on OpenMP threads when
// called outside a parallel region and the work is large enough. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "lckv/simd_ip.h"

namespace lckv {

struct KMeansParams {
  int64_t iterations = 0;               // Lloyd iterations (assign, then move the centroids)
  std::mt19937_64* restart = nullptr;   // empty clusters restart at point rng() % n; nullptr: they
                                        // keep their centroid
};

struct KMeansResult {
  std::vector<float> centroids;  // [n_clusters, dim]
  std::vector<int64_t> assign;   // [n] nearest centroid of each point
  std::vector<int64_t> counts;   // [n_clusters] points assigned to each centroid
};

// `count` initial points spread evenly over n points in order: point floor((c + 1/2) n / count)
// when `centred`, else floor(c n / count). Keys and queries are ordered by position, and topics
// are contiguous in position, so spaced points start one centroid in each stretch.
inline std::vector<int64_t> spaced_points(int64_t n, int64_t count, bool centred) {
  std::vector<int64_t> out(static_cast<std::size_t>(count));
  for (int64_t c = 0; c < count; ++c) out[c] = centred ? (2 * c + 1) * n / (2 * count) : c * n / count;
  return out;
}

// k-means of n points of `dim` floats, point i at points + (rows ? rows[i] : i) * dim, with one
// centroid per entry of `init` (positions in 0..n, as point i above). Fills `out`.
inline void kmeans(const float* points, const int64_t* rows, int64_t n, int64_t dim, const std::vector<int64_t>& init,
                   const KMeansParams& params, KMeansResult& out) {
  const auto C = static_cast<int64_t>(init.size());
  if (C < 1 || C > n) throw std::invalid_argument("k-means needs 1 <= n_clusters <= n points");
  if (params.iterations < 0) throw std::invalid_argument("k-means iterations must be >= 0");
  const auto d = static_cast<std::size_t>(dim);
  auto point = [&](int64_t i) { return points + (rows != nullptr ? rows[i] : i) * dim; };
  const SimdLevel level = detect_simd_level();
  const InnerProductFn ip = inner_product_for(simd_level_for(d));
  const InnerProductBlocksFn ip_blocks = inner_product_blocks_for(level);
  const InnerProductBlocksPairFn ip_blocks_pair = inner_product_blocks_pair_for(level);
  std::vector<float>& cent = out.centroids;
  cent.resize(static_cast<std::size_t>(C) * d);
  for (int64_t c = 0; c < C; ++c) std::copy(point(init[c]), point(init[c]) + dim, cent.begin() + c * dim);
  std::vector<float> half_norms(static_cast<std::size_t>(C));
  const int64_t n_blocks = (C + 7) / 8, stride = n_blocks * 8;
  constexpr int64_t kChunk = 16;  // points scored together (the block kernel takes them in pairs)
  std::vector<float> blocks(static_cast<std::size_t>(stride) * d, 0.0f);  // centroids, 8-row blocks
  std::vector<double> sums(static_cast<std::size_t>(C) * d);
  std::vector<int64_t>& assign = out.assign;
  std::vector<int64_t>& counts = out.counts;
  assign.resize(static_cast<std::size_t>(n));
  counts.assign(static_cast<std::size_t>(C), 0);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  bool threads = n * C * dim >= (int64_t{1} << 22);  // a team pays off from a few ms of work
#ifdef _OPENMP
  threads = threads && !omp_in_parallel();
#endif
  for (int64_t it = 0;; ++it) {
    for (int64_t c = 0; c < C; ++c) {
      const float* cv = cent.data() + c * dim;
      half_norms[c] = 0.5f * ip(cv, cv, d);
      put_blocked_row(blocks, c, cv, dim);
    }
    // nearest centroid in L2: argmax_c (x . c - |c|^2 / 2), kChunk points per pass over the blocks
#pragma omp parallel if (threads)
    {
      std::vector<float> scores(static_cast<std::size_t>(kChunk * stride));
      std::vector<float> gathered(rows != nullptr ? static_cast<std::size_t>(kChunk) * d : 0);
#pragma omp for schedule(static)
      for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
        const int64_t i0 = chunk * kChunk, m = std::min(kChunk, n - i0);
        const float* x = points + i0 * dim;
        if (rows != nullptr) {
          for (int64_t j = 0; j < m; ++j) std::copy(point(i0 + j), point(i0 + j) + dim, gathered.begin() + j * dim);
          x = gathered.data();
        }
        score_blocks(ip_blocks, ip_blocks_pair, x, m, dim, blocks.data(), n_blocks, scores.data(), stride);
        for (int64_t j = 0; j < m; ++j) assign[i0 + j] = nearest_from_scores(scores.data() + j * stride, half_norms.data(), C);
      }
    }
    if (it == params.iterations) break;
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const float* x = point(i);
      double* sum = sums.data() + assign[i] * dim;
      for (int64_t j = 0; j < dim; ++j) sum[j] += x[j];
      ++counts[assign[i]];
    }
    for (int64_t c = 0; c < C; ++c) {
      float* cv = cent.data() + c * dim;
      if (counts[c] > 0) {
        for (int64_t j = 0; j < dim; ++j) cv[j] = static_cast<float>(sums[c * dim + j] / static_cast<double>(counts[c]));
      } else if (params.restart != nullptr) {
        const float* x = point(static_cast<int64_t>((*params.restart)() % static_cast<uint64_t>(n)));
        std::copy(x, x + dim, cv);
      }
    }
  }
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t i = 0; i < n; ++i) ++counts[assign[i]];
}

}  // namespace lckv
