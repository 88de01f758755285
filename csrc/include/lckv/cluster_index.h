// Segment-clustered inverted index for inner-product top-k at large k (RetroInfer-style clusters).
//
// A KV cache grows in order, and attention keys cluster by topic and position, so the keys are
// clustered one segment at a time: every `segment` consecutive keys are split by k-means (L2,
// initialised at evenly spaced keys of the segment) into clusters of about `cluster_size` keys,
// and each cluster's keys are copied next to each other (a cluster is scanned sequentially, as
// blocks of 8 transposed rows: no horizontal sum per key).
// Only the packed copy of clustered keys is kept (the row store holds just the tail).
// Keys that do not fill a segment yet (the tail) are scanned exactly by every search; add() clusters
// the tail whenever it reaches `segment` keys, so decode-time inserts cost O(1) amortised and never
// re-cluster old keys. build() clusters a last partial segment too when it holds at least
// 4 * cluster_size keys.
//
// Search: score every centroid, then scan clusters in descending centroid score until at least
// `scan * k` keys were scanned (SearchParams::scan), plus the tail; keep the top k. The work adapts
// to k: graph search degrades when k is a large fraction of what its beam reaches, this does not.
// With scan * k >= size the search is exact. n_scored counts centroids + keys scanned.
// Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "lckv/centroid_estimate.h"  // cluster_weights_for_cpu, exp_nonpositive
#include "lckv/vector_index.h"

namespace lckv {

struct ClusterBuildParams {
  int64_t cluster_size = 16;  // mean keys per cluster
  int64_t segment = 8192;     // keys clustered together (the last, partial one waits in the tail)
  int64_t n_iters = 6;        // Lloyd iterations per segment
};

class ClusterIndex : public VectorIndex {
 public:
  ClusterIndex(int64_t dim, const ClusterBuildParams& params)
      : VectorIndex(dim),
        params_(params),
        ip_rows_(inner_product_rows_for(simd_)),
        ip_blocks_(inner_product_blocks_for(detect_simd_level())),
        ip_blocks_pair_(inner_product_blocks_pair_for(detect_simd_level())),
        cluster_weights_(cluster_weights_for_cpu()) {
    if (params.cluster_size < 1) throw std::invalid_argument("cluster_size must be >= 1");
    if (params.segment < params.cluster_size)
      throw std::invalid_argument("segment must be >= cluster_size");
    if (params.n_iters < 0) throw std::invalid_argument("n_iters must be >= 0");
  }

  const ClusterBuildParams& build_params() const { return params_; }

  int64_t n_clusters() const {
    std::shared_lock<RwLock> lock(mutex_);
    return static_cast<int64_t>(starts_.size()) - 1;
  }

  // Keys in clusters; keys [n_clustered, size) are the tail, scanned exactly.
  int64_t n_clustered() const {
    std::shared_lock<RwLock> lock(mutex_);
    return clustered_;
  }

  // Cluster of every key (-1 for the tail), [size].
  std::vector<int64_t> assignments() const {
    std::shared_lock<RwLock> lock(mutex_);
    std::vector<int64_t> out(static_cast<std::size_t>(size_), -1);
    for (int64_t c = 0; c + 1 < static_cast<int64_t>(starts_.size()); ++c)
      for (int64_t j = starts_[c]; j < starts_[c + 1]; ++j) out[members_[j]] = c;
    return out;
  }

  // Centroids [n_clusters, dim].
  std::vector<float> centroids() const {
    std::shared_lock<RwLock> lock(mutex_);
    return centroids_;
  }

