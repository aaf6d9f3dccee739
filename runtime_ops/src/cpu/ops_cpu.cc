// CPU kernels of the ai.mqc ops (QuantLinear, Hadamard, RMSNormQuant), and the shared registration of the domain.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "cpu/gemm.h"
#include "cpu/kernels_cpu.h"
#include "ops.h"

namespace mqc {

namespace {

// Validates W (shared rules) and packs it; used at kernel creation (constant W) and per call (computed W).
PackedWeights pack_checked(const QuantLinearAttrs& attrs, const TensorDesc& w) {
  const WeightDims dims = check_quant_linear_weight(attrs, w);
  return pack_weights(w.data, attrs.bits, dims.N, dims.K, attrs.group_size);
}

// rowsum[m * groups + grp] = sum of row m's int8 codes in group grp (A: [M, Kp] signed codes), rows [m0, m1).
void group_sums(const uint8_t* A, int64_t Kp, int64_t group_size, int64_t groups, int32_t* rowsum, int64_t m0,
                int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* a = reinterpret_cast<const int8_t*>(A + m * Kp);
    for (int64_t grp = 0; grp < groups; ++grp) {
      int32_t sum = 0;
      for (int64_t k = grp * group_size; k < (grp + 1) * group_size; ++k) sum += a[k];
      rowsum[m * groups + grp] = sum;
    }
  }
}

// Y[m, :] = bias (or 0): a GEMM with an empty reduction (K = 0) contributes nothing else.
template <typename Tout>
void fill_with_bias(void* Y, int64_t M, int64_t N, const float* bias) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float v = bias ? bias[n] : 0.f;
      if constexpr (std::is_same<Tout, Ort::Float16_t>::value)
        static_cast<uint16_t*>(Y)[m * N + n] = float_to_half(v);
      else
        static_cast<float*>(Y)[m * N + n] = v;
    }
}

template <typename Tin, typename Tout>
struct QuantLinearKernel {
  static constexpr DType kXType = dtype_of<Tin>();
  QuantLinearAttrs attrs;
  std::shared_ptr<PackedWeights> packed;  // from a constant W at creation, else packed on each call

  QuantLinearKernel(const OrtApi&, const OrtKernelInfo* info) {
    attrs = check_quant_linear_attrs(attr_int(info, "QuantLinear", "bits", 8),
                                     attr_int(info, "QuantLinear", "dynamic", 0),
                                     attr_int(info, "QuantLinear", "group_size", 0), kXType);
    Ort::ConstValue w = constant_input(info, kQlW);
    if (present(w)) packed = std::make_shared<PackedWeights>(pack_checked(attrs, describe(w)));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const std::vector<TensorDesc> in = describe_inputs(ctx, quant_linear_schema());
    std::shared_ptr<PackedWeights> W = packed;
    if (!W) W = std::make_shared<PackedWeights>(pack_checked(attrs, in[kQlW]));
    const QuantLinearCall call = check_quant_linear_call(attrs, WeightDims{W->N, W->K}, in);
    const TensorDesc& x = in[kQlX];
    const float* bias = static_cast<const float*>(in[kQlBias].data);
    std::vector<int64_t> y_shape = x.shape;
    y_shape.back() = call.N;
    Ort::UnownedValue yv = ctx.GetOutput(0, y_shape);
    if (call.M == 0 || call.N == 0) return;
    void* Y = yv.GetTensorMutableRawData();
    if (call.K == 0)
      fill_with_bias<Tout>(Y, call.M, call.N, bias);
    else
      quantized_product(ctx, call, *W, x, static_cast<const float*>(in[kQlWScale].data), bias, Y);
    if (call.rank || call.c0)
      add_branches(ctx, call, x, static_cast<const float*>(in[kQlLowrankA].data),
                   static_cast<const float*>(in[kQlLowrankB].data), static_cast<const float*>(in[kQlSideRow].data), Y);
  }

