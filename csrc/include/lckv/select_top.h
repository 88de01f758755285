// Top-`count` selection by float score with few data-dependent branches.
//
// std::nth_element on scores in search order mispredicts about every other comparison; in a
// graph search on stories260K (262K keys, ~1,000 scored per query) selecting the best 100 of the
// scored keys and the best ef entry keys that way took about half of the search time (perf).
// select_top buckets the scores linearly between their min and max (1024 buckets, monotonic in
// the score), finds the bucket holding the count-th best from a histogram, and places the winners
// in bucket order (a counting sort); only the boundary bucket's few elements go through
// nth_element, and a final insertion sort orders the few elements that share a bucket. The result
// equals nth_element + sort with the caller's order.
// Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lckv/vector_index.h"

namespace lckv {

// Keeps the `count` best elements of v, sorted by `better`, which must order by descending
// score_of(x) first (any tie-break after that). Scores must be finite.
template <typename T, typename ScoreOf, typename Better>
void select_top(std::vector<T>& v, std::size_t count, ScoreOf score_of, Better better) {
  const std::size_t n = v.size();
  if (n <= count || n < 64) {  // small: the library selection is as fast
    if (n > count) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(count), v.end(), better);
      v.resize(count);
    }
    std::sort(v.begin(), v.end(), better);
    return;
  }
  if (count == 0) {
    v.clear();
    return;
  }
  constexpr int kBuckets = 1024;
  struct Scratch {
    std::vector<uint16_t> bucket;
    std::vector<T> out, boundary;
  };
  Scratch& s = per_thread<Scratch, Scratch>();
  s.bucket.resize(n);
  s.out.resize(n);
  s.boundary.resize(n);
  float lo = score_of(v[0]), hi = lo;
  for (std::size_t i = 1; i < n; ++i) {
    const float x = score_of(v[i]);
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  // (x - lo) * scale is non-decreasing in x (rounding is monotonic), so bucket order is score order.
  const float scale = hi > lo ? (kBuckets - 0.5f) / (hi - lo) : 0.0f;
  uint32_t hist[kBuckets] = {};
  for (std::size_t i = 0; i < n; ++i) {
    const int b = std::min(kBuckets - 1, static_cast<int>((score_of(v[i]) - lo) * scale));
    s.bucket[i] = static_cast<uint16_t>(b);
    ++hist[b];
  }
  int edge = kBuckets - 1;  // the bucket holding the count-th best
  std::size_t above = 0;    // elements in buckets above it
  while (above + hist[edge] < count) above += hist[edge--];
  // Winners above the edge go straight to their place in bucket order (a counting sort: bucket
  // `b` starts at the number of winners in higher buckets); the edge bucket's elements are
  // collected, and the best `need` of them follow.
  uint32_t start[kBuckets];
  std::size_t placed = 0;
  for (int b = kBuckets - 1; b > edge; --b) {
    start[b] = static_cast<uint32_t>(placed);
    placed += hist[b];
  }
  std::size_t t = 0;  // elements in the edge bucket
  for (std::size_t i = 0; i < n; ++i) {
    const int b = s.bucket[i];
    if (b > edge) s.out[start[b]++] = v[i];
    s.boundary[t] = v[i];
    t += b == edge;
  }
  const std::size_t need = count - above;
  if (t > need)
    std::nth_element(s.boundary.begin(), s.boundary.begin() + static_cast<std::ptrdiff_t>(need),
                     s.boundary.begin() + static_cast<std::ptrdiff_t>(t), better);
  std::copy(s.boundary.begin(), s.boundary.begin() + static_cast<std::ptrdiff_t>(need),
            s.out.begin() + static_cast<std::ptrdiff_t>(above));
  // In bucket order already: an insertion sort only orders the elements within each bucket.
  v.assign(s.out.begin(), s.out.begin() + static_cast<std::ptrdiff_t>(count));
  for (std::size_t i = 1; i < count; ++i) {
    if (!better(v[i], v[i - 1])) continue;
    T x = v[i];
    std::size_t j = i;
    for (; j > 0 && better(x, v[j - 1]); --j) v[j] = v[j - 1];
    v[j] = x;
  }
}

}  // namespace lckv
