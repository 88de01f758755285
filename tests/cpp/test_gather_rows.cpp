// Host run of the gather core shared with csrc/cuda/gather_rows.cu, against direct indexing.
#include <lckv/gather_rows.h>

#include <random>
#include <vector>

#include "check.h"

int main() {
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 100; ++trial) {
    lckv::GatherProblem p;
    p.batch = 1 + rng() % 3;
    p.heads = 1 + rng() % 4;
    p.n_selected = rng() % 20;
    p.head_dim = 1 + rng() % 130;
    const int64_t seq = 1 + rng() % 50, pad = rng() % 3;
    p.src_stride_s = p.head_dim + pad;  // padded rows
    p.src_stride_h = seq * p.src_stride_s;
    p.src_stride_b = p.heads * p.src_stride_h;
    std::vector<float> src(size_t(p.batch * p.src_stride_b));
    for (auto& x : src) x = static_cast<float>(rng() % 1000) - 500.0f;
    std::vector<int64_t> idx(size_t(p.batch * p.heads * p.n_selected));
    for (auto& i : idx) i = rng() % 4 == 0 ? -1 : static_cast<int64_t>(rng() % seq);
    std::vector<float> dst(idx.size() * size_t(p.head_dim), 7.0f);
    lckv::gather_rows_host(src.data(), idx.data(), dst.data(), p);
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads; ++h)
        for (int64_t j = 0; j < p.n_selected; ++j) {
          const int64_t row = (b * p.heads + h) * p.n_selected + j, index = idx[size_t(row)];
          for (int64_t d = 0; d < p.head_dim; ++d) {
            const float want = index < 0 ? 0.0f : src[size_t(b * p.src_stride_b + h * p.src_stride_h + index * p.src_stride_s + d)];
            EXPECT(dst[size_t(row * p.head_dim + d)] == want);
          }
        }
  }
  return lckv_test::finish("test_gather_rows");
}
