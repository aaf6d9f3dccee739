"""RMS: rotation magnitude suppression, the first-channel split (spec/algorithms.md §2.7; graph form §5 item 3).

After ``hadamard_rotation`` an online Hadamard H (deterministic, normalised, first row all +1/√n) sits before each
down_proj / fc2 and Hᵀ is folded into its weight: B' = HᵀB. Channel 0 of the layer input x' = xH is √n·mean(x)
and row 0 of B' is √n times the column means of B. A non-zero column mean makes row 0 an outlier that dominates
the per-output-channel weight scale (and channel 0 the per-tensor activation scale).

Rules:
1. Candidates: linears of role ``roles`` (down, fc2) whose input is the output of an online Hadamard
   (``MatMul(x, mqc.H<n>)`` of ``hadamard_rotation``), not matching ``--exclude``; others are recorded as skips.
   ``require_online_hadamard=False`` takes every linear of those roles.
2. Flag rule (``criterion``), every figure recorded per layer (and one note per flagged layer, which
   ``mqc explain`` prints):
   * ``"paper"`` (default; MQuant v2 Eqs. 6-9, ICLR Eqs. 12-13, spec §2.7 "Criterion", its statistical
     variant): treating each column j of the unrotated weight B as i.i.d. normal (mean μ_j, std σ_j), the first
     channel of B' = HᵀB is √n·μ_j, and the layer is affected when, for some output feature j, it exceeds the
     expected maximum of the other n entries: √n·|μ_j| > σ_j·√(2 ln n). Read off B' alone (H is orthogonal with
     a first row of +1/√n): √n·μ_j = B'[0, j] and n·σ_j² = Σ_{i≥1} B'[i, j]² (``paper_ratio`` = the largest
     √n|μ_j| / (σ_j√(2 ln n)), ``paper_columns`` = how many j fire, ``paper_flag``);
   * ``"weight"`` (the spec's implementable test): max_j |B'[0, j]| > max_{i≥1, j} |B'[i, j]|
     (``w_row0_absmax``, ``w_rest_absmax``, ``w_ratio``);
   * ``"activation"`` (a heuristic, not the paper's): on calibration data, absmax of input channel 0 > ``ratio``
     × the median over channels ≥ 1 of the per-channel absmax (``act_ch0_absmax``, ``act_rest_median``,
     ``act_ratio``);
   * ``"either"``: the weight or the activation test (the project's earlier heuristic).
3. Split of a flagged layer ``Y = X·B' (+ b)``::

        Y = MatMul(Slice(X, 1:, axis -1), B'[1:, :]) + MatMul(Slice(X, 0:1, axis -1), B'[0:1, :])  (+ b)

   The main MatMul keeps the original node (its name, role and block in the model map), so the quantization pass
   that follows quantizes it as usual: W4 over rows 1:, and its activation scale is computed on the sliced
   input, i.e. without channel 0. The side branch (``side_branch``):
   * ``"float"`` (default; the released code's variant): a [1, N] float weight, left unquantized because the
     quantization passes refuse 1-row weights (``quantize_linears`` rule 1). The pass is function-preserving.
   * ``"w8"`` (closer to the paper's Fig. 5 GEMV): channel 0 gets its own static int8 per-tensor QDQ (scale from
     the calibration absmax of channel 0) and the row is stored int8 per output column with a DequantizeLinear.
     Not function-preserving.
   The Add's output takes over every reader of the old output, so the residual Add and any bias are unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.graph.qdq import insert_weight_dequant
from mqc.graph.weights import live_uses, own_weight, set_weight
from mqc.ir import add_initializer, constant_array, ensure_opset, remove_unused_initializers
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass
from mqc.quant_strategy import ActivationQuantizer, WeightRounding
from mqc.quantizer import qrange

INT64_MAX = np.iinfo(np.int64).max


def online_hadamard_input(lin: Linear) -> bool:
    """Whether ``lin`` reads ``MatMul(x, mqc.H<n>)``, the online Hadamard of ``hadamard_rotation``."""
    producer = lin.input.producer()
    if producer is None or producer.op_type != "MatMul" or len(producer.inputs) < 2 or producer.inputs[1] is None:
        return False
    return (producer.inputs[1].name or "").startswith("mqc.H")


#: What each criterion tests, for the pass's note.
RULES = {
    "paper": "flag when some output feature j has sqrt(n)|mean_j| > std_j sqrt(2 ln n) (MQuant Eqs. 6-9)",
    "weight": "flag when max|B'[0,:]| > max|B'[1:,:]|",
    "activation": "flag when activation ch0 absmax > {ratio:g} x median of the other channels' absmax",
    "either": "flag when activation ch0 absmax > {ratio:g} x median of the other channels' absmax, or "
              "max|B'[0,:]| > max|B'[1:,:]|",
}


def paper_test(weight: np.ndarray) -> dict[str, Any]:
    """MQuant's affected-layer test (Eqs. 6-9) on the folded weight B' = HᵀB, [n, out] (module docstring, rule 2)."""
    n = weight.shape[0]
    w = weight.astype(np.float64)
    first = np.abs(w[0])  # √n·|μ_j|
    sigma = np.sqrt(np.sum(w[1:] ** 2, axis=0) / n)
    limit = sigma * np.sqrt(2.0 * np.log(n))
    ratios = first / np.maximum(limit, 1e-30)
    return {"paper_ratio": round(float(ratios.max()), 4), "paper_columns": int(np.sum(ratios > 1.0)),
            "paper_flag": bool(np.any(ratios > 1.0))}


class RmsSplitPass(MqcPass):
    """Split the outlier first input channel of rotated down_proj/fc2 layers into a rank-1 side branch."""

    name = "rms_split"

    @property
    def function_preserving(self) -> bool:  # type: ignore[override]
        """A float side branch keeps what the model computes; an int8 one rounds channel 0."""
        return self.params.side_branch == "float"

    def variant(self) -> str:
        if self.params.side_branch == "float":
            return ("side branch in float (the released code; the paper's Fig. 5 W4A8 GEMV is side_branch='w8': a "
                    "1-row weight with per-column scales is exact at any bit width, so only channel 0's int8 "
                    "activation differs)")
        return "side branch int8 activation x per-column weight (the paper's GEMV)"

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        model_map = self.ctx.model_map(model)
        candidates = []
        for lin in model_map.linears:
            if lin.role not in self.params.roles:
                continue
            if self.ctx.excluded(lin.name):
                self.record.skip(lin.name, "name matches --exclude")
            elif lin.in_features < 2:
                self.record.skip(lin.name, "fewer than 2 input channels")
            elif self.params.require_online_hadamard and not online_hadamard_input(lin):
                self.record.skip(lin.name, "no online Hadamard before it (run hadamard_rotation with online_down)")
            else:
                candidates.append(lin)
        self.record.matched = len(candidates)
        if not candidates:
            return False
        taps = list(dict.fromkeys(lin.input.name for lin in candidates))
        stats = self.ctx.calibrate(model, taps, label="RMS channel statistics")
        changed = 0
        for lin in candidates:
            tap = stats.get(lin.input.name)
            channel_absmax = tap.combined().channel_absmax if tap is not None else None
            figures = self._figures(lin.weight_array(), channel_absmax)
            flagged = {"either": figures["w_flag"] or figures["act_flag"], "weight": figures["w_flag"],
                       "activation": figures["act_flag"], "paper": figures["paper_flag"]}[self.params.criterion]
            row: dict[str, Any] = {"name": lin.name, "role": lin.role, "layer": lin.layer, **figures,
                                   "rms_split": bool(flagged)}
            if flagged:
                row.update(self._split(graph, lin, float(channel_absmax[0]) if channel_absmax is not None else None))
                changed += 1
                self.record.notes.append(
                    f"{lin.name}: split channel 0 ({self.params.side_branch} side branch): paper test "
                    f"{figures['paper_ratio']:.3g}x its limit on {figures['paper_columns']} output features; activation ch0 absmax "
                    f"{_fmt(figures['act_ch0_absmax'])} = {_fmt(figures['act_ratio'])}x the median channel "
                    f"(limit {self.params.ratio:g}x); weight row 0 absmax {figures['w_row0_absmax']:.4g} = "
                    f"{figures['w_ratio']:.3g}x the other rows' absmax")
            self.record.layers.append(row)
        if changed:
            remove_unused_initializers(graph)
            if self.params.side_branch == "w8":
                ensure_opset(model, "", 21)
        self.record.changed = changed
        self.record.notes.insert(0, f"rule ({self.params.criterion}): {RULES[self.params.criterion].format(ratio=self.params.ratio)}; "
                                    f"{changed} of {len(candidates)} layers split")
        return changed > 0

    def _figures(self, weight: np.ndarray, channel_absmax: np.ndarray | None) -> dict[str, Any]:
        row0 = float(np.max(np.abs(weight[0])))
        rest = float(np.max(np.abs(weight[1:])))
        figures: dict[str, Any] = {"w_row0_absmax": round(row0, 6), "w_rest_absmax": round(rest, 6),
                                   "w_ratio": round(row0 / max(rest, 1e-30), 4), "w_flag": row0 > rest,
                                   **paper_test(weight)}
        if channel_absmax is None:
            figures.update(act_ch0_absmax=None, act_rest_median=None, act_ratio=None, act_flag=False)
            return figures
        ch0 = float(channel_absmax[0])
        median = float(np.median(channel_absmax[1:]))
        ratio = ch0 / max(median, 1e-30)
        figures.update(act_ch0_absmax=round(ch0, 6), act_rest_median=round(median, 6), act_ratio=round(ratio, 4),
                       act_flag=ratio > self.params.ratio)
        return figures

    def _split(self, graph: ir.Graph, lin: Linear, ch0_absmax: float | None) -> dict[str, Any]:
        base = lin.name
        x = lin.input
        weight = lin.weight_array()
        dtype = constant_array(lin.weight).dtype
        i64 = lambda name, v: add_initializer(graph, f"{base}/rms_{name}", np.array(v, dtype=np.int64))  # noqa: E731
        axes = i64("axes", [-1])
        main_slice = ir.node("Slice", [x, i64("main_start", [1]), i64("main_end", [INT64_MAX]), axes], name=f"{base}/rms_main_slice")
        main_slice.outputs[0].name = f"{base}/rms_main_in"
        side_slice = ir.node("Slice", [x, i64("side_start", [0]), i64("side_end", [1]), axes], name=f"{base}/rms_side_slice")
        side_slice.outputs[0].name = f"{base}/rms_side_in"
        if x.dtype is not None:
            for out in (main_slice.outputs[0], side_slice.outputs[0]):
                out.dtype = x.dtype
        if x.shape is not None:  # keep the rank: MSQ quantizes the main branch per modality
            lead = list(x.shape)[:-1]
            width = x.shape[-1]
            main_slice.outputs[0].shape = ir.Shape([*lead, width - 1 if isinstance(width, int) else None])
            side_slice.outputs[0].shape = ir.Shape([*lead, 1])
        nodes: list[ir.Node] = [main_slice, side_slice]
        side_x = side_slice.outputs[0]
        row = weight[0:1, :].astype(dtype)
        figures: dict[str, Any] = {"rms_side_branch": self.params.side_branch}
        side_w = add_initializer(graph, f"{base}.rms_side.weight", row)
        side = ir.node("MatMul", [side_x, side_w], name=f"{base}/rms_side")
        side.outputs[0].name = f"{base}/rms_side_out"
        nodes.append(side)
        graph.insert_before(lin.node, nodes)
        if self.params.side_branch == "w8":  # int8 per output column (exact for one row) behind a static int8 QDQ
            side_linear = Linear(side, f"{base}.rms_side", side_w, False, None, None)
            insert_weight_dequant(graph, side_linear, WeightRounding(8).rtn(row.astype(np.float32)))
            scale = max(ch0_absmax or 0.0, 1e-12) / qrange(8)[1]
            ActivationQuantizer("static", 8).insert_scale(graph, side_x, [side], scale)
            figures["rms_side_act_scale"] = scale
        # the main branch: the original node, rows 1: only
        own_weight(graph, lin)
        set_weight(lin, weight[1:, :])
        lin.node.replace_input_with(0, main_slice.outputs[0])
        out = lin.node.outputs[0]
        uses = live_uses(out, graph)
        add = ir.node("Add", [out, side.outputs[0]], name=f"{base}/rms_add")
        old_name = out.name
        out.name = f"{base}/rms_main_out"
        add.outputs[0].name = old_name
        if out.dtype is not None:
            add.outputs[0].dtype = out.dtype
        add.outputs[0].shape = out.shape
        graph.insert_after(lin.node, [add])
        for use in uses:
            use.node.replace_input_with(use.idx, add.outputs[0])
        if out in graph.outputs:
            graph.outputs[list(graph.outputs).index(out)] = add.outputs[0]
        return figures


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
