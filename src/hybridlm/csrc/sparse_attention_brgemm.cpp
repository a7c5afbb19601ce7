// Fused sparse causal attention (local window + strided + global keys) as block matrix products:
// on CPUs with AMX our own tile micro-kernel (amx_gemm.h), elsewhere oneDNN's brgemm micro-kernel
// (the one PyTorch's own CPU flash attention uses; AVX-512 BF16 there). The geometry and mask are
// those of sparse_attention_bf16.cpp (sparse_common.h); here every matrix product is one call
//   C (M x N, fp32) (+)= A (M x K, bf16 row-major) . B (K x N, bf16 VNNI pairs [K/2][N][2]),
// with N one of 16/32/48/64 and ld_b = N. Hence the layouts:
// K^T and V^T in tiles of 64 keys (scores, dP), K and V as row pairs in blocks of 64 dims (P.V, dS.K),
// and the backward's dK^T = Q^T . dS and dV^T = dO^T . P with P and dS written as pair tiles of 64
// keys, accumulated per head in fp32 tiles and transposed once at its end. Both passes walk a
// block's keys in chunks of at most KEY_CHUNK, the forward with an online softmax (flash attention).
#include "amx_gemm.h"
#include "sparse_common.h"

#include <ATen/native/CPUBlas.h>

namespace {

constexpr int KT = 64;          // keys per packed tile, and the key granule of a block's columns
constexpr int KEY_CHUNK = 256;  // key columns per step: a 256-row block's scores (256 KB) stay in L2
// The query block for dense layers (window >= n). With 256 rows the backward's dK^T/dV^T products get
// K = 256 rather than 64, so each C tile is loaded and stored once per 8 tile products rather than 2:
// at n = 16,384 (6 heads) fwd + bwd measured 1.6-2.2 s against 3.1 s with 64 rows and 512-key chunks.
constexpr int DENSE_BLOCK = 256;

int dim_block(int D) { return std::min(D, 64); }

// C (M x N, ld_c) (+)= A (M x K, ld_a) . B (K x N in VNNI pairs, ld_b = N).
inline void gemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, const bf16* A, const bf16* B, float* C, int64_t ld_c,
                 bool add) {
  if (amx::available()) return amx::gemm(M, N, K, ld_a, A, B, C, ld_c, add);
  at::native::cpublas::brgemm(M, N, K, ld_a, N, ld_c, add, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}

// This thread's tiles configured for amx::gemm, before each task: other code on the same thread
// (oneDNN, PyTorch's own attention) may have configured them otherwise since.
inline void begin_tiles() {
  if (amx::available()) amx::configure();
}

// The tile state handed back at the end of each worker (a no-op without AMX).
inline void end_tiles() {
  if (amx::available()) amx::release();
  else at::native::cpublas::brgemm_release(true);
}

// ---------------------------------------------------------------- packing (once per batch*head)

// rows(i) -> K^T tiles [padded/KT][D/2][KT][2]: tile t is the B operand of keys t*KT.. (missing rows: zeros).
// A dim pair of one key is one 32-bit word, so this is a word transpose: 16 keys at a time, one
// gathered word from each of their rows per output line.
template <class RowFn>
void pack_key_tiles(RowFn row, int padded, int D, bf16* out) {
  for (int i0 = 0; i0 < padded; i0 += 16) {
    alignas(64) int64_t address[16];
    __mmask16 present = 0;
    for (int j = 0; j < 16; ++j) {
      const bf16* src = row(i0 + j);
      address[j] = reinterpret_cast<int64_t>(src);
      if (src) present |= (__mmask16)(1u << j);
    }
    __m512i lo = _mm512_load_si512(address), hi = _mm512_load_si512(address + 8);
    const __m512i next_pair = _mm512_set1_epi64(4);
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + (int64_t)(i0 / KT) * D * KT) + i0 % KT;
    for (int d2 = 0; d2 < D / 2; ++d2) {
      const __m256i a = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), (__mmask8)present, lo, nullptr, 1);
      const __m256i b = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), (__mmask8)(present >> 8), hi, nullptr, 1);
      _mm512_storeu_si512(dst + (int64_t)d2 * KT, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
      lo = _mm512_add_epi64(lo, next_pair);
      hi = _mm512_add_epi64(hi, next_pair);
    }
  }
}

