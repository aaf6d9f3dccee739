"""Replay a slice of an ONNX graph in torch, so that a learned pass can train through a whole decoder block.

MASQuant learns its smoothing vectors block by block (spec/algorithms.md §3.4): a decoder layer's output under
fake quantization is compared with its float output, and the gradient flows through attention, RoPE and the MLP.
Rather than re-implementing each model family's layer in torch (and hoping it matches the export), the slice of the
graph between the layer's input and output is executed node by node with torch ops, so the learned function is the
graph's own. ``GraphSlice.check`` replays the float slice against onnxruntime before any learning trusts it.

The slice holds the nodes that depend on ``input`` through data edges and that ``output`` depends on. ``Shape``
edges are cut: shape computations, the attention mask and RoPE tables do not depend on the block's activations, so
they are the slice's *externals* (captured per sample from onnxruntime), and constants are read once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.ir import constant_array

#: A hook that replaces a MatMul: (node, activation, weight) -> output; None leaves the node as it is.
MatMulHook = Callable[[ir.Node, Any, Any], Any]

_ONNX_TO_TORCH_DTYPE = {
    ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64", ir.DataType.INT64: "int64", ir.DataType.INT32: "int32", ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "uint8", ir.DataType.BOOL: "bool",
}


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _ints(t: Any) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _reduce(fn: str) -> Callable:
    def run(node: ir.Node, x: Any, axes: Any = None) -> Any:
        import torch

        dims = _ints(axes) if axes is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        if dims is None or len(dims) == 0:
            dims = list(range(x.dim()))
        op = {"mean": torch.mean, "sum": torch.sum}.get(fn)
        if op is not None:
            return op(x, dim=dims, keepdim=keep)
        return torch.amax(x, dim=dims, keepdim=keep) if fn == "max" else torch.amin(x, dim=dims, keepdim=keep)
    return run


def _reshape(node: ir.Node, x: Any, shape: Any) -> Any:
    target = _ints(shape)
    if not _attr(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _slice(node: ir.Node, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
    starts_, ends_ = _ints(starts), _ints(ends)
    axes_ = _ints(axes) if axes is not None else list(range(len(starts_)))
    steps_ = _ints(steps) if steps is not None else [1] * len(starts_)
    index: list[Any] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts_, ends_, axes_, steps_, strict=True):
        if step != 1:
            raise NotImplementedError("Slice with a step other than 1")
        size = x.shape[axis]
        index[axis] = slice(max(-size, min(start, size)), max(-size - 1, min(end, size)))
    return x[tuple(index)]


def _norm(kind: str) -> Callable:
    def run(node: ir.Node, x: Any, scale: Any, bias: Any = None) -> Any:
        import torch

        axis = _attr(node, "axis", -1)
        dims = list(range(axis % x.dim(), x.dim()))
        eps = _attr(node, "epsilon", 1e-5)
        if kind == "layer":
            x = x - x.mean(dim=dims, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps) * scale
        return y + bias if bias is not None else y
    return run


def _cast(node: ir.Node, x: Any) -> Any:
    import torch

    name = _ONNX_TO_TORCH_DTYPE.get(ir.DataType(_attr(node, "to")))
    if name is None:
        raise NotImplementedError(f"Cast to {ir.DataType(_attr(node, 'to')).name}")
    return x.to(getattr(torch, name))


@functools.cache
def _ops() -> dict[str, Callable]:
    """The torch form of each supported op (built once: torch is imported only when a slice runs)."""
    import torch
    import torch.nn.functional as F

    def unsqueeze(node: ir.Node, x: Any, axes: Any = None) -> Any:
        dims = sorted(d % (x.dim() + len(_ints(axes))) for d in _ints(axes)) if axes is not None else _attr(node, "axes")
        for d in dims:
            x = x.unsqueeze(d)
        return x

    def squeeze(node: ir.Node, x: Any, axes: Any = None) -> Any:
        dims = _ints(axes) if axes is not None else _attr(node, "axes")
        return x.squeeze(tuple(dims)) if dims else x.squeeze()

    def expand(node: ir.Node, x: Any, shape: Any) -> Any:
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))

    def gelu(node: ir.Node, x: Any) -> Any:
        return F.gelu(x, approximate=_attr(node, "approximate", "none"))

    def ste_round(node: ir.Node, x: Any) -> Any:
        """Round half to even (as ONNX) forward; identity backward, so gradients pass static fake quantizers."""
        return (torch.round(x) - x).detach() + x

    def clip(node: ir.Node, x: Any, low: Any = None, high: Any = None) -> Any:
        return torch.clamp(x, min=low, max=high)

    def per_axis(node: ir.Node, param: Any, x: Any) -> Any:
        """A per-tensor or per-axis quantization parameter, broadcast against ``x``."""
        if param.dim() == 0 or param.numel() == 1:
            return param.reshape(())
        shape = [1] * x.dim()
        shape[_attr(node, "axis", 1) % x.dim()] = -1
        return param.reshape(shape)

    def quantize(node: ir.Node, x: Any, scale: Any, zero: Any = None) -> Any:
        """QuantizeLinear as float codes (straight-through rounding); the pair's DequantizeLinear reads them."""
        info = torch.iinfo(zero.dtype if zero is not None else torch.uint8)
        offset = per_axis(node, zero.to(x.dtype), x) if zero is not None else 0.0
        return torch.clamp(ste_round(node, x / per_axis(node, scale, x)) + offset, info.min, info.max)

    def dequantize(node: ir.Node, q: Any, scale: Any, zero: Any = None) -> Any:
        q = q.to(scale.dtype)
        offset = per_axis(node, zero.to(q.dtype), q) if zero is not None else 0.0
        return (q - offset) * per_axis(node, scale, q)

    def flatten(node: ir.Node, x: Any) -> Any:
        axis = _attr(node, "axis", 1) % (x.dim() + 1) if x.dim() else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)

    return {
        "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
        "Div": lambda n, a, b: a / b, "Pow": lambda n, a, b: torch.pow(a, b), "Neg": lambda n, a: -a,
        "Sqrt": lambda n, a: torch.sqrt(a), "Reciprocal": lambda n, a: torch.reciprocal(a),
        "Abs": lambda n, a: a.abs(), "Exp": lambda n, a: torch.exp(a), "Log": lambda n, a: torch.log(a),
        "Sigmoid": lambda n, a: torch.sigmoid(a), "Tanh": lambda n, a: torch.tanh(a), "Erf": lambda n, a: torch.erf(a),
        "Relu": lambda n, a: torch.relu(a), "Round": ste_round, "Clip": clip, "Flatten": flatten,
        "QuantizeLinear": quantize, "DequantizeLinear": dequantize, "Softplus": lambda n, a: F.softplus(a), "Gelu": gelu,
        "Cos": lambda n, a: torch.cos(a), "Sin": lambda n, a: torch.sin(a), "Identity": lambda n, a: a,
        "Max": lambda n, *xs: _fold(torch.maximum, xs), "Min": lambda n, *xs: _fold(torch.minimum, xs),
        "Where": lambda n, c, a, b: torch.where(c, a, b), "IsNaN": lambda n, a: torch.isnan(a),
        "Not": lambda n, a: ~a, "And": lambda n, a, b: a & b, "Or": lambda n, a, b: a | b,
        "Equal": lambda n, a, b: a == b, "Less": lambda n, a, b: a < b, "Greater": lambda n, a, b: a > b,
        "LessOrEqual": lambda n, a, b: a <= b, "GreaterOrEqual": lambda n, a, b: a >= b,
        "MatMul": lambda n, a, b: torch.matmul(a, b),
        "Softmax": lambda n, a: torch.softmax(a, dim=_attr(n, "axis", -1)),
        "Transpose": lambda n, a: a.permute(*(_attr(n, "perm") or reversed(range(a.dim())))),
        "Concat": lambda n, *xs: torch.cat(xs, dim=_attr(n, "axis")),
        "Reshape": _reshape, "Slice": _slice, "Unsqueeze": unsqueeze, "Squeeze": squeeze, "Expand": expand,
        "Cast": _cast, "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
        "ReduceMin": _reduce("min"), "RMSNormalization": _norm("rms"), "LayerNormalization": _norm("layer"),
        "SimplifiedLayerNormalization": _norm("rms"),
        "Gather": lambda n, x, i: torch.index_select(x, _attr(n, "axis", 0) % x.dim(), i.reshape(-1)).reshape(
            *x.shape[: _attr(n, "axis", 0) % x.dim()], *i.shape, *x.shape[_attr(n, "axis", 0) % x.dim() + 1:]),
    }


