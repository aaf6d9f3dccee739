"""CMC — Cross-Modal Compensation, and the quantized lowering of MASQuant (spec/algorithms.md §3.5, §3.6; §5 item 5).

Input: the MAS graph form of ``passes.mas`` (per group x_s = X · Where(is_image, 1/s_v, 1/s_t); per linear
MatMul(x_s, S_t W) plus the float branch Where(is_image, MatMul(x_s, S_v W − S_t W), 0)). Output, per linear::

    x_q  = Q_a(x_s)                                      # activation quantizer, shared by the group (below)
    y    = MatMul(x_q, DequantizeLinear(B))              # B = RTN per output channel of S_t W, int4/int8 [in, out],
                                                         #   axis=1 (mqc.graph.qdq.insert_weight_dequant)
    y'   = Add(y, Where(is_image, MatMul(MatMul(x_s, L1), L2), 0))   # fp32 L1 [in, r], L2 [r, out]; x_s unquantized

Text tokens and decode steps (modality_ids = 0) take Q(x S_t⁻¹)·B only; image tokens add the low-rank branch on the
unquantized smoothed activation (Eq. 29). The bias, when the model has one, stays where it was: added once.

CMC (Eqs. 22–25, Theorem 2; ``mqc.lowrank``): ΔW = S_v W − deq(B) (``quant_cmc=True``: deq(Q(S_v W)) − deq(B), the
code's option 1); with the Gram C = Σ x_sᵀ x_s over the calibration image rows of x_s (= X_v S_v⁻¹ with the learned
s_v), T = Λ^{1/2}Pᵀ, L1 = T⁻¹U_r, L2 = Σ_r V_rᵀ from SVD(TΔW). ``whiten=False`` is the un-whitened ablation (T = I).
Rank r = ``rank_for(rank_ratio, in, out, min_rank)``: a ratio of min(in, out), floored, at least ``min_rank`` (32 in
the public code), at most min(in, out). Calibration inputs are the float model's (a deviation, as MAS's).

``weights`` selects how B is rounded (the shared :class:`mqc.quant_strategy.WeightRounding`):
- ``"rtn"`` (default, the paper and its code): per-output-channel round to nearest.
- ``"gptq"`` (an extension, ``masquant-gptq``): GPTQ with MSE-clipped scales against the Hessian of the text rows
  of x_s (B is the text tokens' whole path; image tokens get the low-rank correction towards S_v W computed against
  this B). The record gives GPTQ's and RTN's relative output error (same scales) per linear; a failed GPTQ falls
  back to RTN (recorded).

``group_size`` (an extension; default None, per output channel as the paper): one scale per group of that many input
rows for B and the image weight of the ablations (``DequantizeLinear`` with ``block_size``). A linear whose input
size it does not divide stays per channel (noted). Per-group weights have no ``--format mqc`` form.

``compensation`` selects the image-token path:
- ``"cmc"`` (default): the low-rank branch above.
- ``"per_modality_weights"`` (ablation "MAS without CMC", the paper's Eq. 21 / the code's training forward): image
  tokens use their own quantized weight, y = Where(is_image, MatMul(x_q, DQ(Q(S_v W))), MatMul(x_q, DQ(B))); both
  GEMMs run for every token in this graph form and the weight memory doubles.
- ``"none"``: image tokens use Q(x S_v⁻¹)·B with no compensation (what MAS costs without CMC if only B is stored).

Activation quantizer (``acts``; the shared :class:`mqc.quant_strategy.ActivationQuantizer`):
- ``"dynamic"`` (the paper / public code, §3.6): per-token symmetric, computed in the graph with standard ops
  (the pattern is on :func:`mqc.graph.qdq.insert_activation_dynamic`).
- ``"static"`` (an extension, spec §6 item 8): one static scale per modality per quantization point from the
  calibration rows of x_s of that modality (min/max), MSQ's pattern (:mod:`mqc.graph.msq`).

Rules:
1. Every linear that MAS rewrote (node metadata ``mqc.mas_linear``) is lowered as above; the low-rank MatMuls
   carry ``mqc.cmc`` so no linear quantizer rounds them.
2. cmc quantizes nothing else. The other language linears (down_proj; anything MAS did not smooth; not lm_head
   or another ``skip_roles`` role, not matching ``--exclude``) are the linear quantizer's, which the MASQuant
   recipes run right after cmc with ``statistics="before_cmc"``: cmc's one calibration run also taps their
   inputs (with Gram matrices when ``weights="gptq"``) and hands the statistics over in ``model.meta``, so they are
   quantized from the same calibration of the MAS float form as the MAS linears.
3. A group with no image calibration rows, or a rank of 0, gets no branch (recorded): image tokens then use B.
4. Records per linear: bits, CMC rank and retained energy (Theorem 2's 1 − Σ_{i>r}σ_i²/Σσ_i², in the whitened norm
   unless ``whiten=False``), and the output SQNR of the emitted form on the calibration rows per modality (bias
   excluded; in-sample: the same rows fitted the Gram), with ``sqnr_db_image_uncompensated`` (image rows through B
   alone) next to it. Act mode, compensation, rank ratio and floor are the pass parameters.
5. ``--format mqc`` lowers both forms into ``ai.mqc::QuantLinear`` with its low-rank option: the static one with
   its per-modality scales, the dynamic one with ``dynamic=1`` (the op computes each token's scale as the graph
   does, so the int8 codes are identical); fp16 dynamic graphs stay in QDQ (their 1e-12 floor rounds to 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_NAMES, TEXT, TapStats
from mqc.errors import NothingToQuantizeError
from mqc.gptq import hessian_from_tap
from mqc.graph.markers import MAS_LINEAR_KEY, MAS_SMOOTH_KEY, STATISTICS_BEFORE_CMC, mark_cmc
from mqc.graph.msq import is_image_mask, modality_input
from mqc.graph.qdq import insert_weight_dequant
from mqc.ir import add_initializer, constant_array, ensure_opset, remove_unused_initializers
from mqc.lowrank import lowrank_compensation, rank_for
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass, declare_fatal
from mqc.quant_strategy import ActivationQuantizer, ActScale, WeightRounding
from mqc.quantizer import QuantizedWeight, sqnr_db


class _MasLinear:
    """One linear in MAS form: its main MatMul and the nodes of its float image branch."""

    def __init__(self, main: ir.Node, nodes: dict[str, ir.Node]) -> None:
        self.main = main
        self.name = main.metadata_props[MAS_LINEAR_KEY]
        self.delta = nodes[f"{self.name}/mas_delta"]
        self.select = nodes[f"{self.name}/mas_select"]
        self.add = nodes[f"{self.name}/mas_add"]
        w_t = constant_array(main.inputs[1])
        d = constant_array(self.delta.inputs[1])
        assert w_t is not None and d is not None
        self.w_text = w_t.astype(np.float64)
        self.w_image = w_t.astype(np.float64) + d.astype(np.float64)
        self.info: dict[str, Any] = self.as_linear().to_dict()

    def as_linear(self) -> Linear:
        return Linear(self.main, self.name, self.main.inputs[1], False, None, None)


class CmcPass(MqcPass):
    """Lowers MAS linears to Q(x S_t⁻¹)·B (+ whitened low-rank CMC for image tokens); the rest is the linear
    quantizer's, to which it hands the statistics of its one calibration run."""

    name = "cmc"
    fatal_skips = declare_fatal(
        no_mas_linears="no MAS-smoothed linear in the graph (run the mas pass first)",
    )

    def requires(self, model: ir.Model) -> None:
        if not any(MAS_LINEAR_KEY in node.metadata_props for node in model.graph):
            raise self.refuse("no_mas_linears", "no MAS-smoothed linear in the graph (run the mas pass first): nothing to compensate")

    def variant(self) -> str:
        p = self.params
        white = "whitened (the paper)" if p.whiten else "not whitened (ablation)"
        weights = ("B by RTN (the paper)" if p.weights == "rtn"
                   else "B by GPTQ on the text rows' Hessian (an extension: the paper rounds B to nearest)")
        grouping = ("per output channel (the paper)" if p.group_size is None
                    else f"per group of {p.group_size} input rows (an extension: the paper quantizes per channel)")
        return (f"{p.compensation}, {white}, rank {p.rank_ratio:g} x min(in, out) with a floor of "
                f"{p.min_rank} (the floor is the released code's); {weights}; weights {grouping}; "
                f"{p.acts} activations")

    @property
    def rounding(self) -> WeightRounding:
        """B's rounding: GPTQ searches MSE-clipped scales, round to nearest takes the absmax ones (the paper)."""
        p = self.params
        return WeightRounding(p.weight_bits, p.weights, p.group_size, mse_clip=p.weights == "gptq")

    # ---------------------------------------------------------------------------------------------- discovery

    def _mas_groups(self, graph: ir.Graph) -> dict[str, tuple[ir.Value, list[_MasLinear]]]:
        nodes = {node.name: node for node in graph}
        groups = {}
        for node in graph:
            if node.metadata_props.get(MAS_SMOOTH_KEY) != "smooth":
                continue
            x_s = node.outputs[0]
            mains = [u.node for u in x_s.uses() if MAS_LINEAR_KEY in u.node.metadata_props]
            if mains:
                groups[x_s.name] = (x_s, [_MasLinear(main, nodes) for main in mains])
        return groups

    def _plain_inputs(self, model: ir.Model, mas_nodes: set[int]) -> list[str]:
        """The input values of the language linears left to the linear quantizer (rule 2), whose statistics cmc's
        calibration run takes for it."""
        names = []
        for lin in self.ctx.model_map(model).linears:
            if id(lin.node) in mas_nodes or lin.role in self.params.skip_roles or lin.component != "language":
                continue
            if not self.ctx.excluded(lin.name):
                names.append(lin.input.name)
        return list(dict.fromkeys(names))

    # ---------------------------------------------------------------------------------------------------- run

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        p = self.params
        mas_groups = self._mas_groups(graph)
        mas_nodes = {id(n) for _, lins in mas_groups.values() for ml in lins for n in (ml.main, ml.delta)}
        plain_inputs = self._plain_inputs(model, mas_nodes)
        mapped = {id(lin.node): lin for lin in self.ctx.model_map(model).linears}
        for _, lins in mas_groups.values():
            for ml in lins:
                if id(ml.main) in mapped:  # role, component and layer as the model map names them
                    ml.info = {**mapped[id(ml.main)].to_dict(), "name": ml.name}
        self.record.matched = sum(len(lins) for _, lins in mas_groups.values())
        if not self.record.matched:
            raise NothingToQuantizeError("no MAS-smoothed linear to lower")
        modality_ids = modality_input(graph)
        is_image = is_image_mask(graph, modality_ids) if modality_ids is not None else None
        if p.acts == "static" and is_image is None:
            self.record.notes.append("static acts without modality_ids: one modality, so one static scale per point")
        gram = list(mas_groups) if p.compensation == "cmc" and p.whiten else []
        if p.weights == "gptq":
            gram = list(mas_groups) + plain_inputs
        stats = self.ctx.calibrate(model, list(mas_groups) + plain_inputs, gram_taps=gram,
                                   label="calibrating CMC", sample_rows=p.rows)
        model.meta[STATISTICS_BEFORE_CMC] = {name: stats[name] for name in plain_inputs if name in stats}
        quantizer = ActivationQuantizer.from_params(p)
        changed = 0
        for name, (x_s, lins) in mas_groups.items():
            tap = stats.get(name)
            if tap is None or all(e.rows == 0 for e in tap.by_modality.values()):
                for ml in lins:
                    self.record.skip(ml.name, "no calibration data reached its input: left in float")
                continue
            inserted = quantizer.insert(graph, x_s, [ml.main for ml in lins], tap, is_image,
                                        self.ctx.default_modality, any_rank=True)
            for ml in lins:
                self.record.layers.append(self._lower_mas(graph, ml, tap, quantizer, inserted.scale, is_image))
                changed += 1
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ensure_opset(model, "", 21)
        remove_unused_initializers(graph)
        self.record.changed = changed
        return changed > 0

    # ---------------------------------------------------------------------------------------------- helpers

    def _group_size(self, name: str, weight: np.ndarray) -> int | None:
        """The pass's group size, or None (per channel, recorded) where it does not divide the input size."""
        note = self.rounding.group_note(name, weight.shape[0])
        if note is not None and note not in self.record.notes:  # the record is per run, so is this note
            self.record.notes.append(note)
        return self.rounding.group_for(weight.shape[0])

    def _rtn(self, name: str, weight: np.ndarray) -> QuantizedWeight:
        """Round to nearest with absmax scales (the image weights of the ablations)."""
        return WeightRounding(self.params.weight_bits).rtn(weight, self._group_size(name, weight))

    def _round_b(self, name: str, weight: np.ndarray, tap: TapStats) -> tuple[QuantizedWeight, dict]:
        """B: RTN, or GPTQ against the Hessian of the text rows (all rows when none are text)."""
        group = self._group_size(name, weight)
        rounding = self.rounding
        if rounding.method == "rtn":
            return rounding.round(weight, group_size=group)
        hessian, _ = hessian_from_tap(tap, [TEXT])
        if hessian is None:
            hessian, _ = hessian_from_tap(tap)
        try:
            return rounding.round(weight, hessian, group)
        except ValueError as exc:
            self.record.skip(name, f"GPTQ failed ({exc}): RTN weights instead")
            return self._rtn(name, weight), {"weight_method": "rtn"}

    def _sqnr(self, tap: TapStats, quantizer: ActivationQuantizer, scale: ActScale, ref_fn, out_fn) -> dict[str, float]:
        """Output SQNR per modality of ``out_fn(x, m, Q_a(x))`` against ``ref_fn(x, m)`` on the calibration rows."""
        figures: dict[str, float] = {}
        refs, outs = [], []
        for m, entry in sorted(tap.by_modality.items()):
            if entry.sample.shape[0] == 0:
                continue
            x = entry.sample
            ref, out = ref_fn(x, m), out_fn(x, m, quantizer.fake(x, m, scale))
            figures[f"sqnr_db_{MODALITY_NAMES.get(m, m)}"] = round(sqnr_db(ref, out), 2)
            refs.append(ref)
            outs.append(out)
        if refs:
            figures["sqnr_db"] = round(sqnr_db(np.concatenate(refs), np.concatenate(outs)), 2)
        return figures

    def _lower_mas(
        self, graph: ir.Graph, ml: _MasLinear, tap: TapStats, quantizer: ActivationQuantizer, scale: ActScale,
        is_image: ir.Value | None,
    ) -> dict[str, Any]:
        p = self.params
        k, n = ml.w_text.shape
        qb, weight_figures = self._round_b(ml.name, ml.w_text.astype(np.float32), tap)
        insert_weight_dequant(graph, ml.as_linear(), qb)
        b = qb.dequantize().astype(np.float64)
        figures: dict[str, Any] = {"w_bits": p.weight_bits, "a_bits": p.act_bits, **weight_figures}
        image = tap.modality(IMAGE)
        mode = p.compensation
        if mode != "none" and (image is None or is_image is None):
            self.record.skip(ml.name, "no image calibration rows at this input: no image-token compensation")
            mode = "none"
        l1 = l2 = qv = None
        if mode == "cmc":
            target = ml.w_image
            if p.quant_cmc:
                target = self._rtn(ml.name, ml.w_image.astype(np.float32)).dequantize().astype(np.float64)
            rank = rank_for(p.rank_ratio, k, n, p.min_rank)
            figures["cmc_rank"] = rank
            if rank == 0:
                self.record.skip(ml.name, "CMC rank is 0 at this rank ratio: no image-token compensation")
                mode = "none"
            else:
                l1, l2, info = lowrank_compensation(target - b, image.gram, rank, whiten=p.whiten, damp=p.damp)
                figures["cmc_retained_energy"] = round(info.retained, 4)
                self._emit_lowrank(graph, ml, l1.astype(np.float32), l2.astype(np.float32))
        elif mode == "per_modality_weights":
            qv = self._rtn(ml.name, ml.w_image.astype(np.float32))
            self._emit_image_weight(graph, ml, qv, is_image)
        if mode == "none":
            for use in list(ml.add.outputs[0].uses()):
                use.node.replace_input_with(use.idx, ml.main.outputs[0])
        b32 = b.astype(np.float32)

        def ref_fn(x: np.ndarray, m: int) -> np.ndarray:
            return x @ (ml.w_image if m == IMAGE else ml.w_text)

        def out_fn(x: np.ndarray, m: int, xq: np.ndarray) -> np.ndarray:
            if m != IMAGE or mode == "none":
                return xq @ b32
            if mode == "cmc":
                return xq @ b32 + (x @ l1.astype(np.float32)) @ l2.astype(np.float32)
            return xq @ qv.dequantize()

        figures.update(self._sqnr(tap, quantizer, scale, ref_fn, out_fn))
        if image is not None and image.sample.shape[0]:
            x = image.sample
            figures["sqnr_db_image_uncompensated"] = round(
                sqnr_db(ref_fn(x, IMAGE), quantizer.fake(x, IMAGE, scale) @ b32), 2)
        return {**ml.info, **figures}

    @staticmethod
    def _emit_lowrank(graph: ir.Graph, ml: _MasLinear, l1: np.ndarray, l2: np.ndarray) -> None:
        """The delta MatMul becomes MatMul(x_s, L1) and a MatMul with L2 follows; the Where/Add stay."""
        ml.delta.replace_input_with(1, add_initializer(graph, f"{ml.name}.cmc_l1", l1))
        ml.delta.name = f"{ml.name}/cmc_l1"
        second = ir.node("MatMul", [ml.delta.outputs[0], add_initializer(graph, f"{ml.name}.cmc_l2", l2)],
                         name=f"{ml.name}/cmc_l2")
        mark_cmc(ml.delta)
        mark_cmc(second)
        graph.insert_after(ml.delta, [second])
        ml.select.replace_input_with(1, second.outputs[0])

    @staticmethod
    def _emit_image_weight(graph: ir.Graph, ml: _MasLinear, qv, is_image: ir.Value) -> None:
        """y = Where(is_image, MatMul(x_q, DQ(Q(S_v W))), MatMul(x_q, DQ(B))) in place of the Add."""
        x_q = ml.main.inputs[0]
        placeholder = add_initializer(graph, f"{ml.name}.weight_mas_image", qv.dequantize())
        matmul = ir.node("MatMul", [x_q, placeholder], name=f"{ml.name}/mas_image_matmul")
        select = ir.node("Where", [is_image, matmul.outputs[0], ml.main.outputs[0]], name=f"{ml.name}/mas_image_select")
        graph.insert_after(ml.add, [matmul, select])
        insert_weight_dequant(graph, Linear(matmul, f"{ml.name}.image", placeholder, False, None, None), qv)
        for use in list(ml.add.outputs[0].uses()):
            use.node.replace_input_with(use.idx, select.outputs[0])