// rows(i) -> row pairs in dim blocks [D/DB][padded/2][DB][2]: block b is the B operand of dims b*DB.. .
// Two rows at a time, 16 dims per step, so that every write is one whole 64-byte line (an element
// at a time it took a fifth of the kernel's fwd+bwd time at n = 16384 on an AMX Xeon, by perf).
template <class RowFn>
void pack_row_pairs(RowFn row, int padded, int D, bf16* out) {
  const int DB = dim_block(D);
  auto load16 = [](const bf16* src, int d) {
    return src ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)) : _mm256_setzero_si256();
  };
  for (int i = 0; i < padded; i += 2) {
    const bf16 *a = row(i), *b = row(i + 1);
    for (int d = 0; d < D; d += 16) {
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(load16(a, d)), load16(b, d), 1);
      _mm512_storeu_si512(out + (((int64_t)(d / DB) * (padded / 2) + i / 2) * DB + d % DB) * 2, interleave_halves(both));
    }
  }
}

inline __m512i lane_times(int step) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(step));
}

// Q or dO (n x D) -> per query block its transpose (D x block), zeros past n: block b starts at
// b * D * block, the A operand of that block's dK^T and dV^T products with ld_a = block. One
// (D x padded) matrix would put 32 KB between rows at n = 16,384 and every row in the same cache set.
// 16 rows at a time: one gathered word (a dim pair) from each, split into the two dims' lines.
void transpose_blocks(const bf16* X, int n, int block, int D, bf16* out) {
  const __m512i rows = lane_times(D / 2);
  for (int i0 = 0; i0 < round_up(n, block); i0 += 16) {
    const int left = n - i0;
    const __mmask16 present = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    const int b0 = i0 / block * block;
    bf16* dst = out + (int64_t)b0 * D + (i0 - b0);
    const uint32_t* src = reinterpret_cast<const uint32_t*>(X + (int64_t)std::min(i0, n - 1) * D);
    for (int d = 0; d < D; d += 2) {
      const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, rows, src + d / 2, 4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (int64_t)d * block), _mm512_cvtepi32_epi16(pair));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (int64_t)(d + 1) * block),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(pair, 16)));
    }
  }
}

// dK^T and dV^T accumulate in fp32 tiles [padded/KT][D][KT]: the C operand of one key tile is one
// contiguous 16 KB block (ld_c = KT) rather than 64 rows a whole padded row apart.
inline int64_t tile_at(int D, int key, int d) { return ((int64_t)(key / KT) * D + d) * KT + key % KT; }

// The first n keys of fp32 tiles [padded/KT][D][KT] -> bf16 rows (n x D), 16 dims gathered at a time.
void untranspose_to_bf16(const float* X, int n, int D, bf16* out) {
  const __m512i dims = lane_times(KT);
  for (int key = 0; key < n; ++key) {
    const float* column = X + tile_at(D, key, 0);
    for (int d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (int64_t)key * D + d),
                          to_bf16x16(_mm512_i32gather_ps(dims, column + (int64_t)d * KT, 4)));
  }
}

// One key segment of a head: "remote" (the global slots, then every strided key) or "span" (all positions).
struct Segment {
  int padded = 0;                      // keys, a multiple of KT
  std::vector<bf16> k_tiles, v_pairs;  // forward: scores Q.K^T and outputs P.V
  std::vector<bf16> v_tiles, k_pairs;  // backward: dP = dO.V^T and dQ = dS.K
};

struct HeadKeys {
  Segment remote, span;
};

void pack_head(const Geometry& G, const bf16* K, const bf16* V, const bf16* KG, const bf16* VG, bool backward,
               HeadKeys& H) {
  const int64_t D = G.D;
  auto span = [&](const bf16* X) { return [&, X](int i) { return span_row(G, X, i); }; };
  auto remote = [&](const bf16* X, const bf16* XG) { return [&, X, XG](int c) { return remote_row(G, X, XG, c); }; };
  auto pack = [&](Segment& seg, int keys, auto k_row, auto v_row) {
    seg.padded = round_up(keys, KT);
    const size_t size = (size_t)seg.padded * D;
    seg.k_tiles.resize(size);
    seg.v_pairs.resize(size);
    pack_key_tiles(k_row, seg.padded, G.D, seg.k_tiles.data());
    pack_row_pairs(v_row, seg.padded, G.D, seg.v_pairs.data());
    if (backward) {
      seg.v_tiles.resize(size);
      seg.k_pairs.resize(size);
      pack_key_tiles(v_row, seg.padded, G.D, seg.v_tiles.data());
      pack_row_pairs(k_row, seg.padded, G.D, seg.k_pairs.data());
    }
  };
  pack(H.remote, G.g + G.n_strided, remote(K, KG), remote(V, VG));
  pack(H.span, G.n, span(K), span(V));
}

