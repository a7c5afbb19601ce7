// The elementwise glue of a bf16 training step in one pass each, for CPUs with AVX-512 BF16:
// rotate-half RoPE, SwiGLU, GELU (tanh form), RMSNorm/LayerNorm and the cross-entropy's softmax, forward and backward.
//
// PyTorch runs each as several elementwise kernels with bf16/fp32 promotions and temporaries in
// between: RoPE took about 14 ms to rotate the q and k heads of one `small` layer at 8 x 1024
// tokens, about 8% of a bf16 training step over forward and backward; SwiGLU and RMSNorm together
// about as much again. Here each element is read once and written once, in fp32 with one bf16
// rounding of each bf16 result.

#include "avx512_exp.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// (x1 cos - sign x2 sin, x2 cos + sign x1 sin) for one head of D = 2 * half values.
void rotate_head(const bf16* x, const float* cos, const float* sin, int64_t half, float sign, bf16* out) {
  const __m512 sign_v = _mm512_set1_ps(sign);
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
    const __m512 c = _mm512_loadu_ps(cos + i), s = _mm512_mul_ps(sign_v, _mm512_loadu_ps(sin + i));
    store16(out + i, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)));
    store16(out + half + i, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)));
  }
  for (; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]), s = sign * sin[i];
    out[i] = static_cast<bf16>(x1 * cos[i] - x2 * s);
    out[half + i] = static_cast<bf16>(x2 * cos[i] + x1 * s);
  }
}

}  // namespace

// x (B, T, N, D) bf16 with unit stride in D; cos, sin fp32 broadcastable to (B, T, 1, D/2) with
// unit stride in the last dim; sign +1 rotates, -1 rotates back (the backward) -> contiguous
// (B, T, N, D) bf16.
at::Tensor rotate(at::Tensor x, at::Tensor cos, at::Tensor sin, double sign) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "rotate: x must be (B, T, N, D) bf16 with unit stride in D");
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), D = x.size(3), half = D / 2;
  cos = cos.expand({B, T, 1, half});
  sin = sin.expand({B, T, 1, half});
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.stride(3) == 1 &&
                  sin.stride(3) == 1 && cos.strides() == sin.strides(),
              "rotate: cos and sin must be fp32 tables with unit stride along the frequencies");
  auto out = at::empty({B, T, N, D}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  bf16* op = out.data_ptr<bf16>();
  const float s = static_cast<float>(sign);
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const int64_t table = b * cos.stride(0) + t * cos.stride(1);
      for (int64_t n = 0; n < N; ++n)
        rotate_head(xp + b * x.stride(0) + t * x.stride(1) + n * x.stride(2), cp + table, sp + table, half, s,
                    op + (r * N + n) * D);
    }
  });
  return out;
}

// y (N, F) = silu(gate) * up for x (N, 2F) = [gate | up] bf16 (rows contiguous): one rounding.
at::Tensor swiglu(at::Tensor x) {
  x = x.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 2 == 0, "swiglu: x must be (N, 2F) bf16");
  const int64_t N = x.size(0), F = x.size(1) / 2;
  auto y = at::empty({N, F}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const bf16 *g = xp + n * 2 * F, *u = g + F;
      bf16* out = yp + n * F;
      int64_t i = 0;
      for (; i + 16 <= F; i += 16) {
        const __m512 gv = load16(g + i);
        store16(out + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), load16(u + i)));
      }
      for (; i < F; ++i) {
        const float gv = static_cast<float>(g[i]);
        out[i] = static_cast<bf16>(gv * sigmoid(gv) * static_cast<float>(u[i]));
      }
    }
  });
  return y;
}

// The gradient (N, 2F) = [dy up silu'(gate) | dy silu(gate)] of swiglu for dy (N, F) bf16.
at::Tensor swiglu_backward(at::Tensor dy, at::Tensor x) {
  dy = dy.contiguous();
  x = x.contiguous();
  TORCH_CHECK(dy.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && dy.size(0) == x.size(0) &&
                  2 * dy.size(1) == x.size(1),
              "swiglu_backward: bad shapes");
  const int64_t N = x.size(0), F = dy.size(1);
  auto dx = at::empty_like(x);
  const bf16 *xp = x.data_ptr<bf16>(), *dyp = dy.data_ptr<bf16>();
  bf16* dxp = dx.data_ptr<bf16>();
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t n = begin; n < end; ++n) {
      const bf16 *g = xp + n * 2 * F, *u = g + F, *d = dyp + n * F;
      bf16 *dg = dxp + n * 2 * F, *du = dg + F;
      int64_t i = 0;
      for (; i + 16 <= F; i += 16) {
        const __m512 gv = load16(g + i), uv = load16(u + i), dv = load16(d + i), s = sigmoid16(gv);
        const __m512 silu = _mm512_mul_ps(gv, s);
        // silu'(g) = s (1 + g (1 - s))
        const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
        store16(dg + i, _mm512_mul_ps(_mm512_mul_ps(dv, uv), dsilu));
        store16(du + i, _mm512_mul_ps(dv, silu));
      }
      for (; i < F; ++i) {
        const float gv = static_cast<float>(g[i]), s = sigmoid(gv), dv = static_cast<float>(d[i]);
        dg[i] = static_cast<bf16>(dv * static_cast<float>(u[i]) * s * (1.0f + gv * (1.0f - s)));
        du[i] = static_cast<bf16>(dv * gv * s);
      }
    }
  });
  return dx;
}

