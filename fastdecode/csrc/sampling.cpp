// The seeded sampler's draw (fastdecode/sampling.py): the token t of largest p_t / E_t over the
// tokens with p_t > 0, where E_t = -log(U_t) is an Exp(1) draw made from a hash of (seed, index,
// t). That is the exponential race, the Gumbel-max trick without its second log: an exact draw
// from p. Ties go to the lowest token id. sampling.py holds the same formula in numpy, bit for
// bit (IEEE doubles and libm's log), for machines without the kernels.
// Registered as torch.ops.fastdecode_kernels.race_pick (the race over given probabilities) and
// sample_row (the logits processors and the race in one call, what Sampler uses); also top_k_rows
// (the k largest logits of each row, a step's one pass over its logits: the greedy walk's argmax
// and the drafters'), recycle_update (Token Recycling's table update), race_orders and
// recycle_propose (its walk), below.
//
// Why native: over a whole vocabulary (temperature 1 without top-k/top-p, the API's default) the
// numpy draw took ~2 ms a token. Here the hash costs a few ns per token and most logs are skipped:
// E_t >= 1 - U_t, so a token whose p_t / (1 - U_t) cannot beat the best score so far is passed
// without its log.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

inline uint64_t splitmix64(uint64_t z) {  // SplitMix64's finalizer (Steele et al. 2014)
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

namespace fastdecode {

namespace {

// The race over tokens ids[0..n) with probabilities p[0..n) (ids ascending, or any order: ties
// go to the lower id either way); -1 when none has p > 0.
// The race's U(0, 1) draw (53 bits) for token t at output `index`: sampling.py's race_uniform.
struct RaceNoise {
  uint64_t key;
  RaceNoise(int64_t seed, int64_t index)
      : key(splitmix64(static_cast<uint64_t>(seed) ^ splitmix64(static_cast<uint64_t>(index)))) {}
  double operator()(int64_t t) const {
    const uint64_t bits = splitmix64(key ^ (static_cast<uint64_t>(t) * 0x94D049BB133111EBull));
    return (static_cast<double>(bits >> 11) + 0.5) / 9007199254740992.0;
  }
};

int64_t race(const int64_t* ids, const float* p, int64_t n, int64_t seed, int64_t index) {
  const RaceNoise uniform(seed, index);
  auto id = [ids](int64_t i) { return ids != nullptr ? ids[i] : i; };
  int64_t best = -1;
  double top = 0.0;  // the best score so far
  auto consider = [&](int64_t i, double u) {
    const double score = static_cast<double>(p[i]) / -std::log(u);
    if (best < 0 || score > top || (score == top && id(i) < id(best))) best = i, top = score;
  };
  int64_t first = 0;  // start from the most likely token: a high bar skips most logs
  for (int64_t i = 1; i < n; ++i)
    if (p[i] > p[first]) first = i;
  if (n == 0 || !(p[first] > 0.0f)) return -1;  // no token has probability (the caller raises)
  consider(first, uniform(id(first)));
  for (int64_t i = 0; i < n; ++i) {
    if (!(p[i] > 0.0f) || i == first) continue;
    const double u = uniform(id(i));
    // score <= p / (1 - u): skip when even that bound (with room for rounding) is below the bar
    if (static_cast<double>(p[i]) < top * (1.0 - u) * (1.0 - 1e-9)) continue;
    consider(i, u);
  }
  return best < 0 ? -1 : id(best);
}

}  // namespace

int64_t race_pick(const at::Tensor& probs, int64_t seed, int64_t index) {
  TORCH_CHECK(probs.dim() == 1 && probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.is_cpu(),
              "probs must be a contiguous float32 CPU tensor [vocab]");
  return race(nullptr, probs.data_ptr<float>(), probs.size(0), seed, index);
}

namespace {

// The k largest entries of row[0..V): their indices into idx and values into vals, largest
// first, the lower index first among equals; NaNs are never picked. Returns how many were found
// (< k only when the row has fewer than k non-NaN values). One pass: 64 values at a time are
// compared with the k-th best so far and skipped unless one beats it (after the first few
// hundred values almost none do), then that block 8 at a time, so a 49152-wide row costs a few
// microseconds (numpy's argpartition route took ~40 us). top_k_rows takes rows in parallel:
// 13 rows just written by a forward's LM head took 0.44 ms by 8-value tests on one thread, 0.24
// ms this way (Xeon, 2 threads, ad-hoc timing).
int64_t top_k_row(const float* row, int64_t V, int64_t k, int64_t* idx, float* vals) {
  int64_t count = 0;
  auto insert = [&](float v, int64_t j) { fastdecode::top_insert(v, j, k, count, idx, vals); };
  int64_t j = 0;
  for (; j < V && count < k; ++j) insert(row[j], j);  // NaNs never enter
  auto scan8 = [&](int64_t i) {  // row[i..i + 8) against the k-th best so far, in order
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(vals[k - 1]), _CMP_GT_OQ));
    while (mask) {
      const int b = __builtin_ctz(mask);
      insert(row[i + b], i + b);
      mask &= mask - 1;
    }
  };
  for (; j + 64 <= V; j += 64) {  // 64 values a test: past the first few hundred, none beats the k-th
    const __m256 kth = _mm256_set1_ps(vals[k - 1]);
    __m256 any = _mm256_cmp_ps(_mm256_loadu_ps(row + j), kth, _CMP_GT_OQ);  // a NaN compares false
    for (int64_t i = 8; i < 64; i += 8) any = _mm256_or_ps(any, _mm256_cmp_ps(_mm256_loadu_ps(row + j + i), kth, _CMP_GT_OQ));
    if (_mm256_movemask_ps(any) == 0) continue;
    for (int64_t i = j; i < j + 64; i += 8) scan8(i);
  }
  for (; j + 8 <= V; j += 8) scan8(j);
  for (; j < V; ++j) insert(row[j], j);  // insert() refuses NaN once full (v > x is false)
  return count;
}

// The k-th largest of x[0..V) (1 <= k <= V; NaNs never count): up to 256, top_k_row's; past
// that, a selection over a copy.
float kth_largest(const float* x, int64_t V, int64_t k) {
  if (k > 256) {
    std::vector<float> copy;
    copy.reserve(V);
    for (int64_t i = 0; i < V; ++i)
      if (x[i] == x[i]) copy.push_back(x[i]);
    if (static_cast<int64_t>(copy.size()) < k) return -std::numeric_limits<float>::infinity();
    std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<float>());
    return copy[k - 1];
  }
  std::vector<int64_t> idx(k);
  std::vector<float> vals(k);
  return top_k_row(x, V, k, idx.data(), vals.data()) < k ? -std::numeric_limits<float>::infinity() : vals[k - 1];
}

}  // namespace

