// CUDA QuantLinear: static or dynamic per-token activation quantization, int8 x int8 tensor-core GEMM (int4
// weights unpacked to int8 while staging into shared memory), dequantizing epilogue with bias, optional low-rank and
// channel-0 branches.
//
// Why hand-written mma.sync kernels rather than CUTLASS or cuBLASLt: no extra multi-GB dependency at build or run
// time (the CUDA 13 toolkit here has no cuBLAS, and a cuBLAS from PyPI would have to match onnxruntime-gpu's CUDA
// major), a CUDA compile of a few small kernels instead of CUTLASS template instantiations (CI compiles the
// library on two cores), and the W4 unpack and the per-token (modality) scale live in our own load and epilogue.
//
// Prefill (M > 16): 128x128x64 block tiles, 8 warps of 64x32, mma.sync.m16n8k32 s8 -> s32, double-buffered
// shared memory staged through registers, rows padded by 16 bytes (conflict-free 32-bit fragment loads).
// Decode, M <= 4: one warp per output column streams the weight row with 16-byte loads and __dp4a; the weight
// bytes are read once, so W4 (half the bytes) is the faster format. 5 <= M <= 16: mma.sync.m16n8k32 with the rows
// as m16 and 32 columns per block as four n8 tiles, the k steps spread over the block's warps (gemv_mma_kernel).
//
// Per-group weights (group_size > 0, a multiple of 32): the prefill kernel folds its int32 accumulators into fp32
// ones at every group's end (after the mma.sync step of 32 k that closes it: acc * w_scale[g, n], then clears
// them), and the epilogue computes y = sum * s_tok + bias; so each group's integer dot product is exact and only
// the fp32 sum over the groups rounds, as on the CPU. The decode kernels take chunks of 16 or 32 k, which never
// straddle a group: each chunk's exact int32 partial is scaled by its group's w_scale and fp32 values are summed
// (another fp32 summation order than the CPU's, same math).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "common.h"
#include "cuda/kernels.h"
#include "cuda/launch_geometry.h"

