// Host run of the top-k scan core shared with csrc/cuda/topk_scan.cu, against brute force:
// each (batch, query head, tile) candidate list must be that tile's best kb keys in order
// (score descending, then row ascending; slots past seq as (-inf, -1)), with the scores a double
// dot product gives to float32 accuracy, for fp32, fp16 and bf16 keys, GQA groups 1..7 and
// strided keys; and the best top_k of all candidates must be the global top-k (kb >= top_k).
#include <lckv/dtypes.h>
#include <lckv/topk_scan.h>

#include <algorithm>
#include <random>
#include <vector>

#include "check.h"

namespace {

uint16_t to_half_bits(float x) {  // round to nearest even via the host's _Float16 when available
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

uint16_t to_bf16_bits(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <class Key>
float key_value(const typename Key::storage& x);
template <>
float key_value<lckv::KeyF32>(const float& x) { return x; }
template <>
float key_value<lckv::KeyF16>(const uint16_t& x) { return lckv::to_float(lckv::half_bits{x}); }
template <>
float key_value<lckv::KeyBF16>(const uint16_t& x) { return lckv::to_float(lckv::bfloat16_bits{x}); }

template <class Key>
typename Key::storage make_key(float x);
template <>
float make_key<lckv::KeyF32>(float x) { return x; }
template <>
uint16_t make_key<lckv::KeyF16>(float x) { return to_half_bits(x); }
template <>
uint16_t make_key<lckv::KeyBF16>(float x) { return to_bf16_bits(x); }

template <class Key>
void check_case(std::mt19937& rng) {
  lckv::TopkProblem p;
  p.batch = 1 + rng() % 2;
  p.kv_heads = 1 + rng() % 3;
  p.q_heads = p.kv_heads * (1 + rng() % 7);
  p.seq = 1 + rng() % 400;
  p.head_dim = 1 + rng() % 70;
  p.kb = 1 + static_cast<int>(rng() % 40);
  const int64_t pad = rng() % 3;
  p.k_stride_s = p.head_dim + pad;
  p.k_stride_h = p.seq * p.k_stride_s + pad;
  p.k_stride_b = p.kv_heads * p.k_stride_h;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(size_t(p.batch * p.q_heads * p.head_dim));
  for (auto& x : q) x = normal(rng);
  std::vector<typename Key::storage> k(size_t(p.batch * p.k_stride_b));
  const bool ties = rng() % 4 == 0;  // few distinct keys: equal scores, ordered by row
  for (auto& x : k) x = make_key<Key>(ties ? static_cast<float>(rng() % 3) : normal(rng));
  const int64_t tiles = p.tiles();
  std::vector<float> scores(size_t(p.batch * p.q_heads * tiles * p.kb));
  std::vector<int64_t> rows(scores.size());
  lckv::flat_topk_candidates_host<Key>(q.data(), k.data(), p, scores.data(), rows.data());
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t kv = h / p.group();
      std::vector<std::pair<double, int64_t>> all;  // exact scores, row
      for (int64_t s = 0; s < p.seq; ++s) {
        double acc = 0;
        for (int64_t d = 0; d < p.head_dim; ++d)
          acc += double(q[size_t((b * p.q_heads + h) * p.head_dim + d)]) *
                 key_value<Key>(k[size_t(b * p.k_stride_b + kv * p.k_stride_h + s * p.k_stride_s + d)]);
        all.emplace_back(acc, s);
      }
      std::vector<std::pair<float, int64_t>> merged;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t at = lckv::topk_candidate_offset(p, b, h, tile);
        const int64_t first = tile * lckv::kTopkTile, last = std::min(p.seq, first + lckv::kTopkTile);
        for (int i = 0; i < p.kb; ++i) {
          const float score = scores[size_t(at + i)];
          const int64_t row = rows[size_t(at + i)];
          merged.emplace_back(score, row);
          if (first + i >= last) {  // fewer keys than kb in the tile: padding
            EXPECT(row == -1 && std::isinf(score) && score < 0);
            continue;
          }
          EXPECT(row >= first && row < last);
          if (row < first || row >= last) continue;
          const double exact = all[size_t(row)].first;
          EXPECT(lckv_test::close(score, exact, 1e-5 * p.head_dim, 1e-5));
          // nothing in the tile outside the first i+1 candidates beats this one by more than rounding
          int better = 0;
          for (int64_t s = first; s < last; ++s) better += all[size_t(s)].first > exact + 1e-4 * p.head_dim;
          EXPECT(better <= i);
          if (i > 0) {  // best first, ties by row
            const float prev = scores[size_t(at + i - 1)];
            EXPECT(prev > score || (prev == score && rows[size_t(at + i - 1)] < row));
          }
        }
      }
      // the candidates' best kb-or-fewer = the global top ones (by exact score, up to rounding)
      const size_t top = std::min<size_t>(size_t(p.kb), size_t(p.seq));
      std::sort(merged.begin(), merged.end(), [](const auto& x, const auto& y) {
        return lckv::topk_ahead(x.first, x.second, y.first, y.second);
      });
      std::sort(all.begin(), all.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      for (size_t i = 0; i < top; ++i) {
        EXPECT(merged[i].second >= 0);
        EXPECT(lckv_test::close(merged[i].first, all[i].first, 1e-4 * p.head_dim, 1e-4));
      }
    }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 60; ++trial) {
    check_case<lckv::KeyF32>(rng);
    check_case<lckv::KeyF16>(rng);
    check_case<lckv::KeyBF16>(rng);
  }
  // the fp16 conversion shared with the GPU equals the host's for every bit pattern
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float want = lckv::to_float(lckv::half_bits{static_cast<uint16_t>(bits)});
    const float got = lckv::KeyF16::load(static_cast<uint16_t>(bits));
    EXPECT((std::isnan(want) && std::isnan(got)) || std::memcmp(&want, &got, sizeof want) == 0);
  }
  return lckv_test::finish("test_topk_scan");
}
