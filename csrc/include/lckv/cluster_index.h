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
#include <iterator>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "lckv/exp_weights.h"  // cluster_weights_for_cpu
#include "lckv/kmeans.h"
#include "lckv/select_top.h"  // sort_key, select_smallest_keys
#include "lckv/vector_index.h"

namespace lckv {

struct ClusterBuildParams {
  int64_t cluster_size = 16;  // mean keys per cluster
  int64_t segment = 8192;     // keys clustered together (the last, partial one waits in the tail)
  int64_t n_iters = 6;        // Lloyd iterations per segment (and per span of super-clusters)
  int64_t super_size = 64;    // mean clusters per super-cluster (0: no super-clusters)
  int64_t super_span = 4096;  // consecutive clusters grouped into super-clusters together (a
                              // multiple of 8; clusters of a last partial span stay loose)
};

// Calls visit(name, value) for each setting of p, in declaration order (bindings, logs).
template <typename Visit>
void visit_settings(const ClusterBuildParams& p, Visit&& visit) {
  visit("cluster_size", p.cluster_size);
  visit("segment", p.segment);
  visit("n_iters", p.n_iters);
  visit("super_size", p.super_size);
  visit("super_span", p.super_span);
}

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
    if (params.super_size < 0) throw std::invalid_argument("super_size must be >= 0 (0: no super-clusters)");
    if (params.super_size > 0 && (params.super_span < params.super_size || params.super_span % 8 != 0))
      throw std::invalid_argument("super_span must be a multiple of 8 and >= super_size");
  }

  const ClusterBuildParams& build_params() const { return params_; }

  int64_t n_clusters() const {
    std::shared_lock<RwLock> lock(mutex_);
    return clusters_locked();
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

  int64_t n_supers() const {
    std::shared_lock<RwLock> lock(mutex_);
    return static_cast<int64_t>(sup_radius_.size());
  }

  // Super-cluster means [n_supers, dim] and radii [n_supers] (rounded up by ~1e-5 relative, so
  // that q . mean + |q| * radius bounds every member centroid's float score).
  std::vector<float> super_means() const {
    std::shared_lock<RwLock> lock(mutex_);
    return sup_means_;
  }
  std::vector<float> super_radii() const {
    std::shared_lock<RwLock> lock(mutex_);
    return sup_radius_;
  }

  // Super-cluster of every cluster (-1 for the loose clusters of a partial span), [n_clusters].
  std::vector<int64_t> super_assignments() const {
    std::shared_lock<RwLock> lock(mutex_);
    std::vector<int64_t> out(starts_.empty() ? 0 : starts_.size() - 1, -1);
    for (std::size_t s = 0; s + 1 < sup_starts_.size(); ++s)
      for (int64_t j = sup_starts_[s]; j < sup_starts_[s + 1]; ++j) out[sup_members_[j]] = static_cast<int64_t>(s);
    return out;
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
    GroupScratch& local = per_thread<GroupScratch, GroupScratch>();
    const int64_t n_clusters = clusters_locked();
    const auto dim = static_cast<std::size_t>(dim_);
    int64_t n_scored = 0;
    // 1-2. the clusters the group scans (`chosen`) and each head's mass of the other clusters
    auto& chosen = local.chosen;
    chosen.clear();
    auto& rest_max = local.rest_max;
    local.rest.assign(static_cast<std::size_t>(group), 0.0f);  // per head: the rest's mass, times e^{-m_g}
    rest_max.assign(static_cast<std::size_t>(group), 0.0f);
    if (n_clusters > 0) {
      const double want = std::max(1.0, params.scan) * static_cast<double>(k);
      n_scored += sup_radius_.empty() ? choose_clusters(queries, group, want, scale, local)
                                      : choose_clusters_by_supers(queries, group, want, params.expand, scale, local);
    }
    // 1b. the candidates: the tail, then the chosen clusters' keys, scored for every head
    const int64_t n_tail = size_ - clustered_;
    int64_t n_rows = n_tail;
    for (int64_t c : chosen) n_rows += starts_[c + 1] - starts_[c];
    auto& rows = local.rows;
    // [group, ld] scores, ld = n_rows + 8: a cluster's blocks are scored straight into the rows, and
    // the padding of its last block (< 8 rows) lands where the next cluster (or the slack) goes
    auto& logits = local.logits;
    const int64_t ld = n_rows + 8;
    rows.resize(static_cast<std::size_t>(n_rows));
    logits.resize(static_cast<std::size_t>(group * ld));
    for (int64_t j = 0; j < n_tail; ++j) rows[j] = static_cast<uint32_t>(clustered_ + j);
    for (int64_t g = 0; g < group && n_tail > 0; ++g)
      ip_rows_(queries + g * dim_, key(clustered_), static_cast<std::size_t>(n_tail), dim, logits.data() + g * ld);
    int64_t at = n_tail;
    for (std::size_t i = 0; i < chosen.size(); ++i) {
      if (i + kPrefetchAhead < chosen.size()) prefetch_cluster(chosen[i + kPrefetchAhead]);
      const int64_t c = chosen[i];
      const int64_t lo = starts_[c], len = starts_[c + 1] - lo;
      const int64_t first_block = block_starts_[c], blocks = block_starts_[c + 1] - first_block;
      std::copy(members_.begin() + lo, members_.begin() + lo + len, rows.begin() + at);
      score_blocks(queries, group, packed_.data() + first_block * 8 * dim_, blocks, logits.data() + at, ld);
      at += len;
    }
    n_scored += group * n_rows;
    // 2-3. normalise each head over candidates + rest, sum the probabilities over the group
    auto& mass = local.mass;
    mass.assign(static_cast<std::size_t>(n_rows), 0.0);
    local.ones.resize(static_cast<std::size_t>(n_rows), 1.0f);
    for (int64_t g = 0; g < group; ++g) {
      float* lg = logits.data() + g * ld;
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
    lckv::score_blocks(ip_blocks_, ip_blocks_pair_, queries, group, dim_, blocks, n_blocks, out, out_stride);
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
    SearchScratch& local = per_thread<SearchScratch, SearchScratch>();
    const int64_t n_clusters = clusters_locked();
    const int64_t n_tail = size_ - clustered_;
    int64_t n_scored = n_tail;
    if (n_tail > 0) {  // the tail, exactly
      local.row_scores.resize(static_cast<std::size_t>(n_tail));
      ip_rows_(query, key(clustered_), static_cast<std::size_t>(n_tail), static_cast<std::size_t>(dim_),
               local.row_scores.data());
    }
    start_found(local.row_scores.data(), n_tail, k, local);
    local.picked.clear();
    if (n_clusters > 0) {
      const double want = std::max(1.0, params.scan) * static_cast<double>(k);
      if (!sup_radius_.empty() && params.probe_supers > 0) {  // approximate: the best supers' clusters
        n_scored += choose_clusters_probed(query, nullptr, nullptr, want, params.probe_supers, local);
      } else if (!sup_radius_.empty()) {  // the same clusters, from the super-clusters that can hold them
        GroupScratch& group_local = per_thread<GroupScratch, GroupScratch>();
        n_scored += choose_clusters_by_supers(query, 1, want, params.expand, 1.0f, group_local, false);
        for (int64_t i : group_local.head_picked[0]) local.picked.push_back(cluster_at(group_local, i));
      } else {
        auto& cs = local.centroid_scores;
        const int64_t n_blocks = (n_clusters + 7) / 8;
        cs.resize(static_cast<std::size_t>(n_blocks * 8));
        ip_blocks_(query, blocks_.data(), static_cast<std::size_t>(n_blocks), static_cast<std::size_t>(dim_),
                   cs.data());
        n_scored += n_clusters;
        clusters_to_scan(cs.data(), sizes_.data(), n_clusters, static_cast<double>(clustered_), want, local.candidates,
                         local.sample, local.picked);
      }
    }
    return n_scored + finish_search(query, k, local, scores, ids);
  }

 public:
  // Inner products out[i * n + j] = a[i] . b[j] of row-major a [m, dim] and b [n, dim]: a matrix
  // product (BLAS) that the bindings register (this header stays free of BLAS and torch).
  using MatmulFn = void (*)(const float* a, int64_t m, const float* b, int64_t n, int64_t dim, float* out);
  static MatmulFn& matmul_hook() {
    static MatmulFn hook = nullptr;
    return hook;
  }
  // Below this many queries search_batch searches query by query.
  static constexpr int64_t kMatmulMinQueries = 16;

  bool batches_searches(int64_t m) const override { return m >= kMatmulMinQueries && matmul_hook() != nullptr; }

  // search() for m queries. From kMatmulMinQueries queries on (with a matmul registered), each
  // block of queries gets its inner products with every centroid and every tail key from one matrix
  // product, which reads those rows once per block instead of once per query; each query then
  // picks its clusters and scans them as search() does. The clusters are those search() scans
  // (through the super-clusters it reaches the same ones, up to ties), so the results are search()'s
  // up to the rounding of the products. n_scored counts every centroid. With probe_supers (and
  // super-clusters) the products are with the super means and the loose centroids instead, and each
  // query opens its best supers as search() does then: O(n_supers) per query, not O(n_clusters).
  void search_batch(const float* queries, int64_t m, int64_t k, const SearchParams& params, float* scores,
                    int64_t* ids, int64_t* n_scored) const override {
    if (!batches_searches(m)) {
      VectorIndex::search_batch(queries, m, k, params, scores, ids, n_scored);
      return;
    }
    std::shared_lock<RwLock> lock(mutex_);
    const int64_t n_clusters = clusters_locked();
    const int64_t n_tail = size_ - clustered_;
    const double want = std::max(1.0, params.scan) * static_cast<double>(k);
    // Blocks of queries, each done by one thread start to end (its own matrix products, run
    // serially inside the parallel region, then its queries): no barrier between the products and
    // the scans. At most about 16 MB of products per block, at least 4 blocks per thread.
    int64_t threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    const bool probed = params.probe_supers > 0 && !sup_radius_.empty();
    const int64_t n_sup = probed ? static_cast<int64_t>(sup_radius_.size()) : 0;
    const int64_t n_cent = probed ? n_clusters - spanned_ : n_clusters;  // centroids in the products
    const float* cent = centroids_.data() + (probed ? spanned_ : 0) * dim_;
    const int64_t cap = std::max<int64_t>((int64_t{1} << 22) / std::max<int64_t>(n_sup + n_cent + n_tail, 1), 16);
    const int64_t block = std::clamp<int64_t>((m + 4 * threads - 1) / (4 * threads), 16, cap);
    const int64_t n_blocks = (m + block - 1) / block;
#pragma omp parallel
    {
      SearchScratch& local = per_thread<SearchScratch, SearchScratch>();
      std::vector<float> centroid_scores, tail_scores, super_scores;  // a block's products, freed with the call
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < n_blocks; ++blk) {
        const int64_t q0 = blk * block, b = std::min(block, m - q0);
        centroid_scores.resize(static_cast<std::size_t>(b * n_cent));
        tail_scores.resize(static_cast<std::size_t>(b * n_tail));
        super_scores.resize(static_cast<std::size_t>(b * n_sup));
        const float* q_block = queries + q0 * dim_;
        if (n_sup > 0) matmul_hook()(q_block, b, sup_means_.data(), n_sup, dim_, super_scores.data());
        if (n_cent > 0) matmul_hook()(q_block, b, cent, n_cent, dim_, centroid_scores.data());
        if (n_tail > 0) matmul_hook()(q_block, b, key(clustered_), n_tail, dim_, tail_scores.data());
        for (int64_t i = 0; i < b; ++i) {
          const int64_t q = q0 + i;
          const float* query = queries + q * dim_;
          start_found(tail_scores.data() + i * n_tail, n_tail, k, local);
          int64_t n = n_tail;
          if (probed) {
            n += choose_clusters_probed(query, super_scores.data() + i * n_sup, centroid_scores.data() + i * n_cent,
                                        want, params.probe_supers, local);
          } else {
            clusters_to_scan(centroid_scores.data() + i * n_clusters, sizes_.data(), n_clusters,
                             static_cast<double>(clustered_), want, local.candidates, local.sample, local.picked);
            n += n_clusters;
          }
          n_scored[q] = n + finish_search(query, k, local, scores + q * k, ids + q * k);
        }
      }
    }
  }

 protected:
  int64_t extra_memory_bytes_locked() const override {
    return static_cast<int64_t>((centroids_.capacity() + blocks_.capacity()) * sizeof(float) +
                                (starts_.capacity() + block_starts_.capacity()) * sizeof(int64_t) +
                                sizes_.capacity() * sizeof(float) +
                                members_.capacity() * sizeof(uint32_t) + packed_.capacity() * sizeof(float) +
                                (sup_mean_blocks_.capacity() + sup_means_.capacity() + sup_radius_.capacity() +
                                 sup_keys_.capacity() + sup_blocks_.capacity() + sup_member_sizes_.capacity()) *
                                    sizeof(float) +
                                (sup_starts_.capacity() + sup_members_.capacity() + sup_block_starts_.capacity()) *
                                    sizeof(int64_t));
  }

 private:
  // Clusters built so far; starts_ is empty until the first clustering (0 then, not -1).
  int64_t clusters_locked() const { return starts_.empty() ? 0 : static_cast<int64_t>(starts_.size()) - 1; }

  // Per-thread scratch of search() and search_batch().
  struct SearchScratch {
    std::vector<float> centroid_scores, row_scores, sample;
    std::vector<float> super_scores, pos_scores, pos_sizes;  // choose_clusters_probed
    std::vector<int64_t> opened, positions, pos_ids;
    std::vector<uint64_t> candidates;  // clusters above the sampled threshold, as sort keys
    std::vector<int64_t> picked;       // the clusters to scan, best first
    std::vector<uint64_t> found;       // every key scanned, as sort_key(score, id): the top k of them
                                       // is selected once at the end (a k-heap would pay log k per key)
  };

  // A search's candidates start as the tail's keys with their scores [n_tail]: all of them, or
  // for a small k only the tail's own top k (nothing else of the tail can make the result), kept
  // in a max-heap of sort keys that most keys only compare with.
  void start_found(const float* tail_scores, int64_t n_tail, int64_t k, SearchScratch& local) const {
    auto& found = local.found;
    found.clear();
    if (16 * k >= n_tail) {
      for (int64_t j = 0; j < n_tail; ++j) found.push_back(sort_key(tail_scores[j], clustered_ + j));
      return;
    }
    for (int64_t j = 0; j < n_tail; ++j) {
      const uint64_t key = sort_key(tail_scores[j], clustered_ + j);
      if (static_cast<int64_t>(found.size()) < k) {
        found.push_back(key);
        std::push_heap(found.begin(), found.end());
      } else if (key < found.front()) {
        std::pop_heap(found.begin(), found.end());
        found.back() = key;
        std::push_heap(found.begin(), found.end());
      }
    }
  }

  // The clusters an approximate search scans (probe_supers > 0, super-clusters built), into
  // local.picked, best first. The query's supers are ranked by the score of their mean q . u_s, the
  // best `probe` opened (more, best first, while the opened supers and the loose clusters hold
  // fewer than 2 * want keys), and the clusters to scan picked by score among their members and
  // the loose clusters, as clusters_to_scan does. (On stories260K's keys at 1M tokens the mean
  // score put more of a query's true top keys in the opened supers than the bound q . u_s + |q| r_s
  // did, at every probe from 1 to 64: 0.85 vs 0.79 at 32 in layer 0.) sup_scores
  // [n_supers] and loose_scores [n_clusters - spanned_] are the query's scores of the super means
  // and of the loose centroids when the caller has them (search_batch's products), else null.
  // Returns the inner products it counts: supers, loose and opened centroids.
  int64_t choose_clusters_probed(const float* query, const float* sup_scores, const float* loose_scores, double want,
                                 int64_t probe, SearchScratch& local) const {
    const int64_t n_clusters = clusters_locked();
    const auto n_sup = static_cast<int64_t>(sup_radius_.size());
    const int64_t n_loose = n_clusters - spanned_;  // spanned_ is a multiple of 8: whole blocks
    const auto dim = static_cast<std::size_t>(dim_);
    if (sup_scores == nullptr) {
      local.super_scores.resize(static_cast<std::size_t>((n_sup + 7) / 8 * 8));
      ip_blocks_(query, sup_mean_blocks_.data(), static_cast<std::size_t>((n_sup + 7) / 8), dim,
                 local.super_scores.data());
      sup_scores = local.super_scores.data();
    }
    const auto loose_keys = static_cast<double>(starts_[n_clusters] - starts_[spanned_]);  // member offsets
    // the supers to open: the best `open` by mean score, doubled while they hold too few keys
    auto& opened = local.opened;
    int64_t open = std::min(probe, n_sup);
    double held = 0.0;
    for (;;) {
      best_clusters(sup_scores, n_sup, open, local.candidates, local.sample, opened);
      held = loose_keys;
      for (int64_t j : opened) held += sup_keys_[j];
      if (held >= 2.0 * want || open >= n_sup) break;
      open = std::min(n_sup, 2 * open);
    }
    // positions: the loose clusters, then each opened super's members (+ 8: a run's block padding
    // lands past its last position, where the next run overwrites it)
    int64_t n_pos = n_loose;
    for (int64_t j : opened) n_pos += sup_starts_[j + 1] - sup_starts_[j];
    auto& cs = local.pos_scores;
    auto& sizes = local.pos_sizes;
    auto& ids = local.pos_ids;
    cs.resize(static_cast<std::size_t>(n_pos + 8));
    sizes.resize(static_cast<std::size_t>(n_pos));
    ids.resize(static_cast<std::size_t>(n_pos));
    if (n_loose > 0) {
      if (loose_scores != nullptr) {
        std::copy(loose_scores, loose_scores + n_loose, cs.begin());
      } else {
        ip_blocks_(query, blocks_.data() + spanned_ * dim_, static_cast<std::size_t>((n_loose + 7) / 8), dim,
                   cs.data());
      }
      std::copy(sizes_.begin() + spanned_, sizes_.end(), sizes.begin());
      std::iota(ids.begin(), ids.begin() + n_loose, spanned_);
    }
    int64_t at = n_loose;
    for (int64_t j : opened) {
      const int64_t first_block = sup_block_starts_[j], len = sup_starts_[j + 1] - sup_starts_[j];
      ip_blocks_(query, sup_blocks_.data() + first_block * 8 * dim_,
                 static_cast<std::size_t>(sup_block_starts_[j + 1] - first_block), dim, cs.data() + at);
      std::copy(sup_member_sizes_.begin() + sup_starts_[j], sup_member_sizes_.begin() + sup_starts_[j + 1],
                sizes.begin() + at);
      std::copy(sup_members_.begin() + sup_starts_[j], sup_members_.begin() + sup_starts_[j + 1], ids.begin() + at);
      at += len;
    }
    clusters_to_scan(cs.data(), sizes.data(), n_pos, held, want, local.candidates, local.sample, local.positions);
    local.picked.clear();
    for (int64_t i : local.positions) local.picked.push_back(ids[i]);
    return n_sup + n_pos;
  }

  // The end of a search: scores the keys of the clusters local.picked for `query`, adds them to
  // local.found and writes its top k (padded with -inf / -1). Returns the keys scored.
  int64_t finish_search(const float* query, int64_t k, SearchScratch& local, float* scores, int64_t* ids) const {
    auto& found = local.found;
    const auto& picked = local.picked;
    int64_t n_scored = 0;
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
    // Ascending keys = descending scores, ties by ascending id: plain integer selection and sort.
    const int64_t n_found = std::min<int64_t>(k, static_cast<int64_t>(found.size()));
    sort_smallest_keys(found, static_cast<std::size_t>(n_found));
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

  // Per-thread scratch of search_group.
  struct GroupScratch {
    std::vector<float> centroid_scores, row_scores, sample, logits, rest, rest_max, ones;
    std::vector<float> super_scores, bounds, sizes, last_scores;  // super-cluster path
    std::vector<double> mass;
    std::vector<uint64_t> candidates, ranked, winners, boundary;
    std::vector<int64_t> picked, chosen, chosen_at, loose;
    std::vector<std::pair<int64_t, const int64_t*>> runs;  // super path: (first position, cluster ids) per run
    std::vector<std::vector<int64_t>> head_picked;
    std::vector<uint8_t> taken, expanded;
    std::vector<uint32_t> rows;
  };

  // Each head's mass of what the group did not choose (local.rest, relative to e^{local.rest_max}):
  // head g's row of scores rows[g * stride + i] (i < n, sizes[i] keys each) becomes weights, and
  // the chosen positions' weights are taken off their sum.
  void rest_of_heads(float* rows, int64_t stride, const float* sizes, int64_t n, const std::vector<int64_t>& chosen,
                     int64_t group, float scale, GroupScratch& local) const {
    for (int64_t g = 0; g < group; ++g) {
      float* w = rows + g * stride;
      float m = 0.0f;
      double rest = cluster_weights_(w, sizes, n, scale, &m);
      for (int64_t i : chosen) rest -= static_cast<double>(w[i]) * sizes[i];
      // the subtraction rounds at 1e-7 of the total, which the candidates' exact mass dominates
      local.rest[g] = static_cast<float>(std::max(rest, 0.0));
      local.rest_max[g] = m;
    }
  }

  // search_group steps 1-2 over every centroid: each head's best clusters until `want` keys, their
  // union in local.chosen; each head's mass of the clusters nobody chose (local.rest, relative to
  // e^{local.rest_max}). Returns the centroid inner products computed.
  int64_t choose_clusters(const float* queries, int64_t group, double want, float scale, GroupScratch& local) const {
    const int64_t n_clusters = clusters_locked();
    const int64_t n_blocks = (n_clusters + 7) / 8, stride = n_blocks * 8;
    auto& cs = local.centroid_scores;
    cs.resize(static_cast<std::size_t>(group * stride));
    local.taken.assign(static_cast<std::size_t>(n_clusters), 0);
    score_blocks(queries, group, blocks_.data(), n_blocks, cs.data(), stride);
    for (int64_t g = 0; g < group; ++g) {
      clusters_to_scan(cs.data() + g * stride, sizes_.data(), n_clusters, static_cast<double>(clustered_), want,
                       local.candidates, local.sample, local.picked);
      for (int64_t c : local.picked) {
        if (!local.taken[c]) {
          local.taken[c] = 1;
          local.chosen.push_back(c);
        }
      }
    }
    rest_of_heads(cs.data(), stride, sizes_.data(), n_clusters, local.chosen, group, scale, local);
    return group * n_clusters;
  }

  // The cluster id at scored position `pos` of choose_clusters_by_supers: positions are runs of
  // consecutive clusters of one super-cluster (or the loose ones), found by binary search.
  static int64_t cluster_at(const GroupScratch& local, int64_t pos) {
    const auto run = std::upper_bound(local.runs.begin(), local.runs.end(), pos,
                                      [](int64_t p, const std::pair<int64_t, const int64_t*>& r) { return p < r.first; });
    return std::prev(run)->second[pos - std::prev(run)->first];
  }

  // choose_clusters with super-clusters: the centroids are scored per super-cluster, only for the
  // super-clusters that matter. For head g and super-cluster s (mean u_s, radius r_s = the largest
  // distance of a member centroid from u_s), every member c has q_g . c <= q_g . u_s + |q_g| r_s.
  //   1. score every super mean (and the loose clusters of a partial span, exactly);
  //   2. expand (score the member centroids of) each head's best ceil(expand * n_supers) supers by
  //      that bound: the rest's mass below needs the supers that hold most of it;
  //   3. each head picks its clusters among the scored ones as choose_clusters does; a super whose
  //      bound reaches the head's last picked score could hold a better cluster: expand it and
  //      pick again, until none can. The chosen clusters are then exactly choose_clusters' (up to
  //      ties), whatever `expand` is;
  //   4. the rest: scored clusters not chosen exactly, each unexpanded super as size_s keys at its
  //      mean (the estimate's only approximation; expand = 1 makes it exact).
  // With with_rest = false (a plain search) step 4 is skipped and `scale` unused; head_picked[g] and
  // cluster_at() then give each head's clusters, best first.
  int64_t choose_clusters_by_supers(const float* queries, int64_t group, double want, double expand, float scale,
                                    GroupScratch& local, bool with_rest = true) const {
    const int64_t n_clusters = clusters_locked();
    const auto n_sup = static_cast<int64_t>(sup_radius_.size());
    // a head's row: scored clusters, then unexpanded supers (+ 8: a run's block padding lands past
    // its last position, where the next run or the supers overwrite it)
    const int64_t cap = n_clusters + n_sup + 8;
    auto& cs = local.centroid_scores;
    cs.resize(static_cast<std::size_t>(group * cap));
    auto& sizes = local.sizes;           // keys at each position
    // 1. super means, bounds
    const int64_t sup_blocks = (n_sup + 7) / 8, sup_stride = sup_blocks * 8;
    auto& ss = local.super_scores;
    ss.resize(static_cast<std::size_t>(group * sup_stride));
    score_blocks(queries, group, sup_mean_blocks_.data(), sup_blocks, ss.data(), sup_stride);
    auto& bound = local.bounds;
    bound.resize(static_cast<std::size_t>(group * n_sup));
    for (int64_t g = 0; g < group; ++g) {
      const float norm = std::sqrt(ip_(queries + g * dim_, queries + g * dim_, static_cast<std::size_t>(dim_)));
      for (int64_t j = 0; j < n_sup; ++j) bound[g * n_sup + j] = ss[g * sup_stride + j] + norm * sup_radius_[j];
    }
    int64_t n_scored = group * n_sup;
    local.runs.clear();
    sizes.resize(static_cast<std::size_t>(cap));
    int64_t n_pos = 0;        // clusters scored so far (positions [0, n_pos) of every row)
    double pos_keys = 0.0;    // their keys
    // scores `len` centroids stored as `n_blocks` blocks from `blocks` into the next positions;
    // run_keys = their keys (a super's is stored: summing the sizes here was a serial chain of
    // double adds, a third of this function's own time in perf)
    auto score_run = [&](const float* blocks, int64_t n_blocks, const int64_t* ids, const float* id_sizes,
                         int64_t len, double run_keys) {
      score_blocks(queries, group, blocks, n_blocks, cs.data() + n_pos, cap);  // straight into the rows
      local.runs.emplace_back(n_pos, ids);  // a position's cluster id is looked up only if chosen
      std::copy(id_sizes, id_sizes + len, sizes.begin() + n_pos);
      pos_keys += run_keys;
      n_pos += len;
      n_scored += group * len;
    };
    const int64_t n_loose = n_clusters - spanned_;  // spanned_ is a multiple of 8: whole blocks
    if (n_loose > 0) {
      local.loose.resize(static_cast<std::size_t>(n_loose));
      std::iota(local.loose.begin(), local.loose.end(), spanned_);
      score_run(blocks_.data() + spanned_ * dim_, (n_loose + 7) / 8, local.loose.data(), sizes_.data() + spanned_,
                n_loose, std::accumulate(sizes_.begin() + spanned_, sizes_.end(), 0.0));
    }
    auto& expanded = local.expanded;
    expanded.assign(static_cast<std::size_t>(n_sup), 0);
    auto expand_super = [&](int64_t j) {
      expanded[j] = 1;
      const int64_t first_block = sup_block_starts_[j];
      score_run(sup_blocks_.data() + first_block * 8 * dim_, sup_block_starts_[j + 1] - first_block,
                sup_members_.data() + sup_starts_[j], sup_member_sizes_.data() + sup_starts_[j],
                sup_starts_[j + 1] - sup_starts_[j], sup_keys_[j]);
    };
    // 2. each head's best supers by bound
    const int64_t first = std::min<int64_t>(
        n_sup, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(expand * static_cast<double>(n_sup)))));
    for (int64_t g = 0; g < group; ++g) {
      best_clusters(bound.data() + g * n_sup, n_sup, first, local.candidates, local.sample, local.picked);
      for (int64_t j : local.picked)
        if (!expanded[j]) expand_super(j);
    }
    // 3. each head's picks among the scored clusters; the score of its last pick only rises as
    //    clusters are added, so one expansion of every super whose bound reaches it suffices
    //    (a head that cannot fill `want` keys yet expands everything)
    local.head_picked.resize(static_cast<std::size_t>(group));
    std::vector<float>& last = local.last_scores;
    last.resize(static_cast<std::size_t>(group));
    for (int64_t g = 0; g < group; ++g) {
      auto& picked = local.head_picked[g];
      clusters_to_scan(cs.data() + g * cap, sizes.data(), n_pos, pos_keys, want, local.candidates, local.sample,
                       picked);
      double covered = 0.0;
      for (int64_t i : picked) covered += sizes[i];
      last[g] = covered >= want && !picked.empty() ? cs[g * cap + picked.back()]
                                                   : -std::numeric_limits<float>::infinity();
    }
    const int64_t before = n_pos;
    for (int64_t g = 0; g < group; ++g)
      for (int64_t j = 0; j < n_sup; ++j)
        if (!expanded[j] && bound[g * n_sup + j] >= last[g]) expand_super(j);
    if (n_pos > before) {  // the new picks score at least last[g]: only those compete
      for (int64_t g = 0; g < group; ++g)
        clusters_to_scan(cs.data() + g * cap, sizes.data(), n_pos, pos_keys, want, local.candidates, local.sample,
                         local.head_picked[g], last[g]);
    }
    if (!with_rest) return n_scored;
    local.taken.assign(static_cast<std::size_t>(n_pos), 0);
    local.chosen_at.clear();
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i : local.head_picked[g]) {
        if (!local.taken[i]) {
          local.taken[i] = 1;
          local.chosen_at.push_back(i);
        }
      }
    }
    // the chosen positions' cluster ids in one walk over the runs (the group's candidates form a
    // set, so their order does not matter; a binary search per position was ~3% of a decode step)
    std::sort(local.chosen_at.begin(), local.chosen_at.end());
    std::size_t run = 0;
    for (int64_t i : local.chosen_at) {
      while (run + 1 < local.runs.size() && local.runs[run + 1].first <= i) ++run;
      local.chosen.push_back(local.runs[run].second[i - local.runs[run].first]);
    }
    // 4. the rest: unexpanded supers after the scored clusters in each head's row
    int64_t n_row = n_pos;
    for (int64_t j = 0; j < n_sup; ++j) {
      if (expanded[j]) continue;
      sizes[n_row] = sup_keys_[j];
      for (int64_t g = 0; g < group; ++g) cs[g * cap + n_row] = ss[g * sup_stride + j];
      ++n_row;
    }
    rest_of_heads(cs.data(), cap, sizes.data(), n_row, local.chosen_at, group, scale, local);
    return n_scored;
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

  // Of n clusters (scores, sizes in keys, `total` keys in all), the ones a search scans, best score
  // first, until they hold `want` keys (the last one may overshoot), into `out` (positions in
  // 0..n). The best p are selected, p sized for `want` keys with a margin, and doubled in the rare
  // case their keys fall short.
  // A finite `floor` (a score every cluster to scan is known to reach) replaces the selection: the
  // clusters at or above it are sorted, best first, and taken until `want` keys.
  static void clusters_to_scan(const float* scores, const float* sizes, int64_t n, double total, double want,
                               std::vector<uint64_t>& candidates, std::vector<float>& sample,
                               std::vector<int64_t>& out,
                               float floor = -std::numeric_limits<float>::infinity()) {
    out.clear();
    if (n <= 0) return;
    if (floor > -std::numeric_limits<float>::infinity()) {
      candidates.clear();
      collect_at_least(scores, n, floor, candidates);
      std::sort(candidates.begin(), candidates.end());  // best first
      for (const uint64_t key : candidates) out.push_back(static_cast<int64_t>(key & 0xffffffffu));
    } else {
      const double mean_size = total / static_cast<double>(n);
      int64_t p = want >= total ? n : std::min<int64_t>(n, static_cast<int64_t>(2.0 * want / mean_size) + 8);
      for (;;) {
        best_clusters(scores, n, p, candidates, sample, out);  // best first
        double held = 0.0;
        for (int64_t c : out) held += sizes[c];
        if (held >= want || p >= n) break;
        p = std::min(n, 2 * p);
      }
    }
    std::size_t taken = 0;
    for (double scanned = 0.0; taken < out.size() && scanned < want; ++taken) scanned += sizes[out[taken]];
    out.resize(taken);
  }

  // The p best of n scores (ids, best first; ties by ascending id). A heap over every cluster
  // paid log p per entry and dominated large-k searches; instead a threshold from a strided
  // sample of n / 8 scores (64 to 1024) keeps about 2p candidates in one branch-light pass, and
  // only those are selected and sorted. When the sample was unlucky (fewer than p pass), every
  // score competes: the result never depends on the sample.
  static void best_clusters(const float* scores, int64_t n, int64_t p, std::vector<uint64_t>& candidates,
                            std::vector<float>& sample, std::vector<int64_t>& out) {
    p = std::min(p, n);
    float threshold = -std::numeric_limits<float>::infinity();
    const int64_t n_sample = std::min<int64_t>(1024, n / 8);
    if (n_sample >= 64 && 4 * p <= n) {
      const int64_t stride = n / n_sample;
      sample.resize(static_cast<std::size_t>(n_sample));
      for (int64_t i = 0; i < n_sample; ++i) sample[i] = scores[i * stride];
      // sample rank of the score that about 2p of the n scores reach, plus a margin
      const int64_t rank = std::min<int64_t>(n_sample - 1, (2 * p * n_sample + n - 1) / n + 4 + n_sample / 64);
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
      threshold = sample[rank];
    }
    candidates.clear();
    collect_at_least(scores, n, threshold, candidates);
    if (static_cast<int64_t>(candidates.size()) < p) {
      candidates.clear();
      for (int64_t c = 0; c < n; ++c) candidates.push_back(sort_key(scores[c], c));
    }
    sort_smallest_keys(candidates, static_cast<std::size_t>(p));
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
#ifdef LCKV_X86_DISPATCH
  LCKV_TARGET_AVX2 static void collect_avx2(const float* scores, int64_t n, float threshold,
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
#ifdef LCKV_X86_DISPATCH
    if (detect_simd_level() != SimdLevel::kScalar) return collect_avx2;
#endif
    return collect_portable;
  }
  static void collect_at_least(const float* scores, int64_t n, float threshold, std::vector<uint64_t>& out) {
    static const CollectFn collect = collect_for_cpu();
    collect(scores, n, threshold, out);
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
        put_blocked_row(blocks_, static_cast<int64_t>(starts_.size()) - 1, seg.centroids.data() + c * dim_, dim_);
        centroids_.insert(centroids_.end(), seg.centroids.begin() + c * dim_, seg.centroids.begin() + (c + 1) * dim_);
        starts_.push_back(starts_.back() + size);
        sizes_.push_back(static_cast<float>(size));
        // the cluster's keys in whole blocks of their own, so a cluster scan starts on a block
        const int64_t first_block = block_starts_.back();
        block_starts_.push_back(first_block + (size + 7) / 8);
        for (int64_t j = 0; j < size; ++j, ++m) {
          members_.push_back(seg.members[m]);
          put_blocked_row(packed_, first_block * 8 + j, key(seg.members[m]), dim_);
        }
      }
    }
    clustered_ = lo;
    // clustered keys live on in packed_ (searches read only packed_ and the tail): keep one copy
    drop_keys_before(clustered_);
    form_supers();
  }

  // Room for `extra` more elements, with 1/8 slack (a doubling vector would hold up to twice the
  // index while decode-time segments arrive).
  template <typename T>
  static void reserve_more(std::vector<T>& v, std::size_t extra) {
    const std::size_t need = v.size() + extra;
    if (need > v.capacity()) v.reserve(need + need / 8);
  }

  // k-means of keys [lo, hi) into about (hi - lo) / cluster_size clusters.
  Segment cluster_range(int64_t lo, int64_t hi) const {
    const int64_t n = hi - lo;
    const int64_t c_count = std::max<int64_t>(
        1, std::min<int64_t>(n, (n + params_.cluster_size / 2) / params_.cluster_size));
    KMeansResult km;
    kmeans(key(lo), nullptr, n, dim_, spaced_points(n, c_count, /*centred=*/true), KMeansParams{params_.n_iters}, km);
    const std::vector<float>& cent = km.centroids;
    const std::vector<int64_t>& assign = km.assign;
    const std::vector<int64_t>& counts = km.counts;
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

  // Super-clusters of one span of clusters, before they are appended to the global arrays.
  struct SuperSpan {
    std::vector<float> means;       // [s, dim]
    std::vector<float> radius;      // [s] (rounded up)
    std::vector<float> keys;        // [s] keys in the member clusters
    std::vector<int64_t> starts;    // [s + 1] offsets into members
    std::vector<int64_t> members;   // cluster ids grouped by super-cluster
  };

  // k-means of the centroids of clusters [lo, lo + super_span) into about super_span / super_size
  // super-clusters (the empty ones dropped), each with its radius.
  SuperSpan group_span(int64_t lo) const {
    const int64_t n = params_.super_span;
    const int64_t c_count = std::max<int64_t>(1, (n + params_.super_size / 2) / params_.super_size);
    KMeansResult km;
    kmeans(centroids_.data() + lo * dim_, nullptr, n, dim_, spaced_points(n, c_count, /*centred=*/true),
           KMeansParams{params_.n_iters}, km);
    const std::vector<float>& cent = km.centroids;
    const std::vector<int64_t>& assign = km.assign;
    const std::vector<int64_t>& counts = km.counts;
    SuperSpan out;
    std::vector<int64_t> remap(static_cast<std::size_t>(c_count), -1);
    out.starts.push_back(0);
    for (int64_t c = 0; c < c_count; ++c) {
      if (counts[c] == 0) continue;
      remap[c] = static_cast<int64_t>(out.radius.size());
      out.means.insert(out.means.end(), cent.begin() + c * dim_, cent.begin() + (c + 1) * dim_);
      out.radius.push_back(0.0f);
      out.keys.push_back(0.0f);
      out.starts.push_back(out.starts.back() + counts[c]);
    }
    std::vector<int64_t> fill(out.starts.begin(), out.starts.end() - 1);
    out.members.resize(static_cast<std::size_t>(n));
    std::vector<double> radius(out.radius.size(), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = remap[assign[i]], cluster = lo + i;
      out.members[fill[j]++] = cluster;
      out.keys[j] += sizes_[cluster];
      double dist = 0.0;
      for (int64_t e = 0; e < dim_; ++e) {
        const double diff = static_cast<double>(centroids_[cluster * dim_ + e]) - out.means[j * dim_ + e];
        dist += diff * diff;
      }
      radius[j] = std::max(radius[j], std::sqrt(dist));
    }
    // rounded up so that the float inner products of a search stay under the bound
    for (std::size_t j = 0; j < radius.size(); ++j)
      out.radius[j] = static_cast<float>(radius[j] * (1.0 + 1e-5) + 1e-6);
    return out;
  }

  // Groups every full span of clusters not yet in super-clusters (spans in parallel).
  void form_supers() {
    if (params_.super_size <= 0) return;
    const int64_t n_clusters = clusters_locked();
    std::vector<int64_t> spans;
    for (int64_t lo = spanned_; n_clusters - lo >= params_.super_span; lo += params_.super_span) spans.push_back(lo);
    if (spans.empty()) return;
    std::vector<SuperSpan> parts(spans.size());
    const auto n_spans = static_cast<int64_t>(spans.size());
#pragma omp parallel for schedule(dynamic, 1) if (n_spans > 1)
    for (int64_t r = 0; r < n_spans; ++r) parts[r] = group_span(spans[r]);
    if (sup_starts_.empty()) sup_starts_.push_back(0);
    if (sup_block_starts_.empty()) sup_block_starts_.push_back(0);
    for (const SuperSpan& part : parts) {
      for (std::size_t j = 0; j < part.radius.size(); ++j) {
        put_blocked_row(sup_mean_blocks_, static_cast<int64_t>(sup_radius_.size()), part.means.data() + j * dim_, dim_);
        sup_means_.insert(sup_means_.end(), part.means.begin() + j * dim_, part.means.begin() + (j + 1) * dim_);
        sup_radius_.push_back(part.radius[j]);
        sup_keys_.push_back(part.keys[j]);
        const int64_t first_block = sup_block_starts_.back(), len = part.starts[j + 1] - part.starts[j];
        sup_block_starts_.push_back(first_block + (len + 7) / 8);
        sup_starts_.push_back(sup_starts_.back() + len);
        for (int64_t m = 0; m < len; ++m) {
          const int64_t cluster = part.members[part.starts[j] + m];
          sup_members_.push_back(cluster);
          sup_member_sizes_.push_back(sizes_[cluster]);
          put_blocked_row(sup_blocks_, first_block * 8 + m, centroids_.data() + cluster * dim_, dim_);
        }
      }
    }
    spanned_ += n_spans * params_.super_span;
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
  // Super-clusters (search_group): clusters [0, spanned_) are in them, the rest are loose.
  int64_t spanned_ = 0;
  std::vector<float> sup_mean_blocks_;     // super means as blocks of 8 transposed rows
  std::vector<float> sup_means_;           // the same, row-major [n_supers, dim] (search_batch's product)
  std::vector<float> sup_radius_;          // [n_supers] largest member-centroid distance from the mean
  std::vector<float> sup_keys_;            // [n_supers] keys in the member clusters
  std::vector<int64_t> sup_starts_;        // [n_supers + 1] offsets into sup_members_
  std::vector<int64_t> sup_members_;       // cluster ids grouped by super-cluster
  std::vector<float> sup_member_sizes_;    // their keys (sizes_ in sup_members_ order)
  std::vector<int64_t> sup_block_starts_;  // [n_supers + 1] offsets into sup_blocks_, in 8-row blocks
  std::vector<float> sup_blocks_;          // each super's member centroids as blocks of 8 (zero-padded)
};

}  // namespace lckv
