"""SmoothQuant: migrate activation outliers into the weights (spec/algorithms.md §3.2 Eq. 8 and §4).

Uses y = x W = (x / s)(diag(s) W). With calibration channel maxima over all modalities together (the unified factor,
Eq. 11), each group of linears that read one value gets one vector

    s_i = max_t|x_{t,i}|^α / max_j|W_{i,j}|^(1−α)                     (``mqc.smoothing.smoothquant_scales``)

where W is the readers' weights side by side ([in, Σ out]), so q/k/v share one s and gate/up share one s.

Rules, in order, per group of linears reading one value:
1. Roles in ``skip_roles`` (``lm_head``, which stays in float), names matching ``--exclude`` and values no
   calibration row reached are left alone (recorded). A group that contains a skipped linear is not smoothed.
2. Every reader's weight rows are multiplied by s (``W ← diag(s) W``; Gemm ``transB`` layouts scale columns).
3. 1/s is folded into the producer when that is exact:
   a. a norm (``RMSNormalization``, ``LayerNormalization``, ``SimplifiedLayerNormalization`` and the ``Skip`` forms)
      whose output 0 is read by the group's linears and nothing else, not a graph output: γ ← γ/s (β ← β/s).
      A γ shared with other norms is copied first, so only this norm changes.
   b. ``down``: its input is ``Mul(act(gate), up)``; the up linear's output feeds only that Mul, so up's output
      columns (and bias) are divided by s — elementwise, exact.
   c. otherwise an explicit ``Mul(x, 1/s)`` is inserted before the readers (recorded as "explicit scale").
4. ``o`` is never folded into ``v``: the attention output rows of o map to v's columns through the per-kv-head GQA
   repeat (row i ↔ v column (i // d_h // n_rep)·d_h + i mod d_h), which is exact only with s constant over
   replicas, and v's output is the KV cache (``present.*`` is a graph output), which folding would change. o gets
   an explicit scale, with that reason recorded.
5. The pass is function-preserving: ``--verify`` checks the float outputs before and after.

Per layer it records α, the range of s, the fold target and the activation absmax before and after smoothing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mqc.ir import add_initializer, constant_array, replace_initializer
from mqc.model_map import Linear, ModelMap, Norm
from mqc.pass_manager import MqcPass
from mqc.smoothing import smoothquant_scales


def _set_input_constant(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph, name: str) -> None:
    """Give ``node.inputs[index]`` the value ``array``, copying the initializer first when others read it too."""
    value = node.inputs[index]
    if value is not None and value.const_value is not None and len(list(value.uses())) == 1 and value.name in graph.initializers:
        replace_initializer(value, array)
        return
    node.replace_input_with(index, add_initializer(graph, name, array))


def _scale_weight(graph: ir.Graph, lin: Linear, row_scale: np.ndarray | None = None, col_scale: np.ndarray | None = None) -> None:
    """W[in, out] ← diag(row_scale) W diag(col_scale), in the layout the graph stores; the bias ← bias · col_scale."""
    stored = constant_array(lin.node.inputs[1])  # the current weight: an earlier fold may have replaced it
    assert stored is not None
    w = (stored.T if lin.transposed else stored).astype(np.float64)
    if row_scale is not None:
        w = w * row_scale[:, None]
    if col_scale is not None:
        w = w * col_scale[None, :]
    w = (w.T if lin.transposed else w).astype(stored.dtype)
    _set_input_constant(lin.node, 1, w, graph, f"{lin.name}.weight_smoothed")
    if col_scale is not None and lin.bias is not None:
        if lin.bias_node is not None:
            node = lin.bias_node
            index = next(i for i, v in enumerate(node.inputs) if v is not None and constant_array(v) is not None)
        else:
            node, index = lin.node, 2
        bias = constant_array(node.inputs[index])
        assert bias is not None
        _set_input_constant(node, index, (bias.astype(np.float64) * col_scale).astype(bias.dtype), graph, f"{lin.name}.bias_smoothed")


class SmoothQuantPass(MqcPass):
    """Per-channel smoothing of every linear's input with the SmoothQuant factor, folded where exact."""

    name = "smoothquant"
    function_preserving = True

    def run(self, model: ir.Model) -> bool:
        model_map = self.ctx.model_map(model)
        graph = model.graph
        groups: dict[str, list[Linear]] = {}
        for lin in model_map.linears:
            groups.setdefault(lin.input.name, []).append(lin)
        self.record.matched = len(model_map.linears)
        selected: dict[str, list[Linear]] = {}
        for value_name, group in groups.items():
            refused = [lin for lin in group if lin.role in self.params.skip_roles or self.ctx.excluded(lin.name)]
            if refused:
                for lin in group:
                    why = "role in skip_roles" if lin.role in self.params.skip_roles else "name matches --exclude"
                    self.record.skip(lin.name, f"not smoothed: {why}" if lin in refused else
                                     f"not smoothed: shares its input with {refused[0].name}, which is not smoothed")
                continue
            selected[value_name] = group
        if not selected:
            return False
        stats = self.ctx.calibrate(model, list(selected), label="calibrating smoothquant")
        changed = 0
        for value_name, group in selected.items():
            tap = stats.get(value_name)
            combined = self.usable_stats(tap, group)
            if combined is None:
                continue
            weights = np.concatenate([lin.weight_array() for lin in group], axis=1)
            s = smoothquant_scales(combined.channel_absmax, weights, self.params.alpha)
            how = self._fold(graph, model_map, group, s)
            for lin in group:
                _scale_weight(graph, lin, row_scale=s)
                smoothed = combined.channel_absmax / s
                self.record.layers.append({
                    **lin.to_dict(),
                    "alpha": self.params.alpha,
                    "s_min": float(s.min()),
                    "s_max": float(s.max()),
                    "smooth_fold": how,
                    "act_absmax_before": float(combined.absmax),
                    "act_absmax_after": float(smoothed.max()),
                    "act_channel_spread_before": float(combined.channel_absmax.max() / max(combined.channel_absmax.min(), 1e-12)),
                    "act_channel_spread_after": float(smoothed.max() / max(smoothed.min(), 1e-12)),
                })
                changed += 1
        self.record.changed = changed
        return changed > 0

    # ------------------------------------------------------------------------------------------------ folding

    def _fold(self, graph: ir.Graph, model_map: ModelMap, group: list[Linear], s: np.ndarray) -> str:
        """Divide the group's input by s at its producer when exact, else with an explicit Mul; says which."""
        value = group[0].input
        nodes = {id(lin.node) for lin in group}
        only_group = all(id(u.node) in nodes and u.idx == 0 for u in value.uses()) and value not in graph.outputs
        producer = value.producer()
        norm = next((n for n in model_map.norms if producer is n.node), None)
        if norm is not None and only_group and producer.outputs[0] is value and self._fold_into_norm(graph, norm, s):
            return f"norm {norm.name}"
        if group[0].role == "down" and len(group) == 1:
            up = self._up_of(model_map, value)
            if up is not None:
                _scale_weight(graph, up, col_scale=1.0 / s)
                return f"columns of {up.name}"
        if group[0].role == "o":
            self.record.notes.append(
                f"{group[0].name}: 1/s not folded into v_proj (GQA replicates v columns across heads and v's output "
                "is the KV cache output present.*, which folding would change): explicit scale")
        self._explicit_scale(graph, value, group, s)
        return "explicit scale"

    def _fold_into_norm(self, graph: ir.Graph, norm: Norm, s: np.ndarray) -> bool:
        node = norm.node
        skip_form = node.op_type.startswith("Skip")
        gamma_index = 2 if skip_form else 1
        beta_index = 3 if skip_form else 2
        gamma = constant_array(node.inputs[gamma_index]) if len(node.inputs) > gamma_index else None
        if gamma is None or gamma.shape != s.shape:
            self.record.skip(norm.name, "norm has no constant per-channel scale to fold 1/s into: explicit scale")
            return False
        beta = None
        if norm.kind == "layernorm" and len(node.inputs) > beta_index and node.inputs[beta_index] is not None:
            beta = constant_array(node.inputs[beta_index])
            if beta is None or beta.shape != s.shape:
                self.record.skip(norm.name, "LayerNorm bias is not a constant per-channel vector: explicit scale")
                return False
        _set_input_constant(node, gamma_index, (gamma.astype(np.float64) / s).astype(gamma.dtype), graph, f"{norm.name}.weight_smoothed")
        if beta is not None:
            _set_input_constant(node, beta_index, (beta.astype(np.float64) / s).astype(beta.dtype), graph, f"{norm.name}.bias_smoothed")
        return True

    @staticmethod
    def _up_of(model_map: ModelMap, value: ir.Value) -> Linear | None:
        """The up linear of ``value = Mul(act(gate), up)`` when up's output feeds only that Mul."""
        producer = value.producer()
        if producer is None or producer.op_type != "Mul":
            return None
        ups = {id(lin.output): lin for lin in model_map.linears if lin.role == "up"}
        for operand in producer.inputs:
            up = ups.get(id(operand)) if operand is not None else None
            if up is not None and len(list(operand.uses())) == 1:
                return up
        return None

    @staticmethod
    def _explicit_scale(graph: ir.Graph, value: ir.Value, group: list[Linear], s: np.ndarray) -> None:
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        inv = add_initializer(graph, f"{value.name}_smooth_inv_scale", (1.0 / s).astype(dtype))
        mul = ir.node("Mul", [value, inv], name=f"{value.name}/smooth")
        mul.outputs[0].name = f"{value.name}_smoothed"
        mul.outputs[0].dtype = value.dtype
        mul.outputs[0].shape = value.shape
        order = {id(node): i for i, node in enumerate(graph)}
        graph.insert_before(min((lin.node for lin in group), key=lambda n: order[id(n)]), [mul])
        for lin in group:
            lin.node.replace_input_with(0, mul.outputs[0])
