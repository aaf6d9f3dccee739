"""Activation precision budget: the few static activation quantizers that lose the most go to int16 (issue 14,
point 5; an extension beyond MQuant and MASQuant, which quantize every activation to int8).

A static int8 scale must cover a tensor's largest calibration row; where a few tokens are far larger than the rest
(``mqc diagnose``: newlines and ``<|im_start|>`` set o_proj's text range in SmolLM2), ordinary tokens keep only a
few of the 256 codes. Giving such a point 16 bits keeps it static (the same range, 256 times finer steps) at the cost
of running its linears outside the int8 kernels. This pass measures every static activation quantizer on the
calibration feeds and moves the ``points`` worst to int16.

Rules:
1. Input: a graph whose static activation quantizers are either the per-token fake-quant
   ``Mul(Clip(Round(Div(X, s)), -128, 127), s)`` (MSQ, sink scales; ``s`` any static per-row or scalar scale) or a
   per-tensor ``QuantizeLinear``/``DequantizeLinear`` pair with an int8 zero point. Per-token dynamic quantizers
   (``s`` computed from ``X`` at run time) are not budgeted: they are already fine-grained (recorded).
2. Loss of a point: on the calibration feeds, every token row's SQNR of the point's own quantizer (the graph's
   scale for that row, tapped), in dB; the point's figure is the median over rows (the median token, as ``mqc
   diagnose`` reports it), so a range set by a few outlier rows shows as a low figure.
3. The ``points`` lowest figures are promoted: the fake-quant gets ``s' = s * 127 / 32767`` and the clip
   [-32768, 32767], a QDQ pair gets the same scale change and an int16 zero point. The clip range in float is
   unchanged (127 s), the step is 258x finer. Nothing is computed at run time: the graph stays static.
4. Cost (recorded and shown by explain): in ``--format mqc`` a promoted point's linears stay in QDQ form (the
   runtime ops take int8 activations only), so they run as float GEMMs on dequantized weights.
5. Not function-preserving: it changes the quantization grid only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mqc.calibration import capture
from mqc.ir import add_initializer, constant_array, depends_on
from mqc.pass_manager import MqcPass

INT8_MAX, INT16_MIN, INT16_MAX = 127.0, -32768.0, 32767.0


@dataclass
class _Point:
    """One static activation quantizer: its input, its scale value and the nodes that use the scale."""

    x: ir.Value
    scale: ir.Value
    form: str  # "fake_quant" or "qdq"
    nodes: list[ir.Node]  # fake_quant: Div, Clip, Mul; qdq: QuantizeLinear, DequantizeLinear...

    @property
    def name(self) -> str:
        return self.x.name or "act"


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value) if value is not None else None
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def _fake_quant_point(div: ir.Node) -> _Point | str | None:
    """The fake-quant chain starting at ``div``; a reason string when it is a dynamic one; None if not a chain."""
    x, scale = div.inputs[0], div.inputs[1]
    rnd = next((u.node for u in div.outputs[0].uses() if u.node.op_type == "Round"), None)
    clip = next((u.node for u in rnd.outputs[0].uses() if u.node.op_type == "Clip"), None) if rnd else None
    mul = next((u.node for u in clip.outputs[0].uses() if u.node.op_type == "Mul"), None) if clip else None
    if mul is None or scale not in mul.inputs or len(clip.inputs) < 3:
        return None
    if (_scalar(clip.inputs[1]), _scalar(clip.inputs[2])) != (-INT8_MAX - 1, INT8_MAX):
        return None
    if depends_on(scale, x):
        return f"{x.name}: a per-token dynamic quantizer, not budgeted"
    return _Point(x, scale, "fake_quant", [div, clip, mul])


def _qdq_point(quant: ir.Node) -> _Point | None:
    if len(quant.inputs) < 3 or _scalar(quant.inputs[1]) is None:
        return None
    zero = constant_array(quant.inputs[2])
    if zero is None or zero.dtype != np.int8 or zero.size != 1 or int(zero.reshape(())) != 0:
        return None
    dequants = [u.node for u in quant.outputs[0].uses() if u.node.op_type == "DequantizeLinear"]
    if not dequants or any(d.inputs[1] is not quant.inputs[1] or d.inputs[2] is not quant.inputs[2] for d in dequants):
        return None
    return _Point(quant.inputs[0], quant.inputs[1], "qdq", [quant, *dequants])


def static_activation_points(graph: ir.Graph) -> tuple[list[_Point], list[str]]:
    """Every static int8 activation quantizer of ``graph`` (rule 1), and why dynamic ones were left out."""
    points, dynamic = [], []
    for node in graph:
        if node.op_type == "Div" and len(node.inputs) == 2 and node.inputs[0] is not None:
            found = _fake_quant_point(node)
        elif node.op_type == "QuantizeLinear":
            found = _qdq_point(node)
        else:
            continue
        if isinstance(found, str):
            dynamic.append(found)
        elif found is not None:
            points.append(found)
    return points, dynamic


def _row_sqnr_db(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-row SQNR of the int8 quantizer with ``scale`` (broadcast to x), dB; exact rows give +inf."""
    q = np.clip(np.round(x / scale), -INT8_MAX - 1, INT8_MAX) * scale
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    err = (rows - q.reshape(rows.shape)) ** 2
    signal, noise = (rows**2).sum(axis=-1), err.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(signal / noise)


