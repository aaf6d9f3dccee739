// Thin helpers over onnxruntime's C/C++ API (headers of API version 21): status conversion, optional inputs,
// attributes with defaults, and the session's intra-op thread pool.
#pragma once

#include <type_traits>

#include "onnxruntime_cxx_api.h"

#include "common.h"

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

inline int64_t attr_int(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  return v;
}

inline float attr_float(const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  return v;
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

struct TensorView {
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  const void* data = nullptr;
  int64_t size() const { return numel(shape); }
};

inline TensorView view(const Ort::ConstValue& v) {
  TensorView t;
  if (!present(v)) return t;
  auto info = v.GetTensorTypeAndShapeInfo();
  t.shape = info.GetShape();
  t.type = info.GetElementType();
  t.data = v.GetTensorRawData();
  return t;
}

template <typename T>
constexpr ONNXTensorElementDataType onnx_type();
template <>
constexpr ONNXTensorElementDataType onnx_type<float>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
template <>
constexpr ONNXTensorElementDataType onnx_type<Ort::Float16_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }
template <>
constexpr ONNXTensorElementDataType onnx_type<int8_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8; }

inline const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "other";
  }
}

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
