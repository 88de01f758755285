// Gather of selected K/V rows into a dense buffer, shared by the CUDA kernel and the host.
//
// dst[b, h, j, :] = src[b, h, indices[b, h, j], :], and zeros where indices[b, h, j] == -1.
// This turns the retrieved top-k positions of an offloaded cache into the contiguous
// [batch, heads, n_selected, head_dim] block that dense attention kernels read. Torch-free: raw
// pointers, element strides for src (head_dim contiguous), dst and indices contiguous. The
// per-row step is one __host__ __device__ function, so the host path (and its unit test)
// exercises exactly the code the GPU runs.
#pragma once

#include <cstdint>

#include "lckv/host_device.h"

namespace lckv {

// Sizes and source strides (in elements) of one gather.
struct GatherProblem {
  int64_t batch = 0;       // B
  int64_t heads = 0;       // H (kv heads)
  int64_t n_selected = 0;  // rows gathered per (batch, head)
  int64_t head_dim = 0;    // D
  int64_t src_stride_b = 0, src_stride_h = 0, src_stride_s = 0;  // source strides
};

// Copies elements [d_begin, head_dim) with step d_step of gathered row `row` (flat over B*H*n).
template <typename T>
LCKV_HOST_DEVICE inline void gather_row(const T* src, const int64_t* indices, T* dst, const GatherProblem& p,
                                        int64_t row, int64_t d_begin, int64_t d_step) {
  const int64_t bh = row / p.n_selected;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t index = indices[row];
  T* out = dst + row * p.head_dim;
  if (index < 0) {
    for (int64_t d = d_begin; d < p.head_dim; d += d_step) out[d] = T{};
    return;
  }
  const T* in = src + b * p.src_stride_b + h * p.src_stride_h + index * p.src_stride_s;
  for (int64_t d = d_begin; d < p.head_dim; d += d_step) out[d] = in[d];
}

// Host version: the same per-row step over every row.
template <typename T>
void gather_rows_host(const T* src, const int64_t* indices, T* dst, const GatherProblem& p) {
  const int64_t rows = p.batch * p.heads * p.n_selected;
  for (int64_t row = 0; row < rows; ++row) gather_row(src, indices, dst, p, row, 0, 1);
}

}  // namespace lckv

#if defined(__CUDACC__) || defined(LCKV_WITH_CUDA)
#include <cuda_runtime.h>

namespace lckv {
// Launches the gather on `stream` (csrc/cuda/gather_rows.cu); T is float or a 16-bit storage type
// (uint16_t for fp16/bf16 bits). Returns the launch status.
template <typename T>
cudaError_t gather_rows_cuda(const T* src, const int64_t* indices, T* dst, const GatherProblem& p,
                             cudaStream_t stream);
}  // namespace lckv
#endif
