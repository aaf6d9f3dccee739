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

from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.graph.opset import upgrade_opset
from mqc.graph.stream import (
    StreamRefused,
    add_bias,
    apply_transform,
    is_default_domain,
    known_rank,
    norm_output_readers,
    trace_stream,
)
from mqc.graph.weights import live_uses, own_bias, own_weight, set_bias, set_weight
from mqc.ir import TARGET_OPSET, add_initializer, constant_array, default_opset, remove_unused_initializers
from mqc.model_map import Linear, ModelMap, post_norm_reason
from mqc.pass_manager import MqcPass, declare_fatal


class LayerNormToRMSNormPass(MqcPass):
    """Centre the residual stream, fold LayerNorm affines into their readers, replace LayerNorm by RMSNorm₀."""

    name = "ln_to_rmsnorm"
    function_preserving = True
    fatal_skips = declare_fatal(
        no_layernorm="the graph has no LayerNormalization to convert",
        stream_not_centrable="a LayerNorm or the residual stream has a form the centring cannot prove "
                             "exact (rules 1-3: post-LN, a reader of the raw stream; the node is named)",
    )

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        model_map = self.ctx.model_map(model)
        norms = [n.node for n in model_map.norms if n.node.op_type == "LayerNormalization" and is_default_domain(n.node)]
        others = [n for n in model_map.norms if n.kind == "layernorm" and n.node not in norms]
        self.record.matched = len(norms)
        if not norms:
            raise self.refuse("no_layernorm", "no LayerNormalization in the graph: nothing to convert")
        try:
            if others:
                raise StreamRefused(f"{others[0].name} is a {others[0].node.op_type}, not a plain LayerNormalization")
            width = self._check_norms(graph, model_map, norms)
            closure = trace_stream(graph, model_map, norms, width, allow_norm_outputs=True, transform="centring")
            linear_nodes = {id(lin.node): lin for lin in model_map.linears}
            for lin in closure.writers:
                if self.ctx.excluded(lin.name):
                    raise StreamRefused(f"writer {lin.name} matches --exclude, but every stream writer must be centred")
        except StreamRefused as exc:
            raise self.refuse("stream_not_centrable", str(exc)) from None
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

    def ensures(self, model: ir.Model) -> None:
        """No LayerNormalization is left: the pass converts all of them or refuses before changing anything."""
        left = [node.name for node in model.graph if node.op_type == "LayerNormalization" and is_default_domain(node)]
        if left:
            raise self.broken(f"{len(left)} LayerNormalization nodes are left, e.g. {left[0]}")

    def _check_norms(self, graph: ir.Graph, model_map: ModelMap, norms: list[ir.Node]) -> int:
        widths = set()
        for node in norms:
            name = node.name
            axis = node.attributes.get("axis")
            rank = known_rank(node.inputs[0])
            if axis is not None and axis.as_int() % rank != rank - 1:
                raise StreamRefused(f"LayerNorm {name} normalizes axis {axis.as_int()}, not the last")
            gamma = constant_array(node.inputs[1])
            beta = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if gamma is None or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None):
                raise StreamRefused(f"LayerNorm {name} has a non-constant scale or bias")
            widths.add(int(gamma.reshape(-1).shape[0]))
            post_norm = post_norm_reason(model_map, node)
            if post_norm:
                raise StreamRefused(post_norm)
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
