// Torch glue of the CUDA kernels (built into lckv._C only when torch has CUDA; setup.py): input
// checks that name the argument, then the torch-free launchers of csrc/cuda/*.cu on the current
// stream. Compile-checked on machines without a GPU by tests/test_cuda_compile.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>
#include <tuple>

#include "lckv/gather_rows.h"
#include "lckv/topk_scan.h"

namespace lckv {
namespace {

void check_cuda_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(status));
}

// The sizes and strides of keys [batch, kv_heads, n, head_dim] into a scan problem.
template <class Problem>
void describe_keys(Problem& p, const torch::Tensor& keys) {
  p.kv_heads = keys.size(1);
  p.head_dim = keys.size(3);
  p.k_stride_b = keys.stride(0);
  p.k_stride_h = keys.stride(1);
  p.k_stride_s = keys.stride(2);
}

// Candidates of the tiled scan (csrc/include/lckv/topk_scan.h), then the exact top-k among them:
// q [batch, q_heads, head_dim] float32, k [batch, kv_heads, seq, head_dim] float32/16/bf16 with
// head_dim contiguous, both on one CUDA device; 1 <= top_k <= seq. Returns (scores float32,
// rows int64), each [batch, q_heads, top_k], best first.
std::tuple<torch::Tensor, torch::Tensor> flat_topk_scores_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                                               int64_t top_k) {
  TORCH_CHECK_VALUE(q.is_cuda() && k.is_cuda() && q.device() == k.device(),
                    "q and k must be CUDA tensors on one device, got ", q.device(), " and ", k.device());
  TORCH_CHECK_TYPE(q.scalar_type() == torch::kFloat32, "q must be float32, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kFloat16 ||
                       k.scalar_type() == torch::kBFloat16,
                   "k must be float32, float16 or bfloat16, got ", k.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 4, "q must be [batch, q_heads, head_dim] and k [batch, kv_heads, seq, "
                    "head_dim], got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(2) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "q [batch, kv_heads * group, head_dim] must match k [batch, kv_heads, seq, head_dim], got ",
                    q.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= k.size(2), "top_k must be in [1, seq = ", k.size(2), "], got ", top_k);
  const c10::cuda::CUDAGuard guard(q.device());
  const torch::Tensor qc = q.contiguous();
  const torch::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  TopkProblem p;
  describe_keys(p, kc);
  p.batch = kc.size(0);
  p.q_heads = qc.size(1);
  p.seq = kc.size(2);
  p.kb = static_cast<int>(std::min<int64_t>(top_k, kTopkTile));
  auto scores = torch::empty({p.batch, p.q_heads, p.tiles() * p.kb}, qc.options());
  auto rows = torch::empty({p.batch, p.q_heads, p.tiles() * p.kb}, qc.options().dtype(torch::kInt64));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status;
  if (kc.scalar_type() == torch::kFloat32) {
    status = flat_topk_candidates_cuda<KeyF32>(qc.data_ptr<float>(), kc.data_ptr<float>(), p, scores.data_ptr<float>(),
                                               rows.data_ptr<int64_t>(), stream);
  } else {
    const auto* bits = reinterpret_cast<const uint16_t*>(kc.data_ptr());
    status = kc.scalar_type() == torch::kFloat16
                 ? flat_topk_candidates_cuda<KeyF16>(qc.data_ptr<float>(), bits, p, scores.data_ptr<float>(),
                                                     rows.data_ptr<int64_t>(), stream)
                 : flat_topk_candidates_cuda<KeyBF16>(qc.data_ptr<float>(), bits, p, scores.data_ptr<float>(),
                                                      rows.data_ptr<int64_t>(), stream);
  }
  TORCH_CHECK_VALUE(status != cudaErrorInvalidValue, "flat_topk_scores (cuda): the query group (", p.group(),
                    " heads x head_dim ", p.head_dim, ") and its tile scores exceed 48 KiB of shared memory, or seq ",
                    p.seq, " exceeds ", 65535LL * kTopkTile, " keys; use backend='triton' or 'reference'");
  check_cuda_launch(status, "flat_topk_scores");
  auto best = scores.topk(top_k, -1, /*largest=*/true, /*sorted=*/true);
  return {std::get<0>(best), rows.gather(-1, std::get<1>(best))};
}

