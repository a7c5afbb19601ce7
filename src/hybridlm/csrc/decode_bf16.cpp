// Decode-step kernels for x86 CPUs: a few rows through a Linear layer, and one new query per head
// against a KV cache. Built twice: with AVX-512 BF16 (vdpbf16ps on bf16 pairs) and with AVX2 + FMA
// (bf16 widened to fp32 by a shift, then fused multiply-adds), for CPUs without AVX-512.
//
// A decode step multiplies one (or a batch's few) rows by every weight matrix: a matrix-vector
// product that is bound by reading the weights once. oneDNN's bf16 GEMM is built for large M and
// reaches about a tenth of the memory bandwidth there (without native bf16, far less); PyTorch's
// flash-attention kernel for CPUs splits work by query blocks, so one query per head leaves it
// mostly idle. Both kernels here read each weight (or key and value) once, with fp32 accumulation
// and one bf16 rounding of the result, as torch's bf16 matmul does. The Linear kernels also read
// weight-only int8 and int4 layers (model/converters/quant.py's stored form) in the fused step.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int kMaxRows = 8;
// The tiles read their weight rows while asking for those of the tile this many ahead (at the
// same columns): left to the hardware prefetcher, the short rows (a few cache lines each) kept a
// decode step waiting on memory at about half the bandwidth it reaches with the hint.
constexpr int kPrefetchTiles = 2;

// Keys (and values) ahead of the one in use that the loops ask the cache for: the hardware
// prefetcher alone left a decode step waiting on memory.
constexpr int64_t kPrefetchKeys = 8;

// Asks for the cache lines of n bf16 values at p (a hint: never faults, even past the end).
inline void prefetch_row(const bf16* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

#if defined(__AVX512BF16__)

#include "avx512_exp.h"

inline __m512bh load_pairs(const bf16* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

inline __mmask32 tail_mask(int64_t remaining) {
  return remaining >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << remaining) - 1u);
}

// A 4 x 4 tile's 16 accumulators fill half the 32 vector registers.
constexpr int kMaxAccumulators = 16;

// The Linear's input rows as the tiles read them: bf16 pairs, as they come.
using XRow = bf16;
inline const XRow* prepared_rows(const bf16* x, int64_t, int64_t, std::vector<float>&) { return x; }

// res[m][j] = x[m, :] . w[n0 + j, :] (+ bias[n0 + j]) for kRows rows and kOuts outputs:
// independent accumulators hide vdpbf16ps latency.
template <int kRows, int kOuts>
void dot_tile(const bf16* x, int64_t K, const bf16* w, const bf16* bias, int64_t n0, float (*res)[4]) {
  __m512 acc[kRows][kOuts];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kOuts; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = tail_mask(K - k);
    __m512bh wv[kOuts];
    for (int j = 0; j < kOuts; ++j) {
      wv[j] = load_pairs(w + (n0 + j) * K + k, mask);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + kPrefetchTiles * kOuts + j) * K + k), _MM_HINT_T0);
    }
    for (int m = 0; m < kRows; ++m) {
      const __m512bh xv = load_pairs(x + m * K + k, mask);
      for (int j = 0; j < kOuts; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
    }
  }
  for (int j = 0; j < kOuts; ++j) {
    const float b = bias ? static_cast<float>(bias[n0 + j]) : 0.0f;
    for (int m = 0; m < kRows; ++m) res[m][j] = _mm512_reduce_add_ps(acc[m][j]) + b;
  }
}

// Sixteen bf16 values widened to fp32: a bf16 is the top half of an fp32.
inline __m512 widen16(const bf16* p) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// q . k for one key row (D bf16 values each).
inline float dot_row(const bf16* q, const bf16* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __mmask32 mask = tail_mask(D - d);
    acc = _mm512_dpbf16_ps(acc, load_pairs(k + d, mask), load_pairs(q + d, mask));
  }
  return _mm512_reduce_add_ps(acc);
}

// The 16 lane sums of v[0..15], in order, in one vector: three rounds of pairwise adds, each
// halving the vectors (45 instructions for 16 sums; _mm512_reduce_add_ps takes about 8 for one).
inline __m512 sum16x16(__m512 v[16]) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: sums for keys 2i, 2i + 1, 2i, 2i + 1
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: keys 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // add the 128-bit blocks pairwise, then again, leaving block i = keys 4i .. 4i + 3
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// out[s] = scale * q . k[s * stride, + D) for s < n, 16 keys at a time; returns their max.
inline float key_scores(const bf16* q, const bf16* k, int64_t n, int64_t stride, int64_t D, float scale, float* out) {
  const __m512 sv = _mm512_set1_ps(scale);
  __m512 top = _mm512_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) {
      prefetch_row(k + (s + j + kPrefetchKeys) * stride, D);
      acc[j] = _mm512_setzero_ps();
    }
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 mask = tail_mask(D - d);
      const __m512bh qv = load_pairs(q + d, mask);
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], load_pairs(k + (s + j) * stride + d, mask), qv);
    }
    const __m512 scores = _mm512_mul_ps(sum16x16(acc), sv);
    _mm512_storeu_ps(out + s, scores);
    top = _mm512_max_ps(top, scores);
  }
  float best = _mm512_reduce_max_ps(top);
  for (; s < n; ++s) best = std::max(best, out[s] = dot_row(q, k + s * stride, D) * scale);
  return best;
}

