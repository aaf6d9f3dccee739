"""Bring graphs written by other exporters into the one form the passes read.

``torch.onnx.export`` (dynamo and TorchScript), onnxruntime-genai's builder and older vision exports write the
same model in different shapes. These rewrites close the gaps the model map cannot see through; each keeps what
the graph computes exactly (``canonicalize.FuseNormsPass`` runs them, ``--verify`` checks them):

1. **Transposed weights** (:func:`materialize_transposed_weights`): ``MatMul(X, Transpose(W))`` with a constant
   2-D ``W`` is how a tied ``lm_head`` reads the embedding table (the exporter cannot fold the transpose of a
   table the embedding ``Gather`` also reads); onnxruntime-genai ties the other way, ``Gather(Transpose(W))``.
   The reader gets its own transposed copy, so the MatMul is a linear of the model map and the two readers are
   untied: a pass may change either.
2. **Decomposed norms** (:func:`fuse_decomposed_norms`): ``x · 1/sqrt(mean(x²) + eps) · γ`` (RMSNorm) and
   ``(x − mean(x)) / sqrt(mean((x − mean)²) + eps) · γ + β`` (LayerNorm) over the last axis become one
   ``RMSNormalization`` / ``LayerNormalization`` node. Types and shapes are inferred first (TorchScript declares
   none inside the graph) and no-op ``Cast``s (its ``x.float()`` on fp32) removed. The matcher reads through
   ``Div(1, s)`` or ``Reciprocal(s)`` then ``Mul``, or ``Div(x, s)``, operands in either order, ``ReduceMean`` axes
   as an attribute (opset < 18) or an input, and a Gemma ``(1 + w)`` gamma left as ``Add(1, w)`` of constants.
   ``Shape`` of a norm's output reads its input instead. Needs opset 17 / 23, which ``canonicalize`` sets first.
3. **onnxruntime fused ops** (:func:`unfuse_skip_norms`, :func:`split_packed_qkv`): ``Skip(Simplified)Layer
   Normalization`` becomes an Add and a standard norm; a packed qkv MatMul feeding ``GroupQueryAttention`` becomes
   q/k/v MatMuls on its separate inputs.
4. **Constants** (:func:`inline_constant_identities`, :func:`fold_constant_subgraphs`): ``Identity`` of a
   constant is read through; subgraphs of constants (a position table behind a ``Resize``) are evaluated; a
   ``Reshape`` whose target copies its input's leading dims through ``Shape`` (TorchScript's ``flatten(2)`` with a
   dynamic batch) gets a constant target (:func:`constant_reshape_targets`), so the channel axis can be followed.
5. **Stream entry** (:func:`absorb_into_embedding`): the rotation's R1 goes into the embedding table when the
   stream starts at an embedding ``Gather``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mqc.graph.weights import widened_product
from mqc.ir import add_initializer, constant_array, replace_initializer
from mqc.model_map import NORM_OPS, embedding_gather, module_path, scope_path

NORM_OP_TYPES = {op for _, op in NORM_OPS}


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None


def _is_default(node: ir.Node, *ops: str) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ops


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of a binary node that is not ``value``."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is value:
        return node.inputs[1]
    if node.inputs[1] is value:
        return node.inputs[0]
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(-1)[0])


def _folded_constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant, through ``Identity`` (TorchScript's deduplicated initializers), or ``Add`` of two constants
    (Gemma's ``1 + w`` the exporter left unfolded)."""
    array = constant_array(value)
    if array is not None or value is None:
        return array
    producer = value.producer()
    if producer is not None and _is_default(producer, "Identity"):
        return _folded_constant(producer.inputs[0])
    if producer is not None and _is_default(producer, "Add") and len(producer.inputs) == 2:
        a, b = (constant_array(v) for v in producer.inputs)
        if a is not None and b is not None:
            return (a + b).astype(np.result_type(a, b))
    return None


