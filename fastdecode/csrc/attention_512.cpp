// attention's core on CPUs with AVX512 (see attention.cpp for the op, its checks and the KV
// writes, which run before this): softmax(q k^T / sqrt(hd) + mask) v for n queries.
//
// Why: the AVX2 core spent most of a tree forward's attention on horizontal sums (one per
// score) and 8-lane arithmetic; over a 1,024-token context a 16-token tree's attention cost more
// than its matmuls. Here a score's 16 lanes of partial sums are reduced 16 scores at a time in
// one transposing tree (3 operations a score instead of ~6), and every vector is 16 wide; over a
// bf16 cache, whose layouts make a score one lane, there is nothing to reduce.
//
// A query's result is a function of its own visible slots' contents, in position order, whatever
// the tiling, n or the thread count; and masked or extra slots add exact zeros, so a token gets
// the same bits in a draft tree (ancestors spread among masked slots) as in a one-token forward
// (the same ancestors compacted). Per query, fixed orders throughout:
//   score_j = (tree-sum of 16 lanes, lane l = sum over c of q[16c + l] * k_j[16c + l] by fma in
//             c order) * scale; over a bf16 cache (CPUs with AVX512-BF16 only) q is rounded to
//             bf16 and score_j = (sum over feature pairs w in order of the products of features
//             2w + 1, then 2w, by vdpbf16ps) * scale, keys stored so that a vector holds one pair
//             of 16 slots (scores_bf16): no horizontal sums;
//   p_j     = e^(score_j - max), exactly 0 where masked (over a bf16 cache rounded to bf16); the
//             sum of p: an fp32 cache in slot order (row_sums), a bf16 cache in 16 lanes by
//             position (position_sum: no chain of scalar adds);
//   out     = fp32 cache: over j in slot order, out = fma(p_j / sum, v_j, out), lane by lane
//             (masked slots included: their p is 0, which leaves out as it was); bf16 cache:
//             over position pairs (2m, 2m + 1) in order, out += their two p v products by
//             vdpbf16ps, values stored in slot pairs, then out / sum (pair_values).
// On CPUs with AMX-BF16 (has_amx_bf16) a bf16 cache's scores are TDPBF16PS products of the
// bf16 queries and the key blocks as they lie (scores_amx), and a query's weighted sums over
// positions below (its position + 1 - 64) rounded down to 32 start on the tile unit
// (amx_prefix): other orders, as fixed, and as blind to n, the tiling and the threads.
// The functions are compiled for AVX512 by the pragma below; attention() calls them only when
// the CPU has AVX512F/BW/VL (has_avx512).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <new>
#include <vector>

#include <ATen/Parallel.h>

#include "kernels.h"

#pragma GCC push_options
// avx512bf16 is for the bf16 cache's path only: the fp32 instantiation uses no BF16 instruction
// (this file has no __bf16 type for the compiler to convert to, and the BF16 intrinsics are all
// behind `if constexpr (kBf16)` or in functions only it calls), so it runs on AVX512 CPUs without BF16.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")

#include "avx512.h"

namespace {

constexpr int64_t kBlock = 64;  // slots per cache block (16 KB of keys at hd 64): L1-sized

// Buffers the tile unit loads or stores (queries, scores, probabilities, sums) start on a cache
// line, and their rows are whole lines apart: a tile row that straddles two lines made TDPBF16PS
// loops ~3.4x slower in an ad-hoc loop on this Xeon (21 against 6.2 ns a product, rows 16 or 32
// bytes off a line), where std::vector's 16-byte alignment had left them. Here it gained less:
// 30 layers' attention of 13 tree tokens over 512 cached 2.31-2.41 -> 2.24-2.31 ms (2 runs each).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
};
template <typename T>
using LineVector = std::vector<T, LineAligned<T>>;