// scores[i] = exp(scores[i] - top) for i < n, returning their sum: 16 lanes at a time (exp16).
inline float exp_and_sum(float* scores, int64_t n, float top) {
  const __m512 tv = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + i), tv));
    _mm512_mask_storeu_ps(scores + i, mask, e);
    sum = _mm512_mask_add_ps(sum, mask, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// acc[0, D) += sum over s < n of p[s] * v[s * stride, + D), the accumulators in registers (16 D
// values each, up to 128) while the rows stream past.
template <int kVectors>
void weighted_rows(const float* p, const bf16* v, int64_t n, int64_t stride, float* acc) {
  __m512 a[kVectors];
  for (int j = 0; j < kVectors; ++j) a[j] = _mm512_loadu_ps(acc + 16 * j);
  for (int64_t s = 0; s < n; ++s) {
    prefetch_row(v + (s + kPrefetchKeys) * stride, 16 * kVectors);
    const __m512 pv = _mm512_set1_ps(p[s]);
    for (int j = 0; j < kVectors; ++j) a[j] = _mm512_fmadd_ps(pv, widen16(v + s * stride + 16 * j), a[j]);
  }
  for (int j = 0; j < kVectors; ++j) _mm512_storeu_ps(acc + 16 * j, a[j]);
}

// acc[0, D) += p * row[0, D)
inline void axpy_row(float p, const bf16* row, int64_t D, float* acc) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, widen16(row + d), _mm512_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += p * static_cast<float>(row[d]);
}

// acc[0, D) += sum over s < n of p[s] * v[s * stride, + D): in registers for the head dims the
// models use, a row at a time through memory for any other.
inline void weighted_values(const float* p, const bf16* v, int64_t n, int64_t stride, int64_t D, float* acc) {
  switch (D) {
    case 32: return weighted_rows<2>(p, v, n, stride, acc);
    case 64: return weighted_rows<4>(p, v, n, stride, acc);
    case 128: return weighted_rows<8>(p, v, n, stride, acc);
    default:
      for (int64_t s = 0; s < n; ++s) {
        prefetch_row(v + (s + kPrefetchKeys) * stride, D);
        axpy_row(p[s], v + s * stride, D, acc);
      }
  }
}

// 16 fp32 lanes as the quantized tiles use them (Ops16's operations), and the codes widened to fp32.
struct Lanes : Ops16 {
  static constexpr int L = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static F int8s(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // L bytes of two 4-bit codes each as the values c - 8: the low nibbles (codes 0, 2, 4, ...) and the
  // high ones (1, 3, ...). vpermps reads only an index's low 4 bits: one lookup per nibble, no mask.
  static void nibbles(const uint8_t* p, F& lo, F& hi) {
    const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, centred);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), centred);
  }
};

#elif defined(__AVX2__) && defined(__FMA__)

#include "exp_poly.h"

// Eight bf16 values widened to fp32: a bf16 is the top half of an fp32.
inline __m256 load8(const bf16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Sixteen bf16 values as two fp32 vectors in one load and two interleaves with zeros (each bf16
// lands in the top half of a 32-bit lane). The lanes come permuted within each 128-bit half; the
// inputs are widened in the same order (prepared_rows), which a dot product does not see.
inline void load16(const bf16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}

inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 vector registers: a tile keeps at most 8 accumulators (2 rows x 4 outputs, 4 x 2).
constexpr int kMaxAccumulators = 8;

// The Linear's input rows widened to fp32 once per call, in load16's lane order (the K % 16 tail
// in order), so the tiles' inner loop only widens weights.
using XRow = float;
inline const XRow* prepared_rows(const bf16* x, int64_t M, int64_t K, std::vector<float>& buffer) {
  buffer.resize(M * K);
  const int64_t K16 = K - K % 16;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K16; k += 16) {
      __m256 lo, hi;
      load16(x + m * K + k, lo, hi);
      _mm256_storeu_ps(buffer.data() + m * K + k, lo);
      _mm256_storeu_ps(buffer.data() + m * K + k + 8, hi);
    }
    for (int64_t k = K16; k < K; ++k) buffer[m * K + k] = static_cast<float>(x[m * K + k]);
  }
  return buffer.data();
}

// res[m][j] = x[m, :] . w[n0 + j, :] (+ bias[n0 + j]): each weight row widened once per 16
// columns and used by every row of the tile; the K % 16 tail in scalar code.
template <int kRows, int kOuts>
void dot_tile(const XRow* x, int64_t K, const bf16* w, const bf16* bias, int64_t n0, float (*res)[4]) {
  __m256 acc[kRows][kOuts];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kOuts; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t K16 = K - K % 16;
  for (int64_t k = 0; k < K16; k += 16)
    for (int j = 0; j < kOuts; ++j) {
      __m256 lo, hi;
      if (k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + kPrefetchTiles * kOuts + j) * K + k), _MM_HINT_T0);
      load16(w + (n0 + j) * K + k, lo, hi);
      for (int m = 0; m < kRows; ++m) {
        acc[m][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * K + k), acc[m][j]);
        acc[m][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * K + k + 8), acc[m][j]);
      }
    }
  for (int j = 0; j < kOuts; ++j) {
    const float b = bias ? static_cast<float>(bias[n0 + j]) : 0.0f;
    for (int m = 0; m < kRows; ++m) {
      float tail = 0.0f;
      for (int64_t k = K16; k < K; ++k) tail += static_cast<float>(w[(n0 + j) * K + k]) * x[m * K + k];
      res[m][j] = reduce8(acc[m][j]) + tail + b;
    }
  }
}

inline float dot_row(const bf16* q, const bf16* k, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  const int64_t D16 = D - D % 16;
  for (int64_t d = 0; d < D16; d += 16) {
    __m256 k_lo, k_hi, q_lo, q_hi;
    load16(k + d, k_lo, k_hi);
    load16(q + d, q_lo, q_hi);
    acc = _mm256_fmadd_ps(k_hi, q_hi, _mm256_fmadd_ps(k_lo, q_lo, acc));
  }
  float tail = 0.0f;
  for (int64_t d = D16; d < D; ++d) tail += static_cast<float>(k[d]) * static_cast<float>(q[d]);
  return reduce8(acc) + tail;
}

// The 8 lane sums of v[0..7], in order, in one vector (two rounds of hadd, one of 128-bit halves).
inline __m256 sum8x8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Head dims up to which the query is widened once per key set (on the stack); wider ones go key by key.
constexpr int64_t kMaxWidenedDim = 512;

