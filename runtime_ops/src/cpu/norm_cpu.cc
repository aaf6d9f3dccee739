// CPU fused RMSNorm + static activation quantization.
#include <cmath>

#include "cpu/kernels_cpu.h"

namespace mqc {

void rmsnorm_quant_row(const void* X, bool half, int64_t row, int64_t K, const float* gamma, float s, float eps,
                       int8_t* q) {
  const float* xf = half ? nullptr : static_cast<const float*>(X) + row * K;
  const uint16_t* xh = half ? static_cast<const uint16_t*>(X) + row * K : nullptr;
  double ss = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float v = xf ? xf[k] : half_to_float(xh[k]);
    ss += static_cast<double>(v) * v;
  }
  const float denom = std::sqrt(static_cast<float>(ss / static_cast<double>(K)) + eps);
  for (int64_t k = 0; k < K; ++k) {
    const float v = xf ? xf[k] : half_to_float(xh[k]);
    q[k] = quantize_rne(v / denom * gamma[k] / s);
  }
}

}  // namespace mqc
