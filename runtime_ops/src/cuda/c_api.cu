// Plain C entry points over the CUDA launchers, for benchmarks/bench_runtime_ops.py (ctypes + torch tensors), and
// the launch-geometry hooks of the tests. Tensor pointers are device pointers, except the activation scales, which
// are HOST pointers (n_act floats), as on the onnxruntime path (validate.h). stream is a cudaStream_t (0 = legacy
// default stream). Each call is checked by the shared validators first: an invalid one launches nothing, returns
// cudaErrorInvalidValue and leaves its message for mqc_cuda_last_error().
#include <cuda_runtime.h>

#include <string>

#include "cuda/kernels.h"
#include "cuda/launch_geometry.h"
#include "validate.h"

using mqc::DType;
using mqc::TensorDesc;
using mqc::cuda::QuantLinearParams;

namespace {

thread_local std::string last_error;

TensorDesc desc(DType type, std::vector<int64_t> shape, const void* data, bool present = true) {
  TensorDesc t;
  t.present = present;
  t.type = type;
  t.shape = std::move(shape);
  t.data = data;
  return t;
}

// Runs check; on mqc::Error records the message and returns cudaErrorInvalidValue, else 0.
template <typename F>
int validated(F&& check) {
  try {
    check();
  } catch (const mqc::Error& e) {
    last_error = e.what();
    return static_cast<int>(cudaErrorInvalidValue);
  }
  last_error.clear();
  return 0;
}

DType x_dtype(int x_kind) { return x_kind == 0 ? DType::kFloat : (x_kind == 1 ? DType::kFloat16 : DType::kInt8); }

}  // namespace

