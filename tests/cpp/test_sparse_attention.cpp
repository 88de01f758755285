// The torch-free sparse attention core against a double-precision scalar oracle, for fp32, fp16
// and bf16 storage, both SIMD paths, random shapes (GQA groups, odd head dims, -1 padding,
// repeated indices, strided K/V, more indices than rows), the one-kv-head entry point, plus the
// fp16 conversion and the polynomial exp on their own.
#include <lckv/sparse_attention.h>

#include <cmath>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "check.h"

namespace {

uint16_t float_to_bf16_bits(float f) {  // round to nearest even
  const uint32_t u = lckv::float_to_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

uint16_t float_to_half_bits(float f) {  // round to nearest even, finite inputs within half range
  const uint32_t u = lckv::float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const float a = std::fabs(f);
  if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t v = lckv::float_to_bits(a);
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (((v >> 23) - 112u) << 10) | ((v >> 13) & 0x3ffu));
}

template <typename T>
T store(float x);
template <>
float store<float>(float x) { return x; }
template <>
lckv::half_bits store<lckv::half_bits>(float x) { return {float_to_half_bits(x)}; }
template <>
lckv::bfloat16_bits store<lckv::bfloat16_bits>(float x) { return {float_to_bf16_bits(x)}; }

template <typename T>
void check_random_problem(std::mt19937& rng, bool allow_simd, bool allow_wide, bool allow_bf16_dot) {
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  lckv::SparseAttentionProblem p;
  p.batch = 1 + pick(rng) % 3;
  p.kv_heads = 1 + pick(rng) % 3;
  const int groups[] = {1, 2, 4, 7, 8};  // quads of heads, a pair and a lone head, two quads
  p.q_heads = p.kv_heads * groups[pick(rng) % 5];
  const int dims[] = {1, 8, 24, 59, 64, 111, 128, 256};  // multiples of 8 take the AVX2 intrinsics path
  p.head_dim = dims[pick(rng) % 8];
  p.seq = 1 + pick(rng) % 200;
  p.n_selected = pick(rng) % 140;  // crosses several 32-row prefetch batches, and often exceeds seq
  p.scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim)) * (0.5f + (pick(rng) % 100) / 50.0f);
  const int64_t row_pad = pick(rng) % 3;  // strided rows: extra elements after each row
  p.k_stride_s = p.head_dim + row_pad;
  p.k_stride_h = p.seq * p.k_stride_s;
  p.k_stride_b = p.kv_heads * p.k_stride_h;
  p.v_stride_s = p.head_dim;
  p.v_stride_h = p.seq * p.v_stride_s;
  p.v_stride_b = p.kv_heads * p.v_stride_h;

  std::vector<float> q(size_t(p.batch * p.q_heads * p.head_dim));
  for (auto& x : q) x = normal(rng) * 2.0f;
  // queries that are bf16 values (as the glue's cast to K's dtype makes them) take the VDPBF16PS
  // path for bf16 K where the CPU has it; fp32 queries must not
  if (std::is_same_v<T, lckv::bfloat16_bits> && pick(rng) % 2 == 0) {
    for (auto& x : q) x = lckv::to_float(lckv::bfloat16_bits{float_to_bf16_bits(x)});
  }
  std::vector<T> k(size_t(p.batch * p.k_stride_b)), v(size_t(p.batch * p.v_stride_b));
  std::vector<float> kf(k.size()), vf(v.size());  // the values the kernel actually sees
  for (size_t i = 0; i < k.size(); ++i) kf[i] = lckv::to_float(k[i] = store<T>(normal(rng)));
  for (size_t i = 0; i < v.size(); ++i) vf[i] = lckv::to_float(v[i] = store<T>(normal(rng)));
  std::vector<int64_t> idx(size_t(p.batch * p.kv_heads * p.n_selected));
  const bool all_padding = pick(rng) % 8 == 0;
  for (auto& i : idx) i = (all_padding || pick(rng) % 5 == 0) ? -1 : pick(rng) % p.seq;

  std::vector<float> out(q.size(), 123.0f), lse(size_t(p.batch * p.q_heads), 123.0f);
  lckv::SparseAttention<T> kernel(allow_simd, allow_wide, allow_bf16_dot);
  kernel.run(q.data(), k.data(), v.data(), idx.data(), p, out.data(), lse.data());

  const int64_t group = p.q_heads / p.kv_heads;
  // The one-kv-head entry point (used by callers that parallelise themselves) runs the same code
  // path, so it must reproduce run() exactly.
  std::vector<float> head_out(size_t(group * p.head_dim));
  std::vector<float> head_lse(static_cast<size_t>(group));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      if (!allow_simd || !allow_wide || !allow_bf16_dot) continue;  // kv_head: the process-wide SIMD choice
      const int64_t q_offset = (b * p.q_heads + h * group) * p.head_dim;
      lckv::sparse_attention_kv_head(q.data() + q_offset, group, p.head_dim,
                                     k.data() + b * p.k_stride_b + h * p.k_stride_h, p.k_stride_s,
                                     v.data() + b * p.v_stride_b + h * p.v_stride_h, p.v_stride_s,
                                     idx.data() + (b * p.kv_heads + h) * p.n_selected, p.n_selected, p.scale,
                                     head_out.data(), head_lse.data());
      for (int64_t i = 0; i < group * p.head_dim; ++i) EXPECT(head_out[size_t(i)] == out[size_t(q_offset + i)]);
      for (int64_t g = 0; g < group; ++g) {
        const float want = lse[size_t(b * p.q_heads + h * group + g)];
        EXPECT(head_lse[size_t(g)] == want || (std::isnan(want) && std::isnan(head_lse[size_t(g)])));
      }
    }
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t hq = 0; hq < p.q_heads; ++hq) {
      const int64_t h = hq / group;
      const int64_t* row_idx = idx.data() + (b * p.kv_heads + h) * p.n_selected;
      const float* qrow = q.data() + (b * p.q_heads + hq) * p.head_dim;
      std::vector<double> s;
      std::vector<int64_t> used;
      for (int64_t j = 0; j < p.n_selected; ++j) {
        if (row_idx[j] < 0) continue;
        const float* krow = kf.data() + b * p.k_stride_b + h * p.k_stride_h + row_idx[j] * p.k_stride_s;
        double d = 0.0;
        for (int64_t c = 0; c < p.head_dim; ++c) d += double(qrow[c]) * krow[c];
        s.push_back(d * p.scale);
        used.push_back(row_idx[j]);
      }
      const float got_lse = lse[size_t(b * p.q_heads + hq)];
      const float* got = out.data() + (b * p.q_heads + hq) * p.head_dim;
      if (s.empty()) {
        EXPECT(got_lse == -std::numeric_limits<float>::infinity());
        for (int64_t c = 0; c < p.head_dim; ++c) EXPECT(got[c] == 0.0f);
        continue;
      }
      double m = s[0];
      for (double x : s) m = std::max(m, x);
      double total = 0.0;
      for (double x : s) total += std::exp(x - m);
      EXPECT(lckv_test::close(got_lse, m + std::log(total), 1e-5, 1e-5));
      for (int64_t c = 0; c < p.head_dim; ++c) {
        double want = 0.0;
        for (size_t j = 0; j < s.size(); ++j) {
          want += std::exp(s[j] - m) / total *
                  vf[size_t(b * p.v_stride_b + h * p.v_stride_h + used[j] * p.v_stride_s + c)];
        }
        // fp32 accumulation: values are O(1), so an absolute 1e-5 is the fp32 bound here.
        EXPECT(lckv_test::close(got[c], want, 1e-5, 1e-5));
      }
    }
  }
}

