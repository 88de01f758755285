// Glue for lckv::rank_by_group_probability (retrieval's group_rank="probability"): argument checks,
// dtype dispatch, zero-copy reads of the (strided) offloaded keys (float32, float16 or bfloat16),
// GIL released.
#include "bind.h"
#include "checks.h"
#include "lckv/group_rank.h"

namespace lckv {
namespace {

torch::Tensor rank_by_group_probability_cpu(const torch::Tensor& q, const torch::Tensor& keys,
                                            const torch::Tensor& candidates,
                                            const c10::optional<torch::Tensor>& rest_lse, double scale,
                                            int64_t n_select) {
  check_cpu_f32(q, "q", 3, "[batch, q_heads, head_dim]");
  check_cpu_float(keys, "keys");
  check_dim(keys, "keys", 4, "[batch, kv_heads, rows, head_dim]");
  check_dim(candidates, "candidates", 3, "[batch, kv_heads, n_candidates]");
  const int64_t B = keys.size(0), H = keys.size(1), rows = keys.size(2), D = keys.size(3);
  check_group_query(q, B, H, D);
  TORCH_CHECK_VALUE(keys.stride(3) == 1, "keys must have a contiguous last dim, got strides ", keys.strides());
  TORCH_CHECK_TYPE(candidates.scalar_type() == torch::kInt64, "candidates must be int64, got ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(candidates.size(0) == B && candidates.size(1) == H, "candidates must have shape [", B, ", ", H,
                    ", n_candidates], got ", candidates.sizes());
  TORCH_CHECK_VALUE(n_select > 0, "n_select must be positive, got ", n_select);
  const auto q_c = q.contiguous(), cand_c = candidates.contiguous();
  TORCH_CHECK_VALUE(cand_c.numel() == 0 || (cand_c.min().item<int64_t>() >= -1 && cand_c.max().item<int64_t>() < rows),
                    "candidates must be row ids in [0, ", rows, ") or -1");
  torch::Tensor rest_c;
  if (rest_lse.has_value()) {
    rest_c = rest_lse->contiguous();
    TORCH_CHECK_TYPE(rest_c.scalar_type() == torch::kFloat32, "rest_lse must be float32, got ", rest_c.scalar_type());
    TORCH_CHECK_VALUE(rest_c.dim() == 2 && rest_c.size(0) == B && rest_c.size(1) == q.size(1),
                      "rest_lse must have shape [", B, ", ", q.size(1), "], got ", rest_c.sizes());
  }
  const int64_t n_out = std::min(n_select, cand_c.size(2));
  auto out = torch::empty({B, H, n_out}, torch::kInt64);
  GroupRankProblem p;
  p.batch = B;
  p.kv_heads = H;
  p.group = q.size(1) / H;
  p.head_dim = D;
  p.n_candidates = cand_c.size(2);
  p.n_out = n_out;
  p.q = q_c.data_ptr<float>();
  p.keys = keys.data_ptr();
  p.ks0 = keys.stride(0);
  p.ks1 = keys.stride(1);
  p.ks2 = keys.stride(2);
  p.candidates = cand_c.data_ptr<int64_t>();
  p.rest_lse = rest_lse.has_value() ? rest_c.data_ptr<float>() : nullptr;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<int64_t>();
  {
    pybind11::gil_scoped_release no_gil;
    with_row_type(keys.scalar_type(), [&](auto row) { rank_by_group_probability<decltype(row)>(p); });
  }
  return out;
}

}  // namespace

void bind_group_rank(pybind11::module_& m) {
  m.def("rank_by_group_probability", &rank_by_group_probability_cpu, pybind11::arg("q"), pybind11::arg("keys"),
        pybind11::arg("candidates"), pybind11::arg("rest_lse"), pybind11::arg("scale"), pybind11::arg("n_select"),
        "The n_select candidate rows of highest summed attention probability over each kv head's query group: "
        "int64 [B, Hkv, min(n_select, n_candidates)], best first, -1 where fewer; see lckv/group_rank.h.");
}

}  // namespace lckv
