// Glue for lckv::SparseAttention: argument checks, dtype dispatch (K/V read in place as
// fp32/fp16/bf16, any batch/head/row strides), fp32 outputs cast to q's dtype, GIL released.
#include <algorithm>
#include <cmath>

#include "bind.h"
#include "checks.h"
#include "lckv/sparse_attention.h"

namespace lckv {
namespace {

template <typename T>
const SparseAttention<T>& kernel() {
  static const SparseAttention<T> instance;  // SIMD path chosen once per process
  return instance;
}

template <typename T, typename Storage>
void run_typed(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& indices, const SparseAttentionProblem& p, torch::Tensor& out,
               torch::Tensor& lse) {
  const auto* k_ptr = reinterpret_cast<const Storage*>(k.data_ptr<T>());
  const auto* v_ptr = reinterpret_cast<const Storage*>(v.data_ptr<T>());
  pybind11::gil_scoped_release no_gil;
  kernel<Storage>().run(q.data_ptr<float>(), k_ptr, v_ptr, indices.data_ptr<int64_t>(), p,
                        out.data_ptr<float>(), lse.data_ptr<float>());
}

// Checks k, v [B, Hkv, S, D] and indices [B, Hkv, n] (contiguous int64 in [-1, S)); makes k/v unit-stride
// along head_dim if needed; returns the problem with q_heads = kv_heads and the default scale.
SparseAttentionProblem describe_kv(torch::Tensor& k, torch::Tensor& v, const torch::Tensor& idx) {
  check_cpu_float(k, "k");
  check_cpu_float(v, "v");
  check_dim(k, "k", 4, "[batch, kv_heads, seq, head_dim]");
  check_dim(v, "v", 4, "[batch, kv_heads, seq, head_dim]");
  check_dim(idx, "indices", 3, "[batch, kv_heads, n_selected]");
  TORCH_CHECK_VALUE(idx.device().is_cpu(), "indices must be a CPU tensor, got device ", idx.device());
  TORCH_CHECK_TYPE(idx.scalar_type() == torch::kInt64, "indices must be int64, got ", idx.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), "v must have the dtype of k (", k.scalar_type(),
                   "), got ", v.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", k.sizes(), " and v ",
                    v.sizes());
  const int64_t batch = k.size(0), kv_heads = k.size(1), seq = k.size(2), head_dim = k.size(3);
  TORCH_CHECK_VALUE(idx.size(0) == batch && idx.size(1) == kv_heads, "indices must have shape [batch=", batch,
                    ", kv_heads=", kv_heads, ", n_selected], got ", idx.sizes());
  if (idx.numel() > 0) {  // one pass over the (contiguous) indices instead of two torch reductions
    const int64_t* values = idx.data_ptr<int64_t>();
    int64_t lo = values[0], hi = values[0];
    for (int64_t i = 1; i < idx.numel(); ++i) {
      lo = std::min(lo, values[i]);
      hi = std::max(hi, values[i]);
    }
    TORCH_CHECK_VALUE(lo >= -1 && hi < seq, "indices must lie in [-1, seq=", seq,
                      ") (-1 = no key), got values in [", lo, ", ", hi, "]");
  }
  // The kernel needs a unit stride along head_dim only; batch/head/row strides are passed through.
  if (k.stride(3) != 1 && head_dim > 1) k = k.contiguous();
  if (v.stride(3) != 1 && head_dim > 1) v = v.contiguous();
  SparseAttentionProblem p;
  p.batch = batch;
  p.q_heads = kv_heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.n_selected = idx.size(2);
  p.seq = seq;
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_s = v.stride(2);
  p.scale = head_dim > 0 ? 1.0f / std::sqrt(static_cast<float>(head_dim)) : 1.0f;
  return p;
}

bool all_finite(const float* x, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(x[i]);
  return finite;
}

// check_values: also reject a non-finite q, and a result that is not finite (out) or NaN/+inf (lse,
// where -inf means "nothing selected"), which is how NaN/inf in the K/V rows read shows up.
std::tuple<torch::Tensor, torch::Tensor> sparse_attention_cpu(const torch::Tensor& q,
                                                              torch::Tensor k, torch::Tensor v,
                                                              const torch::Tensor& indices,
                                                              std::optional<double> scale, bool check_values) {
  check_cpu_float(q, "q");
  check_dim(q, "q", 3, "[batch, q_heads, head_dim]");
  check_dim(k, "k", 4, "[batch, kv_heads, seq, head_dim]");
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(3) == head_dim, "k must have batch ", batch,
                    " and head_dim ", head_dim, " like q, got ", k.sizes());
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK_VALUE(kv_heads > 0 && q_heads % kv_heads == 0, "q_heads (", q_heads,
                    ") must be a multiple of kv_heads (", kv_heads, ")");
  const auto idx = indices.contiguous();
  SparseAttentionProblem p = describe_kv(k, v, idx);
  p.q_heads = q_heads;
  if (scale.has_value()) p.scale = static_cast<float>(*scale);
  const auto qf = q.to(torch::kFloat32).contiguous();
  TORCH_CHECK_VALUE(!check_values || all_finite(qf.data_ptr<float>(), qf.numel()), "q contains NaN or inf");

