"""Synthetic Llama/Qwen2-shaped decoders with random weights, for the scale benchmark and the streaming tests.

The graph has the form mqc's exporter writes for a decoder's prefill (``inputs_embeds``, ``attention_mask``,
``position_ids`` in; ``logits`` out): decomposed RMSNorm (``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul ->
Mul``), rotary embeddings from ``position_ids``, grouped-query attention (K/V heads repeated by ``Expand``), SwiGLU
MLP, linears as ``MatMul`` with [in, out] weights named ``model.layers.N.<module>.weight`` (Qwen2: q/k/v biases).
There is no KV-cache input or output: the benchmark measures compile cost, which the cache does not change.

Weights go to one external data file, tensor by tensor through memory-mapped writes in row chunks, so a 28 GB
decoder is built with a few hundred MB of RAM. Random weights carry none of the outliers of real models: use these
to measure time and memory, never to judge a recipe's accuracy.

    python -m mqc.models.synthetic qwen2-vl-7b -o /work/scale/q7b/decoder.onnx --layers 4
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

#: Bytes of random numbers generated per chunk while filling a tensor.
CHUNK_BYTES = 64 << 20
OPSET = 23


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions that set a decoder's cost."""

    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    qkv_bias: bool
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + (self.hidden + 2 * kv) * self.qkv_bias
        per_layer = attention + 3 * self.hidden * self.mlp + 2 * self.hidden
        return self.layers * per_layer + self.hidden + self.hidden * self.vocab


SHAPES = {
    "smollm2-135m": DecoderShape(30, 576, 1536, 9, 3, 49152, qkv_bias=False, rope_theta=100000.0),
    "qwen2-1.5b": DecoderShape(28, 1536, 8960, 12, 2, 151936, qkv_bias=True, rope_theta=1000000.0),
    "qwen2-vl-7b": DecoderShape(28, 3584, 18944, 28, 4, 152064, qkv_bias=True, rope_theta=1000000.0),
    "tiny": DecoderShape(3, 64, 160, 4, 2, 96, qkv_bias=True),
}


