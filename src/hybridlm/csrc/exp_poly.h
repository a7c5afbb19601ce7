// The vector exp shared by the AVX-512 (exp16) and AVX2 (exp8) builds: only the vector type and
// its operations differ.
#pragma once

namespace {

// exp(x) in fp32 to about 2 ulp for x in the range the caller clamped to: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 in two parts, so r is exact), exp(r) by its degree-6 Taylor polynomial in
// fused multiply-adds, then scaled by 2^n. Ops: the vector type F and fma(a, b, c) = a * b + c,
// fnma(a, b, c) = c - a * b, mul, set1, round (to nearest) and scale2n(p, n) = p * 2^n.
template <class Ops>
inline typename Ops::F exp_reduced(typename Ops::F x) {
  const typename Ops::F n = Ops::round(Ops::mul(x, Ops::set1(1.44269504f)));
  typename Ops::F r = Ops::fnma(n, Ops::set1(0.693145751953125f), x);
  r = Ops::fnma(n, Ops::set1(1.428606765330187e-06f), r);
  constexpr float kTaylor[] = {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};  // after 1 / 720
  typename Ops::F p = Ops::set1(1.0f / 720);
  for (const float c : kTaylor) p = Ops::fma(p, r, Ops::set1(c));
  return Ops::scale2n(p, n);
}

}  // namespace
