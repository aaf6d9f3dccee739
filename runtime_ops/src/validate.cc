// The ai.mqc op schemas and validators (see validate.h), and mqc_validate_node, their C entry point for tests.
#include "validate.h"

#include <cmath>
#include <cstring>

namespace mqc {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat: return "float";
    case DType::kFloat16: return "float16";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt64: return "int64";
    default: return "other";
  }
}

DType OpSchema::output_type(DType x) const {
  switch (output) {
    case OutputRule::kFloatOrHalfLikeX: return x == DType::kFloat16 ? DType::kFloat16 : DType::kFloat;
    case OutputRule::kLikeX: return x;
    case OutputRule::kInt8: return DType::kInt8;
  }
  return DType::kUndefined;
}

DType OpSchema::input_type(size_t i, DType x) const {
  switch (inputs[i].type) {
    case TypeRule::kX: return x;
    case TypeRule::kFloat: return DType::kFloat;
    case TypeRule::kInt64: return DType::kInt64;
    case TypeRule::kWeight: return DType::kUndefined;
  }
  return DType::kUndefined;
}

const OpSchema& quant_linear_schema() {
  static const OpSchema s{"QuantLinear",
                          {{"X", TypeRule::kX, false, false},
                           {"W", TypeRule::kWeight, false, false},
                           {"w_scale", TypeRule::kFloat, false, false},
                           {"act_scale", TypeRule::kFloat, false, true},
                           {"bias", TypeRule::kFloat, true, false},
                           {"modality_ids", TypeRule::kInt64, true, false},
                           {"split", TypeRule::kInt64, true, true},
                           {"lowrank_a", TypeRule::kFloat, true, false},
                           {"lowrank_b", TypeRule::kFloat, true, false},
                           {"side_row", TypeRule::kFloat, true, false}},
                          {DType::kFloat, DType::kFloat16, DType::kInt8},
                          OutputRule::kFloatOrHalfLikeX};
  return s;
}

const OpSchema& hadamard_schema() {
  static const OpSchema s{"Hadamard",
                          {{"X", TypeRule::kX, false, false}, {"H_m", TypeRule::kFloat, true, false}},
                          {DType::kFloat, DType::kFloat16},
                          OutputRule::kLikeX};
  return s;
}

const OpSchema& rmsnorm_quant_schema() {
  static const OpSchema s{"RMSNormQuant",
                          {{"X", TypeRule::kX, false, false},
                           {"gamma", TypeRule::kFloat, false, false},
                           {"act_scale", TypeRule::kFloat, false, true},
                           {"modality_ids", TypeRule::kInt64, true, false},
                           {"split", TypeRule::kInt64, true, true}},
                          {DType::kFloat, DType::kFloat16},
                          OutputRule::kInt8};
  return s;
}

ModalitySelector TokenModality::host_selector() const {
  ModalitySelector sel;
  sel.ids = ids;
  sel.split = split;
  sel.seq_len = seq_len;
  return sel;
}

