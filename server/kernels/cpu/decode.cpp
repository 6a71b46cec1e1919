// CPU decode-step kernels of adapterserve (float32 and bfloat16): gemv, residual add + RMSNorm, rotary + KV
// write + paged attention of one query per row, SiLU(gate) * up.
//
// bfloat16 (--dtype bfloat16): tensors are read as bf16 and widened to float32 in registers (a 16-bit shift),
// every sum and product is float32, each output element is rounded once to bf16 (round to nearest even, as
// torch's conversion). A bf16 weight is half the bytes of a float32 one: the gemv of one row, bound by
// reading the weight, runs in about half the time.
//
// Compiled on the machine that runs it (-O3 -march=native -fopenmp, server/kernels/cpu/loader.py): the
// compiler's target flags are the feature detection. AVX2+FMA paths where __AVX2__/__FMA__ are defined,
// plain loops elsewhere. Every op releases the GIL (bindings below) and splits its work over torch's
// intra-op threads (at::parallel_for, OpenMP).
//
// Isolation: attention reads only cache positions 0..start[b] of row b, through its block table; nothing
// else of the cache (padding, other rows' pages, a NaN left in a reused page) is ever read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ASV_AVX2 1
#endif

namespace {

#ifdef ASV_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}
#endif

using bf16 = at::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }  // bf16: round to nearest even (c10)

#ifdef ASV_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // 8 bf16 -> 8 float32: the bf16 bits are a float32's upper half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int i = 0; i < 8; ++i) p[i] = bf16(t[i]);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef ASV_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// q . k for a float32 query and a float32 or bf16 key.
template <typename K>
inline float dot_qk(const float* q, const K* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef ASV_AVX2
  __m256 a0 = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  s = hsum(a0);
#endif
  for (; i < n; ++i) s += q[i] * to_f(k[i]);
  return s;
}
template <>
inline float dot_qk<float>(const float* q, const float* k, int64_t n) { return dot(q, k, n); }

#ifdef ASV_AVX2
// Four dot products of q with k0..k3 (n a multiple of 8) at once: independent FMA chains, one shared
// horizontal reduction -> [q.k0, q.k1, q.k2, q.k3].
template <typename K>
inline __m128 dot4(const float* q, const K* k0, const K* k1, const K* k2, const K* k3, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, load8(k0 + i), a0);
    a1 = _mm256_fmadd_ps(qv, load8(k1 + i), a1);
    a2 = _mm256_fmadd_ps(qv, load8(k2 + i), a2);
    a3 = _mm256_fmadd_ps(qv, load8(k3 + i), a3);
  }
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

template <typename X>
inline void axpy(float* y, float a, const X* x, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef ASV_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * to_f(x[i]);
}

// s[i] = exp(s[i] - mx) for i < n; returns their sum. AVX2: Cephes' expf polynomial (~1e-7 relative error),
// NaN propagates (the clamps keep x as the operand that wins on NaN).
inline float exp_shifted(float* s, int64_t n, float mx) {
  int64_t i = 0;
  float total = 0.f;
#ifdef ASV_AVX2
  const __m256 vmx = _mm256_set1_ps(mx), hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + i), vmx);
    x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, log2e, half));
    x = _mm256_fnmadd_ps(fx, c1, x);
    x = _mm256_fnmadd_ps(fx, c2, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, one));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(s + i, y);
    acc = _mm256_add_ps(acc, y);
  }
  total = hsum(acc);
#endif
  for (; i < n; ++i) total += (s[i] = std::exp(s[i] - mx));
  return total;
}

#ifdef ASV_AVX2
// o[0..8*NV) = sum_t p[t] * v(t)[0..8*NV), the output kept in registers (head_dim = 8 * NV).
template <int NV, typename V, typename O>
void weighted_sum(O* o, const float* p, int64_t len, const V* v, const int64_t* off, float inv) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const V* vt = v + off[t];
    for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(pt, load8(vt + 8 * j), acc[j]);
  }
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int j = 0; j < NV; ++j) store8(o + 8 * j, _mm256_mul_ps(acc[j], vinv));
}
#endif

