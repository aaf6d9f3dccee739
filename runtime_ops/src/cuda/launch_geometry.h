// Launch grids of the CUDA kernels: plain host arithmetic (no CUDA header), so it is unit-tested without a GPU
// through mqc_cuda_grid_rows / mqc_cuda_quant_linear_grids (c_api.cu).
//
// CUDA caps gridDim.x at 2^31 - 1 and gridDim.y, gridDim.z at 65,535. Every kernel that gives a block one row
// (or one row tile) therefore takes a capped grid and walks the rest with a grid-stride loop:
//   for (int64_t m = blockIdx.y; m < M; m += gridDim.y)      (likewise over blockIdx.x)
// Below the caps each block runs the loop body once, the launch of before.
#pragma once

#include <cstdint>

namespace mqc {
namespace cuda {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

struct Grid {
  uint32_t x = 1, y = 1, z = 1;
};

inline uint32_t capped(int64_t blocks, int64_t cap) {
  return static_cast<uint32_t>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// One block per row on x (rows beyond the cap are strided).
inline Grid row_grid(int64_t rows) {
  Grid g;
  g.x = capped(rows, kMaxGridX);
  return g;
}

// Column blocks on x, row blocks (rows or row tiles) on y (strided beyond 65,535).
inline Grid column_row_grid(int64_t column_blocks, int64_t row_blocks) {
  Grid g;
  g.x = capped(column_blocks, kMaxGridX);
  g.y = capped(row_blocks, kMaxGridYZ);
  return g;
}

// QuantLinear's launches for M tokens and N output channels (quant_linear.cu). Block shapes are fixed there.
constexpr int64_t kGemmTile = 128;         // prefill block tile, rows and columns
constexpr int64_t kGemvColumns = 8;        // decode, M <= 4: one warp per column, 8 warps per block
constexpr int64_t kGemvMaxDp4aRows = 4;    // decode above this: tensor cores, 32 columns per block
constexpr int64_t kGemvMmaColumns = 32;
constexpr int64_t kEpilogueColumns = 256;  // branches and K = 0 fill: one thread per column
constexpr int64_t kEpilogueRows = 8;       // ... and per 8 tokens (each lowrank_b value read once for 8)
constexpr int64_t kGemvMaxRows = 16;       // M <= 16 runs the decode kernel

struct QuantLinearGrids {
  Grid rows;      // quantize: one block per token
  Grid gemm;      // prefill (M > 16) or decode (M <= 16)
  Grid epilogue;  // channel-0 and low-rank branches, K = 0 bias fill: column blocks x 8-token tiles
};

// CMC's T = X @ lowrank_a (quant_linear.cu): 64 x 64 (token x rank) tiles on x, the reduction over K split in
// `lowrank_k_splits` chunks on y, so that decode (one token) still spreads over many blocks. Each split writes its
// partial T and a second kernel sums them in split order: deterministic, no atomics.
constexpr int64_t kLowRankTile = 64;
constexpr int64_t kLowRankMinChunk = 256;  // k values per split, at least
constexpr int64_t kLowRankMaxSplits = 64;
constexpr int64_t kLowRankTargetBlocks = 256;

inline int64_t lowrank_tiles(int64_t M, int64_t rank) {
  return ((M + kLowRankTile - 1) / kLowRankTile) * ((rank + kLowRankTile - 1) / kLowRankTile);
}

inline int64_t lowrank_k_splits(int64_t M, int64_t K, int64_t rank) {
  const int64_t tiles = lowrank_tiles(M, rank);
  int64_t s = (kLowRankTargetBlocks + tiles - 1) / tiles;
  const int64_t by_chunk = K / kLowRankMinChunk;
  if (s > by_chunk) s = by_chunk;
  if (s > kLowRankMaxSplits) s = kLowRankMaxSplits;
  return s < 1 ? 1 : s;
}

inline QuantLinearGrids quant_linear_grids(int64_t M, int64_t N) {
  QuantLinearGrids g;
  g.rows = row_grid(M);
  if (M <= kGemvMaxDp4aRows)
    g.gemm = row_grid((N + kGemvColumns - 1) / kGemvColumns);
  else if (M <= kGemvMaxRows)
    g.gemm = row_grid((N + kGemvMmaColumns - 1) / kGemvMmaColumns);
  else
    g.gemm = column_row_grid((N + kGemmTile - 1) / kGemmTile, (M + kGemmTile - 1) / kGemmTile);
  g.epilogue = column_row_grid((N + kEpilogueColumns - 1) / kEpilogueColumns, (M + kEpilogueRows - 1) / kEpilogueRows);
  return g;
}

}  // namespace cuda
}  // namespace mqc
