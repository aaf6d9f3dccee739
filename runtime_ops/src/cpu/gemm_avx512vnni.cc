// AVX512-VNNI kernels on the packed layout (common.h): VPDPBUSD multiplies 4 unsigned bytes by 4 signed bytes and
// adds them into each int32 lane, so one instruction does 64 multiply-adds for 16 output columns.
// W8: unsigned activations (x + 128) x signed weights, minus 128 * colsum(W) in the epilogue.
// W4: unsigned weight nibbles (w + 8) x signed activations, minus 8 * rowsum(x); nibbles are unpacked in
//     registers (one AND, one shift + AND per 64 bytes; one row: two ANDs, see gemv_w4), so W4 reads half the
//     weight bytes of W8.
#include <immintrin.h>

#include "cpu/gemm.h"

namespace mqc {
namespace avx512vnni {
namespace {

// Epilogue for NV panels of one row: y = float(acc - corr) * (s * w_scale) + bias, vectorized, masked tail.
__attribute__((always_inline)) inline void store_row(const GemmArgs& g, int64_t m, int64_t n0, __m512i acc, __m512i corr) {
  const int64_t cnt = std::min<int64_t>(16, g.N - n0);
  if (cnt <= 0) return;
  const __mmask16 mask = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
  __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr));
  __m512 ws = _mm512_maskz_loadu_ps(mask, g.w_scale + n0);
  __m512 sc = _mm512_mul_ps(_mm512_set1_ps(g.row_scale[m]), ws);
  y = _mm512_mul_ps(y, sc);
  if (g.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, g.bias + n0));
  if (g.y_half) {
    __m256i h = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.Y) + m * g.ldy + n0, mask, h);
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(g.Y) + m * g.ldy + n0, mask, y);
  }
}

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The accumulators are named variables, not an array: GCC keeps an array of __m512i on the stack and stores it on
// every iteration, which halves the speed of the loop. Unused variables (MR < 6 or NV == 1) are optimized away.
#define MQC_ACC_ROW(r)                                                                                 \
  __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = _mm512_setzero_si512(), c##r##2 = _mm512_setzero_si512(), \
          c##r##3 = _mm512_setzero_si512();

#define MQC_W8_ROW(r)                                                             \
  if constexpr (MR > r) {                                                         \
    const __m512i a = _mm512_set1_epi32(load32(A + (r) * lda + q * 4));           \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, a, b0);                                \
    if constexpr (NV > 1) {                                                       \
      c##r##1 = _mm512_dpbusd_epi32(c##r##1, a, b1);                              \
      c##r##2 = _mm512_dpbusd_epi32(c##r##2, a, b2);                              \
      c##r##3 = _mm512_dpbusd_epi32(c##r##3, a, b3);                              \
    }                                                                             \
  }

// The low (even k) and high (odd k) nibbles of step h of the NV panels B0..B3, as unsigned bytes for vpdpbusd.
#define MQC_W4_UNPACK(h)                                                                              \
  const __m512i r0 = _mm512_load_si512(B0 + (h) * 64);                                                \
  const __m512i lo0 = _mm512_and_si512(r0, low4), hi0 = _mm512_and_si512(_mm512_srli_epi16(r0, 4), low4); \
  __m512i lo1 = lo0, hi1 = hi0, lo2 = lo0, hi2 = hi0, lo3 = lo0, hi3 = hi0;                           \
  if constexpr (NV > 1) {                                                                             \
    const __m512i r1 = _mm512_load_si512(B1 + (h) * 64), r2 = _mm512_load_si512(B2 + (h) * 64),       \
                  r3 = _mm512_load_si512(B3 + (h) * 64);                                              \
    lo1 = _mm512_and_si512(r1, low4);                                                                 \
    hi1 = _mm512_and_si512(_mm512_srli_epi16(r1, 4), low4);                                           \
    lo2 = _mm512_and_si512(r2, low4);                                                                 \
    hi2 = _mm512_and_si512(_mm512_srli_epi16(r2, 4), low4);                                           \
    lo3 = _mm512_and_si512(r3, low4);                                                                 \
    hi3 = _mm512_and_si512(_mm512_srli_epi16(r3, 4), low4);                                           \
  }

