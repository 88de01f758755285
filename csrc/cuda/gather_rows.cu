// CUDA gather of selected K/V rows (see csrc/include/lckv/gather_rows.h). Torch-free: raw
// pointers, sizes and a stream from the caller. One warp-strided block row per gathered row; the
// row step itself is the shared __host__ __device__ lckv::gather_row.
#include <cuda_runtime.h>

#include "lckv/gather_rows.h"

namespace lckv {
namespace {

template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ indices,
                                   T* __restrict__ dst, GatherProblem p) {
  const int64_t rows = p.batch * p.heads * p.n_selected;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    gather_row(src, indices, dst, p, row, threadIdx.x, blockDim.x);
  }
}

}  // namespace

template <typename T>
cudaError_t gather_rows_cuda(const T* src, const int64_t* indices, T* dst, const GatherProblem& p,
                             cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.n_selected;
  if (rows == 0 || p.head_dim == 0) return cudaSuccess;
  const dim3 block(32, 8);  // 32 lanes along head_dim, 8 rows per block
  const int64_t blocks_needed = (rows + block.y - 1) / block.y;
  const unsigned grid = static_cast<unsigned>(blocks_needed < 65535 ? blocks_needed : 65535);
  gather_rows_kernel<T><<<grid, block, 0, stream>>>(src, indices, dst, p);
  return cudaGetLastError();
}

template cudaError_t gather_rows_cuda<float>(const float*, const int64_t*, float*, const GatherProblem&,
                                             cudaStream_t);
template cudaError_t gather_rows_cuda<uint16_t>(const uint16_t*, const int64_t*, uint16_t*,
                                                const GatherProblem&, cudaStream_t);

}  // namespace lckv
