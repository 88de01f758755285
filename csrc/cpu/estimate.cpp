// Glue for lckv::centroid_estimate (the retrieval policy's estimate of the non-retrieved keys):
// argument checks, zero-copy reads (values and assignments may be strided views of growable
// buffers), GIL released.
#include <memory>
#include <optional>
#include <vector>

#include "bind.h"
#include "checks.h"
#include "cluster_state.h"
#include "lckv/centroid_estimate.h"
// The index cores get hidden visibility like the pybind11 module that wraps them (as in index.cpp).
#pragma GCC visibility push(hidden)
#include "lckv/vector_index.h"
#pragma GCC visibility pop

namespace lckv {
namespace {

std::tuple<torch::Tensor, torch::Tensor> centroid_estimate_cpu(
    const torch::Tensor& q, const torch::Tensor& centroids, const torch::Tensor& counts,
    const torch::Tensor& value_sums, const torch::Tensor& assign, const torch::Tensor& values,
    const torch::Tensor& indices, double scale, bool lse_only) {
  check_cpu_f32(q, "q", 3, "[batch, q_heads, head_dim]");
  check_cluster_state(centroids, counts, value_sums);
  check_cpu_float(values, "values");
  check_dim(values, "values", 4, "[batch, kv_heads, rows, head_dim]");
  const int64_t B = centroids.size(0), H = centroids.size(1), D = centroids.size(3);
  check_group_query(q, B, H, D);
  TORCH_CHECK_VALUE(values.size(0) == B && values.size(1) == H && values.size(3) == D && values.stride(3) == 1,
                    "values must have shape [", B, ", ", H, ", rows, ", D, "] with a contiguous last dim, got ",
                    values.sizes(), " strides ", values.strides());
  TORCH_CHECK_TYPE(indices.scalar_type() == torch::kInt64, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 3 && indices.size(0) == B && indices.size(1) == H,
                    "indices must have shape [", B, ", ", H, ", n], got ", indices.sizes());
  const auto q_c = q.contiguous(), cent_c = centroids.contiguous(), counts_c = counts.contiguous();
  const auto vs_c = value_sums.contiguous(), idx_c = indices.contiguous();
  const int64_t rows = values.size(2);
  // indices are then checked to lie in [-1, rows): repeats dropped by a bitmap of the rows
  EstimateProblem p = describe_cluster_state(cent_c, counts_c, vs_c, assign, rows, q.size(1) / H, scale);
  TORCH_CHECK_VALUE(idx_c.numel() == 0 || (idx_c.max().item<int64_t>() < rows && idx_c.min().item<int64_t>() >= -1),
                    "indices must be row ids in [0, ", rows, ") or -1");
  auto out = torch::empty({lse_only ? 0 : B, q.size(1), D}, torch::kFloat32);
  auto lse = torch::empty({B, q.size(1)}, torch::kFloat32);
  p.n_selected = idx_c.size(2);
  p.q = q_c.data_ptr<float>();
  p.values = values.data_ptr();
  p.vs0 = values.stride(0);
  p.vs1 = values.stride(1);
  p.vs2 = values.stride(2);
  p.indices = idx_c.data_ptr<int64_t>();
  p.out = lse_only ? nullptr : out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  const int64_t bad = first_bad_assignment(p);  // reads only the retrieved rows' cluster ids
  if (bad >= 0) {
    const int64_t bh = bad / p.n_selected, row = p.indices[bad];
    const int64_t cluster = p.assign[(bh / H) * p.as0 + (bh % H) * p.as1 + row];
    TORCH_CHECK_VALUE(false, "assign must hold cluster ids in [0, ", p.clusters, "): retrieved row ", row, " of batch ",
                      bh / H, ", kv head ", bh % H, " has cluster ", cluster);
  }
  {
    pybind11::gil_scoped_release no_gil;
    with_row_type(values.scalar_type(), [&](auto row) { centroid_estimate<decltype(row)>(p); });
  }
  return {out, lse};
}

// The estimate_add_rows problem of new rows k32/v32 [B, H, n, D] (float32, contiguous) joining the
// cluster state (centroids, half_norms, counts and value_sums; valid [B, n] bool or None). Checks
// everything; `held` keeps the tensors the problem points into (the output clusters first). counts
// and value_sums are updated in place through the problem.
EstimateAddProblem describe_add(const torch::Tensor& k32, const torch::Tensor& v32,
                                const c10::optional<torch::Tensor>& valid, const torch::Tensor& centroids,
                                const torch::Tensor& half_norms, const torch::Tensor& counts,
                                const torch::Tensor& value_sums, std::vector<torch::Tensor>& held) {
  check_cluster_state(centroids, counts, value_sums);
  check_cpu_f32(half_norms, "half_norms", 3, "[batch, kv_heads, clusters]");
  const int64_t B = k32.size(0), H = k32.size(1), n = k32.size(2), D = k32.size(3);
  TORCH_CHECK_VALUE(centroids.size(0) == B && centroids.size(1) == H && centroids.size(3) == D,
                    "centroids must have shape [", B, ", ", H, ", clusters, ", D, "] (the keys' batch, kv heads and "
                    "head_dim), got ", centroids.sizes());
  TORCH_CHECK_VALUE(centroids.size(2) > 0, "centroids must hold at least one cluster, got shape ", centroids.sizes());
  TORCH_CHECK_VALUE(half_norms.sizes() == counts.sizes(), "half_norms must have shape ", counts.sizes(), ", got ",
                    half_norms.sizes());
  TORCH_CHECK_VALUE(counts.is_contiguous() && value_sums.is_contiguous(),
                    "counts and value_sums must be contiguous (they are updated in place)");
  held = {torch::empty({B, H, n}, torch::kInt64), centroids.contiguous(), half_norms.contiguous()};
  EstimateAddProblem p;
  if (valid.has_value()) {
    TORCH_CHECK_TYPE(valid->scalar_type() == torch::kBool, "valid must be bool, got ", valid->scalar_type());
    TORCH_CHECK_VALUE(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == n, "valid must have shape [", B,
                      ", ", n, "], got ", valid->sizes());
    held.push_back(valid->contiguous());
    p.valid = held.back().data_ptr<bool>();
  }
  p.batch = B;
  p.kv_heads = H;
  p.head_dim = D;
  p.clusters = centroids.size(2);
  p.n = n;
  p.keys = k32.data_ptr<float>();
  p.values = v32.data_ptr<float>();
  p.centroids = held[1].data_ptr<float>();
  p.half_norms = held[2].data_ptr<float>();
  p.counts = counts.data_ptr<float>();
  p.value_sums = value_sums.data_ptr<float>();
  p.assign = held[0].data_ptr<int64_t>();
  return p;
}

bool all_finite(const torch::Tensor& x32) {
  const float* x = x32.data_ptr<float>();
  bool finite = true;
  for (int64_t i = 0; i < x32.numel(); ++i) finite &= std::isfinite(x[i]);
  return finite;
}

// lckv::estimate_add_rows: the rows a decode step offloads join the estimate's clusters.
torch::Tensor estimate_add_cpu(const torch::Tensor& keys, const torch::Tensor& values,
                               const c10::optional<torch::Tensor>& valid, const torch::Tensor& centroids,
                               const torch::Tensor& half_norms, torch::Tensor& counts, torch::Tensor& value_sums) {
  check_cpu_f32(keys, "keys", 4, "[batch, kv_heads, n, head_dim]");
  check_cpu_f32(values, "values", 4, "[batch, kv_heads, n, head_dim]");
  TORCH_CHECK_VALUE(values.sizes() == keys.sizes(), "values must have the shape of keys ", keys.sizes(), ", got ",
                    values.sizes());
  const auto k_c = keys.contiguous(), v_c = values.contiguous();
  std::vector<torch::Tensor> held;
  const EstimateAddProblem p = describe_add(k_c, v_c, valid, centroids, half_norms, counts, value_sums, held);
  TORCH_CHECK_VALUE(all_finite(k_c), "keys contains NaN or inf");
  {
    pybind11::gil_scoped_release no_gil;
    estimate_add_rows(p);
  }
  return held[0];
}

// The rows a decode step offloads, in one call: keys [B, H, n, D] (float32/float16/bfloat16, any
// strides) join heads[b * H + h] (none when heads is empty) and, with `estimate` = (centroids,
// half_norms, counts, value_sums), the estimate's clusters (estimate_add_rows; valid [B, n] or
// None). Returns the rows' clusters [B, H, n] int64, or None without an estimate. Everything is
// checked before anything changes, so a bad call leaves the indexes and the estimate as they were.
std::optional<torch::Tensor> offload_rows_cpu(
    const std::vector<std::shared_ptr<VectorIndex>>& heads, const torch::Tensor& keys, const torch::Tensor& values,
    const c10::optional<torch::Tensor>& valid,
    const std::optional<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>>& estimate) {
  check_cpu_float(keys, "keys");
  check_cpu_float(values, "values");
  check_dim(keys, "keys", 4, "[batch, kv_heads, n, head_dim]");
  TORCH_CHECK_VALUE(values.sizes() == keys.sizes(), "values must have the shape of keys ", keys.sizes(), ", got ",
                    values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == keys.scalar_type(), "values must have the dtype of keys (",
                   keys.scalar_type(), "), got ", values.scalar_type());
  const int64_t B = keys.size(0), H = keys.size(1), n = keys.size(2), D = keys.size(3);
  TORCH_CHECK_VALUE(heads.empty() || static_cast<int64_t>(heads.size()) == B * H,
                    "heads must be empty (no index) or hold batch * kv_heads = ", B * H, " indexes, got ", heads.size());
  for (std::size_t i = 0; i < heads.size(); ++i) {
    TORCH_CHECK_VALUE(heads[i] != nullptr, "heads[", i, "] is None");
    TORCH_CHECK_VALUE(heads[i]->dim() == D, "heads[", i, "] has dim ", heads[i]->dim(), ", keys have head_dim ", D);
    check_index_growth(heads[i]->size(), n);
  }
  const auto k32 = keys.to(torch::kFloat32).contiguous();
  TORCH_CHECK_VALUE(all_finite(k32), "keys contains NaN or inf");
  torch::Tensor v32;
  std::vector<torch::Tensor> held;
  EstimateAddProblem p;
  if (estimate.has_value()) {
    const auto& [centroids, half_norms, counts, value_sums] = *estimate;
    v32 = values.to(torch::kFloat32).contiguous();
    p = describe_add(k32, v32, valid, centroids, half_norms, counts, value_sums, held);  // counts, sums: updated
  }
  const float* k_ptr = k32.data_ptr<float>();
  if (n > 0) {
    pybind11::gil_scoped_release no_gil;
    const int64_t tasks = static_cast<int64_t>(heads.size());
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1 && n >= 256)
    for (int64_t t = 0; t < tasks; ++t) heads[t]->add(k_ptr + t * n * D, n);
    if (estimate.has_value()) estimate_add_rows(p);
  }
  if (!estimate.has_value()) return std::nullopt;
  return held[0];
}

}  // namespace

