// Glue for lckv::merge_states: checks, dtype handling (fp32 compute), GIL released.
#include "bind.h"
#include "checks.h"
#include "lckv/merge_states.h"

namespace lckv {
namespace {

std::tuple<torch::Tensor, torch::Tensor> merge_attention_states_cpu(const torch::Tensor& out_a,
                                                                     const torch::Tensor& lse_a,
                                                                     const torch::Tensor& out_b,
                                                                     const torch::Tensor& lse_b) {
  check_cpu_float(out_a, "out_a");
  check_cpu_float(out_b, "out_b");
  check_cpu_float(lse_a, "lse_a");
  check_cpu_float(lse_b, "lse_b");
  TORCH_CHECK_VALUE(out_a.dim() >= 1, "out_a must have shape [..., head_dim], got ", out_a.sizes());
  TORCH_CHECK_VALUE(out_b.sizes() == out_a.sizes(), "out_b must have the shape of out_a ",
                    out_a.sizes(), ", got ", out_b.sizes());
  const auto lead = out_a.sizes().slice(0, out_a.dim() - 1);
  TORCH_CHECK_VALUE(lse_a.sizes() == lead, "lse_a must have shape ", lead, ", got ", lse_a.sizes());
  TORCH_CHECK_VALUE(lse_b.sizes() == lead, "lse_b must have shape ", lead, ", got ", lse_b.sizes());
  TORCH_CHECK_TYPE(out_b.scalar_type() == out_a.scalar_type(), "out_b must have the dtype of out_a (",
                   out_a.scalar_type(), "), got ", out_b.scalar_type());

  const auto a = out_a.to(torch::kFloat32).contiguous();
  const auto b = out_b.to(torch::kFloat32).contiguous();
  const auto la = lse_a.to(torch::kFloat32).contiguous();
  const auto lb = lse_b.to(torch::kFloat32).contiguous();
  auto out = torch::empty_like(a);
  auto lse = torch::empty_like(la);
  const int64_t head_dim = a.size(-1);
  const int64_t rows = head_dim == 0 ? 0 : a.numel() / head_dim;
  {
    pybind11::gil_scoped_release no_gil;
    merge_states(a.data_ptr<float>(), la.data_ptr<float>(), b.data_ptr<float>(),
                 lb.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), rows,
                 head_dim);
  }
  return {out.to(out_a.scalar_type()), lse};
}

}  // namespace

void bind_merge_states(pybind11::module_& m) {
  m.def("merge_attention_states", &merge_attention_states_cpu, pybind11::arg("out_a"),
        pybind11::arg("lse_a"), pybind11::arg("out_b"), pybind11::arg("lse_b"),
        "Merges two partial attention states over disjoint keys: out [..., D] (input dtype), "
        "lse [...] (float32, natural log).");
}

}  // namespace lckv