#define MQC_W4_ROW(r)                                                             \
  if constexpr (MR > r) {                                                         \
    const __m512i x0 = _mm512_set1_epi32(load32(A + (r) * lda + h * 8));          \
    const __m512i x1 = _mm512_set1_epi32(load32(A + (r) * lda + h * 8 + 4));      \
    c##r##0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r##0, lo0, x0), hi0, x1); \
    if constexpr (NV > 1) {                                                       \
      c##r##1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r##1, lo1, x0), hi1, x1); \
      c##r##2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r##2, lo2, x0), hi2, x1); \
      c##r##3 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r##3, lo3, x0), hi3, x1); \
    }                                                                             \
  }

// corr(v, r): the correction of panel v for row r (W8: per column, W4: per row).
#define MQC_STORE_ROW(r)                                                                  \
  if constexpr (MR > r) {                                                                 \
    store_row(g, m + (r), n0, c##r##0, CORR(0, r));                                       \
    if constexpr (NV > 1) {                                                               \
      store_row(g, m + (r), n0 + 16, c##r##1, CORR(1, r));                                \
      store_row(g, m + (r), n0 + 32, c##r##2, CORR(2, r));                                \
      store_row(g, m + (r), n0 + 48, c##r##3, CORR(3, r));                                \
    }                                                                                     \
  }

template <int MR, int NV>
void tile_w8(const GemmArgs& g, int64_t m, int64_t p) {
  static_assert(MR >= 1 && MR <= 6 && (NV == 1 || NV == 4), "tile shape");
  const PackedWeights& W = *g.W;
  const int64_t G = W.Kp / 4, lda = g.lda;
  const uint8_t* B0 = W.panel(p);
  const uint8_t* B1 = NV > 1 ? W.panel(p + 1) : B0;
  const uint8_t* B2 = NV > 1 ? W.panel(p + 2) : B0;
  const uint8_t* B3 = NV > 1 ? W.panel(p + 3) : B0;
  const uint8_t* A = g.A + m * lda;
  MQC_ACC_ROW(0) MQC_ACC_ROW(1) MQC_ACC_ROW(2) MQC_ACC_ROW(3) MQC_ACC_ROW(4) MQC_ACC_ROW(5)
  for (int64_t q = 0; q < G; ++q) {
    const __m512i b0 = _mm512_load_si512(B0 + q * 64);
    __m512i b1 = b0, b2 = b0, b3 = b0;
    if constexpr (NV > 1) {
      b1 = _mm512_load_si512(B1 + q * 64);
      b2 = _mm512_load_si512(B2 + q * 64);
      b3 = _mm512_load_si512(B3 + q * 64);
    }
    MQC_W8_ROW(0) MQC_W8_ROW(1) MQC_W8_ROW(2) MQC_W8_ROW(3) MQC_W8_ROW(4) MQC_W8_ROW(5)
  }
  const int64_t n0 = p * 16;
  const __m512i k0 = _mm512_loadu_si512(W.colcorr.data() + n0);
  const __m512i k1 = NV > 1 ? _mm512_loadu_si512(W.colcorr.data() + n0 + 16) : k0;
  const __m512i k2 = NV > 1 ? _mm512_loadu_si512(W.colcorr.data() + n0 + 32) : k0;
  const __m512i k3 = NV > 1 ? _mm512_loadu_si512(W.colcorr.data() + n0 + 48) : k0;
#define CORR(v, r) k##v
  MQC_STORE_ROW(0) MQC_STORE_ROW(1) MQC_STORE_ROW(2) MQC_STORE_ROW(3) MQC_STORE_ROW(4) MQC_STORE_ROW(5)
#undef CORR
}

template <int MR, int NV>
void tile_w4(const GemmArgs& g, int64_t m, int64_t p) {
  static_assert(MR >= 1 && MR <= 5 && (NV == 1 || NV == 4), "tile shape");
  const PackedWeights& W = *g.W;
  const int64_t G2 = W.Kp / 8, lda = g.lda;
  const uint8_t* B0 = W.panel(p);
  const uint8_t* B1 = NV > 1 ? W.panel(p + 1) : B0;
  const uint8_t* B2 = NV > 1 ? W.panel(p + 2) : B0;
  const uint8_t* B3 = NV > 1 ? W.panel(p + 3) : B0;
  const uint8_t* A = g.A + m * lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  MQC_ACC_ROW(0) MQC_ACC_ROW(1) MQC_ACC_ROW(2) MQC_ACC_ROW(3) MQC_ACC_ROW(4)
  for (int64_t h = 0; h < G2; ++h) {
    MQC_W4_UNPACK(h)
    MQC_W4_ROW(0) MQC_W4_ROW(1) MQC_W4_ROW(2) MQC_W4_ROW(3) MQC_W4_ROW(4)
  }
  const int64_t n0 = p * 16;
  const __m512i s0 = _mm512_set1_epi32(8 * g.rowsum[m]);
  const __m512i s1 = MR > 1 ? _mm512_set1_epi32(8 * g.rowsum[m + 1]) : s0;
  const __m512i s2 = MR > 2 ? _mm512_set1_epi32(8 * g.rowsum[m + 2]) : s0;
  const __m512i s3 = MR > 3 ? _mm512_set1_epi32(8 * g.rowsum[m + 3]) : s0;
  const __m512i s4 = MR > 4 ? _mm512_set1_epi32(8 * g.rowsum[m + 4]) : s0;
#define CORR(v, r) s##r
  MQC_STORE_ROW(0) MQC_STORE_ROW(1) MQC_STORE_ROW(2) MQC_STORE_ROW(3) MQC_STORE_ROW(4)
#undef CORR
}

// One int4 step hh of panel B into the low- (l: low nibbles x x0) and high-nibble (u: 16 x high nibbles x x1)
// accumulators of the one-row kernels gemv_w4 and gemv_w4_grouped.
#define MQC_GEMV_STEP(B, hh, l, u)                                        \
  {                                                                       \
    const __m512i r = _mm512_load_si512((B) + (hh) * 64);                 \
    l = _mm512_dpbusd_epi32(l, _mm512_and_si512(r, low4), x0);            \
    u = _mm512_dpbusd_epi32(u, _mm512_and_si512(r, high4), x1);           \
  }

// W4, one row (decode). tile_w4<1, NV> chains its two VPDPBUSDs per step into one accumulator per panel, so a
// panel costs 2 x Kp/8 instruction latencies, as many as W8's Kp/4: with the weights in cache W4 was no faster
// than W8, and the decode shapes with N <= 576 run one panel per call (tasks of 1 or 2 panels), a single
// dependency chain. Here the low and the high nibbles accumulate in separate registers and one panel is unrolled
// over two steps (4 chains, 8 for 4 panels); the high nibble is used in place as 16 * hi (one AND instead of
// shift + AND): its sum, a multiple of 16, is shifted back exactly once per chunk of kChunk steps, before it could
// leave int32 (|16 hi x| <= 240 * 128, 4 products per lane and step: under 2^29 per chunk). The int32 result
// equals tile_w4's. Panel pairs stay one panel after the other: interleaving the two weight streams was slower
// with the weights in DRAM (a decode step's case) on the AMD EPYC test machine.
template <int NV>
void gemv_w4(const GemmArgs& g, int64_t m, int64_t p) {
  static_assert(NV == 1 || NV == 4, "panels per call");
  constexpr int64_t kChunk = 4096;
  const PackedWeights& W = *g.W;
  const int64_t G2 = W.Kp / 8;
  const uint8_t* B0 = W.panel(p);
  const uint8_t* B1 = NV > 1 ? W.panel(p + 1) : B0;
  const uint8_t* B2 = NV > 1 ? W.panel(p + 2) : B0;
  const uint8_t* B3 = NV > 1 ? W.panel(p + 3) : B0;
  const uint8_t* A = g.A + m * g.lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i zero = _mm512_setzero_si512();
  __m512i c0 = zero, c1 = zero, c2 = zero, c3 = zero;
  for (int64_t hc = 0; hc < G2; hc += kChunk) {
    const int64_t he = std::min(G2, hc + kChunk);
    // l: low nibbles x x[0:4], u: 16 x high nibbles x x[4:8] of each step (NV == 1: l1, u1 take the odd steps)
    __m512i l0 = zero, l1 = zero, l2 = zero, l3 = zero, u0 = zero, u1 = zero, u2 = zero, u3 = zero;
    int64_t h = hc;
    if constexpr (NV == 1) {
      for (; h + 2 <= he; h += 2) {
        {
          const __m512i x0 = _mm512_set1_epi32(load32(A + h * 8)), x1 = _mm512_set1_epi32(load32(A + h * 8 + 4));
          MQC_GEMV_STEP(B0, h, l0, u0)
        }
        {
          const __m512i x0 = _mm512_set1_epi32(load32(A + h * 8 + 8)), x1 = _mm512_set1_epi32(load32(A + h * 8 + 12));
          MQC_GEMV_STEP(B0, h + 1, l1, u1)
        }
      }
    }
    for (; h < he; ++h) {
      const __m512i x0 = _mm512_set1_epi32(load32(A + h * 8)), x1 = _mm512_set1_epi32(load32(A + h * 8 + 4));
      MQC_GEMV_STEP(B0, h, l0, u0)
      if constexpr (NV > 1) {
        MQC_GEMV_STEP(B1, h, l1, u1)
        MQC_GEMV_STEP(B2, h, l2, u2)
        MQC_GEMV_STEP(B3, h, l3, u3)
      }
    }
    if constexpr (NV == 1) {
      const __m512i lo = _mm512_add_epi32(l0, l1), hi = _mm512_srai_epi32(_mm512_add_epi32(u0, u1), 4);
      c0 = _mm512_add_epi32(c0, _mm512_add_epi32(lo, hi));
    } else {
      c0 = _mm512_add_epi32(c0, _mm512_add_epi32(l0, _mm512_srai_epi32(u0, 4)));
      c1 = _mm512_add_epi32(c1, _mm512_add_epi32(l1, _mm512_srai_epi32(u1, 4)));
      c2 = _mm512_add_epi32(c2, _mm512_add_epi32(l2, _mm512_srai_epi32(u2, 4)));
      c3 = _mm512_add_epi32(c3, _mm512_add_epi32(l3, _mm512_srai_epi32(u3, 4)));
    }
  }
  const int64_t n0 = p * 16;
  const __m512i s = _mm512_set1_epi32(8 * g.rowsum[m]);
  store_row(g, m, n0, c0, s);
  if constexpr (NV > 1) {
    store_row(g, m, n0 + 16, c1, s);
    store_row(g, m, n0 + 32, c2, s);
    store_row(g, m, n0 + 48, c3, s);
  }
}

// ---- Per-group weights ------------------------------------------------------------------------------------
// The integer loops above, one group of k at a time: each group's int32 accumulators start from 0, and at the
// group's end, minus its correction, are converted and multiplied into fp32 sums by the group's w_scale (one FMA per
// 16 columns); y = sum * s + bias at the end. Both sets live in registers, so the tiles are smaller than the
// per-channel ones: W8 3 rows x 4 panels (12 + 12 accumulators, 4 weight vectors), W4 2 x 4 (its 8 unpacked nibble
// vectors), and one row of W4 runs a grouped gemv. Measured alternatives on the test machine (AMD EPYC, Zen 4,
// K 576, N 1536, M 256, groups of 64): the per-channel 6 x 4 tile with the fp32 sums in an L1 buffer was slower
// (GCC then kept a stack copy of every int32 accumulator inside the k loop, or, with the int32 sums stored
// after each group, paid two 512-bit stores per 16 columns and group).

__attribute__((always_inline)) inline __mmask16 column_mask(const GemmArgs& g, int64_t n0) {
  const int64_t cnt = std::min<int64_t>(16, g.N - n0);
  return cnt >= 16 ? (__mmask16)0xFFFF : (cnt <= 0 ? (__mmask16)0 : (__mmask16)((1u << cnt) - 1));
}

__attribute__((always_inline)) inline void store_row_grouped(const GemmArgs& g, int64_t m, int64_t n0, __m512 f) {
  const __mmask16 mask = column_mask(g, n0);
  if (!mask) return;
  __m512 y = _mm512_mul_ps(f, _mm512_set1_ps(g.row_scale[m]));
  if (g.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, g.bias + n0));
  if (g.y_half) {
    __m256i h = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.Y) + m * g.ldy + n0, mask, h);
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(g.Y) + m * g.ldy + n0, mask, y);
  }
}

