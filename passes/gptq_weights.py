"""Static W{4,8}A8 QDQ quantization with GPTQ weights (spec/algorithms.md §2.6, "Weights").

The same QDQ form as ``quantize_linears`` (its ``insert_activation_qdq`` / ``insert_weight_dequant`` helpers), with
the weights rounded by GPTQ (``mqc.gptq.gptq_quantize_readers``: symmetric, per output channel, act_order, percdamp 0.01,
MSE clip search) against the Hessian of the float activations of the current, already rotated, graph.

Rules, in order:

1. Linears are selected as in ``quantize_linears`` (``skip_roles``, default ``lm_head``; ``--exclude``), each
   refusal recorded; a group size that does not divide the input size means per-channel weights (noted).
2. Hessians with bounded memory: the selected linears are grouped by whole decoder layers, consecutive layers
   in one calibration run as long as their Gram matrices fit the context's byte budget (``ctx.gram_budget``:
   8·K² bytes per distinct input value and modality, two modalities when the graph has ``modality_ids``, times
   the matrices the shard-invariant sum of a Gram matrix holds at once, ``SampleTreeSum.most_held``: 7 for 32
   samples; a layer larger than the budget is a run of its own; ``layers_per_group`` caps the layers per run).
   Linears without a block index form one last group. Each run taps only that group's input values with Gram
   matrices (Σxᵀx per modality, summed over modalities: one Hessian for both), so at most one group's K×K matrices
   live at a time; each value's Hessian replaces its Gram matrices once the run is over. H = 2/n·Σxᵀx. For
   tiny-vlm's decoder (30 layers, hidden 576, MLP 1536) the final Gram matrices take 1.6 GB, 11.3 GB while 32
   samples are summed: six runs of at most five layers under a 2 GiB budget, two on a machine with 24 GB free
   (the default budget is a quarter of the memory available, at least 2 GiB).
3. ``hessians`` says which activations the Hessians see (MQuant configures activation quantizers after GPTQ,
   §2.6, so both use float activations):
   * ``"sequential"`` (MQuant's released code, QuaRot's layer-wise GPTQ loop): one decoder layer per calibration
     run, in order; a layer's GPTQ-rounded weights are put into the graph before the next layer is calibrated,
     so each layer's Hessian (and its activation statistics) comes from the inputs the already quantized layers
     before it produce, and its rounding compensates their error. The budget does not apply. Within a
     layer all sub-layers share one run (the released code also sequences [qkv] -> [o] -> [up, gate] -> [down]).
   * ``"float"``: all Hessians from the float graph, as many layers per run as rule 2 allows; the graph is rewritten
     only after every group is quantized.
4. Activations: one static symmetric per-tensor scale per input value, shared by both modalities and by all
   linears reading it, from ``act_method`` (minmax / percentile / mse) over the same calibration runs; with
   ``act_scales="per_modality"`` one scale per modality (MSQ, spec §2.3), exactly as ``quantize_linears`` rule 5
   (the same ``insert_activation``). The Hessian stays one for both modalities.
5. Each layer records, next to the output SQNR, GPTQ's relative output error ‖X(W−Ŵ)‖/‖XW‖ and the same figure
   for round-to-nearest with the same scales' search (``rtn_rel_error``), so the gain is visible.
   A Hessian that is not positive definite after damping is a refusal for that linear (left in float).
6. ``statistics="before_cmc"`` (MASQuant's plain linears after ``cmc``, ``masquant-gptq``): the Hessians and
   activation statistics are the ones cmc took of the graph before its lowering (it keeps Gram matrices when it
   rounds B by GPTQ itself); no calibration runs and ``hessians`` does not apply.
7. ``error_rank`` r > 0 (an extension: MASQuant's CMC machinery, ``mqc.lowrank``, applied to the weight rounding
   error of every token, in the spirit of LQER): each GPTQ linear gets a float branch
   ``y = MatMul(x_q, Ŵ) + MatMul(MatMul(x, L1), L2)`` reading its unquantized input x, with L1 L2 the best rank-r
   approximation of W − Ŵ in the norm of its calibration rows (whitened SVD against the same Hessian GPTQ used,
   Theorem 2: the branch removes the largest part of ‖X(W − Ŵ)‖ any rank-r matrix can). Still fully static (no
   run-time scale); the branch's MatMuls carry ``mqc.lowrank`` and are not linears of the model map. Records
   ``error_rank`` and ``error_retained`` (the share of the calibration-row error energy the branch removes). In
   ``hessians="sequential"`` mode the branches enter the graph after the last layer, so later layers' Hessians do
   not see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import SampleTreeSum, TapStats
from mqc.gptq import factors_in_place, hessian_from_tap
from mqc.graph.markers import LOWRANK_KEY
from mqc.graph.msq import modality_input
from mqc.graph.qdq import insert_weight_dequant
from mqc.ir import add_initializer, ensure_opset, remove_unused_initializers
from mqc.linear_quant import LinearQuantPass
from mqc.lowrank import truncated, whitening
from mqc.model_map import Linear
from mqc.quant_strategy import WeightRounding
from mqc.quantizer import QuantizedWeight

#: The low-rank factors (L1 [K, r], L2 [r, N]) of one linear's weight rounding error.
Factors = tuple[np.ndarray, np.ndarray]


class GptqWeightsPass(LinearQuantPass):
    """QDQ quantization like ``quantize_linears``, with GPTQ weights from per-group float Hessians."""

    name = "gptq_weights"
    weight_method = "gptq"

    def variant(self) -> str:
        if self.params.statistics == "before_cmc":
            return f"{super().variant()}; GPTQ Hessians from cmc's calibration of the MAS float form"
        if self.params.hessians == "sequential":
            hessians = ("GPTQ Hessians sequential: each decoder layer's from the outputs of the already GPTQ-quantized "
                        "layers before it, float activations (the released code, which also orders the sub-layers "
                        "of a layer: qkv, o, up/gate, down; here one run per layer)")
        else:
            hessians = ("GPTQ Hessians all from the float graph, as many decoder layers per calibration run as the Gram "
                        "budget holds (the released code is sequential: hessians='sequential')")
        if self.params.error_rank:
            hessians += (f"; a float rank-{self.params.error_rank} branch per linear compensating its weight rounding "
                         "error (whitened SVD against its Hessian: MASQuant's CMC machinery applied to every token's "
                         "weight error, an extension in the spirit of LQER; neither paper has it)")
        if self.params.scale_refit:
            hessians += (f"; the scales refitted to GPTQ's integer codes by least squares against the Hessian, "
                         f"{self.params.scale_refit} round(s) alternating with GPTQ (an extension; neither paper has it)")
        if self.params.group_scales == "dynamic":
            hessians += ("; group scales searched as GPTQ reaches each group, on its error-updated rows, without "
                         "act-order (GPTQ's reference loop; MQuant's weights are per channel)")
        return f"{super().variant()}; {hessians}"

    def _groups(self, model: ir.Model, linears: Sequence[Linear]) -> list[list[Linear]]:
        """Rule 2: whole layers per run (one in sequential mode), as many as the Gram budget holds."""
        by_layer: dict[int | None, list[Linear]] = {}
        for lin in linears:
            by_layer.setdefault(lin.layer, []).append(lin)
        layers = sorted(k for k in by_layer if k is not None)
        modalities = 2 if modality_input(model.graph) is not None else 1
        per_run = 1 if self.params.hessians == "sequential" else self.params.layers_per_group
        budget = None if self.params.hessians == "sequential" else self.ctx.gram_budget
        held = 1 if budget is None else SampleTreeSum.most_held(self._sample_count())
        groups: list[list[Linear]] = []
        run: list[Linear] = []
        run_layers = run_bytes = 0
        for layer in layers:
            size = held * _gram_bytes(by_layer[layer], modalities)
            full = per_run is not None and run_layers >= per_run
            if run and (full or (budget is not None and run_bytes + size > budget)):
                groups.append(run)
                run, run_layers, run_bytes = [], 0, 0
            run += by_layer[layer]
            run_layers += 1
            run_bytes += size
        if run:
            groups.append(run)
        if None in by_layer:
            groups.append(by_layer[None])
        return groups

    def _sample_count(self) -> int:
        """The calibration samples a run sums over (counted from the feeds where the context was not told)."""
        return self.ctx.num_samples if self.ctx.num_samples is not None else sum(1 for _ in self.ctx.feeds())

    def run(self, model: ir.Model) -> bool:
        selected = self.selected_linears(model)
        results: dict[int, tuple[QuantizedWeight | None, dict[str, float], Factors | None]] = {}
        float_weights: dict[int, np.ndarray] = {}
        handed = self.handed_statistics(model, selected)
        if handed is not None:
            self._quantize(_readers(selected), handed, results)
            return self._emit(model, selected, handed, results, float_weights)
        stats: dict[str, TapStats] = {}
        sequential = self.params.hessians == "sequential"
        if sequential:
            ensure_opset(model, "", 21)  # the int4 weight dequants enter the graph before the next calibration run
        groups = self._groups(model, selected)
        self.record.notes.append(f"GPTQ Hessians: {len(groups)} calibration run(s), Gram budget "
                                 f"{self.ctx.gram_budget / 2**20:.0f} MiB per run")
        for index, group in enumerate(groups):
            taps = list(dict.fromkeys(lin.input.name for lin in group))
            group_stats = self.ctx.calibrate(model, taps, gram_taps=taps, label=f"GPTQ Hessians {index + 1}/{len(groups)}")
            self._quantize(_readers(group), group_stats, results)
            for lin in group:
                if sequential and results.get(id(lin.node), (None,))[0] is not None:
                    float_weights[id(lin.node)] = lin.weight_array()
                    insert_weight_dequant(model.graph, lin, results[id(lin.node)][0])
            if sequential:  # the replaced float weights: the next run's session must not reference them
                remove_unused_initializers(model.graph)
                self.ctx.invalidate()  # a new graph revision: the next run gets a new session
            stats.update(group_stats)
        return self._emit(model, selected, stats, results, float_weights)

    def _quantize(self, readers: dict[str, list[Linear]], stats: dict[str, TapStats], results: dict) -> None:
        """GPTQ-round the linears of ``readers`` (by the value they read) against the Hessian of that value into
        ``results`` (nothing where no row reached it). The readers of one value of one weight width are one executor
        job and share the Hessian's factorization (``WeightRounding.round_readers``); the jobs are spread over the
        compile's executor."""
        jobs = []
        for value_name, lins in readers.items():
            tap = stats.get(value_name)
            hessian, rows = hessian_from_tap(tap) if tap is not None else (None, 0)
            for entry in tap.by_modality.values() if tap is not None else ():
                entry.gram = None  # the Hessian replaces the K×K Gram matrices; the small statistics stay
            if hessian is None:
                continue
            by_rounding: dict[WeightRounding, list[Linear]] = {}  # int8_roles: one job per width, one Hessian
            for lin in lins:
                by_rounding.setdefault(self.rounding_for(lin), []).append(lin)
            for rounding, group in by_rounding.items():
                weights = [lin.weight_array() for lin in group]
                jobs.append((group, rows, (rounding, weights, hessian, self.group_size_for(group[0]),
                                           self.params.error_rank)))
        outcomes = self.ctx.executor.map(gptq_readers, [job for _, _, job in jobs],
                                         job_bytes=[gptq_job_bytes(*job[1:3], job[4]) for _, _, job in jobs])
        for (lins, rows, _), outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, str):
                for lin in lins:
                    self.record.skip(lin.name, f"GPTQ failed: {outcome}")
                    results[id(lin.node)] = (None, {}, None)
                continue
            for lin, (qweight, figures, factors) in zip(lins, outcome, strict=True):
                figures.pop("weight_method")
                results[id(lin.node)] = (qweight, {**figures, "hessian_rows": rows}, factors)

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
            factors = results[id(lin.node)][2]
            if factors is not None:
                _add_lowrank_branch(graph, lin, *factors)

        def rounded(lin: Linear) -> tuple[np.ndarray, QuantizedWeight, dict[str, Any]]:
            qweight, figures, _ = results[id(lin.node)]
            weight = float_weights.get(id(lin.node))  # sequential: the dequant is in the graph already
            if weight is None:
                weight = lin.weight_array()
                insert_weight_dequant(graph, lin, qweight)
            return weight, qweight, {"weight_method": "gptq", **figures}

        return self.emit(model, readers, stats, rounded)


