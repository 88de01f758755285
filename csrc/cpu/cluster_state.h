// Glue shared by the entry points that read the retrieval estimate's cluster state
// (estimate.cpp: centroid_estimate, estimate_add, offload_rows; decode.cpp: decode_cluster_step).
#pragma once

#include "checks.h"
#include "lckv/centroid_estimate.h"

namespace lckv {

// centroids [B, H, C, D], counts [B, H, C] and value_sums [B, H, C, D], float32 on the CPU.
inline void check_cluster_state(const torch::Tensor& centroids, const torch::Tensor& counts,
                                const torch::Tensor& value_sums) {
  check_cpu_f32(centroids, "centroids", 4, "[batch, kv_heads, clusters, head_dim]");
  check_cpu_f32(counts, "counts", 3, "[batch, kv_heads, clusters]");
  check_cpu_f32(value_sums, "value_sums", 4, "[batch, kv_heads, clusters, head_dim]");
  TORCH_CHECK_VALUE(counts.sizes() == centroids.sizes().slice(0, 3), "counts must have shape ",
                    centroids.sizes().slice(0, 3), ", got ", counts.sizes());
  TORCH_CHECK_VALUE(value_sums.sizes() == centroids.sizes(), "value_sums must have shape ", centroids.sizes(),
                    ", got ", value_sums.sizes());
}

// The cluster state over `rows` offloaded rows as an EstimateProblem for query groups of `group`
// heads: contiguous centroids, counts and value_sums, and assign [B, H, rows] int64 (one cluster
// per row) with a contiguous last dim. q, values, indices, out and lse are left to the caller.
inline EstimateProblem describe_cluster_state(const torch::Tensor& centroids, const torch::Tensor& counts,
                                              const torch::Tensor& value_sums, const torch::Tensor& assign,
                                              int64_t rows, int64_t group, double scale) {
  check_cluster_state(centroids, counts, value_sums);
  TORCH_CHECK_VALUE(centroids.is_contiguous() && counts.is_contiguous() && value_sums.is_contiguous(),
                    "centroids, counts and value_sums must be contiguous");
  const int64_t B = centroids.size(0), H = centroids.size(1);
  TORCH_CHECK_TYPE(assign.scalar_type() == torch::kInt64, "assign must be int64, got ", assign.scalar_type());
  TORCH_CHECK_VALUE(assign.dim() == 3 && assign.size(0) == B && assign.size(1) == H && assign.size(2) == rows &&
                        assign.stride(2) == 1,
                    "assign must have shape [", B, ", ", H, ", ", rows,
                    "] (one cluster per offloaded row) with a contiguous last dim, got ", assign.sizes());
  EstimateProblem p;
  p.batch = B;
  p.kv_heads = H;
  p.group = group;
  p.head_dim = centroids.size(3);
  p.clusters = centroids.size(2);
  p.centroids = centroids.data_ptr<float>();
  p.counts = counts.data_ptr<float>();
  p.value_sums = value_sums.data_ptr<float>();
  p.assign = assign.data_ptr<int64_t>();
  p.as0 = assign.stride(0);
  p.as1 = assign.stride(1);
  p.rows = rows;
  p.scale = static_cast<float>(scale);
  return p;
}

}  // namespace lckv
