// One whole Llama decoder layer in one call, for the n rows of a decode step, a draft tree or a
// prefill:
//   h = rms_norm(x) -> qkv = h Wqkv -> attention (RoPE, pending KV writes, masked attention)
//   -> x += attn Wo -> h = rms_norm(x) -> x += (silu(h Wgate) * h Wup) Wdown
// Why: in Python each layer was ~12 torch ops plus module calls; their fixed costs (~10 ms of a
// ~18 ms int4 decode step, measured with scripts/profile_step.py) were more than the matmuls.
// Registered as torch.ops.fastdecode_kernels.{layer, rms_norm, silu_mul}; `rms_norm` and
// `silu_mul` are the same code the layer runs, exposed so a batched forward that runs a layer
// piece by piece (model.py's forward_segments) gets the same bits.
//
// Each linear is given as [weight or codes, scales, mins, bias, rows] (Tensor?[]): bf16 weights go
// to bf16_linear, uint8/int8 panel-packed codes to q_linear (Q4_1 / Q8_0 blocks; rows is then a
// 0-dim int64 tensor, the output rows), fp32 weights to at::linear.
// Every row is computed on its own in a fixed order (the norms, silu and adds are per row), so
// with the bf16 and block kernels a row's result does not depend on n or the thread count.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

using Spec = c10::List<std::optional<at::Tensor>>;

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(), name,
              " must be a contiguous float32 CPU tensor [n, features], got ", x.scalar_type(), " ", x.sizes());
}

// `residual` (when given): the result is residual + the linear's, element by element.
at::Tensor linear(const at::Tensor& x, const Spec& spec, const char* name,
                  const std::optional<at::Tensor>& residual = std::nullopt) {
  TORCH_CHECK(spec.size() == 5, name, ": a linear is [weight or codes, scales, mins, bias, rows], got ",
              spec.size(), " entries");
  const std::optional<at::Tensor> w = spec.get(0), scales = spec.get(1), mins = spec.get(2), bias = spec.get(3);
  TORCH_CHECK(w.has_value(), name, ": the weight is missing");
  switch (w->scalar_type()) {
    case at::kBFloat16:
      return residual.has_value() ? fastdecode::bf16_linear_add(x, *w, bias, *residual)
                                  : fastdecode::bf16_linear(x, *w, bias);
    case at::kByte:
    case at::kChar: {
      TORCH_CHECK(scales.has_value() && spec.get(4).has_value(), name, ": block codes need scales and rows");
      at::Tensor y = fastdecode::q_linear(x, *w, *scales, mins, bias, spec.get(4)->item<int64_t>());
      return residual.has_value() ? y.add_(*residual) : y;
    }
    case at::kFloat: {
      at::Tensor y = bias.has_value() ? at::linear(x, *w, *bias) : at::linear(x, *w);
      return residual.has_value() ? y.add_(*residual) : y;
    }
    default:
      TORCH_CHECK(false, name, ": unsupported weight dtype ", w->scalar_type());
  }
}

// Whether a linear's weight is AMX-packed bf16 (kernels.pack_amx): it then takes bf16 activations.
bool amx_packed(const Spec& spec) {
  if (spec.size() != 5) return false;  // linear() reports the malformed entry
  const std::optional<at::Tensor> w = spec.get(0);
  return w.has_value() && w->scalar_type() == at::kBFloat16 && w->dim() == 4;
}

// `linear` on an AMX-packed weight for activations already rounded to bf16 (xb [n, K]), plus `residual`.
at::Tensor linear_rounded(const at::Tensor& xb, const Spec& spec, const at::Tensor& residual) {
  const at::Tensor w = *spec.get(0);
  const std::optional<at::Tensor> bias = spec.get(3);
  const int64_t n = xb.size(0), K = xb.size(1), N = w.size(0) * 16;
  TORCH_CHECK(w.size(1) * 2 == K && residual.size(0) == n && residual.size(1) == N, "linear_rounded: shapes differ");
  at::Tensor y = at::empty({n, N}, residual.options());
  if (n > 0)
    fastdecode::bf16_linear_amx_rounded(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()),
                                        reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                                        bias.has_value() ? bias->data_ptr<float>() : nullptr,
                                        residual.data_ptr<float>(), y.data_ptr<float>(), n, K, N);
  return y;
}

}  // namespace