class ExternalDataWriter:
    """Appends random tensors to one external data file through memory maps; each tensor becomes an
    ``ir.ExternalTensor`` referencing its slice (nothing of it stays in memory)."""

    ALIGN = 4096

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.offset = 0
        self.rng = np.random.default_rng(seed)
        path.write_bytes(b"")

    def random(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> ir.ExternalTensor:
        """A float32 tensor of normal(mean, std) values, written in row chunks."""
        count = int(np.prod(shape))
        self.offset = -(-self.offset // self.ALIGN) * self.ALIGN
        with open(self.path, "r+b") as file:
            file.truncate(self.offset + 4 * count)
        target = np.memmap(self.path, dtype=np.float32, mode="r+", offset=self.offset, shape=(count,))
        step = CHUNK_BYTES // 4
        for start in range(0, count, step):
            chunk = self.rng.standard_normal(min(step, count - start), dtype=np.float32)
            chunk *= std
            chunk += mean
            target[start:start + chunk.size] = chunk
        target.flush()
        del target
        tensor = ir.ExternalTensor(self.path.name, offset=self.offset, length=4 * count, dtype=ir.DataType.FLOAT,
                                   shape=ir.Shape(shape), name=name, base_dir=self.path.parent)
        self.offset += 4 * count
        return tensor


class DecoderGraph:
    """Builds the decoder's nodes one op at a time; small constants are inline initializers."""

    def __init__(self, shape: DecoderShape, weights: ExternalDataWriter) -> None:
        self.shape = shape
        self.weights = weights
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._constants: dict[tuple, ir.Value] = {}

    def op(self, op_type: str, *inputs: ir.Value | None, name: str = "", **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes, name=name or f"node_{len(self.nodes)}")
        node.outputs[0].name = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            value = ir.Value(name=f"const_{len(self._constants)}", shape=ir.Shape(array.shape),
                             type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
            self._constants[key] = value
            self.initializers.append(value)
        return self._constants[key]

    def weight(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> ir.Value:
        tensor = self.weights.random(name, shape, std, mean)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)
        self.initializers.append(value)
        return value

    def rms_norm(self, x: ir.Value, name: str) -> ir.Value:
        gamma = self.weight(f"{name}.weight", (self.shape.hidden,), 0.1, 1.0)
        mean = self.op("ReduceMean", self.op("Pow", x, self.const(np.array(2.0, np.float32))),
                       self.const(np.array([-1], np.int64)), keepdims=1)
        rsqrt = self.op("Reciprocal", self.op("Sqrt", self.op("Add", mean, self.const(np.array(1e-6, np.float32)))))
        return self.op("Mul", gamma, self.op("Mul", x, rsqrt))

    def linear(self, x: ir.Value, module: str, fan_in: int, fan_out: int, bias: bool = False) -> ir.Value:
        weight = self.weight(f"{module}.weight", (fan_in, fan_out), fan_in ** -0.5)
        y = self.op("MatMul", x, weight, name=f"{module}/MatMul")
        if bias:
            y = self.op("Add", y, self.weight(f"{module}.bias", (fan_out,), 0.02))
        return y

    def heads(self, x: ir.Value, count: int) -> ir.Value:
        """[b, s, count*d] -> [b, count, s, d]."""
        split = self.op("Reshape", x, self.const(np.array([0, 0, count, self.shape.head_dim], np.int64)))
        return self.op("Transpose", split, perm=[0, 2, 1, 3])

    def rotary(self, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        half = self.shape.head_dim // 2
        axis = self.const(np.array([3], np.int64))
        first = self.op("Slice", x, self.const(np.array([0], np.int64)), self.const(np.array([half], np.int64)), axis)
        second = self.op("Slice", x, self.const(np.array([half], np.int64)),
                         self.const(np.array([self.shape.head_dim], np.int64)), axis)
        rotated = self.op("Concat", self.op("Neg", second), first, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", rotated, sin))

    def repeat_kv(self, x: ir.Value) -> ir.Value:
        """[b, kv, s, d] -> [b, heads, s, d], each KV head repeated for its query group."""
        group = self.shape.heads // self.shape.kv_heads
        wide = self.op("Expand", self.op("Unsqueeze", x, self.const(np.array([2], np.int64))),
                       self.const(np.array([1, 1, group, 1, 1], np.int64)))
        return self.op("Reshape", wide, self.const(np.array([0, self.shape.heads, -1, self.shape.head_dim], np.int64)))

    def layer(self, x: ir.Value, index: int, cos: ir.Value, sin: ir.Value, mask: ir.Value) -> ir.Value:
        s, prefix = self.shape, f"model.layers.{index}"
        kv = s.kv_heads * s.head_dim
        h = self.rms_norm(x, f"{prefix}.input_layernorm")
        q = self.rotary(self.heads(self.linear(h, f"{prefix}.self_attn.q_proj", s.hidden, s.hidden, s.qkv_bias),
                                   s.heads), cos, sin)
        k = self.rotary(self.heads(self.linear(h, f"{prefix}.self_attn.k_proj", s.hidden, kv, s.qkv_bias),
                                   s.kv_heads), cos, sin)
        v = self.heads(self.linear(h, f"{prefix}.self_attn.v_proj", s.hidden, kv, s.qkv_bias), s.kv_heads)
        scores = self.op("MatMul", q, self.op("Transpose", self.repeat_kv(k), perm=[0, 1, 3, 2]))
        scores = self.op("Add", self.op("Mul", scores, self.const(np.array(s.head_dim ** -0.5, np.float32))), mask)
        context = self.op("MatMul", self.op("Softmax", scores, axis=-1), self.repeat_kv(v))
        merged = self.op("Reshape", self.op("Transpose", context, perm=[0, 2, 1, 3]),
                         self.const(np.array([0, 0, s.hidden], np.int64)))
        x = self.op("Add", x, self.linear(merged, f"{prefix}.self_attn.o_proj", s.hidden, s.hidden))
        h = self.rms_norm(x, f"{prefix}.post_attention_layernorm")
        gate = self.linear(h, f"{prefix}.mlp.gate_proj", s.hidden, s.mlp)
        up = self.linear(h, f"{prefix}.mlp.up_proj", s.hidden, s.mlp)
        act = self.op("Mul", self.op("Mul", gate, self.op("Sigmoid", gate)), up)
        return self.op("Add", x, self.linear(act, f"{prefix}.mlp.down_proj", s.mlp, s.hidden))

    def build(self) -> ir.Graph:
        s = self.shape
        embeds = ir.Value(name="inputs_embeds", shape=ir.Shape(["batch", "seq", s.hidden]),
                          type=ir.TensorType(ir.DataType.FLOAT))
        attention_mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "seq"]),
                                  type=ir.TensorType(ir.DataType.INT64))
        position_ids = ir.Value(name="position_ids", shape=ir.Shape(["batch", "seq"]),
                                type=ir.TensorType(ir.DataType.INT64))
        cos, sin = self.rotary_tables(position_ids)
        mask = self.causal_mask(embeds, attention_mask)
        x = embeds
        for index in range(s.layers):
            x = self.layer(x, index, cos, sin, mask)
        logits = self.linear(self.rms_norm(x, "model.norm"), "lm_head", s.hidden, s.vocab)
        logits.name = "logits"
        logits.shape, logits.type = ir.Shape(["batch", "seq", s.vocab]), ir.TensorType(ir.DataType.FLOAT)
        return ir.Graph([embeds, attention_mask, position_ids], [logits], nodes=self.nodes,
                        initializers=self.initializers, opset_imports={"": OPSET}, name="synthetic_decoder")

    def rotary_tables(self, position_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
        """cos and sin of [b, 1, s, head_dim]."""
        d = self.shape.head_dim
        inv_freq = (1.0 / self.shape.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(np.float32)
        positions = self.op("Unsqueeze", self.op("Cast", position_ids, to=ir.DataType.FLOAT),
                            self.const(np.array([-1], np.int64)))
        freqs = self.op("Mul", positions, self.const(inv_freq))
        angles = self.op("Unsqueeze", self.op("Concat", freqs, freqs, axis=-1), self.const(np.array([1], np.int64)))
        return self.op("Cos", angles), self.op("Sin", angles)

    def causal_mask(self, embeds: ir.Value, attention_mask: ir.Value) -> ir.Value:
        """Additive [b, 1, s, s] mask: 0 where a token may attend (causal and not padding), float min elsewhere."""
        seq = self.op("Shape", embeds, start=1, end=2)
        square = self.op("Concat", seq, seq, axis=0)
        ones = self.op("ConstantOfShape", square, value=ir.tensor(np.array([1], np.int64)))
        causal = self.op("Cast", self.op("Trilu", ones, upper=0), to=ir.DataType.BOOL)
        keep = self.op("Cast", self.op("Unsqueeze", attention_mask, self.const(np.array([1, 2], np.int64))),
                       to=ir.DataType.BOOL)
        allowed = self.op("And", causal, keep)
        return self.op("Where", allowed, self.const(np.array(0.0, np.float32)),
                       self.const(np.array(np.finfo(np.float32).min, np.float32)))


def build_decoder(shape: DecoderShape | str, output: str | Path, layers: int | None = None, seed: int = 0) -> Path:
    """Write a random decoder of ``shape`` (``layers`` overrides its depth) to ``output`` (+ ``.data``)."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    if layers is not None:
        shape = replace(shape, layers=layers)
    output = Path(os.path.abspath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = ExternalDataWriter(output.with_name(output.name + ".data"), seed)
    graph = DecoderGraph(shape, writer).build()
    model = ir.Model(graph, ir_version=10, producer_name="mqc.models.synthetic")
    ir.save(model, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--layers", type=int, help="Build only the first N layers (the shape's depth otherwise).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_decoder(args.shape, args.output, args.layers, args.seed)
    shape = replace(SHAPES[args.shape], layers=args.layers or SHAPES[args.shape].layers)
    print(f"{path}: {shape.parameters() / 1e9:.2f} B parameters, {shape.layers} layers")


if __name__ == "__main__":
    main()
