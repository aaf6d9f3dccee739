// Plain C entry points over the CUDA launchers, for benchmarks/bench_runtime_ops.py (ctypes + torch tensors).
// Pointers are device pointers; stream is a cudaStream_t (0 = legacy default stream). Returns a cudaError_t.
#include <cuda_runtime.h>

#include "cuda/kernels.h"

using mqc::cuda::Modality;
using mqc::cuda::QuantLinearParams;

extern "C" {

__attribute__((visibility("default"))) int64_t mqc_cuda_padded_k(int64_t K) { return mqc::cuda::padded_k(K); }

__attribute__((visibility("default"))) int64_t mqc_cuda_quant_linear_workspace(int64_t M, int64_t K, int64_t rank) {
  QuantLinearParams p;
  p.M = M;
  p.Kp = mqc::cuda::padded_k(K);
  p.rank = rank;
  return mqc::cuda::quant_linear_workspace_bytes(p);
}

// x: [M, K] (x_kind 0 float, 1 half, 2 int8); w: [N, Kp] int8 or [N, Kp/2] uint8; ids: per-token int64 or null.
// dynamic != 0: per-token scale from the row's absmax (act_scale and n_act unused, may be null / 0; float x only).
// lowrank_a [K, rank] and lowrank_b [rank, N], fp32 (rank 0: none): MASQuant's CMC branch, added to the tokens
// with ids == 1 when ids is given, else to every token; it needs float x. workspace: mqc_cuda_quant_linear_workspace
// bytes for the same rank. An invalid combination returns cudaErrorInvalidValue before launching anything.
__attribute__((visibility("default"))) int mqc_cuda_quant_linear_ex(int bits, const void* x, int x_kind, int64_t M,
                                                                     int64_t K, int64_t N, const void* w,
                                                                     const float* w_scale, const float* act_scale,
                                                                     int n_act, const int64_t* ids, const float* bias,
                                                                     int dynamic, const float* lowrank_a,
                                                                     const float* lowrank_b, int64_t rank, void* y,
                                                                     int y_half, void* workspace, void* stream) {
  // The quantize kernel reads act_scale for int8 x even with dynamic set; the low-rank kernels read float x.
  if ((bits != 8 && bits != 4) || (dynamic && x_kind == 2) || (!dynamic && !act_scale) || rank < 0 ||
      (rank > 0 && (x_kind == 2 || !lowrank_a || !lowrank_b)))
    return static_cast<int>(cudaErrorInvalidValue);
  QuantLinearParams p;
  p.bits = bits;
  p.x = x;
  p.x_kind = x_kind;
  p.M = M;
  p.Kx = K;
  p.K = K;
  p.N = N;
  p.Kp = mqc::cuda::padded_k(K);
  p.w = w;
  p.w_scale = w_scale;
  p.dynamic = dynamic != 0;
  p.act_scale = p.dynamic ? nullptr : act_scale;
  p.n_act = p.dynamic ? 1 : n_act;
  p.modality.ids = ids;
  p.bias = bias;
  p.lowrank_a = rank > 0 ? lowrank_a : nullptr;
  p.lowrank_b = rank > 0 ? lowrank_b : nullptr;
  p.rank = rank > 0 ? rank : 0;
  p.y = y;
  p.y_half = y_half != 0;
  return mqc::cuda::quant_linear(p, workspace, stream);
}

// Static activation scales, no low-rank branch: mqc_cuda_quant_linear_ex with dynamic = 0 and rank = 0.
__attribute__((visibility("default"))) int mqc_cuda_quant_linear(int bits, const void* x, int x_kind, int64_t M,
                                                                  int64_t K, int64_t N, const void* w,
                                                                  const float* w_scale, const float* act_scale,
                                                                  int n_act, const int64_t* ids, const float* bias,
                                                                  void* y, int y_half, void* workspace,
                                                                  void* stream) {
  return mqc_cuda_quant_linear_ex(bits, x, x_kind, M, K, N, w, w_scale, act_scale, n_act, ids, bias, 0, nullptr,
                                  nullptr, 0, y, y_half, workspace, stream);
}

__attribute__((visibility("default"))) int mqc_cuda_hadamard(const void* x, void* y, int half, int64_t rows, int64_t n,
                                                              int64_t m, const float* hm, void* stream) {
  return mqc::cuda::hadamard(x, y, half != 0, rows, n, m, hm, stream);
}

__attribute__((visibility("default"))) int mqc_cuda_rmsnorm_quant(const void* x, int half, int64_t rows, int64_t K,
                                                                   const float* gamma, const float* act_scale,
                                                                   float eps, int8_t* q, void* stream) {
  return mqc::cuda::rmsnorm_quant(x, half != 0, rows, K, gamma, act_scale, 1, Modality{}, eps, q, stream);
}

}  // extern "C"