namespace mqc {
namespace cuda {
namespace {

constexpr int BM = 128, BN = 128, BK = 64, PAD = 16, THREADS = 256;
static_assert(BM == kGemmTile && BN == kGemmTile, "launch_geometry.h plans the prefill grid with this tile");

__device__ __forceinline__ float row_scale_of(const QuantLinearParams& p, int64_t m) {
  return scale_of_token(p.act, p.modality, m);
}

// Block-wide max of |x| over row m's K quantized channels (blockDim a multiple of 32). It compares the magnitude
// bits as unsigned integers, the numeric order of non-NaN floats, as the CPU kernels do.
// Element idx of a float X (KIND 0: fp32, 1: fp16).
template <int KIND>
__device__ __forceinline__ float x_value(const QuantLinearParams& p, int64_t idx) {
  if constexpr (KIND == 0) return static_cast<const float*>(p.x)[idx];
  else return __half2float(static_cast<const __half*>(p.x)[idx]);
}

template <int KIND>
__device__ float row_absmax(const QuantLinearParams& p, int64_t m) {
  __shared__ unsigned warp_top[32];
  unsigned top = 0;
  for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
    const int64_t idx = m * p.Kx + p.col0 + k;
    const float v = x_value<KIND>(p, idx);
    top = max(top, __float_as_uint(v) & 0x7FFFFFFFu);
  }
  top = __reduce_max_sync(0xFFFFFFFFu, top);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_top[warp] = top;
  __syncthreads();
  if (warp == 0) {
    top = __reduce_max_sync(0xFFFFFFFFu, lane < static_cast<int>(blockDim.x / 32) ? warp_top[lane] : 0u);
    if (lane == 0) warp_top[0] = top;
  }
  __syncthreads();
  return __uint_as_float(warp_top[0]);
}

// mqc::dynamic_scale on the device: IEEE division, then the floor.
template <int KIND>
__device__ float dynamic_row_scale(const QuantLinearParams& p, int64_t m) {
  const float s = __fdiv_rn(row_absmax<KIND>(p, m), kDynamicQmax);
  return s < kDynamicMinScale ? kDynamicMinScale : s;
}

template <int KIND>
__global__ void quantize_kernel(QuantLinearParams p, int8_t* A, float* row_scale) {
  for (int64_t m = blockIdx.x; m < p.M; m += gridDim.x) {  // one row per block and step (launch_geometry.h)
    float s;
    if constexpr (KIND != 2)
      s = p.dynamic ? dynamic_row_scale<KIND>(p, m) : row_scale_of(p, m);  // p.dynamic is uniform: one block, one row
    else
      s = row_scale_of(p, m);
    if (threadIdx.x == 0) row_scale[m] = s;
    int8_t* a = A + m * p.Kp;
    for (int64_t k = threadIdx.x; k < p.Kp; k += blockDim.x) {
      int8_t q = 0;
      if (k < p.K) {
        const int64_t idx = m * p.Kx + p.col0 + k;
        if (KIND == 2) {
          q = static_cast<const int8_t*>(p.x)[idx];
        } else {
          const float v = x_value<KIND>(p, idx);
          float r = rintf(__fdiv_rn(v, s));  // IEEE division and half-to-even, as onnxruntime's QuantizeLinear
          r = fminf(fmaxf(r, -128.f), 127.f);
          q = static_cast<int8_t>(static_cast<int>(r));
        }
      }
      a[k] = q;
    }
    __syncthreads();  // the next row's absmax reuses the shared reduction slots
  }
}

// 8 signed nibbles (4 packed bytes, low nibble = even k) -> 8 int8 in k order, as two 32-bit words.
__device__ __forceinline__ void unpack_int4(uint32_t w, uint32_t& k0_3, uint32_t& k4_7) {
  const uint32_t lo = __vsub4((w & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
  const uint32_t hi = __vsub4(((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
  k0_3 = __byte_perm(lo, hi, 0x5140);
  k4_7 = __byte_perm(lo, hi, 0x7362);
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ void store_out(T* y, int64_t idx, float v);
template <>
__device__ __forceinline__ void store_out<float>(float* y, int64_t idx, float v) { y[idx] = v; }
template <>
__device__ __forceinline__ void store_out<__half>(__half* y, int64_t idx, float v) { y[idx] = __float2half_rn(v); }

// One BM x BN output tile at rows bm, columns bn. The k loop ends with a barrier, so a block may run this again for
// another tile right away.
template <bool W4, bool GROUPED, typename TOut>
__device__ __forceinline__ void gemm_block_tile(const QuantLinearParams& p, const int8_t* __restrict__ A,
                                                const float* __restrict__ row_scale, int64_t bm, int64_t bn) {
  __shared__ __align__(16) int8_t As[2][BM][BK + PAD];
  __shared__ __align__(16) int8_t Bs[2][BN][BK + PAD];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // 2 x 4 warps, each 64 x 32
  const int g = lane >> 2, t = lane & 3;
  const int64_t KT = p.Kp / BK;
  const uint8_t* W = static_cast<const uint8_t*>(p.w);

  uint4 ra[2], rb[2];
  auto load_global = [&](int64_t kt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * THREADS, row = c >> 2, col = (c & 3) * 16;
      const int64_t m = bm + row;
      ra[i] = m < p.M ? *reinterpret_cast<const uint4*>(A + m * p.Kp + kt * BK + col) : make_uint4(0, 0, 0, 0);
    }
    if (!W4) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int c = tid + i * THREADS, row = c >> 2, col = (c & 3) * 16;
        const int64_t n = bn + row;
        rb[i] = n < p.N ? *reinterpret_cast<const uint4*>(W + n * p.Kp + kt * BK + col) : make_uint4(0, 0, 0, 0);
      }
    } else {
      const int row = tid >> 1, half = tid & 1;
      const int64_t n = bn + row;
      rb[0] = n < p.N ? *reinterpret_cast<const uint4*>(W + n * (p.Kp / 2) + kt * (BK / 2) + half * 16)
                      : make_uint4(0, 0, 0, 0);
    }
  };
  auto store_shared = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * THREADS, row = c >> 2, col = (c & 3) * 16;
      *reinterpret_cast<uint4*>(&As[buf][row][col]) = ra[i];
    }
    if (!W4) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int c = tid + i * THREADS, row = c >> 2, col = (c & 3) * 16;
        *reinterpret_cast<uint4*>(&Bs[buf][row][col]) = rb[i];
      }
    } else {
      const int row = tid >> 1, half = tid & 1;
      uint4 lo, hi;
      unpack_int4(rb[0].x, lo.x, lo.y);
      unpack_int4(rb[0].y, lo.z, lo.w);
      unpack_int4(rb[0].z, hi.x, hi.y);
      unpack_int4(rb[0].w, hi.z, hi.w);
      *reinterpret_cast<uint4*>(&Bs[buf][row][half * 32]) = lo;
      *reinterpret_cast<uint4*>(&Bs[buf][row][half * 32 + 16]) = hi;
    }
  };

