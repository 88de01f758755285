// Glue for lckv::centroid_estimate (the retrieval policy's estimate of the non-retrieved keys):
// argument checks, zero-copy reads (values and assignments may be strided views of growable
// buffers), GIL released.
#include "bind.h"
#include "checks.h"
#include "lckv/centroid_estimate.h"

namespace lckv {
namespace {

std::tuple<torch::Tensor, torch::Tensor> centroid_estimate_cpu(
    const torch::Tensor& q, const torch::Tensor& centroids, const torch::Tensor& counts,
    const torch::Tensor& value_sums, const torch::Tensor& assign, const torch::Tensor& values,
    const torch::Tensor& indices, double scale, bool lse_only) {
  check_cpu_f32(q, "q", 3, "[batch, q_heads, head_dim]");
  check_cpu_f32(centroids, "centroids", 4, "[batch, kv_heads, clusters, head_dim]");
  check_cpu_f32(counts, "counts", 3, "[batch, kv_heads, clusters]");
  check_cpu_f32(value_sums, "value_sums", 4, "[batch, kv_heads, clusters, head_dim]");
  check_cpu_f32(values, "values", 4, "[batch, kv_heads, rows, head_dim]");
  const int64_t B = centroids.size(0), H = centroids.size(1), C = centroids.size(2), D = centroids.size(3);
  check_group_query(q, B, H, D);
  TORCH_CHECK_VALUE(counts.sizes() == centroids.sizes().slice(0, 3), "counts must have shape ",
                    centroids.sizes().slice(0, 3), ", got ", counts.sizes());
  TORCH_CHECK_VALUE(value_sums.sizes() == centroids.sizes(), "value_sums must have shape ", centroids.sizes(),
                    ", got ", value_sums.sizes());
  TORCH_CHECK_VALUE(values.size(0) == B && values.size(1) == H && values.size(3) == D && values.stride(3) == 1,
                    "values must have shape [", B, ", ", H, ", rows, ", D, "] with a contiguous last dim, got ",
                    values.sizes(), " strides ", values.strides());
  TORCH_CHECK_TYPE(assign.scalar_type() == torch::kInt64, "assign must be int64, got ", assign.scalar_type());
  TORCH_CHECK_VALUE(assign.dim() == 3 && assign.size(0) == B && assign.size(1) == H &&
                        assign.size(2) == values.size(2) && assign.stride(2) == 1,
                    "assign must have shape [", B, ", ", H, ", ", values.size(2), "] (one cluster per value row) "
                    "with a contiguous last dim, got ", assign.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == torch::kInt64, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 3 && indices.size(0) == B && indices.size(1) == H,
                    "indices must have shape [", B, ", ", H, ", n], got ", indices.sizes());
  const auto q_c = q.contiguous(), cent_c = centroids.contiguous(), counts_c = counts.contiguous();
  const auto vs_c = value_sums.contiguous(), idx_c = indices.contiguous();
  const int64_t rows = values.size(2);
  TORCH_CHECK_VALUE(idx_c.numel() == 0 || (idx_c.max().item<int64_t>() < rows && idx_c.min().item<int64_t>() >= -1),
                    "indices must be row ids in [0, ", rows, ") or -1");
  auto out = torch::empty({lse_only ? 0 : B, q.size(1), D}, torch::kFloat32);
  auto lse = torch::empty({B, q.size(1)}, torch::kFloat32);
  EstimateProblem p;
  p.batch = B;
  p.kv_heads = H;
  p.group = q.size(1) / H;
  p.head_dim = D;
  p.clusters = C;
  p.n_selected = idx_c.size(2);
  p.q = q_c.data_ptr<float>();
  p.centroids = cent_c.data_ptr<float>();
  p.counts = counts_c.data_ptr<float>();
  p.value_sums = vs_c.data_ptr<float>();
  p.assign = assign.data_ptr<int64_t>();
  p.as0 = assign.stride(0);
  p.as1 = assign.stride(1);
  p.values = values.data_ptr<float>();
  p.vs0 = values.stride(0);
  p.vs1 = values.stride(1);
  p.vs2 = values.stride(2);
  p.indices = idx_c.data_ptr<int64_t>();
  p.rows = rows;  // indices were checked to lie in [-1, rows): repeats dropped by a bitmap
  p.scale = static_cast<float>(scale);
  p.out = lse_only ? nullptr : out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  const int64_t bad = first_bad_assignment(p);  // reads only the retrieved rows' cluster ids
  if (bad >= 0) {
    const int64_t bh = bad / p.n_selected, row = p.indices[bad];
    const int64_t cluster = p.assign[(bh / H) * p.as0 + (bh % H) * p.as1 + row];
    TORCH_CHECK_VALUE(false, "assign must hold cluster ids in [0, ", C, "): retrieved row ", row, " of batch ",
                      bh / H, ", kv head ", bh % H, " has cluster ", cluster);
  }
  {
    pybind11::gil_scoped_release no_gil;
    centroid_estimate(p);
  }
  return {out, lse};
}

}  // namespace

void bind_estimate(pybind11::module_& m) {
  m.def("centroid_estimate", &centroid_estimate_cpu, pybind11::arg("q"), pybind11::arg("centroids"),
        pybind11::arg("counts"), pybind11::arg("value_sums"), pybind11::arg("assign"), pybind11::arg("values"),
        pybind11::arg("indices"), pybind11::arg("scale"), pybind11::arg("lse_only") = false,
        "Attention estimate of the non-retrieved keys from per-cluster state: (out [B, Hq, D], lse [B, Hq]) "
        "float32; see lckv/centroid_estimate.h.");
}

}  // namespace lckv
