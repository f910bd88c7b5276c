// Inverse-CDF sampling of the rollout engine (sampling.py), float32 on a CPU: max, exp(x - max),
// cumulative sum and the search for u * total, block of 8 rows by block while the block is in
// cache. The torch reference (sampling.inverse_cdf_torch) runs each operator (max, subtract, exp,
// cumsum) over all of [rows, vocab] in turn, ~1 ms of a 64 x 8192 decode step's ~7
// (bench/RESULTS.md).
//
// Same bits as the reference, so that a rollout draws the same tokens either way: the exp is
// torch's own (at::exp_ on the block: MKL's or Sleef's, whichever this torch build uses), the sum
// is accumulated in double and rounded to float at every element as torch's CPU cumsum does, and
// the search is torch's searchsorted (first index whose value is not below u * total).
// tests/test_sampling.py compares the two bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>

namespace {

constexpr int64_t kRows = 8;  // rows per block: 8 independent running sums hide the add latency

typedef float float8 __attribute__((vector_size(32), aligned(4)));

// max(row), NaN if the row holds one (as torch.amax).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
float row_max(const float* row, int64_t n) {
  float8 m8 = float8{} - INFINITY;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float8 v = *reinterpret_cast<const float8*>(row + j);
    m8 = (v > m8) | (v != v) ? v : m8;  // a NaN, once in, stays
  }
  float m = -INFINITY;
  for (int k = 0; k < 8; ++k) m = (m8[k] > m || m8[k] != m8[k]) ? m8[k] : m;
  for (; j < n; ++j) m = (row[j] > m || row[j] != row[j]) ? row[j] : m;
  return m;
}

// cdf[r][j] = float(sum over i <= j of block[r][i], summed in double), in place, for `rows` rows of
// `n`: row by row this would be one chain of dependent adds; interleaved, kRows chains.
void cumsum_rows(float* block, int64_t rows, int64_t n) {
  double acc[kRows] = {};
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      acc[r] += block[r * n + j];
      block[r * n + j] = static_cast<float>(acc[r]);
    }
}

// First index of the non-decreasing cdf[0, n) whose value is not below v (torch's searchsorted,
// side left, including how it treats a NaN), at most n - 1.
int64_t search(const float* cdf, int64_t n, float v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (!(cdf[mid] >= v)) lo = mid + 1;
    else hi = mid;
  }
  return std::min(lo, n - 1);
}

}  // namespace

// logits [B, V] float32, u [B, 1] uniforms -> (ids [B, 1] int64, max [B, 1], total [B, 1]): the
// row's max, the sum of exp(x - max) and the index sampled with u (sampling.inverse_cdf_torch).
std::tuple<at::Tensor, at::Tensor, at::Tensor> inverse_cdf_sample(const at::Tensor& logits, const at::Tensor& u) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat &&
                  logits.device().is_cpu() && logits.size(1) > 0,
              "inverse_cdf_sample: logits must be a contiguous float32 CPU matrix [rows, vocab], got ",
              logits.sizes(), " ", logits.scalar_type());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == B && u.size(1) == 1 && u.is_contiguous() &&
                  u.scalar_type() == at::kFloat && u.device().is_cpu(),
              "inverse_cdf_sample: u must be [rows, 1] float32 on the CPU, one uniform per row");
  at::Tensor ids = at::empty({B, 1}, logits.options().dtype(at::kLong));
  at::Tensor top = at::empty({B, 1}, logits.options()), total = at::empty({B, 1}, logits.options());
  const float *x = logits.data_ptr<float>(), *up = u.data_ptr<float>();
  int64_t* ids_p = ids.data_ptr<int64_t>();
  float *top_p = top.data_ptr<float>(), *total_p = total.data_ptr<float>();
  at::parallel_for(0, (B + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    // Scratch left uninitialised (a vector would zero 256 KB per call at V 8192): every float a
    // block reads is written first.
    const std::unique_ptr<float[]> scratch(new float[kRows * V]);
    float* const block = scratch.get();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, rows = std::min(kRows, B - r0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + (r0 + r) * V;
        const float m = top_p[r0 + r] = row_max(row, V);
        float* shifted = block + r * V;
        for (int64_t j = 0; j < V; ++j) shifted[j] = row[j] - m;
      }
      // torch's exp on the block; inside this parallel region it runs on this thread.
      at::from_blob(block, {rows * V}, at::TensorOptions().dtype(at::kFloat)).exp_();
      cumsum_rows(block, rows, V);
      for (int64_t r = 0; r < rows; ++r) {
        const float* cdf = block + r * V;
        total_p[r0 + r] = cdf[V - 1];
        ids_p[r0 + r] = search(cdf, V, up[r0 + r] * cdf[V - 1]);
      }
    }
  });
  return {ids, top, total};
}

// inverse_cdf_sample and each sampled token's log-prob in one call: (ids [B] int64, logp [B]) with
// logp = (logits[id] - max) - log(total), as sampling.sample computes it in torch (gather, two
// float subtractions, and torch's own log on the totals: the same bits). A decode step then calls
// one operator to sample instead of five.
std::tuple<at::Tensor, at::Tensor> inverse_cdf_sample_logprob(const at::Tensor& logits, const at::Tensor& u) {
  auto [ids, top, total] = inverse_cdf_sample(logits, u);
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor log_total = at::log(total);
  at::Tensor logp = at::empty({B}, logits.options());
  const float *x = logits.data_ptr<float>(), *top_p = top.data_ptr<float>(), *lt = log_total.data_ptr<float>();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  float* out = logp.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r) out[r] = (x[r * V + ids_p[r]] - top_p[r]) - lt[r];
  return {ids.view({B}), logp};
}

TORCH_LIBRARY_FRAGMENT(rci_fast_cpu, m) {
  m.def("inverse_cdf_sample(Tensor logits, Tensor u) -> (Tensor, Tensor, Tensor)", &inverse_cdf_sample);
  m.def("inverse_cdf_sample_logprob(Tensor logits, Tensor u) -> (Tensor, Tensor)", &inverse_cdf_sample_logprob);
}
