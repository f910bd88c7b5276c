// rci_fast's C++ CPU kernels, float32: the rollout engine's decode step, and fused RMSNorm,
// SwiGLU, RoPE and packed causal attention (forward and backward) for training. Built on first
// use by rci_fast/model/native.py.
//
// == Decode step: one step of a Qwen2/Llama decoder, every row holding one new token ==
//
// The Python model spends most of a small decode step between operators (~30 torch calls per
// layer at ~10 us each, plus a boolean mask, an index_put for the cache write and a flash kernel
// built for blocks of queries). Here a layer is four GEMMs (small_gemm.cpp, on weights packed
// once) and SwiGLU's two ATen calls around three loops: RMSNorm, RoPE + cache write, and attention
// for the query heads that share a key/value head one after another, so that only the first reads
// its rows from memory (grouped-query attention), only up to the row's own position.
// The reference is Transformer.forward_cached (transformer.py); tests/test_cpu_decode.py holds
// the two to each other.
//
// == Fused RMSNorm, SwiGLU and RoPE ==
//
// In a training step on a CPU each eager elementwise op is a pass over memory: RMSNorm's forward
// and backward are ~13 of them, SwiGLU's ~7, RoPE's ~5 forward and ~8 backward (bench/RESULTS.md).
// Here each is one pass forward and one backward (SwiGLU's sigmoid is ATen's vectorized one, kept
// for the backward). References: the eager functions in cpu_ops.py; tests/test_cpu_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "small_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// Hot loops get an AVX2 clone, chosen at load time where the CPU has it: the build itself
// stays portable (no -march=native in a cache that other machines may share).
#if defined(__x86_64__) && defined(__GNUC__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

// Eight partial sums: without -ffast-math the compiler may not reorder a float sum, so a plain
// loop runs as one serial chain of adds; eight independent ones become one vector register.
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) lanes[k] += a[i + k] * b[i + k];
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int k = 0; k < 8; ++k) sum += lanes[k];
  return sum;
}

// y = w * x / sqrt(mean(x^2) + eps) for rows [r0, r1) of x; rstd (if not null) keeps each row's
// 1 / sqrt(mean(x^2) + eps) for the backward.
VECTOR_CLONES
void rms_norm(const float* x, const float* weight, float* out, float* rstd, int64_t r0, int64_t r1, int64_t dim,
              float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * dim;
    const float scale = 1.f / std::sqrt(dot(xr, xr, dim) / dim + eps);
    if (rstd != nullptr) rstd[r] = scale;
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = weight[i] * (xr[i] * scale);
  }
}

// The backward of rms_norm for rows [r0, r1): dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x));
// dw_part += dy * x * rstd (the caller sums the parts of its threads).
VECTOR_CLONES
void rms_norm_backward_rows(const float* dy, const float* x, const float* weight, const float* rstd, float* dx,
                            float* dw_part, int64_t r0, int64_t r1, int64_t dim) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *g = dy + r * dim, *xr = x + r * dim;
    const float scale = rstd[r];
    float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, sum = 0.f;
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      for (int k = 0; k < 8; ++k) lanes[k] += weight[i + k] * g[i + k] * xr[i + k];
    for (; i < dim; ++i) sum += weight[i] * g[i] * xr[i];
    for (int k = 0; k < 8; ++k) sum += lanes[k];
    const float c = sum * scale * scale / dim;
    for (i = 0; i < dim; ++i) {
      dx[r * dim + i] = scale * (weight[i] * g[i] - xr[i] * c);
      dw_part[i] += g[i] * xr[i] * scale;
    }
  }
}

// RoPE of one head's row at one position: the eager rope's arithmetic, product by product
// (out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2), so the values are the same to the bit where the
// compiler contracts nothing (x86: no FMA in either clone). inverse: the transpose of that
// rotation, for the backward (dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1). out may be x (in place).
VECTOR_CLONES
void rope_row(const float* x, float* out, const float* cos, const float* sin, int64_t half, bool inverse) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    const float s1 = inverse ? -sin[i + half] : sin[i], s2 = inverse ? -sin[i] : sin[i + half];
    out[i] = a * cos[i] - b * s1;
    out[i + half] = b * cos[i + half] + a * s2;
  }
}

// Eight floats as one value: GCC/Clang lower arithmetic on it to one AVX2 instruction (two SSE
// ones in the default clone). aligned(4): loads from any float address.
typedef float float8 __attribute__((vector_size(32), aligned(4)));

inline float8 load8(const float* p) { return *reinterpret_cast<const float8*>(p); }
inline void store8(float* p, float8 v) { std::memcpy(p, &v, 32); }
inline float sum8(float8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

typedef float float4v __attribute__((vector_size(16), aligned(4)));

// sum8 of four vectors at once, each added in sum8's order (lanes i and i + 4, then neighbours,
// then the two halves): the same four floats as four sum8 calls, in ~a third of the instructions.
// (__builtin_shufflevector: GCC 12 and later, clang; older GCC takes the four sum8 calls.)
inline float4v sum8x4(float8 a, float8 b, float8 c, float8 d) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  auto fold = [](float8 v) {  // v[i] + v[i + 4] for i < 4
    return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  };
  const float4v ta = fold(a), tb = fold(b), tc = fold(c), td = fold(d);
  const float4v ab = __builtin_shufflevector(ta, tb, 0, 2, 4, 6) + __builtin_shufflevector(ta, tb, 1, 3, 5, 7);
  const float4v cd = __builtin_shufflevector(tc, td, 0, 2, 4, 6) + __builtin_shufflevector(tc, td, 1, 3, 5, 7);
  return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) + __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