  int32_t acc[4][4][4];
  float facc[4][4][4];  // per-group weights: the fp32 sum over the groups (unused, so not allocated, otherwise)
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
  if constexpr (GROUPED) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) facc[i][j][r] = 0.f;
  }
  // acc (this thread's columns bn + warp_n * 32 + nt * 8 + t * 2 + j) += group grp's scale x acc; acc = 0.
  auto fold_group = [&](int64_t grp) {
    float ws[4][2];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t n = bn + warp_n * 32 + nt * 8 + t * 2 + j;
        ws[nt][j] = n < p.N ? p.w_scale[grp * p.N + n] : 0.f;
      }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          facc[mt][nt][r] = fmaf(static_cast<float>(acc[mt][nt][r]), ws[nt][r & 1], facc[mt][nt][r]);
          acc[mt][nt][r] = 0;
        }
  };

  load_global(0);
  store_shared(0);
  __syncthreads();
  for (int64_t kt = 0; kt < KT; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < KT) load_global(kt + 1);
#pragma unroll
    for (int ks = 0; ks < BK / 32; ++ks) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int r0 = warp_m * 64 + mt * 16 + g;
        const int k0 = ks * 32 + t * 4;
        a[mt][0] = *reinterpret_cast<const uint32_t*>(&As[cur][r0][k0]);
        a[mt][1] = *reinterpret_cast<const uint32_t*>(&As[cur][r0 + 8][k0]);
        a[mt][2] = *reinterpret_cast<const uint32_t*>(&As[cur][r0][k0 + 16]);
        a[mt][3] = *reinterpret_cast<const uint32_t*>(&As[cur][r0 + 8][k0 + 16]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c0 = warp_n * 32 + nt * 8 + g;
        const int k0 = ks * 32 + t * 4;
        b[nt][0] = *reinterpret_cast<const uint32_t*>(&Bs[cur][c0][k0]);
        b[nt][1] = *reinterpret_cast<const uint32_t*>(&Bs[cur][c0][k0 + 16]);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_s8(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
      if constexpr (GROUPED) {  // k steps past K (the zero padding to Kp) belong to no group and add nothing
        const int64_t k_end = kt * BK + (ks + 1) * 32;
        if (k_end <= p.K && k_end % p.group_size == 0) fold_group(k_end / p.group_size - 1);
      }
    }
    if (kt + 1 < KT) store_shared(cur ^ 1);
    __syncthreads();
  }

  TOut* Y = static_cast<TOut*>(p.y);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = bm + warp_m * 64 + mt * 16 + g + half * 8;
      if (m >= p.M) continue;
      const float s = row_scale[m];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t n = bn + warp_n * 32 + nt * 8 + t * 2 + j;
          if (n >= p.N) continue;
          float v;
          if constexpr (GROUPED)
            v = facc[mt][nt][half * 2 + j] * s;
          else
            v = static_cast<float>(acc[mt][nt][half * 2 + j]) * (s * p.w_scale[n]);
          if (p.bias) v += p.bias[n];
          store_out(Y, m * p.N + n, v);
        }
      }
    }
  }
}

// Column tiles on x; row tiles on y, strided beyond gridDim.y's cap (launch_geometry.h).
template <bool W4, bool GROUPED, typename TOut>
__global__ void __launch_bounds__(THREADS) gemm_kernel(QuantLinearParams p, const int8_t* __restrict__ A,
                                                       const float* __restrict__ row_scale) {
  const int64_t row_tiles = (p.M + BM - 1) / BM;
  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y)
    gemm_block_tile<W4, GROUPED, TOut>(p, A, row_scale, tile * BM, static_cast<int64_t>(blockIdx.x) * BN);
}

// Decode with 1 to 4 rows: one warp per output column n of MMAX >= M rows. Lane l takes 16 (W8) or 32 (W4) k
// values at k = l * step + j * 32 * step: one chunk of 32 * step k per pass of the warp.
template <bool W4>
constexpr int kGemvLaneK = W4 ? 32 : 16;

