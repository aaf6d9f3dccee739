// Operator definitions of the ai.mqc domain (version 1) and their registration. The schemas and input checks
// both libraries use are in validate.h; the summary below is the contract.
//
// QuantLinear  (attr bits = 8 | 4, dynamic = 0 | 1, group_size = 0 | a multiple of 32 dividing K)
//   inputs : X [..., Kx] float | float16 | int8 (int8: already quantized, e.g. by RMSNormQuant; not with dynamic=1)
//            W int8 [N, K] (bits 8) or uint8 [N, K/2] (bits 4; low nibble = even k; two's-complement nibbles)
//            w_scale float [N], or [K / group_size, N] with group_size > 0 (row g: input rows of group g);
//            act_scale float [1], [2] = (text, image) or [3] = (text, image, sink), or [0] (or an unread [1]) when
//            dynamic
//            bias float [N]?; modality_ids int64 (one per token, 1 = image)?; split int64 [] | [1] (positions
//            < split of each sequence are image)?; lowrank_a float [K, r]?; lowrank_b float [r, N]?;
//            side_row float [N]? (then K = Kx - 1: channel 0 of X bypasses quantization, y += x[..., 0] * side_row)
//   output : Y [..., N], float for float/int8 X, float16 for float16 X
//   math   : q = clip(rne(X[..., c0:] / s_tok), -128, 127); acc = q @ W^T (int32); Y = acc * (s_tok * w_scale) + bias
//            + [tok is image or no modality given] (X[..., c0:] @ lowrank_a) @ lowrank_b + x[..., 0] * side_row
//            dynamic=1: s_tok = max(max_k |X[tok, c0 + k]| / 127, 1e-12) in fp32 (the graph's per-token quantizer)
//            group_size > 0: acc_g = int32 dot of group g's codes, and s_tok * sum_g(acc_g * w_scale[g]) (fp32, g
//            ascending) replaces acc * (s_tok * w_scale); everything else as above
// Hadamard: X [..., n] float | float16, H_m float [m, m]? -> Y = X @ kron(H_m, H_{2^k}) / sqrt(n), n = m 2^k
// RMSNormQuant (attr epsilon = 1e-6): X [..., K] float | float16, gamma float [K], act_scale float [1]|[2],
//            modality_ids?, split? -> int8 clip(rne(X / sqrt(mean(X^2) + eps) * gamma / s_tok))
#pragma once

#include "ort_util.h"

namespace mqc {

void add_cpu_ops(Ort::CustomOpDomain& domain);
void add_cuda_ops(Ort::CustomOpDomain& domain);  // libmqc_ops_cuda.so only

// Shared entry point of register_cpu.cc and register_cuda.cc: the CPU ops, plus add_more's (the CUDA ones).
OrtStatus* register_domain(OrtSessionOptions* options, const OrtApiBase* api_base,
                           void (*add_more)(Ort::CustomOpDomain&));

}  // namespace mqc