// y[r, o] = x[r, :] . w[o, :] for R rows, OB output rows at a time (the weight row is read once for all R).
// x is float32 (a bf16 input is widened once by the caller), w float32 or bf16, y the output dtype.
// PF: prefetch the next block's weight rows (below pf_end) while reading this block's (1.2x at 2 rows, 1.4x at
// 4, same at 1).
template <int R, int OB, bool PF, typename W, typename Y>
void gemv_block(const float* x, int64_t ldx, const W* w, const W* bias, int64_t in, Y* y, int64_t ldy,
                int64_t o0, int64_t o1, int64_t pf_end) {
  int64_t o = o0;
#ifdef ASV_AVX2
  for (; o + OB <= o1; o += OB) {
    __m256 acc[OB][R];
    for (int b = 0; b < OB; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
    int64_t k = 0;
    // Prefetch: the next block's rows, one cache line per row for every line of this block read.
    const W* next = w + (o + OB) * in;
    const bool pf = PF && o + 2 * OB <= pf_end;
    constexpr int64_t line = 64 / sizeof(W);  // elements per cache line
    for (; k + 8 <= in; k += 8) {
      if (pf && (k % line) == 0)
        for (int b = 0; b < OB; ++b) _mm_prefetch(reinterpret_cast<const char*>(next + b * in + k), _MM_HINT_T0);
      __m256 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + k);
      for (int b = 0; b < OB; ++b) {
        __m256 wv = load8(w + (o + b) * in + k);
        for (int r = 0; r < R; ++r) acc[b][r] = _mm256_fmadd_ps(wv, xv[r], acc[b][r]);
      }
    }
    for (int b = 0; b < OB; ++b)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[b][r]);
        for (int64_t kk = k; kk < in; ++kk) s += to_f(w[(o + b) * in + kk]) * x[r * ldx + kk];
        y[r * ldy + o + b] = from_f<Y>(bias ? s + to_f(bias[o + b]) : s);
      }
  }
#endif
  for (; o < o1; ++o)
    for (int r = 0; r < R; ++r) {
      const float s = dot_qk(x + r * ldx, w + o * in, in);
      y[r * ldy + o] = from_f<Y>(bias ? s + to_f(bias[o]) : s);
    }
}

// Rows r0.. (up to 4 of them) of x against weight rows o0..o1; the first group streams the weight from memory
// with prefetch, later groups find those rows in cache.
template <bool PF, typename W, typename Y>
void gemv_group(int64_t n, const float* x, const W* w, const W* bias, int64_t in, Y* y, int64_t out,
                int64_t o0, int64_t o1, int64_t pf_end) {
  switch (n) {
    case 1: gemv_block<1, 4, PF>(x, in, w, bias, in, y, out, o0, o1, pf_end); break;
    case 2: gemv_block<2, 4, PF>(x, in, w, bias, in, y, out, o0, o1, pf_end); break;
    case 3: gemv_block<3, 2, PF>(x, in, w, bias, in, y, out, o0, o1, pf_end); break;
    default: gemv_block<4, 2, PF>(x, in, w, bias, in, y, out, o0, o1, pf_end); break;
  }
}

// float32 or bfloat16 (the kernels' two element types), CPU, contiguous.
void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), name,
              " must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of the other operands");
}

template <typename W>
void gemv_impl(const float* xp, const W* wp, const W* bp, int64_t rows, int64_t in, int64_t out, W* yp) {
  // Chunks of >= 64 output rows (~150 KB of float32 weight at in=576) so a thread streams a long run of memory.
  at::parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {
    if (rows <= 4) return gemv_group<true>(rows, xp, wp, bp, in, yp, out, o0, o1, o1);
    for (int64_t t0 = o0; t0 < o1; t0 += 16) {
      const int64_t t1 = std::min(t0 + 16, o1);
      gemv_group<true>(4, xp, wp, bp, in, yp, out, t0, t1, o1);
      for (int64_t r0 = 4; r0 < rows; r0 += 4)
        gemv_group<false>(std::min<int64_t>(4, rows - r0), xp + r0 * in, wp, bp, in, yp + r0 * out, out, t0,
                          t1, o1);
    }
  });
}

}  // namespace