// ---------------------------------------------------------------- products

// C (rows x count, ld_c) = A (rows x D) . keys [start, start + count)^T, from a segment's K^T (or V^T) tiles.
void key_products(const Geometry& G, const bf16* A, int rows, const std::vector<bf16>& tiles, int start, int count,
                  float* C, int ld_c) {
  for (int c = 0; c < count; c += KT)
    gemm(rows, KT, G.D, G.D, A, tiles.data() + (int64_t)(start + c) * G.D, C + c, ld_c, false);
}

// C (rows x D) (+)= A (rows x count, ld_a) . rows [start, start + count) of a segment's pairs (V, or K).
void row_products(const Geometry& G, const bf16* A, int ld_a, int rows, const Segment& seg,
                  const std::vector<bf16>& pairs, int start, int count, float* C, bool add) {
  const int DB = dim_block(G.D);
  for (int b = 0; b < G.D / DB; ++b)
    for (int c = 0; c < count; c += KEY_CHUNK)
      gemm(rows, DB, std::min(KEY_CHUNK, count - c), ld_a, A + c,
           pairs.data() + ((int64_t)b * (seg.padded / 2) + (start + c) / 2) * DB * 2, C + b * DB, G.D, add || c > 0);
}

// The block's key columns in chunks of at most KEY_CHUNK, remote segment first:
// fn(segment, its first key, the chunk's first block column, width, whether it is the remote one).
template <class Fn>
void for_each_chunk(const HeadKeys& H, const BlockKeys& b, Fn fn) {
  const int rc = 16 * b.remote_tiles;
  for (int c = 0; c < rc; c += KEY_CHUNK) fn(H.remote, c, c, std::min(KEY_CHUNK, rc - c), true);
  for (int p = b.span_lo; p < b.span_hi; p += KEY_CHUNK)
    fn(H.span, p, rc + p - b.span_lo, std::min(KEY_CHUNK, b.span_hi - p), false);
}

struct Scratch {
  std::vector<float> scores, dprobs, out, dq, row_lse, row_delta, row_max, row_sum;
  std::vector<bf16> probs, dscores, p_tiles, ds_tiles;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// ---------------------------------------------------------------- forward

// Query row i's online softmax over one key chunk (block columns col0.., w of them), in base 2:
// `x` (scores, overwritten with scores * scale * log2 e) -> `p` (2^(x - running max), bf16),
// updating the row's running max m and sum l (log2 units). Returns the factor the row's output so
// far must be scaled by (0 while nothing was visible).
inline float softmax_chunk(const Geometry& G, const BlockKeys& b, const int32_t* strided_flag, int i, int col0, float* x,
                           int w, bf16* p, float& m, float& l) {
  const __m512 scale = _mm512_set1_ps(G.scale * LOG2E), minus_inf = _mm512_set1_ps(-INFINITY);
  __m512 mx = minus_inf;
  for (int c = 0; c < w; c += 16) {
    const __mmask16 vis = visible16(G, b, strided_flag, col0 + c, i);
    const __m512 v = _mm512_mask_mul_ps(minus_inf, vis, _mm512_loadu_ps(x + c), scale);
    _mm512_storeu_ps(x + c, v);
    mx = _mm512_max_ps(mx, v);
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // two chains: the adds' latency, not the exps, bound one
  for (int c = 0; c < w; c += 16) {  // all zeros while m_new is still -inf
    const __m512 v = _mm512_loadu_ps(x + c);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, minus_inf, _CMP_NEQ_OQ), exp2_16(_mm512_sub_ps(v, vm)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c), to_bf16x16(e));
    sum[(c / 16) & 1] = _mm512_add_ps(sum[(c / 16) & 1], e);
  }
  const float alpha = m == -INFINITY ? 0.f : std::exp2(m - m_new);
  l = l * alpha + _mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1]));
  m = m_new;
  return alpha;
}

inline void scale_row(float* row, int D, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int d = 0; d < D; d += 16) _mm512_storeu_ps(row + d, _mm512_mul_ps(_mm512_loadu_ps(row + d), f));
}

