"""The two quantization strategies every quantizing pass uses: one weight rounder and one activation quantizer.

:class:`WeightRounding` rounds a float weight [in, out] to a symmetric integer grid: round to nearest or GPTQ
(``method``), per output channel or per group of ``group_size`` input rows, optionally with the MSE clip search of
the scales (spec/algorithms.md §1, §2.6). :class:`ActivationQuantizer` inserts the fake-quant of one activation
value in front of its readers, in one of three forms (spec §1, §2.3, §3.6):

- ``"static"``: one static per-tensor scale from the calibration range of all rows (``QuantizeLinear`` ->
  ``DequantizeLinear``, :func:`mqc.graph.qdq.insert_activation_qdq`);
- ``"per_modality"``: one static scale per modality, selected per token from ``modality_ids`` (MSQ,
  :mod:`mqc.graph.msq`); without a ``modality_ids`` input, or on a value that is not [batch, seq, features], it
  is the static form with the scale of the rows present (the caller records why);
- ``"dynamic"``: a per-token scale computed in the graph (:func:`mqc.graph.qdq.insert_activation_dynamic`).

Both are small frozen objects built from a pass's typed parameters (:meth:`WeightRounding.from_params`,
:meth:`ActivationQuantizer.from_params`), so what a recipe writes is all that decides the rounding. The sink class of
``sink_scales`` is a later rewrite of the per-modality form's scale selection, not a fourth form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_NAMES, TEXT, TapStats
from mqc.gptq import gptq_quantize_readers, refit_scales, relative_output_error
from mqc.graph.msq import insert_activation_msq, value_rank
from mqc.graph.qdq import dynamic_fake_quant, insert_activation_dynamic, insert_activation_qdq
from mqc.quantizer import QuantizedWeight, fake_quantize, qrange, quantize_weight_rtn, weight_scales

ActForm = Literal["static", "per_modality", "dynamic"]
#: The static scale(s) an inserted quantizer uses: one scale, one per modality, or None (dynamic).
ActScale = float | dict[int, float] | None


@dataclass(frozen=True)
class WeightRounding:
    """Symmetric weight rounding: ``method`` rtn or gptq, per channel (``group_size=None``) or per group."""

    bits: int
    method: Literal["rtn", "gptq"] = "rtn"
    group_size: int | None = None
    mse_clip: bool = False
    act_order: bool = True
    percdamp: float = 0.01
    block_size: int = 128
    group_scales: Literal["static", "dynamic"] = "static"
    scale_refit: int = 0

    @classmethod
    def from_params(cls, params: Any, method: str = "rtn") -> WeightRounding:
        """The rounding a pass's parameters describe (the GPTQ settings where the parameters have them)."""
        return cls(
            bits=params.weight_bits, method=method, group_size=params.group_size,  # type: ignore[arg-type]
            mse_clip=getattr(params, "weight_mse_clip", False), act_order=getattr(params, "act_order", True),
            percdamp=getattr(params, "percdamp", 0.01), block_size=getattr(params, "block_size", 128),
            group_scales=getattr(params, "group_scales", "static"), scale_refit=getattr(params, "scale_refit", 0),
        )

    def group_for(self, in_features: int) -> int | None:
        """The group size for a weight of ``in_features`` rows: per channel (None) where the group does not divide
        it (callers note it)."""
        if self.group_size is not None and in_features % self.group_size:
            return None
        return self.group_size

    def group_note(self, name: str, in_features: int) -> str | None:
        """The note a caller records when :meth:`group_for` fell back to per channel, else None."""
        if self.group_for(in_features) == self.group_size:
            return None
        return f"{name}: input size {in_features} is not a multiple of group size {self.group_size}: per-channel weights"

    def rtn(self, weight: np.ndarray, group_size: int | None = None) -> QuantizedWeight:
        """Round to nearest with this rounding's scales (``group_size`` overrides the strategy's, e.g. None)."""
        return quantize_weight_rtn(weight, self.bits, group_size, self.mse_clip)

    def round(self, weight: np.ndarray, hessian: np.ndarray | None = None,
              group_size: int | None = None) -> tuple[QuantizedWeight, dict[str, Any]]:
        """``weight`` rounded by ``method``; GPTQ against ``hessian`` (H = 2/n·Σxᵀx), with its and RTN's relative
        output error under the same scales. Raises ValueError when GPTQ cannot run (no or singular Hessian)."""
        if self.method == "rtn":
            return self.rtn(weight, group_size), {"weight_method": "rtn"}
        return self.round_readers([weight], hessian, group_size)[0]

    def round_readers(self, weights: Sequence[np.ndarray], hessian: np.ndarray | None,
                      group_size: int | None = None) -> list[tuple[QuantizedWeight, dict[str, Any]]]:
        """GPTQ of several weights that read one input, each exactly as :meth:`round` alone, the Hessian factored
        once (:func:`mqc.gptq.gptq_quantize_readers`)."""
        if hessian is None:
            raise ValueError("GPTQ needs a Hessian and no calibration row reached the input")
        scales = [weight_scales(weight, self.bits, group_size, self.mse_clip) for weight in weights]
        rounded = gptq_quantize_readers(weights, hessian, self.bits, group_size, act_order=self.act_order,
                                        percdamp=self.percdamp, block_size=self.block_size, scales=scales,
                                        group_scales=self.group_scales if group_size is not None else "static")
        results = []
        for weight, scale, (qweight, rel) in zip(weights, scales, rounded, strict=True):
            rtn = quantize_weight_rtn(weight, self.bits, group_size, scale=scale)
            rtn_rel = relative_output_error(weight, rtn.dequantize(), hessian)
            figures = {"weight_method": "gptq", "gptq_rel_error": round(rel, 5), "rtn_rel_error": round(rtn_rel, 5)}
            if self.scale_refit:
                qweight, refit_rel = self._refit(weight, qweight, rel, hessian, group_size)
                figures.update(gptq_rel_error=round(refit_rel, 5), gptq_rel_error_unrefit=round(rel, 5))
            results.append((qweight, figures))
        return results

    def _refit(self, weight: np.ndarray, qweight: QuantizedWeight, rel: float, hessian: np.ndarray,
               group_size: int | None) -> tuple[QuantizedWeight, float]:
        """``scale_refit`` rounds of least-squares scales for GPTQ's codes (:func:`mqc.gptq.refit_scales`), each
        after a GPTQ run with the last round's scales; the weight with the lowest output error of all rounds."""
        best, best_rel = qweight, rel
        for round_ in range(self.scale_refit):
            if round_:  # codes chosen again under the scales the last round fitted
                (qweight, _), = gptq_quantize_readers([weight], hessian, self.bits, group_size,
                                                       act_order=self.act_order, percdamp=self.percdamp,
                                                       block_size=self.block_size,
                                                       scales=[qweight.scale.reshape(-1, qweight.q.shape[1])])
            qweight = refit_scales(weight, qweight, hessian)
            refit_rel = relative_output_error(weight, qweight.dequantize(), hessian)
            if refit_rel < best_rel:
                best, best_rel = qweight, refit_rel
        return best, best_rel


