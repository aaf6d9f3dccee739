// CUDA fused RMSNorm + static activation quantization: one block per row, fp32 sum of squares by warp shuffles,
// then q = clip(rne(x / sqrt(mean(x^2) + eps) * gamma / s_tok)) written as int8. Rows of a multiple of 8 values up
// to 16384 with aligned buffers take the register kernel (X read once, vector loads and stores); others the general
// one (X read twice, scalar); both compute each code with norm_code.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/launch_geometry.h"
#include "cuda/row_io.h"

namespace mqc {
namespace cuda {
namespace {

// The int8 code of value v of a row with RMS denominator denom: clip(rne(v / denom * gamma / s)), IEEE divisions.
__device__ __forceinline__ int8_t norm_code(float v, float denom, float gamma, float s) {
  const float r = rintf(__fdiv_rn(__fdiv_rn(v, denom) * gamma, s));
  return static_cast<int8_t>(static_cast<int>(fminf(fmaxf(r, -128.f), 127.f)));
}

// One row per block and step: rows beyond the grid's cap are strided (launch_geometry.h).
template <bool HALF>
__global__ void rmsnorm_quant_kernel(const void* x, int64_t rows, int64_t K, const float* gamma, ActScales act,
                                     Modality mo, float eps, int8_t* q) {
  __shared__ float partial[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float ss = 0.f;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float v = load_x<HALF>(x, row * K + k);
      ss += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, off);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
      float v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
      if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float denom = sqrtf(partial[0] / static_cast<float>(K) + eps);
    const float s = scale_of_token(act, mo, row);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      q[row * K + k] = norm_code(load_x<HALF>(x, row * K + k), denom, gamma[k], s);
    }
    __syncthreads();  // the next row reuses partial
  }
}

// Rows of K = 8j <= 8 * CHUNKS * blockDim.x values with 16-byte aligned X, gamma and Q: each thread keeps its
// CHUNKS chunks of 8 consecutive values in registers as loaded (fp16 packed), so X is read once with 16-byte loads
// and Q written with 8-byte stores; the row's sum of squares goes through one shared-memory round. Small blocks
// (128 or 256 threads) keep many rows in flight per SM. Same per-value arithmetic as rmsnorm_quant_kernel.
template <bool HALF, int CHUNKS>
__global__ void __launch_bounds__(256) rmsnorm_quant_vec_kernel(const void* x, int64_t rows, int64_t K,
                                                                const float* gamma, ActScales act, Modality mo,
                                                                float eps, int8_t* q) {
  constexpr int kWords = kVec8Words<HALF>;  // 16-byte words per chunk of 8 values
  __shared__ float partial[8];
  const int warps = blockDim.x / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint4* xrow = reinterpret_cast<const uint4*>(static_cast<const char*>(x) + row * K * (HALF ? 2 : 4));
    uint4 raw[CHUNKS][kWords];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      const bool in = c * 8 < K;
#pragma unroll
      for (int w = 0; w < kWords; ++w) raw[j][w] = in ? __ldg(xrow + c * kWords + w) : make_uint4(0, 0, 0, 0);
      float v[8];
      unpack8<HALF>(raw[j], v);
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += v[e] * v[e];
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += partial[w];
    const float denom = sqrtf(total / static_cast<float>(K) + eps);
    const float s = scale_of_token(act, mo, row);
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (c * 8 >= K) break;
      float v[8];
      unpack8<HALF>(raw[j], v);
      const float4 g0 = __ldg(reinterpret_cast<const float4*>(gamma) + 2 * c);
      const float4 g1 = __ldg(reinterpret_cast<const float4*>(gamma) + 2 * c + 1);
      const float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
      uint32_t packed[2] = {0u, 0u};
#pragma unroll
      for (int e = 0; e < 8; ++e)
        packed[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(norm_code(v[e], denom, g[e], s))) << (8 * (e % 4));
      reinterpret_cast<uint2*>(q + row * K)[c] = make_uint2(packed[0], packed[1]);
    }
    __syncthreads();  // the next row reuses partial
  }
}

}  // namespace

int rmsnorm_quant(const void* x, bool half, int64_t rows, int64_t K, const float* gamma, ActScales act,
                  Modality modality, float eps, int8_t* q, void* stream) {
  if (rows == 0 || K == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Grid g = row_grid(rows);
  const dim3 grid(g.x, g.y, g.z);
  const bool aligned = K % 8 == 0 && (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(gamma) |
                                      reinterpret_cast<uintptr_t>(q)) % 16 == 0;
  // The register kernel: 128 threads up to K = 4096 (4 chunks each), 256 up to K = 16384 (8 chunks each).
  const int vec_threads = K <= 4096 ? 128 : 256;
  const int64_t chunks = (K / 8 + vec_threads - 1) / vec_threads;
  if (aligned && chunks <= 8) {
#define MQC_RMSNORM_VEC(C)                                                                                          \
  (half ? rmsnorm_quant_vec_kernel<true, C><<<grid, vec_threads, 0, st>>>(x, rows, K, gamma, act, modality, eps, q) \
        : rmsnorm_quant_vec_kernel<false, C><<<grid, vec_threads, 0, st>>>(x, rows, K, gamma, act, modality, eps, q))
    if (chunks <= 2) MQC_RMSNORM_VEC(2);
    else if (chunks <= 4) MQC_RMSNORM_VEC(4);
    else MQC_RMSNORM_VEC(8);
#undef MQC_RMSNORM_VEC
    return static_cast<int>(cudaGetLastError());
  }
  const int threads = K >= 2048 ? 512 : 256;
  if (half)
    rmsnorm_quant_kernel<true><<<grid, threads, 0, st>>>(x, rows, K, gamma, act, modality, eps, q);
  else
    rmsnorm_quant_kernel<false><<<grid, threads, 0, st>>>(x, rows, K, gamma, act, modality, eps, q);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mqc