namespace fastdecode {

// y = x / sqrt(mean(x^2) + eps) * w, row by row; the sum of squares runs in 8 lanes then the tail.
namespace {

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "weight must be a contiguous float32 tensor [", x.size(1), "]");
}

// One row of rms_norm: yr = xr / sqrt(mean(xr^2) + eps) * wp.
void rms_norm_row(const float* xr, const float* wp, double eps, int64_t d, float* yr) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_loadu_ps(xr + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = fastdecode::hsum8(acc);
  for (; i < d; ++i) ss += xr[i] * xr[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= d; i += 8)
    _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv), _mm256_loadu_ps(wp + i)));
  for (; i < d; ++i) yr[i] = xr[i] * inv * wp[i];
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x);
  for (int64_t t = 0; t < n; ++t)
    rms_norm_row(x.data_ptr<float>() + t * d, weight.data_ptr<float>(), eps, d, y.data_ptr<float>() + t * d);
  return y;
}

// linear(rms_norm(x, weight, eps), spec): where the weight is AMX-packed, the rows are normed and
// rounded to bf16 by both threads in the region the products run in (bf16_linear_amx_prepared),
// not by one thread before it. Same steps per row, so the same bits.
at::Tensor norm_linear(const at::Tensor& x, const at::Tensor& weight, double eps, const Spec& spec, const char* name) {
  if (!amx_packed(spec) || x.size(1) % 32 != 0) return linear(rms_norm(x, weight, eps), spec, name);
  check_norm(x, weight);
  const at::Tensor w = *spec.get(0);
  const std::optional<at::Tensor> bias = spec.get(3);
  const int64_t n = x.size(0), d = x.size(1), N = w.size(0) * 16;
  TORCH_CHECK(w.size(1) * 2 == d, name, ": weight's K (", w.size(1) * 2, ") must equal x.size(1) (", d, ")");
  at::Tensor normed = at::empty_like(x);
  at::Tensor y = at::empty({n, N}, x.options());
  if (n == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* hp = normed.data_ptr<float>();
  bf16_linear_amx_prepared(
      [&](int64_t t, uint16_t* row) {
        rms_norm_row(xp + t * d, wp, eps, d, hp + t * d);
        round_bf16_512(hp + t * d, row, d);
      },
      reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), bias.has_value() ? bias->data_ptr<float>() : nullptr,
      nullptr, y.data_ptr<float>(), n, d, N);
  return y;
}

// gate_up [n, 2 * I] (gate | up) -> silu(gate) * up [n, I], silu(g) = g / (1 + e^-g), element by
// element. From kSiluParallelFrom elements on, rows are cut into column ranges of kSiluChunk (a
// multiple of 8: each element takes the same steps wherever a range starts) split over the
// threads. Why: in a tree's forward it ran on one thread while the other waited (~0.3 ms of an
// 11-token forward on the AMX Xeon, perf); the op on 25 rows went 22 -> 16-19 us (2 threads).
// Where the CPU has AVX512 a range's 16-lane blocks go first (silu_mul_512, the same steps lane for
// lane): 8 rows 6.6-9.9 -> 5.5-6.1 us, 1 row 2.45 -> 2.2 us (warm, 2 threads).
// For a down projection that takes bf16 activations (AMX), `yb` gets each range rounded to bf16
// as soon as it is computed (the range still in L1), by the thread that computed it.
constexpr int64_t kSiluChunk = 256;
constexpr int64_t kSiluParallelFrom = 8192;

