// The attention core of one decoder layer in one call, for any number n of new tokens:
//   RoPE on the new q and k heads -> k, v written to the cache's pending slots
//   [length, length + n) -> softmax(q k^T / sqrt(hd) + mask) v over slots [0, length + n).
// Replaces ~15 small torch ops per layer (complex views, transposes, copies, mask
// building, SDPA) whose fixed per-op costs dominated a decode step.
// Registered as torch.ops.fastdecode_kernels.attention; built with linear_*.cpp.
//
// Layout (fp32 everywhere but a bf16 cache):
//   qkv   [n, (heads + 2 * kv_heads) * hd]: q heads, then k heads, then v heads, each
//         head's q/k features stored as (x, y) pairs of the rotation (model.py's order);
//   cache k, v [layers, kv_heads, max_len, hd], float32, or bfloat16 on the AVX512 core of a CPU
//         with AVX512-BF16: new entries are rounded to nearest even once, keys stored in 16-slot
//         blocks and values in slot pairs (kernels.h: key_offset, value_offset; max_len a multiple
//         of 16); scores take the queries rounded to bf16 too, and the weighted sums the softmax
//         numerators, both by vdpbf16ps (attention_512.cpp);
//   rot   [n, hd / 2, 2]: (cos, sin) of each pair's angle at each new token's position;
//   mask  [n, length + n] bool (true = may attend), or none for causal.
// Each (head, token) is summed in a fixed order of its own (see the tasks below), so the
// result for a token does not depend on n, on the rows beside it or on the thread count.
// On AVX512 CPUs (has_avx512, unless FASTDECODE_NO_AVX512 is set) the core after the KV writes
// is attention_512.cpp's, 16 lanes wide, with its own fixed orders; the core below is the AVX2 one.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float r = fastdecode::hsum8(acc);
  for (; i < d; ++i) r += a[i] * b[i];
  return r;
}

// out[0..d) += p * v[0..d)
inline void axpy(float p, const float* v, float* out, int64_t d) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < d; ++i) out[i] += p * v[i];
}

// dot(q, k_j) * scale for the four keys k at k4 (rows of 64): the same arithmetic per key as
// `dot` (one 8-lane FMA chain over the features, then the same horizontal sum), with the four
// chains interleaved so their latencies overlap (one chain at a time waits ~4 cycles per FMA).
inline void dots4(const float* q, const float* k4, float scale, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#pragma GCC unroll 8
  for (int i = 0; i < 64; i += 8) {
    const __m256 qi = _mm256_loadu_ps(q + i);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k4 + c * 64 + i), acc[c]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) out[c] = fastdecode::hsum8(acc[c]) * scale;
}

// out[0..64) += sum over slots j0 <= j < j1 in order of (p[j] * inv) v_j, skipping p[j] == 0:
// `axpy` slot by slot, with the 64 sums held in registers instead of reloaded and stored per slot.
inline void weighted_sum64(const float* p, int64_t j0, int64_t j1, float inv, const float* v, float* out) {
  __m256 acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(out + 8 * i);
  for (int64_t j = j0; j < j1; ++j) {
    if (p[j] == 0.0f) continue;
    const __m256 pj = _mm256_set1_ps(p[j] * inv);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * 64 + 8 * i), acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

// The new keys (rotated) and values into the pending slots [length, length + n) of one layer's
// fp32 cache, K and V at its first head. (A bf16 cache's writes are write_entries_bf16, in
// attention_512.cpp: such caches only run on the AVX512-BF16 core.)
void write_entries(const float* src, int64_t width, const float* rot, float* K, float* V, int64_t head_stride,
                   int64_t n, int64_t length, int64_t heads, int64_t kv_heads, int64_t hd) {
  for (int64_t t = 0; t < n; ++t) {
    const float* row = src + t * width;
    const int64_t slot = length + t;
    for (int64_t g = 0; g < kv_heads; ++g) {
      fastdecode::rope(row + (heads + g) * hd, rot + t * hd, K + g * head_stride + slot * hd, hd);
      std::memcpy(V + g * head_stride + slot * hd, row + (heads + kv_heads + g) * hd, hd * sizeof(float));
    }
  }
}

}  // namespace