// out[s] = scale * q . k[s * stride, + D) for s < n, 8 keys at a time against the query widened
// once (load16's lane order, which a dot product does not see); returns their max.
inline float key_scores(const bf16* q, const bf16* k, int64_t n, int64_t stride, int64_t D, float scale, float* out) {
  float best = -INFINITY;
  int64_t s = 0;
  if (D <= kMaxWidenedDim) {
    alignas(32) float qf[kMaxWidenedDim];
    const int64_t D16 = D - D % 16;
    for (int64_t d = 0; d < D16; d += 16) {
      __m256 lo, hi;
      load16(q + d, lo, hi);
      _mm256_store_ps(qf + d, lo);
      _mm256_store_ps(qf + d + 8, hi);
    }
    const __m256 sv = _mm256_set1_ps(scale);
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (; s + 8 <= n; s += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) {
        prefetch_row(k + (s + j + kPrefetchKeys) * stride, D);
        acc[j] = _mm256_setzero_ps();
      }
      for (int64_t d = 0; d < D16; d += 16) {
        const __m256 q_lo = _mm256_load_ps(qf + d), q_hi = _mm256_load_ps(qf + d + 8);
        for (int j = 0; j < 8; ++j) {
          __m256 k_lo, k_hi;
          load16(k + (s + j) * stride + d, k_lo, k_hi);
          acc[j] = _mm256_fmadd_ps(k_hi, q_hi, _mm256_fmadd_ps(k_lo, q_lo, acc[j]));
        }
      }
      alignas(32) float tails[8] = {};
      for (int j = 0; j < 8; ++j)
        for (int64_t d = D16; d < D; ++d) tails[j] += static_cast<float>(k[(s + j) * stride + d]) * static_cast<float>(q[d]);
      const __m256 scores = _mm256_mul_ps(_mm256_add_ps(sum8x8(acc), _mm256_load_ps(tails)), sv);
      _mm256_storeu_ps(out + s, scores);
      top = _mm256_max_ps(top, scores);
    }
    alignas(32) float tops[8];
    _mm256_store_ps(tops, top);
    best = *std::max_element(tops, tops + 8);
  }
  for (; s < n; ++s) {
    prefetch_row(k + (s + kPrefetchKeys) * stride, D);
    best = std::max(best, out[s] = dot_row(q, k + s * stride, D) * scale);
  }
  return best;
}

// 8 fp32 lanes as exp_reduced and the quantized tiles use them, and the codes widened to fp32.
struct Lanes {
  using F = __m256;
  static constexpr int L = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale2n(F p, F n) {  // 2^n built in the exponent bits: n must keep it a normal float
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
  }
  static float sum(F v) { return reduce8(v); }
  static F int8s(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // L bytes of two 4-bit codes each as the values c - 8: the low nibbles (codes 0, 2, 4, ...) and the
  // high ones (1, 3, ...).
  static void nibbles(const uint8_t* p, F& lo, F& hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i eight = _mm256_set1_epi32(8);
    lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight));
    hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
  }
};

// exp(x) for 8 lanes (exp_poly.h), clamped to where scale2n's 2^n stays a normal float (the
// softmax's arguments are <= 0).
inline __m256 exp8(__m256 x) {
  return exp_reduced<Lanes>(_mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f)));
}

// scores[i] = exp(scores[i] - top) for i < n, returning their sum: 8 lanes at a time (exp8).
inline float exp_and_sum(float* scores, int64_t n, float top) {
  const __m256 tv = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), tv));
    _mm256_storeu_ps(scores + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = reduce8(sum);
  for (; i < n; ++i) total += scores[i] = std::exp(scores[i] - top);
  return total;
}

inline void axpy_row(float p, const bf16* row, int64_t D, float* acc) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8(row + d), _mm256_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += p * static_cast<float>(row[d]);
}

// acc[0, 16 kBlocks) += sum over s < n of p[s] * v[s * stride, + 16 kBlocks), the accumulators in
// registers (load16's lane order, put back in order at the end) while the rows stream past.
template <int kBlocks>
void weighted_rows(const float* p, const bf16* v, int64_t n, int64_t stride, float* acc) {
  __m256 lo[kBlocks], hi[kBlocks];
  for (int j = 0; j < kBlocks; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    prefetch_row(v + (s + kPrefetchKeys) * stride, 16 * kBlocks);
    const __m256 pv = _mm256_set1_ps(p[s]);
    for (int j = 0; j < kBlocks; ++j) {
      __m256 v_lo, v_hi;
      load16(v + s * stride + 16 * j, v_lo, v_hi);
      lo[j] = _mm256_fmadd_ps(pv, v_lo, lo[j]);
      hi[j] = _mm256_fmadd_ps(pv, v_hi, hi[j]);
    }
  }
  for (int j = 0; j < kBlocks; ++j) {  // lo holds values 0-3 and 8-11 of the block, hi 4-7 and 12-15
    float* a = acc + 16 * j;
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_permute2f128_ps(lo[j], hi[j], 0x20)));
    _mm256_storeu_ps(a + 8, _mm256_add_ps(_mm256_loadu_ps(a + 8), _mm256_permute2f128_ps(lo[j], hi[j], 0x31)));
  }
}

// acc[0, D) += sum over s < n of p[s] * v[s * stride, + D): in registers, up to 64 columns at a
// time, for head dims that are multiples of 16; a row at a time through memory for any other.
inline void weighted_values(const float* p, const bf16* v, int64_t n, int64_t stride, int64_t D, float* acc) {
  if (D % 16 == 0) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) weighted_rows<4>(p, v + d, n, stride, acc + d);
    switch ((D - d) / 16) {
      case 3: return weighted_rows<3>(p, v + d, n, stride, acc + d);
      case 2: return weighted_rows<2>(p, v + d, n, stride, acc + d);
      case 1: return weighted_rows<1>(p, v + d, n, stride, acc + d);
      default: return;
    }
  }
  for (int64_t s = 0; s < n; ++s) {
    prefetch_row(v + (s + kPrefetchKeys) * stride, D);
    axpy_row(p[s], v + s * stride, D, acc);
  }
}