#else
  return float4v{sum8(a), sum8(b), sum8(c), sum8(d)};
#endif
}

// Scores of one query head against `n` key rows (`dim` floats apart), times `scale`. Four keys
// at a time: four independent chains of multiply-adds (one chain per dot would wait on itself),
// summed across lanes together. Every score is the same chain wherever its key falls: 8 lanes
// over the dimensions, sum8, then the dim % 8 rest one float at a time.
VECTOR_CLONES
void key_scores(const float* q, const float* keys, float* scores, int64_t n, int64_t dim, float scale) {
  const int64_t vec = dim - dim % 8;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k = keys + j * dim;
    float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t i = 0; i < vec; i += 8) {
      const float8 qi = load8(q + i);
      a0 += qi * load8(k + i);
      a1 += qi * load8(k + dim + i);
      a2 += qi * load8(k + 2 * dim + i);
      a3 += qi * load8(k + 3 * dim + i);
    }
    float4v sums = sum8x4(a0, a1, a2, a3);
    for (int64_t i = vec; i < dim; ++i)
      sums += float4v{q[i] * k[i], q[i] * k[dim + i], q[i] * k[2 * dim + i], q[i] * k[3 * dim + i]};
    const float4v scaled = sums * scale;
    std::memcpy(scores + j, &scaled, sizeof scaled);
  }
  for (; j < n; ++j) {
    const float* k = keys + j * dim;
    float8 a = {};
    for (int64_t i = 0; i < vec; i += 8) a += load8(q + i) * load8(k + i);
    float sum = sum8(a);
    for (int64_t i = vec; i < dim; ++i) sum += q[i] * k[i];
    scores[j] = sum * scale;
  }
}

// out = sum_j weights[j] * values[j] over `n` rows (`dim` floats apart): 32 output floats at a
// time in four registers, all rows streamed through them. With `more`, the sums go on from out's
// values: rows given in two calls add in the same order, to the same bits, as in one.
VECTOR_CLONES
void weighted_values(const float* weights, const float* values, float* out, int64_t n, int64_t dim,
                     bool more = false) {
  int64_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    if (more) {
      a0 = load8(out + i);
      a1 = load8(out + i + 8);
      a2 = load8(out + i + 16);
      a3 = load8(out + i + 24);
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* v = values + j * dim + i;
      const float w = weights[j];
      a0 += w * load8(v);
      a1 += w * load8(v + 8);
      a2 += w * load8(v + 16);
      a3 += w * load8(v + 24);
    }
    store8(out + i, a0);
    store8(out + i + 8, a1);
    store8(out + i + 16, a2);
    store8(out + i + 24, a3);
  }
  for (; i + 8 <= dim; i += 8) {
    float8 a = more ? load8(out + i) : float8{};
    for (int64_t j = 0; j < n; ++j) a += weights[j] * load8(values + j * dim + i);
    store8(out + i, a);
  }
  for (; i < dim; ++i) {
    float a = more ? out[i] : 0.f;
    for (int64_t j = 0; j < n; ++j) a += weights[j] * values[j * dim + i];
    out[i] = a;
  }
}

// SwiGLU on [a, b): h = silu(g) * u with sig = sigmoid(g) given.
VECTOR_CLONES
void swiglu_range(const float* g, const float* u, const float* sig, float* h, int64_t a, int64_t b) {
  for (int64_t i = a; i < b; ++i) h[i] = g[i] * sig[i] * u[i];
}

// Its backward: du = dh * silu(g); dg = dh * u * silu'(g), silu'(g) = sig + silu(g) * (1 - sig).
VECTOR_CLONES
void swiglu_backward_range(const float* dh, const float* g, const float* u, const float* sig, float* dg, float* du,
                           int64_t a, int64_t b) {
  for (int64_t i = a; i < b; ++i) {
    const float s = sig[i], silu = g[i] * s;
    du[i] = dh[i] * silu;
    dg[i] = dh[i] * u[i] * (s + silu * (1.f - s));
  }
}

// == Row passes of the packed causal attention (varlen_attention_* below) ==

typedef int32_t int32x8 __attribute__((vector_size(32), aligned(4)));