namespace fastdecode {

namespace {

// attention's body; out_bf16 (a bf16 cache only): the output rounded to bf16 too, by the core's tasks.
at::Tensor run_attention(const at::Tensor& qkv, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t layer,
                         int64_t length, const at::Tensor& rot, const std::optional<at::Tensor>& mask, int64_t heads,
                         int64_t kv_heads, at::Tensor* out_bf16) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads = ", heads,
              " must be a positive multiple of kv_heads = ", kv_heads);
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.is_cpu(),
              "qkv must be a contiguous float32 CPU tensor [n, (heads + 2 * kv_heads) * head_dim]");
  const int64_t n = qkv.size(0), width = qkv.size(1);
  TORCH_CHECK(width % (heads + 2 * kv_heads) == 0, "qkv width ", width, " is not (heads + 2 * kv_heads) * head_dim");
  const int64_t hd = width / (heads + 2 * kv_heads);
  TORCH_CHECK(hd % 2 == 0, "head_dim = ", hd, " must be even");
  const bool bf16 = cache_k.scalar_type() == at::kBFloat16;  // bf16 caches: the AVX512-BF16 core only
  for (const at::Tensor* c : {&cache_k, &cache_v})
    TORCH_CHECK(c->dim() == 4 && c->scalar_type() == (bf16 ? at::kBFloat16 : at::kFloat) && c->is_contiguous() &&
                    c->size(1) == kv_heads && c->size(3) == hd,
                "cache k and v must be contiguous float32 (or both bfloat16) tensors [layers, ", kv_heads,
                ", max_len, ", hd, "]");
  TORCH_CHECK(!bf16 || (has_avx512bf16() && (hd == 16 || hd == 32 || hd == 64 || hd == 128)),
              "a bfloat16 cache needs the AVX512-BF16 core and head_dim 16, 32, 64 or 128");
  const int64_t max_len = cache_k.size(2), total = length + n;
  TORCH_CHECK(!bf16 || max_len % kKeyBlock == 0, "a bfloat16 cache's slots (", max_len, ") must be a multiple of ",
              kKeyBlock, ": its keys are stored in blocks of ", kKeyBlock, " slots");
  TORCH_CHECK(0 <= layer && layer < cache_k.size(0), "layer ", layer, " out of range");
  TORCH_CHECK(0 <= length && total <= max_len, "length ", length, " + n ", n, " exceeds the cache (", max_len, ")");
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.is_contiguous() && rot.numel() == n * hd,
              "rot must be a contiguous float32 tensor [n, head_dim / 2, 2]");
  if (mask.has_value())
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == n && mask->size(1) == total,
                "mask must be a contiguous bool tensor [n, length + n] = [", n, ", ", total, "]");

  const float* src = qkv.data_ptr<float>();
  const float* r = rot.data_ptr<float>();
  const int64_t head_stride = max_len * hd;
  const int64_t offset = layer * kv_heads * head_stride;
  at::Tensor out = at::empty({n, heads * hd}, qkv.options());
  float* o = out.data_ptr<float>();
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  if (bf16) {
    uint16_t* Kb = reinterpret_cast<uint16_t*>(cache_k.data_ptr<at::BFloat16>()) + offset;
    uint16_t* Vb = reinterpret_cast<uint16_t*>(cache_v.data_ptr<at::BFloat16>()) + offset;
    write_entries_bf16(src, width, r, Kb, Vb, head_stride, n, length, heads, kv_heads, hd);
    uint16_t* ob = nullptr;
    if (out_bf16 != nullptr) {
      *out_bf16 = at::empty({n, heads * hd}, qkv.options().dtype(at::kBFloat16));
      ob = reinterpret_cast<uint16_t*>(out_bf16->data_ptr<at::BFloat16>());
    }
    attention_512(src, width, r, Kb, Vb, head_stride, m, o, n, length, heads, kv_heads, hd, ob);
    return out;
  }
  TORCH_CHECK(out_bf16 == nullptr, "attention_rounded needs a bfloat16 cache");
  float* K = cache_k.data_ptr<float>() + offset;
  float* V = cache_v.data_ptr<float>() + offset;
  write_entries(src, width, r, K, V, head_stride, n, length, heads, kv_heads, hd);
  if (has_avx512() && (hd == 16 || hd == 32 || hd == 64 || hd == 128)) {
    attention_512(src, width, r, K, V, head_stride, m, o, n, length, heads, kv_heads, hd);
    return out;
  }
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // One task per block of queries: the heads of one KV group (one head when n is small) times a
  // tile of up to 4 tokens. The task walks its group's keys and values in blocks of 64 slots
  // (16 KB, L1-sized) and runs every query over a block before the next, so the cache is read
  // once per task instead of once per query (a 2,000-token prefill was bound by that traffic).
  // Each query still gets exactly its own one-query arithmetic: its dots, its softmax and its
  // sum of values in slot order (partial sums wait in `out` between blocks: a store and a load
  // do not round), so the result depends neither on the tiling nor on n.
  const int64_t hp = n >= 4 ? group : 1;  // heads per task
  const int64_t tt = n >= 4 ? 4 : 1;      // tokens per task
  const int64_t tiles = (n + tt - 1) / tt, tasks = heads / hp * tiles, nq_max = hp * tt;
  const int64_t stride = (total + 7) / 8 * 8;  // a query's score row, padded for exp8
  constexpr int64_t kSlots = 64;               // slots per block
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(total * hd / 8 * nq_max, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(nq_max * hd), score(nq_max * stride), inv(nq_max), sums(nq_max);
    std::vector<const float*> srows(nq_max);
    std::vector<int64_t> visible(nq_max);
    std::vector<const bool*> rows(nq_max);
    std::vector<float*> outs(nq_max);
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h0 = i / tiles * hp, t0 = i % tiles * tt, nt = std::min(tt, n - t0), nq = hp * nt;
      const float* Kg = K + h0 / group * head_stride;
      const float* Vg = V + h0 / group * head_stride;
      const int64_t last = task_queries(src, width, r, o, heads, hd, h0, t0, nt, nq, length, total, m != nullptr,
                                        q.data(), visible.data(), outs.data());
      for (int64_t a = 0; a < nq; ++a) {
        rows[a] = m ? m + (t0 + a % nt) * total : nullptr;
        std::fill(outs[a], outs[a] + hd, 0.0f);
      }
      for (int64_t j0 = 0; j0 < last; j0 += kSlots)
        for (int64_t a = 0; a < nq; ++a) {
          const int64_t j1 = std::min(j0 + kSlots, visible[a]);
          float* sa = score.data() + a * stride;
          int64_t j = j0;
          if (hd == 64)
            for (; j + 4 <= j1; j += 4) dots4(q.data() + a * hd, Kg + j * hd, scale, sa + j);
          for (; j < j1; ++j) sa[j] = dot(q.data() + a * hd, Kg + j * hd, hd) * scale;
        }
      for (int64_t a = 0; a < nq; ++a) {
        float* sa = score.data() + a * stride;
        const bool* mt = rows[a];
        if (mt)
          for (int64_t j = 0; j < visible[a]; ++j)
            if (!mt[j]) sa[j] = ninf;
        // (the row has room for a padded last group of 8, so every slot goes through exp8 alike)
        std::fill(sa + visible[a], sa + stride, ninf);
        __m256 vmx = _mm256_set1_ps(ninf);  // a max is exact in any order: 8 lanes
        for (int64_t j = 0; j < visible[a]; j += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(sa + j));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float mx = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
        inv[a] = mx == ninf ? 0.0f : 1.0f;  // 0: nothing visible, the output stays zeros
        if (mx == ninf) continue;
        // Probabilities, vectorized (elementwise, so order-free); masked slots become exact zeros.
        const __m256 vm = _mm256_set1_ps(mx), vninf = _mm256_set1_ps(ninf);
        for (int64_t j = 0; j < visible[a]; j += 8) {
          const __m256 sj = _mm256_loadu_ps(sa + j);
          const __m256 p = fastdecode::exp8(_mm256_sub_ps(sj, vm));
          _mm256_storeu_ps(sa + j, _mm256_and_ps(p, _mm256_cmp_ps(sj, vninf, _CMP_NEQ_OQ)));
        }
      }
      // Each query's sum runs in slot order and skips nothing (masked zeros add exactly nothing),
      // so a token sees the same sum in a tree forward as in a one-token forward.
      for (int64_t a = 0; a < nq; ++a) srows[a] = score.data() + a * stride;
      row_sums(srows.data(), visible.data(), nq, sums.data());
      for (int64_t a = 0; a < nq; ++a)
        if (inv[a] != 0.0f) inv[a] = 1.0f / sums[a];
      for (int64_t j0 = 0; j0 < last; j0 += kSlots)
        for (int64_t a = 0; a < nq; ++a) {
          if (inv[a] == 0.0f || j0 >= visible[a]) continue;
          const int64_t j1 = std::min(j0 + kSlots, visible[a]);
          const float* sa = score.data() + a * stride;
          if (hd == 64) {
            weighted_sum64(sa, j0, j1, inv[a], Vg, outs[a]);
          } else {
            for (int64_t j = j0; j < j1; ++j)
              if (sa[j] != 0.0f) axpy(sa[j] * inv[a], Vg + j * hd, outs[a], hd);
          }
        }
    }
  });
  return out;
}

}  // namespace

