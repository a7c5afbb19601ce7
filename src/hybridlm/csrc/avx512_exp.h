// exp and 2^x for 16 fp32 lanes, shared by the AVX-512 kernels (attention softmax, glue).
#pragma once
#include <immintrin.h>

#include "exp_poly.h"

namespace {

// 16 fp32 lanes as exp_reduced (and the decode kernels' quantized tiles) use them.
struct Ops16 {
  using F = __m512;
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
  static F scale2n(F p, F n) { return _mm512_scalef_ps(p, n); }  // also gives 0 and inf past the range
};

// exp(x) in fp32 to about 2 ulp, clamped to where 2^n is exact as a scale (exp_poly.h).
inline __m512 exp16(__m512 x) {
  return exp_reduced<Ops16>(_mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.0f)));
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
