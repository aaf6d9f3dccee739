// CPU online Hadamard transform: FWHT on the 2^k axis, then the small H_m^T mix over the m axis.
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MQC_FWHT_AVX2 1
#endif

#include "cpu/kernels_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MQC_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MQC_CLONES
#endif

namespace mqc {

MQC_CLONES static void fwht(float* x, int64_t L) {
  for (int64_t h = 1; h < L; h *= 2)
    for (int64_t i = 0; i < L; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

#ifdef MQC_FWHT_AVX2
// The same butterflies in the same order per element (so the same bits): the stages of span 1, 2 and 4 stay inside
// one 8-float vector (a lane shuffle, an add, a subtract and a blend each), which the compiler leaves scalar in
// fwht's generic loop; the wider stages add and subtract whole vectors.
__attribute__((target("avx2"))) static void fwht_avx2(float* x, int64_t L) {
  for (int64_t i = 0; i < L; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 s = _mm256_permute_ps(v, 0xB1);  // partner at distance 1
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
    s = _mm256_permute_ps(v, 0x4E);  // distance 2
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
    s = _mm256_permute2f128_ps(v, v, 0x01);  // distance 4
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
    _mm256_storeu_ps(x + i, v);
  }
  for (int64_t h = 8; h < L; h *= 2)
    for (int64_t i = 0; i < L; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
      }
}
#endif

static void fwht_best(float* x, int64_t L) {
#ifdef MQC_FWHT_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && L >= 8) return fwht_avx2(x, L);
#endif
  fwht(x, L);
}

MQC_CLONES static void mix(const float* z, float* y, int64_t m, int64_t L, const float* Hm, float scale) {
  for (int64_t c = 0; c < m; ++c) {
    float* yc = y + c * L;
    for (int64_t d = 0; d < L; ++d) yc[d] = 0.f;
    for (int64_t a = 0; a < m; ++a) {
      const float h = Hm[a * m + c] * scale;
      const float* za = z + a * L;
      for (int64_t d = 0; d < L; ++d) yc[d] += h * za[d];
    }
  }
}

void hadamard_row(const void* X, void* Y, bool half, int64_t row, int64_t n, int64_t m, const float* Hm, float* buf) {
  float* z = buf;
  float* y = buf + n;
  if (half) {
    const uint16_t* x = static_cast<const uint16_t*>(X) + row * n;
    for (int64_t i = 0; i < n; ++i) z[i] = half_to_float(x[i]);
  } else {
    const float* x = static_cast<const float*>(X) + row * n;
    for (int64_t i = 0; i < n; ++i) z[i] = x[i];
  }
  const int64_t L = n / m;
  for (int64_t a = 0; a < m; ++a) fwht_best(z + a * L, L);
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  if (Hm) {  // also for m = 1: H_m = [[-1]] negates
    mix(z, y, m, L, Hm, scale);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = z[i] * scale;
  }
  if (half) {
    uint16_t* out = static_cast<uint16_t*>(Y) + row * n;
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(y[i]);
  } else {
    float* out = static_cast<float*>(Y) + row * n;
    for (int64_t i = 0; i < n; ++i) out[i] = y[i];
  }
}

}  // namespace mqc
