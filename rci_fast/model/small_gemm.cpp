// A GEMM for the few rows of a decode step: out [M, N] = x [M, K] W [K, N] (+ bias) (+ out), with
// W packed once, when the weights are loaded, into panels of 32 columns.
//
// Why not MKL: at 16-64 rows and a weight of a few MB it multiplies at 30-55 GFLOP/s on the
// 8192-column head of the benchmark's model (the same machine reaches ~120 on its best decode
// shape), and the C++ decode step spent ~9 of its ~12 ms in it (bench/RESULTS.md). Here each
// panel, [K][32] contiguous, is read once per step and held in cache while every block of rows
// passes over it; x's rows come from L1/L2. Nothing is repacked per call.
//
// Every output is one fused multiply-add chain over k in order, from zero, then + bias, then
// + out: the AVX-512, AVX2 and portable paths give the same bits, and a row's result does not
// depend on which other rows share the call (the rollout engine's batches change size), nor on
// the thread count.
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SMALL_GEMM_X86 1
#endif

namespace rci_fast {
namespace {

constexpr int64_t kPanel = 32;  // columns per panel: two AVX-512 registers, four AVX2 ones

// 0: portable, 1: AVX2 + FMA, 2: AVX-512; what this CPU has unless a test lowers it.
int detect_isa() {
#ifdef SMALL_GEMM_X86
  __builtin_cpu_init();  // this runs during static initialisation: do not rely on libgcc's order
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}
const int kCpuIsa = detect_isa();
std::atomic<int> g_isa{kCpuIsa};

// R rows of x times one panel: acc[r][j] = sum_k x[r, k] * panel[k][j] as a chain of std::fma,
// in local accumulators (restrict: a compiler may then keep them in vector registers; where
// std::fma is one instruction, as on aarch64, this loop vectorizes). On an x86 CPU without
// AVX2 + FMA (before ~2013) std::fma is a library call and this path is slow.
template <int R>
void block_portable(const float* __restrict x, int64_t ldx, const float* __restrict panel, int64_t K,
                    float (*__restrict acc)[kPanel]) {
  float c[R][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    for (int r = 0; r < R; ++r) {
      const float a = x[r * ldx + k];
      for (int64_t j = 0; j < kPanel; ++j) c[r][j] = std::fma(a, w[j], c[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) std::copy_n(c[r], kPanel, acc[r]);
}

#ifdef SMALL_GEMM_X86
// 8 rows x 32 columns: 16 zmm accumulators, two panel loads and 8 broadcasts per k.
template <int R>
__attribute__((target("avx512f"))) void block_avx512(const float* x, int64_t ldx, const float* panel, int64_t K,
                                                       float (*acc)[kPanel]) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel), w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      lo[r] = _mm512_fmadd_ps(a, w0, lo[r]);
      hi[r] = _mm512_fmadd_ps(a, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(acc[r], lo[r]);
    _mm512_storeu_ps(acc[r] + 16, hi[r]);
  }
}

// 6 rows x 16 columns, for each half of the panel: 12 ymm accumulators, two panel loads and one
// broadcast per row and k (15 of the 16 registers; a 3 x 32 block needs 17, and GCC then stores
// every accumulator back to the stack at each k: half the speed, measured).
template <int R>
__attribute__((target("avx2,fma"))) void block_avx2(const float* x, int64_t ldx, const float* panel, int64_t K,
                                                    float (*acc)[kPanel]) {
  for (int half = 0; half < 2; ++half) {
    __m256 c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const float* w = panel + k * kPanel + 16 * half;
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
        c0[r] = _mm256_fmadd_ps(a, w0, c0[r]);
        c1[r] = _mm256_fmadd_ps(a, w1, c1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(acc[r] + 16 * half, c0[r]);
      _mm256_storeu_ps(acc[r] + 16 * half + 8, c1[r]);
    }
  }
}
#endif

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, float (*)[kPanel]);

// Rows per block on each path: as many accumulators as its registers hold.
int max_rows(int isa) { return isa == 2 ? 8 : isa == 1 ? 6 : 4; }

// The block kernel for `rows` rows (1 .. max_rows(isa)) on path isa.
BlockFn block_for(int isa, int rows) {
#define ROWS_CASES(fn)                 \
  switch (rows) {                      \
    case 1: return &fn<1>;             \
    case 2: return &fn<2>;             \
    case 3: return &fn<3>;             \
    case 4: return &fn<4>;             \
    case 5: return &fn<5>;             \
    case 6: return &fn<6>;             \
    case 7: return &fn<7>;             \
    default: return &fn<8>;            \
  }
#ifdef SMALL_GEMM_X86
  if (isa == 2) ROWS_CASES(block_avx512)
  if (isa == 1) ROWS_CASES(block_avx2)
#endif
  ROWS_CASES(block_portable)
#undef ROWS_CASES
}

}  // namespace

at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.scalar_type() == at::kFloat,
              "pack_panels: expected a float32 CPU matrix [in, out], got ", w.sizes(), " ", w.scalar_type());
  const int64_t K = w.size(0), N = w.size(1), panels = (N + kPanel - 1) / kPanel;
  // One copy straight into the panels (a zero-fill, a copy and a permuted copy took 10x as long:
  // the engine packs the whole model at every generate call).
  const int64_t full = N / kPanel, tail = N - full * kPanel;
  at::Tensor packed = at::empty({panels, K, kPanel}, w.options());
  if (full > 0)
    packed.narrow(0, 0, full).copy_(w.narrow(1, 0, full * kPanel).view({K, full, kPanel}).permute({1, 0, 2}));
  if (tail > 0) {  // the last panel's columns past N are zeros
    at::Tensor last = packed.select(0, full);
    last.zero_();
    last.narrow(1, 0, tail).copy_(w.narrow(1, full * kPanel, tail));
  }
  return packed;
}

