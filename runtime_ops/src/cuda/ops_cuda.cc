// CUDA execution-provider kernels of the ai.mqc ops (the onnxruntime wrapper; kernels in *.cu).
//
// onnxruntime 1.21's public headers carry no cuda_context.h, so the stream comes from the C API's
// KernelContext_GetGPUComputeStream, every launch goes on that stream, and scratch memory is stream-ordered
// (cudaMallocAsync / cudaFreeAsync on the same stream). Weights are prepacked once at kernel creation from the
// constant initializer (copied to the host first when onnxruntime already placed it on the device).
#include <cuda_runtime.h>

#include "cuda/kernels.h"
#include "ops.h"

namespace mqc {
namespace {

void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) fail(op, what, ": CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

// The bytes of a tensor on the host, wherever onnxruntime put it.
std::vector<uint8_t> host_bytes(const TensorView& t, size_t elem_size) {
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

cuda::Modality device_modality(const char* op, Ort::KernelContext& ctx, size_t ids_index, size_t split_index,
                               const std::vector<int64_t>& x_shape, int64_t tokens) {
  ModalitySelector checked = modality_from_inputs_shapes(op, view(optional_input(ctx, ids_index)),
                                                         view(optional_input(ctx, split_index)), x_shape, tokens);
  cuda::Modality mo;
  mo.ids = checked.ids;
  mo.split = checked.split >= 0 ? static_cast<const int64_t*>(view(optional_input(ctx, split_index)).data) : nullptr;
  mo.seq_len = checked.seq_len;
  return mo;
}

template <typename Tin, typename Tout>
struct CudaQuantLinearKernel {
  int bits = 8;
  bool dynamic = false;  // per-token scale from the row's absmax (in the quantize kernel); act_scale ignored
  int64_t N = 0, K = 0, Kp = 0;
  void* w_dev = nullptr;

  CudaQuantLinearKernel(const OrtApi&, const OrtKernelInfo* info) {
    const char* op = "QuantLinear";
    bits = static_cast<int>(attr_int(info, "bits", 8));
    if (bits != 8 && bits != 4) fail(op, "attribute bits must be 8 or 4, got ", bits);
    dynamic = quant_linear_dynamic_attr(info, std::is_same<Tin, int8_t>::value);
    Ort::ConstValue wv = constant_input(info, kQlW);
    if (!present(wv)) fail(op, "the CUDA kernel needs W as a constant initializer (it is prepacked once)");
    TensorView w = view(wv);
    if (w.shape.size() != 2) fail(op, "W must be 2-D, got ", shape_str(w.shape));
    const auto want = bits == 8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (w.type != want) fail(op, "bits=", bits, " needs a ", type_name(want), " W, got ", type_name(w.type));
    N = w.shape[0];
    K = bits == 8 ? w.shape[1] : 2 * w.shape[1];
    Kp = cuda::padded_k(K);
    std::vector<uint8_t> host = host_bytes(w, 1);
    std::vector<uint8_t> packed(static_cast<size_t>(bits == 8 ? N * Kp : N * Kp / 2));
    cuda::prepack_weights_host(host.data(), bits, N, K, packed.data());
    keep_pool_memory();
    check_cuda(cudaMalloc(&w_dev, packed.size()), op, "allocating W");
    check_cuda(cudaMemcpy(w_dev, packed.data(), packed.size(), cudaMemcpyHostToDevice), op, "uploading W");
  }
  ~CudaQuantLinearKernel() {
    if (w_dev) cudaFree(w_dev);
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }

  void compute(OrtKernelContext* context) {
    const char* op = "QuantLinear";
    Ort::KernelContext ctx(context);
    TensorView x = view(ctx.GetInput(kQlX));
    if (x.shape.empty()) fail(op, "X must have rank >= 1");
    cuda::QuantLinearParams p;
    p.bits = bits;
    p.x = x.data;
    p.x_kind = std::is_same<Tin, float>::value ? 0 : (std::is_same<Tin, int8_t>::value ? 2 : 1);
    p.Kx = x.shape.back();
    p.M = p.Kx ? x.size() / p.Kx : 0;
    TensorView side = view(optional_input(ctx, kQlSideRow));
    p.col0 = side.data ? 1 : 0;
    p.K = p.Kx - p.col0;
    if (p.K != K && !(bits == 4 && K == p.K + 1))  // int4 rows of odd K carry one zero pad nibble
      fail(op, "X ", shape_str(x.shape), " gives K=", p.K, " but W holds K=", K);
    p.N = N;
    p.Kp = Kp;
    p.w = w_dev;
    TensorView ws = view(ctx.GetInput(kQlWScale)), as = view(ctx.GetInput(kQlActScale));
    if (ws.size() != N) fail(op, "w_scale must have ", N, " entries, got shape ", shape_str(ws.shape));
    check_act_scale_shape(op, as, dynamic);
    p.w_scale = static_cast<const float*>(ws.data);
    p.dynamic = dynamic;
    p.act_scale = dynamic ? nullptr : static_cast<const float*>(as.data);
    p.n_act = static_cast<int>(as.size());
    TensorView bias = view(optional_input(ctx, kQlBias));
    if (bias.data && bias.size() != N) fail(op, "bias must have ", N, " entries");
    p.bias = static_cast<const float*>(bias.data);
    p.modality = device_modality(op, ctx, kQlModalityIds, kQlSplit, x.shape, p.M);
    TensorView la = view(optional_input(ctx, kQlLowrankA)), lb = view(optional_input(ctx, kQlLowrankB));
    if (la.data || lb.data) {
      if (!la.data || !lb.data || la.shape.size() != 2 || lb.shape.size() != 2 || la.shape[0] != p.K ||
          lb.shape[1] != N || la.shape[1] != lb.shape[0])
        fail(op, "lowrank_a / lowrank_b must be [K, r] / [r, N]");
      p.lowrank_a = static_cast<const float*>(la.data);
      p.lowrank_b = static_cast<const float*>(lb.data);
      p.rank = la.shape[1];
    }
    if (side.data && side.size() != N) fail(op, "side_row must have ", N, " entries");
    p.side_row = static_cast<const float*>(side.data);
    if (p.x_kind == 2 && (p.rank || p.side_row)) fail(op, "the low-rank and channel-0 branches need float X, got int8");
    std::vector<int64_t> y_shape = x.shape;
    y_shape.back() = N;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    p.y = y.GetTensorMutableRawData();
    p.y_half = std::is_same<Tout, Ort::Float16_t>::value;
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    StreamScratch scratch(static_cast<size_t>(cuda::quant_linear_workspace_bytes(p)), stream, op);
    check_cuda(static_cast<cudaError_t>(cuda::quant_linear(p, scratch.ptr, stream)), op, "launch");
  }
};

template <typename Tin, typename Tout>
struct CudaQuantLinearOp : Ort::CustomOpBase<CudaQuantLinearOp<Tin, Tout>, CudaQuantLinearKernel<Tin, Tout>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new CudaQuantLinearKernel<Tin, Tout>(api, info));
  }
  const char* GetName() const { return "QuantLinear"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return kQlNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kQlX: return onnx_type<Tin>();
      case kQlW: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      case kQlModalityIds:
      case kQlSplit: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < kQlBias ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<Tout>(); }
};