// exp8 (kernels.h) on 16 lanes: the same steps, constants and clamps.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// r[s] = the sum of v[s]'s 16 lanes for s = 0..15, each by the same tree: within each 128-bit
// quarter (l0 + l2) + (l1 + l3), then quarters (q0 + q1) + (q2 + q3). Lanes of different
// vectors never mix, so r[s] depends on v[s] alone.
inline __m512 reduce16(__m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per quarter: (a0 + a2, b0 + b2, a1 + a3, b1 + b3)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per quarter: the quarter's sum of a, b, c, d
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // (q0 + q1) and (q2 + q3) of 8 vectors
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// dst[0..16) = scores of query q against the 16 keys at k (rows of 16 * C floats; a bf16 cache
// is scored by scores_bf16 below).
template <int C>
inline void scores16(const float* q, const float* k, float scale, float* dst) {
  __m512 qv[C], acc[16];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
#pragma GCC unroll 16
  for (int s = 0; s < 16; ++s) {
    acc[s] = _mm512_mul_ps(qv[0], load16(k + s * 16 * C));  // = fma(q, k, 0)
#pragma GCC unroll 8
    for (int c = 1; c < C; ++c) acc[s] = _mm512_fmadd_ps(qv[c], load16(k + s * 16 * C + 16 * c), acc[s]);
  }
  _mm512_storeu_ps(dst, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
}

// Scores of M queries (bf16-rounded, 32-bit words of feature pairs, stride qs) against NB blocks of
// 16 keys of a bf16 cache (kernels.h's layout, from block `kb`), into score rows of stride `stride`
// from column 0: for each pair w in order, one vdpbf16ps of the block's vector for w with the
// query's pair w broadcast adds to each slot's lane the products of features 2w + 1, then 2w
// (exact: a bf16 times a bf16 fits fp32), rounded to nearest even. No horizontal sums: a lane is
// a slot. Each score depends on its query and its key alone.
template <int P, int M, int NB>
inline void scores_bf16(const uint16_t* q, int64_t qs, const uint16_t* kb, float scale, float* dst, int64_t stride) {
  constexpr int64_t block = 2 * fastdecode::kKeyBlock * P;  // bf16 per block of 16 keys
  __m512 acc[M][NB];
#pragma GCC unroll 4
  for (int a = 0; a < M; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[a][b] = _mm512_setzero_ps();
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(q);
#pragma GCC unroll 8
  for (int w = 0; w < P; ++w) {
    __m512bh kv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) kv[b] = (__m512bh)_mm512_loadu_si512(kb + b * block + 32 * w);
#pragma GCC unroll 4
    for (int a = 0; a < M; ++a) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[a * qs / 2 + w]));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], kv[b], qv);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int a = 0; a < M; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(dst + a * stride + 16 * b, _mm512_mul_ps(acc[a][b], sc));
}

// Scores of queries [0, nq) (those that see past column j0: `visible`) against slots [j0, j1) of
// a bf16 cache, in tiles of up to 3 queries x 4 blocks.
template <int P>
void scores_bf16_range(const uint16_t* q, int64_t qs, const int64_t* visible, int64_t nq, const uint16_t* K,
                       int64_t j0, int64_t j1, float scale, float* score, int64_t stride) {
  constexpr int64_t block = 2 * fastdecode::kKeyBlock * P;
  for (int64_t a = 0; a < nq;) {
    int64_t m = 0;  // the next run of up to 3 queries that see this range
    while (a < nq && visible[a] <= j0) ++a;
    while (a + m < nq && m < 3 && visible[a + m] > j0) ++m;
    if (m == 0) break;
    const uint16_t* qa = q + a * qs;
    float* sa = score + a * stride;
    for (int64_t j = j0; j < j1;) {
      const uint16_t* kb = K + j / 16 * block;
      const int64_t blocks = (j1 - j + 15) / 16;
#define FD_SCORES(MM)                                                                                   \
  if (blocks >= 4) scores_bf16<P, MM, 4>(qa, qs, kb, scale, sa + j, stride), j += 64;                   \
  else scores_bf16<P, MM, 1>(qa, qs, kb, scale, sa + j, stride), j += 16;
      if (m == 3) { FD_SCORES(3) } else if (m == 2) { FD_SCORES(2) } else { FD_SCORES(1) }
#undef FD_SCORES
    }
    a += m;
  }
}

// scores_bf16_range on CPUs with AMX-BF16 (has_amx_bf16): the same scores of queries [0, nq)
// against slots [0, last), by the tile unit. A key block's pairs are already a B tile (16 pairs x
// 16 slots x 2 bf16, 1 KB in one piece); up to 16 bf16 queries are the A tile; C is their 16
// slots' scores, left unscaled: the softmax's first pass multiplies by scale (one pass over the
// scores fewer; ~0.1 ms of a 13-token forward's attention here). Each score is (the sum of its
// pairs 0-15, then + pairs 16-31, ... by TDPBF16PS) * scale: a function of its query and key
// alone, whichever tile row, column or block they are in (tests: tree rows equal one-token rows
// bit for bit). Slots past a query's visible ones are scored too and masked after, as in the
// range version.
template <int P>
void scores_amx(const uint16_t* q, int64_t qs, int64_t nq, const uint16_t* K, int64_t last, float* score,
                int64_t stride) {
  constexpr int64_t block = 2 * fastdecode::kKeyBlock * P;
  constexpr int kPairs = P < 16 ? P : 16;  // pairs a tile (hd 16: 8)
  const int64_t blocks = (last + 15) / 16;
  for (int64_t a0 = 0; a0 < nq; a0 += 16) {
    const int m = int(std::min<int64_t>(16, nq - a0));
    fastdecode::AmxTileConfig cfg;
    cfg.rows[0] = uint8_t(m), cfg.colsb[0] = 64;           // C: m queries x 16 slots, fp32
    cfg.rows[4] = uint8_t(m), cfg.colsb[4] = 4 * kPairs;   // A: m queries x kPairs pairs
    cfg.rows[5] = kPairs, cfg.colsb[5] = 64;               // B: kPairs pairs x 16 slots x 2
    _tile_loadconfig(&cfg);  // per call: the linears' tasks on this thread set their own
    const uint16_t* qa = q + a0 * qs;
    float* sa = score + a0 * stride;
    for (int64_t b = 0; b < blocks; ++b) {
      _tile_zero(0);
      for (int t = 0; t < P / kPairs; ++t) {
        _tile_loadd(4, qa + 2 * kPairs * t, qs * 2);
        _tile_loadd(5, K + b * block + 32 * kPairs * t, 64);
        _tile_dpbf16ps(0, 4, 5);
      }
      _tile_stored(0, sa + 16 * b, stride * 4);
    }
  }
}

