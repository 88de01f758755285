// CUDA flat top-k scan and IVF list scan (see csrc/include/lckv/topk_scan.h). Torch-free: raw pointers, sizes and a
// stream from the caller. One block per (batch row x kv head, tile of kTopkTile keys), one thread
// per key: the group's queries sit in shared memory, each thread scores its key against every
// query head of the group, the block sorts each head's tile scores with the shared bitonic
// exchange, and the first kb threads write the head's candidates.
#include <cuda_runtime.h>

#include "lckv/topk_scan.h"

namespace lckv {
namespace {

constexpr size_t kSharedLimit = 48 * 1024;  // without opting in to more dynamic shared memory

template <class Key>
__global__ void flat_topk_candidates_kernel(const float* __restrict__ q, const typename Key::storage* __restrict__ k,
                                            TopkProblem p, float* __restrict__ out_scores,
                                            int64_t* __restrict__ out_rows) {
  extern __shared__ unsigned char shared[];
  const int64_t group = p.group();
  const int64_t b = blockIdx.x / p.kv_heads, kv_head = blockIdx.x % p.kv_heads;
  const int64_t tile = blockIdx.y;
  const int t = threadIdx.x;
  // [group, kTopkTile] rows (8-byte aligned first), then scores, then the group's queries
  int64_t* rows = reinterpret_cast<int64_t*>(shared);
  float* scores = reinterpret_cast<float*>(rows + group * kTopkTile);
  float* queries = scores + group * kTopkTile;
  const float* q_group = q + (b * p.q_heads + kv_head * group) * p.head_dim;
  for (int64_t i = t; i < group * p.head_dim; i += blockDim.x) queries[i] = q_group[i];
  __syncthreads();
  for (int64_t g = 0; g < group; ++g)
    topk_tile_slot<Key>(queries + g * p.head_dim, k, p, b, kv_head, tile, t, &scores[g * kTopkTile + t],
                        &rows[g * kTopkTile + t]);
  __syncthreads();
  for (int size = 2; size <= kTopkTile; size <<= 1)
    for (int j = size >> 1; j > 0; j >>= 1) {
      for (int64_t g = 0; g < group; ++g) topk_bitonic_exchange(scores + g * kTopkTile, rows + g * kTopkTile, t, j, size);
      __syncthreads();
    }
  if (t < p.kb)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t at = topk_candidate_offset(p, b, kv_head * group + g, tile);
      out_scores[at + t] = scores[g * kTopkTile + t];
      out_rows[at + t] = rows[g * kTopkTile + t];
    }
}

// One block per (batch row x query head, probe j x tile), one thread per list position.
template <class Key>
__global__ void ivf_scan_candidates_kernel(const float* __restrict__ q, const typename Key::storage* __restrict__ keys,
                                           const int64_t* __restrict__ offsets, const int64_t* __restrict__ rows,
                                           const int64_t* __restrict__ probes, IvfScanProblem p,
                                           float* __restrict__ out_scores, int64_t* __restrict__ out_rows) {
  extern __shared__ unsigned char shared[];
  int64_t* slot_rows = reinterpret_cast<int64_t*>(shared);
  float* scores = reinterpret_cast<float*>(slot_rows + kTopkTile);
  float* query = scores + kTopkTile;
  const int64_t b = blockIdx.x / p.q_heads, h = blockIdx.x % p.q_heads;
  const int64_t j = blockIdx.y / p.max_tiles, tile = blockIdx.y % p.max_tiles;
  const int t = threadIdx.x;
  for (int64_t i = t; i < p.head_dim; i += blockDim.x) query[i] = q[(b * p.q_heads + h) * p.head_dim + i];
  __syncthreads();
  ivf_tile_slot<Key>(query, keys, offsets, rows, probes, p, b, h, j, tile, t, &scores[t], &slot_rows[t]);
  __syncthreads();
  for (int size = 2; size <= kTopkTile; size <<= 1)
    for (int step = size >> 1; step > 0; step >>= 1) {
      topk_bitonic_exchange(scores, slot_rows, t, step, size);
      __syncthreads();
    }
  if (t < p.kb) {
    const int64_t at = ivf_candidate_offset(p, b, h, j, tile);
    out_scores[at + t] = scores[t];
    out_rows[at + t] = slot_rows[t];
  }
}

}  // namespace

template <class Key>
cudaError_t ivf_scan_candidates_cuda(const float* q, const typename Key::storage* keys, const int64_t* offsets,
                                     const int64_t* rows, const int64_t* probes, const IvfScanProblem& p,
                                     float* out_scores, int64_t* out_rows, cudaStream_t stream) {
  if (p.batch == 0 || p.q_heads == 0 || p.nprobe == 0 || p.max_tiles == 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.kb < 1 || p.kb > kTopkTile) return cudaErrorInvalidValue;
  const size_t shared = kTopkTile * (sizeof(int64_t) + sizeof(float)) + p.head_dim * sizeof(float);
  if (shared > kSharedLimit || p.nprobe * p.max_tiles > 65535 || p.batch * p.q_heads > 2147483647LL)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.batch * p.q_heads), static_cast<unsigned>(p.nprobe * p.max_tiles));
  ivf_scan_candidates_kernel<Key><<<grid, kTopkTile, shared, stream>>>(q, keys, offsets, rows, probes, p, out_scores,
                                                                      out_rows);
  return cudaGetLastError();
}

template <class Key>
cudaError_t flat_topk_candidates_cuda(const float* q, const typename Key::storage* k, const TopkProblem& p,
                                      float* out_scores, int64_t* out_rows, cudaStream_t stream) {
  if (p.batch == 0 || p.q_heads == 0 || p.seq == 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.kb < 1 || p.kb > kTopkTile) return cudaErrorInvalidValue;
  const size_t group = static_cast<size_t>(p.group());
  const size_t shared = group * kTopkTile * (sizeof(int64_t) + sizeof(float)) + group * p.head_dim * sizeof(float);
  if (shared > kSharedLimit) return cudaErrorInvalidValue;
  const int64_t tiles = p.tiles();
  if (tiles > 65535 || p.batch * p.kv_heads > 2147483647LL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads), static_cast<unsigned>(tiles));
  flat_topk_candidates_kernel<Key><<<grid, kTopkTile, shared, stream>>>(q, k, p, out_scores, out_rows);
  return cudaGetLastError();
}

template cudaError_t flat_topk_candidates_cuda<KeyF32>(const float*, const float*, const TopkProblem&, float*, int64_t*,
                                                       cudaStream_t);
template cudaError_t flat_topk_candidates_cuda<KeyF16>(const float*, const uint16_t*, const TopkProblem&, float*,
                                                       int64_t*, cudaStream_t);
template cudaError_t flat_topk_candidates_cuda<KeyBF16>(const float*, const uint16_t*, const TopkProblem&, float*,
                                                        int64_t*, cudaStream_t);

template cudaError_t ivf_scan_candidates_cuda<KeyF32>(const float*, const float*, const int64_t*, const int64_t*,
                                                      const int64_t*, const IvfScanProblem&, float*, int64_t*,
                                                      cudaStream_t);
template cudaError_t ivf_scan_candidates_cuda<KeyF16>(const float*, const uint16_t*, const int64_t*, const int64_t*,
                                                      const int64_t*, const IvfScanProblem&, float*, int64_t*,
                                                      cudaStream_t);
template cudaError_t ivf_scan_candidates_cuda<KeyBF16>(const float*, const uint16_t*, const int64_t*, const int64_t*,
                                                       const int64_t*, const IvfScanProblem&, float*, int64_t*,
                                                       cudaStream_t);

}  // namespace lckv
