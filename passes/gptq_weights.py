"""Static W{4,8}A8 QDQ quantization with GPTQ weights (spec/algorithms.md §2.6, "Weights").

The same QDQ form as ``quantize_linears`` (its ``insert_activation_qdq`` / ``insert_weight_dequant`` helpers), with
the weights rounded by GPTQ (``mqc.gptq.gptq_quantize``: symmetric, per output channel, act_order, percdamp 0.01,
MSE clip search) against the Hessian of the float activations of the current, already rotated, graph.

Rules, in order:

1. Linears are selected as in ``quantize_linears`` (``skip_roles``, default ``lm_head``; ``--exclude``; group
   size divisibility), each refusal recorded.
2. Hessians with bounded memory: the selected linears are grouped by block (``layers_per_group`` decoder
   layers per calibration run; linears without a block index form one last group). Each run taps only that
   group's input values with Gram matrices (Σxᵀx per modality, summed over modalities: one Hessian for both),
   so at most one group's K×K matrices live at a time. H = 2/n·Σxᵀx.
3. ``hessians`` says which activations the Hessians see (MQuant configures activation quantizers after GPTQ,
   §2.6, so both use float activations):
   * ``"sequential"`` (MQuant's released code, QuaRot's layer-wise GPTQ loop): one decoder layer per calibration
     run, in order; a layer's GPTQ-rounded weights are put into the graph before the next layer is calibrated,
     so each layer's Hessian (and its activation statistics) comes from the inputs the already quantized layers
     before it produce, and its rounding compensates their error. ``layers_per_group`` does not apply. Within a
     layer all sub-layers share one run (the released code also sequences [qkv] -> [o] -> [up, gate] -> [down]).
   * ``"float"``: all Hessians from the float graph, ``layers_per_group`` layers per run; the graph is rewritten
     only after every group is quantized.
4. Activations: one static symmetric per-tensor scale per input value, shared by both modalities and by all
   linears reading it, from ``act_method`` (minmax / percentile / mse) over the same calibration runs; with
   ``act_scales="per_modality"`` one scale per modality (MSQ, spec §2.3), exactly as ``quantize_linears`` rule 5
   (the same ``insert_activation``). The Hessian stays one for both modalities.
5. Each layer records, next to the output SQNR, GPTQ's relative output error ‖X(W−Ŵ)‖/‖XW‖ and the same figure
   for round-to-nearest with the same scales' search (``rtn_rel_error``), so the gain is visible.
   A Hessian that is not positive definite after damping is a refusal for that linear (left in float).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import TapStats
from mqc.gptq import gptq_quantize, hessian_from_tap, relative_output_error
from mqc.graph.qdq import insert_weight_dequant
from mqc.ir import ensure_opset, remove_unused_initializers
from mqc.linear_quant import LinearQuantPass
from mqc.model_map import Linear
from mqc.quantizer import QuantizedWeight, quantize_weight_rtn, weight_scales


class GptqWeightsPass(LinearQuantPass):
    """QDQ quantization like ``quantize_linears``, with GPTQ weights from per-group float Hessians."""

    name = "gptq_weights"

    def variant(self) -> str:
        if self.params.hessians == "sequential":
            hessians = ("GPTQ Hessians sequential: each decoder layer's from the outputs of the already GPTQ-quantized "
                        "layers before it, float activations (the released code, which also orders the sub-layers "
                        "of a layer: qkv, o, up/gate, down; here one run per layer)")
        else:
            hessians = (f"GPTQ Hessians all from the float graph, {self.params.layers_per_group} decoder layers per "
                        "calibration run (the released code is sequential: hessians='sequential')")
        return f"{super().variant()}; {hessians}"

    def _groups(self, linears: Sequence[Linear]) -> list[list[Linear]]:
        by_block: dict[int | None, list[Linear]] = {}
        per_run = 1 if self.params.hessians == "sequential" else self.params.layers_per_group
        for lin in linears:
            key = None if lin.layer is None else lin.layer // per_run
            by_block.setdefault(key, []).append(lin)
        keys = sorted(k for k in by_block if k is not None) + ([None] if None in by_block else [])
        return [by_block[k] for k in keys]

    def run(self, model: ir.Model) -> bool:
        selected = self.selected_linears(model)
        stats: dict[str, TapStats] = {}
        results: dict[int, tuple[QuantizedWeight | None, dict[str, float]]] = {}
        float_weights: dict[int, np.ndarray] = {}
        sequential = self.params.hessians == "sequential"
        if sequential:
            ensure_opset(model, "", 21)  # the int4 weight dequants enter the graph before the next calibration run
        groups = self._groups(selected)
        for index, group in enumerate(groups):
            taps = list(dict.fromkeys(lin.input.name for lin in group))
            group_stats = self.ctx.calibrate(model, taps, gram_taps=taps, label=f"GPTQ Hessians {index + 1}/{len(groups)}")
            self._quantize(group, group_stats, results)
            for lin in group:
                if sequential and results.get(id(lin.node), (None,))[0] is not None:
                    float_weights[id(lin.node)] = lin.weight_array()
                    insert_weight_dequant(model.graph, lin, results[id(lin.node)][0])
            if sequential:  # the replaced float weights: the next run's session must not reference them
                remove_unused_initializers(model.graph)
            for name, tap in group_stats.items():
                for entry in tap.by_modality.values():
                    entry.gram = None  # keep the small statistics, drop the K×K matrices
                stats[name] = tap
        return self._emit(model, selected, stats, results, float_weights)

    def _quantize(self, group: Sequence[Linear], stats: dict[str, TapStats], results: dict) -> None:
        """GPTQ-round each linear of ``group`` against the Hessian of its input into ``results`` (nothing for one no
        row reached); the linears are independent jobs, spread over the compile's executor."""
        jobs = []
        for lin in group:
            tap = stats.get(lin.input.name)
            hessian, rows = hessian_from_tap(tap) if tap is not None else (None, 0)
            if hessian is not None:
                jobs.append((lin, rows, (lin.weight_array(), hessian, self.params)))
        outcomes = self.ctx.executor.map(gptq_linear, [job for _, _, job in jobs])
        for (lin, rows, _), outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, str):
                self.record.skip(lin.name, f"GPTQ failed: {outcome}")
                results[id(lin.node)] = (None, {})
                continue
            qweight, rel, rtn_rel = outcome
            results[id(lin.node)] = (qweight, {"gptq_rel_error": round(rel, 5), "rtn_rel_error": round(rtn_rel, 5), "hessian_rows": rows})

    def _emit(
        self, model: ir.Model, selected: Sequence[Linear], stats: dict[str, TapStats], results: dict,
        float_weights: dict[int, np.ndarray],
    ) -> bool:
        """Insert the activation QDQ of every quantized linear, and its weight dequant unless already in place."""
        graph = model.graph
        readers: dict[str, list[Linear]] = {}
        for lin in selected:
            if results.get(id(lin.node), (None,))[0] is None:
                if id(lin.node) not in results:
                    self.record.skip(lin.name, "no calibration data reached its input (or it is all zeros)")
                continue
            readers.setdefault(lin.input.name, []).append(lin)

        def rounded(lin: Linear) -> tuple[np.ndarray, QuantizedWeight, dict[str, Any]]:
            qweight, figures = results[id(lin.node)]
            weight = float_weights.get(id(lin.node))  # sequential: the dequant is in the graph already
            if weight is None:
                weight = lin.weight_array()
                insert_weight_dequant(graph, lin, qweight)
            return weight, qweight, {"weight_method": "gptq", **figures}

        return self.emit(model, readers, stats, rounded)


def gptq_linear(weight: np.ndarray, hessian: np.ndarray, params: Any) -> tuple[QuantizedWeight, float, float] | str:
    """One linear's GPTQ weight with its relative output error and round-to-nearest's with the same scales, or why
    GPTQ failed (an executor job: a pure function of its arguments)."""
    scale = weight_scales(weight, params.weight_bits, params.group_size, params.weight_mse_clip)
    try:
        qweight, rel = gptq_quantize(
            weight, hessian, params.weight_bits, params.group_size, act_order=params.act_order,
            percdamp=params.percdamp, block_size=params.block_size, scale=scale,
        )
    except ValueError as exc:
        return str(exc)
    rtn = quantize_weight_rtn(weight, params.weight_bits, params.group_size, scale=scale)
    return qweight, rel, relative_output_error(weight, rtn.dequantize(), hessian)
