// The decode step's GEMM (small_gemm.cpp): out [M, N] = x [M, K] W [K, N] (+ bias) (+ out if
// accumulate), W packed by pack_panels. All float32, row-major, contiguous.
#pragma once

#include <ATen/ATen.h>

namespace rci_fast {

// W [K, N] -> [ceil(N / 32), K, 32]: panels of 32 columns, the last one padded with zeros.
at::Tensor pack_panels(const at::Tensor& w);

// Fails with a message naming `who` unless packed holds a [k, n] matrix packed by pack_panels.
void check_packed(const at::Tensor& packed, int64_t k, int64_t n, const char* who);

// N must be the width W had: the panels hold only ceil(N / 32), and the padding reads as zeros.
// x and out must not overlap.
void small_gemm(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                float* out, bool accumulate);

}  // namespace rci_fast