namespace {

void silu_mul_into(const at::Tensor& gate_up, at::Tensor& y, uint16_t* yb) {
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  const float* g = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = (inter + kSiluChunk - 1) / kSiluChunk;
  const bool avx512 = has_avx512();
  const auto run = [&](int64_t i0, int64_t i1) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t task = i0; task < i1; ++task) {
      const int64_t t = task / chunks, c0 = task % chunks * kSiluChunk, c1 = std::min(inter, c0 + kSiluChunk);
      const float* gr = g + t * 2 * inter;
      const float* ur = gr + inter;
      float* yr = yp + t * inter;
      int64_t i = c0;
      if (avx512) {  // its 16-lane loop first: the same steps, so the same bits
        silu_mul_512(gr + i, ur + i, yr + i, c1 - i);
        i += (c1 - i) / 16 * 16;
      }
      for (; i + 8 <= c1; i += 8) {
        const __m256 gv = _mm256_loadu_ps(gr + i);
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(yr + i, _mm256_mul_ps(s, _mm256_loadu_ps(ur + i)));
      }
      for (; i < c1; ++i) yr[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
      if (yb != nullptr) round_bf16_512(yr + c0, yb + t * inter + c0, c1 - c0);
    }
  };
  if (n * inter < kSiluParallelFrom) run(0, n * chunks);
  else at::parallel_for(0, n * chunks, 1, run);
}

}  // namespace

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up width ", gate_up.size(1), " must be even (gate | up)");
  at::Tensor y = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  silu_mul_into(gate_up, y, nullptr);
  return y;
}

// silu_mul rounded to bf16 ([n, inter], inter % 16 == 0; call only if has_avx512bf16()): the down
// projection's activations as the AMX linear would round silu_mul's output.
at::Tensor silu_mul_rounded(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 32 == 0, "silu_mul_rounded: gate_up width ", gate_up.size(1), " must be a multiple of 32");
  at::Tensor y = at::empty({n, inter}, gate_up.options());
  at::Tensor yb = at::empty({n, inter}, gate_up.options().dtype(at::kBFloat16));
  silu_mul_into(gate_up, y, reinterpret_cast<uint16_t*>(yb.data_ptr<at::BFloat16>()));
  return yb;
}

at::Tensor layer(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps,
                 const Spec& qkv, const Spec& o, const Spec& gate_up, const Spec& down, const at::Tensor& cache_k,
                 const at::Tensor& cache_v, int64_t layer_index, int64_t length, const at::Tensor& rot,
                 const std::optional<at::Tensor>& mask, int64_t heads, int64_t kv_heads) {
  check_rows(x, "x");
  const at::Tensor q = norm_linear(x, attn_norm, eps, qkv, "qkv");
  // Where o and down take bf16 activations (AMX), attention's tasks and SiLU's round their own
  // rows while hot; the linear would otherwise round them on one thread, reading rows the other
  // thread wrote (~0.15 ms of a 9-token forward's ~1 ms over a one-token one, perf). Same bits.
  const at::Tensor h = amx_packed(o) && cache_k.scalar_type() == at::kBFloat16
                           ? linear_rounded(attention_rounded(q, cache_k, cache_v, layer_index, length, rot, mask,
                                                              heads, kv_heads), o, x)
                           : linear(attention(q, cache_k, cache_v, layer_index, length, rot, mask, heads, kv_heads), o,
                                    "o", x);  // x + attn Wo
  const at::Tensor g = norm_linear(h, mlp_norm, eps, gate_up, "gate_up");
  return amx_packed(down) ? linear_rounded(silu_mul_rounded(g), down, h) : linear(silu_mul(g), down, "down", h);
}

// `layer` for the layers `layer_ids` in turn, in one call: the norms of layer i are attn_norms[i]
// and mlp_norms[i], its linears linears[20 i .. 20 i + 20) (qkv, o, gate_up, down, 5 entries each,
// as `layer` takes them). Why: 30 calls from Python cost ~8 us each in argument handling alone
// (~10 with the loop around them), ~0.3 ms of a ~11 ms decode step; the tensors of one list are
// parsed faster than the same number spread over 30 calls.
at::Tensor layers(const at::Tensor& x, at::TensorList attn_norms, at::TensorList mlp_norms, double eps,
                  const Spec& linears, c10::IntArrayRef layer_ids, const at::Tensor& cache_k,
                  const at::Tensor& cache_v, int64_t length, const at::Tensor& rot,
                  const std::optional<at::Tensor>& mask, int64_t heads, int64_t kv_heads) {
  const int64_t count = static_cast<int64_t>(layer_ids.size());
  TORCH_CHECK(static_cast<int64_t>(attn_norms.size()) == count && static_cast<int64_t>(mlp_norms.size()) == count &&
                  static_cast<int64_t>(linears.size()) == 20 * count,
              "layers: ", count, " layers need as many norms of each kind and 20 linear entries each, got ",
              attn_norms.size(), ", ", mlp_norms.size(), " and ", linears.size());
  at::Tensor h = x;
  for (int64_t i = 0; i < count; ++i) {
    Spec spec[4];
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t e = 0; e < 5; ++e) spec[j].push_back(linears.get(20 * i + 5 * j + e));
    h = layer(h, attn_norms[i], mlp_norms[i], eps, spec[0], spec[1], spec[2], spec[3], cache_k, cache_v, layer_ids[i],
              length, rot, mask, heads, kv_heads);
  }
  return h;
}

