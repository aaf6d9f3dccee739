// AVX512-VNNI kernels on the packed layout (common.h): VPDPBUSD multiplies 4 unsigned bytes by 4 signed bytes and
// adds them into each int32 lane, so one instruction does 64 multiply-adds for 16 output columns.
// W8: unsigned activations (x + 128) x signed weights, minus 128 * colsum(W) in the epilogue.
// W4: unsigned weight nibbles (w + 8) x signed activations, minus 8 * rowsum(x); nibbles are unpacked in
//     registers (one AND, one shift + AND per 64 bytes), so W4 reads half the weight bytes of W8.
#include <immintrin.h>

#include "cpu/gemm.h"

namespace mqc {
namespace avx512vnni {
namespace {

// Epilogue for NV panels of one row: y = float(acc - corr) * (s * w_scale) + bias, vectorized, masked tail.
inline void store_row(const GemmArgs& g, int64_t m, int64_t n0, __m512i acc, __m512i corr) {
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

template <int MR, int NV>
void tile_w8(const GemmArgs& g, int64_t m, int64_t p) {
  const PackedWeights& W = *g.W;
  const int64_t G = W.Kp / 4;
  __m512i acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  const uint8_t* B[NV];
  for (int v = 0; v < NV; ++v) B[v] = W.panel(p + v);
  const uint8_t* A = g.A + m * g.lda;
  for (int64_t q = 0; q < G; ++q) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_load_si512(B[v] + q * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t a32;
      std::memcpy(&a32, A + r * g.lda + q * 4, 4);
      const __m512i a = _mm512_set1_epi32(a32);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], a, b[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m512i corr = _mm512_loadu_si512(W.colcorr.data() + (p + v) * 16);
    for (int r = 0; r < MR; ++r) store_row(g, m + r, (p + v) * 16, acc[r][v], corr);
  }
}

template <int MR, int NV>
void tile_w4(const GemmArgs& g, int64_t m, int64_t p) {
  const PackedWeights& W = *g.W;
  const int64_t G2 = W.Kp / 8;
  __m512i acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  const uint8_t* B[NV];
  for (int v = 0; v < NV; ++v) B[v] = W.panel(p + v);
  const uint8_t* A = g.A + m * g.lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t h = 0; h < G2; ++h) {
    __m512i lo[NV], hi[NV];
    for (int v = 0; v < NV; ++v) {
      const __m512i raw = _mm512_load_si512(B[v] + h * 64);
      lo[v] = _mm512_and_si512(raw, low4);
      hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
    }
    for (int r = 0; r < MR; ++r) {
      int32_t a0, a1;
      std::memcpy(&a0, A + r * g.lda + h * 8, 4);
      std::memcpy(&a1, A + r * g.lda + h * 8 + 4, 4);
      const __m512i x0 = _mm512_set1_epi32(a0), x1 = _mm512_set1_epi32(a1);
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], lo[v], x0);
        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], hi[v], x1);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512i corr = _mm512_set1_epi32(8 * g.rowsum[m + r]);
    for (int v = 0; v < NV; ++v) store_row(g, m + r, (p + v) * 16, acc[r][v], corr);
  }
}

template <int NV, bool W4>
void run_panels(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p) {
  constexpr int MRB = W4 ? 4 : 6;
  int64_t m = m0;
  for (; m + MRB <= m1; m += MRB) W4 ? tile_w4<MRB, NV>(g, m, p) : tile_w8<MRB, NV>(g, m, p);
  for (; m + 2 <= m1; m += 2) W4 ? tile_w4<2, NV>(g, m, p) : tile_w8<2, NV>(g, m, p);
  for (; m < m1; ++m) W4 ? tile_w4<1, NV>(g, m, p) : tile_w8<1, NV>(g, m, p);
}

template <bool W4>
void gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  int64_t p = p0;
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

}  // namespace

const CpuKernels kKernels = {"avx512vnni", gemm_w8, gemm_w4, quantize_rows};

}  // namespace avx512vnni
}  // namespace mqc