void small_gemm(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                float* out, bool accumulate) {
  // Threads write their columns of out while others still read all of x: the two must not overlap.
  const auto x0 = reinterpret_cast<uintptr_t>(x), out0 = reinterpret_cast<uintptr_t>(out);
  TORCH_CHECK(M == 0 || x0 + sizeof(float) * M * K <= out0 || out0 + sizeof(float) * M * N <= x0,
              "small_gemm: x and out overlap");
  const int isa = g_isa.load(std::memory_order_relaxed), rows_per_block = max_rows(isa);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  // Threads split the panels: each reads its share of the weights once, and owns those columns.
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float acc[8][kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = packed + p * K * kPanel;
      const int64_t col = p * kPanel, width = std::min(kPanel, N - col);
      for (int64_t r0 = 0; r0 < M; r0 += rows_per_block) {
        const int rows = static_cast<int>(std::min<int64_t>(rows_per_block, M - r0));
        block_for(isa, rows)(x + r0 * K, K, panel, K, acc);
        for (int r = 0; r < rows; ++r) {
          float* o = out + (r0 + r) * N + col;
          for (int64_t j = 0; j < width; ++j) {
            const float v = bias ? acc[r][j] + bias[col + j] : acc[r][j];
            o[j] = accumulate ? o[j] + v : v;
          }
        }
      }
    }
  });
}

at::Tensor small_gemm_op(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "small_gemm: x must be a contiguous float32 CPU matrix");
  check_packed(packed, x.size(1), n, "small_gemm");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == at::kFloat &&
                                    bias->device().is_cpu() && bias->numel() == n),
              "small_gemm: bias must be a contiguous float32 CPU vector of ", n);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  small_gemm(x.data_ptr<float>(), x.size(0), x.size(1), packed.data_ptr<float>(), n,
             bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), false);
  return out;
}

void check_packed(const at::Tensor& packed, int64_t k, int64_t n, const char* who) {
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
                  packed.device().is_cpu() && packed.size(2) == kPanel && packed.size(1) == k &&
                  packed.size(0) == (n + kPanel - 1) / kPanel,
              who, ": expected weights packed by pack_panels for ", k, " inputs and ", n, " outputs, got ",
              packed.sizes());
}

// Which path small_gemm takes: 2 AVX-512, 1 AVX2, 0 portable, clamped to what this CPU has
// (tests compare the paths); returns the one it took before.
int64_t small_gemm_isa(int64_t level) {
  return g_isa.exchange(static_cast<int>(std::clamp<int64_t>(level, 0, kCpuIsa)));
}

}  // namespace rci_fast

TORCH_LIBRARY_FRAGMENT(rci_fast_cpu, m) {
  m.def("pack_panels(Tensor w) -> Tensor", &rci_fast::pack_panels);
  m.def("small_gemm(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor", &rci_fast::small_gemm_op);
  m.def("small_gemm_isa(int level) -> int", &rci_fast::small_gemm_isa);
}