namespace {

// The nucleus among candidates `cand` (id, p), ids ascending: sorted by p, best first and the
// lower id first among equals, a token kept while the fp32 mass before it is below top_p (the
// first always); min_p drops p below `floor`; the kept renormalized (fp32, ids ascending) and
// raced. Returns nothing when the candidates hold less than top_p and are not `every` token of
// nonzero probability (the caller then seeks the nucleus among every token).
std::optional<std::tuple<int64_t, double>> nucleus_draw(std::vector<std::pair<int64_t, float>>& cand, bool every,
                                                        double top_p, float floor, int64_t seed, int64_t index) {
  std::stable_sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  std::vector<std::pair<int64_t, float>> kept;
  float mass = 0.0f;
  for (size_t r = 0; r < cand.size(); ++r) {
    if (r == 0 || mass < static_cast<float>(top_p)) kept.push_back(cand[r]);  // the mass before it < top_p
    mass += cand[r].second;
  }
  if (!every && !(mass >= static_cast<float>(top_p))) return std::nullopt;
  std::sort(kept.begin(), kept.end());
  std::vector<int64_t> ids(kept.size());
  std::vector<float> q(kept.size());
  float total = 0.0f;
  for (size_t r = 0; r < kept.size(); ++r) {
    ids[r] = kept[r].first;
    total += (q[r] = kept[r].second < floor ? 0.0f : kept[r].second);
  }
  for (float& v : q) v /= total;
  const int64_t token = race(ids.data(), q.data(), static_cast<int64_t>(ids.size()), seed, index);
  if (token < 0) return std::make_tuple(int64_t(-1), 0.0);
  return std::make_tuple(token, static_cast<double>(q[std::lower_bound(ids.begin(), ids.end(), token) - ids.begin()]));
}

// The draw over a whole-vocabulary buffer: x = logits / temperature (its max `mx` and the top_k
// bound `kth` given), p = softmax over the x >= kth, then min_p, renormalization and the race over
// every token of nonzero probability (top_p 1), or the nucleus sought among every such token
// (top_p < 1: sample_row's candidates held less than top_p).
std::tuple<int64_t, double> sample_dense(const float* l, int64_t V, float temperature, float mx, float kth,
                                         double top_p, double min_p, int64_t seed, int64_t index) {
  const int64_t V8 = V & ~int64_t(7);
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vninf = _mm256_set1_ps(ninf), vt = _mm256_set1_ps(temperature);
  std::unique_ptr<float[]> buf(new float[V]);
  float* p = buf.get();
  const __m256 vm = _mm256_set1_ps(mx), vk = _mm256_set1_ps(kth);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();  // the sum in doubles: 49k terms
  for (int64_t i = 0; i < V8; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(l + i), vt);
    const __m256 live = _mm256_and_ps(_mm256_cmp_ps(x, vninf, _CMP_NEQ_OQ), _mm256_cmp_ps(x, vk, _CMP_GE_OQ));
    const __m256 e = _mm256_and_ps(fastdecode::exp8(_mm256_sub_ps(x, vm)), live);
    _mm256_storeu_ps(p + i, e);
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double halves[4];
  _mm256_store_pd(halves, _mm256_add_pd(lo, hi));
  double total_e = (halves[0] + halves[2]) + (halves[1] + halves[3]);
  for (int64_t i = V8; i < V; ++i) {
    const float x = l[i] / temperature;
    p[i] = x == ninf || x < kth ? 0.0f : std::exp(x - mx);
    total_e += p[i];
  }
  const float sum = static_cast<float>(total_e);
  float best = 0.0f;
  for (int64_t i = 0; i < V; ++i) best = std::max(best, p[i] /= sum);
  const float floor = min_p > 0 ? static_cast<float>(min_p) * best : 0.0f;
  if (top_p < 1.0) {
    std::vector<std::pair<int64_t, float>> cand;
    for (int64_t i = 0; i < V; ++i)
      if (p[i] > 0.0f) cand.emplace_back(i, p[i]);
    return *nucleus_draw(cand, true, top_p, floor, seed, index);
  }
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) total += (p[i] = p[i] < floor ? 0.0f : p[i]);
  const float t = static_cast<float>(total);
  for (int64_t i = 0; i < V; ++i) p[i] /= t;
  const int64_t token = race(nullptr, p, V, seed, index);
  return token < 0 ? std::make_tuple(int64_t(-1), 0.0) : std::make_tuple(token, static_cast<double>(p[token]));
}

