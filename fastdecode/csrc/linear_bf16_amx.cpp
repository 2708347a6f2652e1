// bf16_linear on CPUs with AMX-BF16 (Intel Sapphire Rapids and later), for weights packed by
// pack_amx (kernels.py): the same y[n, N] = x[n, K] @ W[N, K]^T + bias[N], computed by the tile
// unit. One TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one and adds the products into a
// 16 x 16 fp32 tile: 8,192 multiply-adds an instruction, against 32 for vdpbf16ps. The activations
// are rounded to bf16 once per call (round to nearest even), as in linear_bf16_512.cpp.
//
// Why: with vdpbf16ps on such a CPU the multiply-adds of a draft tree do not hide under the weight
// stream (a whole forward of 8 tokens cost 1.60x one token, 16 tokens 2.57x; Xeon with AMX, 2
// threads, scripts/forward_cost.py). The tile unit does 16 tokens' multiply-adds in about the time
// one token's weights arrive.
//
// Layout: the weights are the tiles' B operand, packed once at load: [N / 16][K / 2][16][2], i.e.
// for each block of 16 output rows, pair by pair of k, the 16 rows' (k = 2p, 2p + 1) side by side.
// A B tile (16 pairs = 32 k of 16 rows) is then 1 KB in one piece and a row block's weights one
// stream. The activations are the A operand as they lie, [n, K] bf16 rows, up to 16 tokens a tile,
// and C (tokens x 16 rows, fp32) is stored straight into y. Weights as the A operand, [N, K] as
// loaded (16 row streams, the activations repacked per call as B and C written transposed) made
// one token 10-15 % slower than linear_bf16_512.cpp; this layout is 2-8 % faster than it at one
// token (several runs), and 16 tokens cost 1.1x what one does (the 30 layers' linears and the LM
// head alone, 2 threads, scripts/bench_amx.py: README).
//
// Order: each y[t][r] is the same sequence of TDPBF16PS over K on token t's row of activations and
// row r's weights whatever n, the tile the token falls in (a tile's row count is a setting) or the
// thread, so a token's result does not depend on the rows beside it (the property lossless
// speculative decoding needs; tests/test_kernels.py). It is not the vdpbf16ps kernel's order: a
// matrix is packed or not for good, and every call on it takes the same kernel.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")