namespace {

// Presence, count and element types against the schema: what onnxruntime checks from the same schema before a
// kernel runs, repeated here for callers that do not go through onnxruntime (the C entry points).
void check_against_schema(const OpSchema& schema, const std::vector<TensorDesc>& in) {
  const char* op = schema.name;
  if (in.size() > schema.inputs.size())
    fail(op, "takes at most ", schema.inputs.size(), " inputs, got ", in.size());
  for (size_t i = 0; i < schema.inputs.size(); ++i) {
    const InputSpec& spec = schema.inputs[i];
    const bool present = i < in.size() && in[i].present;
    if (!present) {
      if (!spec.optional) fail(op, "input ", spec.name, " is required");
      continue;
    }
    for (int64_t d : in[i].shape)
      if (d < 0) fail(op, spec.name, " has a negative dimension: ", shape_str(in[i].shape));
  }
  const DType x = in[0].type;
  bool known_x = false;
  for (DType t : schema.x_types) known_x = known_x || t == x;
  if (!known_x) fail(op, "X must be one of the registered types, got ", dtype_name(x));
  for (size_t i = 1; i < in.size(); ++i) {
    const DType want = schema.input_type(i, x);
    if (in[i].present && want != DType::kUndefined && in[i].type != want)
      fail(op, schema.inputs[i].name, " must be ", want == DType::kFloat ? "float32" : dtype_name(want), ", got ",
           dtype_name(in[i].type));
  }
}

void expect_entries(const char* op, const char* what, const TensorDesc& t, int64_t n) {
  if (t.size() != n) fail(op, what, " must have ", n, " entries, got shape ", shape_str(t.shape));
}

// Product of all but the last dimension: the token count, also when the last dimension is 0.
int64_t leading_rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

ActScales read_act_scales(const char* op, const TensorDesc& as) {
  ActScales a;
  a.n = static_cast<int>(as.size());
  const float* v = static_cast<const float*>(as.data);
  for (int i = 0; i < a.n; ++i) {
    a.s[i] = v[i];
    if (!(std::isfinite(a.s[i]) && a.s[i] > 0.f))
      fail(op, "act_scale entries must be finite and > 0, got ", a.s[i], " at index ", i);
  }
  return a;
}

void check_static_act_scale_shape(const char* op, const TensorDesc& as) {
  if (as.size() < 1 || as.size() > kMaxScaleClasses)
    fail(op, "act_scale must be float32 with 1 to 3 entries (text, image, sink), got ", shape_str(as.shape));
}

TokenModality check_modality(const char* op, const TensorDesc& ids, const TensorDesc& split,
                             const std::vector<int64_t>& x_shape, int64_t tokens) {
  TokenModality mo;
  if (ids.present) {
    if (ids.size() != tokens)
      fail(op, "modality_ids ", shape_str(ids.shape), " has ", ids.size(), " entries, X ", shape_str(x_shape),
           " has ", tokens, " tokens");
    mo.ids = static_cast<const int64_t*>(ids.data);
  } else if (split.present) {
    if (split.size() != 1) fail(op, "split must be one int64 (the number of leading image tokens), got ",
                                shape_str(split.shape));
    mo.split = *static_cast<const int64_t*>(split.data);
    if (mo.split < 0) fail(op, "split must be >= 0, got ", mo.split);
    mo.seq_len = x_shape.size() >= 3 ? x_shape[x_shape.size() - 2] : tokens;
  }
  return mo;
}

}  // namespace

QuantLinearAttrs check_quant_linear_attrs(int64_t bits, int64_t dynamic, int64_t group_size, DType x) {
  const char* op = "QuantLinear";
  if (bits != 8 && bits != 4) fail(op, "attribute bits must be 8 or 4, got ", bits);
  if (dynamic != 0 && dynamic != 1) fail(op, "attribute dynamic must be 0 or 1, got ", dynamic);
  if (group_size < 0 || group_size % kWeightGroupAlign != 0)
    fail(op, "attribute group_size must be 0 (per channel) or a positive multiple of ", kWeightGroupAlign, ", got ",
         group_size);
  if (dynamic && x == DType::kInt8)
    fail(op, "dynamic=1 takes each token's scale from its float row, but X is int8 (already quantized, ",
         "e.g. by RMSNormQuant): give float or float16 X");
  return QuantLinearAttrs{static_cast<int>(bits), dynamic == 1, group_size};
}

WeightDims check_quant_linear_weight(const QuantLinearAttrs& attrs, const TensorDesc& w) {
  const char* op = "QuantLinear";
  if (w.shape.size() != 2)
    fail(op, "W must be 2-D [N, K] (bits 8) or [N, K/2] (bits 4), got ", shape_str(w.shape));
  if (attrs.bits == 8 && w.type != DType::kInt8) fail(op, "bits=8 needs an int8 W, got ", dtype_name(w.type));
  if (attrs.bits == 4 && w.type != DType::kUInt8)
    fail(op, "bits=4 needs a uint8 W (two int4 per byte), got ", dtype_name(w.type));
  const WeightDims dims{w.shape[0], attrs.bits == 8 ? w.shape[1] : 2 * w.shape[1]};
  if (attrs.group_size && dims.K % attrs.group_size != 0)
    fail(op, "group_size=", attrs.group_size, " does not divide W's K=", dims.K, " (W ", shape_str(w.shape), ")");
  return dims;
}

