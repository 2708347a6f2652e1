// y[n, N] = x[n, K] @ dequant(W)[N, K]^T + bias[N] with W stored in blocks of 32
// consecutive input features per output row, in the two ggml formats this
// project reads from GGUF files:
//   * q4 (ggml Q4_1): codes uint8 [N, K/2], 16 bytes per block: the low nibbles
//     are elements 0..15, the high nibbles elements 16..31; w = d * q + m with
//     scales d and mins m as float32 [N, K/32].
//   * q8 (ggml Q8_0): codes int8 [N, K]; w = d * q with scales d [N, K/32].
// Built and loaded by fastdecode/kernels.py; registered as
// torch.ops.fastdecode_kernels.q_linear.
//
// Design (AVX2, n = 1..64 rows), the scheme of llama.cpp's Q4_1 x Q8_1 dots:
//  * Each activation row is quantized per 32-block to int8 with a scale
//    (dx = max|x| / 127, round to nearest even): xq, dx, and sx = dx * sum(xq).
//    Then a block's dot is exact integer arithmetic:
//      sum_k w_k x_k = d dx (q . xq) + m sx        (q4; q8 has no m term)
//    `maddubs` multiplies 32 unsigned x signed bytes into 16 int16 pair sums
//    (at most 2 * 15 * 127, or 2 * 128 * 127 for q8: no saturation) and
//    `madd` with ones widens them to 8 int32: 3 ops per 32 weights and token,
//    against ~12 to decode 32 weights to fp32. Weight-decode work (nibble
//    unpacking) is shared by the T tokens of a tile.
//  * A tile of R weight rows x T tokens keeps R*T accumulators; every output
//    element has exactly one accumulator that sees the blocks in order, and the
//    m term is a separate fixed-order dot, so results depend neither on n nor
//    on the thread count: a draft-tree forward gives the same numbers per token
//    as a one-token forward, and speculative decoding stays token-for-token
//    equal to AR with these weights.
//  * The codes are 4 (q4) or 8 (q8) bits per weight plus fp32 scales, against
//    bf16's 16: at n = 1 this op streams ~3.6x (q4) fewer bytes than bf16.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

constexpr int64_t kBlock = 32;            // weights per block (both formats)
constexpr int kRows = 2;                  // weight rows per register tile, n > 1
constexpr int kTokens = 4;                // tokens per register tile
constexpr int kRowsSingle = 4;            // weight rows per tile when n == 1
constexpr int64_t kL1Bytes = 16 * 1024;   // quantized activation bytes per token chunk
constexpr int64_t kRowChunk = 64;         // weight rows per L2-resident chunk
constexpr int64_t kPrefetchBlocks = 8;    // how many blocks ahead to prefetch codes
constexpr int64_t kMinTaskMacs = 1 << 17; // below this a task runs inline

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ggml Q4_1: the 32 codes of the block at q as unsigned bytes 0..15, in element order.
struct Q4 {
  static constexpr int64_t kBytes = 16;
  static constexpr bool kHasMins = true;
  static inline __m256i load(const uint8_t* q) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
  }
  // 8 int32 partial sums of q . x (q unsigned, x signed)
  static inline __m256i dot(__m256i q, const int8_t* x, __m256i ones) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
  }
};

// ggml Q8_0: the 32 signed codes of the block at q; maddubs wants one unsigned operand,
// so |q| times x carrying q's sign (llama.cpp's trick; -128 works: |-128| = 128 unsigned).
struct Q8 {
  static constexpr int64_t kBytes = 32;
  static constexpr bool kHasMins = false;
  static inline __m256i load(const uint8_t* q) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  }
  static inline __m256i dot(__m256i q, const int8_t* x, __m256i ones) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q)), ones);
  }
};

struct Weights {
  const uint8_t* codes;  // [N, nb * kBytes]
  const float* scales;   // [N, nb]
  const float* mins;     // [N, nb] or null (q8)
  const float* bias;     // [N] or null
  int64_t nb;            // blocks per row = K / 32
};

struct Acts {
  const int8_t* q;   // [n, K] quantized activations
  const float* d;    // [n, nb] their block scales
  const float* s;    // [n, nb] d * sum(q) per block (for the q4 m term)
};