// x [..., in] (1..16 rows in all), w [out, in], bias [out] or None -> y [..., out], all float32 or all bf16;
// parallel over output rows. The weight is read from memory once: per tile of 16 output rows, groups of 4
// input rows in turn.
at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_float(w, "w");
  const at::Tensor x = x_in.contiguous();
  check_same(x, w, "x");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1), "gemv: x [..., in], w [out, in]");
  const int64_t in = w.size(1), out = w.size(0), rows = x.numel() / in;
  TORCH_CHECK(rows >= 1 && rows <= 16, "gemv takes 1 to 16 rows");
  if (bias.has_value()) {
    check_same(*bias, w, "bias");
    TORCH_CHECK(bias->numel() == out, "bias must be [out]");
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (w.scalar_type() == at::kFloat) {
    gemv_impl<float>(x.data_ptr<float>(), w.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
                     rows, in, out, y.data_ptr<float>());
  } else {
    const at::Tensor xf = x.to(at::kFloat);  // [rows, in]: a few KB, widened once
    gemv_impl<bf16>(xf.data_ptr<float>(), w.data_ptr<bf16>(), bias.has_value() ? bias->data_ptr<bf16>() : nullptr,
                    rows, in, out, y.data_ptr<bf16>());
  }
  return y;
}

namespace {

template <typename T>
void add_rms_norm_impl(const T* xp, const T* dp, const T* wp, int64_t wstride, T* sp, T* op, int64_t n, int64_t h,
                       float eps) {
  if constexpr (std::is_same_v<T, float>) {  // float32: in place, no widening pass
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = xp + r * h;
        float* sr = dp ? sp + r * h : const_cast<float*>(xr);  // no delta: the sum is x itself
        if (dp)
          for (int64_t i = 0; i < h; ++i) sr[i] = xr[i] + dp[r * h + i];
        const float inv = 1.0f / std::sqrt(dot(sr, sr, h) / static_cast<float>(h) + eps);
        const float* wr = wp + r * wstride;
        float* orow = op + r * h;
        for (int64_t i = 0; i < h; ++i) orow[i] = wr[i] * (sr[i] * inv);
      }
    });
    return;
  }
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> sum(h);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * h;
      for (int64_t i = 0; i < h; ++i) sum[i] = to_f(xr[i]);
      if (dp) {
        const T* dr = dp + r * h;
        T* sr = sp + r * h;
        // The residual stream is stored in T (as the torch path stores x + delta); the norm reads it back.
        for (int64_t i = 0; i < h; ++i) sr[i] = from_f<T>(sum[i] + to_f(dr[i]));
        for (int64_t i = 0; i < h; ++i) sum[i] = to_f(sr[i]);
      }
      const float ms = dot(sum.data(), sum.data(), h) / static_cast<float>(h);
      const float inv = 1.0f / std::sqrt(ms + eps);
      const T* wr = wp + r * wstride;
      T* orow = op + r * h;
      // float32: weight * (x * inv), transformers' order; bf16: the normed x is rounded to bf16 before the
      // weight multiplies it, as LlamaRMSNorm does (hidden.to(input_dtype) * weight).
      for (int64_t i = 0; i < h; ++i) orow[i] = from_f<T>(to_f(wr[i]) * to_f(from_f<T>(sum[i] * inv)));
    }
  });
}

}  // namespace

// (x + delta, RMSNorm(x + delta) * weight) for x, delta [..., H] (N rows; delta None: x itself), weight [H]
// or one per row (N * H values). The norm as transformers computes it in float32: x * rsqrt(mean(x^2) + eps),
// then times the weight.
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& delta_in,
                                     const at::Tensor& weight_in, double eps) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const c10::optional<at::Tensor> delta =
      delta_in.has_value() ? c10::optional<at::Tensor>(delta_in->contiguous()) : c10::nullopt;
  check_float(x, "x");
  check_same(weight, x, "weight");
  const int64_t h = x.size(-1), n = x.numel() / h;
  TORCH_CHECK(weight.numel() == h || weight.numel() == n * h, "weight must be [H] or [N, H]");
  const int64_t wstride = weight.numel() == h ? 0 : h;
  at::Tensor sum = x;
  if (delta.has_value()) {
    check_same(*delta, x, "delta");
    TORCH_CHECK(delta->numel() == x.numel() && delta->size(-1) == h, "delta must match x");
    sum = at::empty_like(x);
  }
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_impl<float>(x.data_ptr<float>(), delta.has_value() ? delta->data_ptr<float>() : nullptr,
                             weight.data_ptr<float>(), wstride, sum.data_ptr<float>(), out.data_ptr<float>(), n, h,
                             static_cast<float>(eps));
  else
    add_rms_norm_impl<bf16>(x.data_ptr<bf16>(), delta.has_value() ? delta->data_ptr<bf16>() : nullptr,
                            weight.data_ptr<bf16>(), wstride, sum.data_ptr<bf16>(), out.data_ptr<bf16>(), n, h,
                            static_cast<float>(eps));
  return {sum, out};
}

