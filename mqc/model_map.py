"""A map of the model: linear layers, norms, residual adds and embeddings, found generically on the graph.

Rules, in order:
1. A *linear* is ``MatMul(X, W)`` with a constant 2-D ``W`` ([in, out]), or ``Gemm(A, B[, C])`` with a constant
   ``B`` (``transB=1`` stores [out, in]) and ``alpha = beta = 1``. A following ``Add`` with a constant 1-D operand
   of the output width is its bias. Gemm with other alpha/beta, or ``transA``, is refused with that reason.
2. Its *name* is the module path the exporter recorded (``torch.onnx`` dynamo writes it into the node's
   ``namespace`` metadata), else the weight initializer's name when it is not a generated ``val_N``, else the node
   name. The block index comes from ``layers.N`` / ``layer.N`` / ``blocks.N`` / ``h.N`` in that name.
3. Its *role* comes from the last name component (``q_proj``, ``fc2``, ...). Where names say nothing, structure
   decides: three unnamed linears reading one value are q, k, v; two are gate and up (gate feeds the activation);
   a linear reading ``act(gate) * up`` is down.
4. Its *component* is ``vision`` when the name mentions the vision tower, ``projector`` for connector modules,
   else ``language``.
5. *Norms* are ``LayerNormalization``, ``RMSNormalization`` and onnxruntime's ``SimplifiedLayerNormalization`` /
   ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``. Decomposed ReduceMean/Pow/Sqrt forms are
   turned into these by ``passes.canonicalize`` first.
6. *Embeddings* are ``Gather`` from a constant 2-D table.
7. The decoder's residual stream starts at the graph input ``inputs_embeds``, else at the output of the embedding
   ``Gather`` that reads a graph input (``input_ids``), after a scalar scale if there is one (:func:`stream_entry`).
8. ``head_dim`` and the KV head count come from ``GroupQueryAttention`` / ``MultiHeadAttention`` attributes, else
   from the constant tail of the ``Reshape`` that splits v_proj's output into heads (:func:`infer_head_layout`).
   TorchScript node names (``/model/layers.0/self_attn/q_proj/MatMul``) and onnxruntime-genai weight names
   (``model.layers.0.mlp.down_proj.MatMul.weight``) give module paths too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.graph.markers import LOWRANK_KEY
from mqc.ir import constant_array

ROLE_PATTERNS: list[tuple[str, str]] = [
    (r"(^|_)(q_proj|query|wq|q)$", "q"),
    (r"(^|_)(k_proj|key|wk|k)$", "k"),
    (r"(^|_)(v_proj|value|wv|v)$", "v"),
    (r"^(qkv|qkv_proj|c_attn|in_proj|query_key_value|Wqkv)$", "qkv"),
    (r"^(o_proj|out_proj|wo|c_proj_attn|dense_attn)$", "o"),
    (r"^(gate_proj|w1|gate)$", "gate"),
    (r"^(up_proj|w3|up)$", "up"),
    (r"^(down_proj|w2|down)$", "down"),
    (r"^(fc1|c_fc|intermediate_dense|dense_h_to_4h|lin1)$", "fc1"),
    (r"^(fc2|c_proj|output_dense|dense_4h_to_h|lin2)$", "fc2"),
    (r"^(lm_head|embed_out|output_projection)$", "lm_head"),
]
VISION_HINT = re.compile(r"(vision|visual|vit|image_encoder|dinov2|patch_embed|encoder\.layer\.)", re.I)
PROJECTOR_HINT = re.compile(r"(projector|mm_projector|merger|connector|multi_modal|mlp1|resampler)", re.I)
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h|block)\.(\d+)(?:\.|$)")
GENERATED_NAME = re.compile(r"^(val_\d+|_val_\d+|onnx::.*|\d+|.*/.*)$")
NORM_OPS = {
    ("", "LayerNormalization"): "layernorm",
    ("", "RMSNormalization"): "rmsnorm",
    ("com.microsoft", "SimplifiedLayerNormalization"): "rmsnorm",
    ("", "SimplifiedLayerNormalization"): "rmsnorm",
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): "rmsnorm",
    ("com.microsoft", "SkipLayerNormalization"): "layernorm",
}
#: Roles whose output is added into the residual stream.
WRITER_ROLES = {"o", "down", "fc2"}
ACTIVATION_OPS = {"Sigmoid", "Relu", "Gelu", "FastGelu", "QuickGelu", "Tanh", "Erf", "Softplus", "HardSigmoid"}


@dataclass
class Linear:
    """A linear layer on the graph: ``y = x @ W (+ b)``."""

    node: ir.Node
    name: str
    weight: ir.Value
    transposed: bool
    bias: ir.Value | None
    bias_node: ir.Node | None
    role: str = "other"
    component: str = "language"
    layer: int | None = None

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The value downstream consumers read: after the bias Add when there is one."""
        return self.bias_node.outputs[0] if self.bias_node is not None else self.node.outputs[0]

    def weight_array(self) -> np.ndarray:
        """The weight in MatMul layout [in, out], whatever the graph stores."""
        array = constant_array(self.weight)
        assert array is not None
        return array.T if self.transposed else array

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1 if self.transposed else 0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0 if self.transposed else 1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "component": self.component,
            "layer": self.layer,
            "in": self.in_features,
            "out": self.out_features,
            "bias": self.bias is not None,
            "op": self.node.op_type,
        }


