// AVX2 kernels on the packed layout (common.h), exact in int32 like the others. AVX2 has no VNNI dot product,
// and its byte multiply-add VPMADDUBSW (unsigned x signed bytes, pairs added in int16) saturates for int8 x int8:
// 2 x 255 x 128 does not fit int16 (onnxruntime's own AVX2 int8 GEMM loses accuracy there). So:
// W4: the unsigned weight nibbles (w + 8, at most 15) x signed activations: a pair is at most 2 x 15 x 128 = 3840,
//     exact in int16; two steps of 8 k (low and high nibbles) add to 7680 per int16 lane and four steps to 30720,
//     still exact, so the int16 sums widen to int32 (VPMADDWD by ones) once every 4 steps. Minus 8 * rowsum(x).
//     The weights stay packed: prefill does not unpack W4 to bytes here (w4_prefill_unpacks = false).
// W8: weights and the activations (x + 128) widen to int16 and VPMADDWD adds pairs into int32 (2 x 255 x 128 fits),
//     minus 128 * colsum(W); each int32 lane holds half a column until the epilogue adds the pairs (VPHADDD).
// A 256-bit vector covers 8 columns: half a 16-column panel (its first or last 32 bytes of each k step).
#include <immintrin.h>

#include <algorithm>

#include "cpu/gemm.h"

namespace mqc {
namespace avx2 {
namespace {

inline __m256i broadcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Four bytes (x + 128) zero-extended to int16, repeated in every 64-bit lane: the W8 multiplier.
inline __m256i broadcast4_u16(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(v)));
}

// 8 columns of one output row from their fp32 values; a tail of fewer than 8 columns goes through a buffer.
inline void store8(const GemmArgs& g, int64_t m, int64_t n0, __m256 y) {
  const int64_t cnt = std::min<int64_t>(8, g.N - n0);
  if (cnt <= 0) return;
  if (cnt == 8) {
    if (g.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(g.bias + n0));
    if (g.y_half)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(g.Y) + m * g.ldy + n0),
                       _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else
      _mm256_storeu_ps(static_cast<float*>(g.Y) + m * g.ldy + n0, y);
    return;
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, y);
  epilogue_grouped_scalar(buf, n0, cnt, 1.f, g, m);  // y * 1 + bias, stored as float or half
}

// Loads 8 fp32 values at p, the lanes from cnt on as 0 (w_scale has exactly N entries).
inline __m256 load8(const float* p, int64_t cnt) {
  if (cnt >= 8) return _mm256_loadu_ps(p);
  alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < cnt; ++j) buf[j] = p[j];
  return _mm256_load_ps(buf);
}

inline int64_t columns_from(const GemmArgs& g, int64_t n0) { return std::max<int64_t>(0, g.N - n0); }

// ---- W4 ------------------------------------------------------------------------------------------------------
// MR rows x NH halves (8 columns each) of panel p, starting at half `half`; steps [h0, h1) of 8 k each into the
// int32 sums acc. Every 4 steps the int16 sums widen into acc.
template <int MR, int NH>
__attribute__((always_inline)) inline void w4_steps(const GemmArgs& g, int64_t m, const uint8_t* B, int64_t h0,
                                                    int64_t h1, __m256i (&acc)[MR][NH]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* A = g.A + m * g.lda;
  for (int64_t h = h0; h < h1; h += 4) {
    __m256i s[MR][NH];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) s[r][v] = _mm256_setzero_si256();
    const int64_t he = std::min(h1, h + 4);
    for (int64_t hh = h; hh < he; ++hh) {
      __m256i lo[NH], hi[NH];
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) {
        const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + hh * 64 + v * 32));
        lo[v] = _mm256_and_si256(raw, low4);
        hi[v] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256i x0 = broadcast4(A + r * g.lda + hh * 8), x1 = broadcast4(A + r * g.lda + hh * 8 + 4);
#pragma GCC unroll 4
        for (int v = 0; v < NH; ++v)
          s[r][v] = _mm256_add_epi16(
              s[r][v], _mm256_add_epi16(_mm256_maddubs_epi16(lo[v], x0), _mm256_maddubs_epi16(hi[v], x1)));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(s[r][v], ones));
  }
}

