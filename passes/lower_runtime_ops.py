"""Lower QDQ linears to ``ai.mqc::QuantLinear`` (the ``--format mqc`` output; runtime_ops/README.md).

The foundation's QDQ form of a quantized linear (passes/quantize_linears.py) is::

    x_q  = QuantizeLinear(X, s_x, 0)                    # s_x: float scalar initializer, int8 zero point
    x_dq = DequantizeLinear(x_q, s_x, 0)
    w_dq = DequantizeLinear(W_q, s_w, 0, axis=1)        # W_q: INT8 / INT4 [K, N] initializer, s_w float [N]
    Y    = MatMul(x_dq, w_dq)   [-> Add(Y, bias[N])]

and it becomes ``Y = ai.mqc::QuantLinear(X, W_packed, s_w, [s_x], [bias], bits=8|4)`` with ``W_packed`` the
transposed weight ([N, K] int8, or [N, K/2] uint8 with two int4 per byte, low nibble = even k). The op computes
``clip(rne(X / s_x)) @ W^T`` with int32 accumulation and ``acc * (s_x * s_w) + bias`` in fp32, so the integer
part is bit-exact with the QDQ model and the outputs differ by fp32 rounding only (the QDQ MatMul sums
products of dequantized values in another order): measured relative error below 1e-5 of the output range.
Per-group weights (one scale per ``block_size`` input rows) become ``group_size=block_size`` with ``s_w`` of
shape [K / group_size, N]: each group's int32 dot product is exact, ``s_x * sum_g acc_g * s_w[g]`` in fp32.

Rules:
1. ``MatMul(x_dq, w_dq)`` and ``Add(MatMul(x_dq, w_dq), bias)`` (either operand order) are lowered; the bias form
   first, so the Add is fused whenever it adds a constant ``[N]`` vector.
2. ``x_dq`` must be ``DequantizeLinear(QuantizeLinear(X, s, z), s, z)`` with one positive scalar scale and
   an int8 zero point of 0 (per-tensor symmetric int8), or MSQ's per-token fake-quant (mqc/graph/msq.py)
   ``Mul(Clip(Round(Div(X, s)), -128, 127), s)`` with ``s = Where(Equal(Unsqueeze(modality_ids, [-1]), 1),
   s_image, s_text)``, which becomes ``act_scale = [s_text, s_image]`` plus the ``modality_ids`` input (same
   division, half-to-even rounding and clip as the op, so the int8 codes are identical), or the same with
   passes/sink_scales.py's third class, ``s = Where(Unsqueeze(is_sink, [-1]), s_sink, <MSQ's Where>)``, which
   becomes ``act_scale = [s_text, s_image, s_sink]`` plus a per-token class input (0 text, 1 image, 2 sink:
   ``Where(is_sink, 2, Cast(Equal(modality_ids, 1)))``, built once per graph by :class:`ScaleClasses` and shared
   by every such QuantLinear; a decode step, position > 0, gets class 0 or 1 as the graph does), or the dynamic
   per-token fake-quant of passes/cmc.py (``acts="dynamic"``), the same Mul/Clip/Round/Div with
   ``s = Max(Div(ReduceMax(Abs(X), axes=[-1], keepdims=1), 127), 1e-12)``, which becomes ``dynamic=1`` with an
   empty ``act_scale``: the op computes the same fp32 scale per token (division, then the floor), so its codes
   are bit-identical to the graph's. The dynamic form is lowered only when the graph computes its scale in
   float32 (an fp16 graph rounds the scale to fp16, and its 1e-12 floor underflows to 0). Several linears may
   share one activation quantizer (q/k/v): each is lowered on its own and the quantizer is removed once no
   reader is left.
3. ``w_dq`` must dequantize a constant 2-D INT8 or INT4 weight with zero points all 0, per output channel
   (``axis`` 1 or -1 of the [K, N] weight, no ``block_size``) or per group of input rows (ONNX blocked
   quantization, mqc/graph/qdq.py's ``insert_weight_dequant``): ``DequantizeLinear(W_q [K, N], s [K/g, N],
   axis=0, block_size=g)`` (its int4 form), or ``Transpose(DequantizeLinear(W_q [N, K], s [N, K/g], axis=1,
   block_size=g), perm=[1, 0])`` (its int8 form); either becomes ``group_size=g`` with ``w_scale`` [K/g, N]. g
   must divide K and be a multiple of 32 (the op's rule: the kernels' k steps never straddle a group); GPTQ and
   RTN fall back to per-channel weights where g does not divide K. An INT4 weight with an odd K (per channel
   only) gets a zero pad nibble (the op accepts a packed W one column longer than X's K).
4. X must be float or float16 when its type is known (the op's float signatures; onnxruntime picks the one
   matching X at session creation); the output keeps X's type.
5. The online Hadamard of passes/hadamard_rotation.py, ``MatMul(X, Mul(Cast(S), 1/sqrt(n)))`` with S an int8
   ±1 matrix equal to ``kron(H_m, Sylvester(n/m))`` (m from ``mqc.hadamard.hadamard_factor``), becomes
   ``ai.mqc::Hadamard(X, H_m)``: an O(n log n + m n) transform instead of an n x n MatMul, equal up to fp32
   rounding. Randomized rotations (R1: signs times a random ±1 diagonal) fail the Kronecker check and stay.
6. Opt-in (``fuse_norms=True``): an fp32 ``RMSNormalization`` / ``SimplifiedLayerNormalization`` whose every
   reader is a lowered static ``QuantLinear`` with the same activation scale(s), modality input and no low-rank or
   channel-0 branch becomes ``ai.mqc::RMSNormQuant``, and the readers take its int8 output. Not bit-exact with
   the QDQ model: the norm is computed inside the op, so an activation within fp32 rounding of a .5 boundary
   may get the neighbouring code (measured: under 0.1% of codes, never more than one step).
7. RMS (passes/rms_split.py, float side branch): ``Add(QuantLinear(Slice(X, 1:)), MatMul(Slice(X, 0:1), row))``
   becomes one ``QuantLinear(X, ..., side_row=row)``: channel 0 bypasses quantization inside the op (a dynamic
   scale is then the absmax of channels 1:, as in the graph). The w8 side branch (a quantized row) is refused and
   stays as it is.
8. CMC (passes/cmc.py): ``Add(QuantLinear(x_s, B, ..., modality_ids),
   Where(Equal(Unsqueeze(modality_ids, [-1]), 1), MatMul(MatMul(x_s, L1), L2), 0))`` becomes one
   ``QuantLinear(x_s, B, ..., modality_ids, lowrank_a=L1, lowrank_b=L2)``: the op adds the fp32 low-rank
   correction on image tokens. With dynamic activations the branch has the same form but the QuantLinear has no
   modality input (its scale is per token): the branch's ``modality_ids`` becomes its input 5, which then only
   selects the low-rank tokens.
Refused (recorded with the reason, the QDQ form stays): per-group weights whose group does not divide K or is
not a multiple of 32, asymmetric or non-int8 activations, non-constant weights or scales, uint8 activations,
transposed (Gemm-style, ``axis=0``) per-channel weights.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from mqc.graph.markers import aifs_applied
from mqc.ir import constant_array, ensure_opset, remove_unused_initializers
from mqc.pass_manager import MqcPass
from mqc.quantizer import MIN_SCALE

MQC_DOMAIN = "ai.mqc"
MQC_OPSET = 1

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def pack_int4_rows(w: np.ndarray) -> np.ndarray:
    """[N, K] signed int4 values (int8 array in [-8, 7], K even) -> [N, K/2] uint8, low nibble = even k."""
    w = np.asarray(w, dtype=np.int8)
    if w.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {w.shape}")
    low = (w[:, 0::2].astype(np.uint8)) & 0x0F
    high = (w[:, 1::2].astype(np.uint8)) & 0x0F
    return (low | (high << 4)).astype(np.uint8)


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4_rows`: [N, K/2] uint8 -> [N, K] int8."""
    packed = np.asarray(packed, dtype=np.uint8)
    low = (packed & 0x0F).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    out[:, 0::2] = np.where(low > 7, low - 16, low)
    out[:, 1::2] = np.where(high > 7, high - 16, high)
    return out