// `layer` for several sequences at once (continuous batching): x holds their rows one after the
// other (segment s: rows [starts[s], starts[s + 1])); the linears, norms and SiLU run once over all
// rows, attention once per segment against its own cache. Each row gets exactly the bits `layer`
// gives its sequence alone, as the linears here are row-independent (bf16 and block kernels; the
// caller checks).
at::Tensor layer_batch(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps,
                       const Spec& qkv, const Spec& o, const Spec& gate_up, const Spec& down,
                       const std::vector<at::Tensor>& caches_k, const std::vector<at::Tensor>& caches_v,
                       int64_t layer_index, const std::vector<int64_t>& lengths, const std::vector<at::Tensor>& rots,
                       const c10::List<std::optional<at::Tensor>>& masks, const std::vector<int64_t>& starts,
                       int64_t heads, int64_t kv_heads) {
  check_rows(x, "x");
  const size_t segs = lengths.size();
  TORCH_CHECK(segs > 0 && caches_k.size() == segs && caches_v.size() == segs && rots.size() == segs &&
                  masks.size() == segs && starts.size() == segs + 1,
              "layer_batch: ", segs, " lengths need as many caches, rots and masks, and one more start");
  TORCH_CHECK(starts.front() == 0 && starts.back() == x.size(0), "layer_batch: starts must run from 0 to ", x.size(0));
  const at::Tensor q = linear(rms_norm(x, attn_norm, eps), qkv, "qkv");
  std::vector<at::Tensor> parts;
  parts.reserve(segs);
  for (size_t s = 0; s < segs; ++s) {
    TORCH_CHECK(starts[s] < starts[s + 1], "layer_batch: segment ", s, " has no rows");
    parts.push_back(attention(q.narrow(0, starts[s], starts[s + 1] - starts[s]), caches_k[s], caches_v[s],
                              layer_index, lengths[s], rots[s], masks.get(s), heads, kv_heads));
  }
  const at::Tensor h = linear(segs == 1 ? parts[0] : at::cat(parts), o, "o", x);
  return linear(silu_mul(linear(rms_norm(h, mlp_norm, eps), gate_up, "gate_up")), down, "down", h);
}