void bind_estimate(pybind11::module_& m) {
  m.def("offload_rows", &offload_rows_cpu, pybind11::arg("heads"), pybind11::arg("keys"), pybind11::arg("values"),
        pybind11::arg("valid") = pybind11::none(), pybind11::arg("estimate") = pybind11::none(),
        "The rows a decode step offloads, in one call: keys [B, H, n, D] (float32/float16/bfloat16, any strides) "
        "join heads[b * H + h] (heads may be empty) and, with estimate = (centroids, half_norms, counts, value_sums), "
        "the estimate's clusters (valid [B, n] bool or None). Returns their clusters [B, H, n] int64, or None "
        "without an estimate; see lckv/centroid_estimate.h.");
  m.def("estimate_add", &estimate_add_cpu, pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("valid"),
        pybind11::arg("centroids"), pybind11::arg("half_norms"), pybind11::arg("counts"), pybind11::arg("value_sums"),
        "New rows join the estimate's clusters (nearest centroid in L2; valid rows add to counts and value sums, "
        "in place); returns their clusters [B, H, n] int64; see lckv/centroid_estimate.h.");
  m.def("centroid_estimate", &centroid_estimate_cpu, pybind11::arg("q"), pybind11::arg("centroids"),
        pybind11::arg("counts"), pybind11::arg("value_sums"), pybind11::arg("assign"), pybind11::arg("values"),
        pybind11::arg("indices"), pybind11::arg("scale"), pybind11::arg("lse_only") = false,
        "Attention estimate of the non-retrieved keys from per-cluster state (values float32, float16 or bfloat16, "
        "read in place): (out [B, Hq, D], lse [B, Hq]) "
        "float32; see lckv/centroid_estimate.h.");
}

}  // namespace lckv