#else
#error "decode_bf16.cpp needs AVX-512 BF16 or AVX2 with FMA"
#endif

// --- Weight-only int8 and int4 layers ------------------------------------------------------------
// int8: w[n, k] = q[n, k] * scale[n]. int4: codes c in 0..15, two per byte (low nibble first),
// w[n, k] = (c - 8) * scale[n, g] + zero[n, g] for the group g of `group` inputs holding k. The
// tiles widen the codes and the input (exactly: a bf16 is an fp32) to fp32 and apply a scale once
// per row (int8) or group (int4), using x . ((c - 8) s + z) = s (x . (c - 8)) + z sum(x): the
// sums of the dequantized fp32 weight, up to rounding order.

// res[m][j] = x[m, :] . w[n0 + j, :] (+ bias) of an int8 layer; x widened to fp32 in order.
template <int kRows, int kOuts>
void int8_tile(const float* x, int64_t K, const int8_t* q, const bf16* scales, const bf16* bias, int64_t n0,
               float (*res)[4]) {
  using V = Lanes;
  V::F acc[kRows][kOuts];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kOuts; ++j) acc[m][j] = V::zero();
  const int64_t KL = K - K % V::L;
  for (int64_t k = 0; k < KL; k += V::L) {
    V::F wv[kOuts];
    for (int j = 0; j < kOuts; ++j) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + (n0 + kPrefetchTiles * kOuts + j) * K + k), _MM_HINT_T0);
      wv[j] = V::int8s(q + (n0 + j) * K + k);
    }
    for (int m = 0; m < kRows; ++m) {
      const V::F xv = V::load(x + m * K + k);
      for (int j = 0; j < kOuts; ++j) acc[m][j] = V::fma(wv[j], xv, acc[m][j]);
    }
  }
  for (int j = 0; j < kOuts; ++j) {
    const float s = static_cast<float>(scales[n0 + j]), b = bias ? static_cast<float>(bias[n0 + j]) : 0.0f;
    for (int m = 0; m < kRows; ++m) {
      float tail = 0.0f;
      for (int64_t k = KL; k < K; ++k) tail += static_cast<float>(q[(n0 + j) * K + k]) * x[m * K + k];
      res[m][j] = (V::sum(acc[m][j]) + tail) * s + b;
    }
  }
}

// The same for an int4 layer: x widened to fp32 with each block of 2L inputs as its even inputs
// then its odd ones (the order `nibbles` gives the codes), xsum[m, g] = sum of row m's group g.
template <int kRows, int kOuts>
void int4_tile(const float* x, const float* xsum, int64_t K, int64_t group, const uint8_t* q, const bf16* scales,
               const bf16* zeros, const bf16* bias, int64_t n0, float (*res)[4]) {
  using V = Lanes;
  const int64_t G = K / group, row_bytes = K / 2;
  V::F acc[kRows][kOuts];
  float offset[kRows][kOuts] = {};
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kOuts; ++j) acc[m][j] = V::zero();
  for (int64_t g = 0; g < G; ++g) {
    V::F part[kRows][kOuts];
    for (int m = 0; m < kRows; ++m)
      for (int j = 0; j < kOuts; ++j) part[m][j] = V::zero();
    for (int64_t k = g * group; k < (g + 1) * group; k += 2 * V::L) {
      V::F lo[kOuts], hi[kOuts];
      for (int j = 0; j < kOuts; ++j) {
        const uint8_t* row = q + (n0 + j) * row_bytes + k / 2;
        if ((k / 2) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchTiles * kOuts * row_bytes), _MM_HINT_T0);
        V::nibbles(row, lo[j], hi[j]);
      }
      for (int m = 0; m < kRows; ++m) {
        const V::F even = V::load(x + m * K + k), odd = V::load(x + m * K + k + V::L);
        for (int j = 0; j < kOuts; ++j) part[m][j] = V::fma(hi[j], odd, V::fma(lo[j], even, part[m][j]));
      }
    }
    for (int j = 0; j < kOuts; ++j) {
      const float s = static_cast<float>(scales[(n0 + j) * G + g]), z = static_cast<float>(zeros[(n0 + j) * G + g]);
      const V::F sv = V::set1(s);
      for (int m = 0; m < kRows; ++m) {
        acc[m][j] = V::fma(sv, part[m][j], acc[m][j]);
        offset[m][j] += z * xsum[m * G + g];
      }
    }
  }
  for (int j = 0; j < kOuts; ++j) {
    const float b = bias ? static_cast<float>(bias[n0 + j]) : 0.0f;
    for (int m = 0; m < kRows; ++m) res[m][j] = V::sum(acc[m][j]) + offset[m][j] + b;
  }
}

// The rows (M, K) widened to fp32; with `paired`, each block of 2L inputs as its even inputs then
// its odd ones (int4_tile's order; K is then a multiple of 2L).
const float* widened_rows(const bf16* x, int64_t M, int64_t K, bool paired, std::vector<float>& buffer) {
  buffer.resize(M * K);
  constexpr int64_t L = Lanes::L;
  for (int64_t i = 0; i < M * K; ++i) {
    const int64_t k = i % K, in_block = k % (2 * L);
    const int64_t to = paired ? i - in_block + (in_block % 2) * L + in_block / 2 : i;
    buffer[to] = static_cast<float>(x[i]);
  }
  return buffer.data();
}

// sums[m, g] = the sum of row m's inputs in group g.
const float* group_sums(const float* x, int64_t M, int64_t K, int64_t group, std::vector<float>& sums) {
  sums.assign(M * (K / group), 0.0f);
  for (int64_t i = 0; i < M * K; ++i) sums[i / group] += x[i];
  return sums.data();
}