@dataclass
class Norm:
    node: ir.Node
    kind: str  # "layernorm" | "rmsnorm"
    name: str
    epsilon: float
    readers: list[Linear] = field(default_factory=list)

    @property
    def scale(self) -> ir.Value | None:
        index = 2 if self.node.op_type.startswith("Skip") else 1
        return self.node.inputs[index] if len(self.node.inputs) > index else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "op": self.node.op_type,
            "epsilon": self.epsilon,
            "readers": [r.name for r in self.readers],
        }


@dataclass
class Skip:
    """A node a pass or the model map refused, and why: the data ``mqc explain`` shows."""

    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "reason": self.reason}


@dataclass
class ModelMap:
    linears: list[Linear]
    norms: list[Norm]
    embeddings: list[ir.Node]
    residual_adds: list[ir.Node]
    refused: list[Skip]

    def by_role(self, *roles: str) -> list[Linear]:
        return [lin for lin in self.linears if lin.role in roles]

    def summary(self) -> dict[str, Any]:
        roles: dict[str, int] = {}
        for lin in self.linears:
            roles[lin.role] = roles.get(lin.role, 0) + 1
        return {
            "linears": len(self.linears),
            "roles": roles,
            "norms": {kind: sum(n.kind == kind for n in self.norms) for kind in ("layernorm", "rmsnorm")},
            "embeddings": len(self.embeddings),
            "residual_adds": len(self.residual_adds),
            "refused": [s.to_dict() for s in self.refused],
        }


def module_path(node: ir.Node) -> str | None:
    """The innermost module path the torch exporter recorded for ``node``."""
    namespace = node.metadata_props.get("namespace")
    if not namespace:
        return None
    path = None
    for segment in namespace.split("/"):
        name, _, cls = segment.partition(": ")
        if name and not cls.startswith(("aten.", "<built-in", "prims.")):
            path = name
    return path


def _linear_name(node: ir.Node, weight: ir.Value) -> str:
    path = module_path(node)
    if path:
        return path
    if weight.name and not GENERATED_NAME.match(weight.name):
        # onnxruntime-genai: model.layers.0.mlp.down_proj.MatMul.weight
        return weight.name.removesuffix(".weight").removesuffix(".weight_t").removesuffix(".MatMul")
    return scope_path(node.name) or weight.name or "linear"


def scope_path(node_name: str | None) -> str | None:
    """The module path in a TorchScript-export node name: ``/model/layers.0/self_attn/q_proj/MatMul`` ->
    ``model.layers.0.self_attn.q_proj`` (the last segment is the op)."""
    if not node_name or not node_name.startswith("/"):
        return node_name
    parts = node_name.strip("/").split("/")[:-1]
    return ".".join(parts) or node_name