// q [hd] -> bf16, rounded to nearest even, into W words of 32 (the last half-word zeros when hd = 16).
template <int C>
inline void round_query(const float* q, uint16_t* dst) {
  for (int w = 0; w < (C + 1) / 2; ++w) {
    const __m512 lo = _mm512_loadu_ps(q + 32 * w), hi = C == 1 ? _mm512_setzero_ps() : _mm512_loadu_ps(q + 32 * w + 16);
    _mm512_storeu_si512(dst + 32 * w, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// out[b] = sum over j < len of p[b][j] * v_j (the rows of p already divided by their sums),
// for Q queries side by side sharing each loaded row of V.
template <int C, int Q, typename T>
inline void weighted_sums(const float* const* p, int64_t len, const T* V, float* const* out) {
  __m512 acc[Q][C];
  for (int b = 0; b < Q; ++b)
    for (int c = 0; c < C; ++c) acc[b][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = load16(V + j * 16 * C + 16 * c);
    for (int b = 0; b < Q; ++b) {
      const __m512 pb = _mm512_set1_ps(p[b][j]);
      for (int c = 0; c < C; ++c) acc[b][c] = _mm512_fmadd_ps(pb, v[c], acc[b][c]);
    }
  }
  for (int b = 0; b < Q; ++b)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[b] + 16 * c, acc[b][c]);
}

// Values of a bf16 cache lie in slot pairs (kernels.h, value_offset): pair m holds, for each
// feature, the bf16 of slots 2m and 2m + 1 side by side, so one vector is 16 features of both.
// A query's probabilities are rounded to bf16 and paired by position the same way, and one
// vdpbf16ps adds a pair's two products to 16 features at once.
//
// The pairs a query sums, in order: its stored pairs (both slots below `base`, read in place),
// then its gathered pairs: the visible slots from `base` on, paired in order (the last with a
// zero when they are odd). Under a tree mask base is the cache length rounded down to even and
// the gathered slots are the prefix's odd last slot and the query's visible new slots, in slot
// order, which is position order (parents precede children); causal, base is the query's own
// slot count rounded down to even. Either way the pairs are positions (2m, 2m + 1), so a token
// sums the same pairs in the same order in a tree as in a one-token forward.

// Slot x's features [16c, 16c + 16) in the low halves of 16 words (y = -1: zeros above), slot
// y's in the high halves.
inline __m512i value_pair(const uint16_t* V, int64_t hd, int64_t x, int64_t y, int c) {
  const __m512i vx = _mm512_loadu_si512(V + fastdecode::value_offset(x, 16 * c, hd) - x % 2);
  __m512i r = x % 2 ? _mm512_srli_epi32(vx, 16) : _mm512_and_si512(vx, _mm512_set1_epi32(0xFFFF));
  if (y >= 0) {
    const __m512i vy = _mm512_loadu_si512(V + fastdecode::value_offset(y, 16 * c, hd) - y % 2);
    r = _mm512_or_si512(r, y % 2 ? _mm512_and_si512(vy, _mm512_set1_epi32(int(0xFFFF0000u))) : _mm512_slli_epi32(vy, 16));
  }
  return r;
}

// acc[b] += the stored pairs [m0, m1) of Q queries (their bf16 probability words pw[b]), sharing
// each loaded pair of value rows.
template <int C, int Q>
inline void pair_sums(const uint32_t* const* pw, int64_t m0, int64_t m1, const uint16_t* V, float* acc) {
  __m512 a[Q][C];
  for (int b = 0; b < Q; ++b)
    for (int c = 0; c < C; ++c) a[b][c] = _mm512_loadu_ps(acc + 16 * (b * C + c));
  for (int64_t m = m0; m < m1; ++m) {
    __m512bh v[C];
    for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_loadu_si512(V + m * 32 * C + 32 * c);
    for (int b = 0; b < Q; ++b) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pw[b][m]));
      for (int c = 0; c < C; ++c) a[b][c] = _mm512_dpbf16_ps(a[b][c], v[c], pb);
    }
  }
  for (int b = 0; b < Q; ++b)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * (b * C + c), a[b][c]);
}

