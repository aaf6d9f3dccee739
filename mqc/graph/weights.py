"""Weight ownership and live uses: a pass that rewrites a linear's weight or bias first makes it its own (a tied
embedding shares its table with the lm_head), and only counts uses by nodes still in the graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mqc.ir import add_initializer, constant_array, replace_initializer
from mqc.model_map import Linear


def live_uses(value: ir.Value, graph: ir.Graph) -> list[ir.Usage]:
    """Uses of ``value`` by nodes that are in ``graph`` (a rewriter's discarded candidates can linger as uses)."""
    return [use for use in value.uses() if use.node.graph is graph]


def own_weight(graph: ir.Graph, linear: Linear) -> bool:
    """Make ``linear.weight`` an initializer only ``linear.node`` uses (copy it otherwise); True if copied."""
    weight = linear.weight
    users = {id(use.node) for use in live_uses(weight, graph)}
    if users == {id(linear.node)} and weight not in graph.outputs and weight.const_value is not None:
        return False
    array = constant_array(weight)
    assert array is not None
    copy = add_initializer(graph, f"{linear.name}.weight", np.array(array, copy=True))
    linear.node.replace_input_with(1, copy)
    linear.weight = copy
    return True


def own_bias(graph: ir.Graph, linear: Linear) -> None:
    """Make the bias initializer private to the linear (copy when shared)."""
    bias = linear.bias
    if bias is None:
        return
    holder = linear.bias_node if linear.bias_node is not None else linear.node
    users = {id(use.node) for use in live_uses(bias, graph)}
    if users == {id(holder)} and bias.const_value is not None:
        return
    array = constant_array(bias)
    assert array is not None
    copy = add_initializer(graph, f"{linear.name}.bias", np.array(array, copy=True))
    for index, inp in enumerate(holder.inputs):
        if inp is bias:
            holder.replace_input_with(index, copy)
    linear.bias = copy


def set_weight(linear: Linear, weight_in_out: np.ndarray) -> None:
    """Store a new [in, out] weight into the linear's (private) initializer, in the layout the graph uses."""
    old = constant_array(linear.weight)
    assert old is not None
    stored = weight_in_out.T if linear.transposed else weight_in_out
    replace_initializer(linear.weight, np.ascontiguousarray(stored).astype(old.dtype))


def set_bias(linear: Linear, bias: np.ndarray) -> None:
    old = constant_array(linear.bias)
    assert old is not None and linear.bias is not None
    replace_initializer(linear.bias, bias.astype(old.dtype))