// One lane's k values at k of column n's weight row, against the rows' activations at a + r * Kp, into the exact
// int32 sums acc.
template <int MMAX, bool W4>
__device__ __forceinline__ void gemv_lane_step(const QuantLinearParams& p, const uint8_t* __restrict__ wrow, int64_t k,
                                               const int8_t* __restrict__ a, int32_t (&acc)[MMAX]) {
  auto load_a = [&](int r, int offset) { return __ldg(reinterpret_cast<const uint4*>(a + r * p.Kp + offset)); };
  if constexpr (!W4) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(wrow + k));
#pragma unroll
    for (int r = 0; r < MMAX; ++r) {
      if (r >= p.M) break;
      const uint4 x = load_a(r, 0);
      acc[r] = __dp4a(static_cast<int>(x.x), static_cast<int>(w.x), acc[r]);
      acc[r] = __dp4a(static_cast<int>(x.y), static_cast<int>(w.y), acc[r]);
      acc[r] = __dp4a(static_cast<int>(x.z), static_cast<int>(w.z), acc[r]);
      acc[r] = __dp4a(static_cast<int>(x.w), static_cast<int>(w.w), acc[r]);
    }
  } else {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(wrow + k / 2));
    uint32_t u[8];
    unpack_int4(w.x, u[0], u[1]);
    unpack_int4(w.y, u[2], u[3]);
    unpack_int4(w.z, u[4], u[5]);
    unpack_int4(w.w, u[6], u[7]);
#pragma unroll
    for (int r = 0; r < MMAX; ++r) {
      if (r >= p.M) break;
      const uint4 a0 = load_a(r, 0), a1 = load_a(r, 16);
      acc[r] = __dp4a(static_cast<int>(a0.x), static_cast<int>(u[0]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a0.y), static_cast<int>(u[1]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a0.z), static_cast<int>(u[2]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a0.w), static_cast<int>(u[3]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a1.x), static_cast<int>(u[4]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a1.y), static_cast<int>(u[5]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a1.z), static_cast<int>(u[6]), acc[r]);
      acc[r] = __dp4a(static_cast<int>(a1.w), static_cast<int>(u[7]), acc[r]);
    }
  }
}

// A column's sums: exact int32 ones (per channel), or fp32 ones that each lane step folds in with its group's scale
// (per group: padding past K adds zeros).
template <int MMAX, bool GROUPED>
struct GemvSums {
  int32_t acc[MMAX];
  float facc[GROUPED ? MMAX : 1];

  __device__ __forceinline__ GemvSums() {
#pragma unroll
    for (int r = 0; r < MMAX; ++r) acc[r] = 0;
#pragma unroll
    for (int r = 0; r < (GROUPED ? MMAX : 1); ++r) facc[r] = 0.f;
  }

  __device__ __forceinline__ void fold(const QuantLinearParams& p, int64_t k, int64_t n) {
    if constexpr (GROUPED) {
      const float ws = k < p.K ? p.w_scale[(k / p.group_size) * p.N + n] : 0.f;
#pragma unroll
      for (int r = 0; r < MMAX; ++r) {
        facc[r] = fmaf(static_cast<float>(acc[r]), ws, facc[r]);
        acc[r] = 0;
      }
    }
  }

  // Warp sums, then lane 0 applies the scales and the bias and stores the column.
  template <typename TOut>
  __device__ __forceinline__ void store(const QuantLinearParams& p, const float* __restrict__ row_scale, int64_t n) {
    TOut* Y = static_cast<TOut*>(p.y);
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < MMAX; ++r) {
      if (r >= p.M) break;
      float y;
      if constexpr (GROUPED) {
        float v = facc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
        y = v * row_scale[r];
      } else {
        int32_t v = acc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
        y = static_cast<float>(v) * (row_scale[r] * p.w_scale[n]);
      }
      if (lane == 0) {
        if (p.bias) y += p.bias[n];
        store_out(Y, r * p.N + n, y);
      }
    }
  }
};

template <bool W4>
__device__ __forceinline__ const uint8_t* weight_row(const QuantLinearParams& p, int64_t n) {
  return static_cast<const uint8_t*>(p.w) + n * (W4 ? p.Kp / 2 : p.Kp);
}

