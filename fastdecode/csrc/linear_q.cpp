// y[n, N] = x[n, K] @ dequant(W)[N, K]^T + bias[N] with W in blocks of 32 consecutive input
// features per output row, in the two ggml formats this project reads from GGUF files:
//   * q4 (ggml Q4_1): 32 codes 0..15 per block, w = d * q + m (scale d, min m);
//   * q8 (ggml Q8_0): 32 codes -127..127 per block, w = d * q.
// Built and loaded by fastdecode/kernels.py (whose pack_panels turns ggml's row-major blocks
// into the layout below); registered as torch.ops.fastdecode_kernels.q_linear.
//
// Layout: 8-row panels. Rows are grouped by 8 (zero rows pad the last group); for panel g and
// block b the 8 rows' codes are interleaved 4 bytes at a time, so one 256-bit register holds
// 4 consecutive input features of all 8 rows (lane r = row r):
//   * q4: 128 bytes = 4 vectors V_p; byte 4r + c of V_p = byte 4p + c of row r's ggml block:
//     its low nibble is element 4p + c, its high nibble element 16 + 4p + c;
//   * q8: 256 bytes = 8 vectors V_j; byte 4r + c of V_j = element 4j + c of row r;
//   * scales and mins [panels, blocks, 8]: the panel's 8 rows side by side.
//
// Compute (AVX2), llama.cpp's Q4_1 x Q8_1 block dot with rows in the lanes:
//  * each activation row is quantized per 32-block to int8 (dx = max|x| / 127, round half to
//    even): xq, dx and sx = dx * sum(xq). A block's dot is then exact integer arithmetic:
//      sum_k w_k x_k = d dx (q . xq) + m sx        (q4; q8 has no m term);
//  * 4 bytes of xq are broadcast to all lanes and `maddubs` multiplies them with V (unsigned
//    codes x signed activations): each row's pair sums as int16. For q4 a block's 8 groups
//    are summed in int16 (at most 8 * 2 * 15 * 127 = 30480: no overflow) and widened once
//    with `madd`; q8 (|q| x sign-carrying x, llama.cpp's trick) widens every group;
//  * then one fp32 multiply-add per block, token and 8 rows: acc += (d * dx) * dot, then
//    acc += m * sx. In the previous row-per-accumulator kernel that float work was paid per
//    row and dominated draft-tree forwards (a 16-token int4 forward cost 3.8x a 1-token one);
//    here it is shared by 8 rows, and a panel-block's unpacked codes serve 4 tokens at a time.
// Every output element is one lane of one accumulator that sees the blocks in order, so results
// depend neither on n nor on the thread count: a draft-tree forward gives the same numbers per
// token as a one-token forward, and speculative decoding stays token-for-token equal to AR.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

constexpr int64_t kBlock = 32;             // weights per block (both formats)
constexpr int kPanel = 8;                  // rows per panel (one per fp32 lane)
constexpr int kTokens = 4;                 // tokens per register tile
constexpr int64_t kPrefetchBlocks = 4;     // how many panel-blocks ahead to prefetch codes
constexpr int64_t kMinTaskMacs = 1 << 17;  // below this a task runs inline

struct Weights {
  const uint8_t* codes;  // [panels, nb * bytes per panel-block]
  const float* scales;   // [panels, nb, 8]
  const float* mins;     // [panels, nb, 8] or null (q8)
  const float* bias;     // [N] or null
  int64_t nb;            // blocks per row = K / 32
};

struct Acts {
  const int8_t* q;  // [n, K] quantized activations
  const float* d;   // [n, nb] their block scales
  const float* s;   // [n, nb] d * sum(q) per block (for the q4 m term)
};

inline __m256i bcast4(const int8_t* p) {  // 4 bytes to all 8 lanes
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Q4_1: the integer dots of one panel-block for T tokens; lane r of dot[t] = q_r . xq_t.
struct Q4 {
  static constexpr int64_t kBytes = 128;  // per panel-block
  static constexpr bool kHasMins = true;
  template <int T>
  static inline void dots(const uint8_t* v, const int8_t* const* x, __m256i* dot) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256i s16[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) s16[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * p));
      const __m256i lo = _mm256_and_si256(raw, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(lo, bcast4(x[t] + 4 * p)));
        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(hi, bcast4(x[t] + 16 + 4 * p)));
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) dot[t] = _mm256_madd_epi16(s16[t], ones);
  }
};

// Q8_0: maddubs wants one unsigned operand, so |q| times x carrying q's sign (llama.cpp's trick;
// a pair sum reaches 2 * 128 * 127, so each group is widened to int32 before the next).
struct Q8 {
  static constexpr int64_t kBytes = 256;
  static constexpr bool kHasMins = false;
  template <int T>
  static inline void dots(const uint8_t* v, const int8_t* const* x, __m256i* dot) {
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * j));
      const __m256i aq = _mm256_sign_epi8(q, q);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m256i xs = _mm256_sign_epi8(bcast4(x[t] + 4 * j), q);
        dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, xs), ones));
      }
    }
  }
};

