// bf16_linear on CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and later): the same
// y[n, N] = x[n, K] @ W[N, K]^T + bias[N], computed with vdpbf16ps, which multiplies 32 bf16
// pairs and adds them into 16 fp32 lanes in one instruction. The activations are rounded to
// bf16 once per call (round to nearest even), as every bf16 GEMM does (torch/oneDNN,
// llama.cpp); the products are exact in fp32 and accumulate in fp32.
//
// Why: the AVX2 kernel (linear_bf16.cpp) decodes every weight to fp32 and does 8 multiply-adds
// per instruction; here it is 32 per instruction and no decode, so n rows cost little more than
// the one pass over the weights that a single row already pays. That is what makes wide draft
// trees and batches cheap.
//
// Tiling: a register tile of R = 3 weight rows x T tokens walks the whole of K. T <= 8 (the n
// tokens in equal-as-can-be pieces). Row chunks stay in L2 while the token chunks run over them.
// A K % 32 tail loads its weights masked and reads the activations' zero padding.
// Why 3 rows for every T: a weight is loaded once per piece of T tokens whatever R is; R only
// sets how many rows share an activation load and how many rows are read side by side. Tiles as
// tall as the registers allowed (03f54ef: 8 rows for 1-2 tokens, 7 for 3, ... 3 for 7-8) read
// up to 8 rows side by side, and with the weights streamed from memory that was slower for the
// few-token calls. The 30 layers' linears and the LM head streamed alone (2 threads, variants
// interleaved in one process, medians of 50-60): 1 token 0.90-0.91x the time with 8-row tiles,
// 2 tokens 0.77-0.83x, 3-6 tokens 0.84-0.94x (7-8 tokens had 3 rows already); 2 rows did about as
// well, 4 worse at 2 tokens. Since then 1-8 tokens cost the same, within 4 %. A likely cause, not
// proven: fewer interleaved streams for the hardware prefetcher to follow. (Taller tiles had won
// against 4 x 4 tiles when the weights were prefetched into L1: a 16-token tree's linears
// 7.32 -> 6.53 ms; 16 tokens still run as 3 x 8 tiles.)
// Every output element is one accumulator's fixed sequence of vdpbf16ps over K followed by one
// fixed horizontal sum, so a row's result does not depend on n, the tile it falls in or the
// thread count.
//
// The weights are prefetched 8 KB ahead of each row's reads into L2 (prefetcht1). Each is read
// once a forward. Prefetched into L1 (prefetchnta, kept before, or prefetcht0), a tile's
// multiply-adds did not overlap the stream: a 9-token tree's linears took 1.3x a one-token
// step's. Into L2 the multiply-adds of up to ~9 tokens hide under the stream. (A likely cause,
// not measured: each line prefetched into L1 holds one of the core's few L1 miss buffers until
// it arrives, which caps the lines in flight; L2 tracks more.) On the AVX512-BF16 EPYC (2 threads), the 30 layers' linears streamed alone: 1 token 10.9 ->
// 8.7 ms, 9 tokens 14.1 -> 8.7 ms. In place (28 Spec-Bench prompts, 256 tokens, `ar` and `auto`
// interleaved per prompt, each hint its own process, two rounds alternated): greedy `ar` +26 %,
// `auto` +49 % (its ratio 2.07x -> 2.36x / 2.57x); sampled `ar` +28 %, `auto` +49 %.
//
// The functions are compiled for AVX512 by the pragma below while the rest of the extension
// stays AVX2; bf16_linear calls them only when the CPU reports avx512bf16 (see has_avx512bf16).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

#include "avx512.h"

namespace {

constexpr int kUnit = 8;                  // weight rows per unit of parallel work
constexpr int64_t kL1Bytes = 24 * 1024;   // bf16 activation bytes per token chunk
constexpr int64_t kRowChunk = 64;         // weight rows per L2-resident chunk
constexpr int64_t kPrefetchBytes = 8192;  // prefetch the weights this far ahead of each row's reads (into L2)
constexpr int64_t kMinTaskMacs = 1 << 18; // below this a task runs inline

// One R x T register tile over the whole of K. w: R weight rows (stride K); xb: T bf16
// activation rows (stride Kp, zero-padded to Kp = K rounded up to 32); y: T output rows
// (stride N), columns [0, R); bias: R values or null.
template <int R, int T>
inline void tile(const uint16_t* w, const uint16_t* xb, float* y, const float* bias, int64_t K, int64_t Kp,
                 int64_t N) {
  __m512 acc[R][T];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t K32 = K & ~int64_t(31);
  const char* pf = reinterpret_cast<const char*>(w) + kPrefetchBytes;
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh wv[R];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(pf + 2 * (r * K + k), _MM_HINT_T1);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    }
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + t * Kp + k);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  if (K32 < K) {
    const __mmask32 m = (__mmask32)((1ull << (K - K32)) - 1);
    __m512bh wv[R];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + K32);
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + t * Kp + K32);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) {
      const float s = fastdecode::hsum16(acc[r][t]);
      y[t * N + r] = bias ? s + bias[r] : s;
    }
}

// Weight rows per register tile (why 3: the comment at the top). 3 x 8 accumulators, 3 weight
// registers and 1 activation register fit the 32.
constexpr int kTileRows = 3;

