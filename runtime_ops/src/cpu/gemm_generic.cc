// Portable CPU kernels on the packed layout (common.h), for CPUs without AVX2 (and MQC_CPU_ISA=generic); the
// inner loops over 16 columns and 4 bytes are written so that the compiler can vectorize them.
#include "cpu/gemm.h"

namespace mqc {
namespace generic {
namespace {

template <int MR>
void tile_w8(const GemmArgs& g, int64_t m, int64_t p) {
  const PackedWeights& W = *g.W;
  const int64_t G = W.Kp / 4;
  alignas(64) int32_t acc[MR][16];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 16; ++j) acc[r][j] = 0;
  const int8_t* B = reinterpret_cast<const int8_t*>(W.panel(p));
  for (int64_t q = 0; q < G; ++q) {
    const int8_t* b = B + q * 64;
    for (int r = 0; r < MR; ++r) {
      const uint8_t* a = g.A + (m + r) * g.lda + q * 4;
      const int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      for (int j = 0; j < 16; ++j)
        acc[r][j] += a0 * b[j * 4] + a1 * b[j * 4 + 1] + a2 * b[j * 4 + 2] + a3 * b[j * 4 + 3];
    }
  }
  const int64_t n0 = p * 16, cnt = std::min<int64_t>(16, g.N - n0);
  for (int r = 0; r < MR; ++r)
    epilogue_scalar(acc[r], n0, cnt, 0, W.colcorr.data(), g.row_scale[m + r], g, m + r);
}

template <int MR>
void tile_w4(const GemmArgs& g, int64_t m, int64_t p) {
  const PackedWeights& W = *g.W;
  const int64_t G2 = W.Kp / 8;
  alignas(64) int32_t acc[MR][16];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 16; ++j) acc[r][j] = 0;
  const uint8_t* B = W.panel(p);
  for (int64_t h = 0; h < G2; ++h) {
    const uint8_t* b = B + h * 64;
    int32_t lo[64], hi[64];
    for (int i = 0; i < 64; ++i) {
      lo[i] = b[i] & 0x0F;
      hi[i] = b[i] >> 4;
    }
    for (int r = 0; r < MR; ++r) {
      const int8_t* a = reinterpret_cast<const int8_t*>(g.A + (m + r) * g.lda + h * 8);
      for (int j = 0; j < 16; ++j) {
        int32_t s = 0;
        for (int t = 0; t < 4; ++t) s += lo[j * 4 + t] * a[t] + hi[j * 4 + t] * a[4 + t];
        acc[r][j] += s;
      }
    }
  }
  const int64_t n0 = p * 16, cnt = std::min<int64_t>(16, g.N - n0);
  for (int r = 0; r < MR; ++r)
    epilogue_scalar(acc[r], n0, cnt, 8 * g.rowsum[m + r], nullptr, g.row_scale[m + r], g, m + r);
}

// Per-group weights: the same integer loops, one group of k at a time; each group's int32 sums (minus its
// correction) are scaled by the group's w_scale and summed in fp32, then y = sum * s + bias.
template <int MR, bool W4>
void tile_grouped(const GemmArgs& g, int64_t m, int64_t p) {
  const PackedWeights& W = *g.W;
  const int64_t steps = W.group_size / (W4 ? 8 : 4);  // k steps of 8 (W4) or 4 (W8) bytes per group
  const int64_t n0 = p * 16, cnt = std::min<int64_t>(16, g.N - n0);
  alignas(64) float f[MR][16];
  alignas(64) int32_t acc[MR][16];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 16; ++j) f[r][j] = 0.f;
  const uint8_t* B = W.panel(p);
  for (int64_t grp = 0; grp < W.groups; ++grp) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 16; ++j) acc[r][j] = 0;
    for (int64_t q = grp * steps; q < (grp + 1) * steps; ++q) {
      const uint8_t* b = B + q * 64;
      for (int r = 0; r < MR; ++r) {
        const uint8_t* a = g.A + (m + r) * g.lda + q * (W4 ? 8 : 4);
        for (int j = 0; j < 16; ++j) {
          int32_t s = 0;
          if constexpr (W4) {
            const int8_t* x = reinterpret_cast<const int8_t*>(a);
            for (int t = 0; t < 4; ++t) s += (b[j * 4 + t] & 0x0F) * x[t] + (b[j * 4 + t] >> 4) * x[4 + t];
          } else {
            const int8_t* w = reinterpret_cast<const int8_t*>(b);
            for (int t = 0; t < 4; ++t) s += a[t] * w[j * 4 + t];
          }
          acc[r][j] += s;
        }
      }
    }
    const float* ws = g.w_scale + grp * g.ldws;
    for (int r = 0; r < MR; ++r) {
      if constexpr (W4)
        fold_group_scalar(f[r], acc[r], n0, cnt, 8 * g.rowsum[(m + r) * W.groups + grp], nullptr, ws);
      else
        fold_group_scalar(f[r], acc[r], n0, cnt, 0, W.group_colcorr(grp), ws);
    }
  }
  for (int r = 0; r < MR; ++r) epilogue_grouped_scalar(f[r], n0, cnt, g.row_scale[m + r], g, m + r);
}

