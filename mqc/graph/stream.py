"""Residual-stream tracing (spec/algorithms.md §2.5-2.6), the one tracer of ``ln_to_rmsnorm`` and
``hadamard_rotation`` (decoder and vision tower): which norms read the stream, which linears read a norm's output,
and what writes the stream, back to the tensors that can absorb a right-multiplication of its channels. Every
refusal is a :class:`StreamRefused` naming the node and why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.graph.weights import live_uses, own_bias, own_weight, set_bias, set_weight
from mqc.ir import add_initializer, constant_array
from mqc.model_map import Linear, ModelMap

PASSTHROUGH = {"Identity"}


class StreamRefused(Exception):
    """The stream has a structure the transformation cannot prove exact; the message is the recorded reason."""


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def known_rank(value: ir.Value) -> int:
    if value.shape is None:
        raise StreamRefused(f"value {value.name} has no known shape, so its channel axis cannot be tracked")
    return len(value.shape)


def _dim_equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b) and not isinstance(a, int) and not isinstance(b, int)


def reshape_channel_axis(src_dims: list[Any], dst_dims: list[Any], axis: int) -> int | None:
    """Where channel ``axis`` of ``src_dims`` lands after a row-major reshape to ``dst_dims``, if it stays whole.

    It does when some destination axis has the same size, the same product of dims after it (all static) and the
    same product of dims before it (static parts multiplied, symbolic dims equal in order): then every element keeps
    its channel index.
    """
    if axis >= len(src_dims):
        return None
    after = src_dims[axis + 1:]
    if not all(isinstance(d, int) for d in after):
        return None
    stride = int(np.prod(after, dtype=np.int64))

    def prefix(dims: list[Any]) -> tuple[list[str], int]:
        return [str(d) for d in dims if not isinstance(d, int)], int(np.prod([d for d in dims if isinstance(d, int)],
                                                                              dtype=np.int64))

    for j, dim in enumerate(dst_dims):
        tail = dst_dims[j + 1:]
        if (_dim_equal(dim, src_dims[axis]) and all(isinstance(d, int) for d in tail)
                and int(np.prod(tail, dtype=np.int64)) == stride and prefix(dst_dims[:j]) == prefix(src_dims[:axis])):
            return j
    return None


@dataclass
class StreamClosure:
    """What produces the residual stream, back to the tensors that can absorb a right-multiplication of channels.

    ``constants``: (node, input index, channel axis) of constant operands; ``convs``: patch-embedding Convs;
    ``writers``: linears written into the stream (output side); ``scales``: LayerScale (Mul node, linear, λ);
    ``norm_outputs``: norms whose output starts the stream; ``values``: every value of the closure with its channel
    axis counted from the end (-1: the last axis).
    """

    width: int
    constants: list[tuple[ir.Node, int, int]] = field(default_factory=list)
    convs: list[ir.Node] = field(default_factory=list)
    writers: list[Linear] = field(default_factory=list)
    scales: list[tuple[ir.Node, Linear, np.ndarray]] = field(default_factory=list)
    norm_outputs: list[ir.Node] = field(default_factory=list)
    values: dict[int, tuple[ir.Value, int]] = field(default_factory=dict)
    expected_uses: set[tuple[int, int]] = field(default_factory=set)


def stream_norms(graph: ir.Graph, entry: ir.Value, norm_ops: set[str]) -> list[ir.Node]:
    """The norms that read the residual stream starting at ``entry``: reached from it through residual ``Add``s.

    Only finds where the stream is read; :func:`trace_stream` from these norms proves (or refuses) the rest.
    """
    seen, frontier, norms = {id(entry)}, [entry], {}
    while frontier:
        for use in live_uses(frontier.pop(), graph):
            node = use.node
            if node.op_type == "Add" and is_default_domain(node) and id(node.outputs[0]) not in seen:
                seen.add(id(node.outputs[0]))
                frontier.append(node.outputs[0])
            elif node.op_type in norm_ops and use.idx == 0:
                norms[id(node)] = node
    return list(norms.values())


def trace_stream(graph: ir.Graph, model_map: ModelMap, norms: list[ir.Node], width: int, *,
                 sources: Sequence[ir.Value] = (), allow_norm_outputs: bool = False,
                 transform: str = "transform") -> StreamClosure:
    """Walk back from the inputs of ``norms`` and collect what writes the stream (rule 2); check readers (rule 3).

    The one residual-stream tracer of ``ln_to_rmsnorm`` (the centring) and ``hadamard_rotation`` (R1 on a decoder,
    R_v on a vision tower). ``sources`` are values the caller transforms itself (the decoder's entry); the walk stops
    there. ``allow_norm_outputs``: one of ``norms`` may start the stream (``ln_pre``). ``transform`` names the
    transformation in refusals. Channel axes are counted from the end, so broadcasting never needs a rank.
    """
    closure = StreamClosure(width)
    by_output = {id(lin.output): lin for lin in model_map.linears}
    norm_ids = {id(node) for node in norms}
    source_ids = {id(value) for value in sources}
    seen_nodes: set[int] = set()

    def visit(value: ir.Value, axis: int) -> None:
        key = id(value)
        if key in closure.values:
            if closure.values[key][1] != axis:
                raise StreamRefused(f"value {value.name} is reached with two different channel axes")
            return
        closure.values[key] = (value, axis)
        if value in graph.outputs:
            raise StreamRefused(f"stream value {value.name} is a graph output: it would change")
        if key in source_ids:  # the caller transforms it (the decoder's entry)
            return
        lin = by_output.get(key)
        if lin is not None:
            if axis != -1 or lin.out_features != width:
                raise StreamRefused(f"linear {lin.name} writes the stream with channels on axis {axis}, not the last, "
                                    f"or not {width} of them")
            closure.writers.append(lin)
            return
        producer = value.producer()
        if producer is None:
            raise StreamRefused(f"stream value {value.name} is a graph input: nothing can absorb the {transform}")
        if id(producer) in seen_nodes:
            return
        seen_nodes.add(id(producer))
        op = producer.op_type if is_default_domain(producer) else f"{producer.domain}::{producer.op_type}"
        if id(producer) in norm_ids and allow_norm_outputs:
            closure.norm_outputs.append(producer)
        elif op == "Add":
            for idx, operand in enumerate(producer.inputs):
                _operand(producer, idx, operand, axis)
        elif op == "Mul":
            _layer_scale(producer, axis)
        elif op == "Concat":
            rank = known_rank(value)
            if producer.attributes["axis"].as_int() % rank == axis % rank:
                raise StreamRefused(f"Concat {producer.name} joins along the channel axis")
            for idx, operand in enumerate(producer.inputs):
                _operand(producer, idx, operand, axis)
        elif op == "Expand":
            _operand(producer, 0, producer.inputs[0], axis)
        elif op == "Transpose":
            rank = known_rank(value)
            perm = [int(p) for p in producer.attributes["perm"].as_ints()]
            _follow(producer, 0, perm[axis % rank] - rank)
        elif op == "Reshape":
            _follow(producer, 0, _reshape_axis(producer, axis))
        elif op in PASSTHROUGH:
            _follow(producer, 0, axis)
        elif op == "Conv":
            weight = constant_array(producer.inputs[1])
            if axis % known_rank(value) != 1 or weight is None or weight.shape[0] != width:
                raise StreamRefused(f"Conv {producer.name} writes the stream but its weight is not a constant "
                                    f"[{width}, ...] on the channel axis")
            group = producer.attributes.get("group")
            if group is not None and group.as_int() != 1:
                raise StreamRefused(f"Conv {producer.name} is grouped")
            if len(producer.inputs) > 2 and producer.inputs[2] is not None and constant_array(producer.inputs[2]) is None:
                raise StreamRefused(f"Conv {producer.name} has a non-constant bias")
            closure.convs.append(producer)
        else:
            raise StreamRefused(f"stream value {value.name} is produced by {op} {producer.name}, which cannot absorb "
                                f"the {transform} of the channels")

    def _follow(node: ir.Node, idx: int, axis: int) -> None:
        closure.expected_uses.add((id(node), idx))
        visit(node.inputs[idx], axis)

    def _operand(node: ir.Node, idx: int, operand: ir.Value | None, axis: int) -> None:
        """An operand of a broadcasting op: a constant absorbs the transform, anything else is followed."""
        if operand is None:
            raise StreamRefused(f"{node.op_type} {node.name} has a missing operand")
        array = constant_array(operand)
        if array is not None:
            if -axis > array.ndim or array.shape[axis] != width:
                raise StreamRefused(f"constant {operand.name} of {node.op_type} {node.name} broadcasts over channels")
            closure.constants.append((node, idx, axis % array.ndim))
            return
        if operand.shape is not None and (-axis > len(operand.shape) or not _dim_equal(operand.shape.dims[axis], width)):
            raise StreamRefused(f"{operand.name} of {node.op_type} {node.name} broadcasts over channels")
        _follow(node, idx, axis)  # an operand of unknown shape: what writes it is checked for the width

    def _layer_scale(node: ir.Node, axis: int) -> None:
        """A constant per-channel Mul right after a linear (LayerScale): fold it into the linear."""
        const_idx = next((i for i, v in enumerate(node.inputs) if constant_array(v) is not None), None)
        if const_idx is None:
            raise StreamRefused(f"Mul {node.name} on the stream has no constant operand")
        lam = constant_array(node.inputs[const_idx])
        other = node.inputs[1 - const_idx]
        lin = by_output.get(id(other))
        if lin is None or axis != -1 or lam.size != width or lam.shape[-1] != width:
            raise StreamRefused(f"Mul {node.name} scales the stream but is not a per-channel scale after a linear")
        if len(live_uses(other, graph)) != 1:
            raise StreamRefused(f"linear {lin.name} output is read besides its LayerScale {node.name}")
        closure.scales.append((node, lin, lam.reshape(-1).astype(np.float64)))
        closure.expected_uses.add((id(node), 1 - const_idx))
        closure.values[id(other)] = (other, axis)
        closure.writers.append(lin)

    def _reshape_axis(node: ir.Node, axis: int) -> int:
        src, dst = node.inputs[0], node.outputs[0]
        if src.shape is None or dst.shape is None:
            raise StreamRefused(f"Reshape {node.name} has unknown shapes; the channel axis cannot be tracked")
        in_axis = reshape_channel_axis(list(dst.shape.dims), list(src.shape.dims), axis % len(dst.shape))
        if in_axis is None:
            raise StreamRefused(f"Reshape {node.name} does not keep the channel axis whole")
        return in_axis - len(src.shape)

    for node in norms:
        visit(node.inputs[0], -1)
    # Rule 3: the closure's values are read only by the closure, the norms (input 0) and Shape.
    for value, _ in closure.values.values():
        for use in live_uses(value, graph):
            node = use.node
            if (id(node), use.idx) in closure.expected_uses or node.op_type == "Shape":
                continue
            if id(node) in norm_ids and use.idx == 0:
                continue
            raise StreamRefused(f"stream value {value.name} is read by {node.op_type} {node.name}, which does not "
                                f"commute with the {transform}: it would see the transformed stream (it is on no path "
                                "into a norm: the stream is read without a norm, e.g. a hidden state taken before the "
                                "final norm)")
    closure.writers = list({id(lin.node): lin for lin in closure.writers}.values())
    return closure


def _right_multiply(array: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``array`` with its ``axis`` right-multiplied by ``matrix`` (in float64, stored back in the array's dtype)."""
    moved = np.moveaxis(array.astype(np.float64), axis, -1) @ matrix
    return np.moveaxis(moved, -1, axis).astype(array.dtype)


def apply_transform(graph: ir.Graph, closure: StreamClosure, matrix: np.ndarray, tag: str,
                    rows: dict[str, dict[str, Any]]) -> None:
    """Fold LayerScales, then right-multiply every tensor written into the stream by ``matrix`` (rule 2)."""

    def row(name: str, kind: str) -> dict[str, Any]:
        return rows.setdefault(name, {"name": name, "kind": kind})

    for mul, lin, lam in closure.scales:
        own_weight(graph, lin)
        set_weight(lin, lin.weight_array().astype(np.float64) * lam[None, :])
        if lin.bias is not None:
            own_bias(graph, lin)
            set_bias(lin, constant_array(lin.bias).astype(np.float64) * lam)
        out = mul.outputs[0]
        for use in live_uses(out, graph):
            use.node.replace_input_with(use.idx, lin.output)
        graph.remove(mul, safe=True)
        row(lin.name, "writer")["layer_scale_folded"] = round(float(np.max(np.abs(lam))), 6)
    for node, idx, axis in closure.constants:
        value = node.inputs[idx]
        array = constant_array(value)
        new = add_initializer(graph, f"{value.name}.{tag}", _right_multiply(array, matrix, axis))
        node.replace_input_with(idx, new)
        row(value.name, "constant")[tag] = f"axis {axis}"
    for conv in closure.convs:
        weight = constant_array(conv.inputs[1])
        new_w = _right_multiply(weight, matrix, 0)
        conv.replace_input_with(1, add_initializer(graph, f"{conv.inputs[1].name}.{tag}", new_w))
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias = constant_array(conv.inputs[2])
            conv.replace_input_with(2, add_initializer(graph, f"{conv.inputs[2].name}.{tag}", _right_multiply(bias, matrix, 0)))
        row(conv.name or "conv", "conv")[tag] = "output channels"
    for lin in closure.writers:
        own_weight(graph, lin)
        set_weight(lin, lin.weight_array().astype(np.float64) @ matrix)
        if lin.bias is not None:
            own_bias(graph, lin)
            set_bias(lin, constant_array(lin.bias).astype(np.float64) @ matrix)
        row(lin.name, "writer")[tag] = "output side"


def add_bias(graph: ir.Graph, lin: Linear, bias: np.ndarray) -> None:
    """Give a bias-less linear the bias ``bias`` (a Gemm C input, or an Add after the MatMul)."""
    dtype = constant_array(lin.weight).dtype
    value = add_initializer(graph, f"{lin.name}.bias", bias.astype(dtype))
    if lin.node.op_type == "Gemm":
        while len(lin.node.inputs) < 3:
            lin.node.resize_inputs(len(lin.node.inputs) + 1)
        lin.node.replace_input_with(2, value)
        lin.bias = value
        return
    out = lin.node.outputs[0]
    uses = live_uses(out, graph)
    add = ir.node("Add", [out, value], name=f"{lin.name}/bias")
    add.outputs[0].name = f"{out.name}_biased"
    add.outputs[0].dtype = out.dtype
    add.outputs[0].shape = out.shape
    graph.insert_after(lin.node, [add])
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    lin.bias, lin.bias_node = value, add


#: Ops a norm's output may pass through on its way to reader linears: they only select, move or average tokens,
#: each output channel c a combination with weights summing to one of input channel c, so y·diag(γ) + β and y·R
#: pass through them unchanged.
TOKEN_OPS = {"Slice", "Gather", "Reshape", "Transpose", "AveragePool", "Concat", "Identity"}


def norm_output_readers(graph: ir.Graph, node: ir.Node, linear_nodes: dict[int, Linear]) -> list[Linear] | None:
    """:func:`norm_readers`, or None where it refuses (the caller then keeps the norm's output as it is)."""
    try:
        return norm_readers(graph, node, linear_nodes)
    except StreamRefused:
        return None


def norm_readers(graph: ir.Graph, node: ir.Node, linear_nodes: dict[int, Linear]) -> list[Linear]:
    """The linears that read a norm's output, directly or through token-only ops (``TOKEN_OPS``: the tiny VLM's CLS
    split and 2x2 patch pooling), when nothing else reads it or any value on the way; else :class:`StreamRefused`
    naming the reader and why.

    Each op on the way is checked to keep the channel axis whole and to mix only along other axes with unit-sum
    weights: Slice/Gather on another axis (constant axes/indices), Reshape proven by the shapes, Transpose,
    AveragePool over spatial axes of NCHW (channel axis 1) without counted padding, Concat along another axis of
    values that all come from this norm.
    """
    out = node.outputs[0]
    axes: dict[int, int] = {id(out): _rank_or(out) - 1}
    readers: dict[int, Linear] = {}
    concats: list[ir.Node] = []
    frontier = [out]
    while frontier:
        value = frontier.pop()
        if value in graph.outputs:
            raise StreamRefused(f"norm {node.name} output {value.name} is a graph output")
        axis = axes[id(value)]
        uses = live_uses(value, graph)
        if not uses:
            raise StreamRefused(f"norm {node.name} output {value.name} is unused")
        for use in uses:
            user = use.node
            lin = linear_nodes.get(id(user))
            if lin is not None:
                if use.idx != 0 or axis != _rank_or(value) - 1:
                    raise StreamRefused(f"norm {node.name} output reaches linear {lin.name} as its weight or with the "
                                        "channels not on the last axis")
                readers[id(user)] = lin
                continue
            if not is_default_domain(user) or user.op_type not in TOKEN_OPS or (use.idx != 0 and user.op_type != "Concat"):
                raise StreamRefused(f"norm {node.name} output is read by {user.op_type} {user.name}, not a linear")
            new_axis = _token_op_axis(user, axis)
            if new_axis is None:
                raise StreamRefused(f"norm {node.name} output goes through {user.op_type} {user.name}, which is not "
                                    "proven to move or average whole tokens only")
            if user.op_type == "Concat":
                concats.append(user)
            result = user.outputs[0]
            if id(result) in axes:
                if axes[id(result)] != new_axis:
                    raise StreamRefused(f"{result.name} is reached from norm {node.name} with two channel axes")
                continue
            axes[id(result)] = new_axis
            frontier.append(result)
    for cat in concats:
        if any(id(v) not in axes for v in cat.inputs):
            raise StreamRefused(f"Concat {cat.name} also joins values that do not come from norm {node.name}")
    if not readers:
        raise StreamRefused(f"no linear reads the output of norm {node.name}")
    return list(readers.values())


def _rank_or(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else -1


def _token_op_axis(node: ir.Node, axis: int) -> int | None:
    """The channel axis of ``node``'s output when it is a token-only op for input channel ``axis``, else None."""
    op, src, dst = node.op_type, node.inputs[0], node.outputs[0]
    rank = _rank_or(src)
    if rank < 0 or dst.shape is None:
        return None
    if op == "Identity":
        return axis
    if op == "Transpose":
        perm = [int(p) for p in node.attributes["perm"].as_ints()]
        return perm.index(axis)
    if op == "Concat":
        cat_axis = node.attributes["axis"].as_int() % rank
        return None if cat_axis == axis else axis
    if op == "Slice":
        if len(node.inputs) < 4 or node.inputs[3] is None:
            return None
        slice_axes = constant_array(node.inputs[3])
        if slice_axes is None or any(int(a) % rank == axis for a in slice_axes.reshape(-1)):
            return None
        return axis
    if op == "Gather":
        attr = node.attributes.get("axis")
        gather_axis = (attr.as_int() if attr is not None else 0) % rank
        indices = constant_array(node.inputs[1])
        if gather_axis == axis or indices is None:
            return None
        return axis if gather_axis > axis else axis - 1 + indices.ndim
    if op == "Reshape":
        return reshape_channel_axis(list(src.shape.dims), list(dst.shape.dims), axis)
    if op == "AveragePool":
        pads = node.attributes.get("pads")
        auto_pad = node.attributes.get("auto_pad")
        include = node.attributes.get("count_include_pad")
        padded = (pads is not None and any(pads.as_ints())) or (
            auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"))
        if axis != 1 or (padded and include is not None and include.as_int()):
            return None
        return 1
    return None
