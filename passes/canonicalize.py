"""Canonicalization: bring an exported graph into the form every other pass expects.

Rules:
1. ``UpgradeOpsetPass``: the default-domain opset becomes 23 (int4 Q/DQ need 21, ``RMSNormalization`` needs 23),
   through onnxscript's version converter, so ReduceMean-with-attribute models from opset 13-17 are rewritten too.
   Function-preserving.
2. ``FuseNormsPass``: decomposed normalizations (``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul``
   for RMSNorm; ``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Add`` for LayerNorm)
   become single ``RMSNormalization`` / ``LayerNormalization`` nodes, using onnxscript's fusion rules. A rule whose
   check fails (epsilon not a constant float, unsupported dtype) is recorded with its reason. Function-preserving.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_rules
from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_rules

from mqc.graph.opset import upgrade_opset
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
        return super().run(model) or upgraded
