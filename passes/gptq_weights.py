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
3. All Hessians come from the float graph: the graph is rewritten only after every group is quantized
   (MQuant configures activation quantizers after GPTQ, §2.6).
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

import onnx_ir as ir

from mqc.calibration import TapStats
from mqc.errors import NothingToQuantizeError
from mqc.gptq import gptq_quantize, hessian_from_tap, relative_output_error
from mqc.graph.qdq import insert_weight_dequant, layer_sqnr
from mqc.ir import ensure_opset, remove_unused_initializers
from mqc.linear_quant import LinearQuantPass
from mqc.model_map import Linear
from mqc.quantizer import QuantizedWeight, quantize_weight_rtn, weight_scales


class GptqWeightsPass(LinearQuantPass):
    """QDQ quantization like ``quantize_linears``, with GPTQ weights from per-group float Hessians."""

    name = "gptq_weights"

    def variant(self) -> str:
        return (f"{super().variant()}; GPTQ Hessians from the float activations of the rotated graph, "
                f"{self.params.layers_per_group} decoder layers per calibration run (paper and code agree)")

    def _groups(self, linears: Sequence[Linear]) -> list[list[Linear]]:
        by_block: dict[int | None, list[Linear]] = {}
        for lin in linears:
            key = None if lin.layer is None else lin.layer // self.params.layers_per_group
            by_block.setdefault(key, []).append(lin)
        keys = sorted(k for k in by_block if k is not None) + ([None] if None in by_block else [])
        return [by_block[k] for k in keys]

    def run(self, model: ir.Model) -> bool:
        model_map = self.ctx.model_map(model)
        self.record.matched = len(model_map.linears)
        for refusal in model_map.refused:
            self.record.skip(refusal.node, refusal.reason)
        selected = self.select(model_map.linears)
        if not selected:
            raise NothingToQuantizeError("the model has no linear layer with a constant float weight to quantize")
        stats: dict[str, TapStats] = {}
        results: dict[int, tuple[QuantizedWeight, dict[str, float]]] = {}
        groups = self._groups(selected)
        for index, group in enumerate(groups):
            taps = list(dict.fromkeys(lin.input.name for lin in group))
            group_stats = self.ctx.calibrate(model, taps, gram_taps=taps, label=f"GPTQ Hessians {index + 1}/{len(groups)}")
            for lin in group:
                tap = group_stats.get(lin.input.name)
                hessian, rows = hessian_from_tap(tap) if tap is not None else (None, 0)
                if hessian is None:
                    continue
                weight = lin.weight_array()
                scale = weight_scales(weight, self.params.weight_bits, self.params.group_size, self.params.weight_mse_clip)
                try:
                    qweight, rel = gptq_quantize(
                        weight, hessian, self.params.weight_bits, self.params.group_size, act_order=self.params.act_order,
                        percdamp=self.params.percdamp, block_size=self.params.block_size, scale=scale,
                    )
                except ValueError as exc:
                    self.record.skip(lin.name, f"GPTQ failed: {exc}")
                    results[id(lin.node)] = (None, {})  # type: ignore[assignment]
                    continue
                rtn = quantize_weight_rtn(weight, self.params.weight_bits, self.params.group_size, scale=scale)
                rtn_rel = relative_output_error(weight, rtn.dequantize(), hessian)
                results[id(lin.node)] = (qweight, {"gptq_rel_error": round(rel, 5), "rtn_rel_error": round(rtn_rel, 5), "hessian_rows": rows})
            for name, tap in group_stats.items():
                for entry in tap.by_modality.values():
                    entry.gram = None  # keep the small statistics, drop the K×K matrices
                stats[name] = tap
        return self._emit(model, selected, stats, results)

    def _emit(self, model: ir.Model, selected: Sequence[Linear], stats: dict[str, TapStats], results: dict) -> bool:
        graph = model.graph
        readers: dict[str, list[Linear]] = {}
        for lin in selected:
            if results.get(id(lin.node), (None,))[0] is None:
                if id(lin.node) not in results:
                    self.record.skip(lin.name, "no calibration data reached its input (or it is all zeros)")
                continue
            readers.setdefault(lin.input.name, []).append(lin)
        is_image = self._is_image(graph)
        changed = 0
        for value_name, group in readers.items():
            tap = stats.get(value_name)
            if self.usable_stats(tap, group) is None:
                continue
            act_figures, sqnr_scale = self.insert_activation(graph, value_name, group, tap, is_image)
            for lin in group:
                qweight, figures = results[id(lin.node)]
                weight = lin.weight_array()
                insert_weight_dequant(graph, lin, qweight)
                self.record.layers.append({
                    **lin.to_dict(),
                    "w_bits": self.params.weight_bits,
                    "a_bits": self.params.act_bits,
                    "weight_method": "gptq",
                    **act_figures,
                    **figures,
                    **layer_sqnr(lin, tap, sqnr_scale, self.params.act_bits, weight, qweight),
                })
                changed += 1
        ensure_opset(model, "", 21)
        remove_unused_initializers(graph)
        self.record.changed = changed
        return changed > 0
