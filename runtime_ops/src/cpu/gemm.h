// CPU int8 GEMM on packed weights: C[m, n] = sum_k A[m, k] * W[n, k] with int32 accumulation, then the
// dequantizing epilogue. Implementations: portable C++, AVX2 and AVX512-VNNI, chosen at run time.
#pragma once

#include "common.h"

namespace mqc {

// One call computes rows [m0, m1) x panels [p0, p1) of the output.
struct GemmArgs {
  const uint8_t* A = nullptr;   // quantized activations [M, Kp]: x + 128 as uint8 (W8) or x as int8 (W4)
  int64_t lda = 0;              // = Kp
  const int32_t* rowsum = nullptr;  // W4: sum_k x[m][k] per row; per-group W4: [M][W->groups], each group's sum
  const PackedWeights* W = nullptr;
  const float* row_scale = nullptr;  // activation scale of each row (modality-selected)
  const float* w_scale = nullptr;    // [N]; per-group weights: [W->groups][ldws], column n at w_scale[grp * ldws + n]
  int64_t ldws = 0;
  const float* bias = nullptr;       // [N] or null
  void* Y = nullptr;                 // [M, ldy] float or half
  int64_t ldy = 0;
  bool y_half = false;
  int64_t M = 0, N = 0;
};

using GemmTileFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

// Quantize rows [m0, m1) of X (float, half or int8) into A (and rowsum): q = clip(rne(x / s)), the W8 layout adds
// 128. src_kind: 0 float, 1 half, 2 int8 (copied). Columns [K, Kp) are zero (W4) or 128 (W8).
using QuantizeRowsFn = void (*)(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, int64_t Kp,
                                const float* row_scale, bool offset128, uint8_t* A, int32_t* rowsum, int64_t m0,
                                int64_t m1);

// Dynamic mode: row_scale[m] = dynamic_scale(max_k |X[m, col0 + k]|) for rows [m0, m1), X float (src_kind 0) or
// half (1). The absmax compares the magnitude bits as unsigned integers (the numeric order of non-NaN floats), so
// every variant vectorizes it without fast-math and returns the same value, a NaN in the row included.
using DynamicScalesFn = void (*)(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, float* row_scale,
                                 int64_t m0, int64_t m1);

using UnpackW4Fn = void (*)(const PackedWeights& W, int64_t p0, int64_t p1, uint8_t* out);

struct CpuKernels {
  const char* name;
  GemmTileFn gemm_w8;
  GemmTileFn gemm_w4;
  QuantizeRowsFn quantize;
  DynamicScalesFn dynamic_scales;
  UnpackW4Fn unpack_w4;  // see unpack_w4_panels in common.h
  // W4 prefill (M >= 16) unpacks each weight tile to bytes and runs gemm_w8: true where the nibble kernel is
  // slower than unpacking (VNNI: its byte dot product takes W8 as fast), false where W8 costs more (AVX2).
  bool w4_prefill_unpacks;
};

// Best implementation for the running CPU (MQC_CPU_ISA=generic|avx2|avx512vnni overrides, for tests).
const CpuKernels& cpu_kernels();

namespace generic {
extern const CpuKernels kKernels;
}
namespace avx2 {
extern const CpuKernels kKernels;
}
namespace avx512vnni {
extern const CpuKernels kKernels;
}

// Shared epilogue for one row segment: y = float(acc - corr) * (s * w_scale) + bias.
inline void epilogue_scalar(const int32_t* acc, int64_t n0, int64_t cnt, int32_t row_corr, const int32_t* colcorr,
                            float s, const GemmArgs& g, int64_t m) {
  for (int64_t j = 0; j < cnt; ++j) {
    int64_t n = n0 + j;
    int32_t c = acc[j] - row_corr - (colcorr ? colcorr[n] : 0);
    float y = (float)c * (s * g.w_scale[n]);
    if (g.bias) y += g.bias[n];
    if (g.y_half)
      static_cast<uint16_t*>(g.Y)[m * g.ldy + n] = float_to_half(y);
    else
      static_cast<float*>(g.Y)[m * g.ldy + n] = y;
  }
}

// Per-group weights: one row segment's fp32 sum over the groups, f[j] += float(acc[j] - corr) * w_scale[grp, n0 + j].
inline void fold_group_scalar(float* f, const int32_t* acc, int64_t n0, int64_t cnt, int32_t row_corr,
                              const int32_t* colcorr, const float* ws) {
  for (int64_t j = 0; j < cnt; ++j)
    f[j] += (float)(acc[j] - row_corr - (colcorr ? colcorr[n0 + j] : 0)) * ws[n0 + j];
}

// Per-group weights: y = f * s + bias, f the fp32 sum over the groups (fold_group_scalar).
inline void epilogue_grouped_scalar(const float* f, int64_t n0, int64_t cnt, float s, const GemmArgs& g, int64_t m) {
  for (int64_t j = 0; j < cnt; ++j) {
    const int64_t n = n0 + j;
    float y = f[j] * s;
    if (g.bias) y += g.bias[n];
    if (g.y_half)
      static_cast<uint16_t*>(g.Y)[m * g.ldy + n] = float_to_half(y);
    else
      static_cast<float*>(g.Y)[m * g.ldy + n] = y;
  }
}

}  // namespace mqc