#define MQC_FACC_ROW(r) \
  __m512 f##r##0 = _mm512_setzero_ps(), f##r##1 = _mm512_setzero_ps(), f##r##2 = _mm512_setzero_ps(), \
         f##r##3 = _mm512_setzero_ps();
#define MQC_FOLD_ONE(r, v) \
  f##r##v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##r##v, CORR(v, r))), \
                            _mm512_maskz_loadu_ps(mask##v, wsg + 16 * (v)), f##r##v);
#define MQC_FOLD_ROW(r)     \
  if constexpr (MR > r) {   \
    MQC_FOLD_ONE(r, 0)      \
    if constexpr (NV > 1) { \
      MQC_FOLD_ONE(r, 1)    \
      MQC_FOLD_ONE(r, 2)    \
      MQC_FOLD_ONE(r, 3)    \
    }                       \
  }
#define MQC_STORE_F_ROW(r)                                    \
  if constexpr (MR > r) {                                     \
    store_row_grouped(g, m + (r), n0, f##r##0);               \
    if constexpr (NV > 1) {                                   \
      store_row_grouped(g, m + (r), n0 + 16, f##r##1);        \
      store_row_grouped(g, m + (r), n0 + 32, f##r##2);        \
      store_row_grouped(g, m + (r), n0 + 48, f##r##3);        \
    }                                                         \
  }

template <int MR, int NV, bool W4>
void tile_grouped(const GemmArgs& g, int64_t m, int64_t p) {
  static_assert(MR >= 1 && MR <= 3 && (NV == 1 || NV == 4), "tile shape");
  const PackedWeights& W = *g.W;
  const int64_t steps = W.group_size / (W4 ? 8 : 4), lda = g.lda, n0 = p * 16;
  const uint8_t* B0 = W.panel(p);
  const uint8_t* B1 = NV > 1 ? W.panel(p + 1) : B0;
  const uint8_t* B2 = NV > 1 ? W.panel(p + 2) : B0;
  const uint8_t* B3 = NV > 1 ? W.panel(p + 3) : B0;
  const uint8_t* A = g.A + m * lda;
  const __mmask16 mask0 = column_mask(g, n0), mask1 = column_mask(g, n0 + 16), mask2 = column_mask(g, n0 + 32),
                  mask3 = column_mask(g, n0 + 48);
  MQC_FACC_ROW(0) MQC_FACC_ROW(1) MQC_FACC_ROW(2)
  for (int64_t grp = 0; grp < W.groups; ++grp) {
    MQC_ACC_ROW(0) MQC_ACC_ROW(1) MQC_ACC_ROW(2)
    if constexpr (W4) {
      const __m512i low4 = _mm512_set1_epi8(0x0F);
      for (int64_t h = grp * steps; h < (grp + 1) * steps; ++h) {
        MQC_W4_UNPACK(h)
        MQC_W4_ROW(0) MQC_W4_ROW(1) MQC_W4_ROW(2)
      }
    } else {
      for (int64_t q = grp * steps; q < (grp + 1) * steps; ++q) {
        const __m512i b0 = _mm512_load_si512(B0 + q * 64);
        __m512i b1 = b0, b2 = b0, b3 = b0;
        if constexpr (NV > 1) {
          b1 = _mm512_load_si512(B1 + q * 64);
          b2 = _mm512_load_si512(B2 + q * 64);
          b3 = _mm512_load_si512(B3 + q * 64);
        }
        MQC_W8_ROW(0) MQC_W8_ROW(1) MQC_W8_ROW(2)
      }
    }
    const float* wsg = g.w_scale + grp * g.ldws + n0;
    if constexpr (W4) {
#define CORR(v, r) _mm512_set1_epi32(8 * g.rowsum[(m + (r)) * W.groups + grp])
      MQC_FOLD_ROW(0) MQC_FOLD_ROW(1) MQC_FOLD_ROW(2)
#undef CORR
    } else {
      const int32_t* cc = W.group_colcorr(grp) + n0;
#define CORR(v, r) _mm512_loadu_si512(cc + 16 * (v))
      MQC_FOLD_ROW(0) MQC_FOLD_ROW(1) MQC_FOLD_ROW(2)
#undef CORR
    }
  }
  MQC_STORE_F_ROW(0) MQC_STORE_F_ROW(1) MQC_STORE_F_ROW(2)
}

// W4, one row, per-group weights: gemv_w4's split low / high-nibble accumulators, folded at each group's end.
template <int NV>
void gemv_w4_grouped(const GemmArgs& g, int64_t m, int64_t p) {
  static_assert(NV == 1 || NV == 4, "panels per call");
  constexpr int64_t kChunk = 4096;  // steps before 16 x the high-nibble sums could leave int32 (see gemv_w4)
  const PackedWeights& W = *g.W;
  const int64_t steps = W.group_size / 8, n0 = p * 16;  // steps: a multiple of 4 (group_size % 32 == 0)
  const uint8_t* B0 = W.panel(p);
  const uint8_t* B1 = NV > 1 ? W.panel(p + 1) : B0;
  const uint8_t* B2 = NV > 1 ? W.panel(p + 2) : B0;
  const uint8_t* B3 = NV > 1 ? W.panel(p + 3) : B0;
  const uint8_t* A = g.A + m * g.lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i zero = _mm512_setzero_si512();
  __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
  for (int64_t grp = 0; grp < W.groups; ++grp) {
    __m512i c0 = zero, c1 = zero, c2 = zero, c3 = zero;
    for (int64_t hc = grp * steps; hc < (grp + 1) * steps; hc += kChunk) {
      const int64_t he = std::min((grp + 1) * steps, hc + kChunk);
      __m512i l0 = zero, l1 = zero, l2 = zero, l3 = zero, u0 = zero, u1 = zero, u2 = zero, u3 = zero;
      for (int64_t h = hc; h < he; h += (NV == 1 ? 2 : 1)) {
        const __m512i x0 = _mm512_set1_epi32(load32(A + h * 8)), x1 = _mm512_set1_epi32(load32(A + h * 8 + 4));
        MQC_GEMV_STEP(B0, h, l0, u0)
        if constexpr (NV == 1) {
          const __m512i y0 = _mm512_set1_epi32(load32(A + h * 8 + 8)), y1 = _mm512_set1_epi32(load32(A + h * 8 + 12));
          const __m512i r = _mm512_load_si512(B0 + (h + 1) * 64);
          l1 = _mm512_dpbusd_epi32(l1, _mm512_and_si512(r, low4), y0);
          u1 = _mm512_dpbusd_epi32(u1, _mm512_and_si512(r, high4), y1);
        } else {
          MQC_GEMV_STEP(B1, h, l1, u1)
          MQC_GEMV_STEP(B2, h, l2, u2)
          MQC_GEMV_STEP(B3, h, l3, u3)
        }
      }
      if constexpr (NV == 1) {
        c0 = _mm512_add_epi32(c0, _mm512_add_epi32(_mm512_add_epi32(l0, l1),
                                                   _mm512_srai_epi32(_mm512_add_epi32(u0, u1), 4)));
      } else {
        c0 = _mm512_add_epi32(c0, _mm512_add_epi32(l0, _mm512_srai_epi32(u0, 4)));
        c1 = _mm512_add_epi32(c1, _mm512_add_epi32(l1, _mm512_srai_epi32(u1, 4)));
        c2 = _mm512_add_epi32(c2, _mm512_add_epi32(l2, _mm512_srai_epi32(u2, 4)));
        c3 = _mm512_add_epi32(c3, _mm512_add_epi32(l3, _mm512_srai_epi32(u3, 4)));
      }
    }
    const __m512i s = _mm512_set1_epi32(8 * g.rowsum[m * W.groups + grp]);
    const float* wsg = g.w_scale + grp * g.ldws + n0;
    const __m512 ws0 = _mm512_maskz_loadu_ps(column_mask(g, n0), wsg);
    const __m512 ws1 = NV > 1 ? _mm512_maskz_loadu_ps(column_mask(g, n0 + 16), wsg + 16) : ws0;
    const __m512 ws2 = NV > 1 ? _mm512_maskz_loadu_ps(column_mask(g, n0 + 32), wsg + 32) : ws0;
    const __m512 ws3 = NV > 1 ? _mm512_maskz_loadu_ps(column_mask(g, n0 + 48), wsg + 48) : ws0;
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0, s)), ws0, f0);
    if constexpr (NV > 1) {
      f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1, s)), ws1, f1);
      f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c2, s)), ws2, f2);
      f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c3, s)), ws3, f3);
    }
  }
