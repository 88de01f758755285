// Attention-aware graph index (RoarGraph / RetrievalAttention style) for inner-product top-k.
//
// Decode queries come from another distribution than the keys, so a graph built from keys alone
// (HNSW) links keys that are close to each other, not keys that answer the same queries. This
// index is built from the keys plus a sample of queries:
//   1. each build query is linked to its exact top-`build_knn` keys (blocked exact search);
//   2. the query-key bipartite graph is projected onto the keys: two keys are candidates for an
//      edge when they appear in the same query's list within `rank_window` ranks of each other;
//      the weight of an edge is how many lists they share (plus a small bonus for rank
//      proximity), taken over each key's `lists_per_key` best-ranked lists;
//   3. each key keeps its heaviest edges, reverse edges are added and the union is pruned (the
//      last max_degree/4 slots stay reserved for links made later);
//   3b. long-range edges: the same projection over coarse levels (every `coarse_stride`-th key,
//      every coarse_stride^2-th, ... while a level holds >= 4 * build_knn keys), whose lists reach
//      much further in rank, adds `coarse_degree` edges per level to the keys of that level
//      (HNSW's upper layers, flattened into one graph);
//   4. keys that no build query reaches, and keys added later, are linked to the results of two
//      beam searches (`build_ef`): the key itself as the query, and the probe query (step 5) that
//      ranks the key best; reverse links go into the reserved slots. A key that beats a probe's
//      top-1 becomes an entry point;
//   5. up to `n_entry` build queries are kept as probes, one per k-means cluster of the build
//      queries (the one nearest the centroid); the entry points are their current top-1 keys
//      (then the keys in the most lists), so they cover the query distribution;
//   6. up to `repair_queries` build queries are searched; when one misses its exact top-1 key, the
//      best key it reached and that top-1 key are linked both ways (long-range edges); up to three
//      passes, until fewer than 1% miss;
//   7. upper level (when upper_size > 0): up to `upper_size` keys that cover the query
//      distribution (the entry points, then the top-1 keys of one build query per k-means cluster)
//      get a graph of their own: each build query is linked to its exact top-32 upper keys and
//      the lists are projected as in step 2, `upper_degree` edges per upper key. The upper keys
//      are few, so a list spans many regions of the key graph and the upper edges are long: the
//      navigation that the key graph lacks between regions no build query links (HNSW's upper
//      layer, built from queries). Keys added later are not in it (the key graph reaches them).
// A search scores the entry points, walks the upper level from them (a beam of SearchParams::upper_ef
// upper keys, default the build's `upper_ef`; every upper key scored is a candidate), then runs a best-first beam search of width `ef`
// (SearchParams::ef); when ef < k, every key scored competes for the k results, so the beam can
// stay narrower than k. n_scored counts the entry points and every key whose inner product the
// search computed (entries and upper keys included). Without build queries, every key is linked
// as in step 4.
// Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <unordered_map>
#include <vector>

#include "lckv/kmeans.h"
#include "lckv/select_top.h"
#include "lckv/vector_index.h"

namespace lckv {

struct GraphBuildParams {
  int64_t max_degree = 32;     // edges per key (M)
  int64_t build_knn = 100;     // exact top-L keys per build query
  int64_t rank_window = 32;    // two keys are edge candidates within this many ranks of one list
  int64_t lists_per_key = 32;  // a key's candidates come from at most this many of its lists
  int64_t n_entry = 128;       // entry keys scored by every search
  int64_t build_ef = 64;       // beam width when linking keys by search
  int64_t repair_queries = 8192;  // build queries whose search misses add long-range edges
  int64_t coarse_stride = 16;  // coarse level l holds every coarse_stride^l-th key
  int64_t coarse_degree = 4;   // edges per key and coarse level, from lists over that level only
  int64_t upper_size = 0;      // keys of the upper level (0: none); see step 7
  int64_t upper_degree = 32;   // edges per upper key, among upper keys only
  int64_t upper_ef = 128;      // beam width of a search's walk over the upper level
};

// Calls visit(name, value) for each setting of p, in declaration order (bindings, logs).
template <typename Visit>
void visit_settings(const GraphBuildParams& p, Visit&& visit) {
  visit("max_degree", p.max_degree);
  visit("build_knn", p.build_knn);
  visit("rank_window", p.rank_window);
  visit("lists_per_key", p.lists_per_key);
  visit("n_entry", p.n_entry);
  visit("build_ef", p.build_ef);
  visit("repair_queries", p.repair_queries);
  visit("coarse_stride", p.coarse_stride);
  visit("coarse_degree", p.coarse_degree);
  visit("upper_size", p.upper_size);
  visit("upper_degree", p.upper_degree);
  visit("upper_ef", p.upper_ef);
}

class GraphIndex : public VectorIndex {
 public:
  GraphIndex(int64_t dim, const GraphBuildParams& params)
      : VectorIndex(dim), params_(params), ip_rows_(inner_product_rows_for(simd_)) {
    if (params.max_degree < 2 || params.max_degree > 65535)
      throw std::invalid_argument("max_degree must be in [2, 65535]");
    if (params.build_knn < 2) throw std::invalid_argument("build_knn must be >= 2");
    if (params.rank_window < 1) throw std::invalid_argument("rank_window must be >= 1");
    if (params.lists_per_key < 1) throw std::invalid_argument("lists_per_key must be >= 1");
    if (params.n_entry < 1) throw std::invalid_argument("n_entry must be >= 1");
    if (params.build_ef < 1) throw std::invalid_argument("build_ef must be >= 1");
    if (params.repair_queries < 0) throw std::invalid_argument("repair_queries must be >= 0");
    if (params.coarse_stride < 1) throw std::invalid_argument("coarse_stride must be >= 1");
    if (params.coarse_degree < 0) throw std::invalid_argument("coarse_degree must be >= 0");
    if (params.upper_size < 0) throw std::invalid_argument("upper_size must be >= 0");
    if (params.upper_degree < 2 || params.upper_degree > 65535)
      throw std::invalid_argument("upper_degree must be in [2, 65535]");
    if (params.upper_ef < 1) throw std::invalid_argument("upper_ef must be >= 1");
    reserve_ = std::max<int64_t>(1, params.max_degree / 4);
  }