// 1 to 4 rows: one warp per output column, the activations (L1-resident) read again for every column, four lane
// steps' loads in flight; columns beyond the grid's cap are strided (launch_geometry.h).
template <int MMAX, bool W4, bool GROUPED, typename TOut>
__global__ void __launch_bounds__(256) gemv_kernel(QuantLinearParams p, const int8_t* __restrict__ A,
                                                   const float* __restrict__ row_scale) {
  constexpr int step = kGemvLaneK<W4>;
  const int64_t warps = blockDim.x / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); n < p.N; n += gridDim.x * warps) {
    GemvSums<MMAX, GROUPED> sums;
    const uint8_t* wrow = weight_row<W4>(p, n);
#pragma unroll 4
    for (int64_t k = lane * step; k < p.Kp; k += 32 * step) {
      gemv_lane_step<MMAX, W4>(p, wrow, k, A + k, sums.acc);
      sums.fold(p, k, n);
    }
    sums.template store<TOut>(p, row_scale, n);
  }
}

__device__ __forceinline__ uint32_t load_u32(const void* p) { return __ldg(static_cast<const uint32_t*>(p)); }
__device__ __forceinline__ uint32_t load_u16(const void* p) { return __ldg(static_cast<const unsigned short*>(p)); }

// Decode with 5 to 16 rows on the tensor cores: the rows, zero beyond M, are the m16 of mma.m16n8k32 and a block
// takes kGemvMmaColumns columns, kGemvMmaTiles n8 tiles per warp that share each A fragment (the activations are
// read from L2 once per 32 columns, not once per column as with a warp per column: 0.35x of fp16 at M = 16 on an
// H200). The 8 warps take every 8th 32-k step, kGemvMmaBatch steps' loads in flight at a time, and their tiles are
// added in warp order. Per channel the int32 sums are exact (the same result as gemv_kernel); per group each step
// (inside one group: group sizes are multiples of 32) is folded into fp32 with its group's scales.
constexpr int kGemvMmaBatch = 4;
constexpr int kGemvMmaTiles = static_cast<int>(kGemvMmaColumns / 8);

