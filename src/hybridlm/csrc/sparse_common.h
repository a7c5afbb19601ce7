// What both sparse attention kernels share (sparse_attention_bf16.cpp, sparse_attention_brgemm.cpp):
// the key geometry (which keys a block of queries sees, and the mask), the AVX-512 vector helpers,
// and the masked softmax of one query row. Only the matrix products differ between the two.
#pragma once
#include "avx512_exp.h"

#include <ATen/Parallel.h>
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

inline __m256i to_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// fp32 -> bf16 (round to nearest even); count is a multiple of 16 (head dims are).
void store_bf16(const float* src, int64_t count, bf16* dst) {
  for (int64_t i = 0; i < count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), to_bf16x16(_mm512_loadu_ps(src + i)));
}

// 32 bf16 (low 16 = row a, high 16 = row b) -> 16 interleaved pairs (a0, b0, a1, b1, ...).
inline __m512i interleave_halves(__m512i both) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}

// Two rows of 16 fp32 -> 16 interleaved bf16 pairs.
inline __m512i interleave_bf16(__m512 a, __m512 b) { return interleave_halves((__m512i)_mm512_cvtne2ps_pbh(b, a)); }

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
  if (p0 + 15 <= i && p0 > i - G.window) return (__mmask16)0xFFFF;  // all local: most columns of long spans
  if (p0 > i) return (__mmask16)0;
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


// Row i of the span segment (every position), or nullptr past the sequence.
inline const bf16* span_row(const Geometry& G, const bf16* X, int i) { return i < G.n ? X + (int64_t)i * G.D : nullptr; }

// Row c of the remote segment (the global slots XG, then every strided key of X), or nullptr past its end.
inline const bf16* remote_row(const Geometry& G, const bf16* X, const bf16* XG, int c) {
  if (c < G.g) return XG + (int64_t)c * G.D;
  const int k = c - G.g;
  return k < G.n_strided ? X + ((int64_t)(k + 1) * G.stride - 1) * G.D : nullptr;
}

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
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(x, vm)));
    _mm512_storeu_ps(row + c, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int c = 0; c < kp; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c), to_bf16x16(_mm512_mul_ps(_mm512_loadu_ps(row + c), inv)));
  return m + std::log(total);
}

// P and dS of one key chunk (block columns col0.., w of them) for the block's rows from i0: P
// recomputed from the scores and each row's log-sum-exp, dS = P * (dP - delta) * scale. dS goes to
// `dscores` as bf16 rows (rows x w); both go, rows in pairs (zeros for rows past `rows`, up to
// `padded_rows`), to store_pairs(r, c, P pair, dS pair) as 16 interleaved bf16 pairs.
template <class StorePairs>
inline void probs_and_dscores(const Geometry& G, const BlockKeys& b, const int32_t* strided_flag, int i0, int rows,
                              int padded_rows, int col0, int w, const float* scores, const float* dprobs,
                              const float* lse, const float* delta, bf16* dscores, StorePairs store_pairs) {
  const __m512 scale = _mm512_set1_ps(G.scale), scale2 = _mm512_set1_ps(G.scale * LOG2E);
  for (int r = 0; r < padded_rows; r += 2)
    for (int c = 0; c < w; c += 16) {
      __m512 prob[2], ds[2];
      for (int h = 0; h < 2; ++h) {
        const int rr = r + h;
        if (rr >= rows) { prob[h] = ds[h] = _mm512_setzero_ps(); continue; }
        const __mmask16 vis = visible16(G, b, strided_flag, col0 + c, i0 + rr);
        // P = exp(s scale - lse) = 2^(s scale log2 e - lse log2 e)
        const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(scores + (int64_t)rr * w + c), scale2,
                                         _mm512_set1_ps(lse[rr] * LOG2E));
        prob[h] = _mm512_maskz_mov_ps(vis, exp2_16(x));
        const __m512 dp = _mm512_loadu_ps(dprobs + (int64_t)rr * w + c);
        ds[h] = _mm512_mul_ps(_mm512_mul_ps(prob[h], _mm512_sub_ps(dp, _mm512_set1_ps(delta[rr]))), scale);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dscores + (int64_t)rr * w + c), to_bf16x16(ds[h]));
      }
      store_pairs(r, c, interleave_bf16(prob[0], prob[1]), interleave_bf16(ds[0], ds[1]));
    }
}

