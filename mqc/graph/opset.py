"""Opset handling shared by passes that need a minimum default-domain opset.

onnxscript's version converter hands most upgrades to onnx's C converter, which stops at the first op it has no
adapter for, logs a traceback, and leaves the model unconverted. Two things follow here:

1. ``LayerNormalization`` in the default domain below opset 17 is onnxruntime's own op (its optimizer writes it into
   opset-14 graphs); onnx has no adapter for it. It already has the signature and meaning of opset 17's
   ``LayerNormalization``, so it is set aside under a private domain during the conversion and put back after.
2. Any other failure is one clear error naming the converter's reason, not a traceback and a model that claims an
   opset it was never converted to.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript import version_converter

from mqc.errors import InputModelError
from mqc.ir import TARGET_OPSET, default_opset

#: Default-domain ops onnx's converter has no adapter for, and the opset from which onnx defines them as they are.
_ONNXRUNTIME_OPS_BEFORE_ONNX = {"LayerNormalization": 17}
_SET_ASIDE_DOMAIN = "mqc.opset_upgrade.set_aside"
_CONVERTER_LOGGER = "onnxscript.version_converter"


def upgrade_opset(model: ir.Model, target: int = TARGET_OPSET) -> bool:
    """Convert the default-domain opset up to ``target``; False when it already is at least that."""
    current = default_opset(model)
    if current >= target:
        return False
    set_aside = _set_aside_unadaptable(model, current)
    reasons = _ConverterLog()
    logger = logging.getLogger(_CONVERTER_LOGGER)
    logger.addHandler(reasons)
    propagate, logger.propagate = logger.propagate, False  # its "falling back to the C API" notice and traceback
    try:
        version_converter.convert_version(model, target_version=target, fallback=True)
    finally:
        logger.removeHandler(reasons)
        logger.propagate = propagate
        _put_back(model, set_aside)
    if default_opset(model) < target:
        raise InputModelError(f"cannot convert the model from opset {current} to {target}: "
                              f"{reasons.failure() or 'the onnx version converter left it unconverted'}")
    return True


class _ConverterLog(logging.Handler):
    """Keeps the converter's records (it reports failures as warnings) so a failure can be told in one line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(record)

    def failure(self) -> str | None:
        for record in self.errors:
            if record.exc_info and record.exc_info[1] is not None:
                return str(record.exc_info[1]).rsplit(": ", 1)[-1].replace("$", "")
        return None


def _set_aside_unadaptable(model: ir.Model, current: int) -> int:
    """Move onnxruntime-only default-domain ops to a private domain for the conversion; how many were moved."""
    moved = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        since = _ONNXRUNTIME_OPS_BEFORE_ONNX.get(node.op_type)
        if since is not None and current < since and node.domain in ("", "ai.onnx"):
            node.domain = _SET_ASIDE_DOMAIN
            moved += 1
    if moved:
        model.opset_imports[_SET_ASIDE_DOMAIN] = 1
    return moved


def _put_back(model: ir.Model, moved: int) -> None:
    if not moved:
        return
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == _SET_ASIDE_DOMAIN:
            node.domain = ""
    model.opset_imports.pop(_SET_ASIDE_DOMAIN, None)