at::Tensor attention(const at::Tensor& qkv, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t layer,
                     int64_t length, const at::Tensor& rot, const std::optional<at::Tensor>& mask, int64_t heads,
                     int64_t kv_heads) {
  return run_attention(qkv, cache_k, cache_v, layer, length, rot, mask, heads, kv_heads, nullptr);
}

at::Tensor attention_rounded(const at::Tensor& qkv, const at::Tensor& cache_k, const at::Tensor& cache_v,
                             int64_t layer, int64_t length, const at::Tensor& rot,
                             const std::optional<at::Tensor>& mask, int64_t heads, int64_t kv_heads) {
  at::Tensor out;
  run_attention(qkv, cache_k, cache_v, layer, length, rot, mask, heads, kv_heads, &out);
  return out;
}

// KVCache.keep for a bf16 cache (keys blocked, values paired): pending slots length + indices[i]
// move to length + i, every layer and KV head. indices ascend, so a slot is read before any
// earlier move writes it.
void keep_slots(const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t length, at::IntArrayRef indices) {
  for (const at::Tensor* c : {&cache_k, &cache_v})
    TORCH_CHECK(c->dim() == 4 && c->scalar_type() == at::kBFloat16 && c->is_contiguous() && c->size(2) % kKeyBlock == 0,
                "keep_slots: caches must be contiguous bfloat16 [layers, kv_heads, slots (a multiple of 16), hd]");
  const int64_t heads = cache_k.size(0) * cache_k.size(1), slots = cache_k.size(2), hd = cache_k.size(3);
  for (size_t i = 0; i < indices.size(); ++i)
    TORCH_CHECK(indices[i] >= static_cast<int64_t>(i) && (i == 0 || indices[i] > indices[i - 1]) &&
                    length + indices[i] < slots, "keep_slots: indices must ascend and lie in the cache");
  uint16_t* K = reinterpret_cast<uint16_t*>(cache_k.data_ptr<at::BFloat16>());
  uint16_t* V = reinterpret_cast<uint16_t*>(cache_v.data_ptr<at::BFloat16>());
  for (int64_t h = 0; h < heads; ++h) {
    uint16_t* k = K + h * slots * hd;
    uint16_t* v = V + h * slots * hd;
    for (size_t i = 0; i < indices.size(); ++i) {
      const int64_t src = length + indices[i], dst = length + static_cast<int64_t>(i);
      if (src == dst) continue;
      for (int64_t f = 0; f < hd; ++f) {
        k[key_offset(dst, f, hd)] = k[key_offset(src, f, hd)];
        v[value_offset(dst, f, hd)] = v[value_offset(src, f, hd)];
      }
    }
  }
}

// Which core runs: "avx512bf16" (the AVX512 core, which also takes bf16 caches), "avx512" (the
// AVX512 core on a CPU without AVX512-BF16: fp32 caches only) or "avx2" (fp32 caches only).
std::string attention_isa() { return has_avx512bf16() ? "avx512bf16" : has_avx512() ? "avx512" : "avx2"; }

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("attention(Tensor qkv, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, int length, Tensor rot, "
        "Tensor? mask, int heads, int kv_heads) -> Tensor");
  m.def("attention_isa() -> str", &fastdecode::attention_isa);  // no tensors: a catch-all kernel
  m.def("keep_slots(Tensor(a!) cache_k, Tensor(b!) cache_v, int length, int[] indices) -> ()");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("attention", &fastdecode::attention);
  m.impl("keep_slots", &fastdecode::keep_slots);
}
