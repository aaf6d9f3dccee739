// CUDA online Hadamard transform over the last axis: one block per row, the row in shared memory (fp32). The FWHT's
// log2(L) butterfly stages run in radix-8 passes: a thread takes 8 elements at stride h and applies the stages h, 2h
// and 4h in registers, so shared memory is read and written once per three stages (not per stage), and all index
// arithmetic is 32-bit shifts and masks (L is a power of two). The first pass reads the row from global memory, the
// last one writes it when there is no H_m; with H_m (copied to shared memory), the H_m^T mix over the m axis
// follows, scaled by 1/sqrt(n).
// Each butterfly is the same operation on the same operands as stage-by-stage code, in the same stage order.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/launch_geometry.h"
#include "cuda/row_io.h"

namespace mqc {
namespace cuda {
namespace {

constexpr int kMixOutputs = 8;  // H_m mix: outputs of one column accumulated per thread at a time

template <bool HALF>
__device__ __forceinline__ void store_y(void* y, int64_t i, float v) {
  if constexpr (HALF) static_cast<__half*>(y)[i] = __float2half_rn(v);
  else static_cast<float*>(y)[i] = v;
}

// x[i .. i+8) with 16-byte loads when that address is 16-byte aligned; false (nothing loaded) otherwise.
template <bool HALF>
__device__ __forceinline__ bool load8_aligned(const void* x, int64_t i, float (&v)[8]) {
  const char* ptr = static_cast<const char*>(x) + i * (HALF ? 2 : 4);
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const uint4* w = reinterpret_cast<const uint4*>(ptr);
  uint4 raw[kVec8Words<HALF>];
#pragma unroll
  for (int j = 0; j < kVec8Words<HALF>; ++j) raw[j] = __ldg(w + j);
  unpack8<HALF>(raw, v);
  return true;
}

// The stages h, 2h, ..., (R/2)h of the FWHT on R values taken at stride h (v[i] is element base + i * h).
template <int R>
__device__ __forceinline__ void butterflies(float (&v)[R]) {
#pragma unroll
  for (int s = 1; s < R; s <<= 1) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if ((i & s) == 0) {
        const float a = v[i], b = v[i + s];
        v[i] = a + b;
        v[i + s] = a - b;
      }
    }
  }
}

// One pass of radix R at stride h (a power of two, R * h <= L): group g holds base + i * h, i < R, where
// base = (g / h) * R * h + g % h. Reads the row from x (first pass) or z, writes it to y (last pass, scaled) or z.
template <int R, bool HALF, bool FROM_GLOBAL, bool TO_GLOBAL>
__device__ __forceinline__ void fwht_pass(const void* x, void* y, float* z, int64_t row_offset, int n, int h,
                                          float scale) {
  for (int g = threadIdx.x; g < n / R; g += blockDim.x) {
    const int low = g & (h - 1);
    const int base = (g - low) * R + low;
    float v[R];
    bool loaded = false;
    if constexpr (FROM_GLOBAL && R == 8) loaded = h == 1 && load8_aligned<HALF>(x, row_offset + base, v);
    if (!loaded) {
#pragma unroll
      for (int i = 0; i < R; ++i) v[i] = FROM_GLOBAL ? load_x<HALF>(x, row_offset + base + i * h) : z[base + i * h];
    }
    butterflies<R>(v);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if constexpr (TO_GLOBAL) store_y<HALF>(y, row_offset + base + i * h, v[i] * scale);
      else z[base + i * h] = v[i];
    }
  }
}

template <bool HALF, bool FROM_GLOBAL, bool TO_GLOBAL>
__device__ __forceinline__ void fwht_pass_radix(int radix, const void* x, void* y, float* z, int64_t row_offset, int n,
                                                int h, float scale) {
  if (radix == 8) fwht_pass<8, HALF, FROM_GLOBAL, TO_GLOBAL>(x, y, z, row_offset, n, h, scale);
  else if (radix == 4) fwht_pass<4, HALF, FROM_GLOBAL, TO_GLOBAL>(x, y, z, row_offset, n, h, scale);
  else if (radix == 2) fwht_pass<2, HALF, FROM_GLOBAL, TO_GLOBAL>(x, y, z, row_offset, n, h, scale);
  else fwht_pass<1, HALF, FROM_GLOBAL, TO_GLOBAL>(x, y, z, row_offset, n, h, scale);  // L = 1: a copy
}

