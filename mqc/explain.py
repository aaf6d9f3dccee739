"""``mqc explain``: what each pass did and a per-layer table, read back from the compiled file alone."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from mqc.report import CompileReport

LAYER_COLUMNS = [
    ("name", "layer"),
    ("role", "role"),
    ("w_bits", "W"),
    ("a_bits", "A"),
    ("act_scale", "act scale"),
    ("act_clip_ratio", "clip"),
    ("sqnr_db", "SQNR dB"),
    ("sqnr_db_text", "text"),
    ("sqnr_db_image", "image"),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def render(report: CompileReport, console: Console, title: str = "") -> None:
    head = f"[bold]{title or report.source}[/bold]: recipe [cyan]{report.recipe}[/cyan], format {report.format}"
    console.print(head)
    console.print(f"calibration: {_fmt(report.calibration)}")
    console.print(f"model: {_fmt({k: v for k, v in report.model_summary.items() if k != 'refused'})}")
    passes = Table(title="passes", show_lines=False)
    for column in ("pass", "matched", "changed", "skipped", "verify (max rel drift)", "s", "notes"):
        passes.add_column(column)
    for record in report.passes:
        verify = "-" if record.verify is None else f"{record.verify['max_rel']:.2e} (tol {record.verify['rtol']:g})"
        passes.add_row(record.name, str(record.matched), str(record.changed), str(len(record.skipped)), verify,
                       f"{record.seconds:.2f}", "; ".join([f"variant: {record.variant}"] * bool(record.variant) + record.notes))
    console.print(passes)
    rows = report.layer_table()
    if rows:
        layers = Table(title="layers")
        present = [(key, label) for key, label in LAYER_COLUMNS if any(key in row for row in rows)]
        extra = sorted({k for row in rows for k in row} - {k for k, _ in LAYER_COLUMNS}
                       - {"component", "layer", "in", "out", "bias", "op", "act_absmax"})
        for _, label in present:
            layers.add_column(label)
        for key in extra:
            layers.add_column(key)
        for row in rows:
            layers.add_row(*[_fmt(row.get(key)) for key, _ in present], *[_fmt(row.get(key)) for key in extra])
        console.print(layers)
    skipped = [(record.name, s) for record in report.passes for s in record.skipped]
    if skipped:
        table = Table(title="skipped")
        for column in ("pass", "node", "reason"):
            table.add_column(column)
        for name, skip in skipped:
            table.add_row(name, skip["node"], skip["reason"])
        console.print(table)


def to_json(reports: dict[str, CompileReport]) -> str:
    return json.dumps({name: asdict(report) for name, report in reports.items()}, indent=2, default=str)
