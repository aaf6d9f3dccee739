// CPU kernels of ai.mqc::QuantLinear, and the shared registration of the domain.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "cpu/gemm.h"
#include "cpu/kernels_cpu.h"
#include "ops.h"

namespace mqc {

ModalitySelector modality_from_inputs_shapes(const char* op, const TensorView& ids, const TensorView& split,
                                             const std::vector<int64_t>& x_shape, int64_t tokens) {
  ModalitySelector sel;
  if (ids.data) {
    if (ids.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) fail(op, "modality_ids must be int64");
    if (ids.size() != tokens)
      fail(op, "modality_ids ", shape_str(ids.shape), " has ", ids.size(), " entries, X ", shape_str(x_shape),
           " has ", tokens, " tokens");
    sel.ids = static_cast<const int64_t*>(ids.data);
  } else if (split.data) {
    if (split.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || split.size() != 1)
      fail(op, "split must be one int64 (the number of leading image tokens)");
    sel.split = 0;  // present; the value is read by the caller (it may live on the device)
    sel.seq_len = x_shape.size() >= 3 ? x_shape[x_shape.size() - 2] : tokens;
  }
  return sel;
}

ModalitySelector modality_from_inputs(const char* op, const TensorView& ids, const TensorView& split,
                                      const std::vector<int64_t>& x_shape, int64_t tokens) {
  ModalitySelector sel = modality_from_inputs_shapes(op, ids, split, x_shape, tokens);
  if (sel.split >= 0) {
    sel.split = *static_cast<const int64_t*>(split.data);
    if (sel.split < 0) fail(op, "split must be >= 0, got ", sel.split);
  }
  return sel;
}

bool quant_linear_dynamic_attr(const OrtKernelInfo* info, bool int8_x) {
  const int64_t dynamic = attr_int(info, "dynamic", 0);
  if (dynamic != 0 && dynamic != 1) fail("QuantLinear", "attribute dynamic must be 0 or 1, got ", dynamic);
  if (dynamic && int8_x)
    fail("QuantLinear", "dynamic=1 takes each token's scale from its float row, but X is int8 (already quantized, ",
         "e.g. by RMSNormQuant): give float or float16 X");
  return dynamic == 1;
}

void check_act_scale_shape(const char* op, const TensorView& as, bool dynamic) {
  if (as.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail(op, "act_scale must be float32, got ", type_name(as.type));
  if (dynamic && as.size() > 1)
    fail(op, "with dynamic=1 act_scale is not read: give an empty float32 tensor (or a one-entry placeholder), got ",
         shape_str(as.shape));
  if (!dynamic && as.size() != 1 && as.size() != 2)
    fail(op, "act_scale must be float32 with 1 or 2 entries (text, image), got ", shape_str(as.shape));
}

namespace {

void expect_float_vector(const char* op, const char* what, const TensorView& t, int64_t n) {
  if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail(op, what, " must be float32, got ", type_name(t.type));
  if (t.size() != n) fail(op, what, " must have ", n, " entries, got shape ", shape_str(t.shape));
}

// Validates W against bits and packs it; shared by kernel creation (constant W) and compute (computed W).
PackedWeights pack_checked(const TensorView& w, int bits) {
  if (w.shape.size() != 2) fail("QuantLinear", "W must be 2-D [N, K] (bits 8) or [N, K/2] (bits 4), got ", shape_str(w.shape));
  const int64_t N = w.shape[0];
  if (bits == 8) {
    if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) fail("QuantLinear", "bits=8 needs an int8 W, got ", type_name(w.type));
    return pack_weights(w.data, 8, N, w.shape[1]);
  }
  if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    fail("QuantLinear", "bits=4 needs a uint8 W (two int4 per byte), got ", type_name(w.type));
  return pack_weights(w.data, 4, N, 2 * w.shape[1]);
}

template <typename Tin, typename Tout>
struct QuantLinearKernel {
  int bits = 8;
  bool dynamic = false;                   // per-token scale from the row's absmax; act_scale ignored
  std::shared_ptr<PackedWeights> packed;  // from a constant W at creation, else packed on each call

  QuantLinearKernel(const OrtApi&, const OrtKernelInfo* info) {
    bits = static_cast<int>(attr_int(info, "bits", 8));
    if (bits != 8 && bits != 4) fail("QuantLinear", "attribute bits must be 8 or 4, got ", bits);
    dynamic = quant_linear_dynamic_attr(info, std::is_same<Tin, int8_t>::value);
    Ort::ConstValue w = constant_input(info, kQlW);
    if (present(w)) packed = std::make_shared<PackedWeights>(pack_checked(view(w), bits));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const char* op = "QuantLinear";
    TensorView x = view(ctx.GetInput(kQlX));
    if (x.shape.empty()) fail(op, "X must have rank >= 1");
    const int64_t Kx = x.shape.back();
    const int64_t M = Kx ? x.size() / Kx : 0;
    TensorView side = view(optional_input(ctx, kQlSideRow));
    const int64_t c0 = side.data ? 1 : 0;
    const int64_t K = Kx - c0;

    std::shared_ptr<PackedWeights> W = packed;
    if (!W) W = std::make_shared<PackedWeights>(pack_checked(view(ctx.GetInput(kQlW)), bits));
    const int64_t N = W->N;
    if (W->K != K && !(bits == 4 && W->K == K + 1 && K % 2 == 1))
      fail(op, "X ", shape_str(x.shape), (c0 ? " (channel 0 on the side branch)" : ""), " gives K=", K,
           " but W holds K=", W->K, (bits == 4 ? " (bits=4 packs two per byte)" : ""));

    TensorView ws = view(ctx.GetInput(kQlWScale));
    expect_float_vector(op, "w_scale", ws, N);
    TensorView as = view(ctx.GetInput(kQlActScale));
    check_act_scale_shape(op, as, dynamic);
    const float* act = static_cast<const float*>(as.data);
    for (int64_t i = 0; !dynamic && i < as.size(); ++i)
      if (!(act[i] > 0.f)) fail(op, "act_scale entries must be > 0, got ", act[i]);
    TensorView bias = view(optional_input(ctx, kQlBias));
    if (bias.data) expect_float_vector(op, "bias", bias, N);
    if (side.data) expect_float_vector(op, "side_row", side, N);
    ModalitySelector sel = modality_from_inputs(op, view(optional_input(ctx, kQlModalityIds)),
                                                view(optional_input(ctx, kQlSplit)), x.shape, M);
    TensorView la = view(optional_input(ctx, kQlLowrankA)), lb = view(optional_input(ctx, kQlLowrankB));
    int64_t rank = 0;
    if (la.data || lb.data) {
      if (!la.data || !lb.data) fail(op, "lowrank_a and lowrank_b must be given together");
      if (la.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || lb.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        fail(op, "lowrank_a / lowrank_b must be float32");
      if (la.shape.size() != 2 || lb.shape.size() != 2 || la.shape[0] != K || lb.shape[1] != N ||
          la.shape[1] != lb.shape[0])
        fail(op, "lowrank_a ", shape_str(la.shape), " / lowrank_b ", shape_str(lb.shape), " must be [K, r] / [r, N]",
             " with K=", K, ", N=", N);
      rank = la.shape[1];
    }
    if (std::is_same<Tin, int8_t>::value && (rank || side.data))
      fail(op, "the low-rank and channel-0 branches need float X, got int8");

    std::vector<int64_t> y_shape = x.shape;
    y_shape.back() = N;
    Ort::UnownedValue yv = ctx.GetOutput(0, y_shape);
    if (M == 0 || N == 0) return;
    void* Y = yv.GetTensorMutableRawData();

    std::vector<float> row_scale(M);  // dynamic: filled per row block by the quantization stage
    if (!dynamic)
      for (int64_t m = 0; m < M; ++m) row_scale[m] = act[as.size() == 2 ? sel.of(m) : 0];

    const CpuKernels& kern = cpu_kernels();
    const int64_t Kp = W->Kp;
    // W4 prefill: each task unpacks its weight tile to int8 once and runs the W8 kernel (the nibble kernel
    // unpacks in registers for every 5 rows, which costs more than it saves once the weights sit in cache).
    const bool w4_unpacked = bits == 4 && M >= 16;
    const bool offset128 = bits == 8 || w4_unpacked;
    std::vector<uint8_t> A(static_cast<size_t>(M * Kp));
    std::vector<int32_t> rowsum(bits == 4 && !w4_unpacked ? M : 0);
    const int src_kind = std::is_same<Tin, float>::value ? 0 : (std::is_same<Tin, int8_t>::value ? 2 : 1);
    // Below about 128K multiply-adds (a decode step of a k/v projection) the thread-pool hand-off costs more
    // than it saves: run on the calling thread.
    static const int64_t serial_macs = [] {
      const char* v = std::getenv("MQC_CPU_SERIAL_MACS");  // tuning knob, read once
      return v ? std::atoll(v) : (int64_t{1} << 17);
    }();
    const bool serial = M * K * N < serial_macs;
    auto run = [&](size_t total, auto&& fn) {
      if (serial) {
        for (size_t i = 0; i < total; ++i) fn(i);
      } else {
        parallel_for(ctx, total, fn);
      }
    };
    const int64_t qblock = 16;
    run(static_cast<size_t>((M + qblock - 1) / qblock), [&](size_t b) {
      const int64_t m0 = b * qblock, m1 = std::min(M, m0 + qblock);
      if (dynamic) kern.dynamic_scales(x.data, src_kind, Kx, c0, K, row_scale.data(), m0, m1);
      kern.quantize(x.data, src_kind, Kx, c0, K, Kp, row_scale.data(), offset128, A.data(),
                    rowsum.empty() ? nullptr : rowsum.data(), m0, m1);
    });

    GemmArgs g;
    g.A = A.data();
    g.lda = Kp;
    g.rowsum = rowsum.empty() ? nullptr : rowsum.data();
    g.W = W.get();
    g.row_scale = row_scale.data();
    g.w_scale = static_cast<const float*>(ws.data);
    g.bias = static_cast<const float*>(bias.data);
    g.Y = Y;
    g.ldy = N;
    g.y_half = std::is_same<Tout, Ort::Float16_t>::value;
    g.M = M;
    g.N = N;
    // Row blocks of 48 keep a block of A in L2 next to a 64-column weight tile (the unpacked-W4 path unpacks a
    // tile once per row block: 2 vector ops per 128 weight bytes, small next to 48 rows of multiply-adds).
    const int64_t mb = M <= 48 ? M : 48;
    const int64_t mblocks = (M + mb - 1) / mb;
    int64_t ppt = 4;  // panels (16 columns) per task
    while (ppt > 1 && ((W->panels + ppt - 1) / ppt) * mblocks < 16) ppt /= 2;
    const int64_t tiles = (W->panels + ppt - 1) / ppt;
    GemmTileFn fn = bits == 8 ? kern.gemm_w8 : kern.gemm_w4;
    const size_t y_elem = g.y_half ? 2 : 4;
    run(static_cast<size_t>(tiles * mblocks), [&](size_t t) {
      const int64_t tile = t / mblocks, mblk = t % mblocks;
      const int64_t p0 = tile * ppt, p1 = std::min(W->panels, p0 + ppt);
      const int64_t m0 = mblk * mb, m1 = std::min(M, (mblk + 1) * mb);
      if (!w4_unpacked) {
        fn(g, m0, m1, p0, p1);
        return;
      }
      thread_local PackedWeights tile_w;  // this tile of W4 as W8 panels, reused across calls
      tile_w.bits = 8;
      tile_w.K = W->K;
      tile_w.Kp = Kp;
      tile_w.panels = p1 - p0;
      tile_w.panel_bytes = Kp * 16;
      tile_w.N = std::min<int64_t>(N - p0 * 16, tile_w.panels * 16);
      tile_w.data.resize(static_cast<size_t>(tile_w.panels * tile_w.panel_bytes + 64));
      kern.unpack_w4(*W, p0, p1, const_cast<uint8_t*>(tile_w.aligned()));
      tile_w.colcorr.assign(W->colcorr.begin() + p0 * 16, W->colcorr.begin() + p1 * 16);
      GemmArgs gt = g;
      gt.W = &tile_w;
      gt.N = N - p0 * 16;
      gt.Y = static_cast<char*>(Y) + p0 * 16 * y_elem;
      gt.w_scale = g.w_scale + p0 * 16;
      gt.bias = g.bias ? g.bias + p0 * 16 : nullptr;
      kern.gemm_w8(gt, m0, m1, 0, p1 - p0);
    });

    if (rank || side.data) {
      const float* L1 = static_cast<const float*>(la.data);
      const float* L2 = static_cast<const float*>(lb.data);
      const float* srow = static_cast<const float*>(side.data);
      parallel_for(ctx, static_cast<size_t>((M + 7) / 8), [&](size_t b) {
        std::vector<float> xr(Kx), t(rank), y(N);
        for (int64_t m = b * 8; m < std::min(M, int64_t(b * 8 + 8)); ++m) {
          for (int64_t k = 0; k < Kx; ++k) {
            if constexpr (std::is_same<Tin, float>::value)
              xr[k] = static_cast<const float*>(x.data)[m * Kx + k];
            else
              xr[k] = half_to_float(static_cast<const uint16_t*>(x.data)[m * Kx + k]);
          }
          const bool lowrank_here = rank && (!sel.active() || sel.of(m) != 0);
          if (!lowrank_here && !srow) continue;
          for (int64_t n = 0; n < N; ++n) {
            y[n] = g.y_half ? half_to_float(static_cast<uint16_t*>(Y)[m * N + n]) : static_cast<float*>(Y)[m * N + n];
          }
          if (lowrank_here) {
            std::fill(t.begin(), t.end(), 0.f);
            for (int64_t k = 0; k < K; ++k) {
              const float xv = xr[c0 + k];
              for (int64_t r = 0; r < rank; ++r) t[r] += xv * L1[k * rank + r];
            }
            for (int64_t r = 0; r < rank; ++r)
              for (int64_t n = 0; n < N; ++n) y[n] += t[r] * L2[r * N + n];
          }
          if (srow)
            for (int64_t n = 0; n < N; ++n) y[n] += xr[0] * srow[n];
          for (int64_t n = 0; n < N; ++n) {
            if (g.y_half)
              static_cast<uint16_t*>(Y)[m * N + n] = float_to_half(y[n]);
            else
              static_cast<float*>(Y)[m * N + n] = y[n];
          }
        }
      });
    }
  }
};

template <typename Tin, typename Tout>
struct QuantLinearOp : Ort::CustomOpBase<QuantLinearOp<Tin, Tout>, QuantLinearKernel<Tin, Tout>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new QuantLinearKernel<Tin, Tout>(api, info));
  }
  const char* GetName() const { return "QuantLinear"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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

// ---- Hadamard ----------------------------------------------------------------------------------------------
template <typename T>
struct HadamardKernel {
  std::vector<float> H;  // [m, m] from a constant input, else read per call
  int64_t m = 0;

  HadamardKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstValue h = constant_input(info, 1);
    if (present(h)) load(view(h));
  }
  void load(const TensorView& h) {
    if (h.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || h.shape.size() != 2 || h.shape[0] != h.shape[1])
      fail("Hadamard", "H_m must be a float32 square matrix, got ", type_name(h.type), " ", shape_str(h.shape));
    m = h.shape[0];
    H.assign(static_cast<const float*>(h.data), static_cast<const float*>(h.data) + m * m);
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    TensorView x = view(ctx.GetInput(0));
    std::vector<float> Hcall;
    const float* Hm = H.empty() ? nullptr : H.data();
    int64_t mm = m;
    TensorView h = view(optional_input(ctx, 1));
    if (!Hm && h.data) {
      HadamardKernel tmp = *this;
      tmp.load(h);
      Hcall = tmp.H;
      Hm = Hcall.data();
      mm = tmp.m;
    }
    if (!Hm) mm = 1;
    if (x.shape.empty()) fail("Hadamard", "X must have rank >= 1");
    const int64_t n = x.shape.back();
    const int64_t L = mm ? n / mm : 0;
    if (n == 0 || n % mm != 0 || (L & (L - 1)) != 0)
      fail("Hadamard", "last dimension ", n, " is not m * 2^k for the given H_m of size m=", mm);
    Ort::UnownedValue yv = ctx.GetOutput(0, x.shape);
    const int64_t rows = x.size() / n;
    void* Y = yv.GetTensorMutableRawData();
    const bool half = std::is_same<T, Ort::Float16_t>::value;
    const int64_t block = std::max<int64_t>(1, 16384 / n);
    parallel_for(ctx, static_cast<size_t>((rows + block - 1) / block), [&](size_t b) {
      std::vector<float> buf(2 * n);
      for (int64_t r = b * block; r < std::min(rows, int64_t(b + 1) * block); ++r)
        hadamard_row(x.data, Y, half, r, n, mm, Hm, buf.data());
    });
  }
};

template <typename T>
struct HadamardOp : Ort::CustomOpBase<HadamardOp<T>, HadamardKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new HadamardKernel<T>(api, info));
  }
  const char* GetName() const { return "Hadamard"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 ? onnx_type<T>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<T>(); }
};

