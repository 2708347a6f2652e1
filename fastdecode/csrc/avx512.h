// AVX512 helpers shared by the *_512.cpp kernels. Include it after their
// `#pragma GCC target("avx512f,...")`: the intrinsics below need that target.
#pragma once

#include <immintrin.h>

#include "kernels.h"

namespace fastdecode {

// The sum of 16 lanes: the two 8-lane halves added lane by lane, then hsum8's order.
inline float hsum16(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum8(_mm256_add_ps(lo, hi));
}

}  // namespace fastdecode
