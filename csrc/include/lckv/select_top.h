// Top-`count` selection of (score, id) pairs with few data-dependent branches.
//
// std::nth_element + std::sort on scores in search order mispredict about every other comparison;
// in a graph search on stories260K (262K keys, ~1,000 scored per query) selecting the best 100
// keys and the best entry keys that way took about half of the search time (perf). select_top
// buckets the scores linearly between their min and max (64 to 1024 buckets, about one per score,
// monotonic in the score), finds the bucket holding the count-th best from a histogram, and places
// the winners in bucket order (a counting sort); only the boundary bucket's few elements go through
// nth_element, and an insertion sort on the output pairs orders the few that share a bucket.
// Scores and ids are separate arrays, so the min/max and bucket passes vectorise. The order is:
// descending score, then ascending id. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lckv/per_thread.h"

namespace lckv {

// Writes the min(count, n) best of (scores[i], ids[i]), i < n, sorted best first, to
// out_scores / out_ids (which must not overlap the inputs); returns how many. Scores must be finite.
// A caller that knows bounds lo <= every score <= hi may pass them (saves a pass); by default they
// are computed.
inline std::size_t select_top(const float* scores, const uint32_t* ids, std::size_t n, std::size_t count,
                              float* out_scores, uint32_t* out_ids,
                              float lo = std::numeric_limits<float>::infinity(),
                              float hi = -std::numeric_limits<float>::infinity()) {
  auto ahead = [](float as, uint32_t ai, float bs, uint32_t bi) { return as > bs || (as == bs && ai < bi); };
  auto better = [&](uint32_t a, uint32_t b) { return ahead(scores[a], ids[a], scores[b], ids[b]); };  // positions
  struct Scratch {
    std::vector<uint16_t> bucket;
    std::vector<uint32_t> order, winners;
  };
  Scratch& s = per_thread<Scratch, Scratch>();
  const std::size_t taken = std::min(count, n);
  if (n <= count || n < 64) {  // small: the library selection is as fast
    s.order.resize(n);
    for (std::size_t i = 0; i < n; ++i) s.order[i] = static_cast<uint32_t>(i);
    if (n > count) std::nth_element(s.order.begin(), s.order.begin() + static_cast<std::ptrdiff_t>(count), s.order.end(), better);
    std::sort(s.order.begin(), s.order.begin() + static_cast<std::ptrdiff_t>(taken), better);
    for (std::size_t i = 0; i < taken; ++i) {
      out_scores[i] = scores[s.order[i]];
      out_ids[i] = ids[s.order[i]];
    }
    return taken;
  }
  if (count == 0) return 0;
  constexpr int kMaxBuckets = 1024;
  int nb = 64;
  while (nb < kMaxBuckets && static_cast<std::size_t>(nb) < n) nb *= 2;
  s.bucket.resize(n);
  s.winners.resize(n);
  std::size_t i = 0;
  if (!(lo <= hi)) {  // no bounds given: min and max in 8 independent lanes (one running pair
                      // would chain every step on the last)
    float lo8[8], hi8[8];
    for (int u = 0; u < 8; ++u) lo8[u] = hi8[u] = scores[u];
    for (i = 8; i + 8 <= n; i += 8)
      for (int u = 0; u < 8; ++u) {
        lo8[u] = scores[i + u] < lo8[u] ? scores[i + u] : lo8[u];
        hi8[u] = scores[i + u] > hi8[u] ? scores[i + u] : hi8[u];
      }
    for (; i < n; ++i) {
      lo8[0] = scores[i] < lo8[0] ? scores[i] : lo8[0];
      hi8[0] = scores[i] > hi8[0] ? scores[i] : hi8[0];
    }
    lo = lo8[0];
    hi = hi8[0];
    for (int u = 1; u < 8; ++u) {
      lo = lo8[u] < lo ? lo8[u] : lo;
      hi = hi8[u] > hi ? hi8[u] : hi;
    }
  }
  // (x - lo) * scale is non-decreasing in x (rounding is monotonic): bucket order is score order.
  const float scale = hi > lo ? (nb - 0.5f) / (hi - lo) : 0.0f;
  const float top = static_cast<float>(nb - 1);
  for (i = 0; i < n; ++i) {
    float x = (scores[i] - lo) * scale;
    x = x > 0.0f ? x : 0.0f;  // only if a caller's lo bound was not a bound
    s.bucket[i] = static_cast<uint16_t>(static_cast<int>(x < top ? x : top));
  }
  uint32_t hist[kMaxBuckets];
  std::fill(hist, hist + nb, 0u);
  for (i = 0; i < n; ++i) ++hist[s.bucket[i]];
  // From the top bucket down to the `edge` bucket, which holds the count-th best: where each
  // bucket's elements start in `order` (the winners, then the edge bucket's elements).
  uint32_t start[kMaxBuckets];
  int edge = nb - 1;
  std::size_t above = 0;
  while (above + hist[edge] < count) {
    start[edge] = static_cast<uint32_t>(above);
    above += hist[edge--];
  }
  start[edge] = static_cast<uint32_t>(above);
  const std::size_t span = above + hist[edge];
  // The positions in buckets >= edge, collected branch-free in two independent halves (one
  // running count would chain every step on the last), then placed in bucket order.
  const std::size_t half = n / 2;
  std::size_t w0 = 0, w1 = half;
  for (i = 0; i < half; ++i) {
    s.winners[w0] = static_cast<uint32_t>(i);
    s.winners[w1] = static_cast<uint32_t>(i + half);
    w0 += s.bucket[i] >= edge;
    w1 += s.bucket[i + half] >= edge;
  }
  if (n & 1) {
    s.winners[w1] = static_cast<uint32_t>(n - 1);
    w1 += s.bucket[n - 1] >= edge;
  }
  s.order.resize(span);
  for (std::size_t j = 0; j < w0; ++j) {
    const uint32_t x = s.winners[j];
    s.order[start[s.bucket[x]]++] = x;
  }
  for (std::size_t j = half; j < w1; ++j) {
    const uint32_t x = s.winners[j];
    s.order[start[s.bucket[x]]++] = x;
  }
  const std::size_t need = count - above;  // from the edge bucket
  if (hist[edge] > need)
    std::nth_element(s.order.begin() + static_cast<std::ptrdiff_t>(above),
                     s.order.begin() + static_cast<std::ptrdiff_t>(count),
                     s.order.end(), better);
  // In bucket order already: the insertion sort only orders pairs within a bucket.
  for (std::size_t r = 0; r < count; ++r) {
    out_scores[r] = scores[s.order[r]];
    out_ids[r] = ids[s.order[r]];
  }
  for (std::size_t r = 1; r < count; ++r) {
    const float xs = out_scores[r];
    const uint32_t xi = out_ids[r];
    if (!ahead(xs, xi, out_scores[r - 1], out_ids[r - 1])) continue;
    std::size_t j = r;
    for (; j > 0 && ahead(xs, xi, out_scores[j - 1], out_ids[j - 1]); --j) {
      out_scores[j] = out_scores[j - 1];
      out_ids[j] = out_ids[j - 1];
    }
    out_scores[j] = xs;
    out_ids[j] = xi;
  }
  return count;
}

// Top-k on packed keys: a (score, id) pair as one unsigned integer, so that ascending keys are
// descending scores (ties: ascending id), and integer selection and sorting do the rest.

// 64-bit key ordering (score descending, id ascending) as unsigned integers: the upper half is
// the score's bits mapped to an order-preserving unsigned value, inverted; the lower half the id
// (ids fit in 32 bits: the glue caps the index below 2^32 keys).
inline uint64_t sort_key(float score, int64_t id) {
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending in score
  return (static_cast<uint64_t>(~ordered) << 32) | static_cast<uint32_t>(id);
}

// The score back from a sort_key (exact: the mapping is a bijection).
inline float key_score(uint64_t key) {
  const uint32_t ordered = ~static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
  float score;
  std::memcpy(&score, &bits, sizeof score);
  return score;
}

// Moves the `count` smallest of `keys` (sort_keys) to its front, in no order (the rest of `keys`
// is left unspecified). A histogram of the keys' top 11 bits (the score's sign, exponent and two
// mantissa bits: log-spaced buckets, which suit the exponentially skewed probabilities of a group
// ranking, where linear buckets put nearly everything in one) finds the bucket of the count-th
// key; only that bucket goes through nth_element (over all keys: ~12% of a 1M-key group search).
inline void select_smallest_keys(std::vector<uint64_t>& keys, std::size_t count, std::vector<uint64_t>& winners,
                                 std::vector<uint64_t>& boundary) {
  const std::size_t n = keys.size();
  if (count >= n) return;
  constexpr int kBits = 11;
  uint32_t hist[1 << kBits] = {};
  for (const uint64_t x : keys) ++hist[x >> (64 - kBits)];
  uint64_t edge = 0;
  std::size_t below = 0;  // keys in buckets before the edge bucket
  while (below + hist[edge] < count) below += hist[edge++];
  winners.resize(n);
  boundary.resize(n);
  std::size_t w = 0, t = 0;
  for (const uint64_t x : keys) {  // branch-free
    const uint64_t b = x >> (64 - kBits);
    winners[w] = x;
    boundary[t] = x;
    w += b < edge;
    t += b == edge;
  }
  std::nth_element(boundary.begin(), boundary.begin() + static_cast<std::ptrdiff_t>(count - below),
                   boundary.begin() + static_cast<std::ptrdiff_t>(t));
  std::copy(winners.begin(), winners.begin() + static_cast<std::ptrdiff_t>(w), keys.begin());
  std::copy(boundary.begin(), boundary.begin() + static_cast<std::ptrdiff_t>(count - below),
            keys.begin() + static_cast<std::ptrdiff_t>(w));
}

// The `count` smallest of `keys` (sort_keys: the best pairs), sorted, at its front (the rest of
// `keys` is left unspecified).
inline void sort_smallest_keys(std::vector<uint64_t>& keys, std::size_t count) {
  count = std::min(count, keys.size());
  if (count < keys.size())
    std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(count), keys.end());
  std::sort(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(count));
}

}  // namespace lckv