// Each row's backward constants: its saved log-sum-exp and delta = rowsum(dO * O).
inline void row_constants(const Geometry& G, const float* LSE, const bf16* dO, const bf16* O, int i0, int rows,
                          std::vector<float>& lse, std::vector<float>& delta) {
  lse.resize(rows);
  delta.resize(rows);
  for (int r = 0; r < rows; ++r) {
    lse[r] = LSE[i0 + r];
    delta[r] = row_dot(dO + (int64_t)(i0 + r) * G.D, O + (int64_t)(i0 + r) * G.D, G.D);
  }
}

// A kernel's forward entry point. q, k, v: (BH, n, D) bf16 contiguous; kg, vg: (BH, g, D) (g may
// be 0). pack_head(G, K, V, KG, VG, false, head) packs each head's keys once, then
// forward_block(G, head, flags, Q, i0, i1, O, LSE) runs every (head, query block) in parallel, and
// done() ends each worker. Returns {out, lse}.
template <class Head, class PackHead, class ForwardBlock, class Done>
std::vector<at::Tensor> forward_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& kg, const at::Tensor& vg, int64_t window, int64_t stride,
                                      int64_t block, PackHead pack_head, ForwardBlock forward_block, Done done) {
  TORCH_CHECK(block % 16 == 0, "block must be a multiple of 16");
  const Geometry G = geometry(q, kg.size(1), window, stride, block);
  const auto flags = strided_flags(G);
  const int64_t bh = q.size(0), n_blocks = (G.n + G.block - 1) / G.block;
  const int64_t nD = (int64_t)G.n * G.D, gD = (int64_t)G.g * G.D;
  std::vector<Head> heads(bh);
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      pack_head(G, ptr(k) + h * nD, ptr(v) + h * nD, ptr(kg) + h * gD, ptr(vg) + h * gD, false, heads[h]);
  });
  auto out = at::empty_like(q);
  auto lse = at::empty({bh, G.n}, q.options().dtype(at::kFloat));
  at::parallel_for(0, bh * n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / n_blocks, blk = task % n_blocks;
      const int i0 = (int)(blk * G.block);
      forward_block(G, heads[h], flags.data(), ptr(q) + h * nD, i0, std::min(G.n, i0 + G.block),
                    mut_ptr(out) + h * nD, lse.data_ptr<float>() + h * G.n);
    }
    done();
  });
  return {out, lse};
}

// A kernel's backward entry point: every head in parallel, each thread with its own `State`.
// backward_head(G, flags, state, h, grads) fills head h of grads = {dq, dk, dv (bf16, like q),
// dkg, dvg (fp32, zeroed, like kg)}, and done() ends each worker. dK and dV accumulate in fp32 per
// head in a thread's own buffers: full-size fp32 gradients would triple the memory at long sequences.
template <class State, class BackwardHead, class Done>
std::vector<at::Tensor> backward_entry(const at::Tensor& q, const at::Tensor& kg, int64_t window, int64_t stride,
                                       int64_t block, BackwardHead backward_head, Done done) {
  const Geometry G = geometry(q, kg.size(1), window, stride, block);
  const auto flags = strided_flags(G);
  const auto f32 = q.options().dtype(at::kFloat);
  std::vector<at::Tensor> grads{at::empty_like(q), at::empty_like(q), at::empty_like(q), at::zeros(kg.sizes(), f32),
                                at::zeros(kg.sizes(), f32)};
  at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
    State state;
    for (int64_t h = begin; h < end; ++h) backward_head(G, flags.data(), state, h, grads);
    done();
  });
  return grads;
}

}  // namespace
