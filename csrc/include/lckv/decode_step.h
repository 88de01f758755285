// One decode step of the retrieval policy with a ClusterIndex, for every (batch, kv head) of a layer
// in one parallel region (lckv/policies/retrieval.py, RetrievalPolicy with index="cluster" and
// group_rank="probability"). Per (batch, kv head) and its query group:
//   1. ClusterIndex::search_group: the k offloaded rows of largest summed probability;
//   2. sparse attention over those rows of the offloaded K/V            -> state S;
//   3. the centroid estimate of the offloaded rows not retrieved (optional) -> state E;
//   4. attention over the resident rows (sink + window), all of them      -> state R;
//   out, lse = merge(R, merge(S, E)) by log-sum-exp (the order the step's torch glue merges in).
// Each piece is the single-task form of its own op (ClusterIndex::search_group,
// sparse_attention_kv_head, estimate_pair, merge_state_row), so the fused step computes what the
// separate calls do; what it saves is their glue: one fork/join instead of four, no temporaries,
// no Python between them. Torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "lckv/centroid_estimate.h"
#include "lckv/cluster_index.h"
#include "lckv/merge_states.h"
#include "lckv/per_thread.h"
#include "lckv/sparse_attention.h"

namespace lckv {

// Rows of one K/V pair: row r of (batch b, kv head h) at k + b * stride_b + h * stride_h + r * stride_s
// (head_dim contiguous); the same strides for v.
template <typename T>
struct KvRows {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int64_t rows = 0;  // per (batch, kv head)
};

// T: the element type of the offloaded (host store) rows; R: of the resident rows (T, or float for
// a 16-bit host store under a float32 model). Every row is converted exactly to float.
template <typename T, typename R = T>
struct DecodeStepProblem {
  int64_t batch = 0, kv_heads = 0, group = 0, head_dim = 0, k = 0;
  const float* q = nullptr;                      // [batch, kv_heads * group, head_dim], unscaled
  const ClusterIndex* const* indexes = nullptr;  // [batch * kv_heads]: ids are rows of `offloaded`
  SearchParams params;
  float scale = 1.0f;
  KvRows<T> offloaded;                           // the host store (rows = the indexes' size)
  KvRows<R> resident;                            // sink + window (rows may be 0)
  const EstimateProblem* estimate = nullptr;     // cluster state of the offloaded rows; nullptr: none
  float* out = nullptr;                          // [batch, kv_heads * group, head_dim]
  float* lse = nullptr;                          // [batch, kv_heads * group]
  int64_t* indices = nullptr;                    // [batch, kv_heads, k]: retrieved rows, -1 = none
};

struct DecodeStepScratch {
  std::vector<float> probs, part_out, part_lse;
  std::vector<int64_t> resident_rows;  // 0, 1, ..., resident.rows - 1
};

// Runs the step; returns -1, or the first offloaded row (in task order) whose estimate cluster id
// was outside [0, clusters) (that row was left out of the estimate; the caller reports it).
template <typename T, typename R>
int64_t decode_step(const DecodeStepProblem<T, R>& p) {
  const int64_t tasks = p.batch * p.kv_heads, G = p.group, D = p.head_dim;
  const InnerProductRowsFn ip_rows = inner_product_rows_for(simd_level_for(static_cast<std::size_t>(D)));
  const ClusterWeightsFn weights = cluster_weights_for_cpu();
  std::vector<int64_t> bad(static_cast<std::size_t>(tasks), -1);
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / p.kv_heads, h = t % p.kv_heads;
    const int64_t row = t * G;  // the group's first query head (b * kv_heads * G + h * G)
    const float* q = p.q + row * D;
    float* out = p.out + row * D;
    float* lse = p.lse + row;
    int64_t* ids = p.indices + t * p.k;
    DecodeStepScratch& s = per_thread<DecodeStepScratch, DecodeStepScratch>();
    s.probs.resize(static_cast<std::size_t>(p.k));
    s.part_out.resize(static_cast<std::size_t>(G * D));
    s.part_lse.resize(static_cast<std::size_t>(G));
    // 1-2. search, then the retrieved rows
    p.indexes[t]->search_group(q, G, p.k, p.params, p.scale, s.probs.data(), ids, false);
    const KvRows<T>& off = p.offloaded;
    const T* off_v = off.v + b * off.v_stride_b + h * off.v_stride_h;
    sparse_attention_kv_head(q, G, D, off.k + b * off.k_stride_b + h * off.k_stride_h, off.k_stride_s, off_v,
                             off.v_stride_s, ids, p.k, p.scale, out, lse);
    // 3. the estimate of the rest
    if (p.estimate != nullptr) {
      bad[t] = estimate_pair(*p.estimate, t, q, off_v, off.v_stride_s, ids, p.k, s.part_out.data(), s.part_lse.data(),
                             weights, ip_rows, /*rows_distinct=*/true);  // a search returns each row once
      for (int64_t g = 0; g < G; ++g)
        merge_state_row(out + g * D, lse[g], s.part_out.data() + g * D, s.part_lse[g], out + g * D, lse + g, D);
    }
    // 4. the resident rows, merged first as the torch glue does
    const KvRows<R>& res = p.resident;
    if (res.rows > 0) {
      if (static_cast<int64_t>(s.resident_rows.size()) < res.rows) {
        const int64_t from = static_cast<int64_t>(s.resident_rows.size());
        s.resident_rows.resize(static_cast<std::size_t>(res.rows));
        for (int64_t r = from; r < res.rows; ++r) s.resident_rows[static_cast<std::size_t>(r)] = r;
      }
      sparse_attention_kv_head(q, G, D, res.k + b * res.k_stride_b + h * res.k_stride_h, res.k_stride_s,
                               res.v + b * res.v_stride_b + h * res.v_stride_h, res.v_stride_s,
                               s.resident_rows.data(), res.rows, p.scale, s.part_out.data(), s.part_lse.data());
      for (int64_t g = 0; g < G; ++g)
        merge_state_row(s.part_out.data() + g * D, s.part_lse[g], out + g * D, lse[g], out + g * D, lse + g, D);
    }
  }
  for (int64_t t = 0; t < tasks; ++t)
    if (bad[static_cast<std::size_t>(t)] >= 0) return bad[static_cast<std::size_t>(t)];
  return -1;
}

}  // namespace lckv