QuantLinearCall check_quant_linear_call(const QuantLinearAttrs& attrs, const WeightDims& w,
                                        const std::vector<TensorDesc>& in_given) {
  const char* op = "QuantLinear";
  const OpSchema& schema = quant_linear_schema();
  check_against_schema(schema, in_given);
  std::vector<TensorDesc> in = in_given;
  in.resize(kQlNumInputs);
  const TensorDesc& x = in[kQlX];
  if (x.shape.empty()) fail(op, "X must have rank >= 1");
  QuantLinearCall c;
  c.Kx = x.shape.back();
  c.M = leading_rows(x.shape);
  c.c0 = in[kQlSideRow].present ? 1 : 0;
  c.K = c.Kx - c.c0;
  c.N = w.N;
  if (c.K < 0) fail(op, "side_row takes channel 0 of X, but X ", shape_str(x.shape), " has no channel");
  // bits 4 stores two k per byte: an odd K ends each row with one zero pad nibble, so W holds K + 1.
  if (w.K != c.K && !(attrs.bits == 4 && w.K == c.K + 1 && c.K % 2 == 1))
    fail(op, "X ", shape_str(x.shape), (c.c0 ? " (channel 0 on the side branch)" : ""), " gives K=", c.K,
         " but W holds K=", w.K, (attrs.bits == 4 ? " (bits=4 packs two per byte)" : ""));
  if (attrs.group_size) {
    if (c.K % attrs.group_size != 0)
      fail(op, "group_size=", attrs.group_size, " does not divide K=", c.K, " (X ", shape_str(x.shape),
           (c.c0 ? ", channel 0 on the side branch" : ""), ")");
    c.groups = c.K / attrs.group_size;
    const std::vector<int64_t>& ws = in[kQlWScale].shape;
    if (ws.size() != 2 || ws[0] != c.groups || ws[1] != c.N)
      fail(op, "with group_size=", attrs.group_size, " w_scale must be [K/group_size, N] = [", c.groups, ", ", c.N,
           "], got ", shape_str(ws));
  } else {
    expect_entries(op, "w_scale", in[kQlWScale], c.N);
  }
  const TensorDesc& as = in[kQlActScale];
  if (attrs.dynamic) {
    if (as.size() > 1)
      fail(op, "with dynamic=1 act_scale is not read: give an empty float32 tensor (or a one-entry placeholder), ",
           "got ", shape_str(as.shape));
  } else {
    check_static_act_scale_shape(op, as);
    c.act = read_act_scales(op, as);
  }
  if (in[kQlBias].present) expect_entries(op, "bias", in[kQlBias], c.N);
  if (in[kQlSideRow].present) expect_entries(op, "side_row", in[kQlSideRow], c.N);
  c.modality = check_modality(op, in[kQlModalityIds], in[kQlSplit], x.shape, c.M);
  const TensorDesc& la = in[kQlLowrankA];
  const TensorDesc& lb = in[kQlLowrankB];
  if (la.present || lb.present) {
    if (!la.present || !lb.present) fail(op, "lowrank_a and lowrank_b must be given together");
    if (la.shape.size() != 2 || lb.shape.size() != 2 || la.shape[0] != c.K || lb.shape[1] != c.N ||
        la.shape[1] != lb.shape[0])
      fail(op, "lowrank_a ", shape_str(la.shape), " / lowrank_b ", shape_str(lb.shape), " must be [K, r] / [r, N]",
           " with K=", c.K, ", N=", c.N);
    c.rank = la.shape[1];
  }
  if (x.type == DType::kInt8 && (c.rank || c.c0))
    fail(op, "the low-rank and channel-0 branches need float X, got int8");
  return c;
}

int64_t check_hadamard_matrix(const TensorDesc& h) {
  if (h.type != DType::kFloat || h.shape.size() != 2 || h.shape[0] != h.shape[1] || h.shape[0] < 1)
    fail("Hadamard", "H_m must be a float32 square matrix of size >= 1, got ", dtype_name(h.type), " ",
         shape_str(h.shape));
  return h.shape[0];
}