template <typename T>
struct CudaHadamardKernel {
  void* h_dev = nullptr;
  int64_t m = 1;
  CudaHadamardKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstValue hv = constant_input(info, 1);
    if (!present(hv)) return;
    TensorView h = view(hv);
    if (h.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || h.shape.size() != 2 || h.shape[0] != h.shape[1])
      fail("Hadamard", "H_m must be a float32 square matrix, got ", shape_str(h.shape));
    m = h.shape[0];
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
    TensorView x = view(ctx.GetInput(0));
    const float* hm = static_cast<const float*>(h_dev);
    int64_t mm = m;
    if (!hm) {
      TensorView h = view(optional_input(ctx, 1));
      if (h.data) {
        if (h.shape.size() != 2 || h.shape[0] != h.shape[1]) fail("Hadamard", "H_m must be square, got ", shape_str(h.shape));
        hm = static_cast<const float*>(h.data);
        mm = h.shape[0];
      }
    }
    if (x.shape.empty()) fail("Hadamard", "X must have rank >= 1");
    const int64_t n = x.shape.back();
    const int64_t L = mm ? n / mm : 0;
    if (n == 0 || n % mm != 0 || (L & (L - 1)) != 0)
      fail("Hadamard", "last dimension ", n, " is not m * 2^k for the given H_m of size m=", mm);
    if (n * 4 > 227 * 1024) fail("Hadamard", "last dimension ", n, " exceeds the CUDA kernel's shared-memory row (58112)");
    Ort::UnownedValue y = ctx.GetOutput(0, x.shape);
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    check_cuda(static_cast<cudaError_t>(cuda::hadamard(x.data, y.GetTensorMutableRawData(), std::is_same<T, Ort::Float16_t>::value,
                                                       x.size() / n, n, mm, mm > 1 ? hm : nullptr, stream)),
               "Hadamard", "launch");
  }
};