def _role_from_name(name: str) -> str | None:
    parts = name.split(".")
    last = parts[-1]
    # "attention.output.dense" (BERT/DINOv2) vs "output.dense" (MLP out) need two components.
    joined = "_".join(parts[-2:])
    if joined == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "o"
    if len(parts) >= 2 and parts[-2] in ("attn", "attention") and last in ("proj", "dense", "o"):
        return "o"
    for candidate in (joined, last):
        for pattern, role in ROLE_PATTERNS:
            if re.search(pattern, candidate):
                return role
    return None


def _component(name: str) -> str:
    if PROJECTOR_HINT.search(name):
        return "projector"
    if VISION_HINT.search(name):
        return "vision"
    return "language"


def _bias_of(output: ir.Value, width: int) -> tuple[ir.Value | None, ir.Node | None]:
    uses = list(output.uses())
    if len(uses) != 1:
        return None, None
    consumer = uses[0].node
    if consumer.op_type != "Add" or consumer.domain not in ("", "ai.onnx"):
        return None, None
    other = consumer.inputs[1 - uses[0].idx]
    array = constant_array(other)
    if array is None or array.ndim != 1 or array.shape[0] != width:
        return None, None
    return other, consumer


def _as_linear(node: ir.Node) -> tuple[Linear | None, str | None]:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None, None
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None, None
    weight = node.inputs[1]
    array = constant_array(weight)
    if array is None:
        return None, None  # activation x activation (attention scores): not a linear layer
    if array.ndim != 2:
        return None, f"weight of {node.name} is {array.ndim}-D, not a 2-D matrix"
    if array.dtype not in (np.float32, np.float16):
        return None, f"weight of {node.name} is {array.dtype}, not float (already quantized?)"
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].as_int():
            return None, f"Gemm {node.name} has transA=1"
        for coeff in ("alpha", "beta"):
            if attrs.get(coeff) is not None and attrs[coeff].as_float() != 1.0:
                return None, f"Gemm {node.name} has {coeff}={attrs[coeff].as_float()}, not 1"
        transposed = bool(attrs.get("transB") is not None and attrs["transB"].as_int())
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and constant_array(bias) is None:
            return None, f"Gemm {node.name} has a non-constant C input"
        linear = Linear(node, _linear_name(node, weight), weight, transposed, bias, None)
    else:
        out_width = array.shape[1]
        bias, bias_node = _bias_of(node.outputs[0], out_width)
        linear = Linear(node, _linear_name(node, weight), weight, False, bias, bias_node)
    return linear, None


def _feeds_activation(value: ir.Value) -> bool:
    return any(use.node.op_type in ACTIVATION_OPS for use in value.uses())