// Flash attention over the block's key chunks: a dense layer's 16,384 keys would otherwise put
// 64 rows of fp32 scores (4 MB) past L2.
void forward_block(const Geometry& G, const HeadKeys& H, const int32_t* strided_flag, const bf16* Q, int i0, int i1,
                   bf16* O, float* LSE) {
  begin_tiles();
  Scratch& s = scratch();
  const BlockKeys b = block_keys(G, i0, i1, KT);
  const int rows = i1 - i0, width = std::min(KEY_CHUNK, std::max(16 * b.remote_tiles, b.span_hi - b.span_lo));
  s.scores.resize((size_t)rows * width);
  s.probs.resize((size_t)rows * width);
  s.out.resize((size_t)rows * G.D);
  s.row_max.assign(rows, -INFINITY);
  s.row_sum.assign(rows, 0.f);
  const bf16* q = Q + (int64_t)i0 * G.D;
  bool first = true;
  for_each_chunk(H, b, [&](const Segment& seg, int start, int col0, int w, bool) {
    key_products(G, q, rows, seg.k_tiles, start, w, s.scores.data(), w);
    for (int r = 0; r < rows; ++r) {
      const float alpha = softmax_chunk(G, b, strided_flag, i0 + r, col0, s.scores.data() + (int64_t)r * w, w,
                                        s.probs.data() + (int64_t)r * w, s.row_max[r], s.row_sum[r]);
      if (!first && alpha != 1.f) scale_row(s.out.data() + (int64_t)r * G.D, G.D, alpha);
    }
    row_products(G, s.probs.data(), w, rows, seg, seg.v_pairs, start, w, s.out.data(), !first);
    first = false;
  });
  for (int r = 0; r < rows; ++r) {
    scale_row(s.out.data() + (int64_t)r * G.D, G.D, 1.f / s.row_sum[r]);
    LSE[i0 + r] = (s.row_max[r] + std::log2(s.row_sum[r])) * LN2;  // back to natural log
  }
  store_bf16(s.out.data(), (int64_t)rows * G.D, O + (int64_t)i0 * G.D);
}

// ---------------------------------------------------------------- backward

// One thread's backward buffers: its head's packed keys, Q^T and dO^T (the A operands of dK^T and
// dV^T), and those two accumulators per segment.
struct HeadGrads {
  HeadKeys keys;
  std::vector<bf16> qt, dot;
  std::vector<float> dkt_remote, dvt_remote, dkt_span, dvt_span;
};

void backward_block(const Geometry& G, const HeadKeys& H, HeadGrads& A, const int32_t* strided_flag, const bf16* Q,
                    const bf16* dO, const bf16* O, const float* LSE, int i0, int i1, bf16* dQ) {
  Scratch& s = scratch();
  const BlockKeys b = block_keys(G, i0, i1, KT);
  const int rows = i1 - i0, rows16 = round_up(rows, 16), D = G.D, rc = 16 * b.remote_tiles;
  const int width_max = std::min(KEY_CHUNK, std::max(rc, b.span_hi - b.span_lo));
  s.scores.resize((size_t)rows * width_max);
  s.dprobs.resize((size_t)rows * width_max);
  s.dscores.resize((size_t)rows * width_max);
  s.p_tiles.resize((size_t)rows16 * width_max);
  s.ds_tiles.resize((size_t)rows16 * width_max);
  s.dq.resize((size_t)rows * D);
  row_constants(G, LSE, dO, O, i0, rows, s.row_lse, s.row_delta);
  const bf16* q = Q + (int64_t)i0 * D;
  const bf16* dout = dO + (int64_t)i0 * D;
  const bf16* qt = A.qt.data() + (int64_t)i0 * D;  // this block's Q^T and dO^T (D x G.block)
  const bf16* dot = A.dot.data() + (int64_t)i0 * D;
  bool first = true;
  // Keys [start, start + w) of one segment, which are the block's columns col0..: all four products.
  auto chunk = [&](const Segment& seg, int start, int col0, int w, float* dkt, float* dvt) {
    key_products(G, q, rows, seg.k_tiles, start, w, s.scores.data(), w);
    key_products(G, dout, rows, seg.v_tiles, start, w, s.dprobs.data(), w);
    probs_and_dscores(G, b, strided_flag, i0, rows, rows16, col0, w, s.scores.data(), s.dprobs.data(),
                      s.row_lse.data(), s.row_delta.data(), s.dscores.data(), [&](int r, int c, __m512i p, __m512i ds) {
      const int64_t at = (((int64_t)(c / KT) * (rows16 / 2) + r / 2) * KT + c % KT) * 2;  // 64-key pair tiles
      _mm512_storeu_si512(s.p_tiles.data() + at, p);
      _mm512_storeu_si512(s.ds_tiles.data() + at, ds);
    });
    row_products(G, s.dscores.data(), w, rows, seg, seg.k_pairs, start, w, s.dq.data(), !first);  // dQ += dS . K
    first = false;
    for (int t = 0; t < w / KT; ++t) {  // dK^T += Q^T . dS and dV^T += dO^T . P, one key tile at a time
      const int64_t tile = (int64_t)t * (rows16 / 2) * KT * 2;
      const int64_t at = (int64_t)(start + t * KT) * D;
      gemm(D, KT, rows16, G.block, qt, s.ds_tiles.data() + tile, dkt + at, KT, true);
      gemm(D, KT, rows16, G.block, dot, s.p_tiles.data() + tile, dvt + at, KT, true);
    }
  };
  for_each_chunk(H, b, [&](const Segment& seg, int start, int col0, int w, bool remote) {
    chunk(seg, start, col0, w, (remote ? A.dkt_remote : A.dkt_span).data(), (remote ? A.dvt_remote : A.dvt_span).data());
  });
  store_bf16(s.dq.data(), (int64_t)rows * D, dQ + (int64_t)i0 * D);
}