// GELU, tanh form (GPT-2's): gelu(x) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), since
// 0.5 (1 + tanh(u)) = sigmoid(2u). Its derivative: s + x s (1 - s) 2 u', u' = sqrt(2/pi) (1 + 3 0.044715 x^2).
constexpr float GELU_C = 0.7978845608f, GELU_A = 0.044715f;

inline __m512 gelu_gate16(__m512 x) {  // sigmoid(2u)
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 two_u = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2 * GELU_C), x),
                                     _mm512_fmadd_ps(_mm512_set1_ps(GELU_A), x2, _mm512_set1_ps(1.0f)));
  return sigmoid16(two_u);
}

inline float gelu_gate(float x) { return sigmoid(2 * GELU_C * x * (1 + GELU_A * x * x)); }

// fn(begin, end) over the flat elements of a bf16 tensor in parallel ranges of whole 16-lane steps.
template <class Fn>
void for_each_range(int64_t count, Fn fn) {
  at::parallel_for(0, (count + 15) / 16, 2048, [&](int64_t begin, int64_t end) { fn(begin * 16, std::min(count, end * 16)); });
}

// y = gelu_tanh(x) of any bf16 tensor, computed in fp32 and rounded once.
at::Tensor gelu_tanh(at::Tensor x) {
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gelu_tanh: x must be bf16");
  auto y = at::empty_like(x);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  for_each_range(x.numel(), [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
      const __m512 v = load16(xp + i);
      store16(yp + i, _mm512_mul_ps(v, gelu_gate16(v)));
    }
    for (; i < end; ++i) {
      const float v = static_cast<float>(xp[i]);
      yp[i] = static_cast<bf16>(v * gelu_gate(v));
    }
  });
  return y;
}

// dx = dy gelu_tanh'(x), bf16 in and out.
at::Tensor gelu_tanh_backward(at::Tensor dy, at::Tensor x) {
  dy = dy.contiguous();
  x = x.contiguous();
  TORCH_CHECK(dy.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && dy.numel() == x.numel(),
              "gelu_tanh_backward: dy and x must be bf16 of one shape");
  auto dx = at::empty_like(x);
  const bf16 *xp = x.data_ptr<bf16>(), *dyp = dy.data_ptr<bf16>();
  bf16* dxp = dx.data_ptr<bf16>();
  for_each_range(x.numel(), [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f), two_c = _mm512_set1_ps(2 * GELU_C), three_a = _mm512_set1_ps(3 * GELU_A);
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
      const __m512 v = load16(xp + i), s = gelu_gate16(v);
      const __m512 two_du = _mm512_mul_ps(two_c, _mm512_fmadd_ps(three_a, _mm512_mul_ps(v, v), one));
      const __m512 slope = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_sub_ps(one, s)), two_du, s);
      store16(dxp + i, _mm512_mul_ps(load16(dyp + i), slope));
    }
    for (; i < end; ++i) {
      const float v = static_cast<float>(xp[i]), s = gelu_gate(v);
      const float slope = s + v * s * (1 - s) * 2 * GELU_C * (1 + 3 * GELU_A * v * v);
      dxp[i] = static_cast<bf16>(static_cast<float>(dyp[i]) * slope);
    }
  });
  return dx;
}

inline float sum_of(const float* row, int64_t C, float shift, bool squares) {
  const __m512 sv = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= C; i += 16) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(row + i), sv);
    acc = squares ? _mm512_fmadd_ps(v, v, acc) : _mm512_add_ps(acc, v);
  }
  float total = _mm512_reduce_add_ps(acc);
  for (; i < C; ++i) total += squares ? (row[i] - shift) * (row[i] - shift) : row[i] - shift;
  return total;
}