template <int MR, int NH>
void w4_block(const GemmArgs& g, int64_t m, int64_t p, int half) {
  const PackedWeights& W = *g.W;
  const uint8_t* B = W.panel(p) + half * 32;
  const int64_t n0 = p * 16 + half * 8;
  __m256i acc[MR][NH];
  if (!W.group_size) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) acc[r][v] = _mm256_setzero_si256();
    w4_steps<MR, NH>(g, m, B, 0, W.Kp / 8, acc);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 s = _mm256_set1_ps(g.row_scale[m + r]);
      const __m256i corr = _mm256_set1_epi32(8 * g.rowsum[m + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) {
        const int64_t n = n0 + v * 8;
        const __m256 ws = load8(g.w_scale + n, columns_from(g, n));
        store8(g, m + r, n, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][v], corr)), _mm256_mul_ps(s, ws)));
      }
    }
    return;
  }
  // Per-group weights: each group's int32 sums minus its correction, times the group's w_scale, summed in fp32.
  const int64_t steps = W.group_size / 8;
  __m256 f[MR][NH];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NH; ++v) f[r][v] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < W.groups; ++grp) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) acc[r][v] = _mm256_setzero_si256();
    w4_steps<MR, NH>(g, m, B, grp * steps, (grp + 1) * steps, acc);
    const float* wsg = g.w_scale + grp * g.ldws;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i corr = _mm256_set1_epi32(8 * g.rowsum[(m + r) * W.groups + grp]);
#pragma GCC unroll 4
      for (int v = 0; v < NH; ++v) {
        const int64_t n = n0 + v * 8;
        f[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][v], corr)),
                                  load8(wsg + n, columns_from(g, n)), f[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NH; ++v) store8(g, m + r, n0 + v * 8, _mm256_mul_ps(f[r][v], _mm256_set1_ps(g.row_scale[m + r])));
}

// ---- W8 ------------------------------------------------------------------------------------------------------
// 16 bytes of a k quad (4 columns x 4 k) widen to int16; x (4 k as int16 in each 64-bit lane) multiplies them, so
// lanes 2c and 2c + 1 of quarter c hold column c's k pairs. MR rows x NQ quarters of 4 columns from column `q0`.
template <int MR, int NQ>
__attribute__((always_inline)) inline void w8_steps(const GemmArgs& g, int64_t m, const uint8_t* B, int64_t q0,
                                                    int64_t q1, __m256i (&acc)[MR][NQ]) {
  const uint8_t* A = g.A + m * g.lda;
  for (int64_t q = q0; q < q1; ++q) {
    __m256i w[NQ];
#pragma GCC unroll 4
    for (int c = 0; c < NQ; ++c)
      w[c] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(B + q * 64 + c * 16)));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i x = broadcast4_u16(A + r * g.lda + q * 4);
#pragma GCC unroll 4
      for (int c = 0; c < NQ; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(w[c], x));
    }
  }
}

// The column sums of quarters a (columns 0-3) and b (4-7), in column order.
inline __m256i column_sums(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8);
}

template <int MR>
void w8_block(const GemmArgs& g, int64_t m, int64_t p) {
  constexpr int NQ = 4;  // a whole panel: quarters 0-1 are columns 0-7, quarters 2-3 columns 8-15
  const PackedWeights& W = *g.W;
  const uint8_t* B = W.panel(p);
  const int64_t n0 = p * 16;
  __m256i acc[MR][NQ];
  const int64_t steps = W.group_size ? W.group_size / 4 : W.Kp / 4;
  const int64_t groups = W.group_size ? W.groups : 1;
  __m256 f[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < groups; ++grp) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < NQ; ++c) acc[r][c] = _mm256_setzero_si256();
    w8_steps<MR, NQ>(g, m, B, grp * steps, (grp + 1) * steps, acc);
    const int32_t* cc = W.group_size ? W.group_colcorr(grp) : W.colcorr.data();
    const float* wsg = g.w_scale + (W.group_size ? grp * g.ldws : 0);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        const int64_t n = n0 + v * 8;
        const __m256i sums = _mm256_sub_epi32(column_sums(acc[r][2 * v], acc[r][2 * v + 1]),
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cc + n)));
        const __m256 ws = load8(wsg + n, columns_from(g, n));
        f[r][v] = W.group_size ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), ws, f[r][v])
                               : _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(_mm256_set1_ps(g.row_scale[m + r]), ws));
      }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m256 y = W.group_size ? _mm256_mul_ps(f[r][v], _mm256_set1_ps(g.row_scale[m + r])) : f[r][v];
      store8(g, m + r, n0 + v * 8, y);
    }
}