// One row per block and step: rows beyond the grid's cap are strided (launch_geometry.h). n = m * L < 2^31.
template <bool HALF>
__global__ void hadamard_kernel(const void* x, void* y, int64_t rows, int n, int m, int L, const float* __restrict__ hm,
                                float scale) {
  extern __shared__ float z[];  // the row (n), then H_m (m * m) when there is one
  const bool mix = hm != nullptr;
  float* hs = z + n;
  if (mix) {
    for (int i = threadIdx.x; i < m * m; i += blockDim.x) hs[i] = hm[i];
    __syncthreads();
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * n;
    int h = 1;
    bool first = true;
    do {  // at least one pass, so that L = 1 still moves the row
      const int radix = L / h >= 8 ? 8 : L / h;
      const bool last = h * (radix > 1 ? radix : 2) >= L;
      if (first && last && !mix) fwht_pass_radix<HALF, true, true>(radix, x, y, z, off, n, h, scale);
      else if (first) fwht_pass_radix<HALF, true, false>(radix, x, y, z, off, n, h, scale);
      else if (last && !mix) fwht_pass_radix<HALF, false, true>(radix, x, y, z, off, n, h, scale);
      else fwht_pass_radix<HALF, false, false>(radix, x, y, z, off, n, h, scale);
      __syncthreads();
      first = false;
      h *= radix > 1 ? radix : 2;
    } while (h < L);
    if (mix) {  // out[c * L + d] = sum_a H_m[a, c] * z[a * L + d], kMixOutputs outputs c of one column d per item
      const int chunks = (m + kMixOutputs - 1) / kMixOutputs;
      for (int item = threadIdx.x; item < L * chunks; item += blockDim.x) {
        const int d = item % L, c0 = item / L * kMixOutputs;
        float acc[kMixOutputs] = {};
        for (int a = 0; a < m; ++a) {
          const float za = z[a * L + d];
#pragma unroll
          for (int j = 0; j < kMixOutputs; ++j)
            if (c0 + j < m) acc[j] += hs[a * m + c0 + j] * za;
        }
#pragma unroll
        for (int j = 0; j < kMixOutputs; ++j)
          if (c0 + j < m) store_y<HALF>(y, off + static_cast<int64_t>(c0 + j) * L + d, acc[j] * scale);
      }
      __syncthreads();  // the next row overwrites z
    }
  }
}

}  // namespace

int hadamard(const void* x, void* y, bool half, int64_t rows, int64_t n, int64_t m, const float* hm, void* stream) {
  if (rows == 0) return 0;
  const int64_t L = n / m;
  const size_t smem = static_cast<size_t>(n + (hm ? m * m : 0)) * sizeof(float);
  const float scale = 1.0f / sqrtf(static_cast<float>(n));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // One thread per radix-8 group, 32 to 1024 threads.
  const int64_t groups = (n + 7) / 8;
  const int threads = static_cast<int>(groups >= 1024 ? 1024 : (groups + 31) / 32 * 32);
  const Grid g = row_grid(rows);
  const dim3 grid(g.x, g.y, g.z);
  const int ni = static_cast<int>(n), mi = static_cast<int>(m), li = static_cast<int>(L);
  if (half) {
    if (smem > 48 * 1024) cudaFuncSetAttribute(hadamard_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    hadamard_kernel<true><<<grid, threads, smem, st>>>(x, y, rows, ni, mi, li, hm, scale);
  } else {
    if (smem > 48 * 1024) cudaFuncSetAttribute(hadamard_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    hadamard_kernel<false><<<grid, threads, smem, st>>>(x, y, rows, ni, mi, li, hm, scale);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mqc
