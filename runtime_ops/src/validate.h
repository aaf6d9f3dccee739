// The ai.mqc op schemas and their input validators: ONE definition used by the CPU and the CUDA wrappers (and by
// the CUDA library's mqc_cuda_* entry points), so the two execution providers accept and refuse the same nodes with
// the same messages. No onnxruntime header here: nvcc's fallback build of the C entry points compiles this too.
//
// Where values live. The validators read shapes, element types and attributes of every input, and the VALUES of
// the host-resident inputs only: QuantLinear's act_scale and split, RMSNormQuant's act_scale. The schema marks them
// `host`, and the wrappers declare them OrtMemTypeCPUInput, so onnxruntime hands them to the CUDA kernel in host
// memory (a constant initializer is placed there once; a computed one is copied by onnxruntime). act_scale > 0 is
// thus checked on every call, on the CUDA EP as on the CPU one, at the cost of reading two floats; the CUDA kernels
// get the scales (and split) by value. Large inputs (X, W, scales per channel, modality_ids) stay where they are
// and only their shapes and types are checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"

namespace mqc {

// ONNX element types used by the ops (the values of onnx.TensorProto and of ONNXTensorElementDataType).
enum class DType : int32_t { kUndefined = 0, kFloat = 1, kUInt8 = 2, kInt8 = 3, kInt64 = 7, kFloat16 = 10 };
const char* dtype_name(DType t);

// One input of a node as the validators see it. `data` is wherever the tensor lives; the validators dereference
// it only for inputs whose schema entry is `host`.
struct TensorDesc {
  bool present = false;
  DType type = DType::kUndefined;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t size() const { return numel(shape); }
};

// ---- Schemas -----------------------------------------------------------------------------------------------
enum class TypeRule : uint8_t {
  kX,       // the X type of the registered kernel (one kernel per entry of OpSchema::x_types)
  kWeight,  // int8 (bits 8) or uint8 (bits 4): checked by the weight validator
  kFloat,   // float32
  kInt64,
};

struct InputSpec {
  const char* name;
  TypeRule type;
  bool optional;
  bool host;  // values read by the validator: OrtMemTypeCPUInput on every execution provider
};

enum class OutputRule : uint8_t { kFloatOrHalfLikeX, kLikeX, kInt8 };

struct OpSchema {
  const char* name;
  std::vector<InputSpec> inputs;
  std::vector<DType> x_types;
  OutputRule output;
  DType output_type(DType x) const;
  DType input_type(size_t i, DType x) const;  // kUndefined: any type (checked by the validator)
};

const OpSchema& quant_linear_schema();
const OpSchema& hadamard_schema();
const OpSchema& rmsnorm_quant_schema();

// Input positions of QuantLinear (the order of quant_linear_schema().inputs).
enum QuantLinearInput : size_t {
  kQlX = 0,
  kQlW,
  kQlWScale,
  kQlActScale,
  kQlBias,
  kQlModalityIds,
  kQlSplit,
  kQlLowrankA,
  kQlLowrankB,
  kQlSideRow,
  kQlNumInputs
};
enum HadamardInput : size_t { kHdX = 0, kHdMatrix, kHdNumInputs };
enum RMSNormQuantInput : size_t { kRqX = 0, kRqGamma, kRqActScale, kRqModalityIds, kRqSplit, kRqNumInputs };

// ---- Validated calls ---------------------------------------------------------------------------------------
// Static activation scales, read from the host-resident act_scale: n = 0 (dynamic), 1, 2 (text, image) or 3
// (text, image, sink). A class without its own scale uses the text scale.
struct ActScales {
  int n = 0;
  float s[kMaxScaleClasses] = {0.f, 0.f, 0.f};
  float of(int cls) const { return s[cls < n ? cls : 0]; }
};

// Token modality: ids is modality_ids' data (host or device, not read here), split the value of the host-resident
// split (-1: absent), seq_len the S of X [B, S, K] for the split form.
struct TokenModality {
  const int64_t* ids = nullptr;
  int64_t split = -1;
  int64_t seq_len = 1;
  ModalitySelector host_selector() const;  // for kernels that read ids on the host (CPU)
  bool active() const { return ids != nullptr || split >= 0; }
};

struct QuantLinearAttrs {
  int bits = 8;
  bool dynamic = false;
  int64_t group_size = 0;  // 0: one weight scale per output channel; else per group of group_size input rows
};
// group_size must be 0 or a positive multiple of kWeightGroupAlign: the CPU kernels step k by 4 (W8) / 8 (W4) bytes
// and the CUDA kernels by 32 (mma.sync k and a GEMV lane's chunk), so a group never splits one of those steps.
constexpr int64_t kWeightGroupAlign = 32;
struct WeightDims {
  int64_t N = 0, K = 0;  // logical W [N, K]; bits 4 stores [N, ceil(K / 2)] bytes
};
struct QuantLinearCall {
  int64_t M = 0;   // tokens: the product of X's leading dimensions (also when K = 0)
  int64_t Kx = 0;  // X's last dimension
  int64_t c0 = 0;  // 1 with side_row: channel 0 bypasses quantization
  int64_t K = 0;   // quantized channels, Kx - c0
  int64_t N = 0;
  int64_t rank = 0;  // low-rank branch r (0: none)
  int64_t groups = 1;  // weight scale groups along K: K / group_size, or 1 per channel
  ActScales act;
  TokenModality modality;
};

// Kernel creation: attributes (x: the kernel's X type) and W (constant initializer or, on the CPU, per call).
QuantLinearAttrs check_quant_linear_attrs(int64_t bits, int64_t dynamic, int64_t group_size, DType x);
WeightDims check_quant_linear_weight(const QuantLinearAttrs& attrs, const TensorDesc& w);
// Every call: the inputs in schema order (absent optional inputs have present = false), W checked by the above.
QuantLinearCall check_quant_linear_call(const QuantLinearAttrs& attrs, const WeightDims& w,
                                        const std::vector<TensorDesc>& in);

struct HadamardCall {
  int64_t rows = 0, n = 0, m = 1;  // m: H_m's size (1 without H_m)
};
int64_t check_hadamard_matrix(const TensorDesc& h);  // H_m's size m: kernel creation (constant H_m) and calls
HadamardCall check_hadamard_call(const std::vector<TensorDesc>& in);

struct RMSNormQuantCall {
  int64_t M = 0, K = 0;
  ActScales act;
  TokenModality modality;
};
float check_rmsnorm_quant_epsilon(float epsilon);
RMSNormQuantCall check_rmsnorm_quant_call(const std::vector<TensorDesc>& in);

}  // namespace mqc
