"""QDQ graph forms every quantizing pass emits: static per-tensor activation QDQ, per-token dynamic
fake-quant, and the int4/int8 weight DequantizeLinear of a linear (its layouts are documented on
:mod:`mqc.linear_quant`). The per-modality static form lives in :mod:`mqc.graph.msq`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from mqc.calibration import MODALITY_NAMES, TapStats
from mqc.ir import add_initializer
from mqc.model_map import Linear
from mqc.quantizer import MIN_SCALE, QuantizedWeight, fake_quantize, qrange, sqnr_db

INT_TYPES = {8: (np.int8, ir.DataType.INT8), 4: (ml_dtypes.int4, ir.DataType.INT4)}


def int_tensor(array: np.ndarray, bits: int) -> np.ndarray:
    return array.astype(INT_TYPES[bits][0])


def insert_activation_qdq(graph: ir.Graph, value: ir.Value, scale: float, bits: int, readers: Sequence[ir.Node]) -> ir.Value:
    """``QuantizeLinear(value)`` once, then one ``DequantizeLinear`` per reader; returns the first reader's value.

    Every reader gets its own DequantizeLinear because onnxruntime's QDQ fusions (QDQ MatMul -> int8 kernels) only
    take a DequantizeLinear with a single consumer.
    """
    base = value.name or "act"
    scale_value = add_initializer(graph, f"{base}_act_scale", np.array(scale, dtype=np.float32))
    zero_value = add_initializer(graph, f"{base}_act_zero", int_tensor(np.array(0), bits))
    quant = ir.node("QuantizeLinear", [value, scale_value, zero_value], name=f"{base}/act_quant")
    quant.outputs[0].name = f"{base}_q"
    ordered = sorted(readers, key=_position(graph))
    graph.insert_before(ordered[0], quant)
    dequantized = []
    for index, reader in enumerate(ordered):
        suffix = "" if len(ordered) == 1 else f"_{index}"
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale_value, zero_value], name=f"{base}/act_dequant{suffix}")
        dequant.outputs[0].name = f"{base}_dq{suffix}"
        graph.insert_before(reader, dequant)
        for slot, inp in enumerate(reader.inputs):
            if inp is value:
                reader.replace_input_with(slot, dequant.outputs[0])
        dequantized.append(dequant.outputs[0])
    return dequantized[0]


def _position(graph: ir.Graph):
    order = {id(node): i for i, node in enumerate(graph)}
    return lambda node: order[id(node)]


def _unique_base(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ... when a node of that prefix exists (linears sharing one weight share its name)."""
    taken = {node.name for node in graph}
    unique, suffix = base, 0
    while f"{unique}/weight_dequant" in taken:
        suffix += 1
        unique = f"{base}_{suffix}"
    return unique


def insert_weight_dequant(graph: ir.Graph, linear: Linear, qweight: QuantizedWeight) -> None:
    """Replace the float weight of ``linear`` by an integer initializer and a DequantizeLinear."""
    bits = qweight.bits
    base = _unique_base(graph, linear.name)
    nodes: list[ir.Node] = []
    if qweight.group_size is None:
        stored = qweight.q.T if linear.transposed else qweight.q
        axis = 0 if linear.transposed else 1
        q_value = add_initializer(graph, f"{base}.weight_q", int_tensor(stored, bits))
        s_value = add_initializer(graph, f"{base}.weight_scale", qweight.scale.astype(np.float32))
        z_value = add_initializer(graph, f"{base}.weight_zero", int_tensor(np.zeros_like(qweight.scale, dtype=np.int8), bits))
        dequant = ir.node("DequantizeLinear", [q_value, s_value, z_value], attributes={"axis": axis}, name=f"{base}/weight_dequant")
        nodes.append(dequant)
        weight_out = dequant.outputs[0]
    else:  # blocked along the input axis: [in, out] on axis 0 for int4 MatMuls, [out, in] on axis 1 otherwise
        in_out = bits == 4 and not linear.transposed
        stored, scale = (qweight.q, qweight.scale) if in_out else (qweight.q.T, qweight.scale.T)
        q_value = add_initializer(graph, f"{base}.weight_q", int_tensor(np.ascontiguousarray(stored), bits))
        s_value = add_initializer(graph, f"{base}.weight_scale", np.ascontiguousarray(scale).astype(np.float32))
        z_value = add_initializer(graph, f"{base}.weight_zero", int_tensor(np.zeros(scale.shape, np.int8), bits))
        dequant = ir.node(
            "DequantizeLinear", [q_value, s_value, z_value],
            attributes={"axis": 0 if in_out else 1, "block_size": qweight.group_size}, name=f"{base}/weight_dequant",
        )
        nodes.append(dequant)
        weight_out = dequant.outputs[0]
        if not in_out and not linear.transposed:
            transpose = ir.node("Transpose", [weight_out], attributes={"perm": [1, 0]}, name=f"{base}/weight_t")
            nodes.append(transpose)
            weight_out = transpose.outputs[0]
    weight_out.name = f"{base}.weight_dq"
    graph.insert_before(linear.node, nodes)
    linear.node.replace_input_with(1, weight_out)