// On CPUs with AMX-BF16 a query's first pairs go to the tile unit: slots [0, E) with
// E = (its position + 1 - kWindow) rounded down to a multiple of 32, a function of the token's
// position alone, so the same in a tree (where E <= the cache length, as a tree row sees at most
// kWindow new slots: the engine's trees have at most 63 nodes) as in a one-token forward. Each 32
// slots are one TDPBF16PS of the query's bf16 probabilities (A) and the values' 16 slot pairs x
// 16 features (B, rows 4 hd bytes apart in the pair layout); the vdpbf16ps pairs then go on from
// pair E / 2 into the same sums. A query whose E is below a chunk gets a zero row there (exact:
// its sums gain +0). Not for head_dim 128 (C tiles for 8 x 16 features do not fit).
constexpr int64_t kWindow = 64;

inline int64_t amx_prefix_end(int64_t position) { return std::max<int64_t>(0, position + 1 - kWindow) & ~int64_t(31); }

// acc[a][0..hd) = the sums over slots [0, ends[a]) of queries [0, nq) (probabilities pb, stride).
template <int C>
void amx_prefix(const uint16_t* pb, int64_t stride, const int64_t* ends, int64_t nq, const uint16_t* V, float* acc) {
  constexpr int64_t hd = 16 * C;
  for (int64_t a0 = 0; a0 < nq; a0 += 16) {
    const int m = int(std::min<int64_t>(16, nq - a0));
    int64_t end = 0, common = INT64_MAX;
    for (int b = 0; b < m; ++b) end = std::max(end, ends[a0 + b]), common = std::min(common, ends[a0 + b]);
    fastdecode::AmxTileConfig cfg;
    for (int c = 0; c < C; ++c) cfg.rows[c] = uint8_t(m), cfg.colsb[c] = 64;  // C: m queries x 16 features
    cfg.rows[4] = uint8_t(m), cfg.colsb[4] = 64;                                // A: m queries x 32 slots
    cfg.rows[5] = 16, cfg.colsb[5] = 64;                                        // B: 16 slot pairs x 16 features x 2
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    if constexpr (C > 1) _tile_zero(1);
    if constexpr (C > 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    alignas(64) uint16_t part[16 * 32];
    for (int64_t s0 = 0; s0 < end; s0 += 32) {
      if (s0 < common) {
        _tile_loadd(4, pb + a0 * stride + s0, stride * 2);
      } else {  // some rows end before this chunk: zeros there
        for (int b = 0; b < m; ++b) {
          if (s0 < ends[a0 + b]) std::memcpy(part + 32 * b, pb + (a0 + b) * stride + s0, 64);
          else std::memset(part + 32 * b, 0, 64);
        }
        _tile_loadd(4, part, 64);
      }
      const uint16_t* vb = V + s0 / 2 * 2 * hd;
      _tile_loadd(5, vb, hd * 4);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (C > 1) {
        _tile_loadd(5, vb + 32, hd * 4);
        _tile_dpbf16ps(1, 4, 5);
      }
      if constexpr (C > 2) {
        _tile_loadd(5, vb + 64, hd * 4);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(5, vb + 96, hd * 4);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    float* out = acc + a0 * hd;
    _tile_stored(0, out, hd * 4);
    if constexpr (C > 1) _tile_stored(1, out + 16, hd * 4);
    if constexpr (C > 2) {
      _tile_stored(2, out + 32, hd * 4);
      _tile_stored(3, out + 48, hd * 4);
    }
  }
}

// out[a] = (the weighted sum of values of query a by its bf16 probabilities pb, in pairs as
// described above) / sums[a], for the nq queries of a task (t0, nt: its tokens, as in task_queries).
template <int C>
void pair_values(const uint16_t* pb, int64_t stride, const float* sums, const int64_t* visible, const bool* mask,
                 int64_t t0, int64_t nt, int64_t nq, int64_t length, int64_t total, const uint16_t* V, int64_t* base,
                 int64_t* gathered, int64_t* ngathered, int64_t gstride, float* acc, float* const* outs, bool amx,
                 int64_t* ends) {
  constexpr int64_t hd = 16 * C;
  constexpr int Q = C <= 2 ? 8 : C == 4 ? 6 : 2;  // Q x C accumulators, C values, 1 broadcast
  for (int64_t a = 0; a < nq; ++a) {
    int64_t* g = gathered + a * gstride;
    int64_t k = 0;
    if (mask != nullptr) {
      base[a] = length & ~int64_t(1);
      if (length % 2) g[k++] = length - 1;
      const bool* mt = mask + (t0 + a % nt) * total;
      int64_t seen = 0;  // visible new slots: the token's position is length + seen - 1
      for (int64_t j = length; j < total; ++j)
        if (mt[j]) g[k++] = j, ++seen;
      ends[a] = std::min(amx_prefix_end(length + seen - 1), length & ~int64_t(31));  // min: > 63 nodes only
    } else {
      base[a] = visible[a] & ~int64_t(1);
      if (visible[a] % 2) g[k++] = visible[a] - 1;
      ends[a] = amx_prefix_end(visible[a] - 1);
    }
    if (!amx || C > 4) ends[a] = 0;
    ngathered[a] = k;
  }
  if constexpr (C <= 4) {
    if (amx) amx_prefix<C>(pb, stride, ends, nq, V, acc);
    else std::fill(acc, acc + nq * hd, 0.0f);
  } else {
    std::fill(acc, acc + nq * hd, 0.0f);
  }
  const uint32_t* pw[Q];
  for (int64_t a0 = 0; a0 < nq; a0 += Q) {  // stored pairs: each query's from ends / 2 to base / 2
    const int64_t m = std::min<int64_t>(Q, nq - a0);
    int64_t lo = 0, hi = base[a0];  // the pairs all m queries sum together: [lo, hi)
    for (int64_t b = 0; b < m; ++b) {
      pw[b] = reinterpret_cast<const uint32_t*>(pb + (a0 + b) * stride);
      lo = std::max(lo, ends[a0 + b]);
      hi = std::min(hi, base[a0 + b]);
    }
    float* ac = acc + a0 * hd;
    hi = std::max(hi, lo);
    for (int64_t b = 0; b < m; ++b) {  // each query's own pairs before the shared ones
      const uint32_t* one[1] = {pw[b]};
      pair_sums<C, 1>(one, ends[a0 + b] / 2, std::min(lo, base[a0 + b]) / 2, V, ac + b * hd);
    }
    switch (m) {
      case 1: pair_sums<C, 1>(pw, lo / 2, hi / 2, V, ac); break;
      case 2: pair_sums<C, (Q >= 2 ? 2 : 1)>(pw, lo / 2, hi / 2, V, ac); break;
      case 3: pair_sums<C, (Q >= 3 ? 3 : 1)>(pw, lo / 2, hi / 2, V, ac); break;
      case 4: pair_sums<C, (Q >= 4 ? 4 : 1)>(pw, lo / 2, hi / 2, V, ac); break;
      case 5: pair_sums<C, (Q >= 5 ? 5 : 1)>(pw, lo / 2, hi / 2, V, ac); break;
      case 6: pair_sums<C, (Q >= 6 ? 6 : 1)>(pw, lo / 2, hi / 2, V, ac); break;
      case 7: pair_sums<C, (Q >= 7 ? 7 : 1)>(pw, lo / 2, hi / 2, V, ac); break;
      default: pair_sums<C, Q>(pw, lo / 2, hi / 2, V, ac); break;
    }
    for (int64_t b = 0; b < m; ++b) {  // each query's own stored pairs past the shared ones
      const uint32_t* one[1] = {pw[b]};
      pair_sums<C, 1>(one, std::max(hi, std::min(lo, base[a0 + b])) / 2, base[a0 + b] / 2, V, ac + b * hd);
    }
  }
  for (int64_t a = 0; a < nq; ++a) {  // gathered pairs, then / sum
    const int64_t* g = gathered + a * gstride;
    const uint16_t* p = pb + a * stride;
    __m512 ac[C];
    for (int c = 0; c < C; ++c) ac[c] = _mm512_loadu_ps(acc + a * hd + 16 * c);
    for (int64_t i = 0; i < ngathered[a]; i += 2) {
      const int64_t x = g[i], y = i + 1 < ngathered[a] ? g[i + 1] : -1;
      const uint32_t word = uint32_t(p[x]) | (y >= 0 ? uint32_t(p[y]) << 16 : 0u);
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
      for (int c = 0; c < C; ++c) ac[c] = _mm512_dpbf16_ps(ac[c], (__m512bh)value_pair(V, hd, x, y, c), pv);
    }
    const __m512 inv = _mm512_set1_ps(sums[a] > 0.0f ? 1.0f / sums[a] : 0.0f);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(outs[a] + 16 * c, _mm512_mul_ps(ac[c], inv));
  }
}

// The sum of a query's softmax numerators over its visible positions 0, 1, ..., in one order
// that depends on the positions alone: lane l of `lanes` holds the sum, block by block, of
// positions 16b + l below some multiple of 16, j0; rest[0..k) are the numerators of positions
// j0, j0 + 1, ...; rest's whole blocks of 16 go on into the lanes, the lanes are summed by a
// fixed tree (hsum16), and the last k % 16 are added one at a time. A token's sum is
// the same whatever j0 was (a multiple of 16 at most its position count): in a tree forward j0
// is the cache length rounded down, in a one-token forward its own slot count rounded down.
inline float position_sum(__m512 lanes, const float* rest, int64_t k) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) lanes = _mm512_add_ps(lanes, _mm512_loadu_ps(rest + i));
  float sum = fastdecode::hsum16(lanes);
  for (; i < k; ++i) sum += rest[i];
  return sum;
}

template <int C, typename T>
void core(const float* src, int64_t width, const float* rot, const T* K, const T* V, int64_t head_stride,
          const bool* mask, float* out, int64_t n, int64_t length, int64_t heads, int64_t kv_heads,
          uint16_t* out_bf16) {
  constexpr int64_t hd = 16 * C;
  constexpr int Q = C <= 4 ? 4 : 2;  // queries per weighted_sums call: 4 x C accumulators
  const int64_t total = length + n, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool amx = std::is_same_v<T, uint16_t> && fastdecode::has_amx_bf16();
  // A task: the heads of one KV group x a tile of up to 4 tokens (with AMX, as many as one tile
  // of 16 query rows holds, at least 4: the tile unit's products cost the same for 1 to 16 rows).
  // Its queries go over the group's keys block by block and share each loaded row of values. The
  // n tokens are cut into tiles of near-equal size, as few as can be but enough that the tasks
  // (groups x tiles) split evenly over the threads: 3 groups of 4 tokens on 2 threads as 6 tasks
  // of 2 tokens, not 3 tasks of which one thread would take two. With AMX and SmolLM2's 3 heads a
  // group, 9 tokens now make 6 tasks of 4-5 tokens, not 12 of 2-3: 30 layers' attention over 400
  // cached 0.99-1.03 -> 0.86-0.94 ms (scripts/forward_cost.py --attention, builds alternated).
  const int64_t hp = group, threads = at::get_num_threads();
  const int64_t tile_tokens = amx ? std::max<int64_t>(4, 16 / hp) : 4;
  int64_t tiles = (n + tile_tokens - 1) / tile_tokens;
  for (int64_t t = tiles; t <= std::min(n, 2 * tiles); ++t)
    if (kv_heads * t % threads == 0) {
      tiles = t;
      break;
    }
  const int64_t tasks = kv_heads * tiles, nq_max = hp * ((n + tiles - 1) / tiles);
  const int64_t stride = (total + 15) / 16 * 16;  // a query's score row
  const int64_t pstride = (total + 31) / 32 * 32;  // a query's bf16 probabilities: whole cache lines
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(total * hd / 16 * nq_max, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
    constexpr int64_t qs = (C + 1) / 2 * 32;  // a bf16 query's stride
    std::vector<float> q(nq_max * hd), sums(nq_max);
    LineVector<float> score(nq_max * stride);  // rows of 64-byte multiples
    LineVector<uint16_t> qb(kBf16 ? nq_max * qs : 0);  // qs: 32 or 64 bf16, whole lines
    LineVector<uint16_t> pb(kBf16 ? nq_max * pstride : 0);  // bf16 probabilities (a bf16 cache)
    std::vector<int64_t> base(nq_max), ends(nq_max), gathered(kBf16 ? nq_max * (n + 2) : 0), ngathered(nq_max);
    LineVector<float> acc(kBf16 ? nq_max * hd : 0);
    std::vector<T> tail(kBf16 ? 0 : 16 * hd);  // an fp32 cache's last, partial group of keys
    std::vector<float> rest(kBf16 ? n + 16 : 0);  // a query's last numerators in position order (bf16 cache)
    std::vector<int64_t> visible(nq_max);
    std::vector<const float*> prow(nq_max);
    std::vector<float*> outs(nq_max);
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h0 = i / tiles * hp, t0 = i % tiles * n / tiles, nt = (i % tiles + 1) * n / tiles - t0, nq = hp * nt;
      const T* Kg = K + h0 / group * head_stride;
      const T* Vg = V + h0 / group * head_stride;
      const int64_t last = fastdecode::task_queries(src, width, rot, out, heads, hd, h0, t0, nt, nq, length, total,
                                                    mask != nullptr, q.data(), visible.data(), outs.data());
      if constexpr (kBf16)
        for (int64_t a = 0; a < nq; ++a) round_query<C>(q.data() + a * hd, qb.data() + a * qs);
      // Scores. A bf16 cache: its 16-slot key blocks are whole (the cache's slots are a multiple
      // of 16), and scores past `total` are discarded with the masked ones below.
      if constexpr (kBf16) {
        if (amx) scores_amx<8 * C>(qb.data(), qs, nq, Kg, last, score.data(), stride);  // unscaled
        else for (int64_t j0 = 0; j0 < last; j0 += kBlock)
          scores_bf16_range<8 * C>(qb.data(), qs, visible.data(), nq, Kg, j0, std::min(j0 + kBlock, last), scale,
                                   score.data(), stride);
      } else {
        // one 16-slot group at a time; the last group's missing keys read as zeros
        for (int64_t j0 = 0; j0 < last; j0 += kBlock)
          for (int64_t j = j0; j < std::min(j0 + kBlock, last); j += 16) {
            const T* kj = Kg + j * hd;
            if (j + 16 > total) {
              std::fill(tail.begin(), tail.end(), T(0));
              std::memcpy(tail.data(), kj, (total - j) * hd * sizeof(T));
              kj = tail.data();
            }
            for (int64_t a = 0; a < nq; ++a)
              if (j < visible[a]) scores16<C>(q.data() + a * hd, kj, scale, score.data() + a * stride + j);
          }
      }
      // Softmax numerators: masked slots and slots past a query's end become exact zeros.
      for (int64_t a = 0; a < nq; ++a) {
        float* sa = score.data() + a * stride;
        const int64_t vis = visible[a];
        const bool* mt = mask != nullptr ? mask + (t0 + a % nt) * total : nullptr;
        __m512 vmx = _mm512_set1_ps(ninf);
        const __m512 sc = _mm512_set1_ps(scale);
        for (int64_t j = 0; j < stride; j += 16) {
          __mmask16 keep = j + 16 <= vis ? __mmask16(0xFFFF) : j < vis ? __mmask16((1u << (vis - j)) - 1) : __mmask16(0);
          if (mt != nullptr && keep != 0)
            keep &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(keep, mt + j), _mm_set1_epi8(1));
          __m512 s = _mm512_loadu_ps(sa + j);
          if (amx) {  // scores_amx leaves the scale to this pass: one pass over the scores fewer
            s = _mm512_mul_ps(s, sc);
            if (keep == __mmask16(0xFFFF)) _mm512_storeu_ps(sa + j, s);
          }
          if (keep != __mmask16(0xFFFF)) {
            s = _mm512_mask_blend_ps(keep, _mm512_set1_ps(ninf), s);
            _mm512_storeu_ps(sa + j, s);
          }
          vmx = _mm512_max_ps(vmx, s);
        }
        const float mx = _mm512_reduce_max_ps(vmx);  // a max is exact in any order
        const __m512 vm = _mm512_set1_ps(mx == ninf ? 0.0f : mx);
        if constexpr (kBf16) {
          // p rounded to bf16 once: the sum and the weighted sums use the same p. The sum runs
          // over the query's visible positions (position_sum); below j0 every slot is the
          // position of its index, so those blocks go straight to the lanes.
          const int64_t j0 = (mask != nullptr ? length : vis) & ~int64_t(15);
          __m512 lanes = _mm512_setzero_ps();
          for (int64_t j = 0; j < stride; j += 16) {
            const __m512 s = _mm512_loadu_ps(sa + j);
            const __mmask16 live = _mm512_cmp_ps_mask(s, _mm512_set1_ps(ninf), _CMP_NEQ_OQ);
            const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, vm))));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb.data() + a * pstride + j), h);
            const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            if (j < j0) lanes = _mm512_add_ps(lanes, e);
            else _mm512_storeu_ps(sa + j, e);
          }
          // the rest in position order: slots [j0, length) and then the visible new slots
          // (a tree's ancestors and the token itself, positions length, length + 1, ...), or
          // slots [j0, vis) causally
          int64_t k = 0;
          for (int64_t j = j0; j < (mask != nullptr ? length : vis); ++j) rest[k++] = sa[j];
          if (mask != nullptr)
            for (int64_t j = length; j < total; ++j)
              if (mt[j]) rest[k++] = sa[j];
          sums[a] = position_sum(lanes, rest.data(), k);
          continue;
        }
        for (int64_t j = 0; j < stride; j += 16) {
          const __m512 s = _mm512_loadu_ps(sa + j);
          const __mmask16 live = _mm512_cmp_ps_mask(s, _mm512_set1_ps(ninf), _CMP_NEQ_OQ);
          _mm512_storeu_ps(sa + j, _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, vm))));
        }
        prow[a] = sa;
      }
      if constexpr (!kBf16) fastdecode::row_sums(prow.data(), visible.data(), nq, sums.data());
      if constexpr (kBf16) {
        pair_values<C>(pb.data(), pstride, sums.data(), visible.data(), mask, t0, nt, nq, length, total, Vg,
                       base.data(), gathered.data(), ngathered.data(), n + 2, acc.data(), outs.data(), amx,
                       ends.data());
        if (out_bf16 != nullptr)  // the task's rows, while they are in L1
          for (int64_t a = 0; a < nq; ++a) fastdecode::round_bf16_512(outs[a], out_bf16 + (outs[a] - out), hd);
        continue;
      }
      for (int64_t a = 0; a < nq; ++a) {  // p / sum (a row with nothing visible stays zeros)
        float* sa = score.data() + a * stride;
        const __m512 inv = _mm512_set1_ps(sums[a] > 0.0f ? 1.0f / sums[a] : 0.0f);
        for (int64_t j = 0; j < stride; j += 16) _mm512_storeu_ps(sa + j, _mm512_mul_ps(_mm512_loadu_ps(sa + j), inv));
      }
      // Weighted sums of values, Q queries at a time over the slots any of them sees (the
      // others' p is 0 there); rows < total are all written, so no read meets garbage.
      for (int64_t a = 0; a < nq; a += Q) {
        const int64_t m = std::min<int64_t>(Q, nq - a);
        const int64_t len = *std::max_element(visible.begin() + a, visible.begin() + a + m);
        const float* const* pa = prow.data() + a;
        float* const* oa = outs.data() + a;
        switch (m) {
          case 1: weighted_sums<C, 1, T>(pa, len, Vg, oa); break;
          case 2: weighted_sums<C, 2, T>(pa, len, Vg, oa); break;
          case 3: weighted_sums<C, (Q > 2 ? 3 : 1), T>(pa, len, Vg, oa); break;
          default: weighted_sums<C, Q, T>(pa, len, Vg, oa); break;
        }
      }
      if (out_bf16 != nullptr)
        for (int64_t a = 0; a < nq; ++a) fastdecode::round_bf16_512(outs[a], out_bf16 + (outs[a] - out), hd);
    }
  });
}

}  // namespace

