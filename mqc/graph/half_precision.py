"""float16 / bfloat16 models: computed in float32 inside, their inputs and outputs kept as the user exported them.

mqc's scales, calibration statistics and rewrites are float32, and a QDQ graph mixing half-precision activations
with float32 scales does not load. A half-precision model is therefore widened on load: every half initializer
becomes float32, every ``Cast`` / ``Constant`` / ``ConstantOfShape`` that makes half values makes float32 ones, and
every value typed half is retyped float32. A float16 graph input or output gets a ``Cast`` at the boundary, so the
compiled model still takes and returns float16 (a generation loop feeds ``present.*`` back as ``past_key_values.*``
unchanged). bfloat16 inputs and outputs become float32: onnxruntime's CPU kernels and its Python API (numpy has no
bfloat16) cannot run or feed them, so a bfloat16 interface would leave a model nobody can calibrate or check. The
compiled model thus computes in float32 outside its integer weights (the compile summary says so).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

HALF_TYPES = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
#: Half types a graph input or output keeps (module docstring: bfloat16 ones become float32).
KEPT_AT_THE_BOUNDARY = {ir.DataType.FLOAT16}
#: Attributes that name an output element type, per op (the default domain).
_DTYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                     "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}
#: Attributes that hold a tensor, per op.
_TENSOR_ATTRIBUTES = {"Constant": "value", "ConstantOfShape": "value"}


def half_types_in(model: ir.Model) -> list[str]:
    """The half-precision element types the model's values, initializers and type-making nodes (``Cast`` to half,
    half ``Constant``s, typed even where the exporter left the values untyped) use; sorted names, empty if none."""
    found = {value.dtype for graph in _graphs(model) for value in _values(graph) if value.dtype in HALF_TYPES}
    found |= {dtype for graph in _graphs(model) for node in graph for dtype in _made_types(node) if dtype in HALF_TYPES}
    return sorted(HALF_TYPES[dtype] for dtype in found)


def _made_types(node: ir.Node) -> list[ir.DataType]:
    if node.domain not in ("", "ai.onnx"):
        return []
    dtype_name, tensor_name = _DTYPE_ATTRIBUTES.get(node.op_type), _TENSOR_ATTRIBUTES.get(node.op_type)
    made = []
    if dtype_name in node.attributes:
        made.append(ir.DataType(node.attributes[dtype_name].as_int()))
    if tensor_name in node.attributes:
        made.append(node.attributes[tensor_name].value.dtype)
    return made


def widen_to_float32(model: ir.Model) -> list[str]:
    """Rewrite ``model`` in place to compute in float32 (module docstring); returns the half types it had."""
    kinds = half_types_in(model)
    if not kinds:
        return []
    graph = model.graph
    boundary_inputs = [value for value in graph.inputs if value.dtype in KEPT_AT_THE_BOUNDARY]
    boundary_outputs = [(i, value, value.dtype) for i, value in enumerate(graph.outputs)
                        if value.dtype in KEPT_AT_THE_BOUNDARY and not value.is_graph_input()]
    for sub in _graphs(model):
        for value in list(sub.initializers.values()):
            if value.dtype in HALF_TYPES:
                value.const_value = ir.tensor(_as_float32(value.const_value), name=value.name)
        for node in sub:
            _widen_node(node)
        for value in _values(sub):
            if value.dtype in HALF_TYPES and value not in boundary_inputs:
                value.type = ir.TensorType(ir.DataType.FLOAT)
    for value in boundary_inputs:
        _cast_after_input(graph, value)
    for index, value, dtype in boundary_outputs:
        _cast_before_output(graph, index, value, dtype)
    return kinds


def _graphs(model: ir.Model) -> list[ir.Graph]:
    graphs: list[ir.Graph] = [model.graph]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                graphs.append(attribute.value)
            elif attribute.type == ir.AttributeType.GRAPHS:
                graphs.extend(attribute.value)
    return graphs


def _values(graph: ir.Graph) -> list[ir.Value]:
    values = [*graph.inputs, *graph.initializers.values()]
    for node in graph:
        values.extend(node.outputs)
    return values


def _as_float32(tensor: ir.TensorProtocol) -> np.ndarray:
    return np.asarray(tensor.numpy(), dtype=np.float32)


def _widen_node(node: ir.Node) -> None:
    if node.domain not in ("", "ai.onnx"):
        return
    dtype_name = _DTYPE_ATTRIBUTES.get(node.op_type)
    if dtype_name and dtype_name in node.attributes and node.attributes[dtype_name].value in HALF_TYPES:
        node.attributes[dtype_name] = ir.AttrInt64(dtype_name, ir.DataType.FLOAT)
    tensor_name = _TENSOR_ATTRIBUTES.get(node.op_type)
    if tensor_name and tensor_name in node.attributes:
        tensor = node.attributes[tensor_name].value
        if tensor.dtype in HALF_TYPES:
            node.attributes[tensor_name] = ir.AttrTensor(tensor_name, ir.tensor(_as_float32(tensor), name=tensor.name))


def _cast_after_input(graph: ir.Graph, value: ir.Value) -> None:
    """Readers of a half input read its float32 cast instead."""
    readers = list(value.uses())
    cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                   name=f"{value.name}/to_float32", outputs=[ir.Value(name=f"{value.name}_float32")])
    widened = cast.outputs[0]
    widened.type, widened.shape = ir.TensorType(ir.DataType.FLOAT), value.shape
    for user, index in readers:
        user.replace_input_with(index, widened)
    graph.insert_before(graph[0], cast) if len(graph) else graph.append(cast)


def _cast_before_output(graph: ir.Graph, index: int, value: ir.Value, dtype: ir.DataType) -> None:
    """The float32 value computed for a half output is cast back under the output's own name."""
    name = value.name
    value.name = f"{name}_float32"
    cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", dtype)], name=f"{name}/to_{HALF_TYPES[dtype]}",
                   outputs=[ir.Value(name=name)])
    narrowed = cast.outputs[0]
    narrowed.type, narrowed.shape = ir.TensorType(dtype), value.shape
    graph.append(cast)
    graph.outputs[index] = narrowed
