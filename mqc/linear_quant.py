"""Static QDQ quantization of linear layers (the foundation's lowering; spec/algorithms.md §1), shared by the
``quantize_linears`` and ``gptq_weights`` passes.

Rules:
1. Every linear of the model map is quantized, except roles in ``skip_roles`` (``lm_head`` by default: MQuant and
   MASQuant leave it in float), names matching ``--exclude``, layers whose input no calibration row reached, and
   1-row weights (``in_features == 1``: the float rank-1 side branch ``passes/rms_split.py`` leaves, spec §2.7).
   Each refusal is recorded with its reason. A linear whose input size the group size does not divide is
   quantized per channel (noted).
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
6. ``acts="dynamic"``: a per-token scale computed in the graph instead (MASQuant's form, the pattern is on
   :func:`mqc.graph.qdq.insert_activation_dynamic`); ``act_method`` and ``act_scales`` do not apply.
7. Linears ``cmc`` lowered (MAS-smoothed, node metadata ``mqc.mas_linear``) and cmc's float compensation
   MatMuls (``mqc.cmc``) are never requantized (recorded); ``components`` restricts the linears to those
   components (MASQuant quantizes the language model only).
8. ``statistics="before_cmc"``: the activation statistics (and Gram matrices) are the ones ``cmc`` took of the
   graph before it lowered the MAS linears, so every linear of a MASQuant graph is quantized from one calibration
   of the MAS float form, as one pass did before; without them the pass cannot apply (run it right after cmc).

Rounding and activation quantizers are the shared strategies of :mod:`mqc.quant_strategy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import MODALITY_NAMES, TapStats
from mqc.errors import NothingToQuantizeError, RecipeError
from mqc.graph.markers import CMC_KEY, MAS_LINEAR_KEY, STATISTICS_BEFORE_CMC, aifs_applied
from mqc.graph.msq import is_image_mask, modality_input
from mqc.graph.qdq import insert_weight_dequant, layer_sqnr
from mqc.ir import ensure_opset, remove_unused_initializers
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass, declare_fatal
from mqc.quant_strategy import ActivationQuantizer, WeightRounding
from mqc.quantizer import QuantizedWeight


class LinearQuantPass(MqcPass):
    """Static W{4,8}A8 QDQ quantization of every linear layer with one activation scale per input value.

    The one linear quantizer: ``quantize_linears`` rounds its weights to nearest, ``gptq_weights`` overrides
    :meth:`run` to round them by GPTQ and emits through :meth:`emit` (both passes subclass this, with no name).
    """

    weight_method = "rtn"
    fatal_skips = declare_fatal(
        nothing_handed_over="statistics='before_cmc' but no cmc pass ran right before this one",
    )

    @property
    def rounding(self) -> WeightRounding:
        return WeightRounding.from_params(self.params, self.weight_method)

    def rounding_for(self, lin: Linear) -> WeightRounding:
        """The rounding of ``lin``: int8 where its role is in ``int8_roles``, else the pass's ``weight_bits``."""
        rounding = self.rounding
        return dataclasses.replace(rounding, bits=8) if lin.role in self.params.int8_roles else rounding

    @property
    def act_quantizer(self) -> ActivationQuantizer:
        return ActivationQuantizer.from_params(self.params)

    def requires(self, model: ir.Model) -> None:
        if self.params.statistics == "before_cmc" and STATISTICS_BEFORE_CMC not in model.meta:
            raise self.refuse("nothing_handed_over",
                              "statistics='before_cmc' but no cmc pass ran right before this one (nothing handed over)")

    def variant(self) -> str:
        if self.params.acts == "dynamic":
            acts = "per-token dynamic activation scales (MASQuant's form)"
        elif self.params.act_scales == "per_modality":
            acts = ("MSQ: one static scale per modality per activation (the paper, §2.3; the released code calibrates "
                    "one shared scale on mixed tokens)")
        else:
            acts = "one static activation scale shared by both modalities (the released code's form)"
        if self.params.statistics == "before_cmc":
            acts += "; statistics of the graph before cmc's lowering (MASQuant's one calibration)"
        if self.params.group_size is not None:
            acts += (f"; int{self.params.weight_bits} weights per group of {self.params.group_size} input rows (an "
                     "extension: both papers quantize weights per output channel)")
        if self.params.int8_roles:
            acts += (f"; int8 weights for the {', '.join(self.params.int8_roles)} linears (a mixed-precision weight "
                     "budget, an extension: both papers use one weight width)")
        return acts

    def select(self, linears: Sequence[Linear]) -> list[Linear]:
        selected = []
        components = self.params.components
        for lin in linears:
            if MAS_LINEAR_KEY in lin.node.metadata_props:
                self.record.skip(lin.name, "a MAS-smoothed linear: cmc lowers it, or leaves it in float")
            elif CMC_KEY in lin.node.metadata_props:
                self.record.skip(lin.name, "cmc's compensation branch stays in float")
            elif lin.role in self.params.skip_roles:
                self.record.skip(lin.name, f"role {lin.role} stays in float (skip_roles)")
            elif components is not None and lin.component not in components:
                self.record.skip(lin.name, f"{lin.component} linear: only {', '.join(components)} linears are quantized (components)")
            elif self.ctx.excluded(lin.name):
                self.record.skip(lin.name, "name matches --exclude")
            elif lin.in_features == 1:
                self.record.skip(lin.name, "a 1-row weight (the float rank-1 side branch of rms_split) stays in float")
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

    def group_size_for(self, lin: Linear) -> int | None:
        """The rounding's group size for ``lin``; per channel (noted) where it does not divide the input size."""
        note = self.rounding.group_note(lin.name, lin.in_features)
        if note is not None and note not in self.record.notes:
            self.record.notes.append(note)
        return self.rounding.group_for(lin.in_features)

    def handed_statistics(self, model: ir.Model, selected: list[Linear]) -> dict[str, TapStats] | None:
        """The statistics cmc handed over (``statistics="before_cmc"``, taken once), else None. A selected linear
        whose input cmc took no statistics of is dropped from ``selected`` (recorded)."""
        if self.params.statistics != "before_cmc":
            return None
        stats = model.meta.pop(STATISTICS_BEFORE_CMC)
        for lin in [lin for lin in selected if lin.input.name not in stats]:
            self.record.skip(lin.name, "cmc took no statistics of its input (not one of the language linears it "
                                       "leaves: see its skip_roles)")
            selected.remove(lin)
        return stats

    def ensures(self, model: ir.Model) -> None:
        """Every linear is quantized or recorded as skipped: none is left in float without a reason."""
        skipped = {skip["node"] for skip in self.record.skipped}
        left = [lin.name for lin in self.ctx.model_map(model).linears if lin.name not in skipped]
        if left:
            raise self.broken(f"{len(left)} linears are neither quantized nor recorded as skipped, e.g. {left[0]}")

    def run(self, model: ir.Model) -> bool:
        selected = self.selected_linears(model)
        stats = self.handed_statistics(model, selected)
        readers: dict[str, list[Linear]] = {}
        for lin in selected:
            readers.setdefault(lin.input.name, []).append(lin)
        if stats is None:
            stats = self.ctx.calibrate(model, list(readers), label="calibrating activations")

        def rounded(lin: Linear) -> tuple[np.ndarray, QuantizedWeight, dict[str, Any]]:
            weight = lin.weight_array()
            qweight = self.rounding_for(lin).rtn(weight, self.group_size_for(lin))
            insert_weight_dequant(model.graph, lin, qweight)
            return weight, qweight, {}

        return self.emit(model, readers, stats, rounded)

    def emit(self, model: ir.Model, readers: dict[str, list[Linear]], stats: dict[str, TapStats],
             quantized: Callable[[Linear], tuple[np.ndarray, QuantizedWeight, dict[str, Any]]]) -> bool:
        """Insert each reader group's activation quantizer and record its linears; ``quantized(lin)`` gives the float
        weight, its quantized form (its DequantizeLinear in the graph) and the weight's own figures."""
        graph = model.graph
        is_image = self._is_image(graph)
        quantizer = self.act_quantizer
        changed = 0
        for value_name, group in readers.items():
            tap = stats.get(value_name)
            if self.usable_stats(tap, group) is None:
                continue
            inserted = quantizer.insert(graph, group[0].input, [lin.node for lin in group], tap, is_image,
                                        self.ctx.default_modality)
            self.record.notes.extend(inserted.notes)
            if inserted.fallback:
                self.record.skip(value_name, inserted.fallback)
            for lin in group:
                weight, qweight, figures = quantized(lin)
                self.record.layers.append({
                    **lin.to_dict(),
                    "w_bits": qweight.bits,
                    "a_bits": self.params.act_bits,
                    **figures,
                    **inserted.figures,
                    **layer_sqnr(lin, tap, lambda x, m, s=inserted.scale: quantizer.fake(x, m, s), weight, qweight),
                })
                changed += 1
        ensure_opset(model, "", 21)
        remove_unused_initializers(graph)
        self.record.changed = changed
        return changed > 0

    def _is_image(self, graph: ir.Graph) -> ir.Value | None:
        """MSQ's shared is_image mask (static ``act_scales="per_modality"`` and a ``modality_ids`` input), else None."""
        if self.act_quantizer.form != "per_modality":
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
