"""Weight ownership and live uses: a pass that rewrites a linear's weight or bias first makes it its own (a tied
embedding shares its table with the lm_head), and only counts uses by nodes still in the graph."""

from __future__ import annotations

from collections.abc import Iterator

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
    """Store a new [in, out] weight into the linear's (private) initializer, in the layout the graph uses (an array
    that owns its data in that layout and dtype is stored as is, not copied: it may be a 2 GB lm_head)."""
    old = constant_array(linear.weight)
    assert old is not None
    stored = weight_in_out.T if linear.transposed else weight_in_out
    owns_its_data = stored.base is None and stored.flags.c_contiguous and stored.dtype == old.dtype
    replace_initializer(linear.weight, stored if owns_its_data else np.ascontiguousarray(stored).astype(old.dtype))


#: Chunk of the float64 products below, in bytes of float64 output.
PRODUCT_CHUNK_BYTES = 256 << 20


def _chunks(count: int, across: int, chunk_bytes: int = PRODUCT_CHUNK_BYTES) -> Iterator[slice]:
    """Slices of ``count`` columns (or rows), each a float64 block of at most ``chunk_bytes`` with ``across`` rows."""
    step = max(1, chunk_bytes // (8 * max(across, 1)))
    return (slice(start, start + step) for start in range(0, count, step))


def widened_product(left: np.ndarray, right: np.ndarray, dtype: np.dtype, split: str,
                    chunk_bytes: int = PRODUCT_CHUNK_BYTES) -> np.ndarray:
    """``left @ right`` in float64, returned in ``dtype``, computed a chunk of output columns (``split="columns"``)
    or rows (``"rows"``) at a time, so a vocabulary-sized operand (a 7B's lm_head or embedding table, 2.2 GB in
    fp32) is never widened whole: the one-shot form held its float64 copy and the float64 product, 8.7 GB. Each
    output element is the same BLAS dot product either way; the bits equal the one-shot product's (tested)."""
    rows, cols = left.shape[0], right.shape[1]
    out = np.empty((rows, cols), dtype=dtype)
    if split == "columns":
        left = np.asarray(left, dtype=np.float64)
        for part in _chunks(cols, rows, chunk_bytes):
            out[:, part] = left @ right[:, part].astype(np.float64)
    elif split == "rows":
        right = np.asarray(right, dtype=np.float64)
        for part in _chunks(rows, cols, chunk_bytes):
            out[part] = left[part].astype(np.float64) @ right
    else:
        raise ValueError(f"split must be 'columns' or 'rows', got {split!r}")
    return out


def left_multiply_weight(linear: Linear, matrix: np.ndarray) -> None:
    """W ← M·W for a [in, out] weight (a rotation of its input side), through :func:`widened_product` by columns.
    A function of its own so that no view of the replaced (possibly mapped) weight outlives the call."""
    weight = linear.weight_array()
    set_weight(linear, widened_product(matrix, weight, weight.dtype, split="columns"))


def scale_rows(linear: Linear, scale: np.ndarray) -> None:
    """W ← diag(scale)·W for a [in, out] weight (a norm's gamma folded into its readers), in float64 a chunk of
    columns at a time, stored in the weight's dtype (bits equal to the one-shot product's: it is elementwise)."""
    weight = linear.weight_array()
    column = np.asarray(scale, dtype=np.float64)[:, None]
    out = np.empty(weight.shape, dtype=weight.dtype)
    for part in _chunks(weight.shape[1], weight.shape[0]):
        out[:, part] = column * weight[:, part].astype(np.float64)
    set_weight(linear, out)


def set_bias(linear: Linear, bias: np.ndarray) -> None:
    old = constant_array(linear.bias)
    assert old is not None and linear.bias is not None
    replace_initializer(linear.bias, bias.astype(old.dtype))