// A draft head's call (drafters/head.py, HeadDrafter.propose at one depth) in one native call:
//   feats = rms_norm(hidden, target_norm)      the target's last hidden states of the new rows
//   x = fc([feats | embed[tokens]])            joined with the embeddings of the tokens after them
//   s = rms_norm(layer(x), head_norm)          the head's decoder layer over its own cache (layer 0)
// Returns (s's last row [1, d], the k best columns of lm(that row) [k] int64, value descending and
// the lower column first among equals, as top_insert ranks). The same functions as the module by
// module path (RMSNorm, Linear and Block call these kernels), so the same bits. Why: that path made
// ~12 torch calls a step (norm, gather, cat, fc, layer, norm, LM head, topk), each slow while cold
// after the target's forward: in place the call went 0.76 -> 0.66 ms (median), the rest being the
// head's 13 MB of weights arriving from memory (README, session of 2026-12-08).
std::tuple<at::Tensor, at::Tensor> head_step(
    const at::Tensor& hidden, const at::Tensor& target_norm, double target_eps, const at::Tensor& embed,
    c10::IntArrayRef tokens, const Spec& fc, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps,
    const Spec& qkv, const Spec& o, const Spec& gate_up, const Spec& down, const at::Tensor& cache_k,
    const at::Tensor& cache_v, int64_t length, const at::Tensor& rot, int64_t heads, int64_t kv_heads,
    const at::Tensor& head_norm, double head_eps, const Spec& lm, int64_t k) {
  check_rows(hidden, "hidden");
  const int64_t m = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK(m > 0 && static_cast<int64_t>(tokens.size()) == m, "head_step: ", m, " hidden rows need as many tokens, got ",
              tokens.size());
  TORCH_CHECK(embed.dim() == 2 && embed.size(1) == d && embed.is_contiguous() &&
                  (embed.scalar_type() == at::kBFloat16 || embed.scalar_type() == at::kFloat),
              "head_step: embed must be a contiguous bfloat16 or float32 [vocab, ", d, "], got ", embed.scalar_type(), " ",
              embed.sizes());
  TORCH_CHECK(k > 0, "head_step: k must be positive, got ", k);
  const at::Tensor feats = rms_norm(hidden, target_norm, target_eps);
  at::Tensor joined = at::empty({m, 2 * d}, hidden.options());
  float* jp = joined.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t) {
    const int64_t token = tokens[t];
    TORCH_CHECK(0 <= token && token < embed.size(0), "head_step: token ", token, " is outside [0, ", embed.size(0), ")");
    std::copy_n(feats.data_ptr<float>() + t * d, d, jp + t * 2 * d);
    float* e = jp + t * 2 * d + d;
    if (embed.scalar_type() == at::kFloat) {
      std::copy_n(embed.data_ptr<float>() + token * d, d, e);
    } else {  // bf16 -> fp32 is the bits shifted up: exact, what torch's .float() gives
      const auto* src = reinterpret_cast<const uint16_t*>(embed.data_ptr<at::BFloat16>()) + token * d;
      for (int64_t i = 0; i < d; ++i) {
        const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
        std::memcpy(e + i, &bits, sizeof bits);
      }
    }
  }
  const at::Tensor h = layer(linear(joined, fc, "fc"), attn_norm, mlp_norm, eps, qkv, o, gate_up, down, cache_k, cache_v,
                             0, length, rot, std::nullopt, heads, kv_heads);
  const at::Tensor state = rms_norm(h.narrow(0, m - 1, 1).contiguous(), head_norm, head_eps);
  const at::Tensor logits = linear(state, lm, "lm");
  const int64_t cols = logits.size(1), kk = std::min(k, cols);
  at::Tensor top = at::empty({kk}, hidden.options().dtype(at::kLong));
  std::vector<float> vals(kk);
  int64_t count = 0;
  const float* lp = logits.data_ptr<float>();
  for (int64_t j = 0; j < cols; ++j) top_insert(lp[j], j, kk, count, top.data_ptr<int64_t>(), vals.data());
  return {state, top.narrow(0, 0, count)};
}

}  // namespace fastdecode

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("layer(Tensor x, Tensor attn_norm, Tensor mlp_norm, float eps, Tensor?[] qkv, Tensor?[] o, "
        "Tensor?[] gate_up, Tensor?[] down, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, int length, "
        "Tensor rot, Tensor? mask, int heads, int kv_heads) -> Tensor");
  m.def("layers(Tensor x, Tensor[] attn_norms, Tensor[] mlp_norms, float eps, Tensor?[] linears, int[] layer_ids, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, int length, Tensor rot, Tensor? mask, int heads, int kv_heads) -> Tensor");
  m.def("layer_batch(Tensor x, Tensor attn_norm, Tensor mlp_norm, float eps, Tensor?[] qkv, Tensor?[] o, "
        "Tensor?[] gate_up, Tensor?[] down, Tensor(a!)[] caches_k, Tensor(b!)[] caches_v, int layer, int[] lengths, "
        "Tensor[] rots, Tensor?[] masks, int[] starts, int heads, int kv_heads) -> Tensor");
  m.def("head_step(Tensor hidden, Tensor target_norm, float target_eps, Tensor embed, int[] tokens, Tensor?[] fc, "
        "Tensor attn_norm, Tensor mlp_norm, float eps, Tensor?[] qkv, Tensor?[] o, Tensor?[] gate_up, Tensor?[] down, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, int length, Tensor rot, int heads, int kv_heads, Tensor head_norm, "
        "float head_eps, Tensor?[] lm, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdecode_kernels, CPU, m) {
  m.impl("rms_norm", &fastdecode::rms_norm);
  m.impl("silu_mul", &fastdecode::silu_mul);
  m.impl("layer", &fastdecode::layer);
  m.impl("layers", &fastdecode::layers);
  m.impl("layer_batch", &fastdecode::layer_batch);
  m.impl("head_step", &fastdecode::head_step);
}