// ---- RMSNormQuant ------------------------------------------------------------------------------------------
template <typename T>
struct RMSNormQuantKernel {
  float epsilon = 1e-6f;
  RMSNormQuantKernel(const OrtApi&, const OrtKernelInfo* info) { epsilon = attr_float(info, "epsilon", 1e-6f); }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    const char* op = "RMSNormQuant";
    Ort::KernelContext ctx(context);
    TensorView x = view(ctx.GetInput(0));
    if (x.shape.empty()) fail(op, "X must have rank >= 1");
    const int64_t K = x.shape.back();
    const int64_t M = K ? x.size() / K : 0;
    TensorView gamma = view(ctx.GetInput(1));
    expect_float_vector(op, "gamma", gamma, K);
    TensorView as = view(ctx.GetInput(2));
    if (as.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || (as.size() != 1 && as.size() != 2))
      fail(op, "act_scale must be float32 with 1 or 2 entries (text, image), got ", shape_str(as.shape));
    const float* act = static_cast<const float*>(as.data);
    ModalitySelector sel = modality_from_inputs(op, view(optional_input(ctx, 3)), view(optional_input(ctx, 4)),
                                                x.shape, M);
    Ort::UnownedValue yv = ctx.GetOutput(0, x.shape);
    int8_t* Y = yv.GetTensorMutableData<int8_t>();
    const bool half = std::is_same<T, Ort::Float16_t>::value;
    const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
    parallel_for(ctx, static_cast<size_t>((M + block - 1) / block), [&](size_t b) {
      for (int64_t r = b * block; r < std::min(M, int64_t(b + 1) * block); ++r)
        rmsnorm_quant_row(x.data, half, r, K, static_cast<const float*>(gamma.data),
                          act[as.size() == 2 ? sel.of(r) : 0], epsilon, Y + r * K);
    });
  }
};