// exp(x) for x up to 88, eight at a time: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, two-part
// ln2), exp(r) by Cephes' degree-6 polynomial (~1 ulp), 2^n put into the exponent bits. Below
// -87 it returns exp(-87) ~ 1.6e-38 (2^n would turn subnormal below about -87.3).
inline float8 exp8(float8 x) {
  const float8 lowest = float8{} - 87.f, magic = float8{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < lowest ? lowest : x;
  const float8 shifted = x * 1.44269504088896341f + magic;
  const float8 n = shifted - magic;
  const float8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32x8 bits = ((int32x8)shifted - 0x4B400000 + 127) << 23;  // 2^n
  return p * (float8)bits;
}

// The same for fewer than eight values (a row's tail), through one padded vector.
inline void exp_tail(float* x, int64_t n) {
  float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  std::copy_n(x, n, buf);
  store8(buf, exp8(load8(buf)));
  std::copy_n(buf, n, x);
}

// Row of raw scores s[0, width): p_j = softmax(s * scale) over j < n, 0 from n on; returns the
// row's log-sum-exp (of the scaled scores), which the backward uses to recompute p.
VECTOR_CLONES
float softmax_row(float* s, int64_t n, int64_t width, float scale) {
  const int64_t vec = n - n % 8;
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
  top *= scale;
  float8 total8 = {};
  for (int64_t j = 0; j < vec; j += 8) {
    const float8 e = exp8(load8(s + j) * scale - top);
    store8(s + j, e);
    total8 += e;
  }
  for (int64_t j = vec; j < n; ++j) s[j] = s[j] * scale - top;
  exp_tail(s + vec, n - vec);
  float total = sum8(total8);
  for (int64_t j = vec; j < n; ++j) total += s[j];
  const float inv = 1.f / total;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  std::fill(s + n, s + width, 0.f);
  return top + std::log(total);
}

// out[h] = softmax(q[h] . K[0..n) * scale) V for the `group` query heads that share one key/value
// head (rows `dim` floats apart); scores is scratch of n floats. Rows below `shared` come from
// shared_keys/shared_values (a prompt another row holds: its copy read by several rows stays in
// cache), the others from keys/values; the same bits as reading them all from one place. The
// softmax is the training attention's row pass (exp8: a scalar std::exp per score was ~1 ms of a
// 64-row decode step).
void gqa_attention(const float* q, const float* shared_keys, const float* shared_values, int64_t shared,
                   const float* keys, const float* values, float* out, float* scores, int64_t group, int64_t n,
                   int64_t dim, float scale) {
  for (int64_t h = 0; h < group; ++h) {
    key_scores(q + h * dim, shared_keys, scores, shared, dim, scale);
    key_scores(q + h * dim, keys + shared * dim, scores + shared, n - shared, dim, scale);
    softmax_row(scores, n, n, 1.f);
    weighted_values(scores, shared_values, out + h * dim, shared, dim);
    weighted_values(scores + shared, values + shared * dim, out + h * dim, n - shared, dim, /*more=*/true);
  }
}

// The backward's recomputation: p_j = exp(s_j * scale - lse) over j < n, 0 from n on.
VECTOR_CLONES
void probs_row(float* s, int64_t n, int64_t width, float scale, float lse) {
  const int64_t vec = n - n % 8;
  for (int64_t j = 0; j < vec; j += 8) store8(s + j, exp8(load8(s + j) * scale - lse));
  for (int64_t j = vec; j < n; ++j) s[j] = s[j] * scale - lse;
  exp_tail(s + vec, n - vec);
  std::fill(s + n, s + width, 0.f);
}

// Softmax backward in place: dp_j <- p_j * (dp_j - delta) * scale, where delta = sum_j p_j dp_j
// = dout . out (the row's output and its gradient).
VECTOR_CLONES
void softmax_grad_row(const float* p, float* dp, int64_t width, float delta, float scale) {
  for (int64_t j = 0; j < width; ++j) dp[j] = p[j] * (dp[j] - delta) * scale;
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "cpu_decode.decode_step: ", what); }

}  // namespace

