// Inverted-file index: k-means centroids, each key stored in the list of its nearest centroid
// (L2), and a search that scans the `nprobe` lists whose centroids have the largest inner product
// with the query. n_scored counts the centroids and the keys scanned. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "lckv/kmeans.h"
#include "lckv/vector_index.h"

namespace lckv {

struct IVFBuildParams {
  int64_t n_iters = 10;  // Lloyd iterations of the k-means that trains the lists
  uint64_t seed = 0;     // the training sample, initial centroids and restarts of empty lists
};

// Calls visit(name, value) for each setting of p, in declaration order (bindings, logs).
template <typename Visit>
void visit_settings(const IVFBuildParams& p, Visit&& visit) {
  visit("n_iters", p.n_iters);
  visit("seed", p.seed);
}

class IVFIndex : public VectorIndex {
 public:
  // n_lists: number of k-means lists (clamped to the number of training keys).
  IVFIndex(int64_t dim, int64_t n_lists, const IVFBuildParams& params = {})
      : VectorIndex(dim), n_lists_req_(n_lists), params_(params) {
    if (n_lists <= 0) throw std::invalid_argument("n_lists must be positive");
    if (params.n_iters < 0) throw std::invalid_argument("n_iters must be >= 0");
  }

  int64_t n_lists() const {
    std::shared_lock<RwLock> lock(mutex_);
    return static_cast<int64_t>(lists_.size());
  }

  // Trains the centroids on these keys (at most 256 per list, sampled) and adds them.
  void build(const float* keys, int64_t n) {
    std::unique_lock<RwLock> lock(mutex_);
    train_locked(keys, n);
    add_locked(keys, n);
  }

 protected:
  void add_locked(const float* keys, int64_t n) override {
    if (lists_.empty()) train_locked(keys, n);  // first add on an untrained index trains it
    const int64_t base = size_;
    append_keys(keys, n);
    std::vector<int64_t> assign(static_cast<std::size_t>(n));
#pragma omp parallel for schedule(static) if (n > 1024)
    for (int64_t i = 0; i < n; ++i) assign[i] = nearest_centroid(keys + i * dim_);
    for (int64_t i = 0; i < n; ++i) {
      List& list = lists_[assign[i]];
      list.ids.push_back(base + i);
      list.vectors.insert(list.vectors.end(), keys + i * dim_, keys + (i + 1) * dim_);
    }
  }

  int64_t search_locked(const float* query, int64_t k, const SearchParams& params, float* scores,
                        int64_t* ids) const override {
    const int64_t n_lists = static_cast<int64_t>(lists_.size());
    const int64_t nprobe = std::max<int64_t>(1, std::min(params.nprobe, n_lists));
    TopK probe(nprobe);
    for (int64_t c = 0; c < n_lists; ++c) probe.push(ip_(query, centroids_.data() + c * dim_, dim_), c);
    std::vector<float> probe_scores(static_cast<std::size_t>(nprobe));
    std::vector<int64_t> probe_ids(static_cast<std::size_t>(nprobe));
    probe.write_sorted(probe_scores.data(), probe_ids.data());
    int64_t n_scored = n_lists;
    TopK heap(k);
    float thr = heap.threshold();
    for (int64_t p = 0; p < nprobe; ++p) {
      if (probe_ids[p] < 0) break;
      const List& list = lists_[probe_ids[p]];
      const int64_t len = static_cast<int64_t>(list.ids.size());
      for (int64_t j = 0; j < len; ++j) {
        const float s = ip_(query, list.vectors.data() + j * dim_, dim_);
        if (s > thr) {
          heap.push(s, list.ids[j]);
          thr = heap.threshold();
        }
      }
      n_scored += len;
    }
    heap.write_sorted(scores, ids);
    return n_scored;
  }

  int64_t extra_memory_bytes_locked() const override {
    int64_t bytes = static_cast<int64_t>(centroids_.capacity() * sizeof(float));
    for (const List& list : lists_)
      bytes += static_cast<int64_t>(list.ids.capacity() * sizeof(int64_t) +
                                    list.vectors.capacity() * sizeof(float));
    return bytes;
  }

 private:
  struct List {
    std::vector<int64_t> ids;     // key ids in this list
    std::vector<float> vectors;   // copies of those keys, [len, dim], for a sequential scan
  };

  // argmin_c |x - c|^2 = argmax_c (x.c - |c|^2 / 2)
  int64_t nearest_centroid(const float* x) const {
    int64_t best = 0;
    float best_score = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < static_cast<int64_t>(half_norms_.size()); ++c) {
      const float s = ip_(x, centroids_.data() + c * dim_, dim_) - half_norms_[c];
      if (s > best_score) {
        best_score = s;
        best = c;
      }
    }
    return best;
  }

  // k-means over a training sample: the keys shuffled, at most 256 per list; the initial centroids
  // are the sample's first keys (a random draw) and an empty list restarts at a random sample key.
  void train_locked(const float* keys, int64_t n) {
    if (n <= 0) return;
    const int64_t n_lists = std::min(n_lists_req_, n);
    std::mt19937_64 rng(params_.seed);
    std::vector<int64_t> sample(static_cast<std::size_t>(n));
    std::iota(sample.begin(), sample.end(), int64_t{0});
    std::shuffle(sample.begin(), sample.end(), rng);
    sample.resize(static_cast<std::size_t>(std::min<int64_t>(n, 256 * n_lists)));
    std::vector<int64_t> first(static_cast<std::size_t>(n_lists));
    std::iota(first.begin(), first.end(), int64_t{0});
    KMeansParams kp;
    kp.iterations = params_.n_iters;
    kp.restart = &rng;
    KMeansResult km;
    kmeans(keys, sample.data(), static_cast<int64_t>(sample.size()), dim_, first, kp, km);
    centroids_ = std::move(km.centroids);
    half_norms_.resize(static_cast<std::size_t>(n_lists));
    for (int64_t c = 0; c < n_lists; ++c) {
      const float* cv = centroids_.data() + c * dim_;
      half_norms_[c] = 0.5f * ip_(cv, cv, dim_);
    }
    lists_.assign(static_cast<std::size_t>(n_lists), List());
  }

  const int64_t n_lists_req_;      // requested number of lists
  const IVFBuildParams params_;    // build knobs
  std::vector<float> centroids_;   // [n_lists, dim]
  std::vector<float> half_norms_;  // |c|^2 / 2 per centroid
  std::vector<List> lists_;        // one per centroid
};

}  // namespace lckv