namespace fastdecode {

template <typename T>
void attention_512(const float* qkv, int64_t width, const float* rot, const T* K, const T* V, int64_t head_stride,
                   const bool* mask, float* out, int64_t n, int64_t length, int64_t heads, int64_t kv_heads,
                   int64_t hd, uint16_t* out_bf16) {
  switch (hd) {
    case 16: return core<1, T>(qkv, width, rot, K, V, head_stride, mask, out, n, length, heads, kv_heads, out_bf16);
    case 32: return core<2, T>(qkv, width, rot, K, V, head_stride, mask, out, n, length, heads, kv_heads, out_bf16);
    case 64: return core<4, T>(qkv, width, rot, K, V, head_stride, mask, out, n, length, heads, kv_heads, out_bf16);
    case 128: return core<8, T>(qkv, width, rot, K, V, head_stride, mask, out, n, length, heads, kv_heads, out_bf16);
    default: TORCH_CHECK(false, "attention_512: head_dim ", hd, " is not 16, 32, 64 or 128");
  }
}

// Per token and KV head: the key rotated (rope), then 16 features at a time rounded by
// vcvtneps2bf16 (nearest even, as torch's .to(bfloat16)) and stored: a key's 8 feature pairs go to
// 8 words 16 words apart (one scatter), a value's 16 features to every other bf16 of a slot pair
// (one masked store). The scalar writes (a rounding and its offset arithmetic per element) ran on one
// thread while the other waited; with these the 30 layers' attention of 11 tree tokens over 512
// cached went 2.16-2.27 -> 2.04-2.06 ms (scripts/forward_cost.py --attention, old and new builds
// alternated, two runs each).
void write_entries_bf16(const float* qkv, int64_t width, const float* rot, uint16_t* K, uint16_t* V,
                        int64_t head_stride, int64_t n, int64_t length, int64_t heads, int64_t kv_heads, int64_t hd) {
  alignas(64) float k[128];
  const __m256i pairs = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);  // a key's pairs, in words
  for (int64_t t = 0; t < n; ++t) {
    const float* row = qkv + t * width;
    const int64_t slot = length + t;
    const __mmask32 half = slot % 2 ? __mmask32(0xAAAAAAAAu) : __mmask32(0x55555555u);
    for (int64_t g = 0; g < kv_heads; ++g) {
      fastdecode::rope(row + (heads + g) * hd, rot + t * hd, k, hd);
      const float* v = row + (heads + kv_heads + g) * hd;
      int* kw = reinterpret_cast<int*>(K + g * head_stride + slot / fastdecode::kKeyBlock * fastdecode::kKeyBlock * hd +
                                       slot % fastdecode::kKeyBlock * 2);
      uint16_t* vp = V + g * head_stride + slot / 2 * 2 * hd;
      for (int64_t c = 0; c < hd; c += 16) {
        const __m256i kb = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(k + c));
        _mm256_i32scatter_epi32(kw + c / 2 * fastdecode::kKeyBlock, pairs, kb, 4);
        __m512i vb = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + c)));
        if (slot % 2) vb = _mm512_slli_epi32(vb, 16);
        _mm512_mask_storeu_epi16(vp + 2 * c, half, vb);
      }
    }
  }
}

// silu_mul's elements [0, count) on 16 lanes, for layer.cpp (call only if has_avx512()): its 8-lane
// steps, exp16 being exp8 lane for lane and the division exact, so the same bits.
void silu_mul_512(const float* gate, const float* up, float* y, int64_t count) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i + 16 <= count; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, g))));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
  }
}

// x -> bf16, 16 at a time by vcvtneps2bf16: the AMX linear's activation rounding (its round_activations calls this).
void round_bf16_512(const float* x, uint16_t* xb, int64_t count) {
  for (int64_t i = 0; i < count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

template void attention_512(const float*, int64_t, const float*, const float*, const float*, int64_t, const bool*,
                            float*, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*);
template void attention_512(const float*, int64_t, const float*, const uint16_t*, const uint16_t*, int64_t,
                            const bool*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*);

}  // namespace fastdecode

#pragma GCC pop_options

namespace fastdecode {

bool has_avx512() {
  static const bool yes = [] {
    const char* env = std::getenv("FASTDECODE_NO_AVX512");
    if (env != nullptr && env[0] != '\0' && env[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return yes;
}

}  // namespace fastdecode