// ids, positions: [B] int64. Row b is cache slot first_slot + b, its token at positions[b].
// k_cache, v_cache: [layers, slots, kv_heads, max_len, head_dim] float32, contiguous.
// inv_freq: [head_dim / 2] RoPE frequencies. weights: embedding [vocab, hidden], final norm,
// lm_head, then per layer input norm, qkv, qkv bias?, o, o bias?, post-attention norm, gate_up,
// gate_up bias?, down, down bias?; every projection as [in, out] packed by pack_panels
// (small_gemm.cpp), q/k/v and gate/up concatenated as Transformer.fuse_projections does. Every
// layer has the same MLP width, and the lm_head as many outputs as the embedding has rows
// (CpuDecodeStep checks the widths exactly; the panels alone tell them only to a multiple of 32).
// prefix_slots, prefix_lens: [B] int64 or None: row b reads its cache positions below
// prefix_lens[b] from slot prefix_slots[b], which holds the same keys and values there (a GRPO
// group's prompt, prefilled once and copied: rows of a group then read one copy, from cache).
// Returns the next-token logits [B, vocab].
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, int64_t first_slot,
                       const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& inv_freq,
                       const c10::List<std::optional<at::Tensor>>& weights, int64_t num_heads,
                       int64_t num_kv_heads, double eps, const std::optional<at::Tensor>& prefix_slots,
                       const std::optional<at::Tensor>& prefix_lens) {
  const int64_t B = ids.size(0), layers = k_cache.size(0), slots = k_cache.size(1);
  const int64_t max_len = k_cache.size(3), D = k_cache.size(4), half = D / 2;
  const int64_t group = num_heads / num_kv_heads, q_width = num_heads * D, kv_width = num_kv_heads * D;
  check(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
        "the caches must be contiguous and of one shape");
  check(k_cache.scalar_type() == at::kFloat && k_cache.device().is_cpu(), "float32 CPU tensors only");
  check(k_cache.size(2) == num_kv_heads && num_heads % num_kv_heads == 0, "head counts do not match the cache");
  check(first_slot >= 0 && first_slot + B <= slots, "rows beyond the cache's slots");
  check(static_cast<int64_t>(weights.size()) == 3 + 10 * layers, "expected 3 + 10 weights per layer");
  check(ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong, "ids and positions must be int64");
  check(ids.dim() == 1 && positions.dim() == 1 && positions.size(0) == B, "ids and positions must be [B] each");
  check(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == half && D % 2 == 0,
        "inv_freq must hold head_dim / 2 float32 frequencies");
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    const auto& t = weights.get(i);
    check(!t.has_value() || (t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous()),
          "every weight must be a contiguous float32 CPU tensor");
  }
  auto weight = [&](int64_t i) -> at::Tensor { return weights.get(i).value(); };

  const auto pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) check(p[b] >= 0 && p[b] < max_len, "a position is outside the cache");
  check(prefix_slots.has_value() == prefix_lens.has_value(), "prefix_slots and prefix_lens come together");
  std::vector<int64_t> src_slot(B), shared(B, 0);  // where row b's first shared[b] positions are read
  for (int64_t b = 0; b < B; ++b) src_slot[b] = first_slot + b;
  if (prefix_slots.has_value()) {
    for (const auto* t : {&*prefix_slots, &*prefix_lens})
      check(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == B,
            "prefix_slots and prefix_lens must be [B] int64");
    const auto slots_c = prefix_slots->contiguous(), lens_c = prefix_lens->contiguous();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t from = slots_c.data_ptr<int64_t>()[b], len = lens_c.data_ptr<int64_t>()[b];
      check(from >= 0 && from < slots && len >= 0, "a prefix slot is outside the cache");
      src_slot[b] = from;
      shared[b] = std::min(len, p[b]);  // the row's own new key at p[b] is never shared
    }
  }

  // cos/sin of each row's position, as rope_cos_sin computes them: float(position) * inv_freq.
  const auto freq = inv_freq.contiguous();
  // Both halves of a row hold the same values, as rope_cos_sin's cat([freqs, freqs]) does.
  std::vector<float> cos(B * D), sin(B * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p[b]) * freq.data_ptr<float>()[i];
      cos[b * D + i] = cos[b * D + half + i] = std::cos(angle);
      sin[b * D + i] = sin[b * D + half + i] = std::sin(angle);
    }

  at::Tensor x = at::embedding(weight(0), ids).contiguous();  // [B, hidden]; the residual stream
  const int64_t hidden = x.size(1), vocab = weight(0).size(0), row_width = q_width + 2 * kv_width;
  const int64_t inter = layers > 0 ? weight(3 + 8).size(1) : 0;  // the down projection's inputs
  auto bias = [&](int64_t i) -> float* {
    return weights.get(i).has_value() ? weights.get(i)->data_ptr<float>() : nullptr;
  };
  rci_fast::check_packed(weight(2), hidden, vocab, "cpu_decode.decode_step (lm_head)");
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = 3 + 10 * l;
    rci_fast::check_packed(weight(w + 1), hidden, row_width, "cpu_decode.decode_step (qkv)");
    rci_fast::check_packed(weight(w + 3), q_width, hidden, "cpu_decode.decode_step (o)");
    rci_fast::check_packed(weight(w + 6), hidden, 2 * inter, "cpu_decode.decode_step (gate_up)");
    rci_fast::check_packed(weight(w + 8), inter, hidden, "cpu_decode.decode_step (down)");
    const int64_t bias_at[] = {w + 2, w + 4, w + 7, w + 9}, widths[] = {row_width, hidden, 2 * inter, hidden};
    for (int i = 0; i < 4; ++i)
      check(!weights.get(bias_at[i]).has_value() || weights.get(bias_at[i])->numel() == widths[i],
            "a bias does not match its projection's outputs");
  }
  const auto options = x.options();
  at::Tensor normed = at::empty_like(x), attn = at::empty({B, q_width}, options);
  at::Tensor qkv = at::empty({B, row_width}, options), gate_up = at::empty({B, 2 * inter}, options);
  at::Tensor act = at::empty({B, inter}, options);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  float *xp = x.data_ptr<float>(), *normed_p = normed.data_ptr<float>();

  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = 3 + 10 * l;
    rms_norm(xp, weight(w).data_ptr<float>(), normed_p, nullptr, 0, B, hidden, eps);
    float* qkv_p = qkv.data_ptr<float>();  // [B, q | k | v]
    rci_fast::small_gemm(normed_p, B, hidden, weight(w + 1).data_ptr<float>(), row_width, bias(w + 2), qkv_p,
                         false);
    const int64_t layer_base = l * slots * num_kv_heads * max_len * D;
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv_p + b * row_width;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h)  // q heads, then k heads
        rope_row(row + h * D, row + h * D, &cos[b * D], &sin[b * D], half, false);  // in place
      for (int64_t g = 0; g < num_kv_heads; ++g) {
        const int64_t cell = layer_base + (((first_slot + b) * num_kv_heads + g) * max_len + p[b]) * D;
        std::copy_n(row + q_width + g * D, D, kc + cell);
        std::copy_n(row + q_width + kv_width + g * D, D, vc + cell);
      }
    }
    float* attn_p = attn.data_ptr<float>();
    at::parallel_for(0, B * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / num_kv_heads, g = item % num_kv_heads, n = p[b] + 1;
        scores.resize(n);
        const int64_t base = layer_base + ((first_slot + b) * num_kv_heads + g) * max_len * D;
        const int64_t src = layer_base + (src_slot[b] * num_kv_heads + g) * max_len * D;
        const int64_t head = b * q_width + g * group * D;
        gqa_attention(qkv_p + b * row_width + g * group * D, kc + src, vc + src, shared[b], kc + base, vc + base,
                      attn_p + head, scores.data(), group, n, D, scale);
      }
    });
    // x += attn W_o + b_o, written straight into the residual stream.
    rci_fast::small_gemm(attn_p, B, q_width, weight(w + 3).data_ptr<float>(), hidden, bias(w + 4), xp, true);
    rms_norm(xp, weight(w + 5).data_ptr<float>(), normed_p, nullptr, 0, B, hidden, eps);
    rci_fast::small_gemm(normed_p, B, hidden, weight(w + 6).data_ptr<float>(), 2 * inter, bias(w + 7),
                         gate_up.data_ptr<float>(), false);
    // silu(gate) * up by ATen's own elementwise kernels (what this step has always computed), in
    // whole rows per thread: at a few rows ATen kept it on one thread (under its grain size)
    // while the other waited. The views are made in each thread from raw pointers: ordinary
    // tensors there, where a view of `act` made under the caller's torch.inference_mode would be
    // an inference tensor that a worker thread (outside that mode) may not write.
    float *gate_up_p = gate_up.data_ptr<float>(), *act_p = act.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      const int64_t rows = r1 - r0;
      float* gate = gate_up_p + r0 * 2 * inter;
      at::Tensor out = at::from_blob(act_p + r0 * inter, {rows, inter}, f32);
      at::silu_out(out, at::from_blob(gate, {rows, inter}, {2 * inter, 1}, f32))
          .mul_(at::from_blob(gate + inter, {rows, inter}, {2 * inter, 1}, f32));
    });
    rci_fast::small_gemm(act.data_ptr<float>(), B, inter, weight(w + 8).data_ptr<float>(), hidden, bias(w + 9), xp,
                         true);
  }
  rms_norm(xp, weight(1).data_ptr<float>(), normed_p, nullptr, 0, B, hidden, eps);
  at::Tensor logits = at::empty({B, vocab}, options);
  rci_fast::small_gemm(normed_p, B, hidden, weight(2).data_ptr<float>(), vocab, nullptr, logits.data_ptr<float>(),
                       false);
  return logits;
}