  // The top k keys of a GQA group by summed attention probability, in one pass (the
  // RetrievalPolicy rule group_rank="probability" for this index). queries [group, dim]; with
  // s_g(x) = scale * q_g . x:
  //   1. every centroid is scored for every query head; each head picks clusters best first until
  //      scan * k keys (as search() does); the candidates are the keys of the union of the heads'
  //      clusters, plus the tail, and every candidate is scored for every head;
  //   2. each head's softmax is normalised over all keys: the candidates exactly, every other key at
  //      its cluster's centroid, lse_g = log(sum_cand e^{s_g(x)} + sum_{c not picked} size_c e^{s_g(c)});
  //   3. candidates rank by sum_g e^{s_g(x) - lse_g} (ties: smaller id).
  // Writes min(k, candidates) probabilities (descending; in no order when !sorted) and ids, padded
  // with (0, -1). When scan * k covers the index every key is a candidate and the ranking is exact.
  // Returns n_scored: inner products computed over all heads (centroids and candidates).
  int64_t search_group(const float* queries, int64_t group, int64_t k, const SearchParams& params, float scale,
                       float* probs, int64_t* ids, bool sorted = true) const {
    std::shared_lock<RwLock> lock(mutex_);
    struct Scratch {
      std::vector<float> centroid_scores, row_scores, sample, logits, rest, rest_max, ones;
      std::vector<double> mass;
      std::vector<uint64_t> candidates, ranked, winners, boundary;
      std::vector<int64_t> picked, chosen;
      std::vector<uint8_t> taken;
      std::vector<uint32_t> rows;
    };
    Scratch& local = per_thread<Scratch, Scratch>();
    const int64_t n_clusters = static_cast<int64_t>(starts_.size()) - 1;
    const int64_t n_blocks = (std::max<int64_t>(n_clusters, 0) + 7) / 8, stride = n_blocks * 8;
    const auto dim = static_cast<std::size_t>(dim_);
    int64_t n_scored = 0;
    // 1. clusters: each head's best ones, their union in `chosen`
    auto& chosen = local.chosen;
    chosen.clear();
    auto& rest_max = local.rest_max;
    local.rest.assign(static_cast<std::size_t>(group), 0.0f);  // per head: the rest's mass, times e^{-m_g}
    rest_max.assign(static_cast<std::size_t>(group), 0.0f);
    if (n_clusters > 0) {
      auto& cs = local.centroid_scores;
      cs.resize(static_cast<std::size_t>(group * stride));
      local.taken.assign(static_cast<std::size_t>(n_clusters), 0);
      const double want = std::max(1.0, params.scan) * static_cast<double>(k);
      score_blocks(queries, group, blocks_.data(), n_blocks, cs.data(), stride);
      n_scored += group * n_clusters;
      for (int64_t g = 0; g < group; ++g) {
        clusters_to_scan(cs.data() + g * stride, want, local.candidates, local.sample, local.picked);
        for (int64_t c : local.picked) {
          if (!local.taken[c]) {
            local.taken[c] = 1;
            chosen.push_back(c);
          }
        }
      }
      // 2. (rest) each head's mass of the clusters nobody picked, relative to its best centroid
      for (int64_t g = 0; g < group; ++g) {
        float* w = cs.data() + g * stride;
        float m = 0.0f;
        double rest = cluster_weights_(w, sizes_.data(), n_clusters, scale, &m);
        for (int64_t c : chosen) rest -= static_cast<double>(w[c]) * sizes_[c];
        // the subtraction rounds at 1e-7 of the total, which the candidates' exact mass dominates
        local.rest[g] = static_cast<float>(std::max(rest, 0.0));
        rest_max[g] = m;
      }
    }
    // 1b. the candidates: the tail, then the chosen clusters' keys, scored for every head
    const int64_t n_tail = size_ - clustered_;
    int64_t n_rows = n_tail;
    for (int64_t c : chosen) n_rows += starts_[c + 1] - starts_[c];
    auto& rows = local.rows;
    auto& logits = local.logits;  // [group, n_rows] scaled scores
    rows.resize(static_cast<std::size_t>(n_rows));
    logits.resize(static_cast<std::size_t>(group * n_rows));
    for (int64_t j = 0; j < n_tail; ++j) rows[j] = static_cast<uint32_t>(clustered_ + j);
    for (int64_t g = 0; g < group && n_tail > 0; ++g)
      ip_rows_(queries + g * dim_, key(clustered_), static_cast<std::size_t>(n_tail), dim, logits.data() + g * n_rows);
    int64_t at = n_tail;
    for (std::size_t i = 0; i < chosen.size(); ++i) {
      if (i + kPrefetchAhead < chosen.size()) prefetch_cluster(chosen[i + kPrefetchAhead]);
      const int64_t c = chosen[i];
      const int64_t lo = starts_[c], len = starts_[c + 1] - lo;
      const int64_t first_block = block_starts_[c], blocks = block_starts_[c + 1] - first_block;
      std::copy(members_.begin() + lo, members_.begin() + lo + len, rows.begin() + at);
      local.row_scores.resize(static_cast<std::size_t>(group * blocks * 8));
      score_blocks(queries, group, packed_.data() + first_block * 8 * dim_, blocks, local.row_scores.data(), blocks * 8);
      for (int64_t g = 0; g < group; ++g)
        std::copy(local.row_scores.begin() + g * blocks * 8, local.row_scores.begin() + g * blocks * 8 + len,
                  logits.begin() + g * n_rows + at);
      at += len;
    }
    n_scored += group * n_rows;
    // 2-3. normalise each head over candidates + rest, sum the probabilities over the group
    auto& mass = local.mass;
    mass.assign(static_cast<std::size_t>(n_rows), 0.0);
    local.ones.resize(static_cast<std::size_t>(n_rows), 1.0f);
    for (int64_t g = 0; g < group; ++g) {
      float* lg = logits.data() + g * n_rows;
      float m = 0.0f;  // lg[j] becomes e^{scale * lg[j] - m}, m = the candidates' best scaled score
      const double cand = n_rows > 0 ? cluster_weights_(lg, local.ones.data(), n_rows, scale, &m) : 0.0;
      // den relative to e^m: the candidates plus the rest (relative to e^{rest_max})
      const double den = cand + (local.rest[g] > 0.0f ? static_cast<double>(local.rest[g]) *
                                                            std::exp(static_cast<double>(rest_max[g]) - m)
                                                      : 0.0);
      const double inv = den > 0.0 ? 1.0 / den : 0.0;
      for (int64_t j = 0; j < n_rows; ++j) mass[j] += static_cast<double>(lg[j]) * inv;
    }
    auto& ranked = local.ranked;
    ranked.resize(static_cast<std::size_t>(n_rows));
    for (int64_t j = 0; j < n_rows; ++j) ranked[j] = sort_key(static_cast<float>(mass[j]), rows[j]);
    const int64_t n_found = std::min(k, n_rows);
    select_smallest_keys(ranked, static_cast<std::size_t>(n_found), local.winners, local.boundary);
    if (sorted) std::sort(ranked.begin(), ranked.begin() + n_found);
    for (int64_t j = 0; j < n_found; ++j) {
      ids[j] = static_cast<int64_t>(ranked[j] & 0xffffffffu);
      probs[j] = key_score(ranked[j]);
    }
    for (int64_t j = n_found; j < k; ++j) {
      probs[j] = 0.0f;
      ids[j] = -1;
    }
    return n_scored;
  }

