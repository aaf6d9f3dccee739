// Shared helpers of the ai.mqc runtime ops: errors, half floats, modality selection, packed-weight layout.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mqc {

constexpr const char* kDomain = "ai.mqc";
constexpr int kOpsetVersion = 1;

// Errors are thrown as mqc::Error inside kernels and turned into an OrtStatus at the C boundary.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] inline void fail(const char* op, Args&&... args) {
  std::ostringstream s;
  s << "ai.mqc::" << op << ": ";
  (s << ... << args);
  throw Error(s.str());
}

// ---- IEEE half <-> float (round to nearest even), portable; the ISA-specific kernels use F16C. -------------
inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
  if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to inf
  if (absx < 0x38800000u) {                                        // result is subnormal or zero
    if (absx < 0x33000001u) return (uint16_t)sign;
    uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx + 0xC8000FFFu + ((absx >> 13) & 1u);  // rebias exponent and round to nearest even
  return (uint16_t)(sign | (r >> 13));
}

// Round half to even then clip to int8, exactly like ONNX QuantizeLinear for a zero point of 0.
inline int8_t quantize_rne(float v) {
  float r = std::nearbyint(v);  // default FP environment rounds half to even
  r = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
  return (int8_t)(int)r;
}

// ---- Dynamic per-token scale (QuantLinear dynamic=1) -------------------------------------------------------
// The graph's per-token quantizer (passes/cmc.py, insert_activation_dynamic) takes
// scale = Max(Div(ReduceMax(Abs(x)), 127), 1e-12) in fp32; the op repeats it (division first, then the floor, no
// reciprocal) so its int8 codes equal the graph's.
constexpr float kDynamicQmax = 127.f;
constexpr float kDynamicMinScale = 1e-12f;  // mqc.quantizer.MIN_SCALE: an all-zero row keeps scale > 0, codes 0

inline float dynamic_scale(float absmax) {
  const float s = absmax / kDynamicQmax;
  return s < kDynamicMinScale ? kDynamicMinScale : s;
}

// ---- Scale class selection ---------------------------------------------------------------------------------
// A token's class picks its static activation scale: 0 text, 1 image, 2 sink (passes/sink_scales.py's third
// class: the attention-sink rows, e.g. position 0). modality_ids entries 1 and 2 name those classes, anything else
// is text; the split-index form knows image only (positions below the split). Without either, every token is text.
// A class beyond the op's scales falls back to index 0 (ActScales::of), so a two-scale op reads id 2 as text.
constexpr int kTextClass = 0;
constexpr int kImageClass = 1;
constexpr int kSinkClass = 2;
constexpr int kMaxScaleClasses = 3;

struct ModalitySelector {
  const int64_t* ids = nullptr;  // one per token, or null
  int64_t split = -1;            // image tokens are positions [0, split) of each sequence; -1: unused
  int64_t seq_len = 1;           // S of X [B, S, K] (for the split form)
  inline int of(int64_t token) const {
    if (ids) {
      const int64_t id = ids[token];
      return id == kImageClass || id == kSinkClass ? static_cast<int>(id) : kTextClass;
    }
    if (split >= 0) return (token % seq_len) < split ? kImageClass : kTextClass;
    return kTextClass;
  }
  bool active() const { return ids != nullptr || split >= 0; }
};

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

inline int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

// ---- Packed weights (CPU) --------------------------------------------------------------------------------
// Columns are grouped in panels of 16 (one 512-bit vector of int32 accumulators); inside a panel, k runs in
// groups of 4 bytes per column, the operand layout of VPDPBUSD:
//   W8: byte[((panel * G + g) * 16 + j) * 4 + t] = W[16 * panel + j][4 * g + t]          (int8), G = Kp / 4
//   W4: byte[((panel * G2 + h) * 16 + j) * 4 + t] = (W[.][8h + t] + 8) | (W[.][8h + 4 + t] + 8) << 4, G2 = Kp / 8
// W4 keeps the unsigned nibble w + 8, so the dot product with signed activations is sum((w + 8) x) and the
// kernel subtracts 8 * sum(x). W8 uses unsigned activations x + 128 and subtracts 128 * colsum(W) (colcorr).
// Per-group weights (group_size > 0) keep this layout; the corrections are then per group: colcorr holds one row
// of panels * 16 sums per group, and W4 subtracts 8 * the group's sum of x.
struct PackedWeights {
  int bits = 8;
  int64_t N = 0, K = 0;   // logical shape of W [N, K]
  int64_t Kp = 0;         // K padded to 4 (W8) or 8 (W4)
  int64_t panels = 0;     // ceil(N / 16)
  int64_t panel_bytes = 0;
  int64_t group_size = 0;  // 0: per channel (one group of K)
  int64_t groups = 1;      // K / group_size, or 1
  std::vector<uint8_t> data;     // 64-byte aligned start (see aligned_data)
  std::vector<int32_t> colcorr;  // [groups][panels * 16]: 128 * sum_k W[n][k] over the group's k (W4: for the
                                 // unpacked prefill path)
  const uint8_t* panel(int64_t p) const { return aligned() + p * panel_bytes; }
  const int32_t* group_colcorr(int64_t grp) const { return colcorr.data() + grp * panels * 16; }
  const uint8_t* aligned() const {
    auto a = reinterpret_cast<uintptr_t>(data.data());
    return data.data() + ((64 - (a & 63)) & 63);
  }
};

// W8: w is [N, K] int8. W4: w is [N, ceil(K/2)] uint8, low nibble = even k, signed two's-complement nibbles.
// group_size: 0, or a divisor of K that is a multiple of 8 (validated: kWeightGroupAlign).
PackedWeights pack_weights(const void* w, int bits, int64_t N, int64_t K, int64_t group_size = 0);

// W4 panels [p0, p1) rewritten in the W8 layout (signed bytes) at out, (p1 - p0) * Kp * 16 bytes, 64-aligned.
// Prefill unpacks each tile once per task and runs the W8 kernel on it; decode keeps reading nibbles.
void unpack_w4_panels(const PackedWeights& W, int64_t p0, int64_t p1, uint8_t* out);

}  // namespace mqc
