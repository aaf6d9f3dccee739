"""Static QDQ quantization of linear layers (the foundation's lowering; spec/algorithms.md §1), shared by the
``quantize_linears`` and ``gptq_weights`` passes.

Rules:
1. Every linear of the model map is quantized, except roles in ``skip_roles`` (``lm_head`` by default: MQuant and
   MASQuant leave it in float), names matching ``--exclude``, layers whose input no calibration row reached, and
   1-row weights (``in_features == 1``: the float rank-1 side branch ``passes/rms_split.py`` leaves, spec §2.7).
   Each refusal is recorded with its reason.
2. Activations: one static symmetric int8 scale per input value, shared by all linears that read it (q/k/v read
   one normed value), from the calibration statistics of all modalities together, clipped by ``act_method``
   (``minmax``, ``percentile`` or ``mse``). Emitted as ``QuantizeLinear -> DequantizeLinear`` (zero point 0).
3. Weights: symmetric round-to-nearest, per output channel (``group_size=None``) or per group of input rows,
   optionally with an MSE clipping search. Per-channel weights are an int8/int4 initializer in the MatMul layout
   [in, out] with ``DequantizeLinear(axis=1)``; Gemm with ``transB`` keeps [out, in] with ``axis=0``. Per-group
   weights are blocked along the input axis (``block_size``). int4 MatMul weights stay [in, out] on ``axis=0``,
   which onnxruntime fuses into MatMulNBits (72x faster than dequantizing the weight on every call at 576 x 1536,
   one token; like the per-channel int4 fusion it needs ``session.qdq_matmulnbits_accuracy_level=1``, which
   ``mqc.open_session`` sets, to keep float activations). int8 MatMul weights are stored [out, in] on ``axis=1``
   and transposed back, and Gemm with ``transB`` keeps [out, in] on ``axis=1`` at either width: onnxruntime 1.32
   fuses an axis-0 blocked int8 weight behind a static QDQ activation into MatMulIntegerToFloat, which reads the
   blocked scale as per-column and fails at run time.
4. Each quantized layer records its scales, clip ratios and output SQNR on calibration rows (per modality too).
5. ``act_scales="per_modality"`` is MSQ (spec §2.3, ``mqc/graph/msq.py``): one static scale per modality per
   quantization point, selected per token from ``modality_ids`` with standard ops (the exact pattern is in
   ``mqc/graph/msq.py``). Records ``act_scale_text`` / ``act_scale_image`` and the SQNR of each modality under its own
   scale. Without a ``modality_ids`` input it degenerates to the one modality present (recorded in the notes).
   After ``aifs`` has permuted the tokens it is refused (an error): the calibrator labels rows in the feed's
   original order. Run ``aifs`` after the quantization pass; MSQ's mask then reads the permuted modality ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_NAMES, TEXT, TapStats
from mqc.errors import NothingToQuantizeError, RecipeError
from mqc.graph.markers import aifs_applied
from mqc.graph.msq import insert_activation_msq, is_image_mask, modality_input, value_rank
from mqc.graph.qdq import insert_activation_qdq, insert_weight_dequant, layer_sqnr
from mqc.ir import ensure_opset, remove_unused_initializers
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass
from mqc.quantizer import QuantizedWeight, qrange, quantize_weight_rtn


class LinearQuantPass(MqcPass):
    """Static W{4,8}A8 QDQ quantization of every linear layer with one activation scale per input value.

    The one linear quantizer: ``quantize_linears`` rounds its weights to nearest, ``gptq_weights`` overrides
    :meth:`run` to round them by GPTQ and emits through :meth:`_emit` (both passes subclass this, with no name).
    """

    def variant(self) -> str:
        if self.params.act_scales == "per_modality":
            return ("MSQ: one static scale per modality per activation (the paper, §2.3; the released code calibrates "
                    "one shared scale on mixed tokens)")
        return "one static activation scale shared by both modalities (the released code's form)"

    def select(self, linears: Sequence[Linear]) -> list[Linear]:
        selected = []
        for lin in linears:
            if lin.role in self.params.skip_roles:
                self.record.skip(lin.name, f"role {lin.role} stays in float (skip_roles)")
            elif self.ctx.excluded(lin.name):
                self.record.skip(lin.name, "name matches --exclude")
            elif lin.in_features == 1:
                self.record.skip(lin.name, "a 1-row weight (the float rank-1 side branch of rms_split) stays in float")
            elif self.params.group_size and lin.in_features % self.params.group_size:
                self.record.skip(lin.name, f"input size {lin.in_features} is not a multiple of group size {self.params.group_size}")
            else:
                selected.append(lin)
        return selected

    def selected_linears(self, model: ir.Model) -> list[Linear]:
        """The linears this pass quantizes; the model map's refusals and the rest are recorded as skips."""
        model_map = self.ctx.model_map(model)
        self.record.matched = len(model_map.linears)
        for refusal in model_map.refused:
            self.record.skip(refusal.node, refusal.reason)
        selected = self.select(model_map.linears)
        if not selected:
            raise NothingToQuantizeError("the model has no linear layer with a constant float weight to quantize")
        return selected

    def ensures(self, model: ir.Model) -> None:
        """Every linear is quantized or recorded as skipped: none is left in float without a reason."""
        skipped = {skip["node"] for skip in self.record.skipped}
        left = [lin.name for lin in self.ctx.model_map(model).linears if lin.name not in skipped]
        if left:
            raise self.broken(f"{len(left)} linears are neither quantized nor recorded as skipped, e.g. {left[0]}")

    def run(self, model: ir.Model) -> bool:
        selected = self.selected_linears(model)
        readers: dict[str, list[Linear]] = {}
        for lin in selected:
            readers.setdefault(lin.input.name, []).append(lin)
        stats = self.ctx.calibrate(model, list(readers), label="calibrating activations")

        def rounded(lin: Linear) -> tuple[np.ndarray, QuantizedWeight, dict[str, Any]]:
            weight = lin.weight_array()
            qweight = quantize_weight_rtn(weight, self.params.weight_bits, self.params.group_size, self.params.weight_mse_clip)
            insert_weight_dequant(model.graph, lin, qweight)
            return weight, qweight, {}

        return self.emit(model, readers, stats, rounded)

    def emit(self, model: ir.Model, readers: dict[str, list[Linear]], stats: dict[str, TapStats],
             quantized: Callable[[Linear], tuple[np.ndarray, QuantizedWeight, dict[str, Any]]]) -> bool:
        """Insert each reader group's activation quantizer and record its linears; ``quantized(lin)`` gives the float
        weight, its quantized form (its DequantizeLinear in the graph) and the weight's own figures."""
        graph = model.graph
        is_image = self._is_image(graph)
        changed = 0
        for value_name, group in readers.items():
            tap = stats.get(value_name)
            if self.usable_stats(tap, group) is None:
                continue
            act_figures, sqnr_scale = self.insert_activation(graph, value_name, group, tap, is_image)
            for lin in group:
                weight, qweight, figures = quantized(lin)
                self.record.layers.append({
                    **lin.to_dict(),
                    "w_bits": self.params.weight_bits,
                    "a_bits": self.params.act_bits,
                    **figures,
                    **act_figures,
                    **layer_sqnr(lin, tap, sqnr_scale, self.params.act_bits, weight, qweight),
                })
                changed += 1
        ensure_opset(model, "", 21)
        remove_unused_initializers(graph)
        self.record.changed = changed
        return changed > 0

    def _is_image(self, graph: ir.Graph) -> ir.Value | None:
        """MSQ's shared is_image mask (``act_scales="per_modality"`` and a ``modality_ids`` input), else None."""
        if self.params.act_scales != "per_modality":
            return None
        if aifs_applied(graph):
            raise RecipeError(
                f"{self.name}: act_scales=per_modality after AIFS: calibration labels token rows in the feed's original "
                "order, the graph computes them permuted; run aifs after the quantization pass")
        modality_ids = modality_input(graph)
        if modality_ids is None:
            name = MODALITY_NAMES.get(self.ctx.default_modality, self.ctx.default_modality)
            self.record.notes.append(
                f"MSQ: the graph has no modality_ids input, so it has one modality ({name}): per_modality "
                "degenerates to one static per-tensor scale from that modality's statistics")
            return None
        return is_image_mask(graph, modality_ids)

    def insert_activation(
        self, graph: ir.Graph, value_name: str, group: Sequence[Linear], tap: TapStats, is_image: ir.Value | None,
    ) -> tuple[dict, float | dict[int, float]]:
        """The activation fake-quant of ``group`` (readers of one value): shared QDQ or MSQ (rules 2 and 5).

        Returns the figures to record and the scale(s) ``layer_sqnr`` uses.
        """
        combined = tap.combined()
        qmax = qrange(self.params.act_bits)[1]
        per_modality = self.params.act_scales == "per_modality"
        clip = combined.clip_value(self.params.act_method, self.params.act_bits, self.params.act_percentile)
        scale = clip / qmax
        figures: dict = {"act_scale": float(scale), "act_absmax": float(combined.absmax),
                         "act_clip_ratio": round(clip / combined.absmax, 4)}
        value = group[0].input
        readers = [lin.node for lin in group]
        if is_image is not None and value_rank(value) != 3:
            self.record.skip(value_name, f"MSQ needs a [batch, seq, features] input, this one has rank "
                                         f"{value_rank(value)}: shared per-tensor scale used")
        elif is_image is not None:
            scales = self._modality_scales(value_name, tap, qmax)
            insert_activation_msq(graph, value, scales[TEXT], scales[IMAGE], self.params.act_bits, readers, is_image)
            return ({"act_scale_text": scales[TEXT], "act_scale_image": scales[IMAGE],
                     "act_absmax": float(combined.absmax)}, scales)
        elif per_modality:  # no modality_ids: the statistics hold one modality only
            figures["act_scale_" + str(MODALITY_NAMES.get(self.ctx.default_modality, "text"))] = float(scale)
        insert_activation_qdq(graph, value, scale, self.params.act_bits, readers)
        return figures, scale

    def _modality_scales(self, value_name: str, tap: TapStats, qmax: int) -> dict[int, float]:
        """One static scale per modality (spec §2.3); a modality without rows borrows the other's (recorded)."""
        scales: dict[int, float] = {}
        for modality in (TEXT, IMAGE):
            entry = tap.modality(modality)
            if entry is not None and entry.absmax > 0.0:
                scales[modality] = float(entry.clip_value(self.params.act_method, self.params.act_bits, self.params.act_percentile) / qmax)
        for modality, other in ((TEXT, IMAGE), (IMAGE, TEXT)):
            if modality not in scales:
                scales[modality] = scales[other]
                self.record.notes.append(
                    f"MSQ {value_name}: no {MODALITY_NAMES[modality]} calibration rows, "
                    f"{MODALITY_NAMES[modality]} tokens use the {MODALITY_NAMES[other]} scale")
        return scales