// == Fused RMSNorm, SwiGLU and RoPE for training (autograd lives in cpu_ops.py) ==

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "cpu_ops: ", name,
              " must be a contiguous float32 CPU tensor");
}

// x [rows, dim], weight [dim] -> (y [rows, dim], rstd [rows]).
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(weight, "weight");
  const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
  TORCH_CHECK(weight.numel() == dim, "cpu_ops: weight has ", weight.numel(), " elements for rows of ", dim);
  at::Tensor y = at::empty_like(x), rstd = at::empty({rows}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) { rms_norm(xp, wp, yp, rp, r0, r1, dim, eps); });
  return {y, rstd};
}

// -> (dx [rows, dim], dweight [dim]).
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& rstd) {
  check_rows(dy, "dy");
  check_rows(x, "x");
  check_rows(weight, "weight");
  check_rows(rstd, "rstd");
  const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.numel() == rows, "cpu_ops: rms_norm_backward shapes disagree");
  // dweight: one partial sum per block of 64 rows, added up in a fixed order afterwards. Indexed
  // by block, not by thread: the sum is then the same for any thread count, and no thread number
  // (which a second OpenMP runtime could hand out past get_num_threads) indexes memory.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  at::Tensor dx = at::empty_like(x), dw_parts = at::zeros({std::max<int64_t>(blocks, 1), dim}, x.options());
  const float *g = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *parts = dw_parts.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      rms_norm_backward_rows(g, xp, wp, rp, dxp, parts + b * dim, b * kBlock, std::min(rows, (b + 1) * kBlock), dim);
  });
  return {dx, dw_parts.sum(0)};
}

