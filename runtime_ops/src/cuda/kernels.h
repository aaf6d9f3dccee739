// CUDA launchers of the ai.mqc ops. Plain C++ declarations: ops_cuda.cc (the onnxruntime wrapper, built by the host
// compiler) and c_api.cu (the ctypes entry points of the kernel benchmark) both call them. Every launcher runs on
// the given stream only and returns a cudaError_t as int (0 = success).
#pragma once

#include <cstdint>

#include "validate.h"

namespace mqc {
namespace cuda {

// K padding of the device layouts: quantized activations [M, Kp] int8 and weights [N, Kp] int8 or [N, Kp/2] uint8
// (two's-complement int4, low nibble = even k), zero-filled beyond K.
constexpr int64_t kKAlign = 64;
inline int64_t padded_k(int64_t K) { return (K + kKAlign - 1) / kKAlign * kKAlign; }

// Token class (mqc::TokenModality of validate.h): ids on the device (one int64 per token: 1 image, 2 sink, else
// text), or the value of the host-resident split (image tokens are positions < split of each sequence of length
// seq_len; -1: absent), or neither. Static activation scales (mqc::ActScales) come by value, validated on the host:
// a kernel reads s[class] when the op has a scale for that class, else s[0] (text), as ActScales::of on the host.
using Modality = TokenModality;

#ifdef __CUDACC__
__device__ __forceinline__ int token_class(const Modality& mo, int64_t m) {
  if (mo.ids) {
    const int64_t id = mo.ids[m];
    return id == kImageClass || id == kSinkClass ? static_cast<int>(id) : kTextClass;
  }
  if (mo.split >= 0) return (m % mo.seq_len) < mo.split ? kImageClass : kTextClass;
  return kTextClass;
}

__device__ __forceinline__ float scale_of_token(const ActScales& act, const Modality& mo, int64_t m) {
  const int c = token_class(mo, m);
  return act.s[c < act.n ? c : 0];
}
#endif

struct QuantLinearParams {
  int bits = 8;
  const void* x = nullptr;  // [M, Kx]
  int x_kind = 0;           // 0 float, 1 half, 2 int8 (already quantized)
  int64_t M = 0, Kx = 0, K = 0, N = 0, Kp = 0;
  int64_t col0 = 0;          // 1 when channel 0 goes to the side branch
  const void* w = nullptr;   // device layout above
  const float* w_scale = nullptr;  // [N], or [K / group_size, N] (row g: the scales of group g)
  int64_t group_size = 0;          // 0: per channel; else a multiple of 32 dividing K (validate.h)
  ActScales act;           // unused when dynamic
  bool dynamic = false;  // s_tok = max(absmax of the row's K channels / 127, 1e-12), computed per row in fp32
  Modality modality;
  const float* bias = nullptr;
  const float* lowrank_a = nullptr;  // [K, r]
  const float* lowrank_b = nullptr;  // [r, N]
  int64_t rank = 0;
  const float* side_row = nullptr;
  void* y = nullptr;  // [M, N]
  bool y_half = false;
};

// Device bytes of scratch space QuantLinear needs (quantized activations, row scales, low-rank temporaries).
int64_t quant_linear_workspace_bytes(const QuantLinearParams& p);
int quant_linear(const QuantLinearParams& p, void* workspace, void* stream);

// y = x @ kron(H_m, H_{n/m}) / sqrt(n) over the last axis; hm: device [m, m] float, or null for m = 1
// without H_m. Rows beyond the grid's cap are strided (launch_geometry.h).
int hadamard(const void* x, void* y, bool half, int64_t rows, int64_t n, int64_t m, const float* hm, void* stream);

// q = clip(rne(x / sqrt(mean(x^2) + eps) * gamma / s_tok))
int rmsnorm_quant(const void* x, bool half, int64_t rows, int64_t K, const float* gamma, ActScales act,
                  Modality modality, float eps, int8_t* q, void* stream);

// Host-side weight preparation into the device layout (host buffers in, host buffer out, size N * Kp or N * Kp/2).
void prepack_weights_host(const void* w, int bits, int64_t N, int64_t K, uint8_t* out);

}  // namespace cuda
}  // namespace mqc
