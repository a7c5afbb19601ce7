// Decode-step kernels for x86 CPUs: a few rows through a Linear layer, and one new query per head
// against a KV cache. Built twice: with AVX-512 BF16 (vdpbf16ps on bf16 pairs) and with AVX2 + FMA
// (bf16 widened to fp32 by a shift, then fused multiply-adds), for CPUs without AVX-512.
//
// A decode step multiplies one (or a batch's few) rows by every weight matrix: a matrix-vector
// product that is bound by reading the weights once. oneDNN's bf16 GEMM is built for large M and
// reaches about a tenth of the memory bandwidth there (without native bf16, far less); PyTorch's
// flash-attention kernel for CPUs splits work by query blocks, so one query per head leaves it
// mostly idle. Both kernels here read each weight (or key and value) once, with fp32 accumulation
// and one bf16 rounding of the result, as torch's bf16 matmul does.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int kMaxRows = 8;

#if defined(__AVX512BF16__)

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
    for (int j = 0; j < kOuts; ++j) wv[j] = load_pairs(w + (n0 + j) * K + k, mask);
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

// q . k for one key row (D bf16 values each).
inline float dot_row(const bf16* q, const bf16* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __mmask32 mask = tail_mask(D - d);
    acc = _mm512_dpbf16_ps(acc, load_pairs(k + d, mask), load_pairs(q + d, mask));
  }
  return _mm512_reduce_add_ps(acc);
}

// acc[0, D) += p * row[0, D)
inline void axpy_row(float p, const bf16* row, int64_t D, float* acc) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 vv = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d))), 16));
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, vv, _mm512_loadu_ps(acc + d)));
  }
  for (; d < D; ++d) acc[d] += p * static_cast<float>(row[d]);
}

#elif defined(__AVX2__) && defined(__FMA__)

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

inline void axpy_row(float p, const bf16* row, int64_t D, float* acc) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8(row + d), _mm256_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += p * static_cast<float>(row[d]);
}

#else
#error "decode_bf16.cpp needs AVX-512 BF16 or AVX2 with FMA"
#endif

enum Activation { kNone = 0, kGeluTanh = 1, kSwiGLU = 2 };

inline float gelu_tanh(float y) {
  return 0.5f * y * (1.0f + std::tanh(0.7978845608028654f * (y + 0.044715f * y * y * y)));
}

// Outputs [n0, n0 + kOuts) of kRows rows, with the activation applied in fp32 before the one
// rounding to bf16. SwiGLU reads the gate from weight rows n and the value from rows n + N.
template <int kRows, int kOuts>
void output_tile(const XRow* x, int64_t K, const bf16* w, const bf16* bias, int64_t n0, int64_t N, int act,
                 bf16* out) {
  float res[kRows][4], up[kRows][4];
  dot_tile<kRows, kOuts>(x, K, w, bias, n0, res);
  if (act == kSwiGLU) dot_tile<kRows, kOuts>(x, K, w, bias, n0 + N, up);
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kOuts; ++j) {
      float y = res[m][j];
      if (act == kGeluTanh) y = gelu_tanh(y);
      if (act == kSwiGLU) y = y / (1.0f + std::exp(-y)) * up[m][j];
      out[m * N + n0 + j] = static_cast<bf16>(y);
    }
}

template <int kRows>
void output_rows(const XRow* x, int64_t K, const bf16* w, const bf16* bias, int64_t n0, int64_t n1, int64_t N,
                 int act, bf16* out) {
  constexpr int kOuts = std::min(4, std::max(1, kMaxAccumulators / kRows));
  int64_t n = n0;
  for (; n + kOuts <= n1; n += kOuts) output_tile<kRows, kOuts>(x, K, w, bias, n, N, act, out);
  for (; n < n1; ++n) output_tile<kRows, 1>(x, K, w, bias, n, N, act, out);
}

// Rows in groups of up to four, each group in tiles of as many outputs as the registers hold.
void linear_block(const XRow* x, int64_t M, int64_t K, const bf16* w, const bf16* bias, int64_t n0, int64_t n1,
                  int64_t N, int act, bf16* out) {
  for (int64_t m = 0; m < M; m += 4) {
    const XRow* xm = x + m * K;
    bf16* om = out + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: output_rows<1>(xm, K, w, bias, n0, n1, N, act, om); break;
      case 2: output_rows<2>(xm, K, w, bias, n0, n1, N, act, om); break;
      case 3: output_rows<3>(xm, K, w, bias, n0, n1, N, act, om); break;
      default: output_rows<4>(xm, K, w, bias, n0, n1, N, act, om); break;
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
  for (const Keys& set : sets)
    for (int64_t s = 0; s < set.length; ++s, ++i) {
      scores[i] = dot_row(q, set.k + s * set.stride, D) * scale;
      top = std::max(top, scores[i]);
    }
  float total = 0.0f;
  for (int64_t s = 0; s < i; ++s) {
    scores[s] = std::exp(scores[s] - top);
    total += scores[s];
  }
  std::vector<float> acc(D, 0.0f);
  i = 0;
  for (const Keys& set : sets)
    for (int64_t s = 0; s < set.length; ++s, ++i) axpy_row(scores[i], set.v + s * set.stride, D, acc.data());
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<bf16>(acc[d] / total);
}

}  // namespace

// x (M, K) bf16, M <= 8; weight (N, K) bf16 contiguous; bias (N) bf16 or None; act 0 (none),
// 1 (tanh GELU) or 2 (SwiGLU: silu of the first N/2 outputs times the last N/2) -> (M, N or N/2).
at::Tensor linear(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && x.size(1) == weight.size(1), "linear: bad shapes");
  TORCH_CHECK(act >= kNone && act <= kSwiGLU && (act != kSwiGLU || weight.size(0) % 2 == 0), "linear: bad act");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = act == kSwiGLU ? weight.size(0) / 2 : weight.size(0);
  auto out = at::empty({M, N}, x.options());
  const bf16* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<bf16>();
  }
  std::vector<float> widened;
  const XRow* xp = prepared_rows(x.data_ptr<bf16>(), M, K, widened);
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  // About 16 KiB of weights per task: big enough to amortise the fork, small enough to balance.
  const int64_t grain = std::max<int64_t>(8, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { linear_block(xp, M, K, wp, b, n0, n1, N, act, op); });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "a few bf16 rows through a Linear layer");
  m.def("decode_attention", &decode_attention, "one bf16 query per head against a KV cache's key sets");
}