// gate, up [..] -> (silu(gate) * up, sigmoid(gate)): the sigmoid is kept for the backward.
std::vector<at::Tensor> swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "cpu_ops: gate and up differ in shape");
  at::Tensor sig = at::sigmoid(gate), h = at::empty_like(gate);
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>(), *sp = sig.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 1 << 14, [&](int64_t a, int64_t b) { swiglu_range(g, u, sp, hp, a, b); });
  return {h, sig};
}

// -> (dgate, dup).
std::vector<at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
                                        const at::Tensor& sig) {
  check_rows(dh, "dh");
  check_rows(gate, "gate");
  check_rows(up, "up");
  check_rows(sig, "sig");
  TORCH_CHECK(dh.sizes() == gate.sizes() && up.sizes() == gate.sizes() && sig.sizes() == gate.sizes(),
              "cpu_ops: swiglu_backward shapes disagree");
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  const float *d = dh.data_ptr<float>(), *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  const float* sp = sig.data_ptr<float>();
  float *dg = dgate.data_ptr<float>(), *du = dup.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 1 << 14,
                   [&](int64_t a, int64_t b) { swiglu_backward_range(d, g, u, sp, dg, du, a, b); });
  return {dgate, dup};
}

// x [B, heads, T, D] (any strides, the last dim contiguous), cos/sin [B, T, D] (any strides, the
// last dim contiguous; stride 0 broadcasts) -> x rotated (inverse: rotated back), laid out as x.
at::Tensor rope_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.device().is_cpu() && sin.device().is_cpu(),
              "cpu_ops: rope needs float32 CPU tensors");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "cpu_ops: rope wants x [B, heads, T, D] and cos, sin [B, T, D] of one layout");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == T && cos.size(2) == D && D % 2 == 0,
              "cpu_ops: rope shapes disagree: x ", x.sizes(), ", cos ", cos.sizes());
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(2) == 1, "cpu_ops: rope needs the head dim contiguous");
  at::Tensor out = at::empty_like(x);  // x's layout (a transposed view stays one)
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Rows in memory order: the model's q and k are transposed views of token-major projections
  // (heads next to each other in memory), which walked head by head ran ~10x slower.
  const bool heads_inner = x.stride(1) < x.stride(2);
  at::parallel_for(0, B * H * T, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T), rest = r % (H * T);
      const int64_t h = heads_inner ? rest % H : rest / T, t = heads_inner ? rest / H : rest % T;
      const int64_t c = b * cos.stride(0) + t * cos.stride(1);
      rope_row(xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2),
                op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2), cp + c, sp + c, D / 2, inverse);
    }
  });
  return out;
}

// == Causal attention over packed sequences (autograd in cpu_ops.py) ==
//
// q [heads, N, D], k and v [kv_heads, N, D] (any strides, D contiguous): sequences back to back,
// cu_seqlens [S + 1] their bounds. One task per (sequence, key/value head): its query heads run
// one after another, in blocks of kQueryBlock rows that see keys only up to the block's last row
// (so about half the square is computed, not all of it). Each block is two GEMMs forward and
// five backward around the row passes above. The backward recomputes the probabilities from the
// saved log-sum-exp, as flash attention does: nothing of size length^2 is kept. A task owns its
// rows of every output, so tasks need no locks, and each runs on one thread (its GEMMs too): the
// result is the same for any thread count.
// Tasks are handed out most work first, one at a time (the cost of one grows with its length
// squared). The reference is padded_groups_attention (transformer.py); tests/test_cpu_ops.py.

// BLAS's own sgemm (MKL or OpenBLAS inside libtorch_cpu), where the library exports it: the
// blocks' GEMMs are small (64 x 64 x ~200), and at::mm_out's dispatch and the tensor views around
// each made the attention ~10% slower (18.4 vs 16.6 ms forward + backward of one layer at 16 x
// ~215 tokens, 2 threads). Weak: where it is missing, at::mm_out does it.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

constexpr int64_t kQueryBlock = 64;  // 32 and 128 measured slower at ~200-token sequences

std::atomic<bool> g_blas_gemm{true};  // off: at::mm_out even where sgemm_ is there (tests reach that path)

// Row-major C [M, N] = op(A) op(B) + (accumulate ? C : 0), op(X) = X^T where transposed; ld* are
// row strides. BLAS is column-major, so it computes C^T = op(B)^T op(A)^T. Strides BLAS would
// refuse (below a row's width, as a broadcast gradient has, or past int32) take at::mm_out.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  constexpr int64_t kMaxInt = 2147483647;
  const bool blas_shapes = lda >= std::max<int64_t>(1, ta ? M : K) && ldb >= std::max<int64_t>(1, tb ? K : N) &&
                           ldc >= std::max<int64_t>(1, N) && std::max({M, N, K, lda, ldb, ldc}) <= kMaxInt;
  if (g_blas_gemm && sgemm_ != nullptr && blas_shapes) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    const float one = 1.f, beta = accumulate ? 1.f : 0.f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto matrix = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<float*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, f32);
    return t ? x.t() : x;
  };
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, f32);
  if (accumulate) c.addmm_(matrix(A, M, K, lda, ta), matrix(B, K, N, ldb, tb));
  else at::mm_out(c, matrix(A, M, K, lda, ta), matrix(B, K, N, ldb, tb));
}

