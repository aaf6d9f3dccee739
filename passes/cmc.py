"""CMC — Cross-Modal Compensation, and the quantized lowering of MASQuant (spec/algorithms.md §3.5, §3.6; §5 item 5).

Input: the MAS graph form of ``passes.mas`` (per group x_s = X · Where(is_image, 1/s_v, 1/s_t); per linear
MatMul(x_s, S_t W) plus the float branch Where(is_image, MatMul(x_s, S_v W − S_t W), 0)). Output, per linear::

    x_q  = Q_a(x_s)                                      # activation quantizer, shared by the group (below)
    y    = MatMul(x_q, DequantizeLinear(B))              # B = RTN per output channel of S_t W, int4/int8 [in, out],
                                                         #   axis=1 (quantize_linears.insert_weight_dequant)
    y'   = Add(y, Where(is_image, MatMul(MatMul(x_s, L1), L2), 0))   # fp32 L1 [in, r], L2 [r, out]; x_s unquantized

Text tokens and decode steps (modality_ids = 0) take Q(x S_t⁻¹)·B only; image tokens add the low-rank branch on the
unquantized smoothed activation (Eq. 29). The bias, when the model has one, stays where it was: added once.

CMC (Eqs. 22–25, Theorem 2; ``mqc.lowrank``): ΔW = S_v W − deq(B) (``quant_cmc=True``: deq(Q(S_v W)) − deq(B), the
code's option 1); with the Gram C = Σ x_sᵀ x_s over the calibration image rows of x_s (= X_v S_v⁻¹ with the learned
s_v), T = Λ^{1/2}Pᵀ, L1 = T⁻¹U_r, L2 = Σ_r V_rᵀ from SVD(TΔW). ``whiten=False`` is the un-whitened ablation (T = I).
Rank r = ``rank_for(rank_ratio, in, out, min_rank)``: a ratio of min(in, out), floored, at least ``min_rank`` (32 in
the public code), at most min(in, out). Calibration inputs are the float model's (a deviation, as MAS's).

``weights`` selects how B (and every plainly quantized linear) is rounded:
- ``"rtn"`` (default, the paper and its code): per-output-channel round to nearest.
- ``"gptq"`` (an extension, ``masquant-gptq``): ``mqc.gptq.gptq_quantize`` against the Hessian of the text rows of
  x_s (B is the text tokens' whole path; image tokens get the low-rank correction towards S_v W computed against
  this B), of all rows for the plain linears. The record gives GPTQ's and RTN's relative output error per linear.

``group_size`` (an extension; default None, per output channel as the paper): one scale per group of that many input
rows for B, the plain linears and the image weight of the ablations (``DequantizeLinear`` with ``block_size``). A
linear whose input size it does not divide stays per channel (noted). Per-group weights have no ``--format mqc`` form.

``compensation`` selects the image-token path:
- ``"cmc"`` (default): the low-rank branch above.
- ``"per_modality_weights"`` (ablation "MAS without CMC", the paper's Eq. 21 / the code's training forward): image
  tokens use their own quantized weight, y = Where(is_image, MatMul(x_q, DQ(Q(S_v W))), MatMul(x_q, DQ(B))); both
  GEMMs run for every token in this graph form and the weight memory doubles.
- ``"none"``: image tokens use Q(x S_v⁻¹)·B with no compensation (what MAS costs without CMC if only B is stored).

Activation quantizer (``acts``):
- ``"dynamic"`` (the paper / public code, §3.6): per-token symmetric, computed in the graph with standard ops::

      scale = Max(Div(ReduceMax(Abs(x), axes=[-1], keepdims=1), qmax), 1e-12)      # {x}/dyn_absmax, {x}/dyn_scale
      x_q   = Mul(Clip(Round(Div(x, scale)), qmin, qmax), scale)                  # {x}/dyn_div ... {x}/dyn_dequant

  (the Max floor keeps all-zero rows at zero instead of NaN).
- ``"static"`` (an extension, spec §6 item 8): one static scale per modality per quantization point from the
  calibration rows of x_s of that modality (min/max), MSQ's pattern (``passes.msq.insert_activation_msq``).

Rules:
1. Every linear that MAS rewrote (node metadata ``mqc.mas_linear``) is lowered as above.
2. Every other language linear (down_proj; anything MAS did not smooth) is quantized plainly: Q_a(x)·DQ(RTN(W)) with
   the same ``acts`` mode. lm_head (``skip_roles``), vision/projector linears (MASQuant quantizes the LLM only) and
   names matching ``--exclude`` stay in float (recorded). In static mode a value that is not [batch, seq, features]
   cannot take MSQ's per-token scale and is refused (recorded).
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
from mqc.gptq import gptq_quantize, hessian_from_tap, relative_output_error
from mqc.graph.markers import MAS_LINEAR_KEY, MAS_SMOOTH_KEY
from mqc.graph.msq import insert_activation_msq, is_image_mask, modality_input, value_rank
from mqc.graph.qdq import (
    dynamic_fake_quant,
    insert_activation_dynamic,
    insert_activation_qdq,
    insert_weight_dequant,
)
from mqc.ir import add_initializer, constant_array, ensure_opset, remove_unused_initializers
from mqc.lowrank import lowrank_compensation, rank_for
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass, declare_fatal
from mqc.quantizer import QuantizedWeight, fake_quantize, qrange, quantize_weight_rtn, sqnr_db


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
    """Lowers MAS linears to Q(x S_t⁻¹)·B (+ whitened low-rank CMC for image tokens) and quantizes the rest."""

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

    def _plain_groups(self, model: ir.Model, mas_nodes: set[int]) -> dict[str, list[Linear]]:
        model_map = self.ctx.model_map(model)
        for refusal in model_map.refused:
            self.record.skip(refusal.node, refusal.reason)
        groups: dict[str, list[Linear]] = {}
        for lin in model_map.linears:
            if id(lin.node) in mas_nodes:
                continue
            if lin.role in self.params.skip_roles:
                self.record.skip(lin.name, f"role {lin.role} stays in float (skip_roles)")
            elif lin.component != "language":
                self.record.skip(lin.name, f"{lin.component} linear: MASQuant quantizes the LLM decoder only")
            elif self.ctx.excluded(lin.name):
                self.record.skip(lin.name, "name matches --exclude")
            else:
                groups.setdefault(lin.input.name, []).append(lin)
        return groups

    # ---------------------------------------------------------------------------------------------------- run

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        p = self.params
        mas_groups = self._mas_groups(graph)
        mas_nodes = {id(n) for _, lins in mas_groups.values() for ml in lins for n in (ml.main, ml.delta)}
        plain_groups = self._plain_groups(model, mas_nodes)
        mapped = {id(lin.node): lin for lin in self.ctx.model_map(model).linears}
        for _, lins in mas_groups.values():
            for ml in lins:
                if id(ml.main) in mapped:  # role, component and layer as the model map names them
                    ml.info = {**mapped[id(ml.main)].to_dict(), "name": ml.name}
        self.record.matched = sum(len(lins) for _, lins in mas_groups.values()) + sum(len(g) for g in plain_groups.values())
        if not self.record.matched:
            raise NothingToQuantizeError("no MAS-smoothed or plain language linear to quantize")
        modality_ids = modality_input(graph)
        is_image = is_image_mask(graph, modality_ids) if modality_ids is not None else None
        if p.acts == "static" and is_image is None:
            self.record.notes.append("static acts without modality_ids: one modality, so one static scale per point")
        gram = list(mas_groups) if p.compensation == "cmc" and p.whiten else []
        if p.weights == "gptq":
            gram = list(mas_groups) + list(plain_groups)
        stats = self.ctx.calibrate(model, list(mas_groups) + list(plain_groups), gram_taps=gram,
                                   label="calibrating CMC", sample_rows=p.rows)
        changed = 0
        for name, (x_s, lins) in mas_groups.items():
            tap = stats.get(name)
            if tap is None or all(e.rows == 0 for e in tap.by_modality.values()):
                for ml in lins:
                    self.record.skip(ml.name, "no calibration data reached its input: left in float")
                continue
            scales = self._act_quant(graph, x_s, tap, [ml.main for ml in lins], is_image)
            for ml in lins:
                self.record.layers.append(self._lower_mas(graph, ml, tap, scales, is_image))
                changed += 1
        for name, group in plain_groups.items():
            tap = stats.get(name)
            value = group[0].input
            if tap is None or all(e.rows == 0 or e.absmax == 0.0 for e in tap.by_modality.values()):
                for lin in group:
                    self.record.skip(lin.name, "no calibration data reached its input (or it is all zeros)")
                continue
            if p.acts == "static" and is_image is not None and value_rank(value) != 3:
                for lin in group:
                    self.record.skip(lin.name, f"static per-modality scales need a [batch, seq, features] input, "
                                               f"this one has rank {value_rank(value)}: left in float")
                continue
            scales = self._act_quant(graph, value, tap, [lin.node for lin in group], is_image)
            for lin in group:
                weight = lin.weight_array()
                qweight, weight_figures = self._quantize_weight(lin.name, weight, tap, None)
                insert_weight_dequant(graph, lin, qweight)
                w_hat = qweight.dequantize()
                figures = self._sqnr(tap, scales, lambda x, m, w=weight: x @ w, lambda x, m, xq, b=w_hat: xq @ b)
                self.record.layers.append({**lin.to_dict(), "w_bits": p.weight_bits, "a_bits": p.act_bits,
                                           **weight_figures, **figures})
                changed += 1
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ensure_opset(model, "", 21)
        remove_unused_initializers(graph)
        self.record.changed = changed
        return changed > 0

    # ---------------------------------------------------------------------------------------------- helpers

    def _act_quant(
        self, graph: ir.Graph, value: ir.Value, tap: TapStats, readers: list[ir.Node], is_image: ir.Value | None,
    ) -> dict[int, float] | None:
        """Insert the activation quantizer before ``readers``; the static scales per modality, None when dynamic."""
        p = self.params
        if p.acts == "dynamic":
            insert_activation_dynamic(graph, value, p.act_bits, readers)
            return None
        qmax = qrange(p.act_bits)[1]
        scales = {m: float(e.absmax / qmax) for m, e in tap.by_modality.items() if e.rows and e.absmax > 0}
        for m, other in ((TEXT, IMAGE), (IMAGE, TEXT)):
            if m not in scales and other in scales:
                scales[m] = scales[other]
        if is_image is None:
            insert_activation_qdq(graph, value, scales[self.ctx.default_modality], p.act_bits, readers)
        else:
            insert_activation_msq(graph, value, scales[TEXT], scales[IMAGE], p.act_bits, readers, is_image)
        return scales

    def _group_size(self, name: str, weight: np.ndarray) -> int | None:
        """The pass's group size, or None (per channel, recorded) where it does not divide the input size."""
        group = self.params.group_size
        if group is not None and weight.shape[0] % group:
            note = f"{name}: input size {weight.shape[0]} is not a multiple of group size {group}: per-channel weights"
            if note not in self.record.notes:  # the record is per run, so is this note
                self.record.notes.append(note)
            return None
        return group

    def _rtn(self, name: str, weight: np.ndarray) -> QuantizedWeight:
        return quantize_weight_rtn(weight, self.params.weight_bits, self._group_size(name, weight))

    def _quantize_weight(self, name: str, weight: np.ndarray, tap: TapStats, modality: int | None) -> tuple[Any, dict]:
        """RTN (per output channel or per group), or GPTQ against the Gram of ``modality``'s rows (all rows if None)."""
        bits = self.params.weight_bits
        group = self._group_size(name, weight)
        rtn = quantize_weight_rtn(weight, bits, group)
        if self.params.weights == "rtn":
            return rtn, {"weight_method": "rtn"}
        hessian, _ = hessian_from_tap(tap, None if modality is None else [modality])
        if hessian is None:
            hessian, _ = hessian_from_tap(tap)
        try:
            qweight, rel = gptq_quantize(weight, hessian, bits, group_size=group)
        except ValueError as exc:
            self.record.skip(name, f"GPTQ failed ({exc}): RTN weights instead")
            return rtn, {"weight_method": "rtn"}
        rtn_rel = relative_output_error(weight, rtn.dequantize(), hessian)
        return qweight, {"weight_method": "gptq", "gptq_rel_error": round(rel, 5), "rtn_rel_error": round(rtn_rel, 5)}

    def _qa(self, x: np.ndarray, m: int, scales: dict[int, float] | None) -> np.ndarray:
        if scales is None:
            return dynamic_fake_quant(x, self.params.act_bits)
        return fake_quantize(x, scales.get(m, scales.get(TEXT, 1.0)), self.params.act_bits)

    def _sqnr(self, tap: TapStats, scales, ref_fn, out_fn) -> dict[str, float]:
        """Output SQNR per modality of ``out_fn(x, m, Q_a(x))`` against ``ref_fn(x, m)`` on the calibration rows."""
        figures: dict[str, float] = {}
        refs, outs = [], []
        for m, entry in sorted(tap.by_modality.items()):
            if entry.sample.shape[0] == 0:
                continue
            x = entry.sample
            ref, out = ref_fn(x, m), out_fn(x, m, self._qa(x, m, scales))
            figures[f"sqnr_db_{MODALITY_NAMES.get(m, m)}"] = round(sqnr_db(ref, out), 2)
            refs.append(ref)
            outs.append(out)
        if refs:
            figures["sqnr_db"] = round(sqnr_db(np.concatenate(refs), np.concatenate(outs)), 2)
        return figures

    def _lower_mas(
        self, graph: ir.Graph, ml: _MasLinear, tap: TapStats, scales: dict[int, float] | None, is_image: ir.Value | None,
    ) -> dict[str, Any]:
        p = self.params
        k, n = ml.w_text.shape
        qb, weight_figures = self._quantize_weight(ml.name, ml.w_text.astype(np.float32), tap, TEXT)
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

        figures.update(self._sqnr(tap, scales, ref_fn, out_fn))
        if image is not None and image.sample.shape[0]:
            x = image.sample
            figures["sqnr_db_image_uncompensated"] = round(sqnr_db(ref_fn(x, IMAGE), self._qa(x, IMAGE, scales) @ b32), 2)
        return {**ml.info, **figures}

    @staticmethod
    def _emit_lowrank(graph: ir.Graph, ml: _MasLinear, l1: np.ndarray, l2: np.ndarray) -> None:
        """The delta MatMul becomes MatMul(x_s, L1) and a MatMul with L2 follows; the Where/Add stay."""
        ml.delta.replace_input_with(1, add_initializer(graph, f"{ml.name}.cmc_l1", l1))
        ml.delta.name = f"{ml.name}/cmc_l1"
        second = ir.node("MatMul", [ml.delta.outputs[0], add_initializer(graph, f"{ml.name}.cmc_l2", l2)],
                         name=f"{ml.name}/cmc_l2")
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