// SiLU(gate) * up for gate_up [..., 2I] (gate first) -> [..., I].
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = gate_up_in.contiguous();
  check_float(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "gate_up must be [..., 2I]");
  const int64_t inter = gate_up.size(-1) / 2, n = gate_up.numel() / (2 * inter);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = inter;
  at::Tensor out = at::empty(shape, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *g = gp + r * 2 * inter, *u = g + inter;
        scalar_t* o = op + r * inter;
        for (int64_t c = 0; c < inter; ++c) {
          const float gc = to_f(g[c]);
          // bf16: SiLU's result is rounded before the product, as the torch path (F.silu(gate) * up) does.
          o[c] = from_f<scalar_t>(to_f(from_f<scalar_t>(gc / (1.0f + std::exp(-gc)))) * to_f(u[c]));
        }
      }
    });
  });
  return out;
}

namespace {

template <typename T>
void rope_attend_impl(const T* xp, const T* cp, const T* snp, const int64_t* sp, const int64_t* bt, int64_t pages,
                      T* kc, T* vc, T* op, int64_t bsz, int64_t heads, int64_t kv_heads, int64_t dim, int64_t ld,
                      int64_t page_size) {
  const int64_t half = dim / 2;
  std::vector<float> q(bsz * heads * dim);  // rotated queries, float32
  float* qp = q.data();
  // Row b's entries 0..start[b]: element offsets of their slots' KV head 0 in the cache, in order.
  std::vector<int64_t> first(bsz + 1, 0);
  for (int64_t b = 0; b < bsz; ++b) first[b + 1] = first[b] + sp[b] + 1;
  std::vector<int64_t> offs(first[bsz]);
  for (int64_t b = 0; b < bsz; ++b)
    for (int64_t t = 0; t <= sp[b]; ++t)
      offs[first[b] + t] = (bt[b * pages + t / page_size] * page_size + t % page_size) * kv_heads * dim;
  // Rotary (x*cos + rotate_half(x)*sin) of q into q, of k straight into the cache; v copied.
  for (int64_t b = 0; b < bsz; ++b) {
    const T *c = cp + sp[b] * dim, *s = snp + sp[b] * dim;
    const int64_t own = offs[first[b] + sp[b]];  // the new entry's slot
    for (int64_t hh = 0; hh < heads + kv_heads; ++hh) {
      const T* src = xp + b * ld + hh * dim;
      if (hh < heads) {
        float* dst = qp + (b * heads + hh) * dim;
        // bf16: the rotated query is rounded to bf16, as the torch path's q is.
        for (int64_t i = 0; i < half; ++i)
          dst[i] = to_f(from_f<T>(to_f(src[i]) * to_f(c[i]) - to_f(src[i + half]) * to_f(s[i])));
        for (int64_t i = half; i < dim; ++i)
          dst[i] = to_f(from_f<T>(to_f(src[i]) * to_f(c[i]) + to_f(src[i - half]) * to_f(s[i])));
      } else {
        T* dst = kc + own + (hh - heads) * dim;
        for (int64_t i = 0; i < half; ++i)
          dst[i] = from_f<T>(to_f(src[i]) * to_f(c[i]) - to_f(src[i + half]) * to_f(s[i]));
        for (int64_t i = half; i < dim; ++i)
          dst[i] = from_f<T>(to_f(src[i]) * to_f(c[i]) + to_f(src[i - half]) * to_f(s[i]));
      }
    }
    std::copy(xp + b * ld + (heads + kv_heads) * dim, xp + b * ld + (heads + 2 * kv_heads) * dim, vc + own);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, bsz * heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, acc(dim);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / heads, hh = i % heads, g = hh / group, len = sp[b] + 1;
      const float* qv = qp + i * dim;
      const int64_t* off = offs.data() + first[b];
      scores.resize(len);
      const T* kg = kc + g * dim;  // KV head g of slot offset 0
      int64_t t = 0;
#ifdef ASV_AVX2
      if (dim % 8 == 0)
        for (; t + 4 <= len; t += 4)
          _mm_storeu_ps(scores.data() + t, _mm_mul_ps(dot4(qv, kg + off[t], kg + off[t + 1], kg + off[t + 2],
                                                           kg + off[t + 3], dim), _mm_set1_ps(scale)));
#endif
      for (; t < len; ++t) scores[t] = dot_qk(qv, kg + off[t], dim) * scale;
      float mx = -INFINITY;
      for (t = 0; t < len; ++t) mx = std::max(mx, scores[t]);
      const float inv = 1.0f / exp_shifted(scores.data(), len, mx);
      T* o = op + i * dim;
#ifdef ASV_AVX2
      if (dim == 64) {
        weighted_sum<8>(o, scores.data(), len, vc + g * dim, off, inv);
        continue;
      }
      if (dim == 128) {
        weighted_sum<16>(o, scores.data(), len, vc + g * dim, off, inv);
        continue;
      }
#endif
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) axpy(acc.data(), scores[t] * inv, vc + off[t] + g * dim, dim);
      for (int64_t j = 0; j < dim; ++j) o[j] = from_f<T>(acc[j]);
    }
  });
}

}  // namespace