  const GraphBuildParams& build_params() const { return params_; }

  // Ids of the entry keys every search scores first.
  std::vector<int64_t> entry_points() const {
    std::shared_lock<RwLock> lock(mutex_);
    return entries_;
  }

  // Mean out-degree.
  double mean_degree() const {
    std::shared_lock<RwLock> lock(mutex_);
    if (size_ == 0) return 0.0;
    double total = 0.0;
    for (int64_t i = 0; i < size_; ++i) total += degree_[i];
    return total / static_cast<double>(size_);
  }

  // Adds n keys [n, dim] and builds the graph from m build queries [m, dim] (m may be 0).
  // Keys already present stay; their edges are kept and new keys are linked as in add().
  void build(const float* keys, int64_t n, const float* queries, int64_t m) {
    std::unique_lock<RwLock> lock(mutex_);
    if (size_ > 0 || m <= 0) {
      add_locked(keys, n);
      return;
    }
    append_keys(keys, n);
    grow_graph();
    if (n == 0) return;
    const std::vector<int64_t> top1 = project_query_lists(queries, m);
    std::vector<int64_t> unlinked;
    for (int64_t i = 0; i < size_; ++i)
      if (degree_[i] == 0) unlinked.push_back(i);
    link_by_search(unlinked);
    for (int pass = 0; pass < 3; ++pass)
      if (repair_with_queries(queries, m, top1) * 100 < std::min(m, params_.repair_queries)) break;
    build_upper(queries, m, top1);
  }

  // Keys of the upper level (step 7), in slot order.
  std::vector<int64_t> upper_keys() const {
    std::shared_lock<RwLock> lock(mutex_);
    return upper_ids_;
  }

 protected:
  void add_locked(const float* keys, int64_t n) override {
    const int64_t base = size_;
    append_keys(keys, n);
    grow_graph();
    std::vector<int64_t> fresh(static_cast<std::size_t>(n));
    for (int64_t i = 0; i < n; ++i) fresh[i] = base + i;
    link_by_search(fresh);
  }

  int64_t search_locked(const float* query, int64_t k, const SearchParams& params, float* scores,
                        int64_t* ids) const override {
    if (size_ == 0 || entries_.empty()) {
      TopK(k).write_sorted(scores, ids);
      return 0;
    }
    struct FoundTag;
    std::vector<Scored>& found = per_thread<std::vector<Scored>, FoundTag>();
    const int64_t n_scored = beam_search(query, params.ef, -1, found, k, params.upper_ef);
    write_results(found, k, scores, ids);
    return n_scored;
  }

  int64_t extra_memory_bytes_locked() const override {
    return static_cast<int64_t>(adjacency_.capacity() * sizeof(uint32_t) +
                                degree_.capacity() * sizeof(uint16_t) +
                                entries_.capacity() * sizeof(int64_t) + entry_keys_.capacity() * sizeof(float) +
                                entry_slot_.capacity() * sizeof(int32_t) + entry_ids_.capacity() * sizeof(uint32_t) +
                                entry_marks_.capacity() * sizeof(entry_marks_[0]) + probes_.capacity() * sizeof(float) +
                                upper_ids_.capacity() * sizeof(int64_t) + upper_keys_.capacity() * sizeof(float) +
                                upper_adjacency_.capacity() * sizeof(uint32_t) +
                                upper_deg_.capacity() * sizeof(uint16_t) +
                                upper_slot_.size() * (sizeof(int64_t) + sizeof(int32_t) + 2 * sizeof(void*)));
  }

 private:
  using Scored = std::pair<float, int64_t>;

  // The first k of `found` (sorted best first), padded with (-inf, -1).
  static void write_results(const std::vector<Scored>& found, int64_t k, float* scores, int64_t* ids) {
    const int64_t n_found = std::min<int64_t>(k, static_cast<int64_t>(found.size()));
    for (int64_t j = 0; j < n_found; ++j) {
      scores[j] = found[j].first;
      ids[j] = found[j].second;
    }
    for (int64_t j = n_found; j < k; ++j) {
      scores[j] = -std::numeric_limits<float>::infinity();
      ids[j] = -1;
    }
  }

  struct Candidate {  // a beam entry
    float score;
    uint32_t id;
    bool expanded;
  };

  // Inserts (s, id) into `pool` (sorted by descending score, at most cap long); returns its
  // position, or cap when it does not enter.
  static std::size_t insert_sorted(std::vector<Candidate>& pool, std::size_t cap, float s, uint32_t id) {
    if (pool.size() >= cap && s <= pool.back().score) return cap;
    std::size_t pos = pool.size();
    while (pos > 0 && pool[pos - 1].score < s) --pos;
    if (pool.size() < cap) pool.emplace_back();  // else the last one drops out
    std::copy_backward(pool.begin() + static_cast<std::ptrdiff_t>(pos), pool.end() - 1, pool.end());
    pool[pos] = Candidate{s, id, false};
    return pos;
  }