enum Activation { kNone = 0, kGeluTanh = 1, kSwiGLU = 2 };

inline float gelu_tanh(float y) {
  return 0.5f * y * (1.0f + std::tanh(0.7978845608028654f * (y + 0.044715f * y * y * y)));
}

// The tiles of one call: its rows (from the first of a group of up to four) against one layer.
struct Bf16Tiles {
  static constexpr int kAccumulators = kMaxAccumulators;
  const XRow* x;
  int64_t K;
  const bf16 *w, *bias;
  Bf16Tiles from_row(int64_t m) const { return {x + m * K, K, w, bias}; }
  template <int kRows, int kOuts>
  void dot(int64_t n0, float (*res)[4]) const { dot_tile<kRows, kOuts>(x, K, w, bias, n0, res); }
};

struct Int8Tiles {
  static constexpr int kAccumulators = kMaxAccumulators;
  const float* x;
  int64_t K;
  const int8_t* q;
  const bf16 *scales, *bias;
  Int8Tiles from_row(int64_t m) const { return {x + m * K, K, q, scales, bias}; }
  template <int kRows, int kOuts>
  void dot(int64_t n0, float (*res)[4]) const { int8_tile<kRows, kOuts>(x, K, q, scales, bias, n0, res); }
};

struct Int4Tiles {
  static constexpr int kAccumulators = kMaxAccumulators / 4;  // a group's partial sums beside the totals
  const float *x, *xsum;
  int64_t K, group;
  const uint8_t* q;
  const bf16 *scales, *zeros, *bias;
  Int4Tiles from_row(int64_t m) const { return {x + m * K, xsum + m * (K / group), K, group, q, scales, zeros, bias}; }
  template <int kRows, int kOuts>
  void dot(int64_t n0, float (*res)[4]) const {
    int4_tile<kRows, kOuts>(x, xsum, K, group, q, scales, zeros, bias, n0, res);
  }
};

// Outputs [n0, n0 + kOuts) of kRows rows, with the activation applied in fp32 before the one
// rounding to bf16. SwiGLU reads the gate from weight rows n and the value from rows n + N.
template <int kRows, int kOuts, class Tiles>
void output_tile(const Tiles& tiles, int64_t n0, int64_t N, int act, bf16* out) {
  float res[kRows][4], up[kRows][4];
  tiles.template dot<kRows, kOuts>(n0, res);
  if (act == kSwiGLU) tiles.template dot<kRows, kOuts>(n0 + N, up);
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kOuts; ++j) {
      float y = res[m][j];
      if (act == kGeluTanh) y = gelu_tanh(y);
      if (act == kSwiGLU) y = y / (1.0f + std::exp(-y)) * up[m][j];
      out[m * N + n0 + j] = static_cast<bf16>(y);
    }
}

template <int kRows, class Tiles>
void output_rows(const Tiles& tiles, int64_t n0, int64_t n1, int64_t N, int act, bf16* out) {
  constexpr int kOuts = std::min(4, std::max(1, Tiles::kAccumulators / kRows));
  int64_t n = n0;
  for (; n + kOuts <= n1; n += kOuts) output_tile<kRows, kOuts>(tiles, n, N, act, out);
  for (; n < n1; ++n) output_tile<kRows, 1>(tiles, n, N, act, out);
}

// Rows in groups of up to four, each group in tiles of as many outputs as the registers hold.
template <class Tiles>
void linear_block(const Tiles& tiles, int64_t M, int64_t n0, int64_t n1, int64_t N, int act, bf16* out) {
  for (int64_t m = 0; m < M; m += 4) {
    const Tiles rows = tiles.from_row(m);
    bf16* om = out + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: output_rows<1>(rows, n0, n1, N, act, om); break;
      case 2: output_rows<2>(rows, n0, n1, N, act, om); break;
      case 3: output_rows<3>(rows, n0, n1, N, act, om); break;
      default: output_rows<4>(rows, n0, n1, N, act, om); break;
    }
  }
}

// One key set of one (batch, head): `length` keys and values, rows `stride` apart.
struct Keys {
  const bf16* k;
  const bf16* v;
  int64_t length, stride;
};

// One query row (D) against the key sets: softmax(q.K * scale) V over all of them together.
void attend_one(const bf16* q, const std::vector<Keys>& sets, int64_t D, float scale, float* scores, bf16* out) {
  float top = -INFINITY;
  int64_t i = 0;
  for (const Keys& set : sets) {
    top = std::max(top, key_scores(q, set.k, set.length, set.stride, D, scale, scores + i));
    i += set.length;
  }
  const float total = exp_and_sum(scores, i, top);
  std::vector<float> acc(D, 0.0f);
  i = 0;
  for (const Keys& set : sets) {
    weighted_values(scores + i, set.v, set.length, set.stride, D, acc.data());
    i += set.length;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<bf16>(acc[d] / total);
}

// A Linear layer's weight as the kernels read it: bf16 (N, K); int8 codes (N, K) with bf16
// scales (N); or int4 codes uint8 (N, K / 2) with bf16 scales and zeros (N, K / group).
struct Weight {
  at::Tensor data, scales, zeros;
  int64_t in_features() const { return data.scalar_type() == at::kByte ? 2 * data.size(1) : data.size(1); }
};

// out (M, N) = act(x (M, K) @ w.T + b) for contiguous bf16 x and b; the rows are widened once
// (prepared_rows, widened_rows) and the outputs split across threads.
void linear_into(const bf16* x, int64_t M, int64_t K, const Weight& w, const bf16* b, int act, bf16* out) {
  const int64_t N = act == kSwiGLU ? w.data.size(0) / 2 : w.data.size(0);
  // About 16 KiB of weights per task: big enough to amortise the fork, small enough to balance.
  const int64_t row_bytes = std::max<int64_t>(w.data.size(1) * w.data.element_size(), 1);
  const int64_t grain = std::max<int64_t>(8, 16384 / row_bytes);
  auto run = [&](const auto& tiles) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { linear_block(tiles, M, n0, n1, N, act, out); });
  };
  std::vector<float> widened, sums;
  switch (w.data.scalar_type()) {
    case at::kBFloat16:
      run(Bf16Tiles{prepared_rows(x, M, K, widened), K, w.data.data_ptr<bf16>(), b});
      break;
    case at::kChar:
      run(Int8Tiles{widened_rows(x, M, K, false, widened), K, w.data.data_ptr<int8_t>(), w.scales.data_ptr<bf16>(), b});
      break;
    default: {
      const int64_t group = K / w.scales.size(1);
      const float* xf = widened_rows(x, M, K, true, widened);
      run(Int4Tiles{xf, group_sums(xf, M, K, group, sums), K, group, w.data.data_ptr<uint8_t>(),
                    w.scales.data_ptr<bf16>(), w.zeros.data_ptr<bf16>(), b});
    }
  }
}