HadamardCall check_hadamard_call(const std::vector<TensorDesc>& in_given) {
  const char* op = "Hadamard";
  check_against_schema(hadamard_schema(), in_given);
  std::vector<TensorDesc> in = in_given;
  in.resize(kHdNumInputs);
  const TensorDesc& x = in[kHdX];
  if (x.shape.empty()) fail(op, "X must have rank >= 1");
  HadamardCall c;
  c.m = in[kHdMatrix].present ? check_hadamard_matrix(in[kHdMatrix]) : 1;
  c.n = x.shape.back();
  c.rows = leading_rows(x.shape);
  const int64_t L = c.n / c.m;
  if (c.n == 0 || c.n % c.m != 0 || (L & (L - 1)) != 0)
    fail(op, "last dimension ", c.n, " is not m * 2^k for the given H_m of size m=", c.m);
  return c;
}

float check_rmsnorm_quant_epsilon(float epsilon) {
  if (!(std::isfinite(epsilon) && epsilon >= 0.f))
    fail("RMSNormQuant", "attribute epsilon must be finite and >= 0, got ", epsilon);
  return epsilon;
}

RMSNormQuantCall check_rmsnorm_quant_call(const std::vector<TensorDesc>& in_given) {
  const char* op = "RMSNormQuant";
  check_against_schema(rmsnorm_quant_schema(), in_given);
  std::vector<TensorDesc> in = in_given;
  in.resize(kRqNumInputs);
  const TensorDesc& x = in[kRqX];
  if (x.shape.empty()) fail(op, "X must have rank >= 1");
  RMSNormQuantCall c;
  c.K = x.shape.back();
  c.M = leading_rows(x.shape);
  expect_entries(op, "gamma", in[kRqGamma], c.K);
  check_static_act_scale_shape(op, in[kRqActScale]);
  c.act = read_act_scales(op, in[kRqActScale]);
  c.modality = check_modality(op, in[kRqModalityIds], in[kRqSplit], x.shape, c.M);
  return c;
}

}  // namespace mqc

// ---- C entry point: the validators without onnxruntime, for tests of each built library ----------------------
extern "C" {

// One input of a node; rank <= 8. data: the values (read for act_scale and split only; may be null otherwise).
struct mqc_tensor_desc {
  int32_t present;
  int32_t type;  // ONNX element type: 1 float, 2 uint8, 3 int8, 7 int64, 10 float16
  int32_t rank;
  int64_t dims[8];
  const void* data;
};

// Validates one node of `op` as kernel creation then a call would (attributes and W first): 0 when valid, 1 with
// the error message the onnxruntime kernels return (truncated to message_size) when not, 2 for an unknown op.
// bits, dynamic and group_size are QuantLinear's attributes, epsilon RMSNormQuant's; the others ignore them.
__attribute__((visibility("default"))) int mqc_validate_node(const char* op, const mqc_tensor_desc* inputs,
                                                            int32_t n_inputs, int64_t bits, int64_t dynamic,
                                                            int64_t group_size, float epsilon, char* message,
                                                            size_t message_size) {
  std::vector<mqc::TensorDesc> in(static_cast<size_t>(n_inputs > 0 ? n_inputs : 0));
  for (size_t i = 0; i < in.size(); ++i) {
    const mqc_tensor_desc& d = inputs[i];
    in[i].present = d.present != 0;
    in[i].type = static_cast<mqc::DType>(d.type);
    in[i].shape.assign(d.dims, d.dims + (d.rank < 0 ? 0 : (d.rank > 8 ? 8 : d.rank)));
    in[i].data = d.data;
  }
  try {
    const std::string name = op ? op : "";
    if (in.empty() || !in[0].present) mqc::fail(name.c_str(), "input X is required");
    if (name == "QuantLinear") {
      const mqc::QuantLinearAttrs attrs = mqc::check_quant_linear_attrs(bits, dynamic, group_size, in[0].type);
      const mqc::WeightDims w = mqc::check_quant_linear_weight(attrs, in.size() > 1 ? in[1] : mqc::TensorDesc{});
      mqc::check_quant_linear_call(attrs, w, in);
    } else if (name == "Hadamard") {
      mqc::check_hadamard_call(in);
    } else if (name == "RMSNormQuant") {
      mqc::check_rmsnorm_quant_epsilon(epsilon);
      mqc::check_rmsnorm_quant_call(in);
    } else {
      return 2;
    }
  } catch (const mqc::Error& e) {
    if (message && message_size) {
      std::strncpy(message, e.what(), message_size - 1);
      message[message_size - 1] = '\0';
    }
    return 1;
  }
  return 0;
}

}  // extern "C"