  // out[g * out_stride + r] = queries[g] . row r of n_blocks blocks of 8 transposed rows, queries
  // two at a time (one pass over the rows per pair).
  void score_blocks(const float* queries, int64_t group, const float* blocks, int64_t n_blocks, float* out,
                    int64_t out_stride) const {
    const auto dim = static_cast<std::size_t>(dim_);
    int64_t g = 0;
    for (; g + 2 <= group; g += 2)
      ip_blocks_pair_(queries + g * dim_, queries + (g + 1) * dim_, blocks, static_cast<std::size_t>(n_blocks), dim,
                      out + g * out_stride, out + (g + 1) * out_stride);
    if (g < group) ip_blocks_(queries + g * dim_, blocks, static_cast<std::size_t>(n_blocks), dim, out + g * out_stride);
  }

  // Adds n keys and clusters them (a last partial segment too, see the file comment).
  void build(const float* keys, int64_t n) {
    std::unique_lock<RwLock> lock(mutex_);
    append_keys(keys, n);
    cluster_tail(/*partial=*/true);
  }

 protected:
  void add_locked(const float* keys, int64_t n) override {
    append_keys(keys, n);
    cluster_tail(/*partial=*/false);
  }

  int64_t search_locked(const float* query, int64_t k, const SearchParams& params, float* scores,
                        int64_t* ids) const override {
    struct Scratch {
      std::vector<float> centroid_scores, row_scores, sample;
      std::vector<uint64_t> candidates;  // clusters above the sampled threshold, as sort keys
      std::vector<int64_t> picked;  // the best clusters, best first
      std::vector<uint64_t> found;  // every key scanned, as sort_key(score, id): the top k of them
                                    // is selected once at the end (a k-heap would pay log k per key)
    };
    Scratch& local = per_thread<Scratch, Scratch>();
    const int64_t n_clusters = static_cast<int64_t>(starts_.size()) - 1;
    auto& found = local.found;
    found.clear();
    int64_t n_scored = 0;
    if (size_ > clustered_) {  // the tail, exactly
      const int64_t n = size_ - clustered_;
      local.row_scores.resize(static_cast<std::size_t>(n));
      ip_rows_(query, key(clustered_), static_cast<std::size_t>(n), static_cast<std::size_t>(dim_),
               local.row_scores.data());
      for (int64_t j = 0; j < n; ++j) found.push_back(sort_key(local.row_scores[j], clustered_ + j));
      n_scored += n;
    }
    if (n_clusters > 0) {
      auto& cs = local.centroid_scores;
      const int64_t n_blocks = (n_clusters + 7) / 8;
      cs.resize(static_cast<std::size_t>(n_blocks * 8));
      ip_blocks_(query, blocks_.data(), static_cast<std::size_t>(n_blocks), static_cast<std::size_t>(dim_),
                 cs.data());
      n_scored += n_clusters;
      auto& picked = local.picked;
      clusters_to_scan(cs.data(), std::max(1.0, params.scan) * static_cast<double>(k), local.candidates, local.sample,
                       picked);
      for (std::size_t i = 0; i < picked.size(); ++i) {
        if (i + kPrefetchAhead < picked.size()) prefetch_cluster(picked[i + kPrefetchAhead]);
        const int64_t c = picked[i];
        const int64_t lo = starts_[c], len = starts_[c + 1] - starts_[c];
        const int64_t first_block = block_starts_[c], n_blocks = block_starts_[c + 1] - first_block;
        local.row_scores.resize(static_cast<std::size_t>(n_blocks * 8));
        ip_blocks_(query, packed_.data() + first_block * 8 * dim_, static_cast<std::size_t>(n_blocks),
                   static_cast<std::size_t>(dim_), local.row_scores.data());
        for (int64_t j = 0; j < len; ++j) found.push_back(sort_key(local.row_scores[j], members_[lo + j]));
        n_scored += len;
      }
    }
    // Ascending keys = descending scores, ties by ascending id: plain integer selection and sort.
    const int64_t n_found = std::min<int64_t>(k, static_cast<int64_t>(found.size()));
    if (n_found < static_cast<int64_t>(found.size()))
      std::nth_element(found.begin(), found.begin() + n_found, found.end());
    std::sort(found.begin(), found.begin() + n_found);
    for (int64_t j = 0; j < n_found; ++j) {
      ids[j] = static_cast<int64_t>(found[j] & 0xffffffffu);
      scores[j] = key_score(found[j]);
    }
    for (int64_t j = n_found; j < k; ++j) {
      scores[j] = -std::numeric_limits<float>::infinity();
      ids[j] = -1;
    }
    return n_scored;
  }