inline const bf16* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<bf16>() : nullptr; }

}  // namespace

// x (M, K) bf16, M <= 8; weight (N, K) bf16 contiguous; bias (N) bf16 or None; act 0 (none),
// 1 (tanh GELU) or 2 (SwiGLU: silu of the first N/2 outputs times the last N/2) -> (M, N or N/2).
at::Tensor linear(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && x.size(1) == weight.size(1), "linear: bad shapes");
  TORCH_CHECK(act >= kNone && act <= kSwiGLU && (act != kSwiGLU || weight.size(0) % 2 == 0), "linear: bad act");
  x = x.contiguous();
  weight = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  auto out = at::empty({x.size(0), act == kSwiGLU ? weight.size(0) / 2 : weight.size(0)}, x.options());
  linear_into(x.data_ptr<bf16>(), x.size(0), x.size(1), Weight{weight}, data_or_null(b), act, out.data_ptr<bf16>());
  return out;
}

// A quantized layer's codes, scales and zeros as a `Weight`, their dtypes and shapes checked.
Weight checked_quantized(const at::Tensor& w, const at::Tensor& s, const c10::optional<at::Tensor>& zeros) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() && s.is_contiguous() &&
                  s.scalar_type() == at::kBFloat16,
              "quantized weights: contiguous CPU codes with contiguous bf16 scales");
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(!zeros.has_value() && s.dim() == 1 && s.size(0) == w.size(0), "quantized weights: int8 takes scales (N)");
    return {w, s};
  }
  TORCH_CHECK(w.scalar_type() == at::kByte && zeros.has_value(), "quantized weights: int8, or int4 as uint8 pairs with zeros");
  const at::Tensor& z = *zeros;
  const int64_t K = 2 * w.size(1);
  TORCH_CHECK(z.is_contiguous() && z.scalar_type() == at::kBFloat16 && s.dim() == 2 && s.sizes() == z.sizes() &&
                  s.size(0) == w.size(0) && K % s.size(1) == 0 && (K / s.size(1)) % 32 == 0,
              "quantized weights: int4 takes bf16 scales and zeros (N, K / group), groups a multiple of 32 inputs");
  return {w, s, z};
}

// x (M, K) bf16, M <= 8, through a weight-only quantized layer: int8 codes (N, K) with bf16 scales
// (N), or int4 codes uint8 (N, K / 2) with bf16 scales and zeros (N, K / group); bias (N) bf16 or
// None -> (M, N) bf16.
at::Tensor quantized_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> zeros,
                            c10::optional<at::Tensor> bias) {
  const Weight w = checked_quantized(codes, scales, zeros);
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && x.size(1) == w.in_features() && x.scalar_type() == at::kBFloat16,
              "quantized_linear: x must be (M <= 8, in_features) bf16");
  x = x.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  auto out = at::empty({x.size(0), codes.size(0)}, x.options());
  linear_into(x.data_ptr<bf16>(), x.size(0), x.size(1), w, data_or_null(b), kNone, out.data_ptr<bf16>());
  return out;
}

// q (B, H, 1, D); ks[i], vs[i] (B or 1, KV, S_i, D) key sets attended together (a sparse layer's
// global slots, strided keys and window), each with unit stride in D (slices of cache buffers; a
// batch dim of 1 or stride 0 is shared by every row) -> (B, H, 1, D).
at::Tensor decode_attention(at::Tensor q, std::vector<at::Tensor> ks, std::vector<at::Tensor> vs, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && !ks.empty() && ks.size() == vs.size(), "decode_attention: bad shapes");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = ks[0].size(1);
  TORCH_CHECK(H % KV == 0, "decode_attention: heads must be a multiple of the key-value heads");
  int64_t total = 0;
  for (size_t j = 0; j < ks.size(); ++j) {
    const at::Tensor &k = ks[j], &v = vs[j];
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides() && k.stride(3) == 1 &&
                    k.size(1) == KV && k.size(3) == D && (k.size(0) == B || k.size(0) == 1),
                "decode_attention: bad key set");
    total += k.size(2);
  }
  auto out = at::empty({B, H, 1, D}, q.options());
  const bf16* qp = q.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t group = H / KV;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::max<int64_t>(total, 1));
    std::vector<Keys> sets(ks.size());
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      for (size_t j = 0; j < ks.size(); ++j) {
        const at::Tensor &k = ks[j], &v = vs[j];
        const int64_t offset = (k.size(0) == 1 ? 0 : b * k.stride(0)) + (h / group) * k.stride(1);
        sets[j] = {k.data_ptr<bf16>() + offset, v.data_ptr<bf16>() + offset, k.size(2), k.stride(2)};
      }
      attend_one(qp + i * D, sets, D, static_cast<float>(scale), scores.data(), op + i * D);
    }
  });
  return out;
}