extern "C" {

// The message of this thread's last refused call ("" after a valid one).
__attribute__((visibility("default"))) const char* mqc_cuda_last_error() { return last_error.c_str(); }

__attribute__((visibility("default"))) int64_t mqc_cuda_padded_k(int64_t K) { return mqc::cuda::padded_k(K); }

__attribute__((visibility("default"))) int64_t mqc_cuda_quant_linear_workspace(int64_t M, int64_t K, int64_t rank) {
  QuantLinearParams p;
  p.M = M;
  p.K = K;
  p.Kp = mqc::cuda::padded_k(K);
  p.rank = rank;
  return mqc::cuda::quant_linear_workspace_bytes(p);
}

// The grid of a one-row-per-block launch (quantize, Hadamard, RMSNormQuant), as {x, y, z}.
__attribute__((visibility("default"))) void mqc_cuda_grid_rows(int64_t rows, uint32_t* xyz) {
  const mqc::cuda::Grid g = mqc::cuda::row_grid(rows);
  xyz[0] = g.x, xyz[1] = g.y, xyz[2] = g.z;
}

// QuantLinear's grids for M tokens and N channels, as 9 numbers: rows {x, y, z}, GEMM/GEMV, epilogue (branches).
__attribute__((visibility("default"))) void mqc_cuda_quant_linear_grids(int64_t M, int64_t N, uint32_t* out) {
  const mqc::cuda::QuantLinearGrids g = mqc::cuda::quant_linear_grids(M, N);
  const mqc::cuda::Grid all[3] = {g.rows, g.gemm, g.epilogue};
  for (int i = 0; i < 3; ++i) out[3 * i] = all[i].x, out[3 * i + 1] = all[i].y, out[3 * i + 2] = all[i].z;
}

// x: [M, K] (x_kind 0 float, 1 half, 2 int8); w: [N, Kp] int8 or [N, Kp/2] uint8 (device layout); w_scale: [N]
// per channel (group_size 0) or [K / group_size, N] per group of group_size input rows; act_scale: HOST
// n_act floats (1 to 3: text, image, sink; with dynamic, null / 0 entries); ids: per-token int64 (1 image,
// 2 sink, else text) or null. dynamic != 0: per-token
// scale from the row's absmax (float x only). lowrank_a [K, rank] and lowrank_b [rank, N], fp32 (rank 0: none):
// MASQuant's CMC branch, added to the tokens with ids == 1 when ids is given, else to every token; it needs float
// x. workspace: mqc_cuda_quant_linear_workspace bytes for the same rank.
__attribute__((visibility("default"))) int mqc_cuda_quant_linear_group(int bits, int64_t group_size, const void* x,
                                                                        int x_kind, int64_t M, int64_t K, int64_t N,
                                                                        const void* w, const float* w_scale,
                                                                        const float* act_scale,
                                                                     int n_act, const int64_t* ids, const float* bias,
                                                                     int dynamic, const float* lowrank_a,
                                                                     const float* lowrank_b, int64_t rank, void* y,
                                                                     int y_half, void* workspace, void* stream) {
  mqc::QuantLinearCall call;
  const int status = validated([&] {
    if (x_kind < 0 || x_kind > 2) mqc::fail("QuantLinear", "x_kind must be 0 (float), 1 (half) or 2 (int8)");
    if (n_act < 0 || n_act > mqc::kMaxScaleClasses || (n_act > 0 && !act_scale)) mqc::fail("QuantLinear", "act_scale must hold n_act floats");
    if (rank < 0) mqc::fail("QuantLinear", "rank must be >= 0");
    const mqc::QuantLinearAttrs attrs = mqc::check_quant_linear_attrs(bits, dynamic, group_size, x_dtype(x_kind));
    const std::vector<int64_t> w_shape = {N, bits == 8 ? K : (K + 1) / 2};
    const mqc::WeightDims dims =
        mqc::check_quant_linear_weight(attrs, desc(bits == 8 ? DType::kInt8 : DType::kUInt8, w_shape, w));
    std::vector<TensorDesc> in(mqc::kQlNumInputs);
    in[mqc::kQlX] = desc(x_dtype(x_kind), {M, K}, x);
    in[mqc::kQlW] = desc(bits == 8 ? DType::kInt8 : DType::kUInt8, w_shape, w);
    in[mqc::kQlWScale] = desc(DType::kFloat, group_size ? std::vector<int64_t>{K / group_size, N}
                                                        : std::vector<int64_t>{N}, w_scale);
    in[mqc::kQlActScale] = desc(DType::kFloat, {n_act}, act_scale);
    in[mqc::kQlBias] = desc(DType::kFloat, {N}, bias, bias != nullptr);
    in[mqc::kQlModalityIds] = desc(DType::kInt64, {M}, ids, ids != nullptr);
    in[mqc::kQlLowrankA] = desc(DType::kFloat, {K, rank}, lowrank_a, rank > 0);
    in[mqc::kQlLowrankB] = desc(DType::kFloat, {rank, N}, lowrank_b, rank > 0);
    call = mqc::check_quant_linear_call(attrs, dims, in);
    if (rank > 0 && (!lowrank_a || !lowrank_b)) mqc::fail("QuantLinear", "rank > 0 needs lowrank_a and lowrank_b");
  });
  if (status) return status;
  QuantLinearParams p;
  p.bits = bits;
  p.x = x;
  p.x_kind = x_kind;
  p.M = call.M;
  p.Kx = call.Kx;
  p.K = call.K;
  p.N = call.N;
  p.Kp = mqc::cuda::padded_k(call.K);
  p.w = w;
  p.w_scale = w_scale;
  p.group_size = group_size;
  p.dynamic = dynamic != 0;
  p.act = call.act;
  p.modality = call.modality;
  p.bias = bias;
  p.lowrank_a = call.rank ? lowrank_a : nullptr;
  p.lowrank_b = call.rank ? lowrank_b : nullptr;
  p.rank = call.rank;
  p.y = y;
  p.y_half = y_half != 0;
  return mqc::cuda::quant_linear(p, workspace, stream);
}

// Per-channel weights: mqc_cuda_quant_linear_group with group_size = 0.
__attribute__((visibility("default"))) int mqc_cuda_quant_linear_ex(int bits, const void* x, int x_kind, int64_t M,
                                                                     int64_t K, int64_t N, const void* w,
                                                                     const float* w_scale, const float* act_scale,
                                                                     int n_act, const int64_t* ids, const float* bias,
                                                                     int dynamic, const float* lowrank_a,
                                                                     const float* lowrank_b, int64_t rank, void* y,
                                                                     int y_half, void* workspace, void* stream) {
  return mqc_cuda_quant_linear_group(bits, 0, x, x_kind, M, K, N, w, w_scale, act_scale, n_act, ids, bias, dynamic,
                                     lowrank_a, lowrank_b, rank, y, y_half, workspace, stream);
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

// hm: device [m, m] or null (then m must be 1).
__attribute__((visibility("default"))) int mqc_cuda_hadamard(const void* x, void* y, int half, int64_t rows, int64_t n,
                                                              int64_t m, const float* hm, void* stream) {
  const int status = validated([&] {
    if (!hm && m != 1) mqc::fail("Hadamard", "H_m is required for m = ", m);
    mqc::check_hadamard_call({desc(half ? DType::kFloat16 : DType::kFloat, {rows, n}, x),
                              desc(DType::kFloat, {m, m}, hm, hm != nullptr)});
  });
  if (status) return status;
  return mqc::cuda::hadamard(x, y, half != 0, rows, n, m, hm, stream);
}

// act_scale: HOST pointer to one float (the text scale; no modality).
__attribute__((visibility("default"))) int mqc_cuda_rmsnorm_quant(const void* x, int half, int64_t rows, int64_t K,
                                                                   const float* gamma, const float* act_scale,
                                                                   float eps, int8_t* q, void* stream) {
  mqc::RMSNormQuantCall call;
  const int status = validated([&] {
    if (!act_scale) mqc::fail("RMSNormQuant", "act_scale must hold one float");
    mqc::check_rmsnorm_quant_epsilon(eps);
    call = mqc::check_rmsnorm_quant_call({desc(half ? DType::kFloat16 : DType::kFloat, {rows, K}, x),
                                          desc(DType::kFloat, {K}, gamma), desc(DType::kFloat, {1}, act_scale)});
  });
  if (status) return status;
  return mqc::cuda::rmsnorm_quant(x, half != 0, rows, K, gamma, call.act, call.modality, eps, q, stream);
}

}  // extern "C"
