// What both sparse attention kernels share (sparse_attention_bf16.cpp, sparse_attention_brgemm.cpp):
// the key geometry (which keys a block of queries sees, and the mask), the AVX-512 vector helpers,
// and the masked softmax of one query row. Only the matrix products differ between the two.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------- vector helpers

inline __m512 exp512(__m512 x) {  // e^x, relative error ~1e-7 on [-87, 88]
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m256i to_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// fp32 -> bf16 (round to nearest even); count is a multiple of 16 (head dims are).
void store_bf16(const float* src, int64_t count, bf16* dst) {
  for (int64_t i = 0; i < count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), to_bf16x16(_mm512_loadu_ps(src + i)));
}

// Two rows of 16 fp32 -> 16 interleaved bf16 pairs (a0, b0, a1, b1, ...).
inline __m512i interleave_bf16(__m512 a, __m512 b) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // low 16 = a, high 16 = b
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}

// ---------------------------------------------------------------- geometry and block layout

struct Geometry {
  int n, D, g, window, stride, block, n16, n_strided, r16;
  float scale;
};

Geometry geometry(const at::Tensor& q, int64_t g, int64_t window, int64_t stride, int64_t block) {
  Geometry G;
  G.n = (int)q.size(1); G.D = (int)q.size(2); G.g = (int)g;
  G.window = (int)window; G.stride = (int)stride; G.block = (int)block;
  G.n16 = round_up(G.n, 16);
  G.n_strided = G.n >= G.stride ? (G.n - G.stride) / G.stride + 1 : 0;  // positions s-1, 2s-1, ... < n
  G.r16 = round_up(G.g + G.n_strided, 16);
  G.scale = 1.0f / std::sqrt((float)G.D);
  return G;
}

// What one block of queries [i0, i1) sees: remote prefix (global + far strided) and a span slice.
struct BlockKeys {
  int remote_count;  // visible remote keys: g + far strided
  int remote_tiles;  // tiles of the remote segment used (the rest of the last tile is masked)
  int span_lo, span_hi;  // span positions [span_lo, span_hi), multiples of the granule
  int kp() const { return 16 * remote_tiles + (span_hi - span_lo); }
};

// `granule` (a multiple of 16) is the kernel's key tile: span ends and the remote width are multiples of it.
BlockKeys block_keys(const Geometry& G, int i0, int i1, int granule = 16) {
  BlockKeys b;
  b.span_lo = std::max(0, i0 - G.window + 1) / granule * granule;
  b.span_hi = round_up(i1, granule);
  b.remote_count = G.g + b.span_lo / G.stride;  // strided p < span_lo
  b.remote_tiles = round_up(b.remote_count, granule) / 16;
  return b;
}

// Which of 16 key columns starting at c0 row i may see (bit per lane).
inline __mmask16 visible16(const Geometry& G, const BlockKeys& b, const int32_t* strided_flag, int c0, int i) {
  const int remote_cols = 16 * b.remote_tiles;
  if (c0 < remote_cols) {
    const int left = b.remote_count - c0;
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
  }
  const int p0 = b.span_lo + (c0 - remote_cols);
  const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(p0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 le = _mm512_cmple_epi32_mask(pos, _mm512_set1_epi32(i));
  const __mmask16 near = _mm512_cmpgt_epi32_mask(pos, _mm512_set1_epi32(i - G.window));
  const __m512i flags = _mm512_loadu_si512(strided_flag + p0);
  const __mmask16 strided = _mm512_test_epi32_mask(flags, flags);
  return le & (near | strided);
}

inline __m512 load_bf16x16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

float row_dot(const bf16* a, const bf16* b, int D) {
  __m512 acc = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(load_bf16x16(a + d), load_bf16x16(b + d), acc);
  return _mm512_reduce_add_ps(acc);
}

const bf16* ptr(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }
bf16* mut_ptr(at::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()); }


// 1 at every strided position, with room for a 16-lane load at any tile start of a 64-padded span.
std::vector<int32_t> strided_flags(const Geometry& G) {
  const int size = round_up(G.n, 64) + 16;
  std::vector<int32_t> flags(size, 0);
  for (int p = G.stride - 1; p < size; p += G.stride) flags[p] = 1;
  return flags;
}

// The masked softmax of query row i over its kp key columns: `row` (scores, overwritten) -> `p`
// (probabilities, bf16). Returns the row's log-sum-exp, which the backward pass recomputes P from.
inline float softmax_row(const Geometry& G, const BlockKeys& b, const int32_t* strided_flag, int i, float* row, int kp,
                         bf16* p) {
  const __m512 scale = _mm512_set1_ps(G.scale), minus_inf = _mm512_set1_ps(-INFINITY);
  __m512 mx = minus_inf;
  for (int c = 0; c < kp; c += 16) {
    const __mmask16 vis = visible16(G, b, strided_flag, c, i);
    const __m512 x = _mm512_mask_mul_ps(minus_inf, vis, _mm512_loadu_ps(row + c), scale);
    _mm512_storeu_ps(row + c, x);
    mx = _mm512_max_ps(mx, x);
  }
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < kp; c += 16) {
    const __m512 x = _mm512_loadu_ps(row + c);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, vm)));
    _mm512_storeu_ps(row + c, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int c = 0; c < kp; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c), to_bf16x16(_mm512_mul_ps(_mm512_loadu_ps(row + c), inv)));
  return m + std::log(total);
}

}  // namespace