template <bool W4, bool GROUPED, typename TOut>
__global__ void __launch_bounds__(256) gemv_mma_kernel(QuantLinearParams p, const int8_t* __restrict__ A,
                                                       const float* __restrict__ row_scale) {
  constexpr int kWarps = 8, kBatch = kGemvMmaBatch, kTiles = kGemvMmaTiles, kCols = 8 * kTiles;
  using Sum = typename std::conditional<GROUPED, float, int32_t>::type;
  __shared__ Sum tiles[kWarps][16][kCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t steps = p.Kp / 32;
  const bool lo_ok = g < p.M, hi_ok = g + 8 < p.M;
  const int8_t* a_lo = A + static_cast<int64_t>(g) * p.Kp + 4 * t;
  const int8_t* a_hi = A + static_cast<int64_t>(g + 8) * p.Kp + 4 * t;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.x) * kCols; n0 < p.N; n0 += static_cast<int64_t>(gridDim.x) * kCols) {
    // Tile i: this lane's B column is n0 + 8i + g; its C columns are n0 + 8i + 2t and + 1.
    const uint8_t* wrow[kTiles];
    bool col_ok[kTiles];
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      col_ok[i] = n0 + 8 * i + g < p.N;
      wrow[i] = weight_row<W4>(p, col_ok[i] ? n0 + 8 * i + g : 0);
    }
    int32_t c[kTiles][4] = {};
    float f[kTiles][4] = {};
    for (int64_t s0 = warp; s0 < steps; s0 += kWarps * kBatch) {
      uint32_t a[kBatch][4], b[kBatch][kTiles][2];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int64_t k = (s0 + j * kWarps) * 32;
        const bool in = k < p.Kp;
        a[j][0] = in && lo_ok ? load_u32(a_lo + k) : 0u;
        a[j][1] = in && hi_ok ? load_u32(a_hi + k) : 0u;
        a[j][2] = in && lo_ok ? load_u32(a_lo + k + 16) : 0u;
        a[j][3] = in && hi_ok ? load_u32(a_hi + k + 16) : 0u;
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {
          const bool ok = in && col_ok[i];
          if constexpr (W4) {  // k .. k+3 and k+16 .. k+19 of the column: two packed bytes each
            uint32_t unused;
            unpack_int4(ok ? load_u16(wrow[i] + k / 2 + 2 * t) : 0u, b[j][i][0], unused);
            unpack_int4(ok ? load_u16(wrow[i] + k / 2 + 8 + 2 * t) : 0u, b[j][i][1], unused);
          } else {
            b[j][i][0] = ok ? load_u32(wrow[i] + k + 4 * t) : 0u;
            b[j][i][1] = ok ? load_u32(wrow[i] + k + 16 + 4 * t) : 0u;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int64_t k = (s0 + j * kWarps) * 32;
        if (k >= p.Kp) break;
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {
          if constexpr (GROUPED) {
            int32_t step[4] = {0, 0, 0, 0};
            mma_s8(step, a[j], b[j][i][0], b[j][i][1]);
            const int64_t row = (k / p.group_size) * p.N;  // past K (the zero padding): no group, adds zeros
            const int64_t n_even = n0 + 8 * i + 2 * t;
            const float w0 = k < p.K && n_even < p.N ? p.w_scale[row + n_even] : 0.f;
            const float w1 = k < p.K && n_even + 1 < p.N ? p.w_scale[row + n_even + 1] : 0.f;
            f[i][0] = fmaf(static_cast<float>(step[0]), w0, f[i][0]);
            f[i][1] = fmaf(static_cast<float>(step[1]), w1, f[i][1]);
            f[i][2] = fmaf(static_cast<float>(step[2]), w0, f[i][2]);
            f[i][3] = fmaf(static_cast<float>(step[3]), w1, f[i][3]);
          } else {
            mma_s8(c[i], a[j], b[j][i][0], b[j][i][1]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 8 * i + 2 * t + (e & 1);
        if constexpr (GROUPED) tiles[warp][row][col] = f[i][e];
        else tiles[warp][row][col] = c[i][e];
      }
    __syncthreads();
    for (int o = threadIdx.x; o < 16 * kCols; o += blockDim.x) {
      const int row = o / kCols, col = o % kCols;
      const int64_t n = n0 + col;
      if (row < p.M && n < p.N) {
        Sum sum = 0;
        for (int w = 0; w < kWarps; ++w) sum += tiles[w][row][col];
        float y;
        if constexpr (GROUPED) y = sum * row_scale[row];
        else y = static_cast<float>(sum) * (row_scale[row] * p.w_scale[n]);
        if (p.bias) y += p.bias[n];
        store_out(static_cast<TOut*>(p.y), row * p.N + n, y);
      }
    }
    __syncthreads();  // the next columns rewrite tiles
  }
}

// CMC's T = X @ lowrank_a: a shared-memory tiled fp32 GEMM, one 64-token x 64-rank tile and one split of K per block
// (launch_geometry.h), each thread 4 x 4 outputs (tokens ty + 16 i, ranks tx + 16 j: conflict-free reads), k in
// steps of 32 in a fixed order. Writes T itself when K is not split, else the split's partial T [split][M][rank].
// The correction applies to non-text tokens (their X is read as 0 otherwise); without modality inputs, to every one.
template <int KIND>
__global__ void __launch_bounds__(256) lowrank_t_kernel(QuantLinearParams p, float* out, int64_t splits) {
  constexpr int kTile = static_cast<int>(kLowRankTile), kStep = 32;
  __shared__ float xs[kStep][kTile + 1];
  __shared__ float as[kStep][kTile];
  __shared__ bool on[kTile];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const bool has_modality = p.modality.ids != nullptr || p.modality.split >= 0;
  const int64_t chunk = (p.K + splits - 1) / splits;
  const int64_t k_begin = blockIdx.y * chunk, k_end = k_begin + chunk < p.K ? k_begin + chunk : p.K;
  float* part = out + static_cast<int64_t>(blockIdx.y) * p.M * p.rank;
  const int64_t rank_tiles = (p.rank + kTile - 1) / kTile, tiles = (p.M + kTile - 1) / kTile * rank_tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t m0 = tile / rank_tiles * kTile, r0 = tile % rank_tiles * kTile;
    if (threadIdx.x < kTile) {
      const int64_t m = m0 + threadIdx.x;
      on[threadIdx.x] = m < p.M && (!has_modality || token_class(p.modality, m) == kImageClass);
    }
    float acc[4][4] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kStep) {
      __syncthreads();  // on[] is written; the previous step's tiles are read
      for (int e = threadIdx.x; e < kTile * kStep; e += blockDim.x) {
        const int t = e / kStep, kk = e % kStep;
        const int64_t k = k0 + kk;
        float v = 0.f;
        if (on[t] && k < k_end) {
          v = x_value<KIND>(p, (m0 + t) * p.Kx + p.col0 + k);
        }
        xs[kk][t] = v;
        const int ka = e / kTile, r = e % kTile;
        as[ka][r] = (k0 + ka < k_end && r0 + r < p.rank) ? p.lowrank_a[(k0 + ka) * p.rank + r0 + r] : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kStep; ++kk) {
        float xv[4], av[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = xs[kk][ty + 16 * i], av[i] = as[kk][tx + 16 * i];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += xv[i] * av[j];
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t m = m0 + ty + 16 * i, r = r0 + tx + 16 * j;
        if (m < p.M && r < p.rank) part[m * p.rank + r] = acc[i][j];
      }
    __syncthreads();  // the next tile rewrites on[]
  }
}

// T = the sum of the splits' partial T, in split order.
__global__ void lowrank_sum_kernel(const float* parts, int64_t splits, int64_t count, float* T) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) s += parts[sp * count + i];
    T[i] = s;
  }
}