  // Y = (quantized X) @ W^T * (s_tok * w_scale) + bias, for K >= 1; per-group weights:
  // Y = s_tok * sum_g (int32 dot of group g) * w_scale[g, n] + bias.
  void quantized_product(Ort::KernelContext& ctx, const QuantLinearCall& call, const PackedWeights& Wp,
                         const TensorDesc& x, const float* w_scale, const float* bias, void* Y) const {
    const int bits = attrs.bits;
    const bool dynamic = attrs.dynamic;
    const int64_t M = call.M, Kx = call.Kx, c0 = call.c0, K = call.K, N = call.N;
    const PackedWeights* W = &Wp;
    const ModalitySelector sel = call.modality.host_selector();
    std::vector<float> row_scale(M);  // dynamic: filled per row block by the quantization stage
    if (!dynamic)
      for (int64_t m = 0; m < M; ++m) row_scale[m] = call.act.of(sel.of(m));

    const CpuKernels& kern = cpu_kernels();
    const int64_t Kp = W->Kp;
    // W4 prefill where the kernels ask for it (VNNI, portable): each task unpacks its weight tile to int8 once and
    // runs the W8 kernel (the VNNI nibble kernel unpacks in registers for every 5 rows, which costs more than it
    // saves once the weights sit in cache).
    const bool w4_unpacked = bits == 4 && M >= 16 && kern.w4_prefill_unpacks;
    const bool offset128 = bits == 8 || w4_unpacked;
    std::vector<uint8_t> A(static_cast<size_t>(M * Kp));
    const bool grouped = W->group_size != 0;
    // W4 on nibbles subtracts 8 * sum(x): per row, or per row and group ([M][groups]) for per-group weights.
    std::vector<int32_t> rowsum(bits == 4 && !w4_unpacked ? M * W->groups : 0);
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
                    rowsum.empty() || grouped ? nullptr : rowsum.data(), m0, m1);
      if (grouped && !rowsum.empty()) group_sums(A.data(), Kp, W->group_size, W->groups, rowsum.data(), m0, m1);
    });

    GemmArgs g;
    g.A = A.data();
    g.lda = Kp;
    g.rowsum = rowsum.empty() ? nullptr : rowsum.data();
    g.W = W;
    g.row_scale = row_scale.data();
    g.w_scale = w_scale;
    g.ldws = N;
    g.bias = bias;
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
      tile_w.group_size = W->group_size;
      tile_w.groups = W->groups;
      tile_w.data.resize(static_cast<size_t>(tile_w.panels * tile_w.panel_bytes + 64));
      kern.unpack_w4(*W, p0, p1, const_cast<uint8_t*>(tile_w.aligned()));
      tile_w.colcorr.clear();  // [groups][this tile's columns]
      for (int64_t grp = 0; grp < W->groups; ++grp)
        tile_w.colcorr.insert(tile_w.colcorr.end(), W->group_colcorr(grp) + p0 * 16, W->group_colcorr(grp) + p1 * 16);
      GemmArgs gt = g;
      gt.W = &tile_w;
      gt.N = N - p0 * 16;
      gt.Y = static_cast<char*>(Y) + p0 * 16 * y_elem;
      gt.w_scale = g.w_scale + p0 * 16;
      gt.bias = g.bias ? g.bias + p0 * 16 : nullptr;
      kern.gemm_w8(gt, m0, m1, 0, p1 - p0);
    });
  }

  // Y += [image token, or no modality input] (X[..., c0:] @ L1) @ L2 + X[..., 0] * srow.
  void add_branches(Ort::KernelContext& ctx, const QuantLinearCall& call, const TensorDesc& x, const float* L1,
                    const float* L2, const float* srow, void* Y) const {
    const int64_t M = call.M, Kx = call.Kx, c0 = call.c0, K = call.K, N = call.N, rank = call.rank;
    const ModalitySelector sel = call.modality.host_selector();
    const bool y_half = std::is_same<Tout, Ort::Float16_t>::value;
    parallel_for(ctx, static_cast<size_t>((M + 7) / 8), [&](size_t b) {
      std::vector<float> xr(Kx), t(rank), y(N);
      for (int64_t m = b * 8; m < std::min(M, int64_t(b * 8 + 8)); ++m) {
        for (int64_t k = 0; k < Kx; ++k) {
          if constexpr (std::is_same<Tin, float>::value)
            xr[k] = static_cast<const float*>(x.data)[m * Kx + k];
          else
            xr[k] = half_to_float(static_cast<const uint16_t*>(x.data)[m * Kx + k]);
        }
        const bool lowrank_here = rank && (!sel.active() || sel.of(m) == kImageClass);
        if (!lowrank_here && !srow) continue;
        for (int64_t n = 0; n < N; ++n) {
          y[n] = y_half ? half_to_float(static_cast<uint16_t*>(Y)[m * N + n]) : static_cast<float*>(Y)[m * N + n];
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
          if (y_half)
            static_cast<uint16_t*>(Y)[m * N + n] = float_to_half(y[n]);
          else
            static_cast<float*>(Y)[m * N + n] = y[n];
        }
      }
    });
  }
};

