// Exact top-k inner-product scan over tiles of keys, shared by the CUDA flat top-k kernel
// (csrc/cuda/topk_scan.cu) and its host version here, which the unit test (tests/cpp) checks
// against brute force: the host runs the very per-element code the GPU runs.
//
// Problem: queries q [batch, q_heads, head_dim] float32, contiguous; keys k [batch, kv_heads,
// seq, head_dim] with head_dim contiguous (strides in elements) in float32, fp16 or bf16 (raw
// bits); query head h searches kv head h / (q_heads / kv_heads). The keys are cut into tiles of
// kTopkTile rows. For each tile and query head the scan writes the tile's best `kb` (score, row)
// pairs, best first, to candidates [batch, q_heads, tiles * kb]: descending score, then
// ascending row; a tile's slots past `seq` hold (-inf, -1) and sort last. Every key of the global
// top-k (k <= kb) is among its tile's best kb, so a top-k over the candidates (torch.topk in the
// binding) is the exact top-k.
//
// Scores are fmaf chains over head_dim in index order, on the host and on the GPU alike, so both
// give the same bits; the tile sort is a bitonic network whose compare-exchange step is shared.
// Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lckv/host_device.h"

namespace lckv {

constexpr int kTopkTile = 128;  // keys per tile: one GPU thread per key; a power of two (bitonic)

struct TopkProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, seq = 0, head_dim = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;  // key strides, elements
  int kb = 0;                                             // candidates per tile, 1..kTopkTile
  LCKV_HOST_DEVICE int64_t tiles() const { return (seq + kTopkTile - 1) / kTopkTile; }
  LCKV_HOST_DEVICE int64_t group() const { return q_heads / kv_heads; }
};

LCKV_HOST_DEVICE inline float topk_bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Key element types: storage and its exact conversion to float.
struct KeyF32 {
  using storage = float;
  static LCKV_HOST_DEVICE float load(float x) { return x; }
};
struct KeyBF16 {
  using storage = uint16_t;
  static LCKV_HOST_DEVICE float load(uint16_t x) { return topk_bits_as_float(uint32_t(x) << 16); }
};
struct KeyF16 {
  using storage = uint16_t;
  // Branch-free IEEE half -> float (normals, subnormals, inf, nan): the exponent and mantissa
  // shifted into float position and rescaled by 2^112 (exact), then inf/nan patched.
  static LCKV_HOST_DEVICE float load(uint16_t h) {
    const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
    const float magnitude = topk_bits_as_float((uint32_t(h) & 0x7fffu) << 13) * topk_bits_as_float(0x77800000u);
    uint32_t u;
#if defined(__CUDA_ARCH__)
    u = __float_as_uint(magnitude);
#else
    std::memcpy(&u, &magnitude, sizeof u);
#endif
    u |= ((uint32_t(h) & 0x7c00u) == 0x7c00u) ? 0x7f800000u : 0u;
    return topk_bits_as_float(u | sign);
  }
};

// q . k over head_dim elements, one fmaf chain in index order.
template <class Key>
LCKV_HOST_DEVICE inline float topk_dot(const float* q, const typename Key::storage* k, int64_t head_dim) {
  float acc = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) acc = fmaf(q[d], Key::load(k[d]), acc);
  return acc;
}

// Whether (as, ar) ranks before (bs, br): higher score first, then lower row; row -1 (a slot past
// seq) after every real row.
LCKV_HOST_DEVICE inline bool topk_ahead(float as, int64_t ar, float bs, int64_t br) {
  if (as != bs) return as > bs;
  return static_cast<uint64_t>(ar) < static_cast<uint64_t>(br);
}

// One compare-exchange of the bitonic network that sorts n = kTopkTile pairs best first: element
// t against t ^ j in the merge of size k (k = 2, 4, .., n; j = k/2, .., 1). Sub-sequences with
// (t & k) == 0 sort best first, the others worst first; the last merge (k = n) sorts all best first.
LCKV_HOST_DEVICE inline void topk_bitonic_exchange(float* s, int64_t* r, int t, int j, int k) {
  const int partner = t ^ j;
  if (partner <= t) return;
  const bool best_first = (t & k) == 0;
  const bool swap = best_first ? topk_ahead(s[partner], r[partner], s[t], r[t])
                               : topk_ahead(s[t], r[t], s[partner], r[partner]);
  if (swap) {
    const float ts = s[t];
    s[t] = s[partner];
    s[partner] = ts;
    const int64_t tr = r[t];
    r[t] = r[partner];
    r[partner] = tr;
  }
}

// Score of tile slot t of query head h (batch b) and its row: (-inf, -1) past seq.
template <class Key>
LCKV_HOST_DEVICE inline void topk_tile_slot(const float* q_head, const typename Key::storage* k, const TopkProblem& p,
                                            int64_t b, int64_t kv_head, int64_t tile, int t, float* score,
                                            int64_t* row) {
  const int64_t index = tile * kTopkTile + t;
  if (index >= p.seq) {
    *score = topk_bits_as_float(0xff800000u);  // -inf
    *row = -1;
    return;
  }
  *score = topk_dot<Key>(q_head, k + b * p.k_stride_b + kv_head * p.k_stride_h + index * p.k_stride_s, p.head_dim);
  *row = index;
}

// Offset of the first candidate of (b, h, tile) in [batch, q_heads, tiles * kb].
LCKV_HOST_DEVICE inline int64_t topk_candidate_offset(const TopkProblem& p, int64_t b, int64_t h, int64_t tile) {
  return ((b * p.q_heads + h) * p.tiles() + tile) * p.kb;
}

