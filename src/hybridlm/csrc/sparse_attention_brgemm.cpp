// Fused sparse causal attention (local window + strided + global keys) on oneDNN's brgemm
// micro-kernel, the one PyTorch's own CPU flash attention uses: on CPUs with AMX it runs the block
// matmuls on the tile engine, elsewhere on AVX-512 BF16. The geometry, mask and softmax are those of
// sparse_attention_bf16.cpp (sparse_common.h); here every matrix product is one brgemm call
//   C (M x N, fp32) (+)= A (M x K, bf16 row-major) . B (K x N, bf16 VNNI pairs [K/2][N][2]),
// with N one of 16/32/48/64 and ld_b = N, the B shapes oneDNN's AMX kernels take. Hence the layouts:
// K^T and V^T in tiles of 64 keys (scores, dP), K and V as row pairs in blocks of 64 dims (P.V, dS.K),
// and the backward's dK^T = Q^T . dS and dV^T = dO^T . P with P and dS written as pair tiles of 64
// keys, accumulated per head and transposed once at its end.
#include "sparse_common.h"

#include <ATen/native/CPUBlas.h>

namespace {

constexpr int KT = 64;          // keys per packed tile, and the key granule of a block's columns
constexpr int KEY_CHUNK = 512;  // key columns per backward step: 64 rows of its scores stay in L2

int dim_block(int D) { return std::min(D, 64); }

// C (M x N, ld_c) (+)= A (M x K, ld_a) . B (K x N in VNNI pairs, ld_b = N).
inline void gemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, const bf16* A, const bf16* B, float* C, int64_t ld_c,
                 bool add) {
  at::native::cpublas::brgemm(M, N, K, ld_a, N, ld_c, add, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}

// ---------------------------------------------------------------- packing (once per batch*head)

// rows(i) -> K^T tiles [padded/KT][D/2][KT][2]: tile t is the B operand of keys t*KT.. (missing rows: zeros).
template <class RowFn>
void pack_key_tiles(RowFn row, int padded, int D, bf16* out) {
  for (int i = 0; i < padded; ++i) {
    const bf16* src = row(i);
    bf16* dst = out + (int64_t)(i / KT) * D * KT + 2 * (i % KT);
    for (int d2 = 0; d2 < D / 2; ++d2) {
      dst[(int64_t)d2 * 2 * KT] = src ? src[2 * d2] : 0;
      dst[(int64_t)d2 * 2 * KT + 1] = src ? src[2 * d2 + 1] : 0;
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

// rows(i) (i < n, D wide) -> the transposed matrix (D x padded), zeros beyond n; 16 rows at a time
// so that reads and writes both stay in whole cache lines.
void transpose_rows(const bf16* X, int n, int padded, int D, bf16* out) {
  for (int i0 = 0; i0 < padded; i0 += 16)
    for (int d = 0; d < D; ++d)
      for (int j = 0; j < 16; ++j) out[(int64_t)d * padded + i0 + j] = i0 + j < n ? X[(int64_t)(i0 + j) * D + d] : 0;
}

// The first n columns of an fp32 (D x padded) matrix -> bf16 rows (n x D).
void untranspose_to_bf16(const float* X, int n, int padded, int D, bf16* out) {
  float rows[16 * 128];
  for (int i0 = 0; i0 < n; i0 += 16) {
    const int m = std::min(16, n - i0);
    for (int d = 0; d < D; ++d)
      for (int j = 0; j < m; ++j) rows[j * D + d] = X[(int64_t)d * padded + i0 + j];
    store_bf16(rows, (int64_t)m * D, out + (int64_t)i0 * D);
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

struct Scratch {
  std::vector<float> scores, dprobs, out, dq, row_lse, row_delta;
  std::vector<bf16> probs, dscores, p_tiles, ds_tiles;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// ---------------------------------------------------------------- forward

void forward_block(const Geometry& G, const HeadKeys& H, const int32_t* strided_flag, const bf16* Q, int i0, int i1,
                   bf16* O, float* LSE) {
  Scratch& s = scratch();
  const BlockKeys b = block_keys(G, i0, i1, KT);
  const int kp = b.kp(), rows = i1 - i0, rc = 16 * b.remote_tiles, span = b.span_hi - b.span_lo;
  s.scores.resize((size_t)rows * kp);
  s.probs.resize((size_t)rows * kp);
  s.out.resize((size_t)rows * G.D);
  const bf16* q = Q + (int64_t)i0 * G.D;
  key_products(G, q, rows, H.remote.k_tiles, 0, rc, s.scores.data(), kp);
  key_products(G, q, rows, H.span.k_tiles, b.span_lo, span, s.scores.data() + rc, kp);
  for (int r = 0; r < rows; ++r)
    LSE[i0 + r] = softmax_row(G, b, strided_flag, i0 + r, s.scores.data() + (int64_t)r * kp, kp,
                              s.probs.data() + (int64_t)r * kp);
  row_products(G, s.probs.data(), kp, rows, H.remote, H.remote.v_pairs, 0, rc, s.out.data(), false);
  row_products(G, s.probs.data() + rc, kp, rows, H.span, H.span.v_pairs, b.span_lo, span, s.out.data(), rc > 0);
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
  const int ld_t = H.span.padded;  // of Q^T and dO^T
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
      gemm(D, KT, rows16, ld_t, A.qt.data() + i0, s.ds_tiles.data() + tile, dkt + start + t * KT, seg.padded, true);
      gemm(D, KT, rows16, ld_t, A.dot.data() + i0, s.p_tiles.data() + tile, dvt + start + t * KT, seg.padded, true);
    }
  };
  for (int c = 0; c < rc; c += KEY_CHUNK)
    chunk(H.remote, c, c, std::min(KEY_CHUNK, rc - c), A.dkt_remote.data(), A.dvt_remote.data());
  for (int p = b.span_lo; p < b.span_hi; p += KEY_CHUNK)
    chunk(H.span, p, rc + p - b.span_lo, std::min(KEY_CHUNK, b.span_hi - p), A.dkt_span.data(), A.dvt_span.data());
  store_bf16(s.dq.data(), (int64_t)rows * D, dQ + (int64_t)i0 * D);
}

// The remote segment's gradient columns added to the global slots (dXG, rows) or to the strided
// keys' columns of the span accumulator.
void scatter_remote(const Geometry& G, const HeadKeys& H, const float* remote_t, float* span_t, float* dXG) {
  for (int c = 0; c < G.g + G.n_strided; ++c)
    for (int d = 0; d < G.D; ++d) {
      const float v = remote_t[(int64_t)d * H.remote.padded + c];
      if (c < G.g)
        dXG[(int64_t)c * G.D + d] = v;
      else
        span_t[(int64_t)d * H.span.padded + (int64_t)(c - G.g + 1) * G.stride - 1] += v;
    }
}

// ---------------------------------------------------------------- entry points

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                int64_t window, int64_t stride, int64_t block) {
  // the AMX tile state is handed back at the end of each worker (a no-op without AMX)
  return forward_entry<HeadKeys>(q, k, v, kg, vg, window, stride, block, pack_head, forward_block,
                                 [] { at::native::cpublas::brgemm_release(true); });
}

std::vector<at::Tensor> backward(at::Tensor grad_out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg,
                                 at::Tensor vg, at::Tensor out, at::Tensor lse, int64_t window, int64_t stride,
                                 int64_t block) {
  auto head = [&](const Geometry& G, const int32_t* flags, HeadGrads& A, int64_t h, std::vector<at::Tensor>& grads) {
    const int64_t D = G.D, off = h * G.n * D, goff = h * G.g * D;
    HeadKeys& H = A.keys;
    pack_head(G, ptr(k) + off, ptr(v) + off, ptr(kg) + goff, ptr(vg) + goff, true, H);
    const int sp = H.span.padded, rp = H.remote.padded;
    A.qt.resize((size_t)D * sp);
    A.dot.resize((size_t)D * sp);
    transpose_rows(ptr(q) + off, G.n, sp, G.D, A.qt.data());
    transpose_rows(ptr(grad_out) + off, G.n, sp, G.D, A.dot.data());
    A.dkt_span.assign((size_t)D * sp, 0.f);
    A.dvt_span.assign((size_t)D * sp, 0.f);
    A.dkt_remote.assign((size_t)D * rp, 0.f);
    A.dvt_remote.assign((size_t)D * rp, 0.f);
    for (int i0 = 0; i0 < G.n; i0 += G.block)
      backward_block(G, H, A, flags, ptr(q) + off, ptr(grad_out) + off, ptr(out) + off, lse.data_ptr<float>() + h * G.n,
                     i0, std::min(G.n, i0 + G.block), mut_ptr(grads[0]) + off);
    scatter_remote(G, H, A.dkt_remote.data(), A.dkt_span.data(), grads[3].data_ptr<float>() + goff);
    scatter_remote(G, H, A.dvt_remote.data(), A.dvt_span.data(), grads[4].data_ptr<float>() + goff);
    untranspose_to_bf16(A.dkt_span.data(), G.n, sp, G.D, mut_ptr(grads[1]) + off);
    untranspose_to_bf16(A.dvt_span.data(), G.n, sp, G.D, mut_ptr(grads[2]) + off);
  };
  return backward_entry<HeadGrads>(q, kg, window, stride, block, head,
                                   [] { at::native::cpublas::brgemm_release(true); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "sparse attention forward (bf16, brgemm)");
  m.def("backward", &backward, "sparse attention backward (bf16, brgemm)");
}