constexpr int64_t kSampleChunks = 4;  // a row's passes run in this many fixed parts: the same sums on any threads

}  // namespace

// Sampler.probs and race_pick (sampling.py) in one call, without torch's per-op costs:
// x = logits / temperature; top_k keeps the x at least the k-th largest; p = softmax(x) (exp8,
// ~2 ulp; a -inf logit gets exactly 0); top_p keeps the nucleus as _top_p does (the candidates
// of p >= nucleus_cut times the best, sorted best first and lower id first, their fp32 mass
// summed in that order; every token of nonzero probability when the candidates hold less than
// top_p); min_p drops p below min_p times the best; the rest is renormalized and raced.
// Returns (token, its probability after all that), or (-1, 0) when no token is left.
//
// With top_p < 1 the row is read twice and nothing vocabulary-wide is written: pass 1 takes the
// max of x, pass 2 the softmax's sum and the few tokens whose e^(x - max) may reach nucleus_cut
// times the best (with a 0.1 % margin; each is then tested exactly on its p = e / sum). Both
// passes run over kSampleChunks fixed parts of the row in parallel, the parts' sums added in
// order. The three passes before (x, then e, then p = e / sum, through a 196 KB buffer, on one
// thread) took 156 us a draw in a sampled AR loop, right after each forward, and 66 us warm; these
// take 112 and 43 (SmolLM2, T 0.7, top-p 0.9; ad-hoc timing, the README's "Cheaper draws").
std::tuple<int64_t, double> sample_row(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
                                       double min_p, double nucleus_cut, int64_t seed, int64_t index) {
  TORCH_CHECK(logits.dim() == 1 && logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.is_cpu(),
              "logits must be a contiguous float32 CPU tensor [vocab]");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const float* l = logits.data_ptr<float>();
  const int64_t V = logits.size(0);
  const float ninf = -std::numeric_limits<float>::infinity();
  const float T = static_cast<float>(temperature);
  const __m256 vninf = _mm256_set1_ps(ninf), vt = _mm256_set1_ps(T);
  // part c covers [start(c), start(c + 1)): whole 8-lane groups, the last part also the tail
  auto start = [V](int64_t c) { return c == kSampleChunks ? V : (V / kSampleChunks * c) & ~int64_t(7); };
  auto parts = [](auto&& body) {
    if (at::in_parallel_region()) {
      for (int64_t c = 0; c < kSampleChunks; ++c) body(c);
    } else {
      at::parallel_for(0, kSampleChunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) body(c);
      });
    }
  };
  // pass 1: the max of x = l / T (division is monotone: the max of the quotients)
  float part_max[kSampleChunks];
  parts([&](int64_t c) {
    const int64_t b = start(c), e = start(c + 1), e8 = b + ((e - b) & ~int64_t(7));
    __m256 vmx = vninf;
    for (int64_t i = b; i < e8; i += 8) vmx = _mm256_max_ps(vmx, _mm256_div_ps(_mm256_loadu_ps(l + i), vt));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmx);
    float mx = ninf;
    for (float v : lanes) mx = std::max(mx, v);
    for (int64_t i = e8; i < e; ++i) mx = std::max(mx, l[i] / T);
    part_max[c] = mx;
  });
  float mx = ninf;
  for (float v : part_max) mx = std::max(mx, v);
  if (mx == ninf) return {-1, 0.0};
  // the k-th largest x: the k-th largest logit over T (monotone again)
  const float kth = top_k > 0 && top_k < V ? kth_largest(l, V, top_k) / T : ninf;
  if (top_p >= 1.0) return sample_dense(l, V, T, mx, kth, top_p, min_p, seed, index);
  // pass 2: e = e^(x - max) over the x >= kth, their sum in doubles, the largest e, and the
  // (id, e) of every e at least `bar`: a superset of the nucleus candidates
  const __m256 vm = _mm256_set1_ps(mx), vk = _mm256_set1_ps(kth);
  alignas(32) float one[8];
  _mm256_store_ps(one, fastdecode::exp8(_mm256_setzero_ps()));  // e at the max
  const float bar = one[0] * static_cast<float>(nucleus_cut) * 0.999f;
  const __m256 vbar = _mm256_set1_ps(bar);
  double part_sum[kSampleChunks];
  float part_best[kSampleChunks];
  std::vector<std::pair<int64_t, float>> found[kSampleChunks];
  parts([&](int64_t c) {
    const int64_t b = start(c), e8 = b + ((start(c + 1) - b) & ~int64_t(7));
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    __m256 vbest = _mm256_setzero_ps();
    alignas(32) float ev[8];
    for (int64_t i = b; i < e8; i += 8) {
      const __m256 x = _mm256_div_ps(_mm256_loadu_ps(l + i), vt);
      const __m256 live = _mm256_and_ps(_mm256_cmp_ps(x, vninf, _CMP_NEQ_OQ), _mm256_cmp_ps(x, vk, _CMP_GE_OQ));
      const __m256 e = _mm256_and_ps(fastdecode::exp8(_mm256_sub_ps(x, vm)), live);
      lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
      hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
      vbest = _mm256_max_ps(vbest, e);
      int mask = _mm256_movemask_ps(_mm256_cmp_ps(e, vbar, _CMP_GE_OQ));
      if (mask) {
        _mm256_store_ps(ev, e);
        for (; mask; mask &= mask - 1) {
          const int j = __builtin_ctz(mask);
          found[c].emplace_back(i + j, ev[j]);
        }
      }
    }
    alignas(32) double halves[4];
    _mm256_store_pd(halves, _mm256_add_pd(lo, hi));
    double total = (halves[0] + halves[2]) + (halves[1] + halves[3]);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vbest);
    float best = 0.0f;
    for (float v : lanes) best = std::max(best, v);
    for (int64_t i = e8; i < start(c + 1); ++i) {  // the last part's tail
      const float x = l[i] / T;
      const float e = x == ninf || x < kth ? 0.0f : std::exp(x - mx);
      total += e;
      best = std::max(best, e);
      if (e >= bar) found[c].emplace_back(i, e);
    }
    part_sum[c] = total;
    part_best[c] = best;
  });
  double total_e = 0.0;
  float emax = 0.0f;
  for (int64_t c = 0; c < kSampleChunks; ++c) total_e += part_sum[c], emax = std::max(emax, part_best[c]);
  const float sum = static_cast<float>(total_e);
  const float best = emax / sum;  // the largest p (division by sum is monotone)
  const float at_least = best * static_cast<float>(nucleus_cut);
  std::vector<std::pair<int64_t, float>> cand;  // (id, p), ids ascending: the parts in order
  for (const auto& part : found)
    for (const auto& [i, e] : part) {
      const float q = e / sum;
      if (q >= at_least) cand.emplace_back(i, q);
    }
  const float floor = min_p > 0 ? static_cast<float>(min_p) * best : 0.0f;
  if (auto drawn = nucleus_draw(cand, false, top_p, floor, seed, index)) return *drawn;
  return sample_dense(l, V, T, mx, kth, top_p, min_p, seed, index);  // the candidates held less than top_p
}