// The norm of fp32 rows x (N, C), written in bf16 (what autocast's next matmul reads): RMSNorm,
// or with `center` LayerNorm (mean subtracted first), times weight (C, fp32) plus bias (C, fp32;
// empty for none) -> (y (N, C) bf16, mean (N), rstd (N): fp32, for the backward).
std::vector<at::Tensor> norm(at::Tensor x, at::Tensor weight, at::Tensor bias, double eps, bool center) {
  x = x.contiguous();
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  weight.numel() == x.size(1) && weight.is_contiguous() &&
                  (!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == x.size(1) && bias.is_contiguous())),
              "norm: x (N, C), weight (C) and bias (C or empty) must be fp32");
  const int64_t N = x.size(0), C = x.size(1);
  auto y = at::empty({N, C}, x.options().dtype(at::kBFloat16));
  auto mean = at::empty({N}, x.options()), rstd = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = has_bias ? bias.data_ptr<float>() : nullptr;
  bf16* yp = y.data_ptr<bf16>();
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = xp + n * C;
      const float mu = center ? sum_of(row, C, 0.f, false) / C : 0.f;  // two passes: no E[x^2] - E[x]^2 cancellation
      const float r = 1.0f / std::sqrt(sum_of(row, C, mu, true) / C + static_cast<float>(eps));
      mp[n] = mu;
      rp[n] = r;
      const __m512 rv = _mm512_set1_ps(r), mv = _mm512_set1_ps(mu);
      int64_t i = 0;
      for (; i + 16 <= C; i += 16) {
        const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), mv), rv),
                                            _mm512_loadu_ps(wp + i));
        store16(yp + n * C + i, bp ? _mm512_add_ps(scaled, _mm512_loadu_ps(bp + i)) : scaled);
      }
      for (; i < C; ++i) yp[n * C + i] = static_cast<bf16>((row[i] - mu) * r * wp[i] + (bp ? bp[i] : 0.f));
    }
  });
  return {y, mean, rstd};
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// dx (N, C) fp32, dweight (C) and dbias (C; empty without a bias) fp32 of norm for dy (N, C),
// bf16 or fp32. With x^ = (x - mean) rstd and g = dy w: dx = rstd (g - mean(g) - x^ mean(g x^))
// (no mean(g) term for RMSNorm), dweight = sum over rows of dy x^, dbias = sum of dy (each thread
// sums its rows, then the partial sums are added).
template <class DY>
std::vector<at::Tensor> norm_backward_of(const DY* dyp, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& mean, const at::Tensor& rstd, bool center, bool has_bias) {
  const int64_t N = x.size(0), C = x.size(1);
  auto dx = at::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  auto partial = at::zeros({2, chunks, C}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *mp = mean.data_ptr<float>(),
              *rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float *dw = pp + c * C, *db = pp + (chunks + c) * C;
      for (int64_t n = c * N / chunks; n < (c + 1) * N / chunks; ++n) {
        const float* row = xp + n * C;
        const DY* d = dyp + n * C;
        const float mu = mp[n], r = rp[n];
        const __m512 mv = _mm512_set1_ps(mu), rv = _mm512_set1_ps(r);
        __m512 g_acc = _mm512_setzero_ps(), gx_acc = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= C; i += 16) {
          const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), mv), rv), dv = load16(d + i);
          const __m512 g = _mm512_mul_ps(dv, _mm512_loadu_ps(wp + i));
          g_acc = _mm512_add_ps(g_acc, g);
          gx_acc = _mm512_fmadd_ps(g, xhat, gx_acc);
          _mm512_storeu_ps(dw + i, _mm512_fmadd_ps(dv, xhat, _mm512_loadu_ps(dw + i)));
          _mm512_storeu_ps(db + i, _mm512_add_ps(dv, _mm512_loadu_ps(db + i)));
        }
        float sum_g = _mm512_reduce_add_ps(g_acc), sum_gx = _mm512_reduce_add_ps(gx_acc);
        for (; i < C; ++i) {
          const float xhat = (row[i] - mu) * r, dv = static_cast<float>(d[i]), g = dv * wp[i];
          sum_g += g;
          sum_gx += g * xhat;
          dw[i] += dv * xhat;
          db[i] += dv;
        }
        const float mean_g = center ? sum_g / C : 0.f, mean_gx = sum_gx / C;
        const __m512 mgv = _mm512_set1_ps(mean_g), mgxv = _mm512_set1_ps(mean_gx);
        for (i = 0; i + 16 <= C; i += 16) {
          const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), mv), rv);
          const __m512 g = _mm512_mul_ps(load16(d + i), _mm512_loadu_ps(wp + i));
          _mm512_storeu_ps(dxp + n * C + i, _mm512_mul_ps(rv, _mm512_sub_ps(_mm512_sub_ps(g, mgv), _mm512_mul_ps(xhat, mgxv))));
        }
        for (; i < C; ++i) {
          const float xhat = (row[i] - mu) * r, g = static_cast<float>(d[i]) * wp[i];
          dxp[n * C + i] = r * (g - mean_g - xhat * mean_gx);
        }
      }
    }
  });
  auto sums = partial.sum(1);
  return {dx, sums[0], has_bias ? sums[1] : at::empty({0}, x.options())};
}

