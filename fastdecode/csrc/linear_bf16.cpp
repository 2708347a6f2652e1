// y[n, N] = x[n, K] (fp32) @ W[N, K]^T (bf16) + bias[N] (fp32), fp32 accumulation.
//
// Why: on AVX2-only CPUs torch's bf16 GEMM falls off a cliff beyond n = 1 row
// (see fastdecode/kernels.py). Decoding needs n = 1..64, where this op is
// memory-bound (n small) or FMA-bound (n large), never worth a packed GEMM.
//
// Layout tricks:
//  * bf16 -> fp32 is a 16-bit shift. A 256-bit load of 16 bf16 values gives
//    the even elements with `slli(v, 16)` and the odd ones with `v & 0xFFFF0000`
//    (2 ALU ops per 16 weights instead of 4 ops + 2 loads with cvtepu16).
//    The activations are permuted once per call to match (evens, then odds in
//    each 16-block), which costs n*K, nothing next to n*K*N.
//  * A tile of R weight rows x T tokens keeps R*T accumulators in ymm registers;
//    the W tile (R rows) stays in L1 while the token block streams through.
//  * Tokens are processed in chunks whose activations fit in L1 so that wide
//    batches read x from L1, not L2.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One R x T register tile over the full K. w: R rows (stride K); xp: T permuted
// activation rows (stride K); y: T output rows (stride N), R columns.
template <int R, int T>
inline void tile(const uint16_t* w, const float* xp, float* y, const float* bias,
                 int64_t K, int64_t N) {
  __m256 acc[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 e[R], o[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      e[r] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      o[r] = _mm256_castsi256_ps(_mm256_and_si256(raw, hi_mask));
    }
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      __m256 xe = _mm256_loadu_ps(xp + t * K + k);
      __m256 xo = _mm256_loadu_ps(xp + t * K + k + 8);
#ifdef FD_XREG
      asm("" : "+x"(xe), "+x"(xo));
#endif
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm256_fmadd_ps(e[r], xe, acc[r][t]);
        acc[r][t] = _mm256_fmadd_ps(o[r], xo, acc[r][t]);
      }
    }
  }
  // K % 16 tail: x keeps natural order there, so a plain scalar dot product.
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t k = K16; k < K; ++k) s += bf16_to_f32(w[r * K + k]) * xp[t * K + k];
      y[t * N + r] = bias ? s + bias[r] : s;
    }
}

// A row tile of R rows against tokens [t0, t1), blocked by up to TMAX tokens.
template <int R, int TMAX>
void rows_x_tokens(const uint16_t* w, const float* xp, float* y, const float* bias,
                   int64_t K, int64_t N, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + TMAX <= t1; t += TMAX)
    tile<R, TMAX>(w, xp + t * K, y + t * N, bias, K, N);
  const float* xt = xp + t * K;
  float* yt = y + t * N;
  switch (t1 - t) {  // token tail, 0 < rest < TMAX
    case 1: tile<R, 1>(w, xt, yt, bias, K, N); break;
    case 2: if constexpr (TMAX > 2) tile<R, 2>(w, xt, yt, bias, K, N); break;
    case 3: if constexpr (TMAX > 3) tile<R, 3>(w, xt, yt, bias, K, N); break;
    case 4: if constexpr (TMAX > 4) tile<R, 4>(w, xt, yt, bias, K, N); break;
    case 5: if constexpr (TMAX > 5) tile<R, 5>(w, xt, yt, bias, K, N); break;
    case 6: if constexpr (TMAX > 6) tile<R, 6>(w, xt, yt, bias, K, N); break;
    case 7: if constexpr (TMAX > 7) tile<R, 7>(w, xt, yt, bias, K, N); break;
    default: break;
  }
}

#ifndef FD_R
#define FD_R 2
#define FD_T 4
#define FD_RS 4
#define FD_L1 16
#define FD_RC 64
#endif
constexpr int kRows = FD_R;          // rows per register tile for n > 1
constexpr int kTokens = FD_T;        // tokens per register tile (2*2 + 2 + 2*4 = 14 ymm)
constexpr int kRowsSingle = FD_RS;    // rows per tile for n == 1 (memory-bound)
constexpr int64_t kL1Bytes = FD_L1 * 1024;   // activation budget per token chunk
constexpr int64_t kRowChunk = FD_RC;         // W rows re-read from L2 per token chunk

// Rows [r0, r1) (all in range) against all n tokens.
void row_range(const uint16_t* W, const float* xp, float* y, const float* bias,
               int64_t K, int64_t N, int64_t n, int64_t r0, int64_t r1) {
  if (n == 1) {
    int64_t r = r0;
    for (; r + kRowsSingle <= r1; r += kRowsSingle)
      tile<kRowsSingle, 1>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, N);
    for (; r < r1; ++r) tile<1, 1>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, N);
    return;
  }
  // Token chunk: as many tokens as fit kL1Bytes, a multiple of kTokens.
  int64_t tc = (kL1Bytes / (K * 4)) / kTokens * kTokens;
  if (tc < kTokens) tc = kTokens;
  for (int64_t rc = r0; rc < r1; rc += kRowChunk) {
    const int64_t rc_end = rc + kRowChunk < r1 ? rc + kRowChunk : r1;
    for (int64_t t0 = 0; t0 < n; t0 += tc) {
      const int64_t t1 = t0 + tc < n ? t0 + tc : n;
      int64_t r = rc;
      for (; r + kRows <= rc_end; r += kRows)
        rows_x_tokens<kRows, kTokens>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, N, t0, t1);
      for (; r < rc_end; ++r)
        rows_x_tokens<1, kTokens>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, N, t0, t1);
    }
  }
}

// Reorder each full 16-block of every activation row to (evens, odds) so it
// lines up with the shift/mask bf16 decode; the K % 16 tail stays in order.
void permute_activations(const float* x, float* xp, int64_t n, int64_t K) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t t = 0; t < n; ++t) {
    const float* src = x + t * K;
    float* dst = xp + t * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int i = 0; i < 8; ++i) {
        dst[k + i] = src[k + 2 * i];
        dst[k + 8 + i] = src[k + 2 * i + 1];
      }
    for (int64_t k = K16; k < K; ++k) dst[k] = src[k];
  }
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "x must be a contiguous float32 CPU tensor [n, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
                  weight.is_contiguous() && weight.is_cpu(),
              "weight must be a contiguous bfloat16 CPU tensor [N, K]");
  const int64_t n = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight.size(1) must equal x.size(1)");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->is_cpu(),
                "bias must be a contiguous float32 CPU tensor [N]");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({n, N}, x.options());
  if (n == 0 || N == 0) return y;
  at::Tensor xp = at::empty({n, K}, x.options());
  permute_activations(x.data_ptr<float>(), xp.data_ptr<float>(), n, K);

  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const float* xpp = xp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Parallel over groups of kRows output rows. The grain keeps each task at
  // >= ~256K multiply-adds so tiny layers run inline instead of paying the
  // thread wake-up (~several us); large layers split evenly across threads.
  const int64_t groups = (N + kRows - 1) / kRows;
  const int64_t work_per_group = kRows * n * (K > 0 ? K : 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work_per_group);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * kRows, r1 = std::min(N, g1 * kRows);
    row_range(W, xpp, yp, b, K, N, n, r0, r1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(fastdecode_kernels, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
}