// The IVF list scan (csrc/include/lckv/topk_scan.h) then the exact top-k of its candidates: q
// [batch, q_heads, head_dim] float32; keys [batch, kv_heads, n, head_dim] grouped by list (float32
// or 16-bit, head_dim contiguous); offsets [batch, kv_heads, n_lists + 1] and rows [batch,
// kv_heads, n] int64; probes [batch, q_heads, nprobe] int64 list ids (-1: none); `longest` the
// largest list. Returns (scores, rows) [batch, q_heads, top_k], best first, (-inf, -1) past the
// probed keys. The Python op (lckv/ops/ivf.py) checks the layout before calling.
std::tuple<torch::Tensor, torch::Tensor> ivf_topk_scores_cuda(const torch::Tensor& q, const torch::Tensor& keys,
                                                              const torch::Tensor& offsets, const torch::Tensor& rows,
                                                              const torch::Tensor& probes, int64_t longest,
                                                              int64_t top_k) {
  for (const auto* t : {&keys, &offsets, &rows, &probes})
    TORCH_CHECK_VALUE(t->is_cuda() && t->device() == q.device(), "ivf_topk_scores: every tensor must be on ", q.device(),
                      ", got ", t->device());
  TORCH_CHECK_TYPE(q.scalar_type() == torch::kFloat32, "q must be float32, got ", q.scalar_type());
  TORCH_CHECK_TYPE(offsets.scalar_type() == torch::kInt64 && rows.scalar_type() == torch::kInt64 &&
                       probes.scalar_type() == torch::kInt64,
                   "list_offsets, list_rows and probes must be int64");
  TORCH_CHECK_TYPE(keys.scalar_type() == torch::kFloat32 || keys.scalar_type() == torch::kFloat16 ||
                       keys.scalar_type() == torch::kBFloat16,
                   "list_keys must be float32, float16 or bfloat16, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(top_k >= 1 && longest >= 0, "top_k must be >= 1, got ", top_k);
  const c10::cuda::CUDAGuard guard(q.device());
  const torch::Tensor qc = q.contiguous(), kc = keys.contiguous(), oc = offsets.contiguous(), rc = rows.contiguous(),
                      pc = probes.contiguous();
  IvfScanProblem p;
  describe_keys(p, kc);
  p.batch = qc.size(0);
  p.q_heads = qc.size(1);
  p.n = kc.size(2);
  p.n_lists = oc.size(2) - 1;
  p.nprobe = pc.size(2);
  p.max_tiles = (longest + kTopkTile - 1) / kTopkTile;
  p.kb = static_cast<int>(std::min<int64_t>(top_k, kTopkTile));
  const int64_t per_head = p.nprobe * p.max_tiles * p.kb;
  auto scores = torch::empty({p.batch, p.q_heads, per_head}, qc.options());
  auto found = torch::empty({p.batch, p.q_heads, per_head}, qc.options().dtype(torch::kInt64));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status;
  const int64_t *off = oc.data_ptr<int64_t>(), *row = rc.data_ptr<int64_t>(), *probe = pc.data_ptr<int64_t>();
  if (kc.scalar_type() == torch::kFloat32) {
    status = ivf_scan_candidates_cuda<KeyF32>(qc.data_ptr<float>(), kc.data_ptr<float>(), off, row, probe, p,
                                              scores.data_ptr<float>(), found.data_ptr<int64_t>(), stream);
  } else {
    const auto* bits = reinterpret_cast<const uint16_t*>(kc.data_ptr());
    status = kc.scalar_type() == torch::kFloat16
                 ? ivf_scan_candidates_cuda<KeyF16>(qc.data_ptr<float>(), bits, off, row, probe, p,
                                                    scores.data_ptr<float>(), found.data_ptr<int64_t>(), stream)
                 : ivf_scan_candidates_cuda<KeyBF16>(qc.data_ptr<float>(), bits, off, row, probe, p,
                                                     scores.data_ptr<float>(), found.data_ptr<int64_t>(), stream);
  }
  TORCH_CHECK_VALUE(status != cudaErrorInvalidValue, "ivf_topk_scores (cuda): nprobe x tiles of the longest list (",
                    p.nprobe, " x ", p.max_tiles, ") exceeds 65535 blocks, or head_dim ", p.head_dim,
                    " exceeds shared memory; use backend='reference'");
  check_cuda_launch(status, "ivf_topk_scores");
  const int64_t kept = std::min(top_k, per_head);
  auto out_scores = torch::full({p.batch, p.q_heads, top_k}, -std::numeric_limits<float>::infinity(), qc.options());
  auto out_rows = torch::full({p.batch, p.q_heads, top_k}, -1, qc.options().dtype(torch::kInt64));
  if (kept > 0) {
    auto best = scores.topk(kept, -1, /*largest=*/true, /*sorted=*/true);
    out_scores.narrow(2, 0, kept).copy_(std::get<0>(best));
    out_rows.narrow(2, 0, kept).copy_(found.gather(-1, std::get<1>(best)));
  }
  return {out_scores, out_rows};
}

// dst[b, h, j] = src[b, h, indices[b, h, j]] (zeros where the index is -1): src [batch, heads, seq,
// head_dim] (head_dim contiguous) on the CUDA device or in pinned host memory (read in place over
// the bus: the offload path), indices [batch, heads, n] int64 on the CUDA device. Returns dst on
// that device, src's dtype. Indices must lie in [-1, seq) (unchecked on the device: the caller's
// selection produces them).
torch::Tensor gather_rows_cuda_op(const torch::Tensor& src, const torch::Tensor& indices) {
  TORCH_CHECK_VALUE(indices.is_cuda(), "indices must be a CUDA tensor, got device ", indices.device());
  TORCH_CHECK_TYPE(indices.scalar_type() == torch::kInt64, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(src.device() == indices.device() || (src.is_cpu() && src.is_pinned()),
                    "src must be on ", indices.device(), " or in pinned host memory (tensor.pin_memory()), got ",
                    src.device(), src.is_cpu() ? " (not pinned)" : "");
  TORCH_CHECK_TYPE(src.scalar_type() == torch::kFloat32 || src.scalar_type() == torch::kFloat16 ||
                       src.scalar_type() == torch::kBFloat16,
                   "src must be float32, float16 or bfloat16, got ", src.scalar_type());
  TORCH_CHECK_VALUE(src.dim() == 4 && indices.dim() == 3 && src.size(0) == indices.size(0) &&
                        src.size(1) == indices.size(1) && src.stride(3) == 1,
                    "src must be [batch, heads, seq, head_dim] with head_dim contiguous and indices [batch, heads, n], "
                    "got ", src.sizes(), " (strides ", src.strides(), ") and ", indices.sizes());
  const c10::cuda::CUDAGuard guard(indices.device());
  const torch::Tensor idx = indices.contiguous();
  GatherProblem p;
  p.batch = src.size(0);
  p.heads = src.size(1);
  p.n_selected = idx.size(2);
  p.head_dim = src.size(3);
  p.src_stride_b = src.stride(0);
  p.src_stride_h = src.stride(1);
  p.src_stride_s = src.stride(2);
  auto dst = torch::empty({p.batch, p.heads, p.n_selected, p.head_dim}, src.options().device(indices.device()));
  const void* base = src.data_ptr();
  if (src.is_cpu()) {  // the device-side address of the pinned allocation
    void* mapped = nullptr;
    check_cuda_launch(cudaHostGetDevicePointer(&mapped, const_cast<void*>(base), 0), "gather_rows (pinned source)");
    base = mapped;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status =
      src.scalar_type() == torch::kFloat32
          ? gather_rows_cuda<float>(static_cast<const float*>(base), idx.data_ptr<int64_t>(), dst.data_ptr<float>(), p,
                                    stream)
          : gather_rows_cuda<uint16_t>(static_cast<const uint16_t*>(base), idx.data_ptr<int64_t>(),
                                       reinterpret_cast<uint16_t*>(dst.data_ptr()), p, stream);
  check_cuda_launch(status, "gather_rows");
  return dst;
}

}  // namespace

void bind_cuda(pybind11::module_& m) {
  m.def("flat_topk_scores_cuda", &flat_topk_scores_cuda, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("top_k"), "Exact top-k inner products on a CUDA device: (scores, rows), best first.");
  m.def("ivf_topk_scores_cuda", &ivf_topk_scores_cuda, pybind11::arg("q"), pybind11::arg("keys"),
        pybind11::arg("offsets"), pybind11::arg("rows"), pybind11::arg("probes"), pybind11::arg("longest"),
        pybind11::arg("top_k"), "IVF list scan on a CUDA device: (scores, rows), best first.");
  m.def("gather_rows_cuda", &gather_rows_cuda_op, pybind11::arg("src"), pybind11::arg("indices"),
        "Selected rows of src (CUDA or pinned host) into a new CUDA tensor; -1 gives zeros.");
}

}  // namespace lckv