template <typename T>
struct RMSNormQuantOp : Ort::CustomOpBase<RMSNormQuantOp<T>, RMSNormQuantKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    MQC_GUARD(*kernel = new RMSNormQuantKernel<T>(api, info));
  }
  const char* GetName() const { return "RMSNormQuant"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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

void add_cpu_ops(Ort::CustomOpDomain& domain) {
  static QuantLinearOp<float, float> ql_f32;
  static QuantLinearOp<Ort::Float16_t, Ort::Float16_t> ql_f16;
  static QuantLinearOp<int8_t, float> ql_i8;
  static HadamardOp<float> had_f32;
  static HadamardOp<Ort::Float16_t> had_f16;
  static RMSNormQuantOp<float> rq_f32;
  static RMSNormQuantOp<Ort::Float16_t> rq_f16;
  domain.Add(&ql_f32);
  domain.Add(&ql_f16);
  domain.Add(&ql_i8);
  domain.Add(&had_f32);
  domain.Add(&had_f16);
  domain.Add(&rq_f32);
  domain.Add(&rq_f16);
}

namespace {
const OrtApi* any_api(const OrtApiBase* base) {
  for (uint32_t v = ORT_API_VERSION; v >= 1; --v)
    if (const OrtApi* api = base->GetApi(v)) return api;
  return nullptr;
}
}  // namespace

OrtStatus* register_domain(OrtSessionOptions* options, const OrtApiBase* api_base, void (*add_more)(Ort::CustomOpDomain&)) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* older = any_api(api_base);
    std::string msg = std::string("mqc runtime ops need onnxruntime >= 1.") + std::to_string(ORT_API_VERSION) +
                      " (C API version " + std::to_string(ORT_API_VERSION) + "), this runtime is " +
                      api_base->GetVersionString();
    return older ? older->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  static std::mutex mu;
  static std::vector<std::unique_ptr<Ort::CustomOpDomain>> keep;  // domains must outlive the sessions
  std::lock_guard<std::mutex> lock(mu);
  MQC_GUARD({
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    add_cpu_ops(*domain);
    if (add_more) add_more(*domain);
    Ort::UnownedSessionOptions(options).Add(*domain);
    keep.push_back(std::move(domain));
  })
}

}  // namespace mqc