// Tokens [t0, t1) in pieces of T (the last piece shorter) over rows [r, r + R).
template <int R, int T>
inline void pieces(const uint16_t* w, const uint16_t* xb, float* y, const float* bias, int64_t K, int64_t Kp,
                   int64_t N, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + T <= t1; t += T) tile<R, T>(w, xb + t * Kp, y + t * N, bias, K, Kp, N);
  if (t == t1) return;
  const uint16_t* xt = xb + t * Kp;
  float* yt = y + t * N;
  switch (t1 - t) {  // 1 .. T - 1
    case 1: tile<R, 1>(w, xt, yt, bias, K, Kp, N); break;
    case 2: tile<R, (T > 2 ? 2 : 1)>(w, xt, yt, bias, K, Kp, N); break;
    case 3: tile<R, (T > 3 ? 3 : 1)>(w, xt, yt, bias, K, Kp, N); break;
    case 4: tile<R, (T > 4 ? 4 : 1)>(w, xt, yt, bias, K, Kp, N); break;
    case 5: tile<R, (T > 5 ? 5 : 1)>(w, xt, yt, bias, K, Kp, N); break;
    case 6: tile<R, (T > 6 ? 6 : 1)>(w, xt, yt, bias, K, Kp, N); break;
    default: tile<R, (T > 7 ? 7 : 1)>(w, xt, yt, bias, K, Kp, N); break;
  }
}

// Rows [r0, r1) x tokens [0, n) in R x T tiles, R = kTileRows: chunks of about kRowChunk rows
// stay in L2 while token chunks of tc run over them, each in pieces of T (the last one shorter);
// rows past a chunk's last whole tile go one by one.
template <int T>
void tiles(const uint16_t* W, const uint16_t* xb, float* y, const float* bias, int64_t K, int64_t Kp, int64_t N,
           int64_t n, int64_t tc, int64_t r0, int64_t r1) {
  constexpr int R = kTileRows;
  auto b = [&](int64_t r) { return bias ? bias + r : nullptr; };
  const int64_t chunk = n <= tc ? r1 - r0 : kRowChunk / R * R;
  for (int64_t rc = r0; rc < r1; rc += chunk) {
    const int64_t rc_end = std::min(rc + chunk, r1);
    for (int64_t t0 = 0; t0 < n; t0 += tc) {
      const int64_t t1 = std::min(t0 + tc, n);
      int64_t r = rc;
      for (; r + R <= rc_end; r += R) pieces<R, T>(W + r * K, xb, y + r, b(r), K, Kp, N, t0, t1);
      for (; r < rc_end; ++r) pieces<1, T>(W + r * K, xb, y + r, b(r), K, Kp, N, t0, t1);
    }
  }
}

void row_range(const uint16_t* W, const uint16_t* xb, float* y, const float* bias, int64_t K, int64_t Kp,
               int64_t N, int64_t n, int64_t r0, int64_t r1) {
  // Token chunks of tc, whose activations stay in L1, cut into equal-as-can-be pieces of <= 8
  // tokens: a tile's R weight rows are loaded once per piece.
  const int64_t tc = std::min(n, std::max<int64_t>(8, kL1Bytes / (std::max<int64_t>(Kp, 32) * 2)));
  const int64_t pieces_per_chunk = (tc + 7) / 8, T = (tc + pieces_per_chunk - 1) / pieces_per_chunk;
  switch (T) {
    case 1: return tiles<1>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    case 2: return tiles<2>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    case 3: return tiles<3>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    case 4: return tiles<4>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    case 5: return tiles<5>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    case 6: return tiles<6>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    case 7: return tiles<7>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
    default: return tiles<8>(W, xb, y, bias, K, Kp, N, n, tc, r0, r1);
  }
}

// x fp32 [n, K] -> bf16 [n, Kp], round to nearest even, zeros after K.
void to_bf16(const float* x, uint16_t* xb, int64_t n, int64_t K, int64_t Kp) {
  for (int64_t t = 0; t < n; ++t) {
    const float* src = x + t * K;
    uint16_t* dst = xb + t * Kp;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
    if (k < K) {
      const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), v);
      k += 16;
    }
    for (; k < Kp; ++k) dst[k] = 0;
  }
}

}  // namespace

namespace fastdecode {

void bf16_linear_512(const float* x, const uint16_t* W, const float* bias, float* y, int64_t n, int64_t K,
                     int64_t N) {
  const int64_t Kp = (K + 31) & ~int64_t(31);
  at::Tensor xb_t = at::empty({n * Kp + 32}, at::TensorOptions().dtype(at::kBFloat16));
  auto* xb = reinterpret_cast<uint16_t*>(xb_t.data_ptr());
  to_bf16(x, xb, n, K, Kp);
  const int64_t groups = (N + kUnit - 1) / kUnit;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (kUnit * n * std::max<int64_t>(K, 1)));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    row_range(W, xb, y, bias, K, Kp, N, n, g0 * kUnit, std::min(N, g1 * kUnit));
  });
}

}  // namespace fastdecode

#pragma GCC pop_options

namespace fastdecode {

bool has_avx512bf16() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return has_avx512() && __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
}

}  // namespace fastdecode