  // Keeps the `count` first of v in the order `better` (a strict weak order), sorted.
  template <typename T, typename Better>
  static void keep_best(std::vector<T>& v, std::size_t count, Better better) {
    if (v.size() > count) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(count), v.end(), better);
      v.resize(count);
    }
    std::sort(v.begin(), v.end(), better);
  }

  // Best-first expansion (as in NSG): expands the best unexpanded candidate of `pool` with
  // expand(cur), which inserts what it finds and returns the lowest position it inserted at (or
  // more than cur); continues from the best unexpanded candidate until every one is expanded.
  template <typename Expand>
  static void expand_best_first(std::vector<Candidate>& pool, Expand&& expand) {
    std::size_t cur = 0;
    while (cur < pool.size()) {
      if (pool[cur].expanded) {
        ++cur;
        continue;
      }
      pool[cur].expanded = true;
      const std::size_t lowest = expand(cur);
      cur = lowest <= cur ? lowest : cur + 1;
    }
  }

  // Asks for every cache line of a key (a 128-float key spans 8 lines).
  void prefetch_key(int64_t id) const {
    const char* p = reinterpret_cast<const char*>(key(id));
    for (int64_t off = 0; off < dim_ * static_cast<int64_t>(sizeof(float)); off += 64) __builtin_prefetch(p + off);
  }

  void prefetch_neighbors(uint32_t id) const {
    __builtin_prefetch(neighbors(id));
    __builtin_prefetch(neighbors(id) + 16);
  }

  uint32_t* neighbors(int64_t id) { return adjacency_.data() + id * params_.max_degree; }
  const uint32_t* neighbors(int64_t id) const { return adjacency_.data() + id * params_.max_degree; }

  void grow_graph() {
    adjacency_.resize(static_cast<std::size_t>(size_ * params_.max_degree), 0);
    degree_.resize(static_cast<std::size_t>(size_), 0);
  }

  // One query's best-first search over a pool of the ef best keys seen, kept sorted by descending
  // score (as in NSG): expand the best unexpanded key, insert its unvisited neighbours that beat
  // the pool's worst, continue from the best unexpanded key; stop when every pool key is
  // expanded. The pool starts with the best of the entries and of the upper keys the walk over
  // the upper level scored (width upper_ef, 0: the build setting). When n_results > ef, a
  // separate list keeps every key scored that can still be a result (at or above the n_results-th
  // best of the keys scored before the beam), for the top-n_results at the end (the beam stays ef
  // wide). Skips `exclude`.
  // (Letting several queries' searches take turns between expansion steps, to overlap their
  // memory reads, measured no faster on stories260K heads and on a synthetic head_dim-128 set: the
  // search is not bound by memory latency there.)
  struct Beam {
    const float* query = nullptr;
    std::size_t cap = 0;          // ef
    bool wide = false;            // n_results > ef: keep everything scored
    int64_t n_scored = 0;
    std::vector<Candidate> pool;  // the beam, sorted by descending score
    std::vector<Candidate> upper; // the upper-level beam (ids are upper slots)
    VisitedBits upper_seen;       // upper slots already met (small: stays in L1)
    VisitedBits visited;          // keys already scored
    std::vector<uint32_t> fresh;  // unvisited neighbours of the node being expanded
    std::vector<float> fresh_scores;
    std::vector<float> scored_s;  // when wide: every key scored at or above `floor` (scores, ids): n_kept
    std::vector<uint32_t> scored_id;
    std::size_t n_kept = 0;
    float floor = 0.0f;           // when wide: the n_results-th best score before the beam (or -inf)
    std::vector<float> entry_scores;  // parallel to entries_
    std::vector<float> start_s;   // the entries and upper keys scored before the beam (scores, ids)
    std::vector<uint32_t> start_id;
    std::vector<float> best_s;    // select_top output
    std::vector<uint32_t> best_id;
  };

  void beam_start(Beam& b, const float* query, int64_t ef, int64_t exclude, int64_t n_results,
                  int64_t upper_ef) const {
    b.query = query;
    b.cap = static_cast<std::size_t>(ef);
    b.wide = n_results > ef;
    b.n_scored = 0;
    b.visited.reset(static_cast<std::size_t>(size_));
    b.pool.clear();
    if (exclude >= 0) b.visited.test_and_set(static_cast<std::size_t>(exclude));
    // The entries: their keys are kept contiguous (entry_keys_), scored in one pass.
    const std::size_t n_entries = entries_.size();
    b.entry_scores.resize(n_entries);
    ip_rows_(query, entry_keys_.data(), n_entries, static_cast<std::size_t>(dim_), b.entry_scores.data());
    b.n_scored += static_cast<int64_t>(n_entries);
    b.visited.mark_words(entry_marks_);
    // The keys scored before the beam: the entries (read in place unless one is dropped or the
    // upper walk adds keys).
    const float* start_s = b.entry_scores.data();
    const uint32_t* start_id = entry_ids_.data();
    std::size_t n_start = n_entries;
    if (exclude >= 0 || !upper_ids_.empty()) {
      b.start_s.assign(b.entry_scores.begin(), b.entry_scores.end());
      b.start_id.assign(entry_ids_.begin(), entry_ids_.end());
      if (exclude >= 0) {  // drop it (only build searches exclude a key)
        std::size_t w = 0;
        for (std::size_t i = 0; i < n_entries; ++i) {
          b.start_s[w] = b.start_s[i];
          b.start_id[w] = b.start_id[i];
          w += entries_[i] != exclude;
        }
        b.start_s.resize(w);
        b.start_id.resize(w);
      }
      if (!upper_ids_.empty())
        b.n_scored += walk_upper(query, b.entry_scores.data(), exclude, upper_ef > 0 ? upper_ef : params_.upper_ef,
                                 b.upper, b.upper_seen, b.visited, b.fresh, b.fresh_scores, b.start_s, b.start_id);
      start_s = b.start_s.data();
      start_id = b.start_id.data();
      n_start = b.start_s.size();
    }
    // Only the best max(ef, n_results) of these can matter: the pool takes the best ef, and a key
    // below the n_results-th best of them has n_results better keys already, so it cannot be a
    // result; neither can any key scored later below that `floor`. When wide, they start the list
    // of kept keys.
    const std::size_t wanted = std::max(b.cap, static_cast<std::size_t>(std::max<int64_t>(n_results, 0)));
    std::vector<float>& best_s = b.wide ? b.scored_s : b.best_s;
    std::vector<uint32_t>& best_id = b.wide ? b.scored_id : b.best_id;
    if (best_s.size() < wanted) {
      best_s.resize(wanted);
      best_id.resize(wanted);
    }
    const std::size_t m = select_top(start_s, start_id, n_start, wanted, best_s.data(), best_id.data());
    b.floor = b.wide && m >= wanted ? best_s[m - 1] : -std::numeric_limits<float>::infinity();
    b.n_kept = b.wide ? m : 0;
    // Buffers sized once per search (resizing them per expansion zero-filled them every time).
    const auto max_degree = static_cast<std::size_t>(params_.max_degree);
    if (b.fresh.size() < max_degree) b.fresh.resize(max_degree);
    if (b.fresh_scores.size() < max_degree) b.fresh_scores.resize(max_degree);
    for (std::size_t i = 0; i < std::min(b.cap, m); ++i) b.pool.push_back(Candidate{best_s[i], best_id[i], false});
    if (!b.pool.empty()) prefetch_neighbors(b.pool[0].id);
  }

  // Expands pool[cur] (for expand_best_first): scores its unvisited neighbours and inserts them;
  // returns the lowest position one entered at, or cap.
  std::size_t beam_expand(Beam& b, std::size_t cur) const {
    const uint32_t node = b.pool[cur].id;
    // The next node to expand is usually the next unexpanded one: request its list early.
    for (std::size_t next = cur + 1; next < b.pool.size(); ++next) {
      if (!b.pool[next].expanded) {
        prefetch_neighbors(b.pool[next].id);
        break;
      }
    }
    const uint32_t* nbrs = neighbors(node);
    const int64_t deg = degree_[node];
    const std::size_t n_fresh = b.visited.mark_new(nbrs, static_cast<std::size_t>(deg), b.fresh.data());
    for (std::size_t j = 0; j < n_fresh; ++j) prefetch_key(b.fresh[j]);
    ip_batch_(b.query, keys_.data(), b.fresh.data(), n_fresh, static_cast<std::size_t>(dim_), b.fresh_scores.data());
    b.n_scored += static_cast<int64_t>(n_fresh);
    std::size_t lowest = b.cap;
    if (b.wide) {  // the keys at or above the floor (branch-free)
      std::size_t w = b.n_kept;
      if (b.scored_s.size() < w + n_fresh) {
        b.scored_s.resize(2 * (w + n_fresh));
        b.scored_id.resize(2 * (w + n_fresh));
      }
      for (std::size_t j = 0; j < n_fresh; ++j) {
        b.scored_s[w] = b.fresh_scores[j];
        b.scored_id[w] = b.fresh[j];
        w += b.fresh_scores[j] >= b.floor;
      }
      b.n_kept = w;
    }
    for (std::size_t j = 0; j < n_fresh; ++j) {
      lowest = std::min(lowest, insert_sorted(b.pool, b.cap, b.fresh_scores[j], b.fresh[j]));
    }
    return lowest;
  }

  // `found` gets the best max(ef, n_results) keys scored, as (score, id), best first.
  void beam_finish(Beam& b, int64_t n_results, std::vector<Scored>& found) const {
    found.clear();
    if (b.wide) {
      b.best_s.resize(std::min(b.n_kept, static_cast<std::size_t>(n_results)));
      b.best_id.resize(b.best_s.size());
      // Every kept score is >= floor (when finite) and <= the pool's best (the best scored).
      const float lo = b.floor, hi = b.pool.empty() ? lo : b.pool[0].score;
      const bool bounded = lo > -std::numeric_limits<float>::infinity() && lo <= hi;
      const std::size_t m = select_top(b.scored_s.data(), b.scored_id.data(), b.n_kept,
                                       static_cast<std::size_t>(n_results), b.best_s.data(), b.best_id.data(),
                                       bounded ? lo : std::numeric_limits<float>::infinity(),
                                       bounded ? hi : -std::numeric_limits<float>::infinity());
      found.reserve(m);
      for (std::size_t i = 0; i < m; ++i) found.emplace_back(b.best_s[i], static_cast<int64_t>(b.best_id[i]));
    } else {
      found.reserve(b.pool.size());
      for (const Candidate& c : b.pool) found.emplace_back(c.score, static_cast<int64_t>(c.id));
    }
  }

  // One search (see Beam); returns n_scored.
  int64_t beam_search(const float* query, int64_t ef, int64_t exclude, std::vector<Scored>& found,
                      int64_t n_results = 0, int64_t upper_ef = 0) const {
    struct BeamTag;
    Beam& b = per_thread<Beam, BeamTag>();  // buffers reused across searches
    beam_start(b, query, ef, exclude, n_results, upper_ef);
    expand_best_first(b.pool, [&](std::size_t cur) { return beam_expand(b, cur); });
    beam_finish(b, n_results, found);
    return b.n_scored;
  }

  // The walk over the upper level (step 7): a beam of `width` upper keys, seeded with the entries
  // that are upper keys (entry_scores parallel to entries_), expanded best first over upper edges.
  // Every upper key scored is marked visited and appended to (cand_s, cand_id) as (score, key id).
  // Returns how many keys it scored.
  // Slots are checked against `seen` (one mark per upper slot) before the per-key marks, which are
  // random reads over all keys.
  int64_t walk_upper(const float* query, const float* entry_scores, int64_t exclude, int64_t width,
                     std::vector<Candidate>& beam, VisitedBits& seen, VisitedBits& visited,
                     std::vector<uint32_t>& fresh, std::vector<float>& fresh_scores,
                     std::vector<float>& cand_s, std::vector<uint32_t>& cand_id) const {
    const std::size_t cap = static_cast<std::size_t>(width);
    const int64_t ud = params_.upper_degree;
    int64_t n_scored = 0;
    beam.clear();
    seen.reset(upper_ids_.size());
    for (std::size_t i = 0; i < entries_.size(); ++i) {  // the best cap entries, selected then sorted
      if (entry_slot_[i] < 0) continue;
      seen.test_and_set(static_cast<std::size_t>(entry_slot_[i]));
      if (entries_[i] != exclude) beam.push_back(Candidate{entry_scores[i], static_cast<uint32_t>(entry_slot_[i]), false});
    }
    keep_best(beam, cap, [](const Candidate& a, const Candidate& b) { return a.score > b.score; });
    expand_best_first(beam, [&](std::size_t cur) {
      const uint32_t slot = beam[cur].id;
      const uint32_t* nbrs = upper_adjacency_.data() + static_cast<std::size_t>(slot) * ud;
      fresh.clear();
      for (int64_t j = 0; j < upper_deg_[slot]; ++j)
        if (!seen.test_and_set(nbrs[j]) && !visited.test_and_set(static_cast<std::size_t>(upper_ids_[nbrs[j]])))
          fresh.push_back(nbrs[j]);
      fresh_scores.resize(fresh.size());
      ip_batch_(query, upper_keys_.data(), fresh.data(), fresh.size(), static_cast<std::size_t>(dim_), fresh_scores.data());
      n_scored += static_cast<int64_t>(fresh.size());
      std::size_t lowest = cap;
      for (std::size_t j = 0; j < fresh.size(); ++j) {
        cand_s.push_back(fresh_scores[j]);
        cand_id.push_back(static_cast<uint32_t>(upper_ids_[fresh[j]]));
        lowest = std::min(lowest, insert_sorted(beam, cap, fresh_scores[j], fresh[j]));
      }
      return lowest;
    });
    return n_scored;
  }

  // Step 7: the upper level over up to upper_size keys: the entry points, then the distinct top-1
  // keys of one build query per k-means cluster (clusters often share one); edges from each build query's exact top-32 upper
  // keys, projected as in step 2.
  void build_upper(const float* queries, int64_t m, const std::vector<int64_t>& top1) {
    upper_ids_.clear();
    upper_slot_.clear();
    if (params_.upper_size <= 0 || m <= 0) {
      pack_entry_keys();
      return;
    }
    auto put = [&](int64_t id) {
      if (static_cast<int64_t>(upper_ids_.size()) < params_.upper_size && upper_slot_.emplace(id, upper_ids_.size()).second)
        upper_ids_.push_back(id);
    };
    for (int64_t id : entries_) put(id);
    for (int64_t q : cover_queries(queries, m, std::min(m, params_.upper_size))) put(top1[q]);
    const auto nu = static_cast<int64_t>(upper_ids_.size());
    upper_keys_.resize(static_cast<std::size_t>(nu * dim_));
    for (int64_t u = 0; u < nu; ++u) std::copy(key(upper_ids_[u]), key(upper_ids_[u]) + dim_, upper_keys_.begin() + u * dim_);
    constexpr int64_t kUpperList = 32;
    const int64_t L = std::min(kUpperList, nu);
    std::vector<float> list_scores(static_cast<std::size_t>(m * L));
    std::vector<int64_t> lists(static_cast<std::size_t>(m * L));
    exact_topk(upper_keys_.data(), nu, queries, m, dim_, L, ip_, list_scores.data(), lists.data());
    const auto edges = cooccurrence_edges(lists, m, L, nu, params_.upper_degree, nullptr);
    const int64_t ud = params_.upper_degree;
    upper_adjacency_.assign(static_cast<std::size_t>(nu * ud), 0);
    upper_deg_.assign(static_cast<std::size_t>(nu), 0);
    for (int64_t u = 0; u < nu; ++u) {
      for (std::size_t j = 0; j < edges[u].size(); ++j) upper_adjacency_[u * ud + j] = static_cast<uint32_t>(edges[u][j].second);
      upper_deg_[u] = static_cast<uint16_t>(edges[u].size());
    }
    pack_entry_keys();
  }

  // Co-occurrence edges among n_nodes nodes from m ranked lists [m, L] of node indices: forward
  // edges (the `keep` heaviest per node), plus reverse edges, pruned again to `keep` per node.
  // Also returns each node's occurrence count in `occurrences` (for popularity).
  std::vector<std::vector<Scored>> cooccurrence_edges(const std::vector<int64_t>& lists, int64_t m,
                                                      int64_t L, int64_t n_nodes, int64_t keep,
                                                      std::vector<int64_t>* occurrences) const {
    const int64_t n = n_nodes;
    const int64_t window = params_.rank_window;
    // Occurrences of each node: positions (query * L + rank) in `lists`, best rank first.
    std::vector<int64_t> occ_start(static_cast<std::size_t>(n + 1), 0);
    for (int64_t p = 0; p < m * L; ++p) ++occ_start[lists[p] + 1];
    for (int64_t i = 0; i < n; ++i) occ_start[i + 1] += occ_start[i];
    std::vector<int64_t> occ(static_cast<std::size_t>(m * L));
    {
      std::vector<int64_t> fill(occ_start.begin(), occ_start.end() - 1);
      for (int64_t r = 0; r < L; ++r)  // rank-major, so each node's occurrences come best rank first
        for (int64_t q = 0; q < m; ++q) {
          const int64_t p = q * L + r;
          occ[fill[lists[p]]++] = p;
        }
    }
    if (occurrences != nullptr) {
      occurrences->resize(static_cast<std::size_t>(n));
      for (int64_t x = 0; x < n; ++x) (*occurrences)[x] = occ_start[x + 1] - occ_start[x];
    }

    std::vector<std::vector<Scored>> forward(static_cast<std::size_t>(n));
#pragma omp parallel
    {
      std::vector<float> weight(static_cast<std::size_t>(n), 0.0f);
      std::vector<int64_t> touched;
#pragma omp for schedule(dynamic, 64)
      for (int64_t x = 0; x < n; ++x) {
        const int64_t begin = occ_start[x];
        const int64_t end = std::min(occ_start[x + 1], begin + params_.lists_per_key);
        for (int64_t o = begin; o < end; ++o) {
          const int64_t q = occ[o] / L;
          const int64_t r = occ[o] % L;
          const int64_t lo = std::max<int64_t>(0, r - window);
          const int64_t hi = std::min<int64_t>(L - 1, r + window);
          for (int64_t rr = lo; rr <= hi; ++rr) {
            if (rr == r) continue;
            const int64_t y = lists[q * L + rr];
            if (weight[y] == 0.0f) touched.push_back(y);
            weight[y] += 1.0f + 0.5f / static_cast<float>(1 + std::abs(rr - r));
          }
        }
        std::vector<Scored>& out = forward[x];
        out.reserve(touched.size());
        for (int64_t y : touched) {
          out.emplace_back(weight[y], y);
          weight[y] = 0.0f;
        }
        touched.clear();
        keep_heaviest(out, keep);
      }
    }

    std::vector<int64_t> in_start(static_cast<std::size_t>(n + 1), 0);
    for (int64_t x = 0; x < n; ++x)
      for (const Scored& e : forward[x]) ++in_start[e.second + 1];
    for (int64_t i = 0; i < n; ++i) in_start[i + 1] += in_start[i];
    std::vector<Scored> incoming(static_cast<std::size_t>(in_start[n]));
    {
      std::vector<int64_t> fill(in_start.begin(), in_start.end() - 1);
      for (int64_t x = 0; x < n; ++x)
        for (const Scored& e : forward[x]) incoming[fill[e.second]++] = Scored(e.first, x);
    }
    std::vector<std::vector<Scored>> merged(static_cast<std::size_t>(n));
#pragma omp parallel
    {
      std::vector<float> weight(static_cast<std::size_t>(n), 0.0f);
      std::vector<int64_t> touched;
#pragma omp for schedule(dynamic, 64)
      for (int64_t y = 0; y < n; ++y) {
        auto take = [&](const Scored& e) {
          if (weight[e.second] == 0.0f) touched.push_back(e.second);
          weight[e.second] = std::max(weight[e.second], e.first);
        };
        for (const Scored& e : forward[y]) take(e);
        for (int64_t i = in_start[y]; i < in_start[y + 1]; ++i) take(incoming[i]);
        std::vector<Scored>& out = merged[y];
        out.reserve(touched.size());
        for (int64_t x : touched) {
          out.emplace_back(weight[x], x);
          weight[x] = 0.0f;
        }
        touched.clear();
        keep_heaviest(out, keep);
      }
    }
    return merged;
  }

  // Steps 1-3 and 5 of the build (see the file comment); returns each build query's top-1 key.
  std::vector<int64_t> project_query_lists(const float* queries, int64_t m) {
    const int64_t n = size_;
    const int64_t L = std::min(params_.build_knn, n);
    std::vector<float> list_scores(static_cast<std::size_t>(m * L));
    std::vector<int64_t> lists(static_cast<std::size_t>(m * L));
    exact_topk(keys_.data(), n, queries, m, dim_, L, ip_, list_scores.data(), lists.data());

    // Coarse levels: every coarse_stride^l-th key, while at least 4 lists' worth of keys remain.
    std::vector<int64_t> strides;
    for (int64_t stride = params_.coarse_stride; params_.coarse_degree > 0 && params_.coarse_stride > 1 &&
                                                 n / stride >= 4 * L;
         stride *= params_.coarse_stride)
      strides.push_back(stride);
    const int64_t fine_keep = std::max<int64_t>(
        2, params_.max_degree - reserve_ - params_.coarse_degree * static_cast<int64_t>(strides.size()));

    std::vector<int64_t> occurrences;
    {
      const auto edges = cooccurrence_edges(lists, m, L, n, fine_keep, &occurrences);
#pragma omp parallel for schedule(static)
      for (int64_t y = 0; y < n; ++y) {
        uint32_t* row = neighbors(y);
        for (std::size_t j = 0; j < edges[y].size(); ++j) row[j] = static_cast<uint32_t>(edges[y][j].second);
        degree_[y] = static_cast<uint16_t>(edges[y].size());
      }
    }
    for (int64_t stride : strides) {
      const int64_t n_coarse = (n + stride - 1) / stride;
      const int64_t Lc = std::min(L, n_coarse);
      std::vector<float> coarse_keys(static_cast<std::size_t>(n_coarse * dim_));
      for (int64_t j = 0; j < n_coarse; ++j)
        std::copy(key(j * stride), key(j * stride) + dim_, coarse_keys.begin() + j * dim_);
      std::vector<float> coarse_scores(static_cast<std::size_t>(m * Lc));
      std::vector<int64_t> coarse_lists(static_cast<std::size_t>(m * Lc));
      exact_topk(coarse_keys.data(), n_coarse, queries, m, dim_, Lc, ip_, coarse_scores.data(),
                 coarse_lists.data());
      const auto edges = cooccurrence_edges(coarse_lists, m, Lc, n_coarse, params_.coarse_degree, nullptr);
      for (int64_t j = 0; j < n_coarse; ++j) {
        const int64_t y = j * stride;
        uint32_t* row = neighbors(y);
        int64_t deg = degree_[y];
        for (const Scored& e : edges[j]) {
          const uint32_t target = static_cast<uint32_t>(e.second * stride);
          if (deg < params_.max_degree - reserve_ && std::find(row, row + deg, target) == row + deg)
            row[deg++] = target;
        }
        degree_[y] = static_cast<uint16_t>(deg);
      }
    }

    // Entry points: the current top-1 keys of up to `n_entry` probe queries that cover the query
    // distribution (one per k-means cluster of the build queries), then the keys in the most lists.
    const std::vector<int64_t> picked = cover_queries(queries, m, std::min(m, params_.n_entry));
    const int64_t n_probes = static_cast<int64_t>(picked.size());
    probes_.resize(static_cast<std::size_t>(n_probes * dim_));
    probe_best_.resize(static_cast<std::size_t>(n_probes));
    for (int64_t r = 0; r < n_probes; ++r) {
      const int64_t q = picked[r];
      std::copy(queries + q * dim_, queries + (q + 1) * dim_, probes_.begin() + r * dim_);
      probe_best_[r] = Scored(list_scores[q * L], lists[q * L]);
    }
    std::vector<Scored> popularity(static_cast<std::size_t>(n));
    for (int64_t x = 0; x < n; ++x) popularity[x] = Scored(static_cast<float>(occurrences[x]), x);
    keep_heaviest(popularity, params_.n_entry);
    popular_.clear();
    for (const Scored& p : popularity)
      if (p.first > 0.0f) popular_.push_back(p.second);
    refresh_entries();
    std::vector<int64_t> top1(static_cast<std::size_t>(m));
    for (int64_t q = 0; q < m; ++q) top1[q] = lists[q * L];
    return top1;
  }

  // Up to `count` build queries that cover the query distribution: k-means (kmeans.h, kProbeIters
  // Lloyd iterations from evenly spaced queries) over the build queries, and from each non-empty
  // cluster the query nearest its centroid. Evenly spaced queries alone follow the prompt's order,
  // so topics that fill few positions got no probe and their decode queries no nearby entry.
  std::vector<int64_t> cover_queries(const float* queries, int64_t m, int64_t count) const {
    constexpr int64_t kProbeIters = 4;
    std::vector<int64_t> picked;
    if (count <= 0) return picked;
    KMeansResult km;
    kmeans(queries, nullptr, m, dim_, spaced_points(m, count, /*centred=*/false), KMeansParams{kProbeIters}, km);
    std::vector<int64_t> nearest(static_cast<std::size_t>(count), -1);
    std::vector<float> nearest_dist(static_cast<std::size_t>(count), std::numeric_limits<float>::infinity());
    for (int64_t q = 0; q < m; ++q) {
      const int64_t c = km.assign[q];
      const float* x = queries + q * dim_;
      const float* centroid = km.centroids.data() + c * dim_;
      float dist = 0.0f;  // |q - c|^2
      for (int64_t d = 0; d < dim_; ++d) dist += (x[d] - centroid[d]) * (x[d] - centroid[d]);
      if (dist < nearest_dist[c]) {
        nearest_dist[c] = dist;
        nearest[c] = q;
      }
    }
    for (int64_t c = 0; c < count; ++c)
      if (nearest[c] >= 0) picked.push_back(nearest[c]);
    return picked;
  }

  // Step 6: searches with up to `repair_queries` build queries; when a search misses its query's
  // exact top-1 key, links the best key it found to that top-1 key (both ways, reserved slots).
  // This adds the long-range edges that co-occurrence alone lacks between query regions.
  // Returns the number of misses.
  int64_t repair_with_queries(const float* queries, int64_t m, const std::vector<int64_t>& top1) {
    const int64_t n_repair = std::min(m, params_.repair_queries);
    int64_t misses = 0;
    if (n_repair <= 0) return misses;
    const int64_t stride = std::max<int64_t>(1, m / n_repair);
    constexpr int64_t kRound = 512;
    std::vector<int64_t> picked;
    for (int64_t q = 0; q < m && static_cast<int64_t>(picked.size()) < n_repair; q += stride) picked.push_back(q);
    const int64_t total = static_cast<int64_t>(picked.size());
    std::vector<int64_t> missed_from(kRound);
    for (int64_t start = 0; start < total; start += kRound) {
      const int64_t round = std::min(kRound, total - start);
#pragma omp parallel for schedule(dynamic, 8)
      for (int64_t i = 0; i < round; ++i) {
        const int64_t q = picked[start + i];
        std::vector<Scored> found;
        beam_search(queries + q * dim_, params_.build_ef, -1, found);
        int64_t best = -1;
        float best_score = -std::numeric_limits<float>::infinity();
        bool hit = false;
        for (const Scored& f : found) {
          hit = hit || f.second == top1[q];
          if (f.first > best_score) {
            best_score = f.first;
            best = f.second;
          }
        }
        missed_from[i] = hit ? -1 : best;
      }
      for (int64_t i = 0; i < round; ++i) {
        if (missed_from[i] < 0) continue;
        const int64_t target = top1[picked[start + i]];
        link_back(missed_from[i], target, true);
        link_back(target, missed_from[i], true);
        ++misses;
      }
    }
    return misses;
  }

  // Sorts by descending weight (ties: smaller id) and keeps the first `count`.
  struct Heavier {  // descending score, then ascending id
    bool operator()(const Scored& a, const Scored& b) const {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
  };
  static void keep_heaviest(std::vector<Scored>& v, int64_t count) { keep_best(v, static_cast<std::size_t>(count), Heavier()); }

  // Step 4: links each key x of `ids` (in order) to the best keys of two beam searches: one with
  // x itself as the query, and one with the probe query that ranks x best relative to that
  // probe's current top-1 (the keys such queries visit are where x must be reachable from). x
  // becomes an entry point when it beats a probe's top-1. Rounds of keys search the graph in
  // parallel, then their links are written sequentially; a round is never larger than the linked
  // part of the graph, so a graph grown from one key stays navigable.
  void link_by_search(const std::vector<int64_t>& ids) {
    const int64_t total = static_cast<int64_t>(ids.size());
    const int64_t M = params_.max_degree;
    const int64_t m_link = std::max<int64_t>(2, (M - reserve_) / 2);
    const int64_t n_probes = static_cast<int64_t>(probe_best_.size());
    const int64_t ef = std::max(params_.build_ef, m_link);
    int64_t linked = size_ - total;  // keys already in the graph
    int64_t done = 0;
    if (entries_.empty() && total > 0) {  // empty graph: the first key starts it
      entries_.push_back(ids[0]);
      pack_entry_keys();
      done = 1;
      linked += 1;
    }
    std::vector<std::vector<Scored>> found;
    std::vector<float> probe_scores;
    while (done < total) {
      const int64_t round = std::min<int64_t>({total - done, std::max<int64_t>(1, linked), 1024});
      found.assign(static_cast<std::size_t>(round), {});
      probe_scores.assign(static_cast<std::size_t>(round * n_probes), 0.0f);
#pragma omp parallel for schedule(dynamic, 8) if (round > 16)
      for (int64_t i = 0; i < round; ++i) {
        const int64_t x = ids[done + i];
        std::vector<Scored> by_key;
        beam_search(key(x), ef, x, by_key);
        keep_heaviest(by_key, m_link);
        std::vector<Scored>& out = found[i];
        if (n_probes > 0) {
          float* ps = probe_scores.data() + i * n_probes;
          int64_t best_probe = 0;
          for (int64_t r = 0; r < n_probes; ++r) {
            ps[r] = ip_(probes_.data() + r * dim_, key(x), dim_);
            if (ps[r] - probe_best_[r].first > ps[best_probe] - probe_best_[best_probe].first) best_probe = r;
          }
          beam_search(probes_.data() + best_probe * dim_, ef, x, out);
          keep_heaviest(out, (m_link + 1) / 2);
        }
        for (const Scored& f : by_key) {
          if (static_cast<int64_t>(out.size()) >= m_link) break;
          if (std::none_of(out.begin(), out.end(), [&](const Scored& o) { return o.second == f.second; }))
            out.push_back(f);
        }
      }
      bool entries_changed = false;
      for (int64_t i = 0; i < round; ++i) {
        const int64_t x = ids[done + i];
        uint32_t* row = neighbors(x);
        int64_t deg = degree_[x];
        for (const Scored& f : found[i]) {
          if (deg >= M) break;
          row[deg++] = static_cast<uint32_t>(f.second);
          link_back(f.second, x);
        }
        degree_[x] = static_cast<uint16_t>(deg);
        for (int64_t r = 0; r < n_probes; ++r) {
          const float ps = probe_scores[i * n_probes + r];
          if (ps > probe_best_[r].first) {
            probe_best_[r] = Scored(ps, x);
            entries_changed = true;
          }
        }
      }
      done += round;
      linked += round;
      if (entries_changed) refresh_entries();
      if (n_probes == 0 && static_cast<int64_t>(entries_.size()) < params_.n_entry) refresh_entries_by_norm();
    }
  }

  // entries_ = the probes' distinct top-1 keys, then popular keys, up to n_entry.
  void refresh_entries() {
    entries_.clear();
    auto put = [&](int64_t id) {
      if (static_cast<int64_t>(entries_.size()) < params_.n_entry &&
          std::find(entries_.begin(), entries_.end(), id) == entries_.end())
        entries_.push_back(id);
    };
    for (const Scored& p : probe_best_) put(p.second);
    for (int64_t id : popular_) put(id);
    pack_entry_keys();
  }

  // entry_keys_ = the entries' keys, contiguous (one pass scores them all); entry_slot_ = their
  // upper slots (-1: not an upper key).
  void pack_entry_keys() {
    entry_keys_.resize(entries_.size() * static_cast<std::size_t>(dim_));
    entry_slot_.assign(entries_.size(), -1);
    entry_ids_.assign(entries_.begin(), entries_.end());
    std::map<uint32_t, uint64_t> marks;
    for (const int64_t e : entries_) marks[static_cast<uint32_t>(e >> 6)] |= uint64_t(1) << (e & 63);
    entry_marks_.assign(marks.begin(), marks.end());
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      std::copy(key(entries_[i]), key(entries_[i]) + dim_, entry_keys_.begin() + static_cast<std::ptrdiff_t>(i) * dim_);
      const auto it = upper_slot_.find(entries_[i]);
      if (it != upper_slot_.end()) entry_slot_[i] = static_cast<int32_t>(it->second);
    }
  }

  // Adds the edge y -> x: into a free slot, else replacing the weakest (by inner product with y)
  // of y's reserved slots when x is stronger, or always when `force`.
  void link_back(int64_t y, int64_t x, bool force = false) {
    const int64_t M = params_.max_degree;
    uint32_t* row = neighbors(y);
    const int64_t deg = degree_[y];
    for (int64_t j = 0; j < deg; ++j)
      if (row[j] == static_cast<uint32_t>(x)) return;
    if (deg < M) {
      row[deg] = static_cast<uint32_t>(x);
      degree_[y] = static_cast<uint16_t>(deg + 1);
      return;
    }
    const float* yv = key(y);
    int64_t weakest = -1;
    float weakest_score = force ? std::numeric_limits<float>::infinity() : score(yv, x);
    for (int64_t j = M - reserve_; j < M; ++j) {
      const float s = score(yv, row[j]);
      if (s < weakest_score) {
        weakest_score = s;
        weakest = j;
      }
    }
    if (weakest >= 0) row[weakest] = static_cast<uint32_t>(x);
  }

  // Without build queries, the entry points are the largest-norm keys linked so far.
  void refresh_entries_by_norm() {
    std::vector<Scored> norms;
    norms.reserve(static_cast<std::size_t>(size_));
    for (int64_t i = 0; i < size_; ++i)
      if (degree_[i] > 0 || i == entries_.front()) norms.emplace_back(score(key(i), i), i);
    keep_heaviest(norms, params_.n_entry);
    entries_.clear();
    for (const Scored& s : norms) entries_.push_back(s.second);
    pack_entry_keys();
  }

  const GraphBuildParams params_;        // build knobs
  const InnerProductRowsFn ip_rows_;     // inner products with contiguous rows (the entries)
  int64_t reserve_;                      // slots per key kept for links made after the projection
  std::vector<uint32_t> adjacency_;      // [size_, max_degree] neighbor ids
  std::vector<uint16_t> degree_;         // edges used per key
  std::vector<int64_t> entries_;         // entry keys of every search
  std::vector<float> entry_keys_;        // [entries, dim] their keys, contiguous
  std::vector<int32_t> entry_slot_;      // [entries] their upper slots, -1 if none
  std::vector<uint32_t> entry_ids_;      // entries_ as uint32 (the beam's id type)
  std::vector<std::pair<uint32_t, uint64_t>> entry_marks_;  // their visited bits, by word
  std::vector<int64_t> upper_ids_;       // [upper] key of each upper slot (step 7)
  std::unordered_map<int64_t, std::size_t> upper_slot_;  // key -> upper slot
  std::vector<float> upper_keys_;        // [upper, dim] their keys, contiguous
  std::vector<uint32_t> upper_adjacency_;  // [upper, upper_degree] upper slots
  std::vector<uint16_t> upper_deg_;      // edges used per upper slot
  std::vector<float> probes_;            // [n_probes, dim] build queries kept to place new keys
  std::vector<Scored> probe_best_;       // each probe's current top-1 (score, key)
  std::vector<int64_t> popular_;         // keys in the most build-query lists
};

}  // namespace lckv