def _fold(fn: Callable, xs: tuple) -> Any:
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


class GraphSlice:
    """The nodes of ``graph`` that compute ``output`` from ``input``; runs them on torch tensors."""

    def __init__(self, graph: ir.Graph, input: ir.Value, output: ir.Value) -> None:
        self.input, self.output = input, output
        downstream: set[int] = set()
        frontier = [input]
        while frontier:
            value = frontier.pop()
            for use in value.uses():
                node = use.node
                if node.op_type in ("Shape", "Size") or id(node) in downstream:
                    continue
                downstream.add(id(node))
                frontier.extend(node.outputs)
        upstream: set[int] = set()
        frontier = [output]
        while frontier:
            node = frontier.pop().producer()
            if node is None or id(node) in upstream or id(node) not in downstream:
                continue
            upstream.add(id(node))
            frontier.extend(v for v in node.inputs if v is not None)
        self.nodes = [node for node in graph if id(node) in upstream]
        produced = {id(v) for node in self.nodes for v in node.outputs} | {id(input)}
        self.constants: dict[str, np.ndarray] = {}
        externals: dict[str, ir.Value] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value is None or id(value) in produced or value.name in self.constants:
                    continue
                array = constant_array(value)
                if array is not None:
                    self.constants[value.name] = array
                else:
                    externals[value.name] = value
        #: Values the slice reads that are neither its input nor constant: captured per sample.
        self.externals = list(externals)
        self._torch_constants: dict[str, Any] | None = None

    def check(self) -> str | None:
        """Why the slice cannot be replayed (an op without a torch form, or no path from input to output), or None."""
        if not self.nodes or self.output.producer() not in self.nodes:
            return f"{self.output.name} does not depend on {self.input.name} through data edges"
        ops = _ops()
        missing = sorted({n.op_type for n in self.nodes if n.domain not in ("", "ai.onnx", "com.microsoft") or n.op_type not in ops})
        return f"no torch form for {', '.join(missing)}" if missing else None

    def run(self, x: Any, externals: Mapping[str, Any], matmul_hook: MatMulHook | None = None) -> Any:
        """The slice's output for input ``x``; ``matmul_hook`` may replace MatMul nodes (fake quantization)."""
        import torch

        if self._torch_constants is None:
            self._torch_constants = {name: torch.from_numpy(np.array(a)) for name, a in self.constants.items()}
        ops = _ops()
        env: dict[str, Any] = {**self._torch_constants, **externals}
        env[self.input.name] = x
        for node in self.nodes:
            args = [env[v.name] if v is not None else None for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            result = None
            if node.op_type == "MatMul" and matmul_hook is not None:
                result = matmul_hook(node, args[0], args[1])
            if result is None:
                result = ops[node.op_type](node, *args)
            env[node.outputs[0].name] = result
        return env[self.output.name]