namespace {

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "x must be a contiguous float32 CPU tensor [n, V]");
}

}  // namespace

// The k largest entries of every row of x [n, V] (top_k_row's order): their indices (int64
// [n, k], -1 past a row's non-NaN values) and values (float32 [n, k], 0 there). One pass over the
// logits serves the greedy walk (column 0 is numpy's argmax wherever a row has no NaN) and every
// drafter that learns from them (drafters/base.py, StepResult.top).
std::tuple<at::Tensor, at::Tensor> top_k_rows(const at::Tensor& x, int64_t k) {
  check_rows(x);
  const int64_t n = x.size(0), V = x.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "k = ", k, " must be in [1, V = ", V, "]");
  at::Tensor out = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({n, k}, x.options());
  int64_t* o = out.data_ptr<int64_t>();
  float* v = values.data_ptr<float>();
  const float* xs = x.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {  // rows apart: the same result on any threads
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t count = top_k_row(xs + r * V, V, k, o + r * k, v + r * k);
      for (int64_t i = count; i < k; ++i) {
        o[r * k + i] = -1;
        v[r * k + i] = 0.0f;
      }
    }
  });
  return {out, values};
}

// Token Recycling's update (drafters/recycling.py, TokenRecycling.update, which this equals) in
// one call: given a verify step's rows' k largest logits (top_k_rows: indices [n, k] int64, -1
// where a row had fewer, and values [n, k] float32), row r's become the successors of token
// rows[r] (int32) with their logits (0 where unknown), in row order; then the accepted rows
// `accepted` (indices into rows) are written again, in order, so on a token seen twice the
// accepted context wins; every rows[r] is marked scored. successors int32 [V, k], logits float32
// [V, k], scored bool [V]. The numpy route (four fancy assignments and the tensors around them)
// cost ~75 us a step in place, where the target's forward has just evicted numpy's code and data
// from the caches.
void recycle_update(at::Tensor& successors, at::Tensor& logits, at::Tensor& scored, c10::IntArrayRef rows,
                    const at::Tensor& top, const at::Tensor& top_values, c10::IntArrayRef accepted) {
  TORCH_CHECK(successors.dim() == 2 && successors.scalar_type() == at::kInt && successors.is_contiguous() &&
                  logits.sizes() == successors.sizes() && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "successors must be int32 [V, k] and logits float32 [V, k], both contiguous");
  const int64_t V = successors.size(0), k = successors.size(1), n = static_cast<int64_t>(rows.size());
  TORCH_CHECK(scored.dim() == 1 && scored.size(0) == V && scored.scalar_type() == at::kBool && scored.is_contiguous(),
              "scored must be a contiguous bool tensor [V]");
  TORCH_CHECK(top.dim() == 2 && top.size(0) == n && top.size(1) == k && top.scalar_type() == at::kLong &&
                  top.is_contiguous() && top_values.sizes() == top.sizes() &&
                  top_values.scalar_type() == at::kFloat && top_values.is_contiguous(),
              "top must be int64 and top_values float32, contiguous, [rows = ", n, ", k = ", k, "], got ",
              top.sizes(), " and ", top_values.sizes());
  const int64_t* row = rows.data();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(row[r] >= 0 && row[r] < V, "row token ", row[r], " is outside [0, ", V, ")");
  const int64_t* acc = accepted.data();
  for (size_t i = 0; i < accepted.size(); ++i)
    TORCH_CHECK(acc[i] >= 0 && acc[i] < n, "accepted row ", acc[i], " is outside [0, ", n, ")");
  const int64_t* idx = top.data_ptr<int64_t>();
  const float* vals = top_values.data_ptr<float>();
  for (int64_t i = 0; i < n * k; ++i) TORCH_CHECK(idx[i] >= -1 && idx[i] < V, "successor ", idx[i], " is outside [-1, ", V, ")");
  int32_t* succ = successors.data_ptr<int32_t>();
  float* lg = logits.data_ptr<float>();
  bool* sc = scored.data_ptr<bool>();
  auto write = [&](int64_t r) {
    for (int64_t i = 0; i < k; ++i) {
      const bool found = idx[r * k + i] >= 0;
      succ[row[r] * k + i] = found ? static_cast<int32_t>(idx[r * k + i]) : -1;
      lg[row[r] * k + i] = found ? vals[r * k + i] : 0.0f;
    }
    sc[row[r]] = true;
  };
  for (int64_t r = 0; r < n; ++r) write(r);
  for (size_t i = 0; i < accepted.size(); ++i) write(acc[i]);
}