  auto out = torch::empty({batch, q_heads, head_dim}, q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({batch, q_heads}, q.options().dtype(torch::kFloat32));
  switch (k.scalar_type()) {
    case torch::kFloat32:
      run_typed<float, float>(qf, k, v, idx, p, out, lse);
      break;
    case torch::kFloat16:
      run_typed<at::Half, half_bits>(qf, k, v, idx, p, out, lse);
      break;
    default:
      run_typed<at::BFloat16, bfloat16_bits>(qf, k, v, idx, p, out, lse);
      break;
  }
  if (check_values) {
    const float* l = lse.data_ptr<float>();
    bool lse_ok = true;
    for (int64_t i = 0; i < lse.numel(); ++i) lse_ok &= !(std::isnan(l[i]) || l[i] == INFINITY);
    TORCH_CHECK_VALUE(lse_ok && all_finite(out.data_ptr<float>(), out.numel()),
                      "k or v contains NaN or inf in the rows this op read");
  }
  return {out.to(q.scalar_type()), lse};
}

uint64_t read_selected_rows_cpu(torch::Tensor k, torch::Tensor v, const torch::Tensor& indices) {
  const auto idx = indices.contiguous();
  const SparseAttentionProblem p = describe_kv(k, v, idx);
  pybind11::gil_scoped_release no_gil;
  switch (k.scalar_type()) {
    case torch::kFloat32:
      return read_selected_rows(k.data_ptr<float>(), v.data_ptr<float>(), idx.data_ptr<int64_t>(), p);
    case torch::kFloat16:
      return read_selected_rows(reinterpret_cast<const half_bits*>(k.data_ptr<at::Half>()),
                                reinterpret_cast<const half_bits*>(v.data_ptr<at::Half>()), idx.data_ptr<int64_t>(), p);
    default:
      return read_selected_rows(reinterpret_cast<const bfloat16_bits*>(k.data_ptr<at::BFloat16>()),
                                reinterpret_cast<const bfloat16_bits*>(v.data_ptr<at::BFloat16>()),
                                idx.data_ptr<int64_t>(), p);
  }
}

}  // namespace

void bind_sparse_attention(pybind11::module_& m) {
  m.def("sparse_attention_with_lse", &sparse_attention_cpu, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("indices"), pybind11::arg("scale") = pybind11::none(),
        pybind11::arg("check_values") = false,
        "Decode sparse attention over per-kv-head gathered rows: q [B, Hq, D], k/v [B, Hkv, S, D] "
        "(fp32/fp16/bf16, any strides with unit head_dim stride), indices [B, Hkv, n] int64 "
        "(-1 = none) -> (out [B, Hq, D] in q's dtype, lse [B, Hq] float32). check_values=True also raises "
        "ValueError for a non-finite q and for NaN/inf in the rows read (seen in the result).");
  m.def("sparse_attention_read_rows", &read_selected_rows_cpu, pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("indices"),
        "Benchmark probe: reads the K/V rows sparse_attention_with_lse(q, k, v, indices) reads, with the "
        "same prefetch and threads, and no attention math; returns a checksum of the bytes (its time is "
        "the cost of the random-row gather alone).");
  m.def(
      "sparse_attention_simd_path",
      [](const std::string& dtype) {
        if (dtype == "float32") return std::string(kernel<float>().simd_name());
        if (dtype == "float16") return std::string(kernel<half_bits>().simd_name());
        if (dtype == "bfloat16") return std::string(kernel<bfloat16_bits>().simd_name());
        TORCH_CHECK_VALUE(false, "dtype must be 'float32', 'float16' or 'bfloat16', got '", dtype, "'");
      },
      pybind11::arg("dtype") = "float32",
      "The SIMD code path the CPU sparse attention kernel selected on this machine for K/V of this dtype.");
}

}  // namespace lckv