// One panel (rows r0 .. r0 + rows - 1, rows <= 8) x T tokens from t0, over the whole of K.
template <class F, int T>
inline void tile(const Weights& W, int64_t g, int64_t r0, int64_t rows, const Acts& X, int64_t t0, float* y,
                 int64_t K, int64_t N) {
  const int64_t nb = W.nb;
  const uint8_t* codes = W.codes + g * nb * F::kBytes;
  const float* scales = W.scales + g * nb * kPanel;
  const float* mins = F::kHasMins ? W.mins + g * nb * kPanel : nullptr;
  __m256 acc[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const char* pf = reinterpret_cast<const char*>(codes + (b + kPrefetchBlocks) * F::kBytes);
#pragma GCC unroll 4
    for (int64_t l = 0; l < F::kBytes; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
    const int8_t* x[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) x[t] = X.q + (t0 + t) * K + b * kBlock;
    __m256i dot[T];
    F::template dots<T>(codes + b * F::kBytes, x, dot);
    const __m256 d = _mm256_loadu_ps(scales + b * kPanel);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(X.d[(t0 + t) * nb + b]));
      acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot[t]), acc[t]);
      if (F::kHasMins)
        acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(mins + b * kPanel), _mm256_set1_ps(X.s[(t0 + t) * nb + b]), acc[t]);
    }
  }
  alignas(32) float out[kPanel];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    _mm256_store_ps(out, acc[t]);
    float* yt = y + (t0 + t) * N + r0;
    for (int64_t r = 0; r < rows; ++r) yt[r] = W.bias ? out[r] + W.bias[r0 + r] : out[r];
  }
}

// Panels [g0, g1) for all n tokens: a panel's codes stay in L1 while its token tiles pass.
template <class F>
void panel_range(const Weights& W, const Acts& X, float* y, int64_t K, int64_t N, int64_t n, int64_t g0,
                 int64_t g1) {
  static_assert(kTokens == 4, "the token tail below handles 1..3");
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r0 = g * kPanel, rows = std::min<int64_t>(kPanel, N - r0);
    int64_t t = 0;
    for (; t + kTokens <= n; t += kTokens) tile<F, kTokens>(W, g, r0, rows, X, t, y, K, N);
    switch (n - t) {
      case 1: tile<F, 1>(W, g, r0, rows, X, t, y, K, N); break;
      case 2: tile<F, 2>(W, g, r0, rows, X, t, y, K, N); break;
      case 3: tile<F, 3>(W, g, r0, rows, X, t, y, K, N); break;
      default: break;
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

}  // namespace

namespace fastdecode {

// Panel-packed codes (see the top of this file; kernels.pack_panels makes them from ggml's
// row-major blocks): uint8 -> q4 (needs mins), int8 -> q8. `rows` is N, the true number of
// output rows (the last panel may be padding).
at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias, int64_t rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "x must be a contiguous float32 CPU tensor [n, K]");
  const int64_t n = x.size(0), K = x.size(1), N = rows;
  TORCH_CHECK(K % kBlock == 0, "K = ", K, " must be a multiple of 32");
  TORCH_CHECK(N >= 0, "rows = ", N, " must be >= 0");
  const bool q4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(q4 || codes.scalar_type() == at::kChar, "codes must be uint8 (q4) or int8 (q8), got ",
              codes.scalar_type());
  const int64_t nb = K / kBlock, panels = (N + kPanel - 1) / kPanel;
  const int64_t panel_bytes = nb * (q4 ? Q4::kBytes : Q8::kBytes);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu() && codes.size(0) == panels &&
                  codes.size(1) == panel_bytes,
              "codes must be a contiguous CPU tensor [", panels, ", ", panel_bytes, "] (", N,
              " rows in panels of 8), got ", codes.sizes());
  check_float(scales, "scales", {panels, nb, kPanel});
  TORCH_CHECK(mins.has_value() == q4, q4 ? "q4 codes need mins" : "q8 codes take no mins");
  if (mins.has_value()) check_float(*mins, "mins", {panels, nb, kPanel});
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
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (kPanel * n * K));
  at::parallel_for(0, panels, grain, [&](int64_t g0, int64_t g1) {
    if (q4) panel_range<Q4>(W, X, yp, K, N, n, g0, g1);
    else panel_range<Q8>(W, X, yp, K, N, n, g0, g1);
  });
  return y;
}

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("q_linear(Tensor x, Tensor codes, Tensor scales, Tensor? mins, Tensor? bias, int rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("q_linear", &fastdecode::q_linear);
}