  int64_t extra_memory_bytes_locked() const override {
    return static_cast<int64_t>((centroids_.capacity() + blocks_.capacity()) * sizeof(float) +
                                (starts_.capacity() + block_starts_.capacity()) * sizeof(int64_t) +
                                sizes_.capacity() * sizeof(float) +
                                members_.capacity() * sizeof(uint32_t) + packed_.capacity() * sizeof(float));
  }

 private:
  // 64-bit key ordering (score descending, id ascending) as unsigned integers: the upper half is
  // the score's bits mapped to an order-preserving unsigned value, inverted; the lower half the id
  // (ids fit in 32 bits: the glue caps the index below 2^32 keys).
  static uint64_t sort_key(float score, int64_t id) {
    uint32_t bits;
    std::memcpy(&bits, &score, sizeof bits);
    const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending in score
    return (static_cast<uint64_t>(~ordered) << 32) | static_cast<uint32_t>(id);
  }

  // Chosen clusters sit at random places in packed_, and a cluster's few blocks are scored faster
  // than they arrive from memory (perf: the block kernel waited on its loads), so each scan asks
  // for the blocks (up to 1 KiB; the hardware prefetcher follows longer runs) and the member ids of
  // the cluster kPrefetchAhead places further on.
  static constexpr std::size_t kPrefetchAhead = 4;
  void prefetch_cluster(int64_t c) const {
    const char* p = reinterpret_cast<const char*>(packed_.data() + block_starts_[c] * 8 * dim_);
    const char* end = reinterpret_cast<const char*>(packed_.data() + block_starts_[c + 1] * 8 * dim_);
    for (int line = 0; line < 16 && p < end; ++line, p += 64) __builtin_prefetch(p);
    __builtin_prefetch(members_.data() + starts_[c]);
  }