namespace {

constexpr int64_t kRows = 16;    // output rows a block (C columns); B is 16 pairs x 16 rows x 2
constexpr int64_t kTokens = 16;  // tokens a tile at most (A and C rows)
constexpr int64_t kDepth = 32;   // k a tile
constexpr int64_t kMinTaskMacs = 1 << 18;  // below this a task runs inline

// Tiles of a pass over two token groups (m0 and m1 tokens) and two row blocks: C 0-1 group 0's,
// C 2-3 group 1's, A 4 and 5 the groups' activations, B 6 and 7 the row blocks' weights. Every
// row is 64 bytes (16 fp32, 32 bf16, 16 bf16 pairs).
void load_config(int m0, int m1) {
  fastdecode::AmxTileConfig cfg;
  const uint8_t rows[8] = {uint8_t(m0), uint8_t(m0), uint8_t(m1), uint8_t(m1), uint8_t(m0), uint8_t(m1), 16, 16};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = rows[t];
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// How `units` splits a product over the threads: the units (pairs of 16-row blocks) of N output
// rows, and the fewest a task takes so that it holds at least kMinTaskMacs multiply-adds.
int64_t unit_count(int64_t N) { return (N / kRows + 1) / 2; }
int64_t unit_grain(int64_t n, int64_t K) { return std::max<int64_t>(1, kMinTaskMacs / (2 * kRows * n * K)); }

// x fp32 [n, K] -> bf16 [n, K], round to nearest even (K % 32 == 0).
void round_activations(const float* x, uint16_t* xb, int64_t n, int64_t K) { fastdecode::round_bf16_512(x, xb, n * K); }

// Each row's k largest outputs among the columns one thread has scanned, in column order, by
// top_k_row's insertion (kernels.h's top_insert), so that the threads' lists merged give its result.
struct RowTop {
  int64_t k = 0;
  std::vector<int64_t> count, idx;  // per row: entries so far; [row][k] columns
  std::vector<float> vals;          // [row][k]
  void reset(int64_t n, int64_t k_) {
    k = k_;
    count.assign(n, 0);
    idx.assign(n * k, -1);
    vals.assign(n * k, 0.0f);
  }
  void insert(int64_t t, float v, int64_t j) {
    fastdecode::top_insert(v, j, k, count[t], idx.data() + t * k, vals.data() + t * k);
  }
  // y[t][j0 .. j0 + 16): the lanes that may enter the list, in column order
  void scan16(int64_t t, const float* row, int64_t j0) {
    const __m512 v = _mm512_loadu_ps(row);
    __mmask16 m = count[t] < k ? _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q)
                               : _mm512_cmp_ps_mask(v, _mm512_set1_ps(vals[t * k + k - 1]), _CMP_GT_OQ);
    while (m) {
      const int b = __builtin_ctz(m);
      insert(t, row[b], j0 + b);
      m &= m - 1;
    }
  }
};

// G token groups (rows t0.. and t0 + 16..) x R row blocks (blk..): y's tiles, bias added after;
// `top` (or nullptr): the tiles' rows scanned into it while in L1.
template <int G, int R>
void pass(const uint16_t* xb, const uint16_t* wp, float* y, const float* bias, const float* residual, int64_t K,
          int64_t N, int64_t n, int64_t t0, int64_t blk, RowTop* top) {
  _tile_zero(0);
  if constexpr (R > 1) _tile_zero(1);
  if constexpr (G > 1) _tile_zero(2);
  if constexpr (G > 1 && R > 1) _tile_zero(3);
  const uint16_t* a = xb + t0 * K;
  const uint16_t* b = wp + blk * K * kRows;  // block blk: K / 2 pairs x 16 rows x 2
  for (int64_t k = 0; k < K; k += kDepth) {
    _tile_loadd(4, a + k, K * 2);
    if constexpr (G > 1) _tile_loadd(5, a + kTokens * K + k, K * 2);
    _tile_loadd(6, b + k * kRows, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (G > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (R > 1) {
      _tile_loadd(7, b + K * kRows + k * kRows, 64);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (G > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  float* c = y + t0 * N + blk * kRows;
  _tile_stored(0, c, N * 4);
  if constexpr (R > 1) _tile_stored(1, c + kRows, N * 4);
  if constexpr (G > 1) _tile_stored(2, c + kTokens * N, N * 4);
  if constexpr (G > 1 && R > 1) _tile_stored(3, c + kTokens * N + kRows, N * 4);
  if (bias != nullptr || residual != nullptr) {  // y = (x W^T + bias) + residual, the tiles' rows still in L1
    const int64_t t1 = std::min(n, t0 + G * kTokens);
    for (int64_t t = t0; t < t1; ++t) {
      float* row = y + t * N + blk * kRows;
      for (int r = 0; r < R; ++r) {
        __m512 v = _mm512_loadu_ps(row + kRows * r);
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + blk * kRows + kRows * r));
        if (residual != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(residual + t * N + blk * kRows + kRows * r));
        _mm512_storeu_ps(row + kRows * r, v);
      }
    }
  }
  if (top != nullptr) {
    const int64_t t1 = std::min(n, t0 + G * kTokens);
    for (int64_t t = t0; t < t1; ++t)
      for (int r = 0; r < R; ++r) top->scan16(t, y + t * N + blk * kRows + kRows * r, blk * kRows + kRows * r);
  }
}

// Row blocks [2 u0, 2 u1) (pairs of blocks; the last may be one) for every token, two token
// groups a pass: each pair's weights are read from memory once and stay in L2 for the next groups.
void units(const uint16_t* xb, const uint16_t* wp, float* y, const float* bias, const float* residual, int64_t K,
           int64_t N, int64_t n, int64_t u0, int64_t u1, RowTop* top = nullptr) {
  const int64_t blocks = N / kRows;
  int configured = -1;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t blk = 2 * u;
    const bool two = blk + 1 < blocks;
    for (int64_t t0 = 0; t0 < n; t0 += 2 * kTokens) {
      const int m0 = int(std::min(kTokens, n - t0));
      const int m1 = int(std::clamp<int64_t>(n - t0 - kTokens, 1, kTokens));  // 1: unused
      if (m0 * 32 + m1 != configured) {
        load_config(m0, m1);  // per task too: other code on this thread (oneDNN) may set the tiles
        configured = m0 * 32 + m1;
      }
      const bool pair = n - t0 > kTokens;
      if (pair && two) pass<2, 2>(xb, wp, y, bias, residual, K, N, n, t0, blk, top);
      else if (pair) pass<2, 1>(xb, wp, y, bias, residual, K, N, n, t0, blk, top);
      else if (two) pass<1, 2>(xb, wp, y, bias, residual, K, N, n, t0, blk, top);
      else pass<1, 1>(xb, wp, y, bias, residual, K, N, n, t0, blk, top);
    }
  }
}

}  // namespace

namespace fastdecode {

void bf16_linear_amx(const float* x, const uint16_t* packed, const float* bias, const float* residual, float* y,
                     int64_t n, int64_t K, int64_t N) {
  at::Tensor xb_t = at::empty({n * K}, at::TensorOptions().dtype(at::kBFloat16));
  auto* xb = reinterpret_cast<uint16_t*>(xb_t.data_ptr());
  round_activations(x, xb, n, K);
  bf16_linear_amx_rounded(xb, packed, bias, residual, y, n, K, N);
}

// The rows' preparation and the products in one OpenMP region: the threads prepare rows t by turns
// (a static split), meet at the loop's barrier, then take the row blocks as at::parallel_for
// would split them. Why: a decoder layer's RMS norm ran on one thread while the other waited,
// reading rows the other had written (~0.13 ms of a 9-token forward in perf, about a tenth of
// what its 8 extra rows cost); here each thread norms half the rows, and the region it used to
// wait in is the one the products run in anyway.
void bf16_linear_amx_prepared(const std::function<void(int64_t, uint16_t*)>& prepare, const uint16_t* packed,
                              const float* bias, const float* residual, float* y, int64_t n, int64_t K, int64_t N) {
  at::Tensor xb_t = at::empty({n * K}, at::TensorOptions().dtype(at::kBFloat16));
  auto* xb = reinterpret_cast<uint16_t*>(xb_t.data_ptr());
  const int64_t count = unit_count(N), grain = unit_grain(n, K);
  [[maybe_unused]] const int64_t threads = std::min<int64_t>(at::get_num_threads(), (count + grain - 1) / grain);
#ifdef _OPENMP
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < n; ++t) prepare(t, xb + t * K);
      // the loop's barrier: every row is ready
      const int64_t parts = omp_get_num_threads(), chunk = (count + parts - 1) / parts;
      const int64_t u0 = omp_get_thread_num() * chunk, u1 = std::min(count, u0 + chunk);
      if (u0 < u1) units(xb, packed, y, bias, residual, K, N, n, u0, u1);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) prepare(t, xb + t * K);  // one thread, or a build without OpenMP
  at::parallel_for(0, count, grain, [&](int64_t u0, int64_t u1) { units(xb, packed, y, bias, residual, K, N, n, u0, u1); });
}

// bf16_linear_amx without bias or residual, plus each row's k largest outputs (top_idx, top_val
// [n, k]: value descending, the lower column first among equals, NaNs never taken; -1 and 0 past
// a row's non-NaN values): what top_k_rows (sampling.cpp) gives for y, scanned by each thread over
// its own tiles while they are in L1 and merged after. Why: a tree step's LM head rows (~1.8 MB
// for 9 rows) were read once more, across both cores' caches, for the drafters' top 8 (~70 us a
// step in place).
void bf16_linear_amx_topk(const float* x, const uint16_t* packed, float* y, int64_t n, int64_t K, int64_t N, int64_t k,
                          int64_t* top_idx, float* top_val) {
  at::Tensor xb_t = at::empty({n * K}, at::TensorOptions().dtype(at::kBFloat16));
  auto* xb = reinterpret_cast<uint16_t*>(xb_t.data_ptr());
  round_activations(x, xb, n, K);
  const int64_t count = unit_count(N), grain = unit_grain(n, K);
  std::vector<RowTop> tops(at::get_num_threads());
  std::vector<int64_t> firsts(tops.size(), -1);  // each thread's first unit: the lists' column order
  for (RowTop& top : tops) top.reset(n, k);
  at::parallel_for(0, count, grain, [&](int64_t u0, int64_t u1) {
    const int64_t tid = at::get_thread_num();
    firsts[tid] = u0;
    units(xb, packed, y, nullptr, nullptr, K, N, n, u0, u1, &tops[tid]);
  });
  std::vector<size_t> order;  // the threads that scanned, in column order
  for (size_t i = 0; i < tops.size(); ++i)
    if (firsts[i] >= 0) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return firsts[a] < firsts[b]; });
  RowTop merged;
  merged.reset(n, k);
  for (int64_t t = 0; t < n; ++t) {
    for (size_t i : order)  // columns ascending across the lists: the same insertions as one scan
      for (int64_t e = 0; e < tops[i].count[t]; ++e) merged.insert(t, tops[i].vals[t * k + e], tops[i].idx[t * k + e]);
    std::copy(merged.idx.begin() + t * k, merged.idx.begin() + (t + 1) * k, top_idx + t * k);
    std::copy(merged.vals.begin() + t * k, merged.vals.begin() + (t + 1) * k, top_val + t * k);
  }
}

void bf16_linear_amx_rounded(const uint16_t* xb, const uint16_t* packed, const float* bias, const float* residual,
                             float* y, int64_t n, int64_t K, int64_t N) {
  const int64_t count = unit_count(N), grain = unit_grain(n, K);
  at::parallel_for(0, count, grain, [&](int64_t u0, int64_t u1) { units(xb, packed, y, bias, residual, K, N, n, u0, u1); });
}

}  // namespace fastdecode

#pragma GCC pop_options

namespace {

bool request_amx() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

namespace fastdecode {

bool has_amx_bf16() {
  static const bool yes = [] {
    const char* env = std::getenv("FASTDECODE_NO_AMX");
    if (env != nullptr && env[0] != '\0' && env[0] != '0') return false;
    if (!has_avx512bf16()) return false;  // FASTDECODE_NO_AVX512 turns AMX off too
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;  // CPUID.7.0:EDX AMX-TILE, AMX-BF16
    return tile && bf16 && request_amx();  // the kernel must also let this process use the tiles
  }();
  return yes;
}

}  // namespace fastdecode