namespace {

void check_table(const at::Tensor& successors, const at::Tensor& logits, double temperature) {
  TORCH_CHECK(successors.dim() == 2 && successors.scalar_type() == at::kInt && successors.is_contiguous() &&
                  logits.sizes() == successors.sizes() && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "successors must be int32 [V, k] and logits float32 [V, k], both contiguous");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

// race_orders' work on one row: s, x = the row's k successors and logits.
std::vector<int64_t> row_race_order(const int32_t* s, const float* x, int64_t k, double temperature, int64_t top_k,
                                    double top_p, int64_t seed, int64_t index) {
  std::vector<int64_t> order(k);
  for (int64_t i = 0; i < k; ++i) order[i] = i;
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < k; ++i)
    if (s[i] >= 0) top = std::max(top, static_cast<double>(x[i]) / temperature);
  if (top == -std::numeric_limits<double>::infinity()) return order;  // nothing known
  std::vector<double> p(k, 0.0);
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i)
    if (s[i] >= 0) sum += (p[i] = std::exp(static_cast<double>(x[i]) / temperature - top));
  for (int64_t i = 0; i < k; ++i) p[i] = (top_k > 0 && i >= top_k) ? 0.0 : p[i] / sum;
  double mass = 0.0;
  for (int64_t i = 0; i < k; ++i) {  // as numpy: (cumsum(p) - p) >= top_p
    const double pi = p[i];
    mass += pi;
    if (mass - pi >= top_p) p[i] = 0.0;
  }
  const RaceNoise uniform(seed, index);
  std::vector<double> score(k);
  for (int64_t i = 0; i < k; ++i) score[i] = p[i] / -std::log(uniform(std::max<int32_t>(s[i], 0)));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  return order;
}

}  // namespace