// The remote segment's gradient columns added to the global slots (dXG, rows) or to the strided
// keys' columns of the span accumulator.
void scatter_remote(const Geometry& G, const float* remote_t, float* span_t, float* dXG) {
  for (int c = 0; c < G.g + G.n_strided; ++c)
    for (int d = 0; d < G.D; ++d) {
      const float v = remote_t[tile_at(G.D, c, d)];
      if (c < G.g)
        dXG[(int64_t)c * G.D + d] = v;
      else
        span_t[tile_at(G.D, (c - G.g + 1) * G.stride - 1, d)] += v;
    }
}

// ---------------------------------------------------------------- entry points

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                int64_t window, int64_t stride, int64_t block) {
  return forward_entry<HeadKeys>(q, k, v, kg, vg, window, stride, block, pack_head, forward_block, end_tiles);
}

std::vector<at::Tensor> backward(at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg,
                                 at::Tensor vg, at::Tensor out, at::Tensor lse, int64_t window, int64_t stride,
                                 int64_t block) {
  auto head = [&](const Geometry& G, const int32_t* flags, HeadGrads& A, int64_t h, std::vector<at::Tensor>& grads) {
    const int64_t D = G.D, off = h * G.n * D, goff = h * G.g * D;
    HeadKeys& H = A.keys;
    pack_head(G, ptr(k) + off, ptr(v) + off, ptr(kg) + goff, ptr(vg) + goff, true, H);
    const int sp = H.span.padded, rp = H.remote.padded;
    const size_t blocks = (size_t)round_up(G.n, G.block) * D;
    A.qt.resize(blocks);
    A.dot.resize(blocks);
    transpose_blocks(ptr(q) + off, G.n, G.block, G.D, A.qt.data());
    transpose_blocks(ptr(grad_out) + off, G.n, G.block, G.D, A.dot.data());
    begin_tiles();
    A.dkt_span.assign((size_t)D * sp, 0.f);
    A.dvt_span.assign((size_t)D * sp, 0.f);
    A.dkt_remote.assign((size_t)D * rp, 0.f);
    A.dvt_remote.assign((size_t)D * rp, 0.f);
    for (int i0 = 0; i0 < G.n; i0 += G.block)
      backward_block(G, H, A, flags, ptr(q) + off, ptr(grad_out) + off, ptr(out) + off, lse.data_ptr<float>() + h * G.n,
                     i0, std::min(G.n, i0 + G.block), mut_ptr(grads[0]) + off);
    scatter_remote(G, A.dkt_remote.data(), A.dkt_span.data(), grads[3].data_ptr<float>() + goff);
    scatter_remote(G, A.dvt_remote.data(), A.dvt_span.data(), grads[4].data_ptr<float>() + goff);
    untranspose_to_bf16(A.dkt_span.data(), G.n, G.D, mut_ptr(grads[1]) + off);
    untranspose_to_bf16(A.dvt_span.data(), G.n, G.D, mut_ptr(grads[2]) + off);
  };
  return backward_entry<HeadGrads>(q, kg, window, stride, block, head, end_tiles);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "sparse attention forward (bf16, brgemm)");
  m.def("backward", &backward, "sparse attention backward (bf16, brgemm)");
  m.attr("dense_block") = DENSE_BLOCK;
}
