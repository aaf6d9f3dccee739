// Loads of the row kernels (Hadamard, RMSNorm+quant) from fp16 or fp32 rows: one value, or eight consecutive ones
// as 16-byte words (one of 8 fp16, two of 4 fp32).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mqc {
namespace cuda {

template <bool HALF>
__device__ __forceinline__ float load_x(const void* x, int64_t i) {
  if constexpr (HALF) return __half2float(static_cast<const __half*>(x)[i]);
  else return static_cast<const float*>(x)[i];
}

template <bool HALF>
constexpr int kVec8Words = HALF ? 1 : 2;

template <bool HALF>
__device__ __forceinline__ void unpack8(const uint4 (&raw)[kVec8Words<HALF>], float (&v)[8]) {
  if constexpr (HALF) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw[0]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      v[4 * w] = __uint_as_float(raw[w].x);
      v[4 * w + 1] = __uint_as_float(raw[w].y);
      v[4 * w + 2] = __uint_as_float(raw[w].z);
      v[4 * w + 3] = __uint_as_float(raw[w].w);
    }
  }
}

}  // namespace cuda
}  // namespace mqc
