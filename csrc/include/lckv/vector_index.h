// The interface shared by lckv's inner-product indexes, and the pieces they share: a bounded top-k
// heap, visited-marks for graph search, and a blocked exact top-k.
//
// Contract of every index (one per layer and kv head):
//   * keys are float32 rows of `dim`, with ids 0, 1, 2, ... in insertion order (build, then add);
//   * search(query, k) returns up to min(k, size) results sorted by descending inner product;
//     slots past the results found hold id -1 and score -inf (exact indexes always fill
//     min(k, size) slots; approximate ones fill what their search reached);
//   * it also returns n_scored, the number of inner products computed for that query (keys, and
//     for IVF the centroids too), the cost measure that benchmarks report;
//   * searches may run concurrently from many threads, also while another thread adds keys: a
//     reader-writer lock lets searches share the index and gives add() exclusive access.
// Torch-free: raw pointers, row-major.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "lckv/per_thread.h"
#include "lckv/simd_ip.h"

namespace lckv {

// Reader-writer lock that does not starve writers: glibc's shared_mutex prefers readers, so a
// steady stream of searches could block add() forever. A writer holds `gate_` while it waits,
// and every reader passes through `gate_` first, so new readers queue behind a waiting writer.
class RwLock {
 public:
  void lock_shared() {
    { std::lock_guard<std::mutex> pass(gate_); }
    rw_.lock_shared();
  }
  void unlock_shared() { rw_.unlock_shared(); }
  void lock() {
    gate_.lock();
    rw_.lock();
  }
  void unlock() {
    rw_.unlock();
    gate_.unlock();
  }

 private:
  std::mutex gate_;         // turnstile: held by a writer from waiting until done
  std::shared_mutex rw_;    // the shared/exclusive lock itself
};

// Per-call search knobs; each index reads the ones it understands.
struct SearchParams {
  int64_t ef = 64;      // GraphIndex: beam width (may be below k: all keys scored compete for k)
  int64_t nprobe = 8;   // IVFIndex: number of lists scanned
  double scan = 2.0;    // ClusterIndex: keys scanned per result wanted (clusters taken best first)
  double expand = 0.1;  // ClusterIndex with super-clusters: share of them whose clusters are scored
                        // at least (the group search's estimate of the rest; never changes which
                        // clusters are scanned)
  int64_t upper_ef = 0;  // GraphIndex: beam width over the upper level (0: the build setting)
  int64_t probe_supers = 0;  // ClusterIndex search / search_batch with super-clusters: open only
                             // the query's best this many supers by bound (more while they and the
                             // loose clusters hold fewer keys than the scan wants) and pick the
                             // clusters among their members: approximate, O(n_supers) per query;
                             // 0: the exact rule (every super whose bound reaches the picks)
};

// Keeps the k largest (score, id) pairs seen; a min-heap on score.
class TopK {
 public:
  explicit TopK(int64_t k) : k_(k) { heap_.reserve(static_cast<std::size_t>(k)); }

  // Smallest score that can still enter (-inf until the heap is full).
  float threshold() const {
    return static_cast<int64_t>(heap_.size()) < k_ ? -std::numeric_limits<float>::infinity()
                                                   : heap_.front().first;
  }

  void push(float score, int64_t id) {
    if (static_cast<int64_t>(heap_.size()) < k_) {
      heap_.emplace_back(score, id);
      std::push_heap(heap_.begin(), heap_.end(), Greater());
    } else if (score > heap_.front().first) {
      std::pop_heap(heap_.begin(), heap_.end(), Greater());
      heap_.back() = {score, id};
      std::push_heap(heap_.begin(), heap_.end(), Greater());
    }
  }