// Column blocks on x, 8-token tiles on y, strided beyond gridDim.y's cap of 65,535 (launch_geometry.h). Each
// lowrank_b value is read once for the tile's tokens; a token's sum keeps the order Y + T_0 B_0 + T_1 B_1 + ...
template <int KIND, typename TOut>
__global__ void branches_kernel(QuantLinearParams p, const float* T) {
  constexpr int kRows = static_cast<int>(kEpilogueRows);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= p.N) return;
  TOut* Y = static_cast<TOut*>(p.y);
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows; m0 < p.M; m0 += static_cast<int64_t>(gridDim.y) * kRows) {
    const int rows = p.M - m0 < kRows ? static_cast<int>(p.M - m0) : kRows;
    float y[kRows];
#pragma unroll
    for (int t = 0; t < kRows; ++t) {
      if (t >= rows) break;
      if constexpr (sizeof(TOut) == 2) y[t] = __half2float(Y[(m0 + t) * p.N + n]); else y[t] = Y[(m0 + t) * p.N + n];
    }
    if (T) {
      for (int64_t r = 0; r < p.rank; ++r) {
        const float b = p.lowrank_b[r * p.N + n];
#pragma unroll
        for (int t = 0; t < kRows; ++t)
          if (t < rows) y[t] += T[(m0 + t) * p.rank + r] * b;
      }
    }
#pragma unroll
    for (int t = 0; t < kRows; ++t) {
      if (t >= rows) break;
      if (p.side_row) {
        y[t] += x_value<KIND>(p, (m0 + t) * p.Kx) * p.side_row[n];
      }
      store_out(Y, (m0 + t) * p.N + n, y[t]);
    }
  }
}

// K = 0, a GEMM with an empty reduction: Y = bias (or 0). Same geometry as branches_kernel.
template <typename TOut>
__global__ void bias_fill_kernel(QuantLinearParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= p.N) return;
  TOut* Y = static_cast<TOut*>(p.y);
  const float b = p.bias ? p.bias[n] : 0.f;
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kEpilogueRows; m0 < p.M; m0 += static_cast<int64_t>(gridDim.y) * kEpilogueRows)
    for (int64_t m = m0; m < m0 + kEpilogueRows && m < p.M; ++m) store_out(Y, m * p.N + n, b);
}

inline dim3 dims(const Grid& g) { return dim3(g.x, g.y, g.z); }

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

template <bool W4, bool GROUPED, typename TOut>
void launch_gemm_as(const QuantLinearParams& p, const Grid& g, const int8_t* A, const float* rs, cudaStream_t st) {
  const dim3 grid = dims(g);
  if (p.M <= kGemvMaxRows) {
    if (p.M <= 1) gemv_kernel<1, W4, GROUPED, TOut><<<grid, 32 * kGemvColumns, 0, st>>>(p, A, rs);
    else if (p.M <= kGemvMaxDp4aRows) gemv_kernel<4, W4, GROUPED, TOut><<<grid, 32 * kGemvColumns, 0, st>>>(p, A, rs);
    else gemv_mma_kernel<W4, GROUPED, TOut><<<grid, 256, 0, st>>>(p, A, rs);
  } else {
    gemm_kernel<W4, GROUPED, TOut><<<grid, THREADS, 0, st>>>(p, A, rs);
  }
}

template <bool W4, typename TOut>
void launch_gemm(const QuantLinearParams& p, const Grid& g, const int8_t* A, const float* rs, cudaStream_t st) {
  if (p.group_size)
    launch_gemm_as<W4, true, TOut>(p, g, A, rs, st);
  else
    launch_gemm_as<W4, false, TOut>(p, g, A, rs, st);
}

