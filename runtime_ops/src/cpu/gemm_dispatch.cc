// Weight packing and the run-time choice of CPU kernels.
#include <cstdlib>

#include "cpu/gemm.h"

namespace mqc {

PackedWeights pack_weights(const void* w, int bits, int64_t N, int64_t K, int64_t group_size) {
  PackedWeights P;
  P.bits = bits;
  P.N = N;
  P.K = K;
  P.group_size = group_size;
  P.groups = group_size ? K / group_size : 1;
  const int64_t gk = group_size ? group_size : (K > 0 ? K : 1);  // k per colcorr row
  const int64_t ld = (N + 15) / 16 * 16;
  P.Kp = bits == 8 ? (K + 3) / 4 * 4 : (K + 7) / 8 * 8;
  P.panels = (N + 15) / 16;
  P.panel_bytes = bits == 8 ? P.Kp * 16 : P.Kp * 8;  // a multiple of 64 bytes
  P.data.assign(P.panels * P.panel_bytes + 64, bits == 8 ? 0 : 0x88);
  uint8_t* out = const_cast<uint8_t*>(P.aligned());
  if (bits == 8) {
    const int8_t* W = static_cast<const int8_t*>(w);
    P.colcorr.assign(P.groups * ld, 0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = n / 16, j = n % 16;
      for (int64_t k = 0; k < K; ++k) {
        const int8_t v = W[n * K + k];
        P.colcorr[(k / gk) * ld + n] += 128 * v;
        out[p * P.panel_bytes + ((k / 4) * 16 + j) * 4 + k % 4] = (uint8_t)v;
      }
    }
  } else {
    const uint8_t* W = static_cast<const uint8_t*>(w);
    const int64_t row_bytes = (K + 1) / 2;
    P.colcorr.assign(P.groups * ld, 0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = n / 16, j = n % 16;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = W[n * row_bytes + k / 2];
        const int nib = (k % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
        const int val = ((nib ^ 8) - 8) + 8;  // signed nibble, stored as w + 8
        P.colcorr[(k / gk) * ld + n] += 128 * (val - 8);
        const int64_t h = k / 8, t = k % 8;
        uint8_t& dst = out[p * P.panel_bytes + (h * 16 + j) * 4 + (t % 4)];
        dst = t < 4 ? (uint8_t)((dst & 0xF0) | val) : (uint8_t)((dst & 0x0F) | (val << 4));
      }
    }
  }
  return P;
}

void unpack_w4_panels(const PackedWeights& W, int64_t p0, int64_t p1, uint8_t* out) {
  const int64_t G2 = W.Kp / 8;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* src = W.panel(p);
    uint8_t* dst = out + (p - p0) * W.Kp * 16;
    for (int64_t h = 0; h < G2; ++h) {
      const uint8_t* s = src + h * 64;
      uint8_t* d = dst + h * 128;
      for (int i = 0; i < 64; ++i) {
        d[i] = static_cast<uint8_t>((s[i] & 0x0F) - 8);
        d[64 + i] = static_cast<uint8_t>((s[i] >> 4) - 8);
      }
    }
  }
}

namespace {
const CpuKernels& choose() {
  const char* force = std::getenv("MQC_CPU_ISA");
  const std::string want = force ? force : "";
#if defined(MQC_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "generic") return generic::kKernels;
  if (want == "avx2" && has2) return avx2::kKernels;
  if ((want.empty() || want == "avx512vnni") && has512) return avx512vnni::kKernels;
  if (has2) return avx2::kKernels;
#endif
  return generic::kKernels;
}
}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels& k = choose();
  return k;
}

}  // namespace mqc

// Which CPU kernel variant this process uses ("avx512vnni", "avx2" or "generic"), for tests and benchmarks.
extern "C" __attribute__((visibility("default"))) const char* mqc_cpu_isa() { return mqc::cpu_kernels().name; }