// Token Recycling under sampling (drafters/recycling.py, `_race`, which this equals), for each
// (token, index) pair: the order in which the race at output `index` would pick the stored
// successors of `token` if the target's distribution were softmax(logits / temperature) over them,
// cut to the first top_k and to the top_p nucleus in stored order (largest first); unknown
// successors (-1) and those cut go last. The orders one after the other (k each). successors
// [V, k] int32, logits [V, k] float32. In numpy an order cost ~26 us.
std::vector<int64_t> race_orders(const at::Tensor& successors, const at::Tensor& logits, c10::IntArrayRef tokens,
                                 c10::IntArrayRef indices, double temperature, int64_t top_k, double top_p,
                                 int64_t seed) {
  check_table(successors, logits, temperature);
  TORCH_CHECK(tokens.size() == indices.size(), "race_orders: ", tokens.size(), " tokens but ", indices.size(), " indices");
  const int64_t V = successors.size(0), k = successors.size(1);
  std::vector<int64_t> out;
  out.reserve(tokens.size() * k);
  for (size_t i = 0; i < tokens.size(); ++i) {
    TORCH_CHECK(tokens[i] >= 0 && tokens[i] < V, "token ", tokens[i], " is outside [0, ", V, ")");
    const std::vector<int64_t> order = row_race_order(successors.data_ptr<int32_t>() + tokens[i] * k,
                                                      logits.data_ptr<float>() + tokens[i] * k, k, temperature, top_k,
                                                      top_p, seed, indices[i]);
    out.insert(out.end(), order.begin(), order.end());
  }
  return out;
}

