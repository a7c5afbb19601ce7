// exp and 2^x for 16 fp32 lanes, shared by the AVX-512 kernels (attention softmax, glue).
#pragma once
#include <immintrin.h>

namespace {

// exp(x) in fp32 to about 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial, then scaled by 2^n (which also gives 0 and inf past the range).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 2^x in fp32 to about 2 ulp, for the softmaxes, whose arguments are scores already scaled by
// log2(e) with their row max subtracted (x <= 0, so no clamp; -inf gives NaN, which the callers
// mask): x = n + r, |r| <= 1/2, 2^r by the degree-6 Taylor polynomial of exp(r ln2), scaled by 2^n.
// Against exp16 this drops the clamps and the two-step reduction by ln2: 8 operations, not 13.
inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

}  // namespace
