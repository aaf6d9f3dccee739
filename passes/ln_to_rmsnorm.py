"""LayerNorm → RMSNorm for pre-LN encoders (spec/algorithms.md §2.5, the SliceGPT identity), folded into the weights.

With C = I − (1/d)·11ᵀ and the same ε, LN(x) = RMSNorm₀(x·C)·diag(γ) + β. If every tensor written into the residual
stream is centred (its channel mean is zero), the stream itself is zero-mean, x·C = x, and each LayerNorm can be
replaced by an affine-free ``RMSNormalization`` (opset 23) once its γ/β are folded into the linears that read it.
The stream then commutes with an orthogonal rotation (§2.6), which LN does not (CR ≠ RC).

Rules, in the order the pass applies them (everything is analysed first; a refusal changes nothing):

1. Every ``LayerNormalization`` (``fuse_norms`` turns decomposed ones into these) normalizes the last axis and has a
   constant γ (and β, if any). A LayerNorm whose input is a residual sum (``Add`` of a linear's output) and whose
   output is itself added into a residual stream is *post-LN* (BERT-like; sandwich-LN): refused, because its γ/β
   sit on the residual path and cannot fold into a following linear (§2.5, post-LN paragraph).
2. The *stream closure*: from every LayerNorm input, the pass walks back through what produced it, tracking the
   channel axis: residual ``Add`` (both operands), ``Concat`` along another axis, ``Expand``, ``Transpose``,
   ``Reshape`` (only when the shapes prove the channel axis and everything before it are kept), ``Identity``.
   It ends at what can absorb a right-multiplication M of the channel axis (M = C here, M = R_v in
   ``hadamard_rotation``'s vision mode):
   * a constant (class token, position embeddings; per use, so shared constants are copied): rows ← rows·M;
   * a ``Conv`` with constant weight (patch embedding, channel axis 1): weight [out, in, kh, kw] contracted with M
     over ``out``, bias ← bias·M ("bake_mean_into_conv");
   * a linear of the model map (attention output, fc2, any residual writer): W ← W·M, b ← b·M
     ("bake_mean_into_linear"); a constant per-channel ``Mul`` right after it (LayerScale λ) is first folded
     into it (W ← W·diag(λ), b ← b·λ) and removed;
   * a LayerNorm output that starts the stream (CLIP/Qwen-VL ``ln_pre``): an explicit centring linear
     ``MatMul(·, diag(γ)·C) + β·C`` is inserted after it (``fc_sub_mean``) and that LayerNorm becomes affine-free.
   Anything else (a graph input, an activation, a Mul by a non-constant, a broadcast over channels) refuses the
   whole pass with the value and the op that produced it.
3. Every value of the closure may only be read by the closure itself, by LayerNorms (input 0) or by ``Shape``: any
   other reader (a hidden state that is a graph output, a linear reading the raw stream) would see the centred
   stream, so the pass is refused with that reader named.
4. Each LayerNorm's γ/β fold into its readers when every reader is a linear (input side), directly or through
   token-only ops (``TOKEN_OPS``: CLS split, patch pooling, as before the tiny VLM's projector): W ← diag(γ)·W,
   b ← b + βᵀ·W with the original W (a bias ``Add`` is created for a linear that had none). Otherwise the affine is
   kept as explicit ``Mul(γ)`` / ``Add(β)`` after the norm (recorded with the readers that prevented the fold).
5. Each LayerNorm is replaced by ``RMSNormalization(x, 1, axis=-1, epsilon=ε)`` with its own ε (opset raised to 23
   first). Records: per norm what was folded (or kept), per writer/constant what was centred.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from mqc.passes.canonicalize import upgrade_opset
from mqc.passes.norm_folding import live_uses, own_bias, own_weight, set_bias, set_weight

from mqc.ir import TARGET_OPSET, add_initializer, constant_array, default_opset, remove_unused_initializers
from mqc.model_map import Linear, ModelMap
from mqc.pass_manager import MqcPass

PASSTHROUGH = {"Identity"}


class StreamRefused(Exception):
    """The stream has a structure the transformation cannot prove exact; the message is the recorded reason."""


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _rank(value: ir.Value) -> int:
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
    ``norm_outputs``: LayerNorm nodes whose output starts the stream; ``values``: every value of the closure.
    """

    width: int
    constants: list[tuple[ir.Node, int, int]] = field(default_factory=list)
    convs: list[ir.Node] = field(default_factory=list)
    writers: list[Linear] = field(default_factory=list)
    scales: list[tuple[ir.Node, Linear, np.ndarray]] = field(default_factory=list)
    norm_outputs: list[ir.Node] = field(default_factory=list)
    values: dict[int, tuple[ir.Value, int]] = field(default_factory=dict)
    expected_uses: set[tuple[int, int]] = field(default_factory=set)