// One decode token per row: rotate q and k of qkv [B, (H + 2Hkv) * D] at position start[b], write k, v at
// cache index start[b] of row b (through block_tables [B, P]) into k_cache / v_cache [slots, Hkv, D], then
// attend with each query head over the row's entries 0..start[b] -> [B, H * D]. cos/sin [positions, D]
// (plain sin: rotate-half's signs applied here). GQA: query head h reads KV head h / (H / Hkv). Every tensor
// float32, or every one bf16 (scores, softmax and the weighted sum in float32 either way).
at::Tensor rope_attend_decode(const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& start, const at::Tensor& block_tables, at::Tensor k_cache,
                              at::Tensor v_cache, int64_t page_size, int64_t heads, int64_t kv_heads) {
  const at::Tensor qkv = qkv_in.contiguous();
  check_float(qkv, "qkv");
  check_same(cos, qkv, "cos");
  check_same(sin, qkv, "sin");
  check_same(k_cache, qkv, "k_cache");
  check_same(v_cache, qkv, "v_cache");
  TORCH_CHECK(start.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(start.is_contiguous() && block_tables.is_contiguous(), "contiguous indices");
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  const int64_t bsz = qkv.size(0), dim = k_cache.size(2);
  TORCH_CHECK(qkv.size(-1) == (heads + 2 * kv_heads) * dim && qkv.numel() == bsz * qkv.size(-1),
              "qkv must be [B, (1,) (H + 2Hkv) * D]");
  TORCH_CHECK(k_cache.size(1) == kv_heads && v_cache.sizes() == k_cache.sizes(), "cache [slots, Hkv, D]");
  TORCH_CHECK(start.numel() == bsz && block_tables.size(0) == bsz, "one start and block table per row");
  const int64_t pages = block_tables.size(1), slots = k_cache.size(0), ld = qkv.size(-1);
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < bsz; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < cos.size(0) && sp[b] / page_size < pages, "row ", b, ": position out of range");
    for (int64_t p = 0; p <= sp[b] / page_size; ++p)
      TORCH_CHECK(bt[b * pages + p] >= 0 && (bt[b * pages + p] + 1) * page_size <= slots, "row ", b, ": bad page id");
  }
  std::vector<int64_t> shape(qkv.sizes().begin(), qkv.sizes().end());
  shape.back() = heads * dim;
  at::Tensor out = at::empty(shape, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    rope_attend_impl<float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), sp, bt, pages,
                            k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>(), bsz, heads,
                            kv_heads, dim, ld, page_size);
  else
    rope_attend_impl<bf16>(qkv.data_ptr<bf16>(), cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), sp, bt, pages,
                           k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(), out.data_ptr<bf16>(), bsz, heads,
                           kv_heads, dim, ld, page_size);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapterserve CPU decode kernels (float32, bfloat16)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gemv", &gemv, "y [..., out] = x [..., in] @ w [out, in]^T (+ bias), 1..16 rows", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none(), nogil);
  m.def("add_rms_norm", &add_rms_norm, "(x + delta, RMSNorm(x + delta) * weight)", py::arg("x"), py::arg("delta"),
        py::arg("weight"), py::arg("eps"), nogil);
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of gate_up [N, 2I]", nogil);
  m.def("rope_attend_decode", &rope_attend_decode, "rotary + KV write + paged attention, one token per row", nogil);
}