// --- The fused decode step ---------------------------------------------------------------------
// One call runs a whole bf16 decode step, every layer: norm, qkv, RoPE, the cache write,
// attention, output projection, residual, norm, FFN, residual, then the final norm and the head.
// At GPT-2-small widths the kernels of a step take under half of it when Python drives each op
// (about 70 module calls and 400 small aten ops per step); here the Python side only hands over
// the caches' buffers. Each op rounds to bf16 where the unfused bf16 path rounds, so both give the
// same numbers up to fp32 rounding order.

namespace {

struct Norm {
  at::Tensor weight, bias;  // (C) bf16; either may be undefined
};

// One layer's weights, as HybridLM holds them (nothing is copied).
struct Layer {
  Norm norm1, norm2;
  Weight qkv_w, proj_w, up_w, down_w;
  at::Tensor qkv_b, proj_b, up_b, down_b;
  at::Tensor k_global, v_global;  // (KV, G, D) bf16: a sparse layer's global slots, or undefined
  int64_t act;
};

// y = norm(x) for R rows of C, in fp32 and rounded once, as torch's bf16 LayerNorm does (RMSNorm:
// no centring, no bias).
void norm_rows(const Norm& n, bool rms, float eps, const bf16* x, int64_t R, int64_t C, bf16* y) {
  const bf16* w = data_or_null(n.weight);
  const bf16* b = data_or_null(n.bias);
  for (int64_t r = 0; r < R; ++r) {
    const bf16* xr = x + r * C;
    float mean = 0.0f;
    if (!rms) {
      for (int64_t c = 0; c < C; ++c) mean += static_cast<float>(xr[c]);
      mean /= C;
    }
    float var = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float d = static_cast<float>(xr[c]) - mean;
      var += d * d;
    }
    const float rstd = 1.0f / std::sqrt(var / C + eps);
    for (int64_t c = 0; c < C; ++c) {
      float v = (static_cast<float>(xr[c]) - mean) * rstd;
      if (w) v *= static_cast<float>(w[c]);
      if (b) v += static_cast<float>(b[c]);
      y[r * C + c] = static_cast<bf16>(v);
    }
  }
}