def gptq_readers(rounding: WeightRounding, weights: list[np.ndarray], hessian: np.ndarray, group_size: int | None,
                 error_rank: int = 0) -> list[tuple[QuantizedWeight, dict[str, Any], Factors | None]] | str:
    """The GPTQ weights of the readers of one value with their figures (``WeightRounding.round_readers``) and, with
    ``error_rank``, the low-rank factors of their rounding errors (rule 7); or why GPTQ failed (an executor job: a
    pure function of its arguments)."""
    try:
        rounded = rounding.round_readers(weights, hessian, group_size)
    except ValueError as exc:
        return str(exc)
    if not error_rank:
        return [(qweight, figures, None) for qweight, figures in rounded]
    whitener = whitening(hessian)  # one eigendecomposition for every reader of the value
    results = []
    for weight, (qweight, figures) in zip(weights, rounded, strict=True):
        error = np.asarray(weight, dtype=np.float64) - qweight.dequantize().astype(np.float64)
        l1, l2, info = truncated(error, *whitener, error_rank)
        figures = {**figures, "error_rank": info.rank, "error_retained": round(info.retained, 5)}
        results.append((qweight, figures, (l1.astype(np.float32), l2.astype(np.float32))))
    return results


def _add_lowrank_branch(graph: ir.Graph, lin: Linear, l1: np.ndarray, l2: np.ndarray) -> None:
    """Rule 7: ``y = MatMul(x, Ŵ) + MatMul(MatMul(x, L1), L2)`` on the linear's unquantized input x, before its bias."""
    out = lin.node.outputs[0]
    first = ir.node("MatMul", [lin.input, add_initializer(graph, f"{lin.name}.error_lowrank_a", l1)],
                    name=f"{lin.name}/error_lowrank_a")
    second = ir.node("MatMul", [first.outputs[0], add_initializer(graph, f"{lin.name}.error_lowrank_b", l2)],
                     name=f"{lin.name}/error_lowrank_b")
    add = ir.node("Add", [out, second.outputs[0]], name=f"{lin.name}/error_lowrank_add")
    for node in (first, second):
        node.metadata_props[LOWRANK_KEY] = lin.name
    for name, node in (("lowrank_mid", first), ("lowrank_out", second)):
        node.outputs[0].name = f"{lin.name}/{name}"
    compensated = add.outputs[0]
    compensated.dtype, compensated.shape = out.dtype, out.shape
    graph.insert_after(lin.node, [first, second, add])
    out.replace_all_uses_with(compensated, replace_graph_outputs=True)  # a graph output too (a bias-less head)
    add.replace_input_with(0, out)
    if compensated.is_graph_output():  # the output keeps its name
        name, out.name = out.name, f"{lin.name}/uncompensated"
        compensated.name = name
    else:
        compensated.name = f"{lin.name}/compensated"