#undef MQC_GEMV_STEP
  store_row_grouped(g, m, n0, f0);
  if constexpr (NV > 1) {
    store_row_grouped(g, m, n0 + 16, f1);
    store_row_grouped(g, m, n0 + 32, f2);
    store_row_grouped(g, m, n0 + 48, f3);
  }
}

template <int NV, bool W4>
void run_panels_grouped(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p) {
  int64_t m = m0;
  if constexpr (W4) {
    for (; m + 2 <= m1; m += 2) tile_grouped<2, NV, true>(g, m, p);
    for (; m < m1; ++m) gemv_w4_grouped<NV>(g, m, p);
  } else {
    for (; m + 3 <= m1; m += 3) tile_grouped<3, NV, false>(g, m, p);
    for (; m + 2 <= m1; m += 2) tile_grouped<2, NV, false>(g, m, p);
    for (; m < m1; ++m) tile_grouped<1, NV, false>(g, m, p);
  }
}

template <int MR, int NV, bool W4>
inline void tile(const GemmArgs& g, int64_t m, int64_t p) {
  if constexpr (W4 && MR == 1)  // decode, and the last row of a small batch
    gemv_w4<NV>(g, m, p);
  else if constexpr (W4)
    tile_w4<MR, NV>(g, m, p);
  else
    tile_w8<MR, NV>(g, m, p);
}

