"""Fold RMSNorm gammas into the linears that read them (spec/algorithms.md §2.5 step 4, LLM side).

An RMSNorm ``y = x / rms(x) · γ`` read only by linears ``y @ W`` computes the same as ``(x / rms(x)) @ (diag(γ) W)``:
γ scales the input rows of W ([in, out] layout; the input columns of a Gemm ``transB`` weight [out, in]). After
the fold the norm is affine-free (γ = 1), which is what the residual rotation (§2.6) needs, since
RMSNorm₀(xR) = RMSNorm₀(x)·R only holds without γ.

Rules, per normalization node of the model map:

1. ``RMSNormalization`` / ``SimplifiedLayerNormalization`` (and the Skip variant, on its first output) whose
   output is read *only* by linears of the model map is folded: every reader's weight gets W ← diag(γ)·W, then
   the norm's scale input is replaced by a new all-ones initializer (the norm node stays, affine-free).
2. A reader weight used by anything else (another node, a tied embedding ``Gather``) is copied first, so the
   fold never changes another consumer ("untie"; recorded as a note).
3. A shared γ initializer (exporters deduplicate equal gammas) is never modified in place: each folded norm
   gets its own ones.
4. Refused, with the reason recorded: ``LayerNormalization`` (it needs ``ln_to_rmsnorm`` first: LN does not
   commute with the centering, §2.5), a norm whose output has a non-linear consumer or is a graph output, a γ that
   is not a constant, and readers excluded by ``--exclude``. A γ already all ones is left as is (a note).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mqc.graph.weights import live_uses, own_weight, scale_rows
from mqc.ir import add_initializer, constant_array, remove_unused_initializers
from mqc.model_map import Linear, Norm
from mqc.pass_manager import MqcPass


class FoldNormsPass(MqcPass):
    """Fold each RMSNorm's γ into its reader linears and make the norm affine-free."""

    name = "norm_folding"
    function_preserving = True

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        model_map = self.ctx.model_map(model)
        linear_nodes = {id(lin.node): lin for lin in model_map.linears}
        changed = 0
        for norm in model_map.norms:
            self.record.matched += 1
            reason = self._refusal(graph, norm, linear_nodes)
            if reason is not None:
                self.record.skip(norm.name, reason)
                continue
            gamma = constant_array(norm.scale).astype(np.float64)
            if np.all(gamma == 1.0):
                self.record.notes.append(f"{norm.name}: gamma is already all ones, nothing to fold")
                continue
            readers = [linear_nodes[id(use.node)] for use in live_uses(norm.node.outputs[0], graph)]
            readers = list({id(r): r for r in readers}.values())
            for lin in readers:
                if own_weight(graph, lin):
                    self.record.notes.append(f"{lin.name}: weight shared with another node, copied before folding (untied)")
                scale_rows(lin, gamma)
            scale = norm.scale
            ones = add_initializer(graph, f"{norm.name}.weight_folded", np.ones_like(constant_array(scale)))
            index = 2 if norm.node.op_type.startswith("Skip") else 1
            norm.node.replace_input_with(index, ones)
            for lin in readers:  # rows keyed by linear name, so the report merges them with later passes
                self.record.layers.append({
                    "name": lin.name, "folded_norm": norm.name,
                    "gamma_absmax": round(float(np.max(np.abs(gamma))), 6), "gamma_min": round(float(np.min(gamma)), 6),
                })
            changed += 1
        if changed:
            remove_unused_initializers(graph)
        self.record.changed = changed
        return changed > 0

    def ensures(self, model: ir.Model) -> None:
        """Every norm recorded as folded is affine-free now (its gamma all ones)."""
        unit: dict[str, bool] = {}  # per norm name (names can repeat): is one norm of that name affine-free
        for norm in self.ctx.model_map(model).norms:
            gamma = constant_array(norm.scale) if norm.scale is not None else None
            unit[norm.name] = unit.get(norm.name, False) or (gamma is not None and bool(np.all(gamma == 1.0)))
        for name in sorted({row["folded_norm"] for row in self.record.layers}):
            if not unit.get(name, False):
                raise self.broken(f"norm {name} is recorded as folded but its gamma is not all ones")

    def _refusal(self, graph: ir.Graph, norm: Norm, linear_nodes: dict[int, Linear]) -> str | None:
        if norm.kind == "layernorm":
            return "LayerNorm: needs ln_to_rmsnorm first"
        output = norm.node.outputs[0]
        if output in graph.outputs:
            return "norm output is a graph output"
        uses = live_uses(output, graph)
        if not uses:
            return "norm output has no consumer"
        for use in uses:
            lin = linear_nodes.get(id(use.node))
            if lin is None or use.idx != 0:
                return f"norm output has a non-linear consumer: {use.node.op_type} {use.node.name}"
            if self.ctx.excluded(lin.name):
                return f"reader {lin.name} matches --exclude"
        if norm.scale is None:
            return "norm has no scale input (already affine-free)"
        gamma = constant_array(norm.scale)
        if gamma is None:
            return "gamma is not a constant"
        if gamma.ndim != 1:
            return f"gamma is {gamma.ndim}-D, not a vector"
        return None