  // Writes k slots sorted by descending score, padding with (-inf, -1); empties the heap.
  void write_sorted(float* scores, int64_t* ids) {
    std::sort(heap_.begin(), heap_.end(), [](const Entry& a, const Entry& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    int64_t i = 0;
    for (; i < static_cast<int64_t>(heap_.size()); ++i) {
      scores[i] = heap_[i].first;
      ids[i] = heap_[i].second;
    }
    for (; i < k_; ++i) {
      scores[i] = -std::numeric_limits<float>::infinity();
      ids[i] = -1;
    }
    heap_.clear();
  }

 private:
  using Entry = std::pair<float, int64_t>;
  struct Greater {
    bool operator()(const Entry& a, const Entry& b) const { return a.first > b.first; }
  };
  int64_t k_;                 // capacity
  std::vector<Entry> heap_;   // min-heap on score
};

// Marks "visited" for one graph search, one bit per key (32 KB for 262K keys, so it stays in L1
// or L2 where one uint16 mark per key would not), cleared at the next reset() by zeroing only the
// words this search set. mark_new() filters a neighbour list without data-dependent branches.
struct VisitedBits {
  std::vector<uint64_t> words;  // bit id % 64 of words[id / 64]
  std::vector<uint32_t> dirty;  // words set since the last reset (each once; one spare slot, as
                                // every mark writes its word's index before knowing if it is new)
  std::size_t n_dirty = 0;

  void reset(std::size_t n) {
    for (std::size_t i = 0; i < n_dirty; ++i) words[dirty[i]] = 0;
    n_dirty = 0;
    const std::size_t n_words = (n + 63) / 64;
    if (words.size() < n_words) {
      words.resize(n_words, 0);
      dirty.resize(n_words + 1);
    }
  }
  bool test_and_set(std::size_t id) {
    uint64_t& w = words[id >> 6];
    const uint64_t bit = uint64_t(1) << (id & 63);
    const bool seen = (w & bit) != 0;
    dirty[n_dirty] = static_cast<uint32_t>(id >> 6);
    n_dirty += w == 0;
    w |= bit;
    return seen;
  }
  // Sets the bits of a fixed id set given as (word index, bits) pairs, one per distinct word
  // (precomputed: no read-modify-write chain per id).
  void mark_words(const std::vector<std::pair<uint32_t, uint64_t>>& marks) {
    for (const auto& [i, bits] : marks) {
      dirty[n_dirty] = i;
      n_dirty += words[i] == 0;
      words[i] |= bits;
    }
  }
  // Appends the ids of list[0, n) not visited yet to out (which must have room for n more) and
  // marks them; returns how many it appended.
  std::size_t mark_new(const uint32_t* list, std::size_t n, uint32_t* out) {
    std::size_t n_new = 0;
    for (std::size_t j = 0; j < n; ++j) {
      const uint32_t id = list[j];
      uint64_t& w = words[id >> 6];
      const uint64_t bit = uint64_t(1) << (id & 63);
      out[n_new] = id;
      n_new += (w & bit) == 0;
      dirty[n_dirty] = id >> 6;
      n_dirty += w == 0;
      w |= bit;
    }
    return n_new;
  }
};

// Exact top-k by inner product of m queries against n keys, blocked so that a block of keys stays
// in cache while a block of queries scans it. Writes [m, k] scores/ids (padding (-inf, -1) when
// k > n). Parallel over query blocks with OpenMP.
inline void exact_topk(const float* keys, int64_t n, const float* queries, int64_t m, int64_t dim,
                       int64_t k, InnerProductFn ip, float* out_scores, int64_t* out_ids) {
  constexpr int64_t kQueryBlock = 16;
  const int64_t key_block = std::max<int64_t>(64, (192 * 1024) / (dim * 4));
  const int64_t n_qblocks = (m + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t qb = 0; qb < n_qblocks; ++qb) {
    const int64_t q0 = qb * kQueryBlock;
    const int64_t q1 = std::min(m, q0 + kQueryBlock);
    std::vector<TopK> heaps;
    heaps.reserve(static_cast<std::size_t>(q1 - q0));
    for (int64_t q = q0; q < q1; ++q) heaps.emplace_back(k);
    std::vector<float> thresholds(static_cast<std::size_t>(q1 - q0),
                                  -std::numeric_limits<float>::infinity());
    for (int64_t j0 = 0; j0 < n; j0 += key_block) {
      const int64_t j1 = std::min(n, j0 + key_block);
      for (int64_t q = q0; q < q1; ++q) {
        const float* qv = queries + q * dim;
        TopK& heap = heaps[q - q0];
        float& thr = thresholds[q - q0];
        for (int64_t j = j0; j < j1; ++j) {
          const float s = ip(qv, keys + j * dim, static_cast<std::size_t>(dim));
          if (s > thr) {  // thr is -inf until the heap is full
            heap.push(s, j);
            thr = heap.threshold();
          }
        }
      }
    }
    for (int64_t q = q0; q < q1; ++q) heaps[q - q0].write_sorted(out_scores + q * k, out_ids + q * k);
  }
}

// Base of FlatIndex, IVFIndex and GraphIndex: owns the keys and the reader-writer lock.
class VectorIndex {
 public:
  explicit VectorIndex(int64_t dim)
      : dim_(dim),
        simd_(simd_level_for(static_cast<std::size_t>(dim > 0 ? dim : 0))),
        ip_(inner_product_for(simd_)),
        ip_batch_(inner_product_batch_for(simd_)) {
    if (dim <= 0) throw std::invalid_argument("dim must be positive");
  }
  virtual ~VectorIndex() = default;
  VectorIndex(const VectorIndex&) = delete;
  VectorIndex& operator=(const VectorIndex&) = delete;

  int64_t dim() const { return dim_; }
  SimdLevel simd_level() const { return simd_; }
  int64_t size() const {
    std::shared_lock<RwLock> lock(mutex_);
    return size_;
  }

  // Appends n keys [n, dim]; their ids continue from size(). Exclusive: waits for searches.
  void add(const float* keys, int64_t n) {
    if (n <= 0) return;
    std::unique_lock<RwLock> lock(mutex_);
    add_locked(keys, n);
  }

  // Top-k of one query [dim]: k scores (descending) and ids, padded with (-inf, -1).
  // Returns n_scored. Safe to call from many threads, also during add().
  int64_t search(const float* query, int64_t k, const SearchParams& params, float* scores,
                 int64_t* ids) const {
    std::shared_lock<RwLock> lock(mutex_);
    return search_locked(query, k, params, scores, ids);
  }

  // Whether search_batch of m queries is faster as one call than as m searches on many threads
  // (an index whose batched search shares work between queries); search_heads then calls it.
  virtual bool batches_searches(int64_t m) const {
    (void)m;
    return false;
  }

  // m queries [m, dim] -> [m, k] scores/ids and [m] n_scored, parallel over queries.
  virtual void search_batch(const float* queries, int64_t m, int64_t k, const SearchParams& params,
                            float* scores, int64_t* ids, int64_t* n_scored) const {
    std::shared_lock<RwLock> lock(mutex_);
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t q = 0; q < m; ++q) {
      n_scored[q] = search_locked(queries + q * dim_, k, params, scores + q * k, ids + q * k);
    }
  }

  // Bytes held by the index (keys, graph or lists), for benchmarks.
  int64_t memory_bytes() const {
    std::shared_lock<RwLock> lock(mutex_);
    return static_cast<int64_t>(keys_.capacity() * sizeof(float)) + extra_memory_bytes_locked();
  }

 protected:
  // Called with the lock held exclusively.
  virtual void add_locked(const float* keys, int64_t n) = 0;
  // Called with the lock held (shared or exclusive).
  virtual int64_t search_locked(const float* query, int64_t k, const SearchParams& params,
                                float* scores, int64_t* ids) const = 0;
  virtual int64_t extra_memory_bytes_locked() const { return 0; }

  // Key rows [key_base_, size_) are in keys_ (an index that keeps its own copy of older keys may
  // drop them: drop_keys_before).
  const float* key(int64_t id) const { return keys_.data() + (id - key_base_) * dim_; }
  void drop_keys_before(int64_t id) {
    if (id <= key_base_) return;
    keys_.erase(keys_.begin(), keys_.begin() + (id - key_base_) * dim_);
    keys_.shrink_to_fit();  // releases the memory (the rest is a short tail)
    key_base_ = id;
  }
  float score(const float* query, int64_t id) const {
    return ip_(query, key(id), static_cast<std::size_t>(dim_));
  }
  void append_keys(const float* keys, int64_t n) {
    keys_.insert(keys_.end(), keys, keys + n * dim_);
    size_ += n;
  }

  const int64_t dim_;               // floats per key
  const SimdLevel simd_;            // kernel level picked at construction
  const InnerProductFn ip_;         // inner-product kernel picked once
  const InnerProductBatchFn ip_batch_;  // the same over a list of key ids
  std::vector<float> keys_;         // [size_ - key_base_, dim_] row-major: keys key_base_, ...
  int64_t key_base_ = 0;            // id of keys_'s first row
  int64_t size_ = 0;                // number of keys
  mutable RwLock mutex_;            // searches share, add is exclusive
};

// Searches heads[h] with queries [H, m, dim] in parallel over (head, query) pairs.
inline void search_heads(const std::vector<const VectorIndex*>& heads, const float* queries,
                         int64_t m, int64_t k, const SearchParams& params, float* scores,
                         int64_t* ids, int64_t* n_scored) {
  const int64_t n_heads = static_cast<int64_t>(heads.size());
  const int64_t total = n_heads * m;
  if (std::all_of(heads.begin(), heads.end(), [m](const VectorIndex* h) { return h->batches_searches(m); })) {
    for (int64_t h = 0; h < n_heads; ++h) {  // each batch parallel inside
      const int64_t first = h * m;
      heads[h]->search_batch(queries + first * heads[h]->dim(), m, k, params, scores + first * k, ids + first * k,
                             n_scored + first);
    }
    return;
  }
  // chunks of one (head, query): a decode step has one query per head, so a chunk of several
  // would hand all heads to one thread
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t h = t / m;
    n_scored[t] = heads[h]->search(queries + t * heads[h]->dim(), k, params, scores + t * k, ids + t * k);
  }
}

}  // namespace lckv
