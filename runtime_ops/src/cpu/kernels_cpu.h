// Row kernels of the CPU Hadamard and RMSNormQuant ops (float math; fp16 rows converted on load and store).
#pragma once

#include "common.h"

namespace mqc {

// y[row] = x[row] @ kron(H_m, H_{n/m}) / sqrt(n); H_m is [m, m] row-major (null: m == 1, H_m = [[1]]). buf: 2n floats.
void hadamard_row(const void* X, void* Y, bool half, int64_t row, int64_t n, int64_t m, const float* Hm, float* buf);

// q[k] = clip(rne(x[k] / sqrt(mean(x^2) + eps) * gamma[k] / s))
void rmsnorm_quant_row(const void* X, bool half, int64_t row, int64_t K, const float* gamma, float s, float eps,
                       int8_t* q);

}  // namespace mqc