class ActPrecisionPass(MqcPass):
    """Move the ``points`` static activation quantizers with the lowest median-token SQNR to int16."""

    name = "act_precision"

    def variant(self) -> str:
        return (f"an extension beyond both papers: {self.params.points} static activation points at int16, chosen by "
                "median-token SQNR on the calibration feeds (the papers keep every activation at int8)")

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        points, dynamic = static_activation_points(graph)
        self.record.matched = len(points)
        self.record.notes.extend(dynamic[:3])
        if dynamic:
            self.record.notes.append(f"{len(dynamic)} per-token dynamic quantizers left as they are")
        if not points or self.params.points == 0:
            self.record.notes.append("no static int8 activation quantizer to budget" if not points else "budget 0")
            return False
        figures = self._median_sqnr(model, points)
        order = sorted(range(len(points)), key=lambda i: figures[i])
        promoted = set(order[: self.params.points])
        for index, point in enumerate(points):
            self.record.layers.append({"name": point.name, "form": point.form,
                                       "median_token_sqnr_db": round(figures[index], 2),
                                       "bits": 16 if index in promoted else 8})
        for index in sorted(promoted):
            self._promote(graph, points[index])
        self.record.changed = len(promoted)
        self.record.notes.append(
            f"{len(promoted)} of {len(points)} static activation points at int16; cost: in --format mqc their "
            "linears stay QDQ (float GEMMs on dequantized weights), the runtime ops take int8 activations only")
        return True

    def _median_sqnr(self, model: ir.Model, points: list[_Point]) -> list[float]:
        taps = list(dict.fromkeys(name for p in points for name in (p.x.name, p.scale.name)
                                  if p.form == "fake_quant" or name == p.x.name))
        rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(points))}
        for _, values in capture(model, taps, self.ctx.feeds(), self.ctx.providers):
            tapped = dict(zip(taps, values, strict=True))
            for index, point in enumerate(points):
                x = tapped[point.x.name]
                scale = tapped[point.scale.name] if point.form == "fake_quant" else constant_array(point.scale)
                rows[index].append(_row_sqnr_db(x, np.asarray(scale, dtype=x.dtype)))
        return [float(np.median(np.concatenate(rows[i]))) for i in range(len(points))]

    def _promote(self, graph: ir.Graph, point: _Point) -> None:
        base = point.name
        if point.form == "fake_quant":
            div, clip, mul = point.nodes
            ratio = add_initializer(graph, f"{base}_act16_ratio", np.array(INT8_MAX / INT16_MAX, np.float32))
            rescale = ir.node("Mul", [point.scale, ratio], name=f"{base}/act16_scale")
            rescale.outputs[0].name = f"{base}_act16_scale"
            graph.insert_before(div, rescale)
            div.replace_input_with(1, rescale.outputs[0])
            mul.replace_input_with(list(mul.inputs).index(point.scale), rescale.outputs[0])
            dtype = constant_array(clip.inputs[2]).dtype
            old_bounds = [clip.inputs[1], clip.inputs[2]]
            clip.replace_input_with(1, add_initializer(graph, f"{base}_act16_qmin", np.array(INT16_MIN, dtype)))
            clip.replace_input_with(2, add_initializer(graph, f"{base}_act16_qmax", np.array(INT16_MAX, dtype)))
            _drop_unused(graph, old_bounds)
            return
        old = constant_array(point.scale)
        scale = add_initializer(graph, f"{base}_act16_scale", (old * np.float32(INT8_MAX / INT16_MAX)).astype(old.dtype))
        zero = add_initializer(graph, f"{base}_act16_zero", np.array(0, np.int16))
        old_params = [point.scale, point.nodes[0].inputs[2]]
        for node in point.nodes:
            node.replace_input_with(1, scale)
            node.replace_input_with(2, zero)
        _drop_unused(graph, old_params)


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        if value.is_initializer() and not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
