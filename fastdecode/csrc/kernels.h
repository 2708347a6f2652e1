// What the kernel files share: the ops other kernels call directly (the fused decoder layer in
// layer.cpp calls the linears and attention without going back through Python) and exp8.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>

#include <ATen/core/Tensor.h>

namespace fastdecode {

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// The same plus `residual` [n, N] (float32, contiguous): y = (x W^T + bias) + residual, each element as
// `residual + bf16_linear(...)` gives it (one fp32 add); the AMX kernel adds it while the row is hot.
at::Tensor bf16_linear_add(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& residual);
// The AVX512-BF16 bf16_linear (linear_bf16_512.cpp), raw pointers; call only if has_avx512bf16().
void bf16_linear_512(const float* x, const uint16_t* W, const float* bias, float* y, int64_t n, int64_t K, int64_t N);
// silu(gate) * up for elements [0, count / 16 * 16) on 16 lanes, the same bits as layer.cpp's 8-lane
// loop (attention_512.cpp); call only if has_avx512().
void silu_mul_512(const float* gate, const float* up, float* y, int64_t count);
// The AMX-BF16 bf16_linear (linear_bf16_amx.cpp) on weights packed [N / 16, K / 2, 16, 2], raw
// pointers; call only if has_amx_bf16(). residual: nullptr, or [n, N] added after the bias.
void bf16_linear_amx(const float* x, const uint16_t* packed, const float* bias, const float* residual, float* y,
                     int64_t n, int64_t K, int64_t N);
// bf16_linear_amx (no bias or residual) plus each row's k largest outputs, as top_k_rows ranks them.
void bf16_linear_amx_topk(const float* x, const uint16_t* packed, float* y, int64_t n, int64_t K, int64_t N, int64_t k,
                          int64_t* top_idx, float* top_val);
// bf16_linear_amx on activations already rounded to bf16 (xb [n, K], round to nearest even, as
// bf16_linear_amx rounds them): the producer of x rounds its own rows while they are hot
// (layer.cpp: SiLU's output, attention's), instead of one thread re-reading x here.
void bf16_linear_amx_rounded(const uint16_t* xb, const uint16_t* packed, const float* bias, const float* residual,
                             float* y, int64_t n, int64_t K, int64_t N);
// bf16_linear_amx whose bf16 activation rows (xb + t * K, K of them) `prepare(t, row)` writes,
// the threads sharing the rows and then the products in one OpenMP region (layer.cpp: RMS norm
// and rounding). prepare must give each row the same values whichever thread runs it.
void bf16_linear_amx_prepared(const std::function<void(int64_t, uint16_t*)>& prepare, const uint16_t* packed,
                              const float* bias, const float* residual, float* y, int64_t n, int64_t K, int64_t N);
// x [count] fp32 -> bf16 (round to nearest even, vcvtneps2bf16: the AMX linear's own rounding;
// count % 16 == 0); call only if has_avx512bf16().
void round_bf16_512(const float* x, uint16_t* xb, int64_t count);
// An AMX tile configuration (palette 1), as _tile_loadconfig reads it: tile t has rows[t] rows of
// colsb[t] bytes. The AMX kernels fill one per task (linear_bf16_amx.cpp, attention_512.cpp).
struct AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// Whether this CPU has AMX-TILE and AMX-BF16, the OS lets this process use the tiles, has_avx512bf16()
// holds and FASTDECODE_NO_AMX is not set.
bool has_amx_bf16();
// Whether this CPU has AVX512F/BW/VL and AVX512-BF16, and FASTDECODE_NO_AVX512 is not set.
bool has_avx512bf16();
// Whether this CPU has AVX512F/BW/VL, and FASTDECODE_NO_AVX512 is not set.
bool has_avx512();
at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias, int64_t rows);
at::Tensor attention(const at::Tensor& qkv, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t layer,
                     int64_t length, const at::Tensor& rot, const std::optional<at::Tensor>& mask, int64_t heads,
                     int64_t kv_heads);
// attention's core on AVX512 CPUs (attention_512.cpp), for head_dim 16, 32, 64 or 128: the n
// queries' rows of qkv (stride `width`) against slots [0, length + n) of one layer's K and V
// (head stride `head_stride`; the new keys and values already written), into out [n, heads * hd].
// T = float, or uint16_t for a bf16 cache (keys and values in the layouts below).
// out_bf16 (or nullptr): out's rows rounded to bf16 as well, each task its own rows while they are hot.
template <typename T>
void attention_512(const float* qkv, int64_t width, const float* rot, const T* K, const T* V, int64_t head_stride,
                   const bool* mask, float* out, int64_t n, int64_t length, int64_t heads, int64_t kv_heads,
                   int64_t hd, uint16_t* out_bf16 = nullptr);
// attention (above) for a layer whose o projection takes bf16 activations: its output rounded to
// bf16 [n, heads * head_dim] by the AVX512 core's tasks; only for a bf16 cache (the AVX512-BF16 core).
at::Tensor attention_rounded(const at::Tensor& qkv, const at::Tensor& cache_k, const at::Tensor& cache_v,
                             int64_t layer, int64_t length, const at::Tensor& rot,
                             const std::optional<at::Tensor>& mask, int64_t heads, int64_t kv_heads);

