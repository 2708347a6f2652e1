// y[n, N] = x[n, K] (fp32) @ W[N, K]^T (bf16) + bias[N] (fp32), fp32 accumulation.
// Built and loaded by fastdecode/kernels.py (which explains why it exists);
// registered as torch.ops.fastdecode_kernels.bf16_linear.
//
// Design, for AVX2 + FMA and n = 1..64 rows:
//  * bf16 -> fp32 is a 16-bit shift. One 256-bit load of 16 bf16 weights gives
//    the even elements with `slli(v, 16)` and the odd ones with `v & 0xFFFF0000`
//    (2 ALU ops per 16 weights instead of 2 loads + 4 ops with cvtepu16). The
//    activations are permuted once per call to match (evens, then odds, in each
//    16-block); that costs n*K, nothing next to the n*K*N multiply-adds.
//  * A tile of kRows weight rows x kTokens tokens keeps its 8 accumulators, the
//    4 decoded weight vectors and 2 activation vectors in 14 of the 16 ymm
//    registers. The weight tile (2 rows, <= a few KB) stays in L1 while every
//    token block of the current token chunk runs over it.
//  * Token chunks are sized so their activations fit in L1; rows are walked in
//    chunks of kRowChunk so the chunk's weights stay in L2 across token chunks.
//  * Weights are software-prefetched a few tiles ahead: at n = 1 this op only
//    streams memory and the hardware prefetcher alone reached ~60% of the
//    bandwidth on the target EPYC.
//  * at::parallel_for splits output rows across torch's intra-op pool. Each
//    output element is computed by one thread in a fixed order, so results do
//    not depend on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

constexpr int kRows = 2;                  // weight rows per register tile, n > 1
constexpr int kTokens = 4;                // tokens per register tile
constexpr int kRowsSingle = 4;            // weight rows per tile when n == 1
constexpr int64_t kL1Bytes = 24 * 1024;   // activation bytes per token chunk
constexpr int64_t kRowChunk = 64;         // weight rows per L2-resident chunk
constexpr int64_t kPrefetchTiles = 4;     // how many tiles ahead to prefetch W
constexpr int64_t kMinTaskMacs = 1 << 17; // below this a task runs inline

inline float bf16_to_f32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// One R x T register tile over the whole of K. w: R weight rows (stride K);
// xp: T permuted activation rows (stride K); y: T output rows (stride N),
// columns [0, R); bias: R values or null.
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
  // The R rows are contiguous, so the next tiles are the next R*K elements;
  // each step prefetches R*32 bytes of them, covering a whole tile per K.
  const char* pf = reinterpret_cast<const char*>(w + kPrefetchTiles * R * K);
  for (int64_t k = 0; k < K16; k += 16) {
#pragma GCC unroll 8
    for (int l = 0; l < (R + 1) / 2; ++l) _mm_prefetch(pf + 2 * k * R + 64 * l, _MM_HINT_T0);
    __m256 e[R], o[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      e[r] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      o[r] = _mm256_castsi256_ps(_mm256_and_si256(raw, hi_mask));
    }
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      __m256 xe = _mm256_loadu_ps(xp + t * K + k);
      __m256 xo = _mm256_loadu_ps(xp + t * K + k + 8);
      // Pin x in registers: otherwise GCC folds the loads into every FMA,
      // loading each x vector R times; the loads, not the FMAs, then bind
      // (measured ~75 vs ~55 GFLOP/s per core).
      asm("" : "+x"(xe), "+x"(xo));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm256_fmadd_ps(e[r], xe, acc[r][t]);
        acc[r][t] = _mm256_fmadd_ps(o[r], xo, acc[r][t]);
      }
    }
  }
  // K % 16 tail: x keeps its natural order there, so a plain scalar dot.
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      float s = fastdecode::hsum8(acc[r][t]);
      for (int64_t k = K16; k < K; ++k) s += bf16_to_f32(w[r * K + k]) * xp[t * K + k];
      y[t * N + r] = bias ? s + bias[r] : s;
    }
}

// R weight rows against tokens [t0, t1): full kTokens tiles, then the tail.
template <int R>
void rows_x_tokens(const uint16_t* w, const float* xp, float* y, const float* bias,
                   int64_t K, int64_t N, int64_t t0, int64_t t1) {
  static_assert(kTokens == 4, "token tail below handles 1..3");
  int64_t t = t0;
  for (; t + kTokens <= t1; t += kTokens) tile<R, kTokens>(w, xp + t * K, y + t * N, bias, K, N);
  const float* xt = xp + t * K;
  float* yt = y + t * N;
  switch (t1 - t) {
    case 1: tile<R, 1>(w, xt, yt, bias, K, N); break;
    case 2: tile<R, 2>(w, xt, yt, bias, K, N); break;
    case 3: tile<R, 3>(w, xt, yt, bias, K, N); break;
    default: break;
  }
}

// n == 1 is a pure weight stream: wider row tiles, no token blocking.
void rows_single_token(const uint16_t* W, const float* xp, float* y, const float* bias,
                       int64_t K, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRowsSingle <= r1; r += kRowsSingle)
    tile<kRowsSingle, 1>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, 0);
  for (; r < r1; ++r) tile<1, 1>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, 0);
}

