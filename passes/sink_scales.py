"""Sink scales: a third static activation class, for the few tokens that carry massive activations (prototype for
issue 14, point 2; the idea of PrefixQuant, arXiv 2410.05265: keep the outlier tokens out of the static ranges).

With MSQ (``passes/msq.py``) every token row of a modality shares one static scale, so the text range is set by
the largest text token: in SmolLM2 the first token of every sequence (an attention sink) is tens of times larger
than an ordinary token at the inputs of o_proj and down_proj (``mqc diagnose``). This pass gives the rows at the
sink positions their own static scale and re-calibrates the text and image scales on the other rows:

    is_sink = Unsqueeze(Equal(P, position), [-1]) or ...     # bool [B, S, 1], shared; P: the graph's position ids
    s'      = Where(is_sink, s_sink, Where(is_image, s_image, s_text))

Rules:
1. Input: a graph with MSQ quantization points (``Mul(Clip(Round(Div(X, s))), s)`` with ``s = Where(is_image,
   s_image, s_text)`` of constant scalars). Other activation quantizers are left alone (recorded).
2. Sink rows are those whose position id is in ``positions`` (default the first, 0). Selection is static: it reads
   ``position_ids`` only, nothing computed from the activations. A decode step (position > 0) is never a sink, so
   the KV-cache path uses the text and image scales. Left padding has position 0 too: padded rows take the sink
   scale, which changes nothing a real token sees.
3. P is ``position_ids`` as the graph's own ops read it: the graph input, or AIFS's permuted copy
   (``mqc_aifs_position_ids``) when AIFS ran first; so the mask follows the tokens through AIFS's reordering.
   Run before AIFS in a recipe and AIFS rewires the mask's read itself. A graph without ``position_ids`` (an
   exporter that computes the positions inside) gets P from ``attention_mask`` [B, past + S] as Hugging Face models
   compute theirs, ``CumSum(attention_mask, 1) - 1`` over the last S columns (S from ``modality_ids``): the first
   real token of each sequence is 0, left padding is -1 (never a sink), a decode step is past its prompt. Such a
   graph has no AIFS (AIFS needs ``position_ids``), so the tokens are in their original order. A graph with
   neither input and no past key/value inputs (``input_ids -> logits``, as ``torch.onnx.export`` writes a model
   called on its tokens alone) always sees positions ``0 .. S-1``: P is ``Range(0, S)``; with a cache and no
   mask the positions of a step are unknown, and the pass refuses.
4. Calibration: one run of the current graph over the calibration feeds, tapping every quantization point's input
   X with the position and modality ids the graph uses; each scale is set from its rows (sink rows of any
   modality; text and image rows that are not sinks) by ``method``: their max |x| (``minmax``, the default), or
   from the |x| histogram the calibrator keeps (``mse``: the clip with the least expected squared rounding plus
   clipping error; ``percentile``), or ``trimmed``: the max |x| of the text (image) rows once the outlier rows are
   dropped, those whose max exceeds ``outlier_ratio`` x the class's median row max. Those are massive-activation
   tokens away from the sink positions: on the tiny VLM with 128 calibration samples such rows set one down_proj
   input's text range 12.5x wider than with 64 (99.5 against 7.96), so every ordinary token lost precision;
   trimmed, they are clipped instead (their count is recorded per point). A
   class without rows keeps its old scale (recorded). The
   graph is already quantized, so the inputs carry upstream rounding noise: where the sink did not set a range,
   the re-calibrated one can come out slightly wider than the float-calibrated one (a few %, on the tiny models).
5. ``clip_search="output"`` (issue 14 point 5: ranges chosen for the layer's output, not its input): each text and
   image clip of rule 4 is multiplied by the ratio of ``CLIP_SEARCH_RATIOS`` (1 included, so the search never
   does worse on its rows) that minimises ‖(fq(X) − X) W‖² on up to ``search_rows`` rows of the class sampled
   evenly from every calibration sample, W being the point's readers' dequantized weights side by side: the
   error the readers' outputs see, which weighs each input channel by what the layer does with it. A point
   whose readers are not all dequantized-weight linears keeps its clip (recorded). Sink clips are not searched.
6. Not function-preserving: it changes the quantization grid only.
7. A graph without ``modality_ids`` (a text-only decoder, or an exporter that does not make the modality an input)
   has one class besides the sink: the linear quantizer left one static per-tensor int8 QDQ pair at each point
   (``QuantizeLinear`` with a constant scalar scale and zero point 0, read by ``DequantizeLinear``s only). Each pair
   on a [batch, seq, features] input is first put into MSQ's form with an all-text modality, ``ConstantOfShape``
   zeros of the tokens' shape (from ``input_ids`` or ``inputs_embeds``), and the same scale for both classes; the
   rules above then apply unchanged, and ``lower_runtime_ops`` lowers it like any sink-scaled point. Pairs on
   other ranks, at other widths or writing graph outputs stay as they are (counted). On onnxruntime's QDQ path the
   converted points run as float fake-quant ops instead of fused int8 kernels, as MSQ's do; ``--format mqc`` runs
   them in ``QuantLinear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_INPUT, TEXT, TensorStats, capture
from mqc.diagnose import dequantized_weight
from mqc.graph.msq import insert_activation_msq, is_image_mask, value_rank
from mqc.ir import add_initializer, constant_array, remove_unused_initializers, replace_initializer
from mqc.pass_manager import MqcPass, declare_fatal

PREFIX = "mqc_sink"
#: The position ids AIFS's permutation produces (``passes/aifs.py``: ``GatherElements`` named ``position_ids``).
AIFS_POSITION_IDS = "mqc_aifs_position_ids"
AIFS_MODALITY_IDS = "mqc_aifs_modality_ids"
#: Rule 7: the graph inputs the all-text modality takes its [batch, seq] shape from, in order of preference.
TOKEN_INPUTS = ("inputs_embeds", "input_ids")
#: The clip multipliers ``clip_search="output"`` tries (rule 5): tighter clips, the method's own, and wider ones
#: (which give back rows ``trimmed`` clipped where clipping them costs the output more).
CLIP_SEARCH_RATIOS = (*np.round(np.arange(0.3, 1.0, 0.05), 2).tolist(), 1.0, 1.25, 1.5, 2.0)


@dataclass
class _Point:
    """One MSQ quantization point: its input, its Where and the two scale initializers."""

    x: ir.Value
    where: ir.Node
    scale_image: ir.Value
    scale_text: ir.Value
    qmin: float
    qmax: float
    readers: list[ir.Node]
    linears: list[ir.Node]


def _msq_points(graph: ir.Graph) -> list[_Point]:
    points = []
    for node in graph:
        if node.op_type != "Where" or len(node.inputs) != 3:
            continue
        scale_image, scale_text = node.inputs[1], node.inputs[2]
        if constant_array(scale_image) is None or constant_array(scale_text) is None:
            continue
        readers = [use.node for use in node.outputs[0].uses()]
        div = next((r for r in readers if r.op_type == "Div"), None)
        mul = next((r for r in readers if r.op_type == "Mul"), None)
        if div is None or mul is None:
            continue
        clip = mul.inputs[0].producer()
        qmax = constant_array(clip.inputs[2]) if clip is not None and clip.op_type == "Clip" else None
        qmin = constant_array(clip.inputs[1]) if qmax is not None else None
        if qmax is None or qmin is None:
            continue
        linears = [use.node for use in mul.outputs[0].uses()]
        points.append(_Point(div.inputs[0], node, scale_image, scale_text, float(qmin), float(qmax), readers, linears))
    return points


def _static_qdq_points(graph: ir.Graph) -> tuple[list[tuple[ir.Node, list[ir.Node]]], int]:
    """Rule 7's int8 per-tensor QDQ pairs (the QuantizeLinear and its DequantizeLinears) on [batch, seq, features]
    inputs, and how many other QuantizeLinears there are."""
    pairs, left = [], 0
    for node in graph:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        scale = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        dequants = [use.node for use in node.outputs[0].uses()]
        if (scale is None or scale.size != 1 or zero is None or zero.dtype != np.int8 or zero.reshape(()) != 0
                or value_rank(node.inputs[0]) != 3 or not dequants
                or any(d.op_type != "DequantizeLinear" or d.inputs[1] is not node.inputs[1] or d.outputs[0].is_graph_output()
                       for d in dequants)):
            left += 1
            continue
        pairs.append((node, dequants))
    return pairs, left


def _has_cache(graph: ir.Graph) -> bool:
    return any("past" in v.name for v in graph.inputs)


def _positions_from_range(graph: ir.Graph, modality: ir.Value) -> ir.Value:
    """Rule 3's P for a graph without position ids, mask or cache: ``Unsqueeze(Range(0, S, 1), [0])``."""
    def const(name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{PREFIX}_{name}", array)

    tokens = ir.node("Shape", [modality], attributes={"start": 1, "end": 2}, name=f"{PREFIX}/range_tokens")
    count = ir.node("Squeeze", [tokens.outputs[0]], name=f"{PREFIX}/range_count")
    span = ir.node("Range", [const("range_start", np.array(0, np.int64)), count.outputs[0],
                             const("range_step", np.array(1, np.int64))], name=f"{PREFIX}/range")
    rows = ir.node("Unsqueeze", [span.outputs[0], const("range_axes", np.array([0], np.int64))],
                   name=f"{PREFIX}/range_positions")
    rows.outputs[0].name = f"{PREFIX}_positions"
    graph.insert_before(next(iter(graph)), [tokens, count, span, rows])
    return rows.outputs[0]


def _positions_from_mask(graph: ir.Graph, mask: ir.Value, modality: ir.Value) -> ir.Value:
    """Rule 3's P for a graph without position ids: ``Slice(CumSum(attention_mask, 1) - 1, -S)``, S the tokens."""
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        nodes.append(ir.node(op_type, inputs, attributes=attributes, name=f"{PREFIX}/{name}"))
        return nodes[-1].outputs[0]

    def const(name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{PREFIX}_{name}", array)

    mask = op("Cast", [mask], "mask_int64", to=ir.DataType.INT64)
    counted = op("CumSum", [mask, const("axis", np.array(1, np.int64))], "mask_cumsum")
    every_position = op("Sub", [counted, const("one", np.array(1, np.int64))], "all_positions")
    minus_tokens = op("Neg", [op("Shape", [modality], "tokens", start=1, end=2)], "minus_tokens")
    positions = op("Slice", [every_position, minus_tokens, const("end", np.array([np.iinfo(np.int64).max], np.int64)),
                             const("slice_axis", np.array([1], np.int64))], "positions")
    positions.name = f"{PREFIX}_positions"
    graph.insert_before(next(iter(graph)), nodes)
    return positions


class SinkScalesPass(MqcPass):
    """Give the sink-position token rows their own static scale at every MSQ quantization point."""

    name = "sink_scales"
    fatal_skips = declare_fatal(
        no_msq_points="no MSQ quantization point (Where of a text and an image scale) to give a sink class",
        no_position_ids="no position_ids or attention_mask input on a graph with a KV cache: sink rows cannot be "
                        "selected statically",
        no_modality_ids="no modality_ids input and no input_ids/inputs_embeds to give an all-text modality the "
                        "tokens' shape (rule 7)",
    )

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        names = {v.name for v in graph.inputs} | {v.name for node in graph for v in node.outputs}
        if not names & {AIFS_POSITION_IDS, "position_ids", "attention_mask"} and _has_cache(graph):
            raise self.refuse("no_position_ids", "the graph has no position_ids or attention_mask input: sink rows "
                                                 "(position 0) of a step after the cache cannot be selected "
                                                 "statically")
        text_only = not names & {AIFS_MODALITY_IDS, MODALITY_INPUT}
        if text_only and not {v.name for v in graph.inputs} & set(TOKEN_INPUTS):
            raise self.refuse("no_modality_ids", "the graph has no modality_ids input, and no input_ids or "
                                                 "inputs_embeds input to give an all-text modality its shape")
        if not _msq_points(graph) and not (text_only and _static_qdq_points(graph)[0]):
            raise self.refuse("no_msq_points", "no static activation quantization point in the graph (MSQ's "
                                               "per-modality scales, or int8 per-tensor QDQ on a graph without "
                                               "modality_ids): run the linear quantizer with static scales first")

    def variant(self) -> str:
        ranges = {"minmax": "min/max ranges", "mse": "MSE-clipped ranges (histogram)",
                  "percentile": f"{self.params.percentile} percentile ranges",
                  "trimmed": f"text/image ranges without outlier rows (row max above {self.params.outlier_ratio}x the "
                             "median row max; clipped at run time)"}[self.params.method]
        if self.params.clip_search == "output":
            ranges += (", each text/image clip then scaled for the least output error of its linears on sampled rows "
                       "(an extension)")
        return (f"a third static class for the rows at positions {list(self.params.positions)} (PrefixQuant's outlier tokens, "
                f"as a static scale rather than a float prefix); {ranges}")

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        values = {v.name: v for node in graph for v in node.outputs}
        values.update({v.name: v for v in graph.inputs})
        positions = values.get(AIFS_POSITION_IDS) or values.get("position_ids")
        modality = values.get(AIFS_MODALITY_IDS) or values.get(MODALITY_INPUT)
        text_only = modality is None
        if text_only:  # rule 7
            modality = self._text_only(graph, next(values[n] for n in TOKEN_INPUTS if n in values))
        points = _msq_points(graph)
        self.record.matched = len(points)
        if positions is None and "attention_mask" in values:
            positions = _positions_from_mask(graph, values["attention_mask"], modality)
            self.record.notes.append("no position_ids input: sink positions from CumSum(attention_mask) - 1 (rule 3)")
        elif positions is None:
            positions = _positions_from_range(graph, modality)
            self.record.notes.append("no position_ids, attention_mask or cache input: sink positions 0 .. S-1 (rule 3)")
        if text_only:
            graph.sort()  # rule 3's nodes went first and read rule 7's modality
        scales, trimmed, searched = self._calibrate(model, points, positions.name, modality.name)
        is_sink = self._sink_mask(graph, positions, points)
        for point, (sink, text, image) in zip(points, scales, strict=True):
            old_text = float(constant_array(point.scale_text)) * point.qmax
            dtype = constant_array(point.scale_text).dtype
            base = point.x.name or "act"
            s_sink = add_initializer(graph, f"{base}_act_scale_sink", np.array(sink / point.qmax, dtype=dtype))
            for value, amax, label in ((point.scale_text, text, "text"), (point.scale_image, image, "image")):
                if amax > 0.0:
                    replace_initializer(value, np.array(amax / point.qmax, dtype=dtype))
                else:
                    self.record.notes.append(f"{base}: no non-sink {label} rows, {label} scale kept")
            select = ir.node("Where", [is_sink, s_sink, point.where.outputs[0]], name=f"{base}/sink_scale")
            select.outputs[0].name = f"{base}_sink_scale"
            graph.insert_after(point.where, select)
            for reader in point.readers:
                for index, inp in enumerate(reader.inputs):
                    if inp is point.where.outputs[0]:
                        reader.replace_input_with(index, select.outputs[0])
            self.record.layers.append({"name": base, "act_absmax_sink": sink, "act_absmax_text": text,
                                       "act_absmax_image": image, "old_text_clip": old_text,
                                       "text_range_shrink": round(text / old_text, 4) if text and old_text else None,
                                       **{f"outlier_rows_clipped_{label}": trimmed[(point.x.name, slot)]
                                          for slot, label in ((1, "text"), (2, "image"))
                                          if (point.x.name, slot) in trimmed},
                                       **searched.get(point.x.name, {})})
        self.record.changed = len(points)
        return True

    def _text_only(self, graph: ir.Graph, tokens: ir.Value) -> ir.Value:
        """Rule 7: an all-text modality_ids [B, S] from ``tokens``' shape, and the static QDQ pairs in MSQ's form."""
        shape = ir.node("Shape", [tokens], attributes={"start": 0, "end": 2}, name=f"{PREFIX}/token_shape")
        zeros = ir.node("ConstantOfShape", [shape.outputs[0]],
                        attributes={"value": ir.tensor(np.zeros(1, np.int64))}, name=f"{PREFIX}/text_only_modality")
        modality = zeros.outputs[0]
        modality.name, modality.dtype = f"{PREFIX}_text_only_modality_ids", ir.DataType.INT64
        graph.insert_before(next(iter(graph)), [shape, zeros])
        is_image = is_image_mask(graph, modality)
        pairs, left = _static_qdq_points(graph)
        for quant, dequants in pairs:
            x, scale = quant.inputs[0], float(constant_array(quant.inputs[1]).reshape(()))
            readers = []
            for dequant in dequants:
                for use in list(dequant.outputs[0].uses()):
                    use.node.replace_input_with(use.idx, x)
                    readers.append(use.node)
            graph.remove([*dequants, quant], safe=True)
            insert_activation_msq(graph, x, scale, scale, 8, readers, is_image)
        remove_unused_initializers(graph)  # the pairs' scales and zero points
        self.record.notes.append(f"no modality_ids: {len(pairs)} static int8 per-tensor points put in MSQ's form with "
                                 f"an all-text modality (rule 7); {left} QDQ pairs left as they are")
        return modality

    def _sink_mask(self, graph: ir.Graph, positions: ir.Value, points: list[_Point]) -> ir.Value:
        nodes, hits = [], None
        for p in list(self.params.positions):
            const = add_initializer(graph, f"{PREFIX}_position_{p}", np.array(p, dtype=np.int64))
            equal = ir.node("Equal", [positions, const], name=f"{PREFIX}/is_position_{p}")
            nodes.append(equal)
            hits = equal.outputs[0] if hits is None else self._or(nodes, hits, equal.outputs[0])
        axes = add_initializer(graph, f"{PREFIX}_axes", np.array([-1], dtype=np.int64))
        unsqueeze = ir.node("Unsqueeze", [hits, axes], name=f"{PREFIX}/is_sink")
        unsqueeze.outputs[0].name = f"{PREFIX}_is_sink"
        nodes.append(unsqueeze)
        producer = positions.producer()
        if producer is not None:
            graph.insert_after(producer, nodes)
        else:
            graph.insert_before(next(iter(graph)), nodes)
        return unsqueeze.outputs[0]

    @staticmethod
    def _or(nodes: list[ir.Node], a: ir.Value, b: ir.Value) -> ir.Value:
        node = ir.node("Or", [a, b], name=f"{PREFIX}/or_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    def _calibrate(self, model: ir.Model, points: list[_Point], positions: str, modality: str
                   ) -> tuple[list[tuple[float, float, float]], dict[tuple[str, int], int], dict[str, dict]]:
        """Per point: the clip of the sink rows, the non-sink text rows and the non-sink image rows (rules 4-5);
        the outlier rows ``trimmed`` left out, by (point input, class slot); and the output search's figures."""
        taps = [positions, modality, *dict.fromkeys(p.x.name for p in points)]
        row_maxima: dict[str, list[list[np.ndarray]]] = {name: [[], [], []] for name in taps[2:]}
        search = self.params.clip_search == "output"
        per_sample = -(-self.params.search_rows // max(self.ctx.num_samples or 32, 1))
        sampled: dict[str, list[list[np.ndarray]]] = {name: [[], [], []] for name in taps[2:]}
        histograms = self.params.method in ("mse", "percentile")  # the other methods need the row maxima only
        stats: dict[str, list[TensorStats | None]] = {name: [None, None, None] for name in taps[2:]}
        for _, values in capture(model, taps, self.ctx.feeds(), self.ctx.providers):
            pos, mod = values[0], values[1]
            for name, x in zip(taps[2:], values[2:], strict=True):
                rows_pos = np.broadcast_to(pos, x.shape[:-1]).reshape(-1)
                rows_mod = np.broadcast_to(mod, x.shape[:-1]).reshape(-1)
                rows = x.reshape(-1, x.shape[-1])
                row_max = np.abs(rows).max(axis=-1)
                sink = np.isin(rows_pos, list(self.params.positions))
                for slot, select in enumerate((sink, ~sink & (rows_mod == TEXT), ~sink & (rows_mod == IMAGE))):
                    if select.any():
                        row_maxima[name][slot].append(row_max[select])
                        if search and slot:
                            picked = np.flatnonzero(select)
                            step = max(1, -(-picked.size // per_sample))
                            sampled[name][slot].append(rows[picked[::step]].copy())
                        if histograms:
                            if stats[name][slot] is None:
                                stats[name][slot] = TensorStats(rows.shape[-1], sample_rows=0)
                            stats[name][slot].update(rows[select])
        trimmed: dict[tuple[str, int], int] = {}
        clips = []
        for p in points:
            clip = []
            for slot, maxima in enumerate(row_maxima[p.x.name]):
                value, dropped = self._clip(maxima, stats[p.x.name][slot], p.qmax, slot)
                clip.append(value)
                if dropped:
                    trimmed[(p.x.name, slot)] = dropped
            clips.append(clip)
        searched: dict[str, dict] = {}
        if search:
            for p, clip in zip(points, clips, strict=True):
                better, searched[p.x.name] = self._search(p, clip, sampled[p.x.name])
                for slot, value in better.items():
                    clip[slot] = value
        return [tuple(clip) for clip in clips], trimmed, searched

    def _search(self, point: _Point, clip: list[float], rows: list[list[np.ndarray]]
                ) -> tuple[dict[int, float], dict[str, float | str]]:
        """Rule 5 for one point: the text and image clips with the least output error, by class slot, and the
        figures to record."""
        weights = [dequantized_weight(node) if node.op_type in ("MatMul", "Gemm") else None for node in point.linears]
        if not weights or any(w is None for w in weights):
            return {}, {"clip_search": "skipped: a reader is not a linear with a dequantized constant weight"}
        w = np.concatenate(weights, axis=1).astype(np.float64)
        better: dict[int, float] = {}
        figures: dict[str, float | str] = {}
        for slot, label in ((1, "text"), (2, "image")):
            if not rows[slot] or clip[slot] <= 0.0:
                continue
            x = np.concatenate(rows[slot]).astype(np.float64)
            reference = np.square(x @ w).sum()
            errors = []
            for ratio in CLIP_SEARCH_RATIOS:
                scale = clip[slot] * ratio / point.qmax
                error = np.clip(np.rint(x / scale), point.qmin, point.qmax) * scale - x
                errors.append(float(np.square(error @ w).sum()))
            best = int(np.argmin(errors))
            method_error = errors[CLIP_SEARCH_RATIOS.index(1.0)]
            better[slot] = clip[slot] * CLIP_SEARCH_RATIOS[best]
            figures.update({f"clip_ratio_{label}": CLIP_SEARCH_RATIOS[best],
                            f"output_sqnr_gain_db_{label}": round(10 * np.log10(method_error / errors[best]), 3)
                            if errors[best] > 0 else 0.0,
                            f"output_sqnr_db_{label}": round(10 * np.log10(reference / errors[best]), 2)
                            if errors[best] > 0 else float("inf")})
        return better, figures

    def _clip(self, row_maxima: list[np.ndarray], stats: TensorStats | None, qmax: float, slot: int
              ) -> tuple[float, int]:
        """One class's clip from its rows (0 without rows) and how many outlier rows ``trimmed`` left out."""
        if not row_maxima:
            return 0.0, 0
        maxima = np.concatenate(row_maxima)
        if self.params.method == "minmax" or (self.params.method == "trimmed" and slot == 0):
            return float(maxima.max()), 0  # sink rows are never trimmed
        if self.params.method == "trimmed":
            kept = maxima <= self.params.outlier_ratio * float(np.median(maxima))
            return float(maxima[kept].max()), int((~kept).sum())
        assert stats is not None
        return stats.clip_value(self.params.method, bits=int(qmax + 1).bit_length(), percentile=self.params.percentile), 0