template <bool W4>
void gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (g.W->group_size) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t m = m0;
      for (; m + 4 <= m1; m += 4) tile_grouped<4, W4>(g, m, p);
      for (; m < m1; ++m) tile_grouped<1, W4>(g, m, p);
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) W4 ? tile_w4<4>(g, m, p) : tile_w8<4>(g, m, p);
    for (; m < m1; ++m) W4 ? tile_w4<1>(g, m, p) : tile_w8<1>(g, m, p);
  }
}

void gemm_w8(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) { gemm<false>(g, m0, m1, p0, p1); }
void gemm_w4(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) { gemm<true>(g, m0, m1, p0, p1); }

void quantize_rows(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, int64_t Kp,
                   const float* row_scale, bool offset128, uint8_t* A, int32_t* rowsum, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* a = A + m * Kp;
    const float s = row_scale[m];
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      int8_t q;
      if (src_kind == 0) {
        q = quantize_rne(static_cast<const float*>(X)[m * ldx + col0 + k] / s);
      } else if (src_kind == 1) {
        q = quantize_rne(half_to_float(static_cast<const uint16_t*>(X)[m * ldx + col0 + k]) / s);
      } else {
        q = static_cast<const int8_t*>(X)[m * ldx + col0 + k];
      }
      sum += q;
      a[k] = offset128 ? (uint8_t)(q + 128) : (uint8_t)q;
    }
    for (int64_t k = K; k < Kp; ++k) a[k] = offset128 ? 128 : 0;
    if (rowsum) rowsum[m] = sum;
  }
}

void dynamic_scales(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, float* row_scale, int64_t m0,
                    int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float absmax;
    if (src_kind == 0) {
      const float* row = static_cast<const float*>(X) + m * ldx + col0;
      uint32_t top = 0;
      for (int64_t k = 0; k < K; ++k) {
        uint32_t bits;
        std::memcpy(&bits, row + k, 4);
        top = std::max(top, bits & 0x7FFFFFFFu);
      }
      std::memcpy(&absmax, &top, 4);
    } else {  // half: the same order on the 16-bit patterns; one exact conversion of the maximum
      const uint16_t* row = static_cast<const uint16_t*>(X) + m * ldx + col0;
      uint16_t top = 0;
      for (int64_t k = 0; k < K; ++k) top = std::max<uint16_t>(top, row[k] & 0x7FFFu);
      absmax = half_to_float(top);
    }
    row_scale[m] = dynamic_scale(absmax);
  }
}

}  // namespace

const CpuKernels kKernels = {"generic", gemm_w8, gemm_w4, quantize_rows, dynamic_scales, unpack_w4_panels,
                             /*w4_prefill_unpacks=*/true};

}  // namespace generic
}  // namespace mqc
