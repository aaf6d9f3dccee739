// Eight consecutive fp16 or fp32 values as 16-byte words (one of 8 fp16, two of 4 fp32): the vector loads of the
// row kernels (Hadamard's first pass, RMSNorm+quant's register kernel).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mqc {
namespace cuda {

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
