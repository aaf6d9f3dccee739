// CUDA online Hadamard transform over the last axis: one block per row, the row in shared memory (fp32),
// butterflies of the FWHT on the 2^k axis, then the H_m^T mix over the m axis, scaled by 1/sqrt(n).
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
__global__ void hadamard_kernel(const void* x, void* y, int64_t rows, int64_t n, int64_t m, int64_t L, const float* hm,
                                float scale) {
  extern __shared__ float z[];
  const int64_t half_l = L / 2;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) z[i] = load_x<HALF>(x, row * n + i);
    __syncthreads();
    for (int64_t h = 1; h < L; h *= 2) {
      for (int64_t idx = threadIdx.x; idx < m * half_l; idx += blockDim.x) {
        const int64_t a = idx / half_l, j = idx % half_l;
        const int64_t i = a * L + (j / h) * 2 * h + (j % h);
        const float u = z[i], v = z[i + h];
        z[i] = u + v;
        z[i + h] = u - v;
      }
      __syncthreads();
    }
    for (int64_t o = threadIdx.x; o < n; o += blockDim.x) {
      float v;
      if (hm == nullptr) {  // m = 1 without H_m
        v = z[o];
      } else {
        const int64_t c = o / L, d = o % L;
        v = 0.f;
        for (int64_t a = 0; a < m; ++a) v += hm[a * m + c] * z[a * L + d];
      }
      v *= scale;
      if constexpr (HALF) static_cast<__half*>(y)[row * n + o] = __float2half_rn(v);
      else static_cast<float*>(y)[row * n + o] = v;
    }
    __syncthreads();  // the next row overwrites z
  }
}

}  // namespace

int hadamard(const void* x, void* y, bool half, int64_t rows, int64_t n, int64_t m, const float* hm, void* stream) {
  if (rows == 0) return 0;
  const int64_t L = n / m;
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  const float scale = 1.0f / sqrtf(static_cast<float>(n));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int threads = n >= 4096 ? 1024 : 256;
  const Grid g = row_grid(rows);
  const dim3 grid(g.x, g.y, g.z);
  if (half) {
    if (smem > 48 * 1024) cudaFuncSetAttribute(hadamard_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    hadamard_kernel<true><<<grid, threads, smem, st>>>(x, y, rows, n, m, L, hm, scale);
  } else {
    if (smem > 48 * 1024) cudaFuncSetAttribute(hadamard_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    hadamard_kernel<false><<<grid, threads, smem, st>>>(x, y, rows, n, m, L, hm, scale);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mqc