def layer_sqnr(
    linear: Linear, stats: TapStats, quantize_act: Callable[[np.ndarray, int], np.ndarray], weight: np.ndarray,
    qweight: QuantizedWeight,
) -> dict[str, float]:
    """Output SQNR of the quantized layer on the calibration rows kept for its input, overall and per modality.

    ``quantize_act(x, modality)`` is the activation quantizer's numpy reference (each modality's rows under their
    own scale with MSQ, per token when dynamic).
    """
    w_hat = qweight.dequantize()
    bias = linear.bias.const_value.numpy() if linear.bias is not None and linear.bias.const_value is not None else 0.0
    figures = {}
    refs, outs = [], []
    for modality, entry in stats.by_modality.items():
        if entry.sample.shape[0] == 0:
            continue
        x = entry.sample
        ref = x @ weight + bias
        out = quantize_act(x, modality) @ w_hat + bias
        figures[f"sqnr_db_{MODALITY_NAMES.get(modality, modality)}"] = round(sqnr_db(ref, out), 2)
        refs.append(ref)
        outs.append(out)
    if refs:
        figures["sqnr_db"] = round(sqnr_db(np.concatenate(refs), np.concatenate(outs)), 2)
    return figures


def insert_activation_dynamic(graph: ir.Graph, value: ir.Value, bits: int, readers: Sequence[ir.Node]) -> ir.Value:
    """Per-token dynamic symmetric fake-quant of ``value`` in front of ``readers``; returns x_q. The pattern::

        scale = Max(Div(ReduceMax(Abs(x), axes=[-1], keepdims=1), qmax), 1e-12)      # {x}/dyn_absmax, {x}/dyn_scale
        x_q   = Mul(Clip(Round(Div(x, scale)), qmin, qmax), scale)                  # {x}/dyn_div ... {x}/dyn_dequant

    (the Max floor keeps all-zero rows at zero instead of NaN).
    """
    base = value.name or "act"
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    lo, hi = qrange(bits)
    axes = add_initializer(graph, f"{base}_dyn_axes", np.array([-1], dtype=np.int64))
    qmin = add_initializer(graph, f"{base}_dyn_qmin", np.array(lo, dtype=dtype))
    qmax = add_initializer(graph, f"{base}_dyn_qmax", np.array(hi, dtype=dtype))
    floor = add_initializer(graph, f"{base}_dyn_min_scale", np.array(MIN_SCALE, dtype=dtype))
    nodes = [ir.node("Abs", [value], name=f"{base}/dyn_abs")]
    nodes.append(ir.node("ReduceMax", [nodes[-1].outputs[0], axes], attributes={"keepdims": 1}, name=f"{base}/dyn_absmax"))
    nodes.append(ir.node("Div", [nodes[-1].outputs[0], qmax], name=f"{base}/dyn_scale_raw"))
    nodes.append(ir.node("Max", [nodes[-1].outputs[0], floor], name=f"{base}/dyn_scale"))
    scale = nodes[-1].outputs[0]
    scale.name = f"{base}_dyn_scale"
    nodes.append(ir.node("Div", [value, scale], name=f"{base}/dyn_div"))
    nodes.append(ir.node("Round", [nodes[-1].outputs[0]], name=f"{base}/dyn_round"))
    nodes.append(ir.node("Clip", [nodes[-1].outputs[0], qmin, qmax], name=f"{base}/dyn_clip"))
    nodes[-1].outputs[0].name = f"{base}_dyn_q"
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], scale], name=f"{base}/dyn_dequant"))
    out = nodes[-1].outputs[0]
    out.name, out.dtype, out.shape = f"{base}_dq", value.dtype, value.shape
    order = {id(node): i for i, node in enumerate(graph)}
    graph.insert_before(min(readers, key=lambda n: order[id(n)]), nodes)
    for reader in readers:
        for index, inp in enumerate(reader.inputs):
            if inp is value:
                reader.replace_input_with(index, out)
    return out


def dynamic_fake_quant(x: np.ndarray, bits: int) -> np.ndarray:
    """numpy reference of the per-token dynamic quantizer (float32, like the graph)."""
    x = np.asarray(x, np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(qrange(bits)[1]), np.float32(MIN_SCALE))
    return fake_quantize(x, scale, bits)