std::vector<at::Tensor> norm_backward(at::Tensor dy, at::Tensor x, at::Tensor weight, at::Tensor mean, at::Tensor rstd,
                                      bool center, bool has_bias) {
  dy = dy.contiguous();
  x = x.contiguous();
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.numel() == x.size(0) && mean.numel() == x.size(0),
              "norm_backward: bad shapes");
  if (dy.scalar_type() == at::kBFloat16)
    return norm_backward_of(dy.data_ptr<bf16>(), x, weight, mean, rstd, center, has_bias);
  dy = dy.to(at::kFloat);
  return norm_backward_of(dy.data_ptr<float>(), x, weight, mean, rstd, center, has_bias);
}

// Per row of bf16 logits (N, V): the log-sum-exp in fp32 and the target's logit -> (lse, picked).
std::vector<at::Tensor> cross_entropy_rows(at::Tensor logits, at::Tensor targets) {
  logits = logits.contiguous();
  targets = targets.contiguous();
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kBFloat16 && targets.scalar_type() == at::kLong &&
                  targets.numel() == logits.size(0),
              "cross_entropy_rows: logits (N, V) bf16, targets (N) int64");
  const int64_t N = logits.size(0), V = logits.size(1);
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  auto picked = at::empty({N}, logits.options().dtype(at::kFloat));
  const bf16* lp = logits.data_ptr<bf16>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float *lsep = lse.data_ptr<float>(), *pp = picked.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const bf16* row = lp + n * V;
      float top = -INFINITY;
      for (int64_t i = 0; i < V; ++i) top = std::max(top, static_cast<float>(row[i]));
      const __m512 top_v = _mm512_set1_ps(top);
      __m512 acc = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= V; i += 16) acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(load16(row + i), top_v)));
      float total = _mm512_reduce_add_ps(acc);
      for (; i < V; ++i) total += std::exp(static_cast<float>(row[i]) - top);
      lsep[n] = top + std::log(total);
      TORCH_CHECK(tp[n] >= 0 && tp[n] < V, "cross_entropy_rows: target out of range");
      pp[n] = static_cast<float>(row[tp[n]]);
    }
  });
  return {lse, picked};
}

// (softmax(logits) - onehot(target)) * scale per row, from bf16 logits and their fp32 lse, in bf16.
at::Tensor cross_entropy_grad(at::Tensor logits, at::Tensor targets, at::Tensor lse, at::Tensor scale) {
  logits = logits.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(lse.numel() == N && scale.numel() == N && targets.numel() == N && lse.scalar_type() == at::kFloat &&
                  scale.scalar_type() == at::kFloat,
              "cross_entropy_grad: bad shapes");
  lse = lse.contiguous();
  scale = scale.contiguous();
  targets = targets.contiguous();
  auto grad = at::empty_like(logits);
  const bf16* lp = logits.data_ptr<bf16>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float *lsep = lse.data_ptr<float>(), *sp = scale.data_ptr<float>();
  bf16* gp = grad.data_ptr<bf16>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const bf16* row = lp + n * V;
      bf16* out = gp + n * V;
      const __m512 lse_v = _mm512_set1_ps(lsep[n]), scale_v = _mm512_set1_ps(sp[n]);
      int64_t i = 0;
      for (; i + 16 <= V; i += 16)
        store16(out + i, _mm512_mul_ps(exp16(_mm512_sub_ps(load16(row + i), lse_v)), scale_v));
      for (; i < V; ++i) out[i] = static_cast<bf16>(std::exp(static_cast<float>(row[i]) - lsep[n]) * sp[n]);
      const int64_t t = tp[n];
      out[t] = static_cast<bf16>((std::exp(static_cast<float>(row[t]) - lsep[n]) - 1.0f) * sp[n]);
    }
  });
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotate", &rotate, "rotate-half RoPE of bf16 heads, rounded once");
  m.def("swiglu", &swiglu, "silu(gate) * up of bf16 rows, rounded once");
  m.def("swiglu_backward", &swiglu_backward, "the gradient of swiglu");
  m.def("gelu_tanh", &gelu_tanh, "GELU (tanh form) of bf16 values, rounded once");
  m.def("gelu_tanh_backward", &gelu_tanh_backward, "the gradient of gelu_tanh");
  m.def("norm", &norm, "RMSNorm or LayerNorm of fp32 rows into bf16");
  m.def("norm_backward", &norm_backward, "the gradient of norm");
  m.def("cross_entropy_rows", &cross_entropy_rows, "log-sum-exp and target logit of bf16 logit rows");
  m.def("cross_entropy_grad", &cross_entropy_grad, "the cross-entropy gradient of bf16 logit rows");
}
