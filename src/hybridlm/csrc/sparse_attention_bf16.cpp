// Fused sparse causal attention (local window + strided + global keys) for CPUs with AVX-512 BF16.
//
// Keys are split into two segments: "remote" (the global slots, then every strided key in order)
// and "span" (all positions). Both are packed once per (batch, head) into the layouts that the
// `vdpbf16ps` instruction wants. A block of query rows then sees a prefix of the remote segment
// (global slots + strided keys before its span) and a slice of the span segment, so no per-block
// copy of keys is made. Scores, the masked softmax and P.V stay in per-thread cache-sized buffers:
// nothing of size n x n, or n x keys, is ever written to memory. The backward pass recomputes P
// from the saved log-sum-exp (as FlashAttention does) and accumulates dQ, dK, dV in fp32.
//
// Two micro-kernels do all matrix work:
//   dot_keys: C[r][c] = sum_d A[r][d] * B[c][d]  (B packed key-major: the 16 lanes are 16 keys)
//   acc_dims: C[r][d] = sum_c A(r,c) * B[c][d]   (A read as bf16 pairs, B packed pair-major: lanes are dims)
#include "sparse_common.h"

namespace {

// ---------------------------------------------------------------- packing (once per batch*head)

// rows(i) -> [tile][D/2][16][2]: lanes are 16 consecutive rows. Missing rows (nullptr) are zeros.
template <class RowFn>
void pack_lanes(RowFn row, int padded, int D, bf16* out) {
  const int half = D / 2;
  for (int t = 0; t < padded / 16; ++t)
    for (int j = 0; j < 16; ++j) {
      const bf16* src = row(t * 16 + j);
      uint32_t* dst = reinterpret_cast<uint32_t*>(out) + (int64_t)t * half * 16 + j;
      for (int d2 = 0; d2 < half; ++d2) {
        uint32_t v = 0;
        if (src) std::memcpy(&v, src + 2 * d2, 4);
        dst[d2 * 16] = v;
      }
    }
}

// rows(i) -> [i/2][D][2]: pairs of consecutive rows interleaved per dim (padded even).
template <class RowFn>
void pack_pairs(RowFn row, int padded, int D, bf16* out) {
  for (int c2 = 0; c2 < padded / 2; ++c2) {
    const bf16* a = row(2 * c2);
    const bf16* b = row(2 * c2 + 1);
    bf16* dst = out + (int64_t)c2 * D * 2;
    for (int d = 0; d < D; ++d) {
      dst[2 * d] = a ? a[d] : 0;
      dst[2 * d + 1] = b ? b[d] : 0;
    }
  }
}

// ---------------------------------------------------------------- micro-kernels

template <int NR, int NT>
inline void dot_keys_tile(const bf16* A, int lda, const bf16* Bp, int D, float* C, int ldc) {
  const int half = D / 2;
  __m512 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int d2 = 0; d2 < half; ++d2) {
    __m512bh b[NT];
    for (int t = 0; t < NT; ++t) b[t] = (__m512bh)_mm512_loadu_si512(Bp + ((int64_t)t * half + d2) * 32);
    for (int r = 0; r < NR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + (int64_t)r * lda + 2 * d2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(C + (int64_t)r * ldc + t * 16, acc[r][t]);
}

// C[r][c] = sum_d A[r][d] * B[c][d] for r < rows and c < 16 * tiles.
void dot_keys(const bf16* A, int lda, int rows, const bf16* Bp, int tiles, int D, float* C, int ldc) {
  const int64_t tile = (int64_t)D * 16;
  int r = 0;
  for (; r + 8 <= rows; r += 8) {
    int t = 0;
    for (; t + 2 <= tiles; t += 2) dot_keys_tile<8, 2>(A + (int64_t)r * lda, lda, Bp + t * tile, D, C + (int64_t)r * ldc + t * 16, ldc);
    for (; t < tiles; ++t) dot_keys_tile<8, 1>(A + (int64_t)r * lda, lda, Bp + t * tile, D, C + (int64_t)r * ldc + t * 16, ldc);
  }
  for (; r + 4 <= rows; r += 4) {
    int t = 0;
    for (; t + 2 <= tiles; t += 2) dot_keys_tile<4, 2>(A + (int64_t)r * lda, lda, Bp + t * tile, D, C + (int64_t)r * ldc + t * 16, ldc);
    for (; t < tiles; ++t) dot_keys_tile<4, 1>(A + (int64_t)r * lda, lda, Bp + t * tile, D, C + (int64_t)r * ldc + t * 16, ldc);
  }
  for (; r < rows; ++r) {
    int t = 0;
    for (; t + 2 <= tiles; t += 2) dot_keys_tile<1, 2>(A + (int64_t)r * lda, lda, Bp + t * tile, D, C + (int64_t)r * ldc + t * 16, ldc);
    for (; t < tiles; ++t) dot_keys_tile<1, 1>(A + (int64_t)r * lda, lda, Bp + t * tile, D, C + (int64_t)r * ldc + t * 16, ldc);
  }
}

// A(r, c2) is the 32-bit bf16 pair at A32[r * row_stride + c2 * pair_stride].
template <int NR, int DV>
inline void acc_dims_rows(const uint32_t* A32, int64_t row_stride, int64_t pair_stride, const bf16* Bp, int pairs,
                          float* C, int ldc, bool accumulate) {
  constexpr int D = DV * 16;
  __m512 acc[NR][DV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < DV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(C + (int64_t)r * ldc + v * 16) : _mm512_setzero_ps();
  for (int c2 = 0; c2 < pairs; ++c2) {
    __m512bh b[DV];
    for (int v = 0; v < DV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(Bp + ((int64_t)c2 * D + v * 16) * 2);
    for (int r = 0; r < NR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)A32[r * row_stride + c2 * pair_stride]);
      for (int v = 0; v < DV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(C + (int64_t)r * ldc + v * 16, acc[r][v]);
}

template <int DV>
void acc_dims_dv(const uint32_t* A32, int64_t row_stride, int64_t pair_stride, int rows, const bf16* Bp, int pairs,
                 float* C, int ldc, bool accumulate) {
  int r = 0;
  for (; r + 4 <= rows; r += 4)
    acc_dims_rows<4, DV>(A32 + r * row_stride, row_stride, pair_stride, Bp, pairs, C + (int64_t)r * ldc, ldc, accumulate);
  for (; r < rows; ++r)
    acc_dims_rows<1, DV>(A32 + r * row_stride, row_stride, pair_stride, Bp, pairs, C + (int64_t)r * ldc, ldc, accumulate);
}

// C[r][d] (+)= sum_c A(r, c) * B[c][d], with A(r, c) read as pairs (c = 2*c2, 2*c2 + 1).
void acc_dims(const uint32_t* A32, int64_t row_stride, int64_t pair_stride, int rows, const bf16* Bp, int pairs,
              int D, float* C, int ldc, bool accumulate) {
  switch (D) {
    case 32: acc_dims_dv<2>(A32, row_stride, pair_stride, rows, Bp, pairs, C, ldc, accumulate); break;
    case 64: acc_dims_dv<4>(A32, row_stride, pair_stride, rows, Bp, pairs, C, ldc, accumulate); break;
    case 128: acc_dims_dv<8>(A32, row_stride, pair_stride, rows, Bp, pairs, C, ldc, accumulate); break;
    default: TORCH_CHECK(false, "head dim must be 32, 64 or 128");
  }
}

// Packed keys/values of one batch*head: remote segment and span segment, in the needed layouts.
struct Packed {
  std::vector<bf16> k_lanes, v_lanes, k_pairs, v_pairs;     // span segment (all positions, n16)
  std::vector<bf16> rk_lanes, rv_lanes, rk_pairs, rv_pairs;  // remote segment (r16)
};

void pack_head(const Geometry& G, const bf16* K, const bf16* V, const bf16* KG, const bf16* VG, bool backward,
               Packed& P) {
  const int64_t D = G.D;
  auto span = [&](const bf16* X) { return [&, X](int i) { return span_row(G, X, i); }; };
  auto remote = [&](const bf16* X, const bf16* XG) { return [&, X, XG](int c) { return remote_row(G, X, XG, c); }; };
  // One tensor (K or V) into one layout, for both segments.
  auto pack = [&](const bf16* X, const bf16* XG, bool lanes, std::vector<bf16>& span_out,
                  std::vector<bf16>& remote_out) {
    span_out.resize((size_t)G.n16 * D);
    remote_out.resize((size_t)G.r16 * D);
    if (lanes) {
      pack_lanes(span(X), G.n16, G.D, span_out.data());
      pack_lanes(remote(X, XG), G.r16, G.D, remote_out.data());
    } else {
      pack_pairs(span(X), G.n16, G.D, span_out.data());
      pack_pairs(remote(X, XG), G.r16, G.D, remote_out.data());
    }
  };
  pack(K, KG, true, P.k_lanes, P.rk_lanes);    // scores: Q . K
  pack(V, VG, false, P.v_pairs, P.rv_pairs);   // outputs: P . V
  if (backward) {
    pack(V, VG, true, P.v_lanes, P.rv_lanes);  // dP = dO . V
    pack(K, KG, false, P.k_pairs, P.rk_pairs); // dQ = dS . K
  }
}

// A run of a block's key columns [col, col + width) that lies in one segment, in all four layouts.
struct KeyChunk {
  int col, width;   // position in the block's key columns (remote first, then span)
  bool remote;      // a chunk of the remote segment (global slots and far strided keys)
  int remote_end;   // remote chunks: last visible remote column + 1
  int span_pos;     // span chunks: key position of the first column
  const bf16 *k_lanes, *v_lanes, *k_pairs, *v_pairs;
};

struct Scratch {
  std::vector<float> scores, dprobs, out, dq, row_lse, row_delta;
  std::vector<bf16> probs, dscores, probs_pairs, dscores_pairs;
  std::vector<KeyChunk> chunks;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Scores of `rows` query rows against both key segments: C (rows x kp).
void scores_both(const Geometry& G, const BlockKeys& b, const bf16* A, int rows, const bf16* remote_lanes,
                 const bf16* span_lanes, float* C, int kp) {
  const int64_t tile = (int64_t)G.D * 16;
  dot_keys(A, G.D, rows, remote_lanes, b.remote_tiles, G.D, C, kp);
  dot_keys(A, G.D, rows, span_lanes + (b.span_lo / 16) * tile, (b.span_hi - b.span_lo) / 16, G.D,
           C + 16 * b.remote_tiles, kp);
}

// P (rows x kp, bf16 pairs along keys) . [remote values; span values] -> C (rows x D), fp32.
void values_both(const Geometry& G, const BlockKeys& b, const uint32_t* A32, int rows, int kp,
                 const bf16* remote_pairs, const bf16* span_pairs, float* C, bool accumulate) {
  const int rp = 8 * b.remote_tiles;  // remote pairs
  acc_dims(A32, kp / 2, 1, rows, remote_pairs, rp, G.D, C, G.D, accumulate);
  acc_dims(A32 + rp, kp / 2, 1, rows, span_pairs + (int64_t)(b.span_lo / 2) * G.D * 2, (b.span_hi - b.span_lo) / 2,
           G.D, C, G.D, true);
}

// ---------------------------------------------------------------- forward

void forward_block(const Geometry& G, const Packed& P, const int32_t* strided_flag, const bf16* Q, int i0, int i1,
                   bf16* O, float* LSE) {
  Scratch& s = scratch();
  const BlockKeys b = block_keys(G, i0, i1);
  const int kp = b.kp(), rows = i1 - i0;
  s.scores.resize((size_t)rows * kp);
  s.probs.resize((size_t)rows * kp);
  s.out.resize((size_t)rows * G.D);
  scores_both(G, b, Q + (int64_t)i0 * G.D, rows, P.rk_lanes.data(), P.k_lanes.data(), s.scores.data(), kp);
  for (int r = 0; r < rows; ++r)
    LSE[i0 + r] = softmax_row(G, b, strided_flag, i0 + r, s.scores.data() + (int64_t)r * kp, kp,
                              s.probs.data() + (int64_t)r * kp);
  values_both(G, b, reinterpret_cast<const uint32_t*>(s.probs.data()), rows, kp, P.rv_pairs.data(),
              P.v_pairs.data(), s.out.data(), false);
  store_bf16(s.out.data(), (int64_t)rows * G.D, O + (int64_t)i0 * G.D);
}

// ---------------------------------------------------------------- backward

// Gradient rows C (one per remote column c0 <= c < c1) added to dKG (global slots) or to the
// strided rows of dK.
void scatter_remote(const Geometry& G, int c0, int c1, const float* C, float* dX, float* dXG) {
  for (int c = c0; c < c1; ++c) {
    float* target = c < G.g ? dXG + (int64_t)c * G.D : dX + ((int64_t)(c - G.g + 1) * G.stride - 1) * G.D;
    const float* src = C + (int64_t)(c - c0) * G.D;
    for (int d = 0; d < G.D; d += 16)
      _mm512_storeu_ps(target + d, _mm512_add_ps(_mm512_loadu_ps(target + d), _mm512_loadu_ps(src + d)));
  }
}


// Key columns per chunk in the backward pass: keeps the chunk's scores, probabilities and their
// pair layouts (about 0.4 MB for 64 rows) in the core's L2 cache at any sequence length. Dense
// causal backward at n = 16384 went from 311 to 465 GFLOP/s (benchmarks/dense_kernel.py); chunks of
// 256 and 1024 columns measured the same as 512.
constexpr int KEY_CHUNK = 512;

// The block's keys as chunks of at most KEY_CHUNK columns, written into `chunks` (reused per thread).
void key_chunks(const Geometry& G, const Packed& P, const BlockKeys& b, std::vector<KeyChunk>& chunks) {
  chunks.clear();
  const int64_t D = G.D;
  const int remote_cols = 16 * b.remote_tiles;
  for (int c = 0; c < remote_cols; c += KEY_CHUNK) {
    const int w = std::min(KEY_CHUNK, remote_cols - c);
    chunks.push_back({c, w, true, std::min(c + w, b.remote_count), 0, P.rk_lanes.data() + c * D, P.rv_lanes.data() + c * D,
                      P.rk_pairs.data() + c * D, P.rv_pairs.data() + c * D});
  }
  for (int p = b.span_lo; p < b.span_hi; p += KEY_CHUNK) {
    const int w = std::min(KEY_CHUNK, b.span_hi - p);
    chunks.push_back({remote_cols + p - b.span_lo, w, false, 0, p, P.k_lanes.data() + p * D, P.v_lanes.data() + p * D,
                      P.k_pairs.data() + p * D, P.v_pairs.data() + p * D});
  }
}

void backward_block(const Geometry& G, const Packed& P, const int32_t* strided_flag, const bf16* Q, const bf16* dO,
                    const bf16* O, const float* LSE, const bf16* q_pairs, const bf16* do_pairs, int i0, int i1,
                    bf16* dQ, float* dK, float* dV, float* dKG, float* dVG) {
  Scratch& s = scratch();
  const BlockKeys b = block_keys(G, i0, i1);
  const int rows = i1 - i0, rows_even = round_up(rows, 2), D = G.D, pairs = rows_even / 2;
  const int width_max = std::min(KEY_CHUNK, std::max(16 * b.remote_tiles, b.span_hi - b.span_lo));
  s.scores.resize((size_t)rows_even * width_max);
  s.dprobs.resize((size_t)rows_even * width_max);
  s.dscores.resize((size_t)rows * width_max);
  s.probs_pairs.resize((size_t)rows_even * width_max);
  s.dscores_pairs.resize((size_t)rows_even * width_max);
  s.out.resize((size_t)width_max * D);
  s.dq.resize((size_t)rows * D);
  row_constants(G, LSE, dO, O, i0, rows, s.row_lse, s.row_delta);
  const bf16* q = Q + (int64_t)i0 * D;
  const bf16* dout = dO + (int64_t)i0 * D;
  const bf16* qp = q_pairs + (int64_t)(i0 / 2) * D * 2;
  const bf16* dop = do_pairs + (int64_t)(i0 / 2) * D * 2;
  bool first = true;
  key_chunks(G, P, b, s.chunks);
  for (const KeyChunk& k : s.chunks) {
    const int w = k.width;
    dot_keys(q, D, rows, k.k_lanes, w / 16, D, s.scores.data(), w);
    dot_keys(dout, D, rows, k.v_lanes, w / 16, D, s.dprobs.data(), w);
    probs_and_dscores(G, b, strided_flag, i0, rows, rows_even, k.col, w, s.scores.data(), s.dprobs.data(),
                      s.row_lse.data(), s.row_delta.data(), s.dscores.data(), [&](int r, int c, __m512i p, __m512i ds) {
      const int64_t at = ((int64_t)(r / 2) * w + c) * 2;  // pairs of rows interleaved, per key column
      _mm512_storeu_si512(s.probs_pairs.data() + at, p);
      _mm512_storeu_si512(s.dscores_pairs.data() + at, ds);
    });
    // dQ += dS . K over this chunk's keys
    acc_dims(reinterpret_cast<const uint32_t*>(s.dscores.data()), w / 2, 1, rows, k.k_pairs, w / 2, D, s.dq.data(),
             D, !first);
    first = false;
    // dK = dS^T . Q and dV = P^T . dO: rows are keys, pairs run over the block's query rows.
    const uint32_t* ds32 = reinterpret_cast<const uint32_t*>(s.dscores_pairs.data());
    const uint32_t* p32 = reinterpret_cast<const uint32_t*>(s.probs_pairs.data());
    if (k.remote) {
      const int used = k.remote_end - k.col;
      acc_dims(ds32, 1, w, used, qp, pairs, D, s.out.data(), D, false);
      scatter_remote(G, k.col, k.remote_end, s.out.data(), dK, dKG);
      acc_dims(p32, 1, w, used, dop, pairs, D, s.out.data(), D, false);
      scatter_remote(G, k.col, k.remote_end, s.out.data(), dV, dVG);
    } else {
      acc_dims(ds32, 1, w, w, qp, pairs, D, dK + (int64_t)k.span_pos * D, D, true);
      acc_dims(p32, 1, w, w, dop, pairs, D, dV + (int64_t)k.span_pos * D, D, true);
    }
  }
  store_bf16(s.dq.data(), (int64_t)rows * D, dQ + (int64_t)i0 * D);
}

// ---------------------------------------------------------------- entry points

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                int64_t window, int64_t stride, int64_t block) {
  return forward_entry<Packed>(q, k, v, kg, vg, window, stride, block, pack_head, forward_block, [] {});
}

// One thread's buffers for the backward of its heads.
struct BackwardState {
  Packed packed;
  std::vector<bf16> q_pairs, do_pairs;
  std::vector<float> dk_h, dv_h;
};

std::vector<at::Tensor> backward(at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg,
                                 at::Tensor vg, at::Tensor out, at::Tensor lse, int64_t window, int64_t stride,
                                 int64_t block) {
  auto head = [&](const Geometry& G, const int32_t* flags, BackwardState& st, int64_t h, std::vector<at::Tensor>& grads) {
    const int64_t D = G.D, off = h * G.n * D, goff = h * G.g * D;
    pack_head(G, ptr(k) + off, ptr(v) + off, ptr(kg) + goff, ptr(vg) + goff, true, st.packed);
    const bf16* qh = ptr(q) + off;
    const bf16* doh = ptr(grad_out) + off;
    st.q_pairs.resize((size_t)round_up(G.n, 2) * D);
    st.do_pairs.resize((size_t)round_up(G.n, 2) * D);
    pack_pairs([&](int i) { return span_row(G, qh, i); }, round_up(G.n, 2), G.D, st.q_pairs.data());
    pack_pairs([&](int i) { return span_row(G, doh, i); }, round_up(G.n, 2), G.D, st.do_pairs.data());
    st.dk_h.assign((size_t)G.n16 * D, 0.f);
    st.dv_h.assign((size_t)G.n16 * D, 0.f);
    for (int i0 = 0; i0 < G.n; i0 += G.block)
      backward_block(G, st.packed, flags, qh, doh, ptr(out) + off, lse.data_ptr<float>() + h * G.n, st.q_pairs.data(),
                     st.do_pairs.data(), i0, std::min(G.n, i0 + G.block), mut_ptr(grads[0]) + off, st.dk_h.data(),
                     st.dv_h.data(), grads[3].data_ptr<float>() + goff, grads[4].data_ptr<float>() + goff);
    store_bf16(st.dk_h.data(), G.n * D, mut_ptr(grads[1]) + off);
    store_bf16(st.dv_h.data(), G.n * D, mut_ptr(grads[2]) + off);
  };
  return backward_entry<BackwardState>(q, kg, window, stride, block, head, [] {});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "sparse attention forward (bf16)");
  m.def("backward", &backward, "sparse attention backward (bf16)");
  m.attr("dense_block") = 64;  // the query block for dense layers: no slower than 32 or 128 at n = 1024..16384
}