@dataclass
class InsertedActivation:
    """What :meth:`ActivationQuantizer.insert` put in the graph: the scale(s) it used, the figures to record, and
    the notes and the per-value fallback (why per_modality became one static scale) for the caller's record."""

    form: ActForm
    scale: ActScale
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fallback: str | None = None


@dataclass(frozen=True)
class ActivationQuantizer:
    """One activation fake-quant form (module docstring) with its static range method."""

    form: ActForm
    bits: int = 8
    method: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99

    @classmethod
    def from_params(cls, params: Any) -> ActivationQuantizer:
        """``acts`` dynamic or static; static scales shared or per modality (``act_scales``, per modality where a
        pass has no such key: MASQuant's static form)."""
        if params.acts == "dynamic":
            form: ActForm = "dynamic"
        else:
            form = "per_modality" if getattr(params, "act_scales", "per_modality") == "per_modality" else "static"
        return cls(form, params.act_bits, getattr(params, "act_method", "minmax"), getattr(params, "act_percentile", 99.99))

    def insert(self, graph: ir.Graph, value: ir.Value, readers: Sequence[ir.Node], tap: TapStats | None,
               is_image: ir.Value | None, default_modality: int = TEXT, any_rank: bool = False) -> InsertedActivation:
        """Quantize ``value`` in front of ``readers`` (all reading it) from the calibration statistics ``tap``.

        ``is_image`` is MSQ's per-token mask (None: the graph has one modality). ``any_rank`` takes the per-modality
        form on a value of unknown or other rank too (MAS's smoothed values, whose rank MAS guarantees).
        """
        if self.form == "dynamic":
            insert_activation_dynamic(graph, value, self.bits, readers)
            return InsertedActivation("dynamic", None)
        assert tap is not None, "a static activation quantizer needs calibration statistics"
        combined = tap.combined()
        qmax = qrange(self.bits)[1]
        clip = combined.clip_value(self.method, self.bits, self.percentile)
        scale = clip / qmax
        figures: dict[str, Any] = {"act_scale": float(scale), "act_absmax": float(combined.absmax),
                                   "act_clip_ratio": round(clip / combined.absmax, 4)}
        result = InsertedActivation("static", scale, figures)
        if self.form == "per_modality":
            if is_image is None:  # one modality: its statistics are all the rows
                figures["act_scale_" + str(MODALITY_NAMES.get(default_modality, "text"))] = float(scale)
            elif not any_rank and value_rank(value) != 3:
                result.fallback = (f"MSQ needs a [batch, seq, features] input, this one has rank {value_rank(value)}: "
                                   "shared per-tensor scale used")
            else:
                scales = self._modality_scales(value.name or "act", tap, qmax, result.notes)
                insert_activation_msq(graph, value, scales[TEXT], scales[IMAGE], self.bits, readers, is_image)
                return InsertedActivation("per_modality", scales, {
                    "act_scale_text": scales[TEXT], "act_scale_image": scales[IMAGE],
                    "act_absmax": float(combined.absmax)}, result.notes)
        insert_activation_qdq(graph, value, scale, self.bits, readers)
        return result

    def insert_scale(self, graph: ir.Graph, value: ir.Value, readers: Sequence[ir.Node], scale: float) -> None:
        """The static form with a scale the caller computed (one channel's range, e.g. rms_split's side branch)."""
        if self.form != "static":
            raise ValueError(f"a given scale needs the static form, not {self.form}")
        insert_activation_qdq(graph, value, scale, self.bits, readers)

    def _modality_scales(self, value_name: str, tap: TapStats, qmax: int, notes: list[str]) -> dict[int, float]:
        """One static scale per modality (spec §2.3); a modality without rows borrows the other's (noted)."""
        scales: dict[int, float] = {}
        for modality in (TEXT, IMAGE):
            entry = tap.modality(modality)
            if entry is not None and entry.absmax > 0.0:
                scales[modality] = float(entry.clip_value(self.method, self.bits, self.percentile) / qmax)
        for modality, other in ((TEXT, IMAGE), (IMAGE, TEXT)):
            if modality not in scales:
                scales[modality] = scales[other]
                notes.append(f"MSQ {value_name}: no {MODALITY_NAMES[modality]} calibration rows, "
                             f"{MODALITY_NAMES[modality]} tokens use the {MODALITY_NAMES[other]} scale")
        return scales

    def fake(self, x: np.ndarray, modality: int, scale: ActScale) -> np.ndarray:
        """numpy reference of the inserted quantizer on rows ``x`` of ``modality`` (float32, as the graph)."""
        if scale is None:
            return dynamic_fake_quant(x, self.bits)
        if isinstance(scale, Mapping):
            scale = scale.get(modality, scale.get(TEXT, 1.0))
        return fake_quantize(x, scale, self.bits)

