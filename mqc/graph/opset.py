"""Opset handling shared by passes that need a minimum default-domain opset."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import version_converter

from mqc.ir import TARGET_OPSET, default_opset


def upgrade_opset(model: ir.Model, target: int = TARGET_OPSET) -> bool:
    """Convert the default-domain opset up to ``target``; False when it already is at least that."""
    if default_opset(model) >= target:
        return False
    version_converter.convert_version(model, target_version=target, fallback=True)
    model.opset_imports[""] = target
    return True