template <int NV, bool W4>
void run_panels(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p) {
  constexpr int MRB = W4 ? 5 : 6;  // W4 needs 8 registers of unpacked nibbles: 5 x 4 accumulators
  int64_t m = m0;
  for (; m + MRB <= m1; m += MRB) tile<MRB, NV, W4>(g, m, p);
  for (; m + 2 <= m1; m += 2) tile<2, NV, W4>(g, m, p);
  for (; m < m1; ++m) tile<1, NV, W4>(g, m, p);
}

template <bool W4>
void gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  int64_t p = p0;
  if (g.W->group_size) {
    for (; p + 4 <= p1; p += 4) run_panels_grouped<4, W4>(g, m0, m1, p);
    for (; p < p1; ++p) run_panels_grouped<1, W4>(g, m0, m1, p);
    return;
  }
  for (; p + 4 <= p1; p += 4) run_panels<4, W4>(g, m0, m1, p);
  for (; p < p1; ++p) run_panels<1, W4>(g, m0, m1, p);
}

void gemm_w8(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) { gemm<false>(g, m0, m1, p0, p1); }
void gemm_w4(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) { gemm<true>(g, m0, m1, p0, p1); }

// q = clip(rne(x / s)); division (not a reciprocal multiply) so the codes equal onnxruntime's QuantizeLinear.
void quantize_rows(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, int64_t Kp,
                   const float* row_scale, bool offset128, uint8_t* A, int32_t* rowsum, int64_t m0, int64_t m1) {
  const __m512 lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* a = A + m * Kp;
    const __m512 s = _mm512_set1_ps(row_scale[m]);
    __m512i sum = _mm512_setzero_si512();
    const __m128i off = _mm_set1_epi8(offset128 ? (char)0x80 : 0);
    int64_t k = 0;
    for (; k < K; k += 16) {
      const int64_t cnt = std::min<int64_t>(16, K - k);
      const __mmask16 mask = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
      __m512i q;
      if (src_kind == 2) {
        q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, static_cast<const int8_t*>(X) + m * ldx + col0 + k));
      } else {
        __m512 x = src_kind == 0
                       ? _mm512_maskz_loadu_ps(mask, static_cast<const float*>(X) + m * ldx + col0 + k)
                       : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                             mask, static_cast<const uint16_t*>(X) + m * ldx + col0 + k));
        x = _mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        q = _mm512_cvtps_epi32(x);
      }
      q = _mm512_maskz_mov_epi32(mask, q);
      sum = _mm512_add_epi32(sum, q);
      const __m128i b = _mm_xor_si128(_mm512_cvtepi32_epi8(q), off);
      _mm_mask_storeu_epi8(a + k, mask, b);
    }
    for (k = K; k < Kp; ++k) a[k] = offset128 ? 128 : 0;
    if (rowsum) rowsum[m] = _mm512_reduce_add_epi32(sum);
  }
}