// Token Recycling's propose (drafters/recycling.py, `propose`, which this equals): walk the
// template (node i: its parent template node `parents[i]`, -1 for the root, and its successor rank
// `ranks[i]`) from `root` through the successor table; a node lives if its parent did and its
// successor is known. Under sampling (temperature > 0) a rank is read in the race order of the
// parent's successors at the child's output index (count + depth - 1), each (token, index) order
// computed once. Returns the live nodes' tokens and parents (draft indices, -1 = root). Why: the
// walk in Python called the race order op ~10 times a sampled step, ~6 us each with the call (in place,
// 24-node templates), most of it the call.
std::tuple<std::vector<int64_t>, std::vector<int64_t>> recycle_propose(
    const at::Tensor& successors, const at::Tensor& logits, c10::IntArrayRef parents, c10::IntArrayRef ranks,
    int64_t root, double temperature, int64_t top_k, double top_p, int64_t seed, int64_t count) {
  const bool sampled = temperature > 0;
  check_table(successors, logits, sampled ? temperature : 1.0);
  TORCH_CHECK(parents.size() == ranks.size(), "recycle_propose: ", parents.size(), " parents but ", ranks.size(), " ranks");
  const int64_t V = successors.size(0), k = successors.size(1);
  TORCH_CHECK(root >= 0 && root < V, "root ", root, " is outside [0, ", V, ")");
  const int32_t* table = successors.data_ptr<int32_t>();
  const float* x = logits.data_ptr<float>();
  const int64_t n = static_cast<int64_t>(parents.size());
  std::vector<int64_t> token_of(n), index_of(n), depth_of(n), tokens, out_parents;
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::vector<int64_t>>> orders;  // ((token, index), order)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t parent = parents[i];
    TORCH_CHECK(parent >= -1 && parent < i, "recycle_propose: node ", i, "'s parent ", parent, " does not come before it");
    TORCH_CHECK(ranks[i] >= 0 && ranks[i] < k, "recycle_propose: rank ", ranks[i], " is outside [0, ", k, ")");
    const int64_t parent_token = parent < 0 ? root : token_of[parent];
    depth_of[i] = parent < 0 ? 1 : depth_of[parent] + 1;
    int64_t rank = ranks[i];
    if (parent_token >= 0 && sampled) {
      const std::pair<int64_t, int64_t> key(parent_token, count + depth_of[i] - 1);
      auto it = std::find_if(orders.begin(), orders.end(), [&](const auto& e) { return e.first == key; });
      if (it == orders.end()) {
        orders.emplace_back(key, row_race_order(table + parent_token * k, x + parent_token * k, k, temperature, top_k,
                                                top_p, seed, key.second));
        it = orders.end() - 1;
      }
      rank = it->second[rank];
    }
    const int64_t token = parent_token < 0 ? -1 : table[parent_token * k + rank];
    token_of[i] = token;
    if (token < 0) {
      index_of[i] = -1;
      continue;
    }
    index_of[i] = static_cast<int64_t>(tokens.size());
    tokens.push_back(token);
    out_parents.push_back(parent < 0 ? -1 : index_of[parent]);
  }
  return {tokens, out_parents};
}

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("race_orders(Tensor successors, Tensor logits, int[] tokens, int[] indices, float temperature, int top_k, "
        "float top_p, int seed) -> int[]");
  m.def("recycle_propose(Tensor successors, Tensor logits, int[] parents, int[] ranks, int root, float temperature, "
        "int top_k, float top_p, int seed, int count) -> (int[], int[])");
  m.def("race_pick(Tensor probs, int seed, int index) -> int");
  m.def("top_k_rows(Tensor x, int k) -> (Tensor, Tensor)");
  m.def("recycle_update(Tensor(a!) successors, Tensor(b!) logits, Tensor(c!) scored, int[] rows, Tensor top, "
        "Tensor top_values, int[] accepted) -> ()");
  m.def("sample_row(Tensor logits, float temperature, int top_k, float top_p, float min_p, float nucleus_cut, "
        "int seed, int index) -> (int, float)");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("race_pick", &fastdecode::race_pick);
  m.impl("top_k_rows", &fastdecode::top_k_rows);
  m.impl("recycle_update", &fastdecode::recycle_update);
  m.impl("recycle_propose", &fastdecode::recycle_propose);
  m.impl("race_orders", &fastdecode::race_orders);
  m.impl("sample_row", &fastdecode::sample_row);
}