  // Moves the `count` smallest of `keys` (sort_keys) to its front, in no order (the rest of `keys`
  // is left unspecified). A histogram of the keys' top 11 bits (the score's sign, exponent and two
  // mantissa bits: log-spaced buckets, which suit the exponentially skewed probabilities of a group
  // ranking, where linear buckets put nearly everything in one) finds the bucket of the count-th
  // key; only that bucket goes through nth_element (over all keys: ~12% of a 1M-key group search).
  static void select_smallest_keys(std::vector<uint64_t>& keys, std::size_t count, std::vector<uint64_t>& winners,
                                   std::vector<uint64_t>& boundary) {
    const std::size_t n = keys.size();
    if (count >= n) return;
    constexpr int kBits = 11;
    uint32_t hist[1 << kBits] = {};
    for (const uint64_t x : keys) ++hist[x >> (64 - kBits)];
    uint64_t edge = 0;
    std::size_t below = 0;  // keys in buckets before the edge bucket
    while (below + hist[edge] < count) below += hist[edge++];
    winners.resize(n);
    boundary.resize(n);
    std::size_t w = 0, t = 0;
    for (const uint64_t x : keys) {  // branch-free
      const uint64_t b = x >> (64 - kBits);
      winners[w] = x;
      boundary[t] = x;
      w += b < edge;
      t += b == edge;
    }
    std::nth_element(boundary.begin(), boundary.begin() + static_cast<std::ptrdiff_t>(count - below),
                     boundary.begin() + static_cast<std::ptrdiff_t>(t));
    std::copy(winners.begin(), winners.begin() + static_cast<std::ptrdiff_t>(w), keys.begin());
    std::copy(boundary.begin(), boundary.begin() + static_cast<std::ptrdiff_t>(count - below),
              keys.begin() + static_cast<std::ptrdiff_t>(w));
  }

  // The clusters a search scans, best centroid score first, until they hold `want` keys (the last
  // one may overshoot), into `out`. The best p are selected, p sized for `want` keys with a
  // margin, and doubled in the rare case their keys fall short.
  void clusters_to_scan(const float* scores, double want, std::vector<uint64_t>& candidates, std::vector<float>& sample,
                        std::vector<int64_t>& out) const {
    const int64_t n_clusters = static_cast<int64_t>(starts_.size()) - 1;
    const double mean_size = static_cast<double>(clustered_) / static_cast<double>(n_clusters);
    int64_t p = want >= static_cast<double>(clustered_)
                    ? n_clusters
                    : std::min<int64_t>(n_clusters, static_cast<int64_t>(2.0 * want / mean_size) + 8);
    for (;;) {
      best_clusters(scores, n_clusters, p, candidates, sample, out);  // best first
      int64_t total = 0;
      for (int64_t c : out) total += starts_[c + 1] - starts_[c];
      if (total >= want || p >= n_clusters) break;
      p = std::min(n_clusters, 2 * p);
    }
    std::size_t taken = 0;
    for (double scanned = 0.0; taken < out.size() && scanned < want; ++taken)
      scanned += static_cast<double>(starts_[out[taken] + 1] - starts_[out[taken]]);
    out.resize(taken);
  }

