// CUDA fused RMSNorm + static activation quantization: one block per row, fp32 sum of squares by warp shuffles,
// then q = clip(rne(x / sqrt(mean(x^2) + eps) * gamma / s_tok)) written as int8.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/kernels.h"
#include "cuda/launch_geometry.h"

namespace mqc {
namespace cuda {
namespace {

template <bool HALF>
__device__ __forceinline__ float load_x(const void* x, int64_t i) {
  if constexpr (HALF) return __half2float(static_cast<const __half*>(x)[i]);
  else return static_cast<const float*>(x)[i];
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
      const float v = load_x<HALF>(x, row * K + k);
      float r = rintf(__fdiv_rn(__fdiv_rn(v, denom) * gamma[k], s));
      r = fminf(fmaxf(r, -128.f), 127.f);
      q[row * K + k] = static_cast<int8_t>(static_cast<int>(r));
    }
    __syncthreads();  // the next row reuses partial
  }
}

}  // namespace

int rmsnorm_quant(const void* x, bool half, int64_t rows, int64_t K, const float* gamma, ActScales act,
                  Modality modality, float eps, int8_t* q, void* stream) {
  if (rows == 0 || K == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int threads = K >= 2048 ? 512 : 256;
  const Grid g = row_grid(rows);
  const dim3 grid(g.x, g.y, g.z);
  if (half)
    rmsnorm_quant_kernel<true><<<grid, threads, 0, st>>>(x, rows, K, gamma, act, modality, eps, q);
  else
    rmsnorm_quant_kernel<false><<<grid, threads, 0, st>>>(x, rows, K, gamma, act, modality, eps, q);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mqc