def _dtype(value: ir.Value) -> ir.DataType | None:
    """The element type of ``value``: declared, or the target of the Cast that produced it (TorchScript graphs
    declare no intermediate types)."""
    if value.dtype is not None:
        return value.dtype
    producer = value.producer()
    if producer is not None and _is_default(producer, "Cast") and producer.attributes.get("to") is not None:
        return ir.DataType(producer.attributes["to"].as_int())
    return None


def _skip_noop_casts(value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """Follow single-use ``Cast`` nodes that keep ``dtype`` (fp32 -> fp32 in a TorchScript norm)."""
    while True:
        node = _single_use(value)
        if node is None or not _is_default(node, "Cast"):
            return value
        to = node.attributes.get("to")
        if dtype is None or to is None or to.as_int() != dtype.value:
            return value
        value = node.outputs[0]


def _last_axis_mean(node: ir.Node, rank: int | None) -> bool:
    """Whether a ReduceMean averages over the last axis only, keeping it."""
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and not keepdims.as_int():
        return False
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = list(attr.as_ints())
    else:
        array = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if array is None:
            return False
        axes = [int(a) for a in array.reshape(-1)]
    return axes == [-1] or (rank is not None and axes == [rank - 1])


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _squared(node: ir.Node) -> ir.Value | None:
    """``x`` when ``node`` computes ``x²`` (``Pow(x, 2)`` or ``Mul(x, x)``)."""
    if _is_default(node, "Pow") and _scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    if _is_default(node, "Mul") and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


@dataclass
class _Scaled:
    """``x · 1/sqrt(variance + eps)`` found after a variance ReduceMean: its output and epsilon."""

    output: ir.Value
    epsilon: float


def _divide_by_root(variance: ir.Value, numerator: ir.Value) -> _Scaled | None:
    """Match ``numerator / sqrt(variance + eps)`` in its exporter spellings, starting from ``variance``."""
    add = _single_use(variance)
    if add is None or not _is_default(add, "Add"):
        return None
    epsilon = _scalar(_other(add, variance))
    if epsilon is None:
        return None
    sqrt = _single_use(add.outputs[0])
    if sqrt is None or not _is_default(sqrt, "Sqrt"):
        return None
    root = sqrt.outputs[0]
    step = _single_use(root)
    if step is None:
        return None
    if _is_default(step, "Div") and step.inputs[1] is root:
        if step.inputs[0] is numerator:
            return _Scaled(step.outputs[0], epsilon)
        if _scalar(step.inputs[0]) != 1.0:
            return None
        inverse = step.outputs[0]
    elif _is_default(step, "Reciprocal"):
        inverse = step.outputs[0]
    else:
        return None
    mul = _single_use(inverse)
    if mul is None or not _is_default(mul, "Mul") or _other(mul, inverse) is not numerator:
        return None
    return _Scaled(mul.outputs[0], epsilon)


def _affine(normalized: ir.Value, dtype: ir.DataType | None, width: int | None, with_bias: bool) -> tuple[ir.Value, np.ndarray | None, np.ndarray | None]:
    """Follow an optional ``· γ`` (and ``+ β``) of 1-D constants of the last-axis width after a normalization."""
    value = _skip_noop_casts(normalized, dtype)
    gamma = beta = None
    mul = _single_use(value)
    if mul is not None and _is_default(mul, "Mul"):
        candidate = _folded_constant(_other(mul, value))
        if candidate is not None and candidate.ndim == 1 and (width is None or candidate.shape[0] == width):
            gamma, value = candidate, mul.outputs[0]
    if with_bias:
        add = _single_use(value)
        if add is not None and _is_default(add, "Add"):
            candidate = constant_array(_other(add, value))
            if candidate is not None and candidate.ndim == 1 and (width is None or candidate.shape[0] == width):
                beta, value = candidate, add.outputs[0]
    if value is normalized:
        return normalized, None, None
    return value, gamma, beta


def _width(value: ir.Value) -> int | None:
    if value.shape is None or not len(value.shape):
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


@dataclass
class _NormMatch:
    kind: str  # "rmsnorm" | "layernorm"
    source: ir.Value
    output: ir.Value
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None
    name: str


def _match_rms(reduce: ir.Node) -> _NormMatch | None:
    square = reduce.inputs[0].producer() if reduce.inputs[0] is not None else None
    if square is None:
        return None
    x = _squared(square)
    if x is None or not _last_axis_mean(reduce, _rank(x)):
        return None
    scaled = _divide_by_root(reduce.outputs[0], x)
    if scaled is None:
        return None
    width = _width(x)
    output, gamma, _ = _affine(scaled.output, _dtype(x), width, with_bias=False)
    return _NormMatch("rmsnorm", x, output, scaled.epsilon, gamma, None, _norm_name(reduce))



def _match_layernorm(reduce: ir.Node) -> _NormMatch | None:
    x = reduce.inputs[0]
    if x is None or not _last_axis_mean(reduce, _rank(x)):
        return None
    sub = _single_use(reduce.outputs[0])
    if sub is None or not _is_default(sub, "Sub") or sub.inputs[0] is not x or sub.inputs[1] is not reduce.outputs[0]:
        return None
    centred = sub.outputs[0]
    square = next((u.node for u in centred.uses() if _squared(u.node) is centred), None)
    if square is None:
        return None
    variance = _single_use(square.outputs[0])
    if variance is None or not _is_default(variance, "ReduceMean") or not _last_axis_mean(variance, _rank(x)):
        return None
    scaled = _divide_by_root(variance.outputs[0], centred)
    if scaled is None or len(list(centred.uses())) != 2:
        return None
    output, gamma, beta = _affine(scaled.output, _dtype(x), _width(x), with_bias=True)
    return _NormMatch("layernorm", x, output, scaled.epsilon, gamma, beta, _norm_name(reduce))


def _norm_name(node: ir.Node) -> str:
    path = module_path(node)
    if path:
        return path
    name = node.name or "norm"
    if name.startswith("/"):  # TorchScript: /model/layers.0/input_layernorm/ReduceMean
        return ".".join(p for p in name.strip("/").split("/")[:-1]) or name
    return name


def _replace(graph: ir.Graph, match: _NormMatch) -> None:
    source_type = _dtype(match.source)
    dtype = source_type.numpy() if source_type is not None else np.float32
    width = _width(match.source) or (match.gamma.shape[0] if match.gamma is not None else None)
    if width is None:
        raise ValueError("norm width unknown")
    gamma = match.gamma if match.gamma is not None else np.ones(width, dtype)
    inputs = [match.source, add_initializer(graph, f"{match.name}/fused.weight", gamma.astype(dtype))]
    if match.kind == "layernorm":
        beta = match.beta if match.beta is not None else np.zeros(width, dtype)
        inputs.append(add_initializer(graph, f"{match.name}/fused.bias", beta.astype(dtype)))
    op = "RMSNormalization" if match.kind == "rmsnorm" else "LayerNormalization"
    node = ir.node(op, inputs, attributes={"axis": -1, "epsilon": match.epsilon}, name=f"{match.name}/{op}")
    node.metadata_props["namespace"] = f"{match.name}: fused"
    out = node.outputs[0]
    out.dtype, out.shape = match.output.dtype, match.output.shape
    producer = match.output.producer()
    assert producer is not None
    graph.insert_after(producer, [node])
    if match.output in graph.outputs:
        graph.outputs[graph.outputs.index(match.output)] = out
        out.name, match.output.name = match.output.name, f"{match.output.name}_unfused"
    else:
        out.name = f"{match.name}/{op}_output"
    match.output.replace_all_uses_with(out)


def fuse_decomposed_norms(model: ir.Model) -> list[str]:
    """Replace every decomposed RMSNorm / LayerNorm over the last axis by one node; the fused norms' names."""
    graph = model.graph
    if model.opset_imports.get("", 0) < 17:
        return []
    _infer_types(model)
    _remove_noop_casts(graph)
    allow_rms = model.opset_imports.get("", 0) >= 23
    fused = []
    for node in list(graph):
        if node.graph is not graph or not _is_default(node, "ReduceMean"):
            continue  # (a node of an already fused norm was removed with it: its graph is None)
        match = _match_layernorm(node) or (_match_rms(node) if allow_rms else None)
        if match is None or (_width(match.source) is None and match.gamma is None):
            continue  # no width to build the norm's scale from
        _replace(graph, match)
        _remove_dead_nodes(graph)
        fused.append(f"{match.name} ({match.kind})")
    _read_shapes_before_norms(graph)
    return fused


def _read_shapes_before_norms(graph: ir.Graph) -> None:
    """``Shape(norm(x))`` becomes ``Shape(x)`` (a norm keeps the shape), so a norm's output is read by linears only
    (TorchScript reads the head count from the normalized value's shape)."""
    for node in graph:
        if not _is_default(node, "Shape") or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type in NORM_OP_TYPES and producer.inputs[0] is not None:
            node.replace_input_with(0, producer.inputs[0])


def _infer_types(model: ir.Model) -> None:
    """ONNX shape inference: TorchScript declares no types inside the graph (a Cast must be told a no-op) and the
    opset converter leaves channel widths symbolic (a stream trace needs them); a model the checker cannot infer
    (custom ops) keeps the shapes it declares."""
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    except Exception:
        return


def _remove_noop_casts(graph: ir.Graph) -> None:
    """Readers of a ``Cast`` to the type its input already has read the input (TorchScript's ``x.float()``)."""
    for node in list(graph):
        if not _is_default(node, "Cast") or node.inputs[0] is None or node.outputs[0] in graph.outputs:
            continue
        source, to = node.inputs[0], node.attributes.get("to")
        if source.dtype is not None and to is not None and source.dtype.value == to.as_int():
            node.outputs[0].replace_all_uses_with(source)
            graph.remove(node, safe=True)


def _remove_dead_nodes(graph: ir.Graph) -> None:
    outputs = set(map(id, graph.outputs))
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if any(id(o) in outputs or list(o.uses()) for o in node.outputs):
                continue
            graph.remove(node, safe=True)
            changed = True


def materialize_transposed_weights(graph: ir.Graph) -> list[str]:
    """Give every ``MatMul(X, Transpose(W))`` of a constant 2-D ``W`` its own [in, out] weight, and every embedding
    ``Gather(Transpose(W), ids)`` its own table (onnxruntime-genai ties the other way round); notes per node."""
    notes = []
    for node in list(graph):
        if _is_default(node, "MatMul") and len(node.inputs) == 2:
            index = 1
        elif _is_default(node, "Gather") and len(node.inputs) == 2:
            index = 0
        else:
            continue
        transpose = node.inputs[index].producer() if node.inputs[index] is not None else None
        if transpose is None or not _is_default(transpose, "Transpose"):
            continue
        table = transpose.inputs[0]
        array = constant_array(table)
        perm = transpose.attributes.get("perm")
        if array is None or array.ndim != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        name = module_path(node) or scope_path(node.name) or "linear"
        copy = add_initializer(graph, f"{name}.weight_t", np.ascontiguousarray(array.T))
        node.replace_input_with(index, copy)
        readers = sorted({u.node.op_type for u in table.uses() if u.node is not transpose})
        shared = f", shared with {'/'.join(readers)}: untied" if readers else ""
        notes.append(f"{name}: {node.op_type} read Transpose({table.name}){shared}; given its own transposed copy")
        if not list(transpose.outputs[0].uses()):
            graph.remove(transpose, safe=True)
    return notes


def absorb_into_embedding(graph: ir.Graph, entry: ir.Value, matrix: np.ndarray) -> str | None:
    """Right-multiply the embedding table that produces ``entry`` by ``matrix`` (E ← E·M), so the stream enters
    transformed with no node added; the table is copied first when anything else reads it (a tied lm_head).
    Returns the table's name, or None when ``entry`` does not come from an embedding ``Gather``."""
    gather = embedding_gather(entry)
    if gather is None:
        return None
    table = gather.inputs[0]
    array = constant_array(table)
    assert array is not None
    rotated = widened_product(array, matrix, array.dtype, split="rows")
    others = [u for u in table.uses() if u.node is not gather] or table in graph.outputs
    if others or table.const_value is None:
        copy = add_initializer(graph, f"{table.name}.rotated", rotated)
        gather.replace_input_with(0, copy)
        return copy.name
    replace_initializer(table, rotated)
    return table.name


def inline_constant_identities(graph: ir.Graph) -> int:
    """Readers of ``Identity(constant)`` read the constant (TorchScript writes deduplicated or tied parameters as
    Identity nodes, which hides a bias or a gamma from the model map); the number of Identities removed."""
    removed = 0
    for node in list(graph):
        if not _is_default(node, "Identity") or node.outputs[0] in graph.outputs:
            continue
        source = node.inputs[0]
        if source is None or constant_array(source) is None:
            continue
        node.outputs[0].replace_all_uses_with(source)
        graph.remove(node, safe=True)
        removed += 1
    return removed


#: onnxruntime's fused norms (any domain) and the standard op each one's normalization is.
FUSED_NORMS = {"SimplifiedLayerNormalization": "RMSNormalization", "SkipSimplifiedLayerNormalization": "RMSNormalization",
               "SkipLayerNormalization": "LayerNormalization"}


def unfuse_skip_norms(model: ir.Model) -> list[str]:
    """onnxruntime-genai's ``SkipSimplifiedLayerNormalization(x, skip, γ[, bias])`` becomes ``s = x + skip (+ bias)``
    and ``RMSNormalization(s, γ)``, its residual output (index 3) reading ``s``; ``SimplifiedLayerNormalization``
    becomes ``RMSNormalization``; ``SkipLayerNormalization`` likewise becomes Add + ``LayerNormalization``. The
    residual stream is then plain Adds and norms, as the rotation traces it. A node whose mean / inverse-std
    outputs are read is left fused (named in the returned notes)."""
    graph = model.graph
    notes = []
    if model.opset_imports.get("", 0) < 23:
        return notes
    for node in list(graph):
        target = FUSED_NORMS.get(node.op_type)
        if target is None or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        skip = node.op_type.startswith("Skip")
        if any(list(o.uses()) or o in graph.outputs for o in node.outputs[1:3] if o is not None):
            notes.append(f"{node.name}: mean/inv-std outputs are read, left fused")
            continue
        epsilon = node.attributes.get("epsilon")
        attributes = {"axis": -1, "epsilon": epsilon.as_float() if epsilon is not None else 1e-5}
        new_nodes = []
        source = node.inputs[0]
        if skip:
            add = ir.node("Add", [node.inputs[0], node.inputs[1]], name=f"{node.name}/residual_add")
            new_nodes.append(add)
            source = add.outputs[0]
            bias_index = 4 if node.op_type == "SkipLayerNormalization" else 3  # after (β and) γ
            bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
            if bias is not None:
                add_bias = ir.node("Add", [source, bias], name=f"{node.name}/residual_bias")
                new_nodes.append(add_bias)
                source = add_bias.outputs[0]
            _same_type(source, node.inputs[0])
        scale_index = 2 if skip else 1
        inputs = [source, node.inputs[scale_index]]
        if target == "LayerNormalization":
            inputs.append(node.inputs[scale_index + 1] if len(node.inputs) > scale_index + 1 else None)
        norm = ir.node(target, inputs, attributes=attributes, name=f"{node.name}/{target}")
        norm.metadata_props.update(node.metadata_props)
        new_nodes.append(norm)
        graph.insert_before(node, new_nodes)
        out = node.outputs[0]
        _same_type(norm.outputs[0], out)
        _take_over(graph, out, norm.outputs[0])
        if skip and len(node.outputs) > 3 and node.outputs[3] is not None:
            _take_over(graph, node.outputs[3], source)
        graph.remove(node, safe=False)
    return notes


def _same_type(value: ir.Value, like: ir.Value) -> None:
    """``value`` takes ``like``'s type and shape where they are known (an untyped value stays untyped: a type of
    unknown element type cannot be serialized)."""
    if like.type is not None:
        value.type = like.type
    if like.shape is not None:
        value.shape = like.shape


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` for every reader and as a graph output (keeping the output's name)."""
    for use in list(old.uses()):  # replace_all_uses_with refuses a value that is a graph output
        use.node.replace_input_with(use.idx, new)
    if old in graph.outputs:
        graph.outputs[graph.outputs.index(old)] = new
        name = old.name
        old.name = f"{name}_replaced"
        new.name = name


def split_packed_qkv(graph: ir.Graph) -> list[str]:
    """A ``MatMul`` whose output is ``GroupQueryAttention``'s packed query (key and value inputs empty) becomes three
    MatMuls, ``q_proj`` / ``k_proj`` / ``v_proj``, feeding the query, key and value inputs: the model map then sees
    q, k and v (the per-head V rotation needs v alone). Sizes come from ``num_heads`` / ``kv_num_heads``."""
    notes = []
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or len(node.inputs) < 3:
            continue
        if node.inputs[1] is not None or node.inputs[2] is not None or node.inputs[0] is None:
            continue
        matmul = node.inputs[0].producer()
        if matmul is None or not _is_default(matmul, "MatMul") or len(list(node.inputs[0].uses())) != 1:
            continue
        weight = constant_array(matmul.inputs[1])
        heads, kv_heads = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
        if weight is None or weight.ndim != 2 or weight.shape[1] % (heads + 2 * kv_heads):
            continue
        head_dim = weight.shape[1] // (heads + 2 * kv_heads)
        bounds = np.cumsum([0, heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        prefix = (matmul.inputs[1].name or "qkv").removesuffix(".weight").removesuffix(".MatMul")
        prefix = prefix.removesuffix(".qkv_proj")
        parts = []
        for index, role in enumerate(("q_proj", "k_proj", "v_proj")):
            part = add_initializer(graph, f"{prefix}.{role}.weight",
                                   np.ascontiguousarray(weight[:, bounds[index]:bounds[index + 1]]))
            linear = ir.node("MatMul", [matmul.inputs[0], part], name=f"{prefix}.{role}/MatMul")
            out = linear.outputs[0]
            out.name, out.dtype = f"{prefix}.{role}/output", node.inputs[0].dtype
            parts.append(linear)
        graph.insert_before(matmul, parts)
        for index, linear in enumerate(parts):
            node.replace_input_with(index, linear.outputs[0])
        graph.remove(matmul, safe=True)
        notes.append(f"{prefix}: packed qkv split into q/k/v ({heads} heads, {kv_heads} kv heads, head_dim {head_dim})")
    return notes


def fold_constant_subgraphs(model: ir.Model) -> bool:
    """Evaluate subgraphs of constants once (TorchScript leaves a DINOv2 position table behind a ``Resize`` of
    constants, which nothing can absorb a rotation into); tensors above a million elements are left alone."""
    from onnxscript.optimizer import fold_constants

    changed = False
    for _ in range(4):  # a known reshape can make shapes constant that feed another reshape's target
        reshaped = bool(constant_reshape_targets(model.graph))
        folded = bool(fold_constants(model, input_size_limit=1 << 20, output_size_limit=1 << 22).modified)
        changed = changed or reshaped or folded
        if not (reshaped and folded):
            break
    return changed


def constant_reshape_targets(graph: ir.Graph) -> list[str]:
    """A ``Reshape`` whose target shape is a ``Concat`` of constants and of its own input's dims read through
    ``Shape`` -> ``Slice`` / ``Gather`` (each in its own position) gets a constant target: a copied dim becomes its
    static size, or 0 (ONNX's "copy this input dim") when symbolic. The output shape is then known, where onnx's
    shape inference leaves a computed target's dims unknown. Returns the names of the rewritten Reshapes."""
    rewritten = []
    for node in list(graph):
        allowzero = node.attributes.get("allowzero")
        if not _is_default(node, "Reshape") or (allowzero is not None and allowzero.as_int()):
            continue
        data, target = node.inputs[0], node.inputs[1]
        concat = target.producer() if target is not None else None
        if data is None or data.shape is None or concat is None or not _is_default(concat, "Concat"):
            continue
        entries = _target_entries(concat, data)
        if entries is None:
            continue
        node.replace_input_with(1, add_initializer(graph, f"{node.name}_shape", np.asarray(entries, np.int64)))
        node.outputs[0].shape = ir.Shape(_reshaped_dims(list(data.shape.dims), entries))
        rewritten.append(node.name)
    return rewritten


def _target_entries(concat: ir.Node, data: ir.Value) -> list[int] | None:
    entries: list[int] = []
    dims = list(data.shape.dims)
    for part in concat.inputs:
        array = constant_array(part)
        if array is not None:
            entries.extend(int(v) for v in array.reshape(-1))
            continue
        copied = _copied_axes(part, data, len(dims))
        if copied is None or copied != list(range(len(entries), len(entries) + len(copied))):
            return None
        entries.extend(dims[k] if isinstance(dims[k], int) else 0 for k in copied)
    return entries


def _copied_axes(part: ir.Value | None, data: ir.Value, rank: int) -> list[int] | None:
    """The input axes whose sizes ``part`` holds when it is ``Slice(Shape(data), start, end)`` (step 1) or
    ``Unsqueeze(Gather(Shape(data), k))``; None otherwise."""
    node = part.producer() if part is not None else None
    if node is None:
        return None
    if _is_default(node, "Unsqueeze"):
        gather = node.inputs[0].producer()
        if gather is None or not _is_default(gather, "Gather") or not _is_shape_of(gather.inputs[0], data):
            return None
        index = constant_array(gather.inputs[1])
        return [int(index) % rank] if index is not None and index.size == 1 else None
    if not _is_default(node, "Slice") or not _is_shape_of(node.inputs[0], data):
        return None
    bounds = [constant_array(v) if v is not None else None for v in node.inputs[1:5]]
    if any(b is None for b in bounds[:2]) or any(b is not None and b.size != 1 for b in bounds):
        return None
    if (len(bounds) > 3 and bounds[3] is not None and int(bounds[3].reshape(-1)[0]) != 1) or (
            len(bounds) > 2 and bounds[2] is not None and int(bounds[2].reshape(-1)[0]) != 0):
        return None
    start, end = (int(b.reshape(-1)[0]) for b in bounds[:2])
    return list(range(rank))[slice(start, end)]


def _is_shape_of(value: ir.Value | None, data: ir.Value) -> bool:
    node = value.producer() if value is not None else None
    return node is not None and _is_default(node, "Shape") and node.inputs[0] is data and not node.attributes


def _reshaped_dims(dims: list, entries: list[int]) -> list:
    """The output dims of a reshape of ``dims`` to ``entries`` (0 copies the input dim, -1 is inferred)."""
    out: list = [dims[i] if entry == 0 else entry for i, entry in enumerate(entries)]
    if -1 in out:
        copied = {i for i, entry in enumerate(entries) if entry == 0}
        rest = [d for i, d in enumerate(dims) if i not in copied]
        fixed = [d for i, d in enumerate(out) if d != -1 and i not in copied]
        known = all(isinstance(d, int) for d in rest)
        out[out.index(-1)] = int(np.prod(rest, dtype=np.int64)) // max(1, int(np.prod(fixed, dtype=np.int64))) if known \
            else None
    return out
