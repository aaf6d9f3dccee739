"""Canonicalization: bring an exported graph into the form every other pass expects.

Rules:
1. ``UpgradeOpsetPass``: the default-domain opset becomes 23 (int4 Q/DQ need 21, ``RMSNormalization`` needs 23),
   through onnxscript's version converter, so ReduceMean-with-attribute models from opset 13-17 are rewritten too.
   Function-preserving.
2. ``FuseNormsPass``: decomposed normalizations (``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul``
   for RMSNorm; ``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Add`` for LayerNorm)
   become single ``RMSNormalization`` / ``LayerNormalization`` nodes, using onnxscript's fusion rules. A rule whose
   check fails (epsilon not a constant float, unsupported dtype) is recorded with its reason. The spellings those
   rules miss (TorchScript's casts and ``Div(1, ·)``, opset-14 ReduceMean attributes, Gemma's ``1 + w``) are fused
   by :func:`mqc.graph_forms.fuse_decomposed_norms`, and a ``MatMul`` reading ``Transpose(W)`` of a constant (a
   tied lm_head) first gets its own weight (:func:`mqc.graph_forms.materialize_transposed_weights`), so the model
   map sees it as a linear; ``Identity`` of a constant (TorchScript's shared parameters) is read through.
   Subgraphs of constants are folded last (a position table behind a ``Resize``). onnxruntime-genai's fused ``Skip(Simplified)LayerNormalization`` become Add + a standard norm and its packed
   qkv MatMul is split into q/k/v (:func:`mqc.graph_forms.unfuse_skip_norms`, :func:`~mqc.graph_forms.split_packed_qkv`).
   Function-preserving.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_rules
from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_rules

from mqc.graph.opset import upgrade_opset
from mqc.graph_forms import (
    fold_constant_subgraphs,
    fuse_decomposed_norms,
    inline_constant_identities,
    materialize_transposed_weights,
    split_packed_qkv,
    unfuse_skip_norms,
)
from mqc.ir import TARGET_OPSET, default_opset
from mqc.pass_manager import MqcPass, RewriteRulesPass


class UpgradeOpsetPass(MqcPass):
    """Convert the default-domain opset up to ``TARGET_OPSET`` (never down)."""

    name = "upgrade_opset"
    function_preserving = True

    def run(self, model: ir.Model) -> bool:
        current = default_opset(model)
        self.record.matched = 1
        if not upgrade_opset(model, self.params.target):
            self.record.notes.append(f"opset {current} kept (>= {self.params.target})")
            return False
        self.record.changed = 1
        self.record.notes.append(f"opset {current} -> {self.params.target}")
        return True

    def ensures(self, model: ir.Model) -> None:
        """The default-domain opset is at least the target."""
        if default_opset(model) < self.params.target:
            raise self.broken(f"opset {default_opset(model)} is below the target {self.params.target}")


class FuseNormsPass(RewriteRulesPass):
    """Fuse decomposed LayerNorm / RMSNorm subgraphs into single normalization nodes."""

    name = "fuse_norms"
    function_preserving = True

    def rules(self) -> pattern.RewriteRuleSet:
        return pattern.RewriteRuleSet([*rms_normalization_rules, *layer_normalization_rules])

    def run(self, model: ir.Model) -> bool:
        upgraded = upgrade_opset(model)  # RMSNormalization exists from opset 23 on
        if upgraded:
            self.record.notes.append(f"opset raised to {TARGET_OPSET} for RMSNormalization")
        inline_constant_identities(model.graph)
        untied = materialize_transposed_weights(model.graph)
        self.record.notes.extend(untied)
        changed = super().run(model)
        rewritten = unfuse_skip_norms(model) + split_packed_qkv(model.graph)  # onnxruntime-genai
        self.record.notes.extend(rewritten)
        fused = fuse_decomposed_norms(model)  # the exporter spellings onnxscript's rules miss (module docstring)
        if fused:
            self.record.matched += len(fused)
            self.record.changed += len(fused)
            self.record.notes.append(f"fused by mqc.graph_forms: {', '.join(fused)}")
        if fold_constant_subgraphs(model):
            self.record.notes.append("constant subgraphs folded")
        self.record.changed += len(untied) + len(rewritten)
        return changed or upgraded or bool(untied) or bool(fused) or bool(rewritten)