void check_conversions_and_exp() {
  // Every finite half converts exactly (compare with a double computation of its value).
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint32_t e = (h >> 10) & 0x1f, f = h & 0x3ff;
    const double sign = (h & 0x8000u) ? -1.0 : 1.0;
    const float got = lckv::to_float(lckv::half_bits{static_cast<uint16_t>(h)});
    if (e == 31) {
      EXPECT(f == 0 ? std::isinf(got) : std::isnan(got));
    } else {
      const double want = e == 0 ? sign * std::ldexp(double(f), -24) : sign * std::ldexp(1.0 + f / 1024.0, int(e) - 15);
      EXPECT(double(got) == want);
    }
  }
  for (float x = -90.0f; x <= 0.0f; x += 0.0137f) {
    const double want = x < -87.0f ? 0.0 : std::exp(double(x));
    EXPECT(lckv_test::close(lckv::exp_nonpositive(x), want, 1e-37, 4e-7));
  }
  EXPECT(lckv::exp_nonpositive(-std::numeric_limits<float>::infinity()) == 0.0f);
  EXPECT(lckv::exp_nonpositive(0.0f) == 1.0f);
  EXPECT(std::isnan(lckv::exp_nonpositive(std::numeric_limits<float>::quiet_NaN())));
}

#ifdef LCKV_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"))) void exp8(const float* in, float* out) {
  _mm256_storeu_ps(out, lckv::detail::exp_nonpositive8(_mm256_loadu_ps(in)));
}

// The 8-lane exp of the AVX2 softmax: same accuracy and special values as the scalar one.
void check_vector_exp() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return;
  std::vector<float> xs;
  for (float x = -90.0f; x <= 0.0f; x += 0.0071f) xs.push_back(x);
  const float inf = std::numeric_limits<float>::infinity();
  xs.insert(xs.end(), {0.0f, -0.0f, -inf, std::numeric_limits<float>::quiet_NaN(), -87.0f, -86.99f, -1e-30f});
  while (xs.size() % 8 != 0) xs.push_back(-1.0f);
  std::vector<float> got(xs.size());
  for (size_t i = 0; i < xs.size(); i += 8) exp8(xs.data() + i, got.data() + i);
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    if (std::isnan(x)) {
      EXPECT(std::isnan(got[i]));
    } else {
      const double want = x < -87.0f ? 0.0 : std::exp(double(x));
      EXPECT(lckv_test::close(got[i], want, 1e-37, 4e-7));
    }
  }
}
#else
void check_vector_exp() {}
#endif

}  // namespace

int main() {
  std::random_device device;
  const unsigned seed = device();
  std::printf("test_sparse_attention: seed %u\n", seed);
  std::mt19937 rng(seed);
  check_conversions_and_exp();
  check_vector_exp();
  for (int trial = 0; trial < 60; ++trial) {
    // portable, AVX2 with 16 registers, 32 registers without the bf16 dot, the default choice
    for (int mode = 0; mode < 4; ++mode) {
      const bool simd = mode > 0, wide = mode >= 2, bf16_dot = mode == 3;
      check_random_problem<float>(rng, simd, wide, bf16_dot);
      check_random_problem<lckv::half_bits>(rng, simd, wide, bf16_dot);
      check_random_problem<lckv::bfloat16_bits>(rng, simd, wide, bf16_dot);
    }
  }
  std::printf("simd path on this machine: %s; bf16: %s\n", lckv::SparseAttention<float>().simd_name(),
              lckv::SparseAttention<lckv::bfloat16_bits>().simd_name());
  return lckv_test::finish("test_sparse_attention");
}