def _assign_structural_roles(linears: list[Linear]) -> None:
    """Rule 3's structural fallback for linears whose names say nothing."""
    by_input: dict[int, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(id(lin.input), []).append(lin)
    for group in by_input.values():
        unnamed = [lin for lin in group if lin.role == "other"]
        if len(group) == 3 and len(unnamed) == 3:
            for lin, role in zip(group, ("q", "k", "v"), strict=True):
                lin.role = role
        elif len(group) == 2 and len(unnamed) == 2:
            gate = next((lin for lin in group if _feeds_activation(lin.output)), None)
            if gate is not None:
                gate.role = "gate"
                next(lin for lin in group if lin is not gate).role = "up"
    outputs_by_role = {id(lin.output): lin for lin in linears if lin.role in ("gate", "up")}
    for lin in linears:
        producer = lin.input.producer()
        if (
            lin.role == "other"
            and producer is not None
            and producer.op_type == "Mul"
            and any(id(v) in outputs_by_role for v in producer.inputs if v is not None)
        ):
            lin.role = "down"


def _norm_epsilon(node: ir.Node) -> float:
    attr = node.attributes.get("epsilon")
    return attr.as_float() if attr is not None else 1e-5


def _residual_adds(graph: ir.Graph, linears: list[Linear]) -> list[ir.Node]:
    """Adds of two activations where one side is written by a linear (o/down/fc2 into the residual stream)."""
    writers = [lin for lin in linears if lin.role in WRITER_ROLES] or linears
    writer_outputs = {id(lin.output) for lin in writers}
    bias_nodes = {id(lin.bias_node) for lin in linears if lin.bias_node is not None}
    adds = []
    for node in graph:
        if node.op_type != "Add" or id(node) in bias_nodes:
            continue
        if any(constant_array(v) is not None for v in node.inputs):
            continue
        if _reaches_writer(node, writer_outputs):
            adds.append(node)
    return adds


def _reaches_writer(add: ir.Node, writer_outputs: set[int], depth: int = 4) -> bool:
    """Whether one operand of ``add`` comes from a linear through at most ``depth`` elementwise/reshape ops."""
    return any(_value_reaches(v, writer_outputs, depth) for v in add.inputs if v is not None)


#: Ops a linear's output may pass through on its way into the residual Add.
_PASSTHROUGH_OPS = {"Mul", "Reshape", "Transpose", "Cast", "Identity"}


def _value_reaches(value: ir.Value, targets: set[int], depth: int) -> bool:
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            if id(v) in targets:
                return True
            producer = v.producer()
            if producer is not None and producer.op_type in _PASSTHROUGH_OPS:
                nxt.extend(u for u in producer.inputs if u is not None and constant_array(u) is None)
        frontier = nxt
    return False


def residual_add_after(linear: Linear, depth: int = 4) -> tuple[ir.Node, ir.Value] | None:
    """The residual Add that ``linear`` (an o/down/fc2 writer) writes into, and its other operand (the residual
    stream coming in); None if there is none within ``depth`` elementwise, reshape or norm ops (Gemma's post-norms)."""
    passthrough = _PASSTHROUGH_OPS | {op for _, op in NORM_OPS}
    frontier = [linear.output]
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node.op_type == "Add" and len(node.inputs) == 2 and all(constant_array(v) is None for v in node.inputs):
                    return node, node.inputs[1 - use.idx]
                if node.op_type in passthrough:
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None


def build_model_map(model: ir.Model) -> ModelMap:
    graph = model.graph
    linears: list[Linear] = []
    refused: list[Skip] = []
    norms: list[Norm] = []
    embeddings: list[ir.Node] = []
    for node in graph:
        if LOWRANK_KEY in node.metadata_props:
            refused.append(Skip(node.name or node.op_type, "a low-rank error-compensation branch (stays in float)"))
            continue
        linear, reason = _as_linear(node)
        if linear is not None:
            linear.role = _role_from_name(linear.name) or "other"
            linear.component = _component(linear.name)
            match = LAYER_INDEX.search(linear.name)
            linear.layer = int(match.group(1)) if match else None
            linears.append(linear)
        elif reason is not None:
            refused.append(Skip(node.name or node.op_type, reason))
        kind = NORM_OPS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if kind is not None:
            norms.append(Norm(node, kind, module_path(node) or node.name or node.op_type, _norm_epsilon(node)))
        if node.op_type == "Gather":
            table = constant_array(node.inputs[0])
            if table is not None and table.ndim == 2 and table.dtype in (np.float32, np.float16):
                embeddings.append(node)
    _assign_structural_roles(linears)
    by_input: dict[int, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(id(lin.input), []).append(lin)
    for norm in norms:
        norm.readers = by_input.get(id(norm.node.outputs[0]), [])
    return ModelMap(linears, norms, embeddings, _residual_adds(graph, linears), refused)


def embedding_gather(value: ir.Value) -> ir.Node | None:
    """The embedding ``Gather`` whose table can absorb a transform of ``value``'s channels: ``value`` is its
    output, or that output times a scalar constant (Gemma's ``embed * sqrt(hidden)``)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Mul" and len(producer.inputs) == 2:
        scalars = [v for v in producer.inputs if (a := constant_array(v)) is not None and a.size == 1]
        rest = [v for v in producer.inputs if v is not None and v not in scalars]
        producer = rest[0].producer() if len(scalars) == 1 and len(rest) == 1 else None
    if producer is None or producer.op_type != "Gather" or producer.domain not in ("", "ai.onnx"):
        return None
    table = constant_array(producer.inputs[0])
    axis = producer.attributes.get("axis")
    if table is None or table.ndim != 2 or (axis is not None and axis.as_int() != 0):
        return None
    return producer


def stream_entry(graph: ir.Graph, name: str) -> ir.Value | None:
    """Where the decoder's residual stream starts: the graph input ``name`` (``inputs_embeds``), else the output
    of the token-embedding ``Gather`` that reads a graph input (a decoder exported with ``input_ids`` only),
    taken after a scalar scale when there is one."""
    entry = next((v for v in graph.inputs if v.name == name), None)
    if entry is not None:
        return entry
    inputs = {id(v) for v in graph.inputs}
    for node in graph:
        if node.op_type != "Gather" or len(node.inputs) < 2 or id(node.inputs[1]) not in inputs:
            continue
        value = node.outputs[0]
        uses = list(value.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Mul" and embedding_gather(uses[0].node.outputs[0]) is node:
            value = uses[0].node.outputs[0]
        if embedding_gather(value) is node:
            return value
    return None


def _reshape_target(value: ir.Value) -> list[int] | None:
    """The constant target shape of the ``Reshape`` reading ``value``; a ``Concat`` target gives its constant tail."""
    for use in value.uses():
        node = use.node
        if node.op_type != "Reshape" or use.idx != 0:
            continue
        shape = constant_array(node.inputs[1])
        if shape is not None:
            return [int(d) for d in shape.reshape(-1)]
        producer = node.inputs[1].producer()
        if producer is not None and producer.op_type == "Concat":
            tail = constant_array(producer.inputs[-1])
            if tail is not None:
                return [int(d) for d in tail.reshape(-1)]
    return None


def infer_head_layout(model_map: ModelMap, graph: ir.Graph) -> tuple[int | None, int | None, str]:
    """``(head_dim, kv_heads, how)`` read from the graph: onnxruntime's ``GroupQueryAttention`` /
    ``MultiHeadAttention`` attributes, else the ``Reshape`` that splits v_proj's output into heads
    ([batch, seq, kv_heads, head_dim])."""
    v_lins = [lin for lin in model_map.linears if lin.role == "v" and lin.component == "language"]
    q_lins = [lin for lin in model_map.linears if lin.role == "q" and lin.component == "language"]
    for node in graph:
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention") and node.attributes.get("num_heads"):
            heads = node.attributes["num_heads"].as_int()
            kv_attr = node.attributes.get("kv_num_heads")
            kv_heads = kv_attr.as_int() if kv_attr is not None else heads
            if q_lins:
                return q_lins[0].out_features // heads, kv_heads, f"{node.op_type} {node.name} attributes"
    for lin in v_lins:
        target = _reshape_target(lin.output)
        if target and target[-1] > 0 and lin.out_features % target[-1] == 0:
            head_dim = target[-1]
            return head_dim, lin.out_features // head_dim, f"Reshape after {lin.name} (target shape {target})"
    return None, None, "no attention op and no constant head split after v_proj"


def post_norm_reason(model_map: ModelMap, node: ir.Node) -> str | None:
    """Why LayerNorm ``node`` can never be folded: it normalizes the sum of a residual add of a linear's output and
    its own output is added into the stream (post-LN / sandwich-LN, BERT-like), so its γ/β sit on the residual path,
    not in front of linears (spec §2.5). None for a pre-LN norm."""
    writer_outputs = {id(lin.output) for lin in model_map.linears}
    producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    residual_in = producer is not None and producer.op_type == "Add" and any(
        id(v) in writer_outputs or (v is not None and v.producer() is not None and v.producer().op_type == "Mul"
                                    and any(id(w) in writer_outputs for w in v.producer().inputs))
        for v in producer.inputs)
    feeds_add = any(use.node.op_type == "Add" and use.node.graph is node.graph for use in node.outputs[0].uses())
    if not (residual_in and feeds_add):
        return None
    return (f"LayerNorm {node.name} is applied after the residual add and its output is added into the stream "
            "(post-LN / sandwich-LN, BERT-like): its γ/β sit on the residual path and cannot be folded into a "
            "following linear (spec §2.5)")