def _is_zero(value: ir.Value | None) -> bool:
    if value is None:
        return True
    array = constant_array(value)
    return array is not None and not np.any(array.astype(np.int64))


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


class _ActSource(NamedTuple):
    """What a QuantLinear needs from an activation quantizer."""

    x: ir.Value  # the float activation
    act_scale: np.ndarray  # [1] or [2] (text, image); empty when dynamic
    modality_ids: ir.Value | None
    dynamic: bool = False


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """A ReduceMax's axes, from its input (opset >= 18) or its attribute."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _int_list(node.inputs[1])
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _dynamic_scale_check(s: ir.Value, x: ir.Value, result: MatchResult) -> MatchResult:
    """``s = Max(Div(ReduceMax(Abs(X), [-1], keepdims=1), 127), 1e-12)`` in float32, passes/cmc.py's per-token
    scale: the op recomputes exactly this in fp32, so the graph must compute it in fp32 too (an fp16 graph rounds
    the scale to fp16 and its 1e-12 floor underflows to 0)."""
    floor_node = _producer(s, "Max")
    assert floor_node is not None
    raw = next((d for d in (_producer(i, "Div") for i in floor_node.inputs) if d is not None), None)
    floor = floor_node.inputs[1] if raw is not None and floor_node.inputs[0] is raw.outputs[0] else floor_node.inputs[0]
    reduce = _producer(raw.inputs[0], "ReduceMax") if raw is not None else None
    absolute = _producer(reduce.inputs[0], "Abs") if reduce is not None else None
    if raw is None or absolute is None or absolute.inputs[0] is not x:
        return result.fail("the dynamic scale is not Max(Div(ReduceMax(Abs(X)), qmax), floor) of the quantized X",
                           floor_node)
    rank = len(x.shape) if x.shape is not None else None
    axes = _reduce_axes(reduce)
    if axes not in ([-1], [rank - 1] if rank else [-1]) or reduce.attributes.get_int("keepdims", 1) != 1:
        return result.fail(f"the dynamic absmax reduces axes {axes}, not the last axis with keepdims=1", reduce)
    constants = {"qmax": constant_array(raw.inputs[1]), "floor": constant_array(floor)}
    if any(c is None or c.size != 1 or c.dtype != np.float32 for c in constants.values()):
        return result.fail("the dynamic scale's qmax and floor are not float32 constant scalars (an fp16 graph?)",
                           floor_node)
    qmax, low = (float(c.reshape(())) for c in constants.values())
    if qmax != 127.0 or np.float32(low) != np.float32(MIN_SCALE):
        return result.fail(f"the dynamic scale is absmax / {qmax} floored at {low}, not the op's / 127 and 1e-12",
                           floor_node)
    return result


def _fake_quant_source(x_dq: ir.Value, result: MatchResult, classes: ScaleClasses) -> _ActSource | MatchResult:
    """The source of ``Mul(Clip(Round(Div(X, s)), -128, 127), s)``: MSQ's per-token form (mqc/graph/msq.py), with
    ``s = Where(Equal(Unsqueeze(modality_ids, [-1]), 1), s_image, s_text)``, the sink form of passes/sink_scales.py,
    ``s = Where(Unsqueeze(is_sink, [-1]), s_sink, <MSQ's Where>)``, or the dynamic per-token form of passes/cmc.py,
    with ``s = Max(Div(ReduceMax(Abs(X)), 127), 1e-12)``."""
    mul = _producer(x_dq, "Mul")
    assert mul is not None
    clip = next((c for c in (_producer(i, "Clip") for i in mul.inputs) if c is not None), None)
    if clip is None:
        return result.fail("the MatMul input is neither a DequantizeLinear nor a fake-quant Mul(Clip(...), s)", x_dq)
    s = mul.inputs[1] if mul.inputs[0] is clip.outputs[0] else mul.inputs[0]
    where, floor = _producer(s, "Where"), _producer(s, "Max")
    rnd = _producer(clip.inputs[0], "Round")
    div = _producer(rnd.inputs[0], "Div") if rnd is not None else None
    if (where is None and floor is None) or div is None or div.inputs[1] is not s:
        return result.fail("the fake-quant is not Mul(Clip(Round(Div(X, s))), s) with s = Where(...) (MSQ) "
                           "or Max(...) (dynamic per token)", mul)
    qmin, qmax = (_scalar(clip.inputs[i]) if len(clip.inputs) > i else None for i in (1, 2))
    if qmin != -128.0 or qmax != 127.0:
        return result.fail(f"the fake-quant clip range [{qmin}, {qmax}] is not int8's [-128, 127]", clip)
    x = div.inputs[0]
    if x is None or (x.dtype is not None and x.dtype not in _FLOAT_TYPES):
        return result.fail("the quantized activation is not float or float16", div)
    if floor is not None:
        if x.dtype not in (None, ir.DataType.FLOAT):
            return result.fail("the dynamic per-token quantizer of a float16 activation computes its scale in fp16; "
                               "the op's fp32 scale would give other codes", div)
        check = _dynamic_scale_check(s, x, result)
        if not check:
            return check
        return _ActSource(x, np.zeros(0, np.float32), None, dynamic=True)
    sink = _sink_select(where)
    if sink is not None:
        mask, s_sink, inner = sink
        msq = _msq_scales(inner, result)
        if isinstance(msq, MatchResult):
            return msq
        s_text, s_image, ids = msq
        if not s_sink > 0:
            return result.fail("the sink scale is not a positive constant scalar", where)
        class_ids = classes.get(mask, ids)
        if class_ids is None:
            return result.fail("the sink mask is not a known bool tensor (no per-token scale class for it)", where)
        return _ActSource(x, np.array([s_text, s_image, s_sink], dtype=np.float32), class_ids)
    msq = _msq_scales(where, result)
    if isinstance(msq, MatchResult):
        return msq
    s_text, s_image, ids = msq
    return _ActSource(x, np.array([s_text, s_image], dtype=np.float32), ids)


def _msq_scales(where: ir.Node, result: MatchResult) -> tuple[np.float32, np.float32, ir.Value] | MatchResult:
    """(s_text, s_image, modality_ids) of MSQ's ``Where(Equal(Unsqueeze(modality_ids, [-1]), 1), s_image, s_text)``."""
    s_image, s_text = _scalar(where.inputs[1]), _scalar(where.inputs[2])
    if s_image is None or s_text is None or not (s_image > 0 and s_text > 0):
        return result.fail("the MSQ scales are not two positive constant scalars", where)
    equal = _producer(where.inputs[0], "Equal")
    unsq = _producer(equal.inputs[0], "Unsqueeze") if equal is not None else None
    axes = constant_array(unsq.inputs[1]) if unsq is not None and len(unsq.inputs) > 1 else None
    if unsq is None or _scalar(equal.inputs[1]) != 1.0 or axes is None or axes.tolist() != [-1]:
        return result.fail("the MSQ condition is not Equal(Unsqueeze(modality_ids, [-1]), 1)", where)
    ids = unsq.inputs[0]
    if ids is None or ids.dtype != ir.DataType.INT64:
        return result.fail("modality_ids is not int64", unsq)
    return np.float32(s_text), np.float32(s_image), ids


def _sink_select(where: ir.Node | None) -> tuple[ir.Value, float, ir.Node] | None:
    """(is_sink mask, s_sink, MSQ's Where) when ``where`` is passes/sink_scales.py's
    ``Where(Unsqueeze(is_sink, [-1]), s_sink, Where(...))``, else None."""
    if where is None or len(where.inputs) != 3:
        return None
    inner = _producer(where.inputs[2], "Where")
    unsq = _producer(where.inputs[0], "Unsqueeze")
    s_sink = _scalar(where.inputs[1])
    if inner is None or unsq is None or s_sink is None or _int_list(_input(unsq, 1)) != [-1]:
        return None
    mask = unsq.inputs[0]
    return (mask, s_sink, inner) if mask is not None else None


class ScaleClasses:
    """The per-token scale class the lowered ops read for a sink-scaled activation: 0 text, 1 image, 2 sink.

    ``class_ids = Where(is_sink, 2, Cast(Equal(modality_ids, 1), int64))``, built once per (sink mask, modality
    ids) pair before the rules run, so every QuantLinear of that pair reads one shared value; it feeds the op's
    ``modality_ids`` input with ``act_scale = [s_text, s_image, s_sink]``. The class is what the graph selects:
    a sink row takes s_sink whatever its modality, any other row s_image when its id is 1, else s_text.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.values: dict[tuple[ir.Value, ir.Value], ir.Value] = {}
        for node in list(graph):
            sink = _sink_select(node) if node.op_type == "Where" and node.domain in ("", "ai.onnx") else None
            if sink is None:
                continue
            mask, _, inner = sink
            msq = _msq_scales(inner, MatchResult())
            if isinstance(msq, MatchResult) or not _is_bool(mask) or (mask, msq[2]) in self.values:
                continue
            self.values[(mask, msq[2])] = self._build(graph, mask, msq[2], len(self.values))
        if self.values:
            graph.sort()  # the class nodes read the mask and the ids, which may be produced in either order

    @staticmethod
    def _build(graph: ir.Graph, mask: ir.Value, ids: ir.Value, index: int) -> ir.Value:
        prefix = f"mqc_scale_class_{index}"
        one = _int64_initializer(graph, f"{prefix}_image", 1)
        two = _int64_initializer(graph, f"{prefix}_sink", 2)
        is_image = ir.node("Equal", [ids, one], name=f"{prefix}/is_image")
        image = ir.node("Cast", [is_image.outputs[0]], attributes={"to": ir.DataType.INT64}, name=f"{prefix}/image")
        classes = ir.node("Where", [mask, two, image.outputs[0]], name=f"{prefix}/class")
        classes.outputs[0].name = prefix
        classes.outputs[0].dtype = ir.DataType.INT64
        graph.extend([is_image, image, classes])
        return classes.outputs[0]

    def get(self, mask: ir.Value, ids: ir.Value) -> ir.Value | None:
        return self.values.get((mask, ids))


#: Ops whose output is bool: a sink mask saved without value types (passes/sink_scales.py builds it from Equal/Or).
_BOOL_OPS = frozenset({"Equal", "Or", "And", "Not", "Xor", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"})


def _is_bool(value: ir.Value) -> bool:
    if value.dtype is not None:
        return value.dtype == ir.DataType.BOOL
    producer = value.producer()
    return producer is not None and producer.domain in ("", "ai.onnx") and producer.op_type in _BOOL_OPS


def _int64_initializer(graph: ir.Graph, name: str, value: int) -> ir.Value:
    init = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
    init.const_value = ir.tensor(np.array(value, dtype=np.int64), name=name)
    graph.register_initializer(init)
    return init


def _activation_source(x_dq: ir.Value, result: MatchResult, classes: ScaleClasses) -> _ActSource | MatchResult:
    """The activation source of ``x_dq = DQ(Q(X, s, 0), s, 0)`` or of a fake-quant Mul, else a failed match."""
    if _producer(x_dq, "Mul") is not None:
        return _fake_quant_source(x_dq, result, classes)
    dq = _producer(x_dq, "DequantizeLinear")
    if dq is None:
        return result.fail("the MatMul input is not a DequantizeLinear (or fake-quant Mul) output", x_dq)
    q = _producer(dq.inputs[0], "QuantizeLinear")
    if q is None:
        return result.fail("the activation DequantizeLinear does not read a QuantizeLinear", dq)
    q_scale = constant_array(q.inputs[1])
    dq_scale = constant_array(dq.inputs[1])
    if q_scale is None or dq_scale is None or q_scale.size != 1 or dq_scale.size != 1:
        return result.fail("the activation scale is not one constant (per-tensor) value", q)
    if float(q_scale.reshape(())) != float(dq_scale.reshape(())) or not float(q_scale.reshape(())) > 0:
        return result.fail("QuantizeLinear and DequantizeLinear use different (or non-positive) scales", dq)
    zero = q.inputs[2] if len(q.inputs) > 2 else None
    if zero is None or zero.dtype != ir.DataType.INT8:
        return result.fail("activations are not int8 (the zero point is absent or not int8)", q)
    if not (_is_zero(zero) and _is_zero(dq.inputs[2] if len(dq.inputs) > 2 else None)):
        return result.fail("the activation zero point is not 0 (asymmetric)", q)
    x = q.inputs[0]
    if x is None or (x.dtype is not None and x.dtype not in _FLOAT_TYPES):
        return result.fail("the quantized activation is not float or float16", q)
    return _ActSource(x, q_scale.astype(np.float32).reshape(1), None)


class _Weight(NamedTuple):
    """A quantized weight as QuantLinear takes it."""

    w: np.ndarray  # [K, N] int8 values
    bits: int
    scale: np.ndarray  # [N] per channel, [K / group_size, N] per group
    group_size: int = 0


#: QuantLinear's group_size must be a multiple of this (runtime_ops/src/validate.h, kWeightGroupAlign).
WEIGHT_GROUP_ALIGN = 32


def _weight_dequant(w_dq: ir.Value) -> tuple[ir.Node, bool] | None:
    """(the weight's DequantizeLinear, whether a Transpose(perm=[1, 0]) sits between it and the MatMul)."""
    node = w_dq.producer()
    if node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
        perm = node.attributes.get_ints("perm", None)
        dq = _producer(node.inputs[0], "DequantizeLinear")
        return (dq, True) if dq is not None and perm is not None and list(perm) == [1, 0] else None
    return (node, False) if node is not None and node.op_type == "DequantizeLinear" else None


def _weight(w_dq: ir.Value, result: MatchResult) -> _Weight | MatchResult:
    """The [K, N] weight, its bits and scales of a weight DequantizeLinear: per output channel, or per group of
    input rows (blocked along K: axis 0 of a [K, N] weight, or axis 1 of an [N, K] one read through a Transpose)."""
    found = _weight_dequant(w_dq)
    if found is None:
        return result.fail("the weight is not DequantizeLinear(W_q) or Transpose(DequantizeLinear(W_q), [1, 0])", w_dq)
    dq, transposed = found
    w_q, w_scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if w_q is None or w_q.dtype not in (ir.DataType.INT8, ir.DataType.INT4):
        return result.fail("the weight is not INT8 or INT4", dq)
    w = constant_array(w_q)
    scale = constant_array(w_scale)
    if w is None or scale is None:
        return result.fail("the quantized weight or its scale is not a constant initializer", dq)
    if w.ndim != 2:
        return result.fail(f"the weight is not 2-D (shape {list(w.shape)})", dq)
    if not _is_zero(zero):
        return result.fail("the weight zero point is not 0", dq)
    bits = 4 if w_q.dtype == ir.DataType.INT4 else 8
    block = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1)
    if block:
        # the blocked axis must be K: axis 0 of [K, N], or axis 1 of [N, K] read through the Transpose
        k_axis = 1 if transposed else 0
        if axis % 2 != k_axis:
            return result.fail(f"per-group weights blocked along the output axis (axis={axis}) have no QuantLinear form",
                               dq)
        w_kn, s_gn = (w.T, scale.T) if transposed else (w, scale)
        K, N = w_kn.shape
        if K % block or block % WEIGHT_GROUP_ALIGN:
            return result.fail(f"per-group weights need a block_size dividing K={K} and a multiple of "
                               f"{WEIGHT_GROUP_ALIGN}, got block_size={block}", dq)
        if s_gn.shape != (K // block, N):
            return result.fail(f"the per-group weight scale {list(scale.shape)} does not match the weight "
                               f"{list(w.shape)} with block_size={block}", dq)
        return _Weight(np.ascontiguousarray(w_kn).astype(np.int8), bits,
                       np.ascontiguousarray(s_gn).astype(np.float32), block)
    if transposed:
        return result.fail("a transposed per-channel weight DequantizeLinear has no rule", dq)
    if axis not in (1, -1) or scale.shape != (w.shape[1],):
        return result.fail(f"the weight scale is not per output channel of a [K, N] weight (axis={axis})", dq)
    return _Weight(w.astype(np.int8), bits, scale.astype(np.float32))


class _QdqLinearToQuantLinear(pattern.RewriteRuleClassBase):
    """``[Add(] MatMul(x_dq, DequantizeLinear(W_q, s_w, z_w)) [, bias)]`` -> ``ai.mqc::QuantLinear``."""

    def __init__(self, name: str, skips: dict[str, str], classes: ScaleClasses, with_bias: bool,
                 bias_first: bool = False, transposed_weight: bool = False) -> None:
        super().__init__(name)
        self.skips = skips
        self.classes = classes
        self.with_bias = with_bias
        self.bias_first = bias_first
        self.transposed_weight = transposed_weight

    def pattern(self, op, x_dq, w_q, w_scale, w_zero, bias):
        if self.transposed_weight:  # insert_weight_dequant's int8 per-group form: the scales are [N, K / g]
            w_dq = op.Transpose(op.DequantizeLinear(w_q, w_scale, w_zero), _outputs=["w_dq"])
        else:
            w_dq = op.DequantizeLinear(w_q, w_scale, w_zero, _outputs=["w_dq"])
        y = op.MatMul(x_dq, w_dq, _outputs=["mm"])
        if not self.with_bias:
            return y
        return op.Add(bias, y) if self.bias_first else op.Add(y, bias)

    def check(self, context, x_dq, w_dq, mm, bias=None, **_):
        result = self._check(x_dq, w_dq, bias)
        node = mm.producer()
        key = node.name or f"MatMul->{mm.name}"
        if result:
            self.skips.pop(key, None)
        else:
            self.skips[key] = f"{self.name}: {result.reason}"
        return result

    def _check(self, x_dq, w_dq, bias) -> MatchResult:
        result = MatchResult()
        source = _activation_source(x_dq, result, self.classes)
        if isinstance(source, MatchResult):
            return source
        weight = _weight(w_dq, result)
        if isinstance(weight, MatchResult):
            return weight
        if self.with_bias:
            b = constant_array(bias)
            if b is None or b.shape != (weight.w.shape[1],):
                return result.fail(f"the Add operand is not a constant [{weight.w.shape[1]}] bias", bias)
        return result

    def rewrite(self, op, x_dq, w_dq, mm, bias=None, **_):
        source = _activation_source(x_dq, MatchResult(), self.classes)
        w, bits, w_scale, group_size = _weight(w_dq, MatchResult())
        base = mm.name or w_dq.producer().inputs[0].name or "linear"  # unique per linear, even for shared weights
        if bits == 4 and w.shape[0] % 2:  # odd K (e.g. 2^k - 1 after the RMS split): a zero nibble pads the row
            w = np.vstack([w, np.zeros((1, w.shape[1]), np.int8)])
        packed = np.ascontiguousarray(w.T) if bits == 8 else pack_int4_rows(np.ascontiguousarray(w.T))
        inputs = [
            source.x,
            op.initializer(ir.tensor(packed, name=f"{base}.mqc_packed"), name=f"{base}.mqc_packed"),
            op.initializer(ir.tensor(w_scale, name=f"{base}.mqc_w_scale"), name=f"{base}.mqc_w_scale"),
            op.initializer(ir.tensor(source.act_scale, name=f"{base}.mqc_act_scale"), name=f"{base}.mqc_act_scale"),
        ]
        if self.with_bias:
            b = constant_array(bias).astype(np.float32)
            inputs.append(op.initializer(ir.tensor(b, name=f"{base}.mqc_bias"), name=f"{base}.mqc_bias"))
        if source.modality_ids is not None:
            inputs += [None] * (5 - len(inputs)) + [source.modality_ids]
        attributes = {"bits": bits, **({"dynamic": 1} if source.dynamic else {}),
                      **({"group_size": group_size} if group_size else {})}
        return op.QuantLinear(*inputs, **attributes, _domain=MQC_DOMAIN, _version=MQC_OPSET)


def _hadamard_base(h: ir.Value, result: MatchResult) -> np.ndarray | MatchResult:
    """H_m (float32) when ``h`` is ``Mul(Cast(S), 1/sqrt(n))`` with S = kron(H_m, Sylvester(n/m)), the online
    Hadamard matrix of passes/hadamard_rotation.py; else a failed match."""
    from mqc.hadamard import hadamard_factor, sylvester

    mul = _producer(h, "Mul")
    if mul is None:
        return result.fail("the MatMul's right operand is not Mul(Cast(signs), scale)", h)
    cast = next((c for c in (_producer(i, "Cast") for i in mul.inputs) if c is not None), None)
    if cast is None:
        return result.fail("the MatMul's right operand is not Mul(Cast(signs), scale)", h)
    scale_value = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
    signs, scale = constant_array(cast.inputs[0]), _scalar(scale_value)
    if signs is None or scale is None or signs.ndim != 2 or signs.shape[0] != signs.shape[1]:
        return result.fail("not a constant square sign matrix with a scalar scale", mul)
    n = signs.shape[0]
    if not np.isclose(scale, 1.0 / np.sqrt(n), rtol=1e-6, atol=0):
        return result.fail(f"the scale {scale} is not 1/sqrt({n})", mul)
    try:
        m, size = hadamard_factor(n)
    except ValueError as exc:
        return result.fail(f"size {n}: {exc}", mul)
    s = signs.astype(np.int64)
    base = s[::size, ::size]
    if not np.array_equal(s, np.kron(base, sylvester(size))):
        return result.fail(f"the {n}x{n} sign matrix is not kron(H_{m}, Sylvester({size})) (a randomized rotation?)", mul)
    return base.astype(np.float32)


class _MatMulHadamardToHadamard(pattern.RewriteRuleClassBase):
    """``MatMul(X, Mul(Cast(kron(H_m, H_2^k) signs), 1/sqrt(n)))`` -> ``ai.mqc::Hadamard(X, H_m)``."""

    def __init__(self, name: str, skips: dict[str, str]) -> None:
        super().__init__(name)
        self.skips = skips

    def pattern(self, op, x, h):
        return op.MatMul(x, h, _outputs=["mm"])

    def check(self, context, x, h, mm, **_):
        result = MatchResult()
        if _producer(h, "Mul") is None or not any(_producer(i, "Cast") for i in h.producer().inputs):
            return result.fail("not an online Hadamard MatMul")  # an ordinary MatMul: not recorded
        cast = next(c for c in (_producer(i, "Cast") for i in h.producer().inputs) if c is not None)
        to = cast.attributes.get_int("to", 0)
        if to not in _FLOAT_TYPES or (x.dtype is not None and to != x.dtype):
            result = result.fail("the Hadamard input is not float/float16 (or differs from the matrix type)", x)
        else:
            base = _hadamard_base(h, result)
            result = base if isinstance(base, MatchResult) else result
        key = mm.producer().name or f"MatMul->{mm.name}"
        if result:
            self.skips.pop(key, None)
        else:
            self.skips[key] = f"{self.name}: {result.reason}"
        return result

    def rewrite(self, op, x, h, mm, **_):
        base = _hadamard_base(h, MatchResult())
        name = f"{mm.name}.mqc_hadamard_base"
        if base.shape[0] == 1:
            return op.Hadamard(x, _domain=MQC_DOMAIN, _version=MQC_OPSET)
        return op.Hadamard(x, op.initializer(ir.tensor(base, name=name), name=name), _domain=MQC_DOMAIN, _version=MQC_OPSET)


def rule_sets(skips: dict[str, str], classes: ScaleClasses) -> list[pattern.RewriteRuleSet]:
    """The rule sets in the order they run: online Hadamards, then the linears with a bias (over the whole graph),
    then the bare MatMuls."""
    def linears(with_bias: bool) -> list:
        forms = [("", False), ("_transposed_weight", True)]
        rules = [_QdqLinearToQuantLinear.rule(f"qdq_linear{'_bias' if with_bias else ''}{suffix}_to_quant_linear",
                                              skips, classes, with_bias=with_bias, transposed_weight=transposed)
                 for suffix, transposed in forms]
        if with_bias:
            rules += [_QdqLinearToQuantLinear.rule(f"qdq_bias_linear{suffix}_to_quant_linear", skips, classes,
                                                   with_bias=True, bias_first=True, transposed_weight=transposed)
                      for suffix, transposed in forms]
        return rules

    return [
        pattern.RewriteRuleSet([_MatMulHadamardToHadamard.rule("online_hadamard_to_hadamard", skips)]),
        pattern.RewriteRuleSet(linears(with_bias=True)),
        pattern.RewriteRuleSet(linears(with_bias=False)),
    ]


def _int_list(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _slice_of(value: ir.Value | None, start: int, end: int) -> ir.Value | None:
    """X when ``value = Slice(X, [start], [end], [-1])`` (end >= 2**62 stands for "to the end")."""
    node = _producer(value, "Slice")
    if node is None or len(node.inputs) < 4:
        return None
    starts, ends, axes = (_int_list(node.inputs[i]) for i in (1, 2, 3))
    steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    rank = len(node.inputs[0].shape) if node.inputs[0] is not None and node.inputs[0].shape is not None else None
    if starts != [start] or steps != [1] or axes not in ([-1], [rank - 1] if rank else [-1]):
        return None
    if ends is None or len(ends) != 1 or not (ends[0] == end or (end >= 2**62 and ends[0] >= 2**62)):
        return None
    return node.inputs[0]


def _quant_linear(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "QuantLinear" or node.domain != MQC_DOMAIN or len(value.uses()) != 1:
        return None
    return node


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _branch_replacement(add: ir.Node) -> tuple[ir.Node, dict[int, ir.Value | np.ndarray]] | str | None:
    """For ``Add(QuantLinear(...), branch)``: the QuantLinear and the inputs that absorb the branch, a refusal
    reason, or None when the Add is not a branch of a QuantLinear."""
    for main_value, other in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        ql = _quant_linear(main_value)
        if ql is None or other is None:
            continue
        x = ql.inputs[0]
        side = _producer(other, "MatMul")
        where = _producer(other, "Where")
        if side is not None and _producer(side.inputs[0], "Slice") is not None:
            # RMS: Add(QuantLinear(Slice(X, 1:)), MatMul(Slice(X, 0:1), row))
            full = _slice_of(x, 1, 2**62)
            if full is None or _slice_of(side.inputs[0], 0, 1) is not full:
                return "the side MatMul and the QuantLinear do not read channel 0 / channels 1: of one value"
            row = constant_array(side.inputs[1])
            if row is None or row.ndim != 2 or row.shape[0] != 1:
                return "the channel-0 side weight is not a constant [1, N] float row (a quantized w8 side branch?)"
            if _input(ql, 9) is not None or _input(ql, 7) is not None:
                return "the QuantLinear already has a side or low-rank branch"
            return ql, {0: full, 9: row.reshape(-1).astype(np.float32)}
        if where is not None and _producer(where.inputs[1], "MatMul") is not None:
            # CMC: Add(QuantLinear(x_s), Where(is_image, MatMul(MatMul(x_s, L1), L2), 0))
            ids = _input(ql, 5)
            equal = _producer(where.inputs[0], "Equal")
            unsq = _producer(equal.inputs[0], "Unsqueeze") if equal is not None else None
            if unsq is None or _scalar(equal.inputs[1]) != 1.0 or _int_list(_input(unsq, 1)) != [-1]:
                return "the low-rank branch is not selected by Equal(Unsqueeze(modality_ids, [-1]), 1)"
            extra: dict[int, ir.Value | np.ndarray] = {}
            if ids is None and ql.attributes.get_int("dynamic", 0) and _input(ql, 6) is None:
                # A dynamic QuantLinear takes no modality input for its scale: the branch's mask supplies it.
                ids = unsq.inputs[0]
                if ids is None or ids.dtype != ir.DataType.INT64:
                    return "the low-rank branch's modality_ids is not int64"
                extra[5] = ids
            if ids is None or unsq.inputs[0] is not ids:
                return "the low-rank branch is not selected by the QuantLinear's own modality_ids == 1"
            if _scalar(where.inputs[2]) != 0.0:
                return "the low-rank branch's else-value is not 0"
            mm2 = _producer(where.inputs[1], "MatMul")
            mm1 = _producer(mm2.inputs[0], "MatMul") if mm2 is not None else None
            if mm1 is None or mm1.inputs[0] is not x:
                return "the low-rank branch does not read the QuantLinear's unquantized input"
            l1, l2 = constant_array(mm1.inputs[1]), constant_array(mm2.inputs[1])
            if l1 is None or l2 is None or l1.ndim != 2 or l2.ndim != 2 or l1.shape[1] != l2.shape[0]:
                return "the low-rank factors are not constant [K, r] / [r, N] matrices"
            if _input(ql, 7) is not None:
                return "the QuantLinear already has a low-rank branch"
            return ql, {**extra, 7: l1.astype(np.float32), 8: l2.astype(np.float32)}
    return None


def _fold_branches(graph: ir.Graph, skips: dict[str, str]) -> int:
    """Rules 7 and 8: the RMS channel-0 side branch and the CMC low-rank branch join their QuantLinear."""
    folded = 0
    for add in list(graph):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            continue
        found = _branch_replacement(add)
        if found is None:
            continue
        if isinstance(found, str):
            skips[add.name or f"Add->{add.outputs[0].name}"] = f"fold_branches: {found}"
            continue
        ql, extra = found
        inputs = list(ql.inputs) + [None] * (_QL_INPUTS - len(ql.inputs))
        base = add.outputs[0].name or ql.outputs[0].name or "linear"
        for index, value in extra.items():
            if isinstance(value, np.ndarray):
                name = f"{base}.mqc_{'side_row' if index == 9 else ('lowrank_a' if index == 7 else 'lowrank_b')}"
                init = ir.Value(name=name, shape=ir.Shape(value.shape), type=ir.TensorType(ir.DataType.FLOAT))
                init.const_value = ir.tensor(value, name=name)
                graph.register_initializer(init)
                value = init
            inputs[index] = value
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {k: a.value for k, a in ql.attributes.items()}  # bits, and dynamic when set
        node = ir.node("QuantLinear", inputs, attributes=attributes, domain=MQC_DOMAIN, version=MQC_OPSET,
                       name=f"{ql.name or base}/mqc_with_branch")
        out = add.outputs[0]
        node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
        graph.insert_after(add, node)
        out.replace_all_uses_with(node.outputs[0])
        for i, graph_out in enumerate(graph.outputs):
            if graph_out is out:
                graph.outputs[i] = node.outputs[0]
        name = out.name
        out.name = None
        node.outputs[0].name = name
        graph.remove([add, ql], safe=True)
        skips.pop(add.name or f"Add->{name}", None)
        folded += 1
    return folded


_QL_INPUTS = 10  # QuantLinear input count (runtime_ops README)


_NORM_OPS = {("RMSNormalization", ""), ("RMSNormalization", "ai.onnx"), ("SimplifiedLayerNormalization", ""),
             ("SimplifiedLayerNormalization", "ai.onnx"), ("SimplifiedLayerNormalization", "com.microsoft")}


def _same_constant(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is b:
        return True
    x, y = constant_array(a), constant_array(b)
    return x is not None and y is not None and x.shape == y.shape and bool(np.array_equal(x, y))


def _fuse_norm_quant(graph: ir.Graph, skips: dict[str, str]) -> int:
    """Rule 6: ``RMSNorm -> QuantLinear x n`` (all with one scale) becomes ``RMSNormQuant -> QuantLinear(int8 X)``."""
    fused = 0
    for node in list(graph):
        if (node.op_type, node.domain) not in _NORM_OPS or not node.outputs:
            continue
        out = node.outputs[0]
        key = node.name or f"{node.op_type}->{out.name}"
        readers = [use.node for use in out.uses()]
        reason = None
        if not readers or out in graph.outputs or any(o.uses() for o in node.outputs[1:]):
            reason = "the norm output is a graph output or has no readers"
        elif any(r.op_type != "QuantLinear" or r.domain != MQC_DOMAIN or r.inputs[0] is not out for r in readers):
            reason = "not every reader of the norm is a QuantLinear"  # e.g. a float lm_head, or a residual
        elif any(len(r.inputs) > 7 and any(v is not None for v in r.inputs[7:]) for r in readers):
            reason = "a reader has a low-rank or channel-0 branch (those need the float input)"
        elif any(r.attributes.get_int("dynamic", 0) for r in readers):
            reason = "a reader quantizes dynamically per token (its scale comes from the float input)"
        elif any(not _same_constant(r.inputs[3], readers[0].inputs[3]) for r in readers):
            reason = "the readers quantize with different activation scales"
        elif any((r.inputs[5] if len(r.inputs) > 5 else None) is not (readers[0].inputs[5] if len(readers[0].inputs) > 5 else None)
                 or (r.inputs[6] if len(r.inputs) > 6 else None) is not None for r in readers):
            reason = "the readers select modality scales differently"
        elif node.inputs[0] is None or node.inputs[0].dtype not in (None, ir.DataType.FLOAT):
            reason = "only float32 norms are fused (the int8-input QuantLinear returns float32)"
        gamma = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = node.attributes.get_int("axis", -1)
        if reason is None and (gamma is None or gamma.ndim != 1 or axis not in (-1, len(node.inputs[0].shape or ()) - 1)):
            reason = "the norm's scale is not a constant vector over the last axis"
        if reason is not None:
            if readers and any(r.op_type == "QuantLinear" for r in readers):
                skips[key] = f"fuse_norm_quant: {reason}"
            continue
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        gamma_value = ir.Value(name=f"{out.name}.mqc_gamma", shape=ir.Shape(gamma.shape), type=ir.TensorType(ir.DataType.FLOAT))
        gamma_value.const_value = ir.tensor(gamma.astype(np.float32), name=gamma_value.name)
        graph.register_initializer(gamma_value)
        first = readers[0]
        ids = first.inputs[5] if len(first.inputs) > 5 else None
        inputs = [node.inputs[0], gamma_value, first.inputs[3]] + ([ids] if ids is not None else [])
        fused_node = ir.node("RMSNormQuant", inputs, attributes={"epsilon": float(epsilon)}, domain=MQC_DOMAIN,
                             version=MQC_OPSET, name=f"{node.name or out.name}/mqc_norm_quant")
        fused_node.outputs[0].name = f"{out.name}.mqc_q"
        fused_node.outputs[0].dtype = ir.DataType.INT8
        graph.insert_after(node, fused_node)
        for reader in readers:
            reader.replace_input_with(0, fused_node.outputs[0])
        graph.remove(node, safe=True)
        fused += 1
    return fused


#: Why the lowered ops select scales per token instead of reading AIFS's contiguous layout (the ``split`` input).
AIFS_LAYOUT_NOTE = (
    "AIFS layout: the per-modality QuantLinears select their scale per token (AIFS's permuted modality ids, or the "
    "sink class), not with the op's contiguous-block `split` input: a left-padded batch starts its image block at "
    "a different offset in every row (pad | image | text) and the sink class is one token, so one split per batch "
    "cannot describe it; the selection costs one int64 read per token row, beside a K-long dot product")


class LowerRuntimeOpsPass(MqcPass):
    """Rewrite QDQ linears into ``ai.mqc::QuantLinear`` (see the module docstring for the rules).

    Each QDQ linear the rules looked at and refused is recorded as a skip with the rule's reason (keyed by its
    MatMul node), unless another rule lowered it afterwards. ``fuse_norms=True`` also applies rule 6.
    """

    name: ClassVar[str] = "lower_runtime_ops"
    function_preserving: ClassVar[bool] = False  # integer-exact, but the fp32 summation order changes

    def run(self, model: ir.Model) -> bool:
        skips: dict[str, str] = {}
        classes = ScaleClasses(model.graph)
        counts = [rules.apply_to_model(model) for rules in rule_sets(skips, classes)]
        branches = _fold_branches(model.graph, skips) if counts[1] + counts[2] else 0
        norms = 0
        if self.params.fuse_norms and counts[1] + counts[2]:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the dead Q/DQ nodes still read the norms
            norms = _fuse_norm_quant(model.graph, skips)
        count = sum(counts) + norms + branches
        for node, reason in skips.items():
            self.record.skip(node, reason)
        self.record.matched = count + len(skips)
        self.record.changed = count
        if count or classes.values:  # the replaced quantizers, and scale-class nodes no op reads
            ir.passes.common.RemoveUnusedNodesPass()(model)
        if count:
            ensure_opset(model, MQC_DOMAIN, MQC_OPSET)
            removed = remove_unused_initializers(model.graph)
            self.record.notes.append(
                f"{counts[1] + counts[2]} linears lowered to {MQC_DOMAIN}::QuantLinear, {counts[0]} online Hadamard "
                f"MatMuls to {MQC_DOMAIN}::Hadamard, {branches} side/low-rank branches folded into their QuantLinear, "
                f"{norms} norms fused into {MQC_DOMAIN}::RMSNormQuant; "
                f"{removed} dead initializers removed"
            )
            if aifs_applied(model.graph):
                self.record.notes.append(AIFS_LAYOUT_NOTE)
        return count > 0


    def ensures(self, model: ir.Model) -> None:
        """No QDQ linear (``MatMul(·, [Transpose(]DequantizeLinear(W)[)])``) is left that is not recorded as
        refused."""
        refused = {skip["node"] for skip in self.record.skipped}
        for node in model.graph:
            weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
            if weight is None or _weight_dequant(weight) is None:
                continue
            key = node.name or f"MatMul->{node.outputs[0].name}"
            if key not in refused:
                raise self.broken(f"QDQ linear {key} is neither lowered to {MQC_DOMAIN}::QuantLinear nor recorded as "
                                  "refused")


def lower_to_runtime_ops(model: ir.Model, fuse_norms: bool = False):
    """Run :class:`LowerRuntimeOpsPass` on ``model`` in place; return its :class:`~mqc.report.PassRecord`."""
    lowering = LowerRuntimeOpsPass(fuse_norms=fuse_norms)
    lowering(model)
    return lowering.record