void dynamic_scales(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, float* row_scale, int64_t m0,
                    int64_t m1) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t m = m0; m < m1; ++m) {
    __m512i top = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const int64_t cnt = std::min<int64_t>(16, K - k);
      const __mmask16 mask = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
      const __m512i bits =
          src_kind == 0 ? _mm512_maskz_loadu_epi32(mask, static_cast<const float*>(X) + m * ldx + col0 + k)
                        : _mm512_castps_si512(_mm512_cvtph_ps(
                              _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(X) + m * ldx + col0 + k)));
      top = _mm512_max_epu32(top, _mm512_and_si512(bits, magnitude));  // masked-off lanes load 0
    }
    const uint32_t t = _mm512_reduce_max_epu32(top);
    float absmax;
    std::memcpy(&absmax, &t, 4);
    row_scale[m] = dynamic_scale(absmax);
  }
}

void unpack_w4(const PackedWeights& W, int64_t p0, int64_t p1, uint8_t* out) {
  const int64_t G2 = W.Kp / 8;
  const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* src = W.panel(p);
    uint8_t* dst = out + (p - p0) * W.Kp * 16;
    for (int64_t h = 0; h < G2; ++h) {
      const __m512i raw = _mm512_load_si512(src + h * 64);
      _mm512_store_si512(dst + h * 128, _mm512_sub_epi8(_mm512_and_si512(raw, low4), eight));
      _mm512_store_si512(dst + h * 128 + 64, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), eight));
    }
  }
}

}  // namespace

const CpuKernels kKernels = {"avx512vnni", gemm_w8, gemm_w4, quantize_rows, dynamic_scales, unpack_w4,
                             /*w4_prefill_unpacks=*/true};

}  // namespace avx512vnni
}  // namespace mqc
