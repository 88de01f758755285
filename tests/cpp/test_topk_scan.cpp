// Host run of the top-k scan core shared with csrc/cuda/topk_scan.cu, against brute force:
// each (batch, query head, tile) candidate list must be that tile's best kb keys in order
// (score descending, then row ascending; slots past seq as (-inf, -1)), with the scores a double
// dot product gives to float32 accuracy, for fp32, fp16 and bf16 keys, GQA groups 1..7 and
// strided keys; and the best top_k of all candidates must be the global top-k (kb >= top_k). The
// same for the IVF list scan (check_ivf_case).
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

// The IVF list scan: keys grouped by list with a random order of original rows; each probe's
// tiles must hold that tile's best kb list positions (by score, then row), mapped to their rows;
// the best of all candidates must be the best of the probed lists' keys.
template <class Key>
void check_ivf_case(std::mt19937& rng) {
  lckv::IvfScanProblem p;
  p.batch = 1 + rng() % 2;
  p.kv_heads = 1 + rng() % 2;
  p.q_heads = p.kv_heads * (1 + rng() % 4);
  p.n = 1 + rng() % 600;
  p.head_dim = 1 + rng() % 40;
  p.n_lists = 1 + rng() % 12;
  p.nprobe = 1 + rng() % 4;
  p.kb = 1 + static_cast<int>(rng() % 30);
  p.k_stride_s = p.head_dim;
  p.k_stride_h = p.n * p.head_dim;
  p.k_stride_b = p.kv_heads * p.k_stride_h;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<typename Key::storage> keys(size_t(p.batch * p.k_stride_b));
  for (auto& x : keys) x = make_key<Key>(normal(rng));
  std::vector<int64_t> offsets(size_t(p.batch * p.kv_heads * (p.n_lists + 1))), rows(size_t(p.batch * p.kv_heads * p.n));
  int64_t longest = 0;
  for (int64_t bh = 0; bh < p.batch * p.kv_heads; ++bh) {
    std::vector<int64_t> sizes(size_t(p.n_lists), 0);  // a random split of n positions into lists
    for (int64_t i = 0; i < p.n; ++i) ++sizes[rng() % size_t(p.n_lists)];
    int64_t* bounds = offsets.data() + bh * (p.n_lists + 1);
    bounds[0] = 0;
    for (int64_t l = 0; l < p.n_lists; ++l) {
      bounds[l + 1] = bounds[l] + sizes[size_t(l)];
      longest = std::max(longest, sizes[size_t(l)]);
    }
    std::vector<int64_t> perm(size_t(p.n));
    for (int64_t i = 0; i < p.n; ++i) perm[size_t(i)] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::copy(perm.begin(), perm.end(), rows.begin() + bh * p.n);
  }
  p.max_tiles = (longest + lckv::kTopkTile - 1) / lckv::kTopkTile;
  std::vector<float> q(size_t(p.batch * p.q_heads * p.head_dim));
  for (auto& x : q) x = normal(rng);
  std::vector<int64_t> probes(size_t(p.batch * p.q_heads * p.nprobe));
  for (int64_t bh = 0; bh < p.batch * p.q_heads; ++bh) {
    std::vector<int64_t> lists(size_t(p.n_lists));
    for (int64_t l = 0; l < p.n_lists; ++l) lists[size_t(l)] = l;
    std::shuffle(lists.begin(), lists.end(), rng);
    for (int64_t j = 0; j < p.nprobe; ++j) probes[size_t(bh * p.nprobe + j)] = j < p.n_lists ? lists[size_t(j)] : -1;
  }
  const size_t total = size_t(p.batch * p.q_heads * p.nprobe * p.max_tiles * p.kb);
  std::vector<float> scores(total);
  std::vector<int64_t> out_rows(total);
  lckv::ivf_scan_candidates_host<Key>(q.data(), keys.data(), offsets.data(), rows.data(), probes.data(), p,
                                      scores.data(), out_rows.data());
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t kv = h / p.group(), bh = b * p.kv_heads + kv;
      auto exact = [&](int64_t pos) {
        double acc = 0;
        for (int64_t d = 0; d < p.head_dim; ++d)
          acc += double(q[size_t((b * p.q_heads + h) * p.head_dim + d)]) *
                 key_value<Key>(keys[size_t(b * p.k_stride_b + kv * p.k_stride_h + pos * p.k_stride_s + d)]);
        return acc;
      };
      std::vector<double> probed;  // exact scores of every key in a probed list
      std::vector<std::pair<float, int64_t>> merged;
      for (int64_t j = 0; j < p.nprobe; ++j) {
        const int64_t list = probes[size_t((b * p.q_heads + h) * p.nprobe + j)];
        const int64_t begin = list < 0 ? 0 : offsets[size_t(bh * (p.n_lists + 1) + list)];
        const int64_t end = list < 0 ? 0 : offsets[size_t(bh * (p.n_lists + 1) + list + 1)];
        for (int64_t pos = begin; pos < end; ++pos) probed.push_back(exact(pos));
        for (int64_t tile = 0; tile < p.max_tiles; ++tile) {
          const int64_t first = begin + tile * lckv::kTopkTile, last = std::min(end, first + lckv::kTopkTile);
          const int64_t at = lckv::ivf_candidate_offset(p, b, h, j, tile);
          for (int i = 0; i < p.kb; ++i) {
            const float score = scores[size_t(at + i)];
            const int64_t row = out_rows[size_t(at + i)];
            merged.emplace_back(score, row);
            if (first + i >= last) {
              EXPECT(row == -1 && std::isinf(score) && score < 0);
              continue;
            }
            // the row must be one of this tile's positions, with its score
            int64_t pos = -1;
            for (int64_t x = first; x < last; ++x) pos = rows[size_t(bh * p.n + x)] == row ? x : pos;
            EXPECT(pos >= 0);
            if (pos < 0) continue;
            EXPECT(lckv_test::close(score, exact(pos), 1e-5 * p.head_dim, 1e-5));
            int better = 0;
            for (int64_t x = first; x < last; ++x) better += exact(x) > exact(pos) + 1e-4 * p.head_dim;
            EXPECT(better <= i);
          }
        }
      }
      std::sort(merged.begin(), merged.end(), [](const auto& x, const auto& y) {
        return lckv::topk_ahead(x.first, x.second, y.first, y.second);
      });
      std::sort(probed.begin(), probed.end(), std::greater<double>());
      for (size_t i = 0; i < std::min<size_t>(size_t(p.kb), probed.size()); ++i)
        EXPECT(lckv_test::close(merged[i].first, probed[i], 1e-4 * p.head_dim, 1e-4));
    }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 60; ++trial) {
    check_case<lckv::KeyF32>(rng);
    check_case<lckv::KeyF16>(rng);
    check_case<lckv::KeyBF16>(rng);
    check_ivf_case<lckv::KeyF32>(rng);
    check_ivf_case<lckv::KeyF16>(rng);
  }
  // the fp16 conversion shared with the GPU equals the host's for every bit pattern
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float want = lckv::to_float(lckv::half_bits{static_cast<uint16_t>(bits)});
    const float got = lckv::KeyF16::load(static_cast<uint16_t>(bits));
    EXPECT((std::isnan(want) && std::isnan(got)) || std::memcmp(&want, &got, sizeof want) == 0);
  }
  return lckv_test::finish("test_topk_scan");
}
