// Glue for lckv::decode_step (one fused decode step of the retrieval policy with ClusterIndex
// heads): argument checks, zero-copy strided reads of the host store and the resident rows, GIL
// released.
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "bind.h"
#include "checks.h"
#include "cluster_state.h"
#include "search_params.h"
// The cores get hidden visibility like the pybind11 module that wraps them (as in index.cpp).
#pragma GCC visibility push(hidden)
#include "lckv/decode_step.h"
#pragma GCC visibility pop

namespace lckv {
namespace {

namespace py = pybind11;

// k, v [batch, kv_heads, rows, head_dim] of one dtype; a non-unit head_dim stride is made contiguous.
template <typename T>
KvRows<T> kv_rows(torch::Tensor& k, torch::Tensor& v) {
  if (k.stride(3) != 1 && k.size(3) > 1) k = k.contiguous();
  if (v.stride(3) != 1 && v.size(3) > 1) v = v.contiguous();
  KvRows<T> r;
  r.k = reinterpret_cast<const T*>(k.data_ptr());
  r.v = reinterpret_cast<const T*>(v.data_ptr());
  r.k_stride_b = k.stride(0);
  r.k_stride_h = k.stride(1);
  r.k_stride_s = k.stride(2);
  r.v_stride_b = v.stride(0);
  r.v_stride_h = v.stride(1);
  r.v_stride_s = v.stride(2);
  r.rows = k.size(2);
  return r;
}

void check_kv(const torch::Tensor& k, const torch::Tensor& v, const char* k_name, const char* v_name,
              int64_t batch, int64_t kv_heads, int64_t head_dim) {
  check_cpu_float(k, k_name);
  check_cpu_float(v, v_name);
  check_dim(k, k_name, 4, "[batch, kv_heads, rows, head_dim]");
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(1) == kv_heads && k.size(3) == head_dim, k_name,
                    " must have shape [", batch, ", ", kv_heads, ", rows, ", head_dim, "], got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), v_name, " must have the shape of ", k_name, " ", k.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), v_name, " must have the dtype of ", k_name, " (",
                   k.scalar_type(), "), got ", v.scalar_type());
}

template <typename T, typename R>
void run(DecodeStepProblem<T, R>& p, torch::Tensor& off_k, torch::Tensor& off_v, torch::Tensor& res_k,
         torch::Tensor& res_v, const EstimateProblem* estimate) {
  p.offloaded = kv_rows<T>(off_k, off_v);
  p.resident = kv_rows<R>(res_k, res_v);
  p.estimate = estimate;
  int64_t bad;
  {
    py::gil_scoped_release no_gil;
    bad = decode_step(p);
  }
  TORCH_CHECK_VALUE(bad < 0, "assign must hold cluster ids in [0, ", estimate ? estimate->clusters : 0,
                    "): the cluster id of offloaded row ", bad, " is outside that range");
}

// heads: [batch * kv_heads] ClusterIndex, batch-major. estimate: (centroids [B, H, C, D], counts
// [B, H, C], value_sums [B, H, C, D], assign [B, H, rows]) float32/int64, or None.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> decode_cluster_step_py(
    const std::vector<std::shared_ptr<ClusterIndex>>& heads, const torch::Tensor& q, torch::Tensor offloaded_k,
    torch::Tensor offloaded_v, torch::Tensor resident_k, torch::Tensor resident_v, int64_t k, double scale,
    double scan, double expand,
    const std::optional<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>>& estimate) {
  check_cpu_f32(q, "q", 3, "[batch, q_heads, head_dim]");
  TORCH_CHECK_VALUE(q.is_contiguous(), "q must be contiguous, got strides ", q.strides());
  check_dim(offloaded_k, "offloaded_k", 4, "[batch, kv_heads, rows, head_dim]");
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2), kv_heads = offloaded_k.size(1);
  TORCH_CHECK_VALUE(kv_heads > 0 && q_heads % kv_heads == 0, "q_heads (", q_heads,
                    ") must be a multiple of the offloaded kv_heads (", kv_heads, ")");
  check_kv(offloaded_k, offloaded_v, "offloaded_k", "offloaded_v", batch, kv_heads, head_dim);
  check_kv(resident_k, resident_v, "resident_k", "resident_v", batch, kv_heads, head_dim);
  const bool resident_f32 = resident_k.scalar_type() == torch::kFloat32;
  TORCH_CHECK_TYPE(resident_f32 || resident_k.scalar_type() == offloaded_k.scalar_type(),
                   "resident_k must have the dtype of offloaded_k (", offloaded_k.scalar_type(),
                   ") or be float32, got ", resident_k.scalar_type());
  check_k(k);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, "scale must be a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(static_cast<int64_t>(heads.size()) == batch * kv_heads, "heads must hold batch * kv_heads = ",
                    batch * kv_heads, " indexes (batch-major), got ", heads.size());
  const int64_t rows = offloaded_k.size(2);
  std::vector<const ClusterIndex*> indexes(heads.size());
  for (std::size_t i = 0; i < heads.size(); ++i) {
    TORCH_CHECK_VALUE(heads[i] != nullptr, "heads[", i, "] is None");
    TORCH_CHECK_VALUE(heads[i]->dim() == head_dim, "heads[", i, "] has dim ", heads[i]->dim(), ", q has head_dim ",
                      head_dim);
    TORCH_CHECK_VALUE(heads[i]->size() == rows, "heads[", i, "] holds ", heads[i]->size(),
                      " keys, the offloaded K/V hold ", rows, " rows (the index must cover exactly the offloaded rows)");
    indexes[i] = heads[i].get();
  }
  TORCH_CHECK_VALUE(rows > 0, "search on an empty index: the offloaded K/V hold no rows");
  TORCH_CHECK_VALUE(torch::isfinite(q).all().item<bool>(), "q contains NaN or inf");
  const SearchParams params = make_params(1, 1, scan, 0, expand);  // ClusterIndex reads scan and expand

  EstimateProblem est;
  if (estimate.has_value()) {
    const auto& [cent, counts, vsums, assign] = *estimate;
    est = describe_cluster_state(cent, counts, vsums, assign, rows, q_heads / kv_heads, scale);
    TORCH_CHECK_VALUE(est.batch == batch && est.kv_heads == kv_heads && est.head_dim == head_dim,
                      "centroids must have shape [", batch, ", ", kv_heads, ", clusters, ", head_dim, "], got ",
                      cent.sizes());
  }

  auto out = torch::empty({batch, q_heads, head_dim}, torch::kFloat32);
  auto lse = torch::empty({batch, q_heads}, torch::kFloat32);
  auto indices = torch::empty({batch, kv_heads, k}, torch::kInt64);
  const EstimateProblem* est_ptr = estimate.has_value() ? &est : nullptr;
  auto fill = [&](auto& p) {
    p.batch = batch;
    p.kv_heads = kv_heads;
    p.group = q_heads / kv_heads;
    p.head_dim = head_dim;
    p.k = k;
    p.q = q.data_ptr<float>();
    p.indexes = indexes.data();
    p.params = params;
    p.scale = static_cast<float>(scale);
    p.out = out.data_ptr<float>();
    p.lse = lse.data_ptr<float>();
    p.indices = indices.data_ptr<int64_t>();
  };
  // offloaded rows of type T; resident rows of type T, or float32 (a 16-bit host store, fp32 model)
  auto go = [&](auto offloaded_tag) {
    using T = decltype(offloaded_tag);
    if (resident_f32) {
      DecodeStepProblem<T, float> p;
      fill(p);
      run(p, offloaded_k, offloaded_v, resident_k, resident_v, est_ptr);
    } else {
      DecodeStepProblem<T, T> p;
      fill(p);
      run(p, offloaded_k, offloaded_v, resident_k, resident_v, est_ptr);
    }
  };
  with_row_type(offloaded_k.scalar_type(), go);
  return {out, lse, indices};
}

}  // namespace

void bind_decode(py::module_& m) {
  m.def("decode_cluster_step", &decode_cluster_step_py, py::arg("heads"), py::arg("q"), py::arg("offloaded_k"),
        py::arg("offloaded_v"), py::arg("resident_k"), py::arg("resident_v"), py::arg("k"), py::arg("scale"),
        py::arg("scan") = SearchParams{}.scan, py::arg("expand") = SearchParams{}.expand, py::arg("estimate") = py::none(),
        "One fused decode step of the retrieval policy over ClusterIndex heads (lckv/decode_step.h): per "
        "(batch, kv head), search_group for the query group's top-k offloaded rows, sparse attention over them, "
        "the centroid estimate of the rest (estimate = (centroids, counts, value_sums, assign) or None) and "
        "attention over every resident row, merged by LSE. q [B, Hq, D] float32; K/V [B, Hkv, rows, D] "
        "float32/float16/bfloat16 (resident K/V: the offloaded dtype or float32; any strides with unit head_dim "
        "stride); heads [B * Hkv] batch-major. "
        "Returns (out [B, Hq, D] float32, lse [B, Hq] float32, indices [B, Hkv, k] int64, -1 = none).");
}

}  // namespace lckv
