"""``mqc explain``: what each pass did and a per-layer table, read back from the compiled file alone.

Every string shown comes from a file someone else may have written (layer names, metadata, the stored report), so
none is interpreted: cells are plain :class:`~rich.text.Text` (no markup, no links) with terminal control
characters escaped (:func:`mqc.errors.printable`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mqc.errors import printable
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


def _text(value: Any, style: str = "") -> Text:
    """A cell or line fragment that is shown as-is: never parsed as markup, control characters escaped."""
    return Text(printable(value if isinstance(value, str) else _fmt(value)), style=style)


def weight_widths(rows: list[dict[str, Any]]) -> str | None:
    """The mix of weight widths of the quantized layers (a mixed-precision budget's cost), or None for one width."""
    sizes: dict[int, int] = {}
    for row in rows:
        if "w_bits" in row and "in" in row and "out" in row:
            sizes[row["w_bits"]] = sizes.get(row["w_bits"], 0) + row["in"] * row["out"]
    if len(sizes) < 2:
        return None
    total = sum(sizes.values())
    mix = ", ".join(f"{100 * size / total:.1f} % at int{bits}" for bits, size in sorted(sizes.items()))
    mean = sum(bits * size for bits, size in sizes.items()) / total
    return f"{mix} of {total:,} quantized weights; {mean:.2f} bits per weight on average (scales not counted)"


def render(report: CompileReport, console: Console, title: str = "") -> None:
    console.print(Text.assemble(_text(title or report.source, "bold"), ": recipe ", _text(report.recipe, "cyan"),
                                ", format ", _text(report.format)))
    console.print(Text.assemble("calibration: ", _text(report.calibration)))
    console.print(Text.assemble("model: ", _text({k: v for k, v in report.model_summary.items() if k != "refused"})))
    passes = Table(title="passes", show_lines=False)
    for column in ("pass", "matched", "changed", "skipped", "verify (max rel drift)", "s", "notes"):
        passes.add_column(column)
    for record in report.passes:
        verify = "-" if record.verify is None else f"{record.verify['max_rel']:.2e} (tol {record.verify['rtol']:g})"
        notes = "; ".join([f"variant: {record.variant}"] * bool(record.variant) + [str(n) for n in record.notes])
        passes.add_row(_text(record.name), _text(record.matched), _text(record.changed), _text(len(record.skipped)),
                       _text(verify), _text(f"{float(record.seconds):.2f}" if record.seconds else "-"), _text(notes))
    console.print(passes)
    fatal = fatal_skip_table(report)
    if fatal.row_count:
        console.print(fatal)
    rows = report.layer_table()
    widths = weight_widths(rows)
    if widths:
        console.print(Text.assemble("weights: ", _text(widths)))
    if rows:
        layers = Table(title="layers")
        present = [(key, label) for key, label in LAYER_COLUMNS if any(key in row for row in rows)]
        extra = sorted({k for row in rows for k in row} - {k for k, _ in LAYER_COLUMNS}
                       - {"component", "layer", "in", "out", "bias", "op", "act_absmax"})
        for _, label in present:
            layers.add_column(label)
        for key in extra:
            layers.add_column(_text(key))
        for row in rows:
            layers.add_row(*[_text(row.get(key)) for key, _ in present], *[_text(row.get(key)) for key in extra])
        console.print(layers)
    skipped = [(record.name, s) for record in report.passes for s in record.skipped]
    if skipped:
        table = Table(title="skipped")
        for column in ("pass", "node", "reason"):
            table.add_column(column)
        for name, skip in skipped:
            table.add_row(_text(name), _text(skip["node"]), _text(skip["reason"]))
        console.print(table)


def declared_fatal_skips(pass_name: str) -> dict[str, str]:
    """The reason codes that stop the recipe when ``pass_name`` raises them, with what each means (none for a
    pass this mqc does not know, e.g. in a report written by another version)."""
    from mqc.errors import RecipeError
    from mqc.recipes import pass_class

    try:
        return dict(pass_class(pass_name).fatal_skips)
    except RecipeError:
        return {}


def fatal_skip_table(report: CompileReport) -> Table:
    """Per pass of the report, its fatal skip reasons; ``applied`` says which one stopped it (``--allow-partial``)."""
    table = Table(title="fatal skips (stop the recipe with exit 2 unless --allow-partial)")
    for column in ("pass", "reason code", "meaning", "this compile"):
        table.add_column(column)
    for record in report.passes:
        hit = {skip.get("fatal") for skip in record.skipped}
        for code, meaning in declared_fatal_skips(record.name).items():
            table.add_row(_text(record.name), _text(code), _text(meaning),
                          _text("did not apply: " + record.not_applied if code in hit else "-"))
    return table


def to_json(reports: dict[str, CompileReport]) -> str:
    return json.dumps({name: asdict(report) for name, report in reports.items()}, indent=2, default=str)
