// CUDA execution-provider kernels of the ai.mqc ops (the onnxruntime wrapper; kernels in *.cu).
//
// onnxruntime 1.21's public headers carry no cuda_context.h, so the stream comes from the C API's
// KernelContext_GetGPUComputeStream, every launch goes on that stream, and scratch memory is stream-ordered
// (cudaMallocAsync / cudaFreeAsync on the same stream). Weights are prepacked once at kernel creation from the
// constant initializer (copied to the host first when onnxruntime already placed it on the device).
//
// Validation is shared with the CPU kernels (validate.h): the same schema declares the inputs, and the same
// functions check attributes, shapes, types and the host-resident values. act_scale and split are declared
// OrtMemTypeCPUInput (schema flag `host`): onnxruntime keeps a constant act_scale in host memory (a computed one is
// copied there by onnxruntime), so act_scale > 0 is checked on every call exactly as on the CPU, without a device
// read or a synchronization, and the kernels take the scales and split by value.
#include <cuda_runtime.h>

#include "cuda/kernels.h"
#include "ops.h"

namespace mqc {
namespace {

void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) fail(op, what, ": CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

// The bytes of a tensor on the host, wherever onnxruntime put it.
std::vector<uint8_t> host_bytes(const TensorDesc& t, size_t elem_size) {
  std::vector<uint8_t> out(static_cast<size_t>(t.size()) * elem_size);
  cudaPointerAttributes attr{};
  const bool on_device = cudaPointerGetAttributes(&attr, t.data) == cudaSuccess && attr.type == cudaMemoryTypeDevice;
  cudaGetLastError();  // clear a failed query on a plain host pointer
  if (on_device)
    check_cuda(cudaMemcpy(out.data(), t.data, out.size(), cudaMemcpyDeviceToHost), "QuantLinear", "copying W");
  else
    std::memcpy(out.data(), t.data, out.size());
  return out;
}

// Stream-ordered scratch comes from the device's default memory pool; keep freed blocks in the pool instead of
// returning them to the driver at every synchronization (the default threshold of 0 would).
void keep_pool_memory() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  cudaMemPool_t pool;
  if (cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess) return;
  uint64_t threshold = UINT64_MAX;
  cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
}

struct StreamScratch {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  StreamScratch(size_t bytes, cudaStream_t s, const char* op) : stream(s) {
    if (bytes) check_cuda(cudaMallocAsync(&ptr, bytes, s), op, "allocating scratch");
  }
  ~StreamScratch() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

template <typename Tin, typename Tout>
struct CudaQuantLinearKernel {
  static constexpr DType kXType = dtype_of<Tin>();
  QuantLinearAttrs attrs;
  WeightDims dims;
  int64_t Kp = 0;
  void* w_dev = nullptr;

  CudaQuantLinearKernel(const OrtApi&, const OrtKernelInfo* info) {
    const char* op = "QuantLinear";
    attrs = check_quant_linear_attrs(attr_int(info, "QuantLinear", "bits", 8),
                                     attr_int(info, "QuantLinear", "dynamic", 0),
                                     attr_int(info, "QuantLinear", "group_size", 0), kXType);
    Ort::ConstValue wv = constant_input(info, kQlW);
    if (!present(wv)) fail(op, "the CUDA kernel needs W as a constant initializer (it is prepacked once)");
    const TensorDesc w = describe(wv);
    dims = check_quant_linear_weight(attrs, w);
    Kp = cuda::padded_k(dims.K);
    std::vector<uint8_t> host = host_bytes(w, 1);
    std::vector<uint8_t> packed(static_cast<size_t>(attrs.bits == 8 ? dims.N * Kp : dims.N * Kp / 2));
    cuda::prepack_weights_host(host.data(), attrs.bits, dims.N, dims.K, packed.data());
    keep_pool_memory();
    if (!packed.empty()) {
      check_cuda(cudaMalloc(&w_dev, packed.size()), op, "allocating W");
      check_cuda(cudaMemcpy(w_dev, packed.data(), packed.size(), cudaMemcpyHostToDevice), op, "uploading W");
    }
  }
  ~CudaQuantLinearKernel() {
    if (w_dev) cudaFree(w_dev);
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }

  void compute(OrtKernelContext* context) {
    const char* op = "QuantLinear";
    Ort::KernelContext ctx(context);
    const std::vector<TensorDesc> in = describe_inputs(ctx, quant_linear_schema());
    const QuantLinearCall call = check_quant_linear_call(attrs, dims, in);
    cuda::QuantLinearParams p;
    p.bits = attrs.bits;
    p.x = in[kQlX].data;
    p.x_kind = std::is_same<Tin, float>::value ? 0 : (std::is_same<Tin, int8_t>::value ? 2 : 1);
    p.M = call.M;
    p.Kx = call.Kx;
    p.K = call.K;
    p.col0 = call.c0;
    p.N = call.N;
    p.Kp = Kp;
    p.w = w_dev;
    p.w_scale = static_cast<const float*>(in[kQlWScale].data);
    p.group_size = attrs.group_size;
    p.dynamic = attrs.dynamic;
    p.act = call.act;
    p.modality = call.modality;
    p.bias = static_cast<const float*>(in[kQlBias].data);
    p.lowrank_a = static_cast<const float*>(in[kQlLowrankA].data);
    p.lowrank_b = static_cast<const float*>(in[kQlLowrankB].data);
    p.rank = call.rank;
    p.side_row = static_cast<const float*>(in[kQlSideRow].data);
    std::vector<int64_t> y_shape = in[kQlX].shape;
    y_shape.back() = call.N;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    p.y = y.GetTensorMutableRawData();
    p.y_half = std::is_same<Tout, Ort::Float16_t>::value;
    if (p.M == 0 || p.N == 0) return;
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    StreamScratch scratch(static_cast<size_t>(cuda::quant_linear_workspace_bytes(p)), stream, op);
    check_cuda(static_cast<cudaError_t>(cuda::quant_linear(p, scratch.ptr, stream)), op, "launch");
  }
};

template <typename T>
struct CudaHadamardKernel {
  static constexpr DType kXType = dtype_of<T>();
  void* h_dev = nullptr;  // a constant H_m, uploaded once
  CudaHadamardKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstValue hv = constant_input(info, kHdMatrix);
    if (!present(hv)) return;
    const TensorDesc h = describe(hv);
    check_hadamard_matrix(h);
    std::vector<uint8_t> host = host_bytes(h, 4);
    check_cuda(cudaMalloc(&h_dev, host.size()), "Hadamard", "allocating H_m");
    check_cuda(cudaMemcpy(h_dev, host.data(), host.size(), cudaMemcpyHostToDevice), "Hadamard", "uploading H_m");
  }
  ~CudaHadamardKernel() {
    if (h_dev) cudaFree(h_dev);
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const std::vector<TensorDesc> in = describe_inputs(ctx, hadamard_schema());
    const HadamardCall call = check_hadamard_call(in);
    // A device limit, not a rule of the op: the kernel keeps one row and H_m in shared memory (227 KB on sm_80+).
    const int64_t h_floats = in[kHdMatrix].present ? call.m * call.m : 0;
    if ((call.n + h_floats) * 4 > 227 * 1024)
      fail("Hadamard", "last dimension ", call.n, " with H_m of size ", call.m,
           " exceeds the CUDA kernel's shared memory (row + H_m <= 58112 floats)");
    const float* hm = nullptr;
    if (in[kHdMatrix].present) hm = h_dev ? static_cast<const float*>(h_dev) : static_cast<const float*>(in[kHdMatrix].data);
    Ort::UnownedValue y = ctx.GetOutput(0, in[kHdX].shape);
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    check_cuda(static_cast<cudaError_t>(cuda::hadamard(in[kHdX].data, y.GetTensorMutableRawData(),
                                                       std::is_same<T, Ort::Float16_t>::value, call.rows, call.n,
                                                       call.m, hm, stream)),
               "Hadamard", "launch");
  }
};

template <typename T>
struct CudaRMSNormQuantKernel {
  static constexpr DType kXType = dtype_of<T>();
  float epsilon = 1e-6f;
  CudaRMSNormQuantKernel(const OrtApi&, const OrtKernelInfo* info) {
    epsilon = check_rmsnorm_quant_epsilon(attr_float(info, "RMSNormQuant", "epsilon", 1e-6f));
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const std::vector<TensorDesc> in = describe_inputs(ctx, rmsnorm_quant_schema());
    const RMSNormQuantCall call = check_rmsnorm_quant_call(in);
    Ort::UnownedValue y = ctx.GetOutput(0, in[kRqX].shape);
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    check_cuda(static_cast<cudaError_t>(cuda::rmsnorm_quant(
                   in[kRqX].data, std::is_same<T, Ort::Float16_t>::value, call.M, call.K,
                   static_cast<const float*>(in[kRqGamma].data), call.act, call.modality, epsilon,
                   y.GetTensorMutableData<int8_t>(), stream)),
               "RMSNormQuant", "launch");
  }
};

}  // namespace

void add_cuda_ops(Ort::CustomOpDomain& domain) {
  const char* cuda = "CUDAExecutionProvider";
  static SchemaOp<CudaQuantLinearKernel<float, float>> ql_f32(quant_linear_schema(), cuda);
  static SchemaOp<CudaQuantLinearKernel<Ort::Float16_t, Ort::Float16_t>> ql_f16(quant_linear_schema(), cuda);
  static SchemaOp<CudaQuantLinearKernel<int8_t, float>> ql_i8(quant_linear_schema(), cuda);
  static SchemaOp<CudaHadamardKernel<float>> had_f32(hadamard_schema(), cuda);
  static SchemaOp<CudaHadamardKernel<Ort::Float16_t>> had_f16(hadamard_schema(), cuda);
  static SchemaOp<CudaRMSNormQuantKernel<float>> rq_f32(rmsnorm_quant_schema(), cuda);
  static SchemaOp<CudaRMSNormQuantKernel<Ort::Float16_t>> rq_f16(rmsnorm_quant_schema(), cuda);
  for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{&ql_f32, &ql_f16, &ql_i8, &had_f32, &had_f16, &rq_f32,
                                                             &rq_f16})
    domain.Add(op);
}

}  // namespace mqc