def trace_stream(graph: ir.Graph, model_map: ModelMap, starts: list[ir.Value], width: int,
                 norm_ops: set[str], allow_norm_outputs: bool) -> StreamClosure:
    """Walk back from ``starts`` (norm inputs) and collect what writes the stream (rule 2); check readers (rule 3)."""
    closure = StreamClosure(width)
    by_output = {id(lin.output): lin for lin in model_map.linears}
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
        lin = by_output.get(key)
        if lin is not None:
            if axis != _rank(value) - 1:
                raise StreamRefused(f"linear {lin.name} writes the stream with channels on axis {axis}, not the last")
            closure.writers.append(lin)
            return
        producer = value.producer()
        if producer is None:
            raise StreamRefused(f"stream value {value.name} is a graph input: nothing can absorb the transform")
        if id(producer) in seen_nodes:
            return
        seen_nodes.add(id(producer))
        op = producer.op_type if _is_default(producer) else f"{producer.domain}::{producer.op_type}"
        rank = _rank(value)
        if op in norm_ops and allow_norm_outputs:
            closure.norm_outputs.append(producer)
        elif op == "Add":
            for idx, operand in enumerate(producer.inputs):
                _operand(producer, idx, operand, axis, rank)
        elif op == "Mul":
            _layer_scale(producer, axis, rank)
        elif op == "Concat":
            cat_axis = producer.attributes["axis"].as_int() % rank
            if cat_axis == axis:
                raise StreamRefused(f"Concat {producer.name} joins along the channel axis")
            for idx, operand in enumerate(producer.inputs):
                _operand(producer, idx, operand, axis, rank)
        elif op == "Expand":
            _operand(producer, 0, producer.inputs[0], axis, rank)
        elif op == "Transpose":
            perm = [int(p) for p in producer.attributes["perm"].as_ints()]
            _follow(producer, 0, perm[axis])
        elif op == "Reshape":
            _follow(producer, 0, _reshape_axis(producer, axis))
        elif op in PASSTHROUGH:
            _follow(producer, 0, axis)
        elif op == "Conv":
            weight = constant_array(producer.inputs[1])
            if axis != 1 or weight is None or weight.shape[0] != width:
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
                                "a transform of the channels")

    def _follow(node: ir.Node, idx: int, axis: int) -> None:
        closure.expected_uses.add((id(node), idx))
        visit(node.inputs[idx], axis)

    def _operand(node: ir.Node, idx: int, operand: ir.Value | None, axis: int, rank: int) -> None:
        if operand is None:
            raise StreamRefused(f"{node.op_type} {node.name} has a missing operand")
        if constant_array(operand) is not None:
            array = constant_array(operand)
            op_axis = axis - (rank - array.ndim)
            if op_axis < 0 or array.shape[op_axis] != width:
                raise StreamRefused(f"constant {operand.name} of {node.op_type} {node.name} broadcasts over channels")
            closure.constants.append((node, idx, op_axis))
            return
        op_rank = _rank(operand)
        op_axis = axis - (rank - op_rank)
        dims = operand.shape.dims
        if op_axis < 0 or not _dim_equal(dims[op_axis], width):
            raise StreamRefused(f"{operand.name} of {node.op_type} {node.name} broadcasts over channels")
        _follow(node, idx, op_axis)

    def _layer_scale(node: ir.Node, axis: int, rank: int) -> None:
        """A constant per-channel Mul right after a linear (LayerScale): fold it into the linear."""
        const_idx = next((i for i, v in enumerate(node.inputs) if constant_array(v) is not None), None)
        if const_idx is None:
            raise StreamRefused(f"Mul {node.name} on the stream has no constant operand")
        lam = constant_array(node.inputs[const_idx])
        other = node.inputs[1 - const_idx]
        lin = by_output.get(id(other))
        if lin is None or axis != rank - 1 or lam.size != width or lam.shape[-1] != width:
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
        in_axis = reshape_channel_axis(list(dst.shape.dims), list(src.shape.dims), axis)
        if in_axis is None:
            raise StreamRefused(f"Reshape {node.name} does not keep the channel axis whole")
        return in_axis

    for start in starts:
        visit(start, _rank(start) - 1)
    # Rule 3: the closure's values are read only by the closure, norms (input 0) and Shape.
    for value, _ in closure.values.values():
        for use in live_uses(value, graph):
            node = use.node
            if (id(node), use.idx) in closure.expected_uses or node.op_type == "Shape":
                continue
            if node.op_type in norm_ops and use.idx == 0:
                continue
            raise StreamRefused(f"stream value {value.name} is also read by {node.op_type} {node.name}, which would "
                                "see the transformed stream (it is on no path into a norm: the stream is read without "
                                "a norm, e.g. a hidden state taken before the final norm)")
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
    """The linears that read a norm's output, directly or through token-only ops (``TOKEN_OPS``: the tiny VLM's CLS
    split and 2x2 patch pooling), when nothing else reads it or any value on the way; else None.

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
            return None
        axis = axes[id(value)]
        uses = live_uses(value, graph)
        if not uses:
            return None
        for use in uses:
            user = use.node
            lin = linear_nodes.get(id(user))
            if lin is not None:
                if use.idx != 0 or axis != _rank_or(value) - 1:
                    return None
                readers[id(user)] = lin
                continue
            if not _is_default(user) or user.op_type not in TOKEN_OPS or (use.idx != 0 and user.op_type != "Concat"):
                return None
            new_axis = _token_op_axis(user, axis)
            if new_axis is None:
                return None
            if user.op_type == "Concat":
                concats.append(user)
            result = user.outputs[0]
            if id(result) in axes:
                if axes[id(result)] != new_axis:
                    return None
                continue
            axes[id(result)] = new_axis
            frontier.append(result)
    if any(id(v) not in axes for cat in concats for v in cat.inputs):
        return None  # a Concat also joins values that do not come from this norm
    return list(readers.values()) or None


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


class LayerNormToRMSNormPass(MqcPass):
    """Centre the residual stream, fold LayerNorm affines into their readers, replace LayerNorm by RMSNorm₀."""

    name = "ln_to_rmsnorm"
    function_preserving = True

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        model_map = self.ctx.model_map(model)
        norms = [n.node for n in model_map.norms if n.node.op_type == "LayerNormalization" and _is_default(n.node)]
        others = [n for n in model_map.norms if n.kind == "layernorm" and n.node not in norms]
        self.record.matched = len(norms)
        if not norms:
            self.record.notes.append("no LayerNormalization in the graph: nothing to convert")
            return False
        try:
            if others:
                raise StreamRefused(f"{others[0].name} is a {others[0].node.op_type}, not a plain LayerNormalization")
            width = self._check_norms(graph, model_map, norms)
            closure = trace_stream(graph, model_map, [n.inputs[0] for n in norms], width,
                                   {"LayerNormalization"}, allow_norm_outputs=True)
            linear_nodes = {id(lin.node): lin for lin in model_map.linears}
            for lin in closure.writers:
                if self.ctx.excluded(lin.name):
                    raise StreamRefused(f"writer {lin.name} matches --exclude, but every stream writer must be centred")
        except StreamRefused as exc:
            self.record.skip("model", str(exc))
            return False
        if default_opset(model) < TARGET_OPSET:
            upgrade_opset(model)
            self.record.notes.append(f"opset raised to {TARGET_OPSET} for RMSNormalization")
        rows: dict[str, dict[str, Any]] = {}
        centring = np.eye(width) - np.full((width, width), 1.0 / width)
        apply_transform(graph, closure, centring, "centred", rows)
        for node in closure.norm_outputs:
            self._centre_norm_output(graph, node, centring, rows)
        for node in norms:
            if node in closure.norm_outputs:
                continue
            self._convert(graph, node, linear_nodes, rows)
        remove_unused_initializers(graph)
        self.record.changed = len(norms)
        self.record.layers.extend(rows.values())
        self.record.notes.append(
            f"residual stream of width {width} centred: {len(closure.writers)} writers, {len(closure.convs)} convs, "
            f"{len(closure.constants)} constants, {len(closure.scales)} LayerScales folded"
        )
        return True

    def _check_norms(self, graph: ir.Graph, model_map: ModelMap, norms: list[ir.Node]) -> int:
        writer_outputs = {id(lin.output) for lin in model_map.linears}
        widths = set()
        for node in norms:
            name = node.name
            axis = node.attributes.get("axis")
            rank = _rank(node.inputs[0])
            if axis is not None and axis.as_int() % rank != rank - 1:
                raise StreamRefused(f"LayerNorm {name} normalizes axis {axis.as_int()}, not the last")
            gamma = constant_array(node.inputs[1])
            beta = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if gamma is None or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None):
                raise StreamRefused(f"LayerNorm {name} has a non-constant scale or bias")
            widths.add(int(gamma.reshape(-1).shape[0]))
            producer = node.inputs[0].producer()
            residual_in = producer is not None and producer.op_type == "Add" and any(
                id(v) in writer_outputs or (v is not None and v.producer() is not None and v.producer().op_type == "Mul"
                                            and any(id(w) in writer_outputs for w in v.producer().inputs))
                for v in producer.inputs)
            feeds_add = any(use.node.op_type == "Add" for use in live_uses(node.outputs[0], graph))
            if residual_in and feeds_add:
                raise StreamRefused(
                    f"LayerNorm {name} is applied after the residual add and its output is added into the stream "
                    "(post-LN / sandwich-LN, BERT-like): its γ/β sit on the residual path and cannot be folded into a "
                    "following linear (spec §2.5)"
                )
        if len(widths) != 1:
            raise StreamRefused(f"LayerNorms of several widths {sorted(widths)}: more than one stream")
        return widths.pop()

    def _rms_node(self, graph: ir.Graph, node: ir.Node, scale_name: str) -> ir.Node:
        x = node.inputs[0]
        gamma = constant_array(node.inputs[1])
        eps = node.attributes.get("epsilon")
        epsilon = eps.as_float() if eps is not None else 1e-5
        ones = add_initializer(graph, scale_name, np.ones(gamma.reshape(-1).shape, dtype=gamma.dtype))
        rms = ir.node("RMSNormalization", [x, ones], attributes={"axis": -1, "epsilon": epsilon}, name=f"{node.name}/rms")
        out = rms.outputs[0]
        out.name = f"{node.outputs[0].name}_rms"
        out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
        rms.metadata_props.update(node.metadata_props)
        graph.insert_before(node, [rms])
        return rms

    def _affine(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        gamma = constant_array(node.inputs[1]).reshape(-1).astype(np.float64)
        beta = (constant_array(node.inputs[2]).reshape(-1).astype(np.float64)
                if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros_like(gamma))
        return gamma, beta

    def _convert(self, graph: ir.Graph, node: ir.Node, linear_nodes: dict[int, Linear],
                 rows: dict[str, dict[str, Any]]) -> None:
        name = _norm_name(node)
        gamma, beta = self._affine(node)
        readers = norm_output_readers(graph, node, linear_nodes)
        if readers is not None and any(self.ctx.excluded(lin.name) for lin in readers):
            readers = None
        rms = self._rms_node(graph, node, f"{name}.rms_scale")
        out = rms.outputs[0]
        entry = {"name": name, "kind": "norm", "epsilon": float(rms.attributes["epsilon"].as_float()),
                 "gamma_absmax": round(float(np.max(np.abs(gamma))), 6), "beta_absmax": round(float(np.max(np.abs(beta))), 6)}
        if readers is not None:
            for lin in readers:
                own_weight(graph, lin)
                weight = lin.weight_array().astype(np.float64)
                shift = beta @ weight
                set_weight(lin, gamma[:, None] * weight)
                if lin.bias is not None:
                    own_bias(graph, lin)
                    set_bias(lin, constant_array(lin.bias).astype(np.float64) + shift)
                elif np.any(shift != 0):
                    add_bias(graph, lin, shift)
            entry["folded_into"] = [lin.name for lin in readers]
        else:
            readers_desc = sorted({f"{u.node.op_type} {u.node.name}" for u in live_uses(node.outputs[0], graph)})
            dtype = constant_array(node.inputs[1]).dtype
            extra = []
            if np.any(gamma != 1.0):
                g = add_initializer(graph, f"{name}.gamma", gamma.astype(dtype))
                mul = ir.node("Mul", [out, g], name=f"{node.name}/gamma")
                extra.append(mul)
                out = mul.outputs[0]
            if np.any(beta != 0.0):
                b = add_initializer(graph, f"{name}.beta", beta.astype(dtype))
                add = ir.node("Add", [out, b], name=f"{node.name}/beta")
                extra.append(add)
                out = add.outputs[0]
            for n in extra:
                n.outputs[0].dtype, n.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
            graph.insert_before(node, extra)
            entry["affine_kept"] = "readers are not all linears: " + ", ".join(readers_desc or ["graph output"])
        _replace_output(graph, node, out)
        rows[name] = entry

    def _centre_norm_output(self, graph: ir.Graph, node: ir.Node, centring: np.ndarray,
                            rows: dict[str, dict[str, Any]]) -> None:
        """A LayerNorm output starts the stream: RMSNorm₀ then an explicit centring linear diag(γ)·C, β·C."""
        name = _norm_name(node)
        gamma, beta = self._affine(node)
        dtype = constant_array(node.inputs[1]).dtype
        rms = self._rms_node(graph, node, f"{name}.rms_scale")
        weight = add_initializer(graph, f"{name}.centre.weight", (gamma[:, None] * centring).astype(dtype))
        bias = add_initializer(graph, f"{name}.centre.bias", (beta @ centring).astype(dtype))
        matmul = ir.node("MatMul", [rms.outputs[0], weight], name=f"{name}.centre")
        add = ir.node("Add", [matmul.outputs[0], bias], name=f"{name}.centre/bias")
        for n in (matmul, add):
            n.outputs[0].dtype, n.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        graph.insert_before(node, [matmul, add])
        _replace_output(graph, node, add.outputs[0])
        rows[name] = {"name": name, "kind": "norm", "folded_into": [f"{name}.centre"],
                      "centring_linear": "inserted: the stream starts at this norm's output"}


def _norm_name(node: ir.Node) -> str:
    from mqc.model_map import module_path

    return module_path(node) or node.name or "LayerNormalization"


def _replace_output(graph: ir.Graph, node: ir.Node, new: ir.Value) -> None:
    old = node.outputs[0]
    for use in live_uses(old, graph):
        use.node.replace_input_with(use.idx, new)
    if old in graph.outputs:
        graph.outputs[graph.outputs.index(old)] = new
        new.name, old.name = old.name, f"{old.name}_replaced"
    graph.remove(node, safe=True)