// Partial T of the K splits (none when K is not split), after T.
int64_t lowrank_parts_bytes(const QuantLinearParams& p) {
  const int64_t splits = p.rank ? lowrank_k_splits(p.M, p.K, p.rank) : 1;
  return splits > 1 ? align256(splits * p.M * p.rank * 4) : 0;
}

}  // namespace

int64_t quant_linear_workspace_bytes(const QuantLinearParams& p) {
  return align256(p.M * p.Kp) + align256(p.M * 4) + align256(p.M * p.rank * 4) + lowrank_parts_bytes(p);
}

int quant_linear(const QuantLinearParams& p, void* workspace, void* stream) {
  if (p.M == 0 || p.N == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int8_t* A = static_cast<int8_t*>(workspace);
  float* rs = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(p.M * p.Kp));
  float* T = p.rank ? reinterpret_cast<float*>(reinterpret_cast<char*>(rs) + align256(p.M * 4)) : nullptr;
  const QuantLinearGrids grids = quant_linear_grids(p.M, p.N);
  const dim3 rows = dims(grids.rows), epilogue = dims(grids.epilogue);
  const int epilogue_threads = static_cast<int>(kEpilogueColumns);
  if (p.K == 0) {
    p.y_half ? bias_fill_kernel<__half><<<epilogue, epilogue_threads, 0, st>>>(p)
             : bias_fill_kernel<float><<<epilogue, epilogue_threads, 0, st>>>(p);
  } else {
    if (p.x_kind == 0) quantize_kernel<0><<<rows, 256, 0, st>>>(p, A, rs);
    else if (p.x_kind == 1) quantize_kernel<1><<<rows, 256, 0, st>>>(p, A, rs);
    else quantize_kernel<2><<<rows, 256, 0, st>>>(p, A, rs);
    if (p.bits == 4) {
      p.y_half ? launch_gemm<true, __half>(p, grids.gemm, A, rs, st) : launch_gemm<true, float>(p, grids.gemm, A, rs, st);
    } else {
      p.y_half ? launch_gemm<false, __half>(p, grids.gemm, A, rs, st) : launch_gemm<false, float>(p, grids.gemm, A, rs, st);
    }
  }
  if ((p.rank || p.side_row) && p.x_kind != 2) {
    if (p.rank) {
      const int64_t splits = lowrank_k_splits(p.M, p.K, p.rank);
      float* parts = splits > 1 ? reinterpret_cast<float*>(reinterpret_cast<char*>(T) + align256(p.M * p.rank * 4)) : T;
      const dim3 lowrank = dims(column_row_grid(lowrank_tiles(p.M, p.rank), splits));
      if (p.x_kind == 0) lowrank_t_kernel<0><<<lowrank, 256, 0, st>>>(p, parts, splits);
      else lowrank_t_kernel<1><<<lowrank, 256, 0, st>>>(p, parts, splits);
      if (splits > 1) {
        const int64_t count = p.M * p.rank;
        lowrank_sum_kernel<<<dims(row_grid((count + 255) / 256)), 256, 0, st>>>(parts, splits, count, T);
      }
    }
    if (p.x_kind == 0)
      p.y_half ? branches_kernel<0, __half><<<epilogue, epilogue_threads, 0, st>>>(p, T)
               : branches_kernel<0, float><<<epilogue, epilogue_threads, 0, st>>>(p, T);
    else
      p.y_half ? branches_kernel<1, __half><<<epilogue, epilogue_threads, 0, st>>>(p, T)
               : branches_kernel<1, float><<<epilogue, epilogue_threads, 0, st>>>(p, T);
  }
  return static_cast<int>(cudaGetLastError());
}

void prepack_weights_host(const void* w, int bits, int64_t N, int64_t K, uint8_t* out) {
  const int64_t Kp = padded_k(K);
  if (bits == 8) {
    const int8_t* src = static_cast<const int8_t*>(w);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < Kp; ++k) out[n * Kp + k] = k < K ? static_cast<uint8_t>(src[n * K + k]) : 0;
  } else {
    const uint8_t* src = static_cast<const uint8_t*>(w);
    const int64_t in_row = (K + 1) / 2, out_row = Kp / 2;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < out_row; ++j) out[n * out_row + j] = j < in_row ? src[n * in_row + j] : 0;
  }
}

}  // namespace cuda
}  // namespace mqc