// Sorts a tile's slots best first (the bitonic network; on the GPU one thread per t with a
// barrier after each (size, j) step).
inline void topk_sort_tile_host(float* s, int64_t* r) {
  for (int size = 2; size <= kTopkTile; size <<= 1)
    for (int j = size >> 1; j > 0; j >>= 1)
      for (int t = 0; t < kTopkTile; ++t) topk_bitonic_exchange(s, r, t, j, size);
}

// Host version of the CUDA scan: the same slots, network and output layout.
template <class Key>
void flat_topk_candidates_host(const float* q, const typename Key::storage* k, const TopkProblem& p,
                               float* out_scores, int64_t* out_rows) {
  float s[kTopkTile];
  int64_t r[kTopkTile];
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t tile = 0; tile < p.tiles(); ++tile) {
        const float* q_head = q + (b * p.q_heads + h) * p.head_dim;
        for (int t = 0; t < kTopkTile; ++t) topk_tile_slot<Key>(q_head, k, p, b, h / p.group(), tile, t, &s[t], &r[t]);
        topk_sort_tile_host(s, r);
        const int64_t at = topk_candidate_offset(p, b, h, tile);
        for (int i = 0; i < p.kb; ++i) {
          out_scores[at + i] = s[i];
          out_rows[at + i] = r[i];
        }
      }
}

// ----------------------------------------------------------------------------- IVF list scan
// The keys of one kv head grouped by list (cluster): list l of (b, kv head) holds positions
// offsets[l] .. offsets[l + 1] of keys [batch, kv_heads, n, head_dim], whose original rows are
// rows [batch, kv_heads, n]. Each query head scans the lists `probes` [batch, q_heads, nprobe]
// names (-1: none), in tiles of kTopkTile positions: candidates [batch, q_heads, nprobe *
// max_tiles * kb], (probe j, tile t) at slot (j * max_tiles + t) * kb, with the original rows.
struct IvfScanProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, n = 0, head_dim = 0, n_lists = 0, nprobe = 0, max_tiles = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;  // key strides, elements
  int kb = 0;
  LCKV_HOST_DEVICE int64_t group() const { return q_heads / kv_heads; }
};

// Score and original row of slot t of (b, query head h, probe j, tile): (-inf, -1) past the list.
template <class Key>
LCKV_HOST_DEVICE inline void ivf_tile_slot(const float* q_head, const typename Key::storage* keys, const int64_t* offsets,
                                           const int64_t* rows, const int64_t* probes, const IvfScanProblem& p,
                                           int64_t b, int64_t h, int64_t j, int64_t tile, int t, float* score,
                                           int64_t* row) {
  const int64_t kv_head = h / p.group();
  const int64_t list = probes[(b * p.q_heads + h) * p.nprobe + j];
  const int64_t* bounds = offsets + (b * p.kv_heads + kv_head) * (p.n_lists + 1);
  const int64_t pos = list < 0 ? -1 : bounds[list] + tile * kTopkTile + t;
  if (list < 0 || pos >= bounds[list + 1]) {
    *score = topk_bits_as_float(0xff800000u);  // -inf
    *row = -1;
    return;
  }
  *score = topk_dot<Key>(q_head, keys + b * p.k_stride_b + kv_head * p.k_stride_h + pos * p.k_stride_s, p.head_dim);
  *row = rows[(b * p.kv_heads + kv_head) * p.n + pos];
}

LCKV_HOST_DEVICE inline int64_t ivf_candidate_offset(const IvfScanProblem& p, int64_t b, int64_t h, int64_t j,
                                                     int64_t tile) {
  return ((b * p.q_heads + h) * p.nprobe * p.max_tiles + j * p.max_tiles + tile) * p.kb;
}

// Host version of the CUDA list scan (csrc/cuda/topk_scan.cu).
template <class Key>
void ivf_scan_candidates_host(const float* q, const typename Key::storage* keys, const int64_t* offsets,
                              const int64_t* rows, const int64_t* probes, const IvfScanProblem& p, float* out_scores,
                              int64_t* out_rows) {
  float s[kTopkTile];
  int64_t r[kTopkTile];
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t j = 0; j < p.nprobe; ++j)
        for (int64_t tile = 0; tile < p.max_tiles; ++tile) {
          const float* q_head = q + (b * p.q_heads + h) * p.head_dim;
          for (int t = 0; t < kTopkTile; ++t)
            ivf_tile_slot<Key>(q_head, keys, offsets, rows, probes, p, b, h, j, tile, t, &s[t], &r[t]);
          topk_sort_tile_host(s, r);
          const int64_t at = ivf_candidate_offset(p, b, h, j, tile);
          for (int i = 0; i < p.kb; ++i) {
            out_scores[at + i] = s[i];
            out_rows[at + i] = r[i];
          }
        }
}

}  // namespace lckv

#if defined(__CUDACC__) || defined(LCKV_WITH_CUDA)
#include <cuda_runtime.h>

namespace lckv {
// Launches the scan on `stream` (csrc/cuda/topk_scan.cu) for Key = KeyF32, KeyF16 or KeyBF16;
// q, k and the outputs in device memory. Returns the launch status (cudaErrorInvalidValue when the
// group's queries and tile scores exceed 48 KiB of shared memory).
template <class Key>
cudaError_t flat_topk_candidates_cuda(const float* q, const typename Key::storage* k, const TopkProblem& p,
                                      float* out_scores, int64_t* out_rows, cudaStream_t stream);
// The IVF list scan on `stream`; every pointer in device memory.
template <class Key>
cudaError_t ivf_scan_candidates_cuda(const float* q, const typename Key::storage* keys, const int64_t* offsets,
                                     const int64_t* rows, const int64_t* probes, const IvfScanProblem& p,
                                     float* out_scores, int64_t* out_rows, cudaStream_t stream);
}  // namespace lckv
#endif
