// Top-`count` selection of (score, id) pairs with few data-dependent branches.
//
// std::nth_element + std::sort on scores in search order mispredict about every other comparison;
// in a graph search on stories260K (262K keys, ~1,000 scored per query) selecting the best 100
// keys and the best entry keys that way took about half of the search time (perf). select_top
// buckets the scores linearly between their min and max (1024 buckets, monotonic in the score),
// finds the bucket holding the count-th best from a histogram, and places the winners in bucket
// order (a counting sort); only the boundary bucket's few elements go through nth_element, and an
// insertion sort orders the few elements that share a bucket. Scores and ids are separate arrays,
// so the min/max and bucket passes vectorise. The order is: descending score, then ascending id.
// Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
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
  auto better = [&](uint32_t a, uint32_t b) {  // positions, best first
    return scores[a] > scores[b] || (scores[a] == scores[b] && ids[a] < ids[b]);
  };
  struct Scratch {
    std::vector<uint16_t> bucket;
    std::vector<uint32_t> order, winners, boundary;
  };
  Scratch& s = per_thread<Scratch, Scratch>();
  const std::size_t taken = std::min(count, n);
  s.order.resize(n);
  if (n <= count || n < 64) {  // small: the library selection is as fast
    for (std::size_t i = 0; i < n; ++i) s.order[i] = static_cast<uint32_t>(i);
    if (n > count) std::nth_element(s.order.begin(), s.order.begin() + static_cast<std::ptrdiff_t>(count), s.order.end(), better);
    std::sort(s.order.begin(), s.order.begin() + static_cast<std::ptrdiff_t>(taken), better);
  } else if (count > 0) {
    constexpr int kBuckets = 1024;
    s.bucket.resize(n);
    s.winners.resize(n);
    s.boundary.resize(n);
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
    const float scale = hi > lo ? (kBuckets - 0.5f) / (hi - lo) : 0.0f;
    const float top = kBuckets - 1;
    for (i = 0; i < n; ++i) {
      float x = (scores[i] - lo) * scale;
      x = x > 0.0f ? x : 0.0f;  // only if a caller's lo bound was not a bound
      s.bucket[i] = static_cast<uint16_t>(static_cast<int>(x < top ? x : top));
    }
    uint32_t hist[kBuckets] = {};
    for (i = 0; i < n; ++i) ++hist[s.bucket[i]];
    int edge = kBuckets - 1;  // the bucket holding the count-th best
    std::size_t above = 0;    // elements in buckets above it
    while (above + hist[edge] < count) above += hist[edge--];
    // The winners above the edge and the edge bucket's elements, collected branch-free; then the
    // winners go to their place in bucket order (bucket b starts after the higher buckets').
    std::size_t w = 0, t = 0;
    for (i = 0; i < n; ++i) {
      const int b = s.bucket[i];
      s.winners[w] = static_cast<uint32_t>(i);
      s.boundary[t] = static_cast<uint32_t>(i);
      w += b > edge;
      t += b == edge;
    }
    uint32_t start[kBuckets];
    std::size_t placed = 0;
    for (int b = kBuckets - 1; b > edge; --b) {
      start[b] = static_cast<uint32_t>(placed);
      placed += hist[b];
    }
    for (std::size_t j = 0; j < w; ++j) s.order[start[s.bucket[s.winners[j]]]++] = s.winners[j];
    const std::size_t need = count - above;
    if (t > need)
      std::nth_element(s.boundary.begin(), s.boundary.begin() + static_cast<std::ptrdiff_t>(need),
                       s.boundary.begin() + static_cast<std::ptrdiff_t>(t), better);
    std::copy(s.boundary.begin(), s.boundary.begin() + static_cast<std::ptrdiff_t>(need),
              s.order.begin() + static_cast<std::ptrdiff_t>(above));
    // In bucket order already: the insertion sort only orders elements within a bucket.
    for (std::size_t r = 1; r < count; ++r) {
      const uint32_t x = s.order[r];
      if (!better(x, s.order[r - 1])) continue;
      std::size_t j = r;
      for (; j > 0 && better(x, s.order[j - 1]); --j) s.order[j] = s.order[j - 1];
      s.order[j] = x;
    }
  }
  for (std::size_t i = 0; i < taken; ++i) {
    out_scores[i] = scores[s.order[i]];
    out_ids[i] = ids[s.order[i]];
  }
  return taken;
}

}  // namespace lckv