  // The p best of n scores (ids, best first; ties by ascending id). A heap over every cluster
  // paid log p per entry and dominated large-k searches; instead a threshold from a strided
  // sample of 1024 scores keeps about 2p candidates in one branch-light pass, and only those are
  // selected and sorted. When the sample was unlucky (fewer than p pass), every score competes.
  static void best_clusters(const float* scores, int64_t n, int64_t p, std::vector<uint64_t>& candidates,
                            std::vector<float>& sample, std::vector<int64_t>& out) {
    p = std::min(p, n);
    float threshold = -std::numeric_limits<float>::infinity();
    constexpr int64_t kSample = 1024;
    if (n >= 4 * kSample && 4 * p <= n) {
      const int64_t stride = n / kSample;
      sample.resize(kSample);
      for (int64_t i = 0; i < kSample; ++i) sample[i] = scores[i * stride];
      // sample rank of the score that about 2p of the n scores reach, plus a margin
      const int64_t rank = std::min<int64_t>(kSample - 1, (2 * p * kSample + n - 1) / n + 16);
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
      threshold = sample[rank];
    }
    candidates.clear();
    static const CollectFn collect = collect_for_cpu();
    collect(scores, n, threshold, candidates);
    if (static_cast<int64_t>(candidates.size()) < p) {
      candidates.clear();
      for (int64_t c = 0; c < n; ++c) candidates.push_back(sort_key(scores[c], c));
    }
    if (p < static_cast<int64_t>(candidates.size()))
      std::nth_element(candidates.begin(), candidates.begin() + p, candidates.end());
    std::sort(candidates.begin(), candidates.begin() + p);
    out.resize(static_cast<std::size_t>(p));
    for (int64_t j = 0; j < p; ++j) out[j] = static_cast<int64_t>(candidates[j] & 0xffffffffu);
  }

  // Appends sort_key(scores[c], c) for every c with scores[c] >= threshold (a few percent pass:
  // the AVX2 version compares 8 at once and visits only the set bits).
  using CollectFn = void (*)(const float*, int64_t, float, std::vector<uint64_t>&);
  static void collect_portable(const float* scores, int64_t n, float threshold, std::vector<uint64_t>& out) {
    for (int64_t c = 0; c < n; ++c)
      if (scores[c] >= threshold) out.push_back(sort_key(scores[c], c));
  }
#ifdef LCKV_HAVE_AVX2_DISPATCH
  __attribute__((target("avx2"))) static void collect_avx2(const float* scores, int64_t n, float threshold,
                                                          std::vector<uint64_t>& out) {
    const __m256 t = _mm256_set1_ps(threshold);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      auto mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + c), t, _CMP_GE_OQ)));
      while (mask != 0) {
        const int64_t j = c + __builtin_ctz(mask);
        out.push_back(sort_key(scores[j], j));
        mask &= mask - 1;
      }
    }
    for (; c < n; ++c)
      if (scores[c] >= threshold) out.push_back(sort_key(scores[c], c));
  }