struct Packed {
  int64_t heads, kv_heads, dim, group;
  // skipped[i]: the query rows of sequence i below it, whole query blocks, are not computed (the
  // caller reads neither their output nor gives them a gradient: query_from below).
  std::vector<int64_t> starts, lengths, skipped, order;  // order: (sequence, kv head) tasks, most work first

  Packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
         const std::optional<at::Tensor>& query_from) {
    TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && k.device().is_cpu() && v.device().is_cpu(),
                "cpu_ops: varlen attention needs float32 CPU tensors");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(1) == k.size(1) &&
                    q.size(2) == k.size(2) && k.size(0) > 0 && q.size(0) % k.size(0) == 0,
                "cpu_ops: varlen attention wants q [heads, N, D], k and v [kv_heads, N, D], heads a multiple "
                "of kv_heads; got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "cpu_ops: varlen attention needs D contiguous");
    heads = q.size(0), kv_heads = k.size(0), dim = q.size(2), group = heads / kv_heads;
    const auto cu = cu_seqlens.to(at::kLong).contiguous();
    const int64_t* c = cu.data_ptr<int64_t>();
    const int64_t count = cu.numel() - 1;
    TORCH_CHECK(count >= 0 && c[0] == 0 && c[count] == q.size(1), "cpu_ops: cu_seqlens must run from 0 to N");
    for (int64_t i = 0; i < count; ++i) {
      TORCH_CHECK(c[i + 1] >= c[i], "cpu_ops: cu_seqlens must not decrease");
      starts.push_back(c[i]);
      lengths.push_back(c[i + 1] - c[i]);
    }
    skipped.assign(count, 0);
    if (query_from.has_value()) {
      const auto from = query_from->to(at::kLong).contiguous();
      TORCH_CHECK(from.dim() == 1 && from.numel() == count, "cpu_ops: query_from needs one entry per sequence (",
                  count, "), got shape ", from.sizes());
      const int64_t* f = from.data_ptr<int64_t>();
      for (int64_t i = 0; i < count; ++i) {
        TORCH_CHECK(f[i] >= 0 && f[i] <= lengths[i], "cpu_ops: query_from[", i, "] = ", f[i],
                    " lies outside its sequence of ", lengths[i], " tokens");
        // Whole blocks only: the blocks computed are those of the full run, so their bits are too.
        skipped[i] = f[i] - f[i] % kQueryBlock;
      }
    }
    auto work = [&](int64_t task) {  // score cells of the blocks computed
      const int64_t L = lengths[task / kv_heads], s = skipped[task / kv_heads];
      return L * L - s * s;
    };
    for (int64_t i = 0; i < count * kv_heads; ++i)
      if (lengths[i / kv_heads] > 0) order.push_back(i);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a) > work(b); });
  }

  // Runs task(sequence, kv head) for every task, spread over the intra-op threads. Always inside
  // a parallel region when there are threads (a range of 1 would run inline, where MKL threads
  // its GEMMs itself: other bits than one thread's).
  template <typename Task>
  void for_each_task(const Task& task) const {
    std::atomic<int64_t> next{0};
    const int64_t n = static_cast<int64_t>(order.size());
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n, 2)), 1, [&](int64_t, int64_t) {
      for (int64_t i = next++; i < n; i = next++) task(order[i] / kv_heads, order[i] % kv_heads);
    });
  }
};

// Row t of head h of a [heads, N, D] tensor.
inline float* row(const at::Tensor& x, int64_t h, int64_t t) {
  return x.data_ptr<float>() + h * x.stride(0) + t * x.stride(1);
}

}  // namespace

// Whether the attention's GEMMs may call sgemm_ directly; returns whether they did (false where
// the library does not export it).
bool varlen_attention_blas(bool on) {
  const bool before = g_blas_gemm && sgemm_ != nullptr;
  g_blas_gemm = on;
  return before;
}

// -> (out [N, heads, D] memory, returned as its [heads, N, D] view; lse [heads, N]).
// query_from [S] (optional): sequence i's query rows below query_from[i] may be left out, in
// whole blocks of kQueryBlock (their out and lse rows are 0): rows whose output the caller does
// not read and whose gradient is therefore 0 (a shared prompt's rows in all but its first copy,
// Attention._packed). The rows computed get the same bits as without it.
std::vector<at::Tensor> varlen_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& cu_seqlens, double scale,
                                                 const std::optional<at::Tensor>& query_from) {
  const Packed pk(q, k, v, cu_seqlens, query_from);
  const int64_t N = q.size(1), D = pk.dim;
  // Every row belongs to one sequence, so every output row is written (skipped ones with 0).
  at::Tensor out = at::empty({N, pk.heads, D}, q.options()).permute({1, 0, 2});
  at::Tensor lse = at::empty({pk.heads, N}, q.options());
  pk.for_each_task([&](int64_t seq, int64_t g) {
    const int64_t start = pk.starts[seq], L = pk.lengths[seq], skip = pk.skipped[seq];
    std::vector<float> scores(std::min(L, kQueryBlock) * L);
    const float *keys = row(k, g, start), *values = row(v, g, start);
    for (int64_t h = g * pk.group; h < (g + 1) * pk.group; ++h) {
      float* lse_h = lse.data_ptr<float>() + h * N + start;
      std::fill(lse_h, lse_h + skip, 0.f);
      for (int64_t i = 0; i < skip; ++i) std::fill_n(row(out, h, start + i), D, 0.f);
      for (int64_t b0 = skip; b0 < L; b0 += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, L - b0), width = b0 + rows;  // keys up to the last row
        float* s = scores.data();
        gemm(false, true, rows, width, D, row(q, h, start + b0), q.stride(1), keys, k.stride(1), false, s, width);
        for (int64_t i = 0; i < rows; ++i) lse_h[b0 + i] = softmax_row(s + i * width, b0 + i + 1, width, scale);
        gemm(false, false, rows, D, width, s, width, values, v.stride(1), false, row(out, h, start + b0), out.stride(1));
      }
    }
  });
  return {out, lse};
}