// sum_b a[b] * b[b] in a fixed order (8 lanes, then the tail)
inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// One R x T register tile over the whole of K: rows [r0, r0 + R), tokens [t0, t0 + T).
template <class F, int R, int T>
inline void tile(const Weights& W, int64_t r0, const Acts& X, int64_t t0, float* y, int64_t K, int64_t N) {
  const int64_t nb = W.nb, row_bytes = nb * F::kBytes;
  const uint8_t* codes = W.codes + r0 * row_bytes;
  const float* scales = W.scales + r0 * nb;
  const int8_t* xq = X.q + t0 * K;
  const float* xd = X.d + t0 * nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (b % (64 / F::kBytes) == 0) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(codes + r * row_bytes + (b + kPrefetchBlocks) * F::kBytes),
                     _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256i q = F::load(codes + r * row_bytes + b * F::kBytes);
      const float dw = scales[r * nb + b];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const __m256 sum = _mm256_cvtepi32_ps(F::dot(q, xq + t * K + b * kBlock, ones));
        acc[r][t] = _mm256_fmadd_ps(sum, _mm256_set1_ps(dw * xd[t * nb + b]), acc[r][t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      float s = hsum(acc[r][t]);
      if (F::kHasMins) s += dot_f32(W.mins + (r0 + r) * nb, X.s + (t0 + t) * nb, nb);
      y[(t0 + t) * N + r0 + r] = W.bias ? s + W.bias[r0 + r] : s;
    }
}

// R weight rows from r0 against tokens [t0, t1): full kTokens tiles, then the tail.
template <class F, int R>
void rows_x_tokens(const Weights& W, int64_t r0, const Acts& X, float* y, int64_t K, int64_t N,
                   int64_t t0, int64_t t1) {
  static_assert(kTokens == 4, "token tail below handles 1..3");
  int64_t t = t0;
  for (; t + kTokens <= t1; t += kTokens) tile<F, R, kTokens>(W, r0, X, t, y, K, N);
  switch (t1 - t) {
    case 1: tile<F, R, 1>(W, r0, X, t, y, K, N); break;
    case 2: tile<F, R, 2>(W, r0, X, t, y, K, N); break;
    case 3: tile<F, R, 3>(W, r0, X, t, y, K, N); break;
    default: break;
  }
}

// Output rows [r0, r1) for all n tokens.
template <class F>
void row_range(const Weights& W, const Acts& X, float* y, int64_t K, int64_t N, int64_t n, int64_t r0,
               int64_t r1) {
  if (n == 1) {  // a pure weight stream: wider row tiles, no token blocking
    int64_t r = r0;
    for (; r + kRowsSingle <= r1; r += kRowsSingle) tile<F, kRowsSingle, 1>(W, r, X, 0, y, K, N);
    for (; r < r1; ++r) tile<F, 1, 1>(W, r, X, 0, y, K, N);
    return;
  }
  const int64_t tc = std::max<int64_t>(kTokens, kL1Bytes / (K + 1) / kTokens * kTokens);
  for (int64_t rc = r0; rc < r1; rc += kRowChunk) {
    const int64_t rc_end = std::min(rc + kRowChunk, r1);
    for (int64_t t0 = 0; t0 < n; t0 += tc) {
      const int64_t t1 = std::min(t0 + tc, n);
      int64_t r = rc;
      for (; r + kRows <= rc_end; r += kRows) rows_x_tokens<F, kRows>(W, r, X, y, K, N, t0, t1);
      for (; r < rc_end; ++r) rows_x_tokens<F, 1>(W, r, X, y, K, N, t0, t1);
    }
  }
}

// Per 32-block of every row: d = max|x| / 127, q = round-half-even(x / d), s = d * sum(q).
void quantize_rows(const float* x, int64_t n, int64_t K, int8_t* q, float* d, float* s) {
  const int64_t nb = K / kBlock;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * K + b * kBlock;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float db = amax / 127.0f;
      const float inv = db > 0.0f ? 1.0f / db : 0.0f;
      int sum = 0;
      int8_t* qb = q + t * K + b * kBlock;
      for (int i = 0; i < kBlock; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
        qb[i] = static_cast<int8_t>(std::clamp(v, -127, 127));
        sum += qb[i];
      }
      d[t * nb + b] = db;
      s[t * nb + b] = db * static_cast<float>(sum);
    }
}

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cpu() && t.sizes() == shape,
              name, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ", t.scalar_type(),
              " ", t.sizes());
}

// codes uint8 [N, K/2] -> q4 (needs mins); codes int8 [N, K] -> q8.
}  // namespace

namespace fastdecode {

at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "x must be a contiguous float32 CPU tensor [n, K]");
  const int64_t n = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K = ", K, " must be a multiple of 32");
  const bool q4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(q4 || codes.scalar_type() == at::kChar, "codes must be uint8 (q4) or int8 (q8), got ",
              codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu() && codes.size(1) == (q4 ? K / 2 : K),
              "codes must be a contiguous CPU tensor [N, ", (q4 ? K / 2 : K), "], got ", codes.sizes());
  const int64_t N = codes.size(0), nb = K / kBlock;
  check_float(scales, "scales", {N, nb});
  TORCH_CHECK(mins.has_value() == q4, q4 ? "q4 codes need mins" : "q8 codes take no mins");
  if (mins.has_value()) check_float(*mins, "mins", {N, nb});
  if (bias.has_value()) check_float(*bias, "bias", {N});

  at::Tensor y = at::empty({n, N}, x.options());
  if (n == 0 || N == 0) return y;
  at::Tensor xq = at::empty({n, K}, x.options().dtype(at::kChar));
  at::Tensor xds = at::empty({2, n, nb}, x.options());
  quantize_rows(x.data_ptr<float>(), n, K, xq.data_ptr<int8_t>(), xds.data_ptr<float>(),
                xds.data_ptr<float>() + n * nb);
  const Acts X{xq.data_ptr<int8_t>(), xds.data_ptr<float>(), xds.data_ptr<float>() + n * nb};
  const Weights W{reinterpret_cast<const uint8_t*>(codes.data_ptr()), scales.data_ptr<float>(),
                  mins.has_value() ? mins->data_ptr<float>() : nullptr,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr, nb};
  float* yp = y.data_ptr<float>();
  // Groups of kRowsSingle rows (a multiple of kRows) so tiles never straddle tasks.
  const int64_t groups = (N + kRowsSingle - 1) / kRowsSingle;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (kRowsSingle * n * K));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * kRowsSingle, r1 = std::min(N, g1 * kRowsSingle);
    if (q4) row_range<Q4>(W, X, yp, K, N, n, r0, r1);
    else row_range<Q8>(W, X, yp, K, N, n, r0, r1);
  });
  return y;
}

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("q_linear(Tensor x, Tensor codes, Tensor scales, Tensor? mins, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("q_linear", &fastdecode::q_linear);
}