// The K/V entries of n new tokens into a bf16 cache (one layer; K, V at its KV head 0), keys
// rotated by RoPE, both rounded to bf16 (nearest even), in key_offset / value_offset's layouts:
// the bf16 counterpart of attention.cpp's write_entries (which writes fp32 caches), for CPUs with
// AVX512-BF16 (attention_512.cpp).
void write_entries_bf16(const float* qkv, int64_t width, const float* rot, uint16_t* K, uint16_t* V,
                        int64_t head_stride, int64_t n, int64_t length, int64_t heads, int64_t kv_heads, int64_t hd);
// A bf16 cache's keys (one layer, one KV head) lie in blocks of kKeyBlock slots, feature pairs
// outermost: a block holds, for each pair (2w, 2w + 1), those two bf16 of its 16 slots side by
// side (64 bytes: one vector). A vdpbf16ps of that vector with a query's pair broadcast adds the
// pair's products to 16 slots' scores at once, with no horizontal sums (attention_512.cpp).
// The element of slot `slot`, feature i:
constexpr int64_t kKeyBlock = 16;
inline int64_t key_offset(int64_t slot, int64_t i, int64_t hd) {
  return slot / kKeyBlock * kKeyBlock * hd + (i / 2) * (2 * kKeyBlock) + slot % kKeyBlock * 2 + i % 2;
}

// A bf16 cache's values lie in slot pairs: pair m holds, feature by feature, the bf16 of slots
// 2m and 2m + 1 side by side (a vector is 16 features of both). The element of slot `slot`, feature i:
inline int64_t value_offset(int64_t slot, int64_t i, int64_t hd) { return slot / 2 * 2 * hd + 2 * i + slot % 2; }

// dst = src rotated pair by pair: (x, y) -> (x cos - y sin, x sin + y cos).
inline void rope(const float* src, const float* rot, float* dst, int64_t hd) {
  for (int64_t i = 0; i < hd; i += 2) {
    const float c = rot[i], s = rot[i + 1], x = src[i], y = src[i + 1];
    dst[i] = x * c - y * s;
    dst[i + 1] = x * s + y * c;
  }
}

// The queries of one attention task, heads h0.. x tokens [t0, t0 + nt), head-major: query a is
// head h0 + a / nt at token t0 + a % nt. Each is rotated into q + a * hd and gets the number of
// slots it sees (all `total` under a mask; causal: the cache and the new tokens up to its own)
// and its row of `out`. Returns the most slots any of them sees.
inline int64_t task_queries(const float* qkv, int64_t width, const float* rot, float* out, int64_t heads,
                            int64_t hd, int64_t h0, int64_t t0, int64_t nt, int64_t nq, int64_t length,
                            int64_t total, bool masked, float* q, int64_t* visible, float** outs) {
  int64_t last = 0;
  for (int64_t a = 0; a < nq; ++a) {
    const int64_t h = h0 + a / nt, t = t0 + a % nt;
    rope(qkv + t * width + h * hd, rot + t * hd, q + a * hd, hd);
    visible[a] = masked ? total : length + t + 1;
    outs[a] = out + t * heads * hd + h * hd;
    last = std::max(last, visible[a]);
  }
  return last;
}

// sums[a] = rows[a][0] + rows[a][1] + ... + rows[a][len[a] - 1], one add at a time in that order
// (so exact zeros anywhere in a row leave its sum as without them), four rows side by side so
// four add chains overlap.
inline void row_sums(const float* const* rows, const int64_t* len, int64_t count, float* sums) {
  for (int64_t a0 = 0; a0 < count; a0 += 4) {
    const int64_t na = std::min<int64_t>(4, count - a0);
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t common = 0;
    if (na == 4) {
      common = std::min(std::min(len[a0], len[a0 + 1]), std::min(len[a0 + 2], len[a0 + 3]));
      const float *r0 = rows[a0], *r1 = rows[a0 + 1], *r2 = rows[a0 + 2], *r3 = rows[a0 + 3];
      for (int64_t j = 0; j < common; ++j) {
        s[0] += r0[j];
        s[1] += r1[j];
        s[2] += r2[j];
        s[3] += r3[j];
      }
    }
    for (int64_t b = 0; b < na; ++b) {
      for (int64_t j = common; j < len[a0 + b]; ++j) s[b] += rows[a0 + b][j];
      sums[a0 + b] = s[b];
    }
  }
}

// The sum of 8 lanes, in the one order every kernel uses: (l0 + l4, l1 + l5, l2 + l6, l3 + l7),
// then (a0 + a2, a1 + a3), then their sum. Results that must match across kernels (a dot in a
// tree forward and in a one-token forward) depend on that order.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One step of a top-k scan: keep the k largest (value, index) pairs inserted so far in idx / vals
// (`count` of them), largest first and, among equals, the one inserted first; NaNs never enter, and
// once full a value must beat the k-th to get in. top_k_row (sampling.cpp) and the LM head's
// ranking as it writes its rows (linear_bf16_amx.cpp) both insert through this, so they rank alike.
inline void top_insert(float v, int64_t j, int64_t k, int64_t& count, int64_t* idx, float* vals) {
  int64_t pos;
  if (count < k) {
    if (!(v == v)) return;
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
}

// e^x for 8 floats (Cephes' expf: x = k ln2 + r, a degree-6 polynomial in r, 2^k from the
// exponent bits), ~2 ulp; inputs below -87 are clamped there (e^-87 ~ 1.6e-38: nothing next to
// the softmax maximum's e^0). Callers zero masked lanes themselves.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for an exact-ish r
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

}  // namespace fastdecode