// Prefill tiles: W4 4 rows x 8 columns (4 x 2 accumulators, 2 weight vectors, 2 activation broadcasts), W8 2 rows
// x 16 columns; one row (decode) takes a whole panel at once for more independent sums.
void gemm_w4(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) {
      w4_block<4, 1>(g, m, p, 0);
      w4_block<4, 1>(g, m, p, 1);
    }
    for (; m + 2 <= m1; m += 2) w4_block<2, 2>(g, m, p, 0);
    for (; m < m1; ++m) w4_block<1, 2>(g, m, p, 0);
  }
}

void gemm_w8(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) w8_block<2>(g, m, p);
    for (; m < m1; ++m) w8_block<1>(g, m, p);
  }
}

// q = clip(rne(x / s)), a division (not a reciprocal multiply) so the codes equal onnxruntime's QuantizeLinear.
void quantize_rows(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, int64_t Kp,
                   const float* row_scale, bool offset128, uint8_t* A, int32_t* rowsum, int64_t m0, int64_t m1) {
  const __m256 lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  const __m128i off = _mm_set1_epi8(offset128 ? static_cast<char>(0x80) : 0);
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* a = A + m * Kp;
    const float s = row_scale[m];
    const __m256 sv = _mm256_set1_ps(s);
    __m256i sum = _mm256_setzero_si256();
    int64_t k = 0;
    if (src_kind != 2) {
      for (; k + 8 <= K; k += 8) {
        const int64_t i = m * ldx + col0 + k;
        const __m256 x =
            src_kind == 0 ? _mm256_loadu_ps(static_cast<const float*>(X) + i)
                          : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(X) + i)));
        const __m256 r = _mm256_round_ps(_mm256_div_ps(x, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        sum = _mm256_add_epi32(sum, q);
        const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        const __m128i b8 = _mm_xor_si128(_mm_packs_epi16(w16, w16), off);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(a + k), b8);
      }
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
    int32_t total = 0;
    for (int j = 0; j < 8; ++j) total += lanes[j];
    for (; k < K; ++k) {
      const int64_t i = m * ldx + col0 + k;
      const int8_t q = src_kind == 2   ? static_cast<const int8_t*>(X)[i]
                       : src_kind == 0 ? quantize_rne(static_cast<const float*>(X)[i] / s)
                                       : quantize_rne(half_to_float(static_cast<const uint16_t*>(X)[i]) / s);
      total += q;
      a[k] = offset128 ? static_cast<uint8_t>(q + 128) : static_cast<uint8_t>(q);
    }
    for (k = K; k < Kp; ++k) a[k] = offset128 ? 128 : 0;
    if (rowsum) rowsum[m] = total;
  }
}

// The absmax compares magnitude bits as unsigned integers (see gemm.h), 8 floats at a time.
void dynamic_scales(const void* X, int src_kind, int64_t ldx, int64_t col0, int64_t K, float* row_scale, int64_t m0,
                    int64_t m1) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t m = m0; m < m1; ++m) {
    __m256i top = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const int64_t i = m * ldx + col0 + k;
      const __m256i bits =
          src_kind == 0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const float*>(X) + i))
                        : _mm256_castps_si256(_mm256_cvtph_ps(
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(X) + i))));
      top = _mm256_max_epu32(top, _mm256_and_si256(bits, magnitude));
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), top);
    uint32_t t = 0;
    for (int j = 0; j < 8; ++j) t = std::max(t, lanes[j]);
    for (; k < K; ++k) {
      const int64_t i = m * ldx + col0 + k;
      uint32_t bits;
      if (src_kind == 0) {
        std::memcpy(&bits, static_cast<const float*>(X) + i, 4);
      } else {
        const float v = half_to_float(static_cast<const uint16_t*>(X)[i]);
        std::memcpy(&bits, &v, 4);
      }
      t = std::max(t, bits & 0x7FFFFFFFu);
    }
    float absmax;
    std::memcpy(&absmax, &t, 4);
    row_scale[m] = dynamic_scale(absmax);
  }
}

}  // namespace

const CpuKernels kKernels = {"avx2", gemm_w8, gemm_w4, quantize_rows, dynamic_scales, unpack_w4_panels,
                             /*w4_prefill_unpacks=*/false};

}  // namespace avx2
}  // namespace mqc