def gptq_job_bytes(weights: Sequence[np.ndarray], hessian: np.ndarray, error_rank: int = 0) -> int:
    """Peak float64 bytes of one ``gptq_readers`` job: the Hessian and what ``mqc.gptq`` factors it with (at most
    four more K×K arrays, or one where it factors in place) and about six K×N working arrays per reader; with
    ``error_rank``, the whitening's K×K arrays (the eigenvectors, T and T⁻¹) after the factor is dropped."""
    k = hessian.shape[0]
    factoring = max(1 if factors_in_place(k) else 4, 3 if error_rank else 0)
    return 8 * ((1 + factoring) * k * k + 6 * k * sum(w.shape[1] for w in weights))


def _gram_bytes(linears: Sequence[Linear], modalities: int) -> int:
    """Bytes of the float64 Gram matrices of the distinct inputs of ``linears``, one per modality (final sums)."""
    widths = {lin.input.name: lin.in_features for lin in linears}
    return sum(8 * k * k * modalities for k in widths.values())


def _readers(linears: Sequence[Linear]) -> dict[str, list[Linear]]:
    """``linears`` by the value they read, in order."""
    readers: dict[str, list[Linear]] = {}
    for lin in linears:
        readers.setdefault(lin.input.name, []).append(lin)
    return readers