template <typename T>
struct CudaHadamardOp : Ort::CustomOpBase<CudaHadamardOp<T>, CudaHadamardKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new CudaHadamardKernel<T>(api, info));
  }
  const char* GetName() const { return "Hadamard"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? onnx_type<T>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<T>(); }
};

template <typename T>
struct CudaRMSNormQuantKernel {
  float epsilon = 1e-6f;
  CudaRMSNormQuantKernel(const OrtApi&, const OrtKernelInfo* info) { epsilon = attr_float(info, "epsilon", 1e-6f); }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    const char* op = "RMSNormQuant";
    Ort::KernelContext ctx(context);
    TensorView x = view(ctx.GetInput(0));
    if (x.shape.empty()) fail(op, "X must have rank >= 1");
    const int64_t K = x.shape.back();
    const int64_t M = K ? x.size() / K : 0;
    TensorView gamma = view(ctx.GetInput(1)), as = view(ctx.GetInput(2));
    if (gamma.size() != K) fail(op, "gamma must have ", K, " entries, got shape ", shape_str(gamma.shape));
    if (as.size() != 1 && as.size() != 2) fail(op, "act_scale must have 1 or 2 entries (text, image)");
    cuda::Modality mo = device_modality(op, ctx, 3, 4, x.shape, M);
    Ort::UnownedValue y = ctx.GetOutput(0, x.shape);
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    check_cuda(static_cast<cudaError_t>(cuda::rmsnorm_quant(
                   x.data, std::is_same<T, Ort::Float16_t>::value, M, K, static_cast<const float*>(gamma.data),
                   static_cast<const float*>(as.data), static_cast<int>(as.size()), mo, epsilon,
                   y.GetTensorMutableData<int8_t>(), stream)),
               op, "launch");
  }
};

template <typename T>
struct CudaRMSNormQuantOp : Ort::CustomOpBase<CudaRMSNormQuantOp<T>, CudaRMSNormQuantKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new CudaRMSNormQuantKernel<T>(api, info));
  }
  const char* GetName() const { return "RMSNormQuant"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? onnx_type<T>() : (i >= 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8; }
};

}  // namespace

void add_cuda_ops(Ort::CustomOpDomain& domain) {
  static CudaQuantLinearOp<float, float> ql_f32;
  static CudaQuantLinearOp<Ort::Float16_t, Ort::Float16_t> ql_f16;
  static CudaQuantLinearOp<int8_t, float> ql_i8;
  static CudaHadamardOp<float> had_f32;
  static CudaHadamardOp<Ort::Float16_t> had_f16;
  static CudaRMSNormQuantOp<float> rq_f32;
  static CudaRMSNormQuantOp<Ort::Float16_t> rq_f16;
  domain.Add(&ql_f32);
  domain.Add(&ql_f16);
  domain.Add(&ql_i8);
  domain.Add(&had_f32);
  domain.Add(&had_f16);
  domain.Add(&rq_f32);
  domain.Add(&rq_f16);
}

}  // namespace mqc