// ---- Hadamard ----------------------------------------------------------------------------------------------
template <typename T>
struct HadamardKernel {
  static constexpr DType kXType = dtype_of<T>();
  std::vector<float> H;  // [m, m] from a constant input, else read per call

  HadamardKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstValue h = constant_input(info, kHdMatrix);
    if (!present(h)) return;
    const TensorDesc hd = describe(h);
    const int64_t m = check_hadamard_matrix(hd);
    H.assign(static_cast<const float*>(hd.data), static_cast<const float*>(hd.data) + m * m);
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const std::vector<TensorDesc> in = describe_inputs(ctx, hadamard_schema());
    const HadamardCall call = check_hadamard_call(in);
    const TensorDesc& x = in[kHdX];
    const float* Hm = !in[kHdMatrix].present ? nullptr : (H.empty() ? static_cast<const float*>(in[kHdMatrix].data) : H.data());
    Ort::UnownedValue yv = ctx.GetOutput(0, x.shape);
    void* Y = yv.GetTensorMutableRawData();
    const bool half = std::is_same<T, Ort::Float16_t>::value;
    const int64_t n = call.n, rows = call.rows, m = call.m;
    const int64_t block = std::max<int64_t>(1, 16384 / n);
    parallel_for(ctx, static_cast<size_t>((rows + block - 1) / block), [&](size_t b) {
      std::vector<float> buf(2 * n);
      for (int64_t r = b * block; r < std::min(rows, int64_t(b + 1) * block); ++r)
        hadamard_row(x.data, Y, half, r, n, m, Hm, buf.data());
    });
  }
};

// ---- RMSNormQuant ------------------------------------------------------------------------------------------
template <typename T>
struct RMSNormQuantKernel {
  static constexpr DType kXType = dtype_of<T>();
  float epsilon = 1e-6f;
  RMSNormQuantKernel(const OrtApi&, const OrtKernelInfo* info) {
    epsilon = check_rmsnorm_quant_epsilon(attr_float(info, "RMSNormQuant", "epsilon", 1e-6f));
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { MQC_GUARD(compute(context)); }
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const std::vector<TensorDesc> in = describe_inputs(ctx, rmsnorm_quant_schema());
    const RMSNormQuantCall call = check_rmsnorm_quant_call(in);
    const TensorDesc& x = in[kRqX];
    const int64_t M = call.M, K = call.K;
    const ModalitySelector sel = call.modality.host_selector();
    const float* gamma = static_cast<const float*>(in[kRqGamma].data);
    Ort::UnownedValue yv = ctx.GetOutput(0, x.shape);
    if (M == 0 || K == 0) return;
    int8_t* Y = yv.GetTensorMutableData<int8_t>();
    const bool half = std::is_same<T, Ort::Float16_t>::value;
    const int64_t block = std::max<int64_t>(1, 16384 / K);
    parallel_for(ctx, static_cast<size_t>((M + block - 1) / block), [&](size_t b) {
      for (int64_t r = b * block; r < std::min(M, int64_t(b + 1) * block); ++r)
        rmsnorm_quant_row(x.data, half, r, K, gamma, call.act.of(sel.of(r)), epsilon, Y + r * K);
    });
  }
};

}  // namespace

void add_cpu_ops(Ort::CustomOpDomain& domain) {
  const char* cpu = "CPUExecutionProvider";
  static SchemaOp<QuantLinearKernel<float, float>> ql_f32(quant_linear_schema(), cpu);
  static SchemaOp<QuantLinearKernel<Ort::Float16_t, Ort::Float16_t>> ql_f16(quant_linear_schema(), cpu);
  static SchemaOp<QuantLinearKernel<int8_t, float>> ql_i8(quant_linear_schema(), cpu);
  static SchemaOp<HadamardKernel<float>> had_f32(hadamard_schema(), cpu);
  static SchemaOp<HadamardKernel<Ort::Float16_t>> had_f16(hadamard_schema(), cpu);
  static SchemaOp<RMSNormQuantKernel<float>> rq_f32(rmsnorm_quant_schema(), cpu);
  static SchemaOp<RMSNormQuantKernel<Ort::Float16_t>> rq_f16(rmsnorm_quant_schema(), cpu);
  for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{&ql_f32, &ql_f16, &ql_i8, &had_f32, &had_f16, &rq_f32,
                                                             &rq_f16})
    domain.Add(op);
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