// -> (dq [N, heads, D], dk, dv [N, kv_heads, D] memory, returned as [heads or kv_heads, N, D] views).
// With query_from, the rows left out in the forward get dq = 0 and add nothing to dk, dv (the
// caller gives them no gradient: what they would add is exactly 0).
std::vector<at::Tensor> varlen_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                  const at::Tensor& cu_seqlens, double scale,
                                                  const std::optional<at::Tensor>& query_from) {
  const Packed pk(q, k, v, cu_seqlens, query_from);
  const int64_t N = q.size(1), D = pk.dim;
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.stride(2) == 1 && out.stride(2) == 1 &&
                  dout.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 2 &&
                  lse.size(0) == pk.heads && lse.size(1) == N,
              "cpu_ops: varlen_attention_backward shapes disagree");
  at::Tensor dq = at::empty({N, pk.heads, D}, q.options()).permute({1, 0, 2});  // written row by row
  at::Tensor dk = at::zeros({N, pk.kv_heads, D}, q.options()).permute({1, 0, 2});  // accumulated
  at::Tensor dv = at::zeros({N, pk.kv_heads, D}, q.options()).permute({1, 0, 2});
  pk.for_each_task([&](int64_t seq, int64_t g) {
    const int64_t start = pk.starts[seq], L = pk.lengths[seq], skip = pk.skipped[seq];
    std::vector<float> probs(std::min(L, kQueryBlock) * L), grads(probs.size()), delta(L);
    const float *keys = row(k, g, start), *values = row(v, g, start);
    float *dkeys = row(dk, g, start), *dvalues = row(dv, g, start);
    for (int64_t h = g * pk.group; h < (g + 1) * pk.group; ++h) {
      const float* lse_h = lse.data_ptr<float>() + h * N + start;
      for (int64_t i = 0; i < skip; ++i) std::fill_n(row(dq, h, start + i), D, 0.f);
      for (int64_t i = skip; i < L; ++i) delta[i] = dot(row(dout, h, start + i), row(out, h, start + i), D);
      for (int64_t b0 = skip; b0 < L; b0 += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, L - b0), width = b0 + rows;
        const float *q_b = row(q, h, start + b0), *dout_b = row(dout, h, start + b0);
        float *p = probs.data(), *dp = grads.data();
        gemm(false, true, rows, width, D, q_b, q.stride(1), keys, k.stride(1), false, p, width);
        for (int64_t i = 0; i < rows; ++i) probs_row(p + i * width, b0 + i + 1, width, scale, lse_h[b0 + i]);
        gemm(true, false, width, D, rows, p, width, dout_b, dout.stride(1), true, dvalues, dv.stride(1));
        gemm(false, true, rows, width, D, dout_b, dout.stride(1), values, v.stride(1), false, dp, width);
        for (int64_t i = 0; i < rows; ++i) softmax_grad_row(p + i * width, dp + i * width, width, delta[b0 + i], scale);
        gemm(false, false, rows, D, width, dp, width, keys, k.stride(1), false, row(dq, h, start + b0), dq.stride(1));
        gemm(true, false, width, D, rows, dp, width, q_b, q.stride(1), true, dkeys, dk.stride(1));
      }
    }
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY(rci_fast_cpu, m) {
  m.def("decode_step(Tensor ids, Tensor positions, int first_slot, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor inv_freq, Tensor?[] weights, int num_heads, int num_kv_heads, float eps, "
        "Tensor? prefix_slots=None, Tensor? prefix_lens=None) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, &decode_step);
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> Tensor[]", &rms_norm_forward);
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> Tensor[]", &rms_norm_backward);
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor[]", &swiglu_forward);
  m.def("swiglu_backward(Tensor dh, Tensor gate, Tensor up, Tensor sig) -> Tensor[]", &swiglu_backward);
  m.def("rope_forward(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor", &rope_forward);
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, "
        "Tensor? query_from=None) -> Tensor[]", &varlen_attention_forward);
  m.def("varlen_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, float scale, Tensor? query_from=None) -> Tensor[]", &varlen_attention_backward);
  m.def("varlen_attention_blas(bool on) -> bool", &varlen_attention_blas);
}
