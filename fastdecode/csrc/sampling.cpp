// The seeded sampler's draw (fastdecode/sampling.py): the token t of largest p_t / E_t over the
// tokens with p_t > 0, where E_t = -log(U_t) is an Exp(1) draw made from a hash of (seed, index,
// t). That is the exponential race, the Gumbel-max trick without its second log: an exact draw
// from p. Ties go to the lowest token id. sampling.py holds the same formula in numpy, bit for
// bit (IEEE doubles and libm's log), for machines without the kernels.
// Registered as torch.ops.fastdecode_kernels.race_pick; also top_k_rows (the k largest logits of
// each row, for Token Recycling's update), below.
//
// Why native: over a whole vocabulary (temperature 1 without top-k/top-p, the API's default) the
// numpy draw took ~2 ms a token. Here the hash costs a few ns per token and most logs are skipped:
// E_t >= 1 - U_t, so a token whose p_t / (1 - U_t) cannot beat the best score so far is passed
// without its log.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {

inline uint64_t splitmix64(uint64_t z) {  // SplitMix64's finalizer (Steele et al. 2014)
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

namespace fastdecode {

int64_t race_pick(const at::Tensor& probs, int64_t seed, int64_t index) {
  TORCH_CHECK(probs.dim() == 1 && probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.is_cpu(),
              "probs must be a contiguous float32 CPU tensor [vocab]");
  const float* p = probs.data_ptr<float>();
  const int64_t V = probs.size(0);
  const uint64_t key = splitmix64(static_cast<uint64_t>(seed) ^ splitmix64(static_cast<uint64_t>(index)));
  auto uniform = [key](int64_t t) {  // in (0, 1), 53 bits
    const uint64_t bits = splitmix64(key ^ (static_cast<uint64_t>(t) * 0x94D049BB133111EBull));
    return (static_cast<double>(bits >> 11) + 0.5) / 9007199254740992.0;
  };
  int64_t best = -1;
  double top = 0.0;  // the best score so far
  auto consider = [&](int64_t t, double u) {
    const double score = static_cast<double>(p[t]) / -std::log(u);
    if (best < 0 || score > top || (score == top && t < best)) best = t, top = score;
  };
  int64_t first = 0;  // start from the most likely token: a high bar skips most logs
  for (int64_t t = 1; t < V; ++t)
    if (p[t] > p[first]) first = t;
  if (!(p[first] > 0.0f)) return -1;  // no token has probability (the caller raises)
  consider(first, uniform(first));
  for (int64_t t = 0; t < V; ++t) {
    if (!(p[t] > 0.0f) || t == first) continue;
    const double u = uniform(t);
    // score <= p / (1 - u): skip when even that bound (with room for rounding) is below the bar
    if (static_cast<double>(p[t]) < top * (1.0 - u) * (1.0 - 1e-9)) continue;
    consider(t, u);
  }
  return best;
}

// Indices of the k largest entries of every row of x [n, V], largest first; among equal values
// the lower index first; NaNs are never picked. One pass per row: 8 values at a time are
// compared with the k-th best so far and skipped unless one beats it (after the first few
// hundred values almost none do), so a 49152-wide row costs a few microseconds (numpy's
// argpartition route took ~40 us).
at::Tensor top_k_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "x must be a contiguous float32 CPU tensor [n, V]");
  const int64_t n = x.size(0), V = x.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "k = ", k, " must be in [1, V = ", V, "]");
  at::Tensor out = at::empty({n, k}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  std::vector<float> vals(k);
  std::vector<int64_t> idx(k);
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x.data_ptr<float>() + r * V;
    int64_t count = 0;
    auto insert = [&](float v, int64_t j) {
      int64_t pos;
      if (count < k) {
        pos = count++;
      } else {
        if (!(v > vals[k - 1])) return;
        pos = k - 1;
      }
      for (; pos > 0 && vals[pos - 1] < v; --pos) {
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
      }
      vals[pos] = v;
      idx[pos] = j;
    };
    int64_t j = 0;
    for (; j < V && count < k; ++j)
      if (row[j] == row[j]) insert(row[j], j);
    for (; j + 8 <= V; j += 8) {
      const __m256 v = _mm256_loadu_ps(row + j);
      int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(vals[k - 1]), _CMP_GT_OQ));
      while (mask) {
        const int b = __builtin_ctz(mask);
        insert(row[j + b], j + b);
        mask &= mask - 1;
      }
    }
    for (; j < V; ++j) insert(row[j], j);  // insert() refuses NaN once full (v > x is false)
    for (int64_t i = 0; i < count; ++i) o[r * k + i] = idx[i];
    for (int64_t i = count; i < k; ++i) o[r * k + i] = -1;  // fewer than k non-NaN values
  }
  return out;
}

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("race_pick(Tensor probs, int seed, int index) -> int");
  m.def("top_k_rows(Tensor x, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("race_pick", &fastdecode::race_pick);
  m.impl("top_k_rows", &fastdecode::top_k_rows);
}
