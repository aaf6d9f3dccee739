"""The one report structure shared by compile, explain and eval.

Every pass writes a :class:`PassRecord`: what it matched, changed, skipped (with the reason), the per-layer figures
it decided (scales, clip ratios, SQNR, ranks, flagged channels) and, for function-preserving passes, the measured
output drift under ``--verify``. The whole :class:`CompileReport` is stored as JSON in the compiled model's
metadata, so ``mqc explain`` needs nothing but the compiled file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

REPORT_KEY = "mqc.report"


@dataclass
class PassRecord:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    function_preserving: bool = False
    matched: int = 0
    changed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    seconds: float = 0.0
    #: Which variant ran where the paper and its public code differ (empty where they agree).
    variant: str = ""
    #: Why the pass did not do its essential work (a refused precondition), when ``--allow-partial`` went on.
    not_applied: str = ""

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append({"node": node, "reason": reason})


@dataclass
class CompileReport:
    recipe: str
    recipe_passes: list[dict[str, Any]]
    source: str
    format: str = "qdq"
    model_summary: dict[str, Any] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    mqc_version: str = ""
    #: Compiled vs float on held-out samples (mqc.quality_gate): SQNR, KL, top-1 agreement.
    quality: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_jsonable, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> CompileReport:
        data = json.loads(text)
        data["passes"] = [PassRecord(**p) for p in data.get("passes", [])]
        return cls(**data)

    def not_applied(self) -> list[str]:
        """``pass: reason`` for each pass that did not do its essential work (``--allow-partial``)."""
        return [f"{record.name}: {record.not_applied}" for record in self.passes if record.not_applied]

    def layer_table(self) -> list[dict[str, Any]]:
        """Per-layer rows merged across passes, keyed by layer name, in first-seen order."""
        rows: dict[str, dict[str, Any]] = {}
        for record in self.passes:
            for layer in record.layers:
                rows.setdefault(layer["name"], {"name": layer["name"]}).update(
                    {k: v for k, v in layer.items() if k != "name"}
                )
        return list(rows.values())


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        pass
    return str(value)


def read_report(path: str) -> CompileReport | None:
    """The report stored in a compiled model, or None for a model mqc did not compile."""
    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == REPORT_KEY:
            return CompileReport.from_json(prop.value)
    return None
