// Thin helpers over onnxruntime's C/C++ API (headers of API version 21): status conversion, optional inputs,
// attributes with defaults, and the session's intra-op thread pool.
#pragma once

#include <type_traits>

#include "onnxruntime_cxx_api.h"

#include "common.h"
#include "validate.h"

namespace mqc {

inline OrtStatusPtr to_status(const std::exception& e, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::GetApi().CreateStatus(code, e.what());
}

#define MQC_GUARD(...)                                         \
  try {                                                        \
    __VA_ARGS__;                                                  \
    return nullptr;                                            \
  } catch (const ::mqc::Error& e) {                            \
    return ::mqc::to_status(e, ORT_INVALID_ARGUMENT);          \
  } catch (const Ort::Exception& e) {                          \
    return ::mqc::to_status(e, e.GetOrtErrorCode());           \
  } catch (const std::exception& e) {                          \
    return ::mqc::to_status(e, ORT_FAIL);                      \
  }

// True when the node carries attribute `name` as a float (probed to tell a wrongly typed attribute from an
// absent one, which onnxruntime reports alike).
inline bool has_float_attr(const OrtKernelInfo* info, const char* name) {
  float v = 0.f;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  if (st) Ort::GetApi().ReleaseStatus(st);
  return st == nullptr;
}

inline bool has_int_attr(const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (st) Ort::GetApi().ReleaseStatus(st);
  return st == nullptr;
}

// An int64 attribute, dflt when absent; given as a float it is refused (it would otherwise read as absent).
inline int64_t attr_int(const OrtKernelInfo* info, const char* op, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (!st) return v;
  Ort::GetApi().ReleaseStatus(st);
  if (has_float_attr(info, name)) fail(op, "attribute ", name, " must be an integer, got a float");
  return dflt;
}

// A float attribute, dflt when absent; given as an integer it is refused.
inline float attr_float(const OrtKernelInfo* info, const char* op, const char* name, float dflt) {
  float v = dflt;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  if (!st) return v;
  Ort::GetApi().ReleaseStatus(st);
  if (has_int_attr(info, name)) fail(op, "attribute ", name, " must be a float, got an integer");
  return dflt;
}

inline size_t node_input_count(const OrtKernelInfo* info) {
  size_t n = 0;
  Ort::ThrowOnError(Ort::GetApi().KernelInfo_GetInputCount(info, &n));
  return n;
}

// A constant initializer input at kernel creation, or an empty value when the input is absent or computed.
inline Ort::ConstValue constant_input(const OrtKernelInfo* info, size_t index) {
  if (index >= node_input_count(info)) return Ort::ConstValue{nullptr};
  int is_constant = 0;
  const OrtValue* v = nullptr;
  OrtStatus* st = Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_constant, &v);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return Ort::ConstValue{nullptr};
  }
  return Ort::ConstValue{is_constant ? v : nullptr};
}

inline Ort::ConstValue optional_input(Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return Ort::ConstValue{nullptr};
  return ctx.GetInput(index);
}

inline bool present(const Ort::ConstValue& v) { return static_cast<const OrtValue*>(v) != nullptr; }

// An input as the shared validators see it (validate.h): presence, element type, shape and data pointer.
inline TensorDesc describe(const Ort::ConstValue& v) {
  TensorDesc t;
  if (!present(v)) return t;
  auto info = v.GetTensorTypeAndShapeInfo();
  t.present = true;
  t.shape = info.GetShape();
  t.type = static_cast<DType>(info.GetElementType());
  t.data = v.GetTensorRawData();
  return t;
}

// Every input of a call in schema order; absent optional inputs have present = false.
inline std::vector<TensorDesc> describe_inputs(Ort::KernelContext& ctx, const OpSchema& schema) {
  std::vector<TensorDesc> in(schema.inputs.size());
  for (size_t i = 0; i < in.size(); ++i) in[i] = describe(optional_input(ctx, i));
  return in;
}

static_assert(static_cast<int>(DType::kFloat) == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
                  static_cast<int>(DType::kUInt8) == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 &&
                  static_cast<int>(DType::kInt8) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 &&
                  static_cast<int>(DType::kInt64) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 &&
                  static_cast<int>(DType::kFloat16) == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
              "mqc::DType follows onnxruntime's element type values");

template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::kFloat; }
template <>
constexpr DType dtype_of<Ort::Float16_t>() { return DType::kFloat16; }
template <>
constexpr DType dtype_of<int8_t>() { return DType::kInt8; }

// The onnxruntime operator of one kernel variant, declared from the op's schema (validate.h): name, inputs and
// their types, required/optional, host residence (OrtMemTypeCPUInput) and output type. The CPU and the CUDA
// libraries register their kernels through this one class, so their declarations cannot drift.
template <typename Kernel>
struct SchemaOp : Ort::CustomOpBase<SchemaOp<Kernel>, Kernel, true> {
  SchemaOp(const OpSchema& schema, const char* provider) : schema_(schema), provider_(provider) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new Kernel(api, info));
  }
  const char* GetName() const { return schema_.name; }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return schema_.inputs.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return static_cast<ONNXTensorElementDataType>(schema_.input_type(i, Kernel::kXType));
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return schema_.inputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t i) const {
    return schema_.inputs[i].host ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return static_cast<ONNXTensorElementDataType>(schema_.output_type(Kernel::kXType));
  }

 private:
  const OpSchema& schema_;
  const char* provider_;
};

// Run fn(i) for i in [0, total) on the session's intra-op thread pool.
template <typename F>
void parallel_for(Ort::KernelContext& ctx, size_t total, F&& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(size_t{0});
    return;
  }
  using Fn = std::remove_reference_t<F>;
  auto tramp = [](void* user, size_t i) { (*static_cast<Fn*>(user))(i); };
  ctx.ParallelFor(tramp, total, 0, const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace mqc