// Output rows [r0, r1) for all n tokens.
void row_range(const uint16_t* W, const float* xp, float* y, const float* bias,
               int64_t K, int64_t N, int64_t n, int64_t r0, int64_t r1) {
  if (n == 1) return rows_single_token(W, xp, y, bias, K, r0, r1);
  const int64_t tc = std::max<int64_t>(kTokens, kL1Bytes / (K * 4 + 1) / kTokens * kTokens);
  for (int64_t rc = r0; rc < r1; rc += kRowChunk) {
    const int64_t rc_end = std::min(rc + kRowChunk, r1);
    for (int64_t t0 = 0; t0 < n; t0 += tc) {
      const int64_t t1 = std::min(t0 + tc, n);
      int64_t r = rc;
      for (; r + kRows <= rc_end; r += kRows)
        rows_x_tokens<kRows>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, N, t0, t1);
      for (; r < rc_end; ++r)
        rows_x_tokens<1>(W + r * K, xp, y + r, bias ? bias + r : nullptr, K, N, t0, t1);
    }
  }
}

// Reorder each full 16-block of every activation row to (evens, odds) to line
// up with the shift/mask bf16 decode; the K % 16 tail keeps its order.
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

// weight: [N, K] as loaded, or [N / 16, K / 2, 16, 2] packed for AMX (kernels.pack_amx).
void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "x must be a contiguous float32 CPU tensor [n, K]");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.is_cpu() &&
                  (weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 16 && weight.size(3) == 2 &&
                                         weight.size(1) % 16 == 0)),
              "weight must be a contiguous bfloat16 CPU tensor [N, K] or AMX-packed [N / 16, K / 2, 16, 2]");
  TORCH_CHECK(weight.dim() == 2 || fastdecode::has_amx_bf16(), "AMX-packed weights need a CPU with AMX-BF16");
  const int64_t K = weight.dim() == 2 ? weight.size(1) : weight.size(1) * 2;
  const int64_t N = weight.dim() == 2 ? weight.size(0) : weight.size(0) * 16;
  TORCH_CHECK(K == x.size(1), "weight's K (", K, ") must equal x.size(1) (", x.size(1), ")");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N &&
                    bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->is_cpu(),
                "bias must be a contiguous float32 CPU tensor [N]");
}

}  // namespace

namespace fastdecode {

at::Tensor bf16_linear_add(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& residual) {
  check_inputs(x, weight, bias);
  const bool packed = weight.dim() == 4;
  const int64_t n = x.size(0), N = packed ? weight.size(0) * 16 : weight.size(0);
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.dim() == 2 &&
                  residual.size(0) == n && residual.size(1) == N,
              "residual must be a contiguous float32 tensor [", n, ", ", N, "], got ", residual.scalar_type(), " ",
              residual.sizes());
  if (!packed || n == 0 || N == 0) return bf16_linear(x, weight, bias).add_(residual);
  at::Tensor y = at::empty({n, N}, x.options());
  bf16_linear_amx(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
                  bias.has_value() ? bias->data_ptr<float>() : nullptr, residual.data_ptr<float>(), y.data_ptr<float>(),
                  n, x.size(1), N);
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  check_inputs(x, weight, bias);
  const bool packed = weight.dim() == 4;
  const int64_t n = x.size(0), K = x.size(1), N = packed ? weight.size(0) * 16 : weight.size(0);
  at::Tensor y = at::empty({n, N}, x.options());
  if (n == 0 || N == 0) return y;
  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (packed) {
    bf16_linear_amx(x.data_ptr<float>(), W, b, nullptr, y.data_ptr<float>(), n, K, N);
    return y;
  }
  if (has_avx512bf16()) {
    bf16_linear_512(x.data_ptr<float>(), W, b, y.data_ptr<float>(), n, K, N);
    return y;
  }
  at::Tensor xp = at::empty({n, K}, x.options());
  permute_activations(x.data_ptr<float>(), xp.data_ptr<float>(), n, K);

  const float* xpp = xp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Split groups of kRows output rows across threads. The grain keeps a task
  // at >= kMinTaskMacs multiply-adds (~256 KB of weights at n = 1, ~15 us on
  // one core), so small layers run inline instead of paying the fork/join.
  const int64_t groups = (N + kRows - 1) / kRows;
  const int64_t macs_per_group = kRows * n * std::max<int64_t>(K, 1);
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / macs_per_group);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    row_range(W, xpp, yp, b, K, N, n, g0 * kRows, std::min(N, g1 * kRows));
  });
  return y;
}

// bf16_linear on an AMX-packed weight (no bias) plus each row's k largest outputs, as top_k_rows
// gives them (linear_bf16_amx.cpp, bf16_linear_amx_topk): (y, indices int64 [n, k], values [n, k]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bf16_linear_topk(const at::Tensor& x, const at::Tensor& weight, int64_t k) {
  check_inputs(x, weight, std::nullopt);
  TORCH_CHECK(weight.dim() == 4, "bf16_linear_topk needs an AMX-packed weight [N / 16, K / 2, 16, 2]");
  const int64_t n = x.size(0), K = x.size(1), N = weight.size(0) * 16;
  TORCH_CHECK(k >= 1 && k <= N, "k = ", k, " must be in [1, ", N, "]");
  at::Tensor y = at::empty({n, N}, x.options());
  at::Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor vals = at::empty({n, k}, x.options());
  if (n > 0)
    bf16_linear_amx_topk(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr()), y.data_ptr<float>(),
                         n, K, N, k, idx.data_ptr<int64_t>(), vals.data_ptr<float>());
  return {y, idx, vals};
}

std::string bf16_isa() { return has_avx512bf16() ? "avx512bf16" : "avx2"; }
bool amx_bf16() { return has_amx_bf16(); }

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_linear_topk(Tensor x, Tensor weight, int k) -> (Tensor, Tensor, Tensor)");
  m.def("bf16_isa() -> str", &fastdecode::bf16_isa);  // no tensors: a catch-all kernel
  m.def("amx_bf16() -> bool", &fastdecode::amx_bf16);
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("bf16_linear", &fastdecode::bf16_linear);
  m.impl("bf16_linear_topk", &fastdecode::bf16_linear_topk);
}