#endif
  static CollectFn collect_for_cpu() {
#ifdef LCKV_HAVE_AVX2_DISPATCH
    if (__builtin_cpu_supports("avx2")) return collect_avx2;
#endif
    return collect_portable;
  }

  // The score back from a sort_key (exact: the mapping is a bijection).
  static float key_score(uint64_t key) {
    const uint32_t ordered = ~static_cast<uint32_t>(key >> 32);
    const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
    float score;
    std::memcpy(&score, &bits, sizeof score);
    return score;
  }

  // One clustered segment, before it is appended to the global arrays.
  struct Segment {
    std::vector<float> centroids;   // [c, dim]
    std::vector<int64_t> sizes;     // [c] keys per cluster (no empty clusters)
    std::vector<uint32_t> members;  // key ids, grouped by cluster
  };

  // Clusters full segments of the tail (and with `partial` a last one of >= 4 * cluster_size keys).
  void cluster_tail(bool partial) {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    int64_t lo = clustered_;
    while (size_ - lo >= params_.segment) {
      ranges.emplace_back(lo, lo + params_.segment);
      lo += params_.segment;
    }
    if (partial && size_ - lo >= 4 * params_.cluster_size) {
      ranges.emplace_back(lo, size_);
      lo = size_;
    }
    if (ranges.empty()) return;
    std::vector<Segment> segments(ranges.size());
    const int64_t n_ranges = static_cast<int64_t>(ranges.size());
#pragma omp parallel for schedule(dynamic, 1) if (n_ranges > 1)
    for (int64_t r = 0; r < n_ranges; ++r) segments[r] = cluster_range(ranges[r].first, ranges[r].second);
    if (starts_.empty()) starts_.push_back(0);
    if (block_starts_.empty()) block_starts_.push_back(0);
    std::size_t n_new = 0, c_new = 0, rows_new = 0;
    for (const Segment& seg : segments) {
      n_new += seg.members.size();
      c_new += seg.sizes.size();
      for (int64_t size : seg.sizes) rows_new += static_cast<std::size_t>((size + 7) / 8 * 8);
    }
    const auto d = static_cast<std::size_t>(dim_);
    reserve_more(centroids_, c_new * d);
    reserve_more(blocks_, (c_new + 8) * d);
    reserve_more(packed_, rows_new * d);
    reserve_more(members_, n_new);
    reserve_more(sizes_, c_new);
    reserve_more(starts_, c_new);
    reserve_more(block_starts_, c_new);
    for (const Segment& seg : segments) {
      int64_t m = 0;  // position in seg.members
      for (std::size_t c = 0; c < seg.sizes.size(); ++c) {
        const int64_t size = seg.sizes[c];
        put_blocked_row(blocks_, static_cast<int64_t>(starts_.size()) - 1, seg.centroids.data() + c * dim_);
        centroids_.insert(centroids_.end(), seg.centroids.begin() + c * dim_, seg.centroids.begin() + (c + 1) * dim_);
        starts_.push_back(starts_.back() + size);
        sizes_.push_back(static_cast<float>(size));
        // the cluster's keys in whole blocks of their own, so a cluster scan starts on a block
        const int64_t first_block = block_starts_.back();
        block_starts_.push_back(first_block + (size + 7) / 8);
        for (int64_t j = 0; j < size; ++j, ++m) {
          members_.push_back(seg.members[m]);
          put_blocked_row(packed_, first_block * 8 + j, key(seg.members[m]));
        }
      }
    }
    clustered_ = lo;
    // clustered keys live on in packed_ (searches read only packed_ and the tail): keep one copy
    drop_keys_before(clustered_);
  }

  // Room for `extra` more elements, with 1/8 slack (a doubling vector would hold up to twice the
  // index while decode-time segments arrive).
  template <typename T>
  static void reserve_more(std::vector<T>& v, std::size_t extra) {
    const std::size_t need = v.size() + extra;
    if (need > v.capacity()) v.reserve(need + need / 8);
  }

  // Writes x as row `row` of a blocks-of-8 transposed layout ([block][dim][8] floats, as
  // inner_product_blocks reads it), growing it with zero rows as needed.
  void put_blocked_row(std::vector<float>& blocks, int64_t row, const float* x) const {
    const std::size_t need = static_cast<std::size_t>((row / 8 + 1) * 8 * dim_);
    if (blocks.size() < need) blocks.resize(need, 0.0f);
    float* block = blocks.data() + (row / 8) * 8 * dim_;
    for (int64_t d = 0; d < dim_; ++d) block[d * 8 + row % 8] = x[d];
  }

  // k-means of keys [lo, hi) into about (hi - lo) / cluster_size clusters.
  Segment cluster_range(int64_t lo, int64_t hi) const {
    const int64_t n = hi - lo;
    const int64_t c_count = std::max<int64_t>(
        1, std::min<int64_t>(n, (n + params_.cluster_size / 2) / params_.cluster_size));
    std::vector<float> cent(static_cast<std::size_t>(c_count * dim_));
    for (int64_t c = 0; c < c_count; ++c) {  // evenly spaced keys: topics are contiguous in position
      const int64_t id = lo + (2 * c + 1) * n / (2 * c_count);
      std::copy(key(id), key(id) + dim_, cent.begin() + c * dim_);
    }
    std::vector<float> half_norms(static_cast<std::size_t>(c_count));
    std::vector<float> row(static_cast<std::size_t>(c_count));
    std::vector<int64_t> assign(static_cast<std::size_t>(n));
    std::vector<double> sums(static_cast<std::size_t>(c_count * dim_));
    std::vector<int64_t> counts(static_cast<std::size_t>(c_count));
    for (int64_t it = 0;; ++it) {
      for (int64_t c = 0; c < c_count; ++c) {
        const float* cv = cent.data() + c * dim_;
        half_norms[c] = 0.5f * ip_(cv, cv, static_cast<std::size_t>(dim_));
      }
      // nearest centroid in L2: argmax_c (x . c - |c|^2 / 2)
      for (int64_t i = 0; i < n; ++i) {
        ip_rows_(key(lo + i), cent.data(), static_cast<std::size_t>(c_count), static_cast<std::size_t>(dim_),
                 row.data());
        assign[i] = nearest_from_scores(row.data(), half_norms.data(), c_count);
      }
      std::fill(counts.begin(), counts.end(), 0);
      if (it == params_.n_iters) break;
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const float* x = key(lo + i);
        double* s = sums.data() + assign[i] * dim_;
        for (int64_t d = 0; d < dim_; ++d) s[d] += x[d];
        ++counts[assign[i]];
      }
      for (int64_t c = 0; c < c_count; ++c)  // an empty cluster keeps its centroid
        if (counts[c] > 0)
          for (int64_t d = 0; d < dim_; ++d)
            cent[c * dim_ + d] = static_cast<float>(sums[c * dim_ + d] / static_cast<double>(counts[c]));
    }
    for (int64_t i = 0; i < n; ++i) ++counts[assign[i]];
    // Keep the non-empty clusters; group members by cluster (counting sort, ids ascending).
    Segment seg;
    std::vector<int64_t> remap(static_cast<std::size_t>(c_count), -1), offset;
    for (int64_t c = 0; c < c_count; ++c) {
      if (counts[c] == 0) continue;
      remap[c] = static_cast<int64_t>(seg.sizes.size());
      offset.push_back(seg.sizes.empty() ? 0 : offset.back() + seg.sizes.back());
      seg.sizes.push_back(counts[c]);
      seg.centroids.insert(seg.centroids.end(), cent.begin() + c * dim_, cent.begin() + (c + 1) * dim_);
    }
    seg.members.resize(static_cast<std::size_t>(n));
    for (int64_t i = 0; i < n; ++i) seg.members[offset[remap[assign[i]]]++] = static_cast<uint32_t>(lo + i);
    return seg;
  }

  const ClusterBuildParams params_;      // build knobs
  const InnerProductRowsFn ip_rows_;     // inner products with contiguous rows
  const InnerProductBlocksFn ip_blocks_; // inner products with blocks of 8 transposed rows
  const InnerProductBlocksPairFn ip_blocks_pair_;  // the same for two queries in one pass
  const ClusterWeightsFn cluster_weights_;  // exp of scaled centroid scores (search_group)
  int64_t clustered_ = 0;                // keys [0, clustered_) are in clusters
  std::vector<float> centroids_;         // [n_clusters, dim]
  std::vector<float> blocks_;            // the centroids as [ceil(n_clusters / 8)][dim][8] (zero
                                         // padding rows, whose scores are never read)
  std::vector<int64_t> starts_;          // [n_clusters + 1] offsets into members_ / packed_
  std::vector<float> sizes_;             // [n_clusters] keys per cluster
  std::vector<uint32_t> members_;        // key ids grouped by cluster
  std::vector<int64_t> block_starts_;    // [n_clusters + 1] offsets into packed_, in 8-row blocks
  std::vector<float> packed_;            // each cluster's keys (members_ order) as blocks of 8
                                         // transposed rows, [dim][8] floats, zero-padded
};

}  // namespace lckv