// x += y, each sum in fp32 and rounded once (torch's bf16 add).
void add_rows(bf16* x, const bf16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<bf16>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

// Rotate-half RoPE of `heads` heads of D at `position`, in place: fp32, rounded once.
void rotate_heads(bf16* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    bf16* xh = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(xh[i]), x2 = static_cast<float>(xh[half + i]);
      xh[i] = static_cast<bf16>(x1 * cos[i] - x2 * sin[i]);
      xh[half + i] = static_cast<bf16>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

// One layer's cache for `rows` consecutive rows of the step: key and value sets (each (rows or
// 1, KV, S_i, D), unit stride in D) attended whole, except the last (the buffer the new key goes
// to), attended over positions [first, slot] after the new key and value are written at `slot`.
using CacheGroup = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t>;

class DecodePlan {
 public:
  // layers[i]: norm1 w, b; qkv w, scales, zeros, b; proj, the same four; norm2 w, b; up and down,
  // four each; k_global, v_global (None where absent: a bf16 weight has no scales or zeros, an
  // int8 one no zeros); acts[i]: the FFN's activation code.
  DecodePlan(std::vector<std::vector<c10::optional<at::Tensor>>> layers, std::vector<int64_t> acts, bool rms,
             double eps, c10::optional<at::Tensor> norm_w, c10::optional<at::Tensor> norm_b, at::Tensor head,
             c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin, int64_t n_head, int64_t n_kv_head,
             int64_t head_dim)
      : rms_(rms), eps_(static_cast<float>(eps)), head_(checked(head)), H_(n_head), KV_(n_kv_head), D_(head_dim) {
    TORCH_CHECK(layers.size() == acts.size() && H_ % KV_ == 0, "DecodePlan: bad layer list");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 22, "DecodePlan: each layer takes 22 tensors");
      auto get = [&](int j) { return t[j].has_value() ? checked(*t[j]) : at::Tensor(); };
      auto weight = [&](int j) {  // a bf16 weight has no scales; a quantized one, codes with scales (and zeros)
        TORCH_CHECK(t[j].has_value(), "DecodePlan: a Linear layer without a weight");
        return t[j + 1].has_value() ? checked_quantized(*t[j], *t[j + 1], t[j + 2]) : Weight{checked(*t[j])};
      };
      layers_.push_back({{get(0), get(1)}, {get(10), get(11)}, weight(2), weight(6), weight(12), weight(16),
                         get(5), get(9), get(15), get(19), get(20), get(21), acts[i]});
    }
    norm_f_ = {norm_w.has_value() ? checked(*norm_w) : at::Tensor(), norm_b.has_value() ? checked(*norm_b) : at::Tensor()};
    if (cos.has_value()) {
      cos_ = cos->contiguous();
      sin_ = sin->contiguous();
      TORCH_CHECK(cos_.scalar_type() == at::kFloat && cos_.size(1) == D_ / 2, "DecodePlan: RoPE tables (T, D/2) fp32");
    }
  }

  // x (R, C) bf16 embeddings of the rows' new tokens at `positions`; caches[i]: layer i's groups,
  // covering the R rows in order. Writes each layer's new keys and values into its caches and
  // returns the logits (R, vocab).
  at::Tensor step(at::Tensor x, std::vector<int64_t> positions, std::vector<std::vector<CacheGroup>> caches) const {
    const int64_t R = x.size(0), C = x.size(1), QKV = (H_ + 2 * KV_) * D_;
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && R <= kMaxRows && R == (int64_t)positions.size() &&
                    caches.size() == layers_.size(),
                "DecodePlan.step: bad inputs");
    at::Tensor h = x.contiguous().clone();  // the residual stream
    bf16* hp = h.data_ptr<bf16>();
    std::vector<bf16> normed(R * C), qkv(R * QKV), attn(R * H_ * D_), out(R * C);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      norm_rows(L.norm1, rms_, eps_, hp, R, C, normed.data());
      linear_into(normed.data(), R, C, L.qkv_w, data_or_null(L.qkv_b), kNone, qkv.data());
      if (cos_.defined())
        for (int64_t r = 0; r < R; ++r)
          rotate_heads(qkv.data() + r * QKV, H_ + KV_, D_, cos_.data_ptr<float>() + positions[r] * (D_ / 2),
                       sin_.data_ptr<float>() + positions[r] * (D_ / 2));
      attend_layer(L, caches[i], R, qkv.data(), attn.data());
      linear_into(attn.data(), R, H_ * D_, L.proj_w, data_or_null(L.proj_b), kNone, out.data());
      add_rows(hp, out.data(), R * C);
      norm_rows(L.norm2, rms_, eps_, hp, R, C, normed.data());
      const int64_t F = L.down_w.in_features();
      std::vector<bf16> hidden(R * F);
      linear_into(normed.data(), R, C, L.up_w, data_or_null(L.up_b), static_cast<int>(L.act), hidden.data());
      linear_into(hidden.data(), R, F, L.down_w, data_or_null(L.down_b), kNone, out.data());
      add_rows(hp, out.data(), R * C);
    }
    norm_rows(norm_f_, rms_, eps_, hp, R, C, normed.data());
    auto logits = at::empty({R, head_.size(0)}, x.options());
    linear_into(normed.data(), R, C, Weight{head_}, nullptr, kNone, logits.data_ptr<bf16>());
    return logits;
  }

 private:
  static at::Tensor checked(const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(),
                "DecodePlan: weights must be contiguous bf16 CPU tensors");
    return t;
  }

  // Writes the rows' new keys and values into their caches, then attends every head of every row
  // over its key sets: the layer's global slots first, then the cache's sets, as the unfused path.
  void attend_layer(const Layer& L, const std::vector<CacheGroup>& groups, int64_t R, const bf16* qkv, bf16* attn) const {
    const int64_t QKV = (H_ + 2 * KV_) * D_;
    struct RowCache {
      const CacheGroup* group;
      int64_t b;  // the row's batch index in its group
    };
    std::vector<RowCache> rows;
    for (const CacheGroup& g : groups) {
      const auto& [ks, vs, first, slot] = g;
      TORCH_CHECK(!ks.empty() && ks.size() == vs.size(), "DecodePlan.step: bad cache group");
      const at::Tensor &k = ks.back(), &v = vs.back();
      TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(1) == KV_ &&
                      k.size(3) == D_ && k.stride(3) == 1 && k.scalar_type() == at::kBFloat16 && 0 <= first &&
                      first <= slot && slot < k.size(2),
                  "DecodePlan.step: bad cache buffer");
      for (int64_t b = 0; b < k.size(0); ++b) {
        const int64_t r = rows.size();
        TORCH_CHECK(r < R, "DecodePlan.step: the cache groups hold more rows than the step");
        rows.push_back({&g, b});
        for (int64_t kv = 0; kv < KV_; ++kv) {
          const int64_t at = b * k.stride(0) + kv * k.stride(1) + slot * k.stride(2);
          std::copy_n(qkv + r * QKV + (H_ + kv) * D_, D_, k.data_ptr<bf16>() + at);
          std::copy_n(qkv + r * QKV + (H_ + KV_ + kv) * D_, D_, v.data_ptr<bf16>() + at);
        }
      }
    }
    TORCH_CHECK((int64_t)rows.size() == R, "DecodePlan.step: the cache groups hold fewer rows than the step");
    const int64_t group = H_ / KV_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D_));
    at::parallel_for(0, R * H_, 1, [&](int64_t begin, int64_t end) {
      std::vector<Keys> sets;
      std::vector<float> scores;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / H_, h = i % H_, kv = h / group;
        const auto& [ks, vs, first, slot] = *rows[r].group;
        sets.clear();
        if (L.k_global.defined()) {
          const int64_t G = L.k_global.size(1);
          sets.push_back({L.k_global.data_ptr<bf16>() + kv * G * D_, L.v_global.data_ptr<bf16>() + kv * G * D_, G, D_});
        }
        int64_t total = 0;
        for (size_t j = 0; j < ks.size(); ++j) {
          const at::Tensor &k = ks[j], &v = vs[j];
          const int64_t offset = (k.size(0) == 1 ? 0 : rows[r].b * k.stride(0)) + kv * k.stride(1);
          const bool last = j + 1 == ks.size();
          const int64_t start = last ? first : 0, length = last ? slot - first + 1 : k.size(2);
          sets.push_back({k.data_ptr<bf16>() + offset + start * k.stride(2),
                          v.data_ptr<bf16>() + offset + start * v.stride(2), length, k.stride(2)});
        }
        for (const Keys& set : sets) total += set.length;
        scores.resize(std::max<int64_t>(total, 1));
        attend_one(qkv + r * QKV + h * D_, sets, D_, scale, scores.data(), attn + r * H_ * D_ + h * D_);
      }
    });
  }

  std::vector<Layer> layers_;
  Norm norm_f_;
  bool rms_;
  float eps_;
  at::Tensor head_, cos_, sin_;
  int64_t H_, KV_, D_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "a few bf16 rows through a Linear layer");
  m.def("quantized_linear", &quantized_linear, "a few bf16 rows through a weight-only int8 or int4 layer");
  m.def("decode_attention", &decode_attention, "one bf16 query per head against a KV cache's key sets");
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<std::vector<std::vector<c10::optional<at::Tensor>>>, std::vector<int64_t>, bool, double,
                    c10::optional<at::Tensor>, c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>,
                    c10::optional<at::Tensor>, int64_t, int64_t, int64_t>())
      .def("step", &DecodePlan::step, py::call_guard<py::gil_scoped_release>(), "one decode step of every layer");
}
