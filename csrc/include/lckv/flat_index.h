// Exact inner-product top-k: every query scores every key (the oracle for the approximate
// indexes). Batched searches use the cache-blocked exact_topk. Torch-free.
#pragma once

#include <cstdint>

#include "lckv/vector_index.h"

namespace lckv {

class FlatIndex : public VectorIndex {
 public:
  explicit FlatIndex(int64_t dim) : VectorIndex(dim) {}

  void search_batch(const float* queries, int64_t m, int64_t k, const SearchParams& /*params*/,
                    float* scores, int64_t* ids, int64_t* n_scored) const override {
    std::shared_lock<RwLock> lock(mutex_);
    exact_topk(keys_.data(), size_, queries, m, dim_, k, ip_, scores, ids);
    for (int64_t q = 0; q < m; ++q) n_scored[q] = size_;
  }

 protected:
  void add_locked(const float* keys, int64_t n) override { append_keys(keys, n); }

  int64_t search_locked(const float* query, int64_t k, const SearchParams& /*params*/,
                        float* scores, int64_t* ids) const override {
    TopK heap(k);
    float thr = heap.threshold();
    for (int64_t j = 0; j < size_; ++j) {
      const float s = score(query, j);
      if (s > thr) {
        heap.push(s, j);
        thr = heap.threshold();
      }
    }
    heap.write_sorted(scores, ids);
    return size_;
  }
};

}  // namespace lckv
