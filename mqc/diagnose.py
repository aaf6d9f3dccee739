"""``mqc diagnose``: where a compiled model's static activations lose accuracy, layer by layer and per modality.

Both models run in onnxruntime on the same inputs, with the values below as extra graph outputs. Per statically
quantized linear of the compiled graph (a ``MatMul``/``Gemm`` whose weight is a ``DequantizeLinear`` of an integer
initializer and whose input is a static fake-quant: ``QuantizeLinear -> DequantizeLinear`` or MSQ's
``Mul(Clip(Round(Div(X, s))), s)``), with ``X`` the layer's input as the compiled graph computes it and ``Ŵ`` its
dequantized weight, and per modality of the token rows:

- ``static_db``: SQNR of ``fq_static(X) @ Ŵ`` (the compiled layer, the fake-quantized input tapped from the graph)
  against ``X @ Ŵ``: what the layer's static activation scale alone costs.
- ``dynamic_db``: the same with a per-token symmetric absmax scale of the same width, computed here (a what-if: the
  gap to ``static_db`` is what per-token scales would buy at this layer).
- ``static_token_db`` / ``dynamic_token_db``: the median over rows of each row's own SQNR. The pooled figures above
  are dominated by the rows with the largest outputs, which with massive activations are the very tokens that set
  the range (and are quantized well); the median row is what an ordinary token suffers.
- ``vs_float_db``: the compiled model's layer output against the float model's output of the linear of the same
  name (everything upstream included). A function-preserving pass may have changed the output basis (an R1
  rotation makes o_proj and down_proj write into the rotated residual stream): when the two outputs' cosine
  similarity is under ``BASIS_COSINE`` the figure is left out with that reason.
- The tokens that set the range: the rows with the largest ``max |x|`` (sample, original position, what the token
  is, magnitude, as a fraction of the static clip ``scale * qmax`` it was quantized with), the share of rows beyond
  their clip, the distinct clips the rows saw, and the median row's ``max |x|`` as a fraction of its clip (the part
  of the int8 grid a typical token uses).

A scale is static when it does not depend on X: a constant, or a selection among constants by token masks (MSQ's
``Where(is_image, s_image, s_text)``, or more classes); it is tapped per row, so any such selection is read as the
graph computes it. A scale computed from X (per-token dynamic) is not diagnosed (listed as skipped).

AIFS permutes tokens inside the decoder; its permutation (``mqc_aifs_perm``) is tapped too, so every row is
reported at its original position. SQNR figures pool all rows of a modality over all samples (10 log10 of summed
signal over summed noise).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_INPUT, MODALITY_NAMES, TEXT, capture
from mqc.errors import InputModelError
from mqc.ir import constant_array, depends_on
from mqc.model_map import build_model_map
from mqc.plot import Panel, Series

#: Below this cosine similarity of the float and compiled layer outputs, the bases differ (module docstring).
BASIS_COSINE = 0.5
#: The AIFS permutation value (new position -> original position), ``passes/aifs.py``.
AIFS_PERMUTATION = "mqc_aifs_perm"
WEIGHT_SUFFIX = ".weight_dq"
FORMAT = "mqc-diagnose/1"
_BLOCK_NUMBER = re.compile(r"layers?\.(\d+)\.")


@dataclass
class Sample:
    """One input of the diagnosis: the feed, a description, and per position what the token is (may be empty)."""

    feed: dict[str, np.ndarray]
    name: str
    tokens: Sequence[str] = ()

    def token(self, position: int) -> str:
        return self.tokens[position] if position < len(self.tokens) else f"position {position}"


@dataclass
class QuantizedLayer:
    """A statically quantized linear of the compiled graph, as the diagnosis reads it."""

    name: str
    node: ir.Node
    weight: np.ndarray  # [in, out], dequantized
    bias: np.ndarray | None
    activation: ir.Value  # the float input X, before its fake-quant
    quantized: ir.Value  # fq_static(X), what the MatMul reads
    bits: int
    scale: ir.Value  # the scale each row is quantized with: a constant, or per row from static masks (MSQ)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def _initializer(value: ir.Value | None) -> np.ndarray | None:
    return constant_array(value) if value is not None else None


def _bits_of_zero_point(zero: np.ndarray | None) -> int:
    """The activation width a QuantizeLinear zero point implies (int8 when absent, as ONNX)."""
    if zero is None:
        return 8
    if zero.dtype.name in ("int4", "uint4"):
        return 4
    return 8 * zero.dtype.itemsize


def dequantized_weight(node: ir.Node) -> np.ndarray | None:
    """The float weight ``node`` reads, as [in, out], from ``DequantizeLinear(integer initializer)`` (possibly
    behind a Transpose); None when the weight is not a dequantized integer constant."""
    value = node.inputs[1]
    transposes = 0
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type == "Transpose":
        transposes += 1
        producer = producer.inputs[0].producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    q = _initializer(producer.inputs[0])
    scale = _initializer(producer.inputs[1])
    if q is None or scale is None or not _is_integer(q):
        return None
    zero = _initializer(producer.inputs[2]) if len(producer.inputs) > 2 else None
    axis = producer.attributes.get_int("axis", 1) % max(q.ndim, 1)
    block = producer.attributes.get_int("block_size", 0)

    def spread(param: np.ndarray) -> np.ndarray:
        """A scale or zero point broadcast to the weight's shape: per tensor, per axis, or per block on the axis."""
        param = param.astype(np.float32)
        if param.size == 1:
            return param.reshape(())
        if block:
            return np.repeat(param, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
        shape = [1] * q.ndim
        shape[axis] = -1
        return param.reshape(shape)

    x = q.astype(np.float32) - (spread(zero) if zero is not None else 0.0)
    weight = x * spread(scale)
    if transposes % 2:
        weight = weight.T
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        weight = weight.T
    return np.ascontiguousarray(weight, dtype=np.float32)


def _is_integer(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer) or array.dtype.name in ("int4", "uint4")


def _static_activation(value: ir.Value) -> tuple[ir.Value, int, ir.Value] | None:
    """(X, bits, scale value) of a static fake-quant producing ``value``, or None (float or dynamic activation).

    Static means the scale does not depend on X: a constant (``QuantizeLinear -> DequantizeLinear``), or a value
    computed from constants and token masks (MSQ's ``Where(is_image, s_image, s_text)`` and anything that selects
    among constants the same way)."""
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "DequantizeLinear":
        quant = producer.inputs[0].producer()
        scale = _initializer(producer.inputs[1])
        if quant is None or quant.op_type != "QuantizeLinear" or scale is None or scale.size != 1:
            return None
        zero = _initializer(producer.inputs[2]) if len(producer.inputs) > 2 else None
        return quant.inputs[0], _bits_of_zero_point(zero), producer.inputs[1]
    if producer.op_type != "Mul":  # Mul(Clip(Round(Div(X, s))), s)
        return None
    clip = producer.inputs[0].producer()
    rnd = clip.inputs[0].producer() if clip is not None and clip.op_type == "Clip" else None
    div = rnd.inputs[0].producer() if rnd is not None and rnd.op_type == "Round" else None
    if div is None or div.op_type != "Div" or div.inputs[1] is not producer.inputs[1]:
        return None
    qmax = _initializer(clip.inputs[2]) if len(clip.inputs) > 2 else None
    x, scale = div.inputs[0], producer.inputs[1]
    if qmax is None or depends_on(scale, x):
        return None
    return x, round(math.log2(float(qmax) + 1)) + 1, scale


def _layer_name(node: ir.Node) -> str:
    weight = node.inputs[1]
    if weight is not None and weight.name and weight.name.endswith(WEIGHT_SUFFIX):
        return weight.name.removesuffix(WEIGHT_SUFFIX)
    return node.name or "linear"


def _bias(node: ir.Node) -> np.ndarray | None:
    if node.op_type == "Gemm" and len(node.inputs) > 2:
        return _initializer(node.inputs[2])
    return None


def find_quantized_layers(model: ir.Model) -> tuple[list[QuantizedLayer], list[dict[str, str]]]:
    """Every statically quantized linear of ``model`` and, for quantized weights without a static activation
    quantizer (dynamic or float activations), the reason each is left out."""
    layers, skipped = [], []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = dequantized_weight(node)
        if weight is None:
            continue
        name = _layer_name(node)
        activation = _static_activation(node.inputs[0])
        if activation is None:
            skipped.append({"name": name, "reason": "its input has no static fake-quant (dynamic or float activation)"})
            continue
        x, bits, scale = activation
        layers.append(QuantizedLayer(name, node, weight, _bias(node), x, node.inputs[0], bits, scale))
    return layers, skipped


# ---------------------------------------------------------------------------------------------------- accumulation


@dataclass
class TopToken:
    absmax: float
    clip: float  # the clip of the scale this row was quantized with
    sample: int
    position: int
    token: str


@dataclass
class ModalityFigures:
    """Running sums of one layer over the rows of one modality."""

    signal: float = 0.0
    static_noise: float = 0.0
    dynamic_noise: float = 0.0
    float_signal: float = 0.0
    float_noise: float = 0.0
    float_dot: float = 0.0
    compiled_energy: float = 0.0
    rows: int = 0
    clipped: int = 0
    static_row_db: list[np.ndarray] = field(default_factory=list)
    dynamic_row_db: list[np.ndarray] = field(default_factory=list)
    row_absmax: list[np.ndarray] = field(default_factory=list)
    row_clip: list[np.ndarray] = field(default_factory=list)
    top: list[TopToken] = field(default_factory=list)

    def add(self, ref: np.ndarray, static: np.ndarray, dynamic: np.ndarray, absmax: np.ndarray,
            clip: np.ndarray) -> None:
        self.signal += float(np.sum(ref.astype(np.float64) ** 2))
        self.static_noise += float(np.sum((ref - static).astype(np.float64) ** 2))
        self.dynamic_noise += float(np.sum((ref - dynamic).astype(np.float64) ** 2))
        self.static_row_db.append(_row_db(ref, static))
        self.dynamic_row_db.append(_row_db(ref, dynamic))
        self.rows += ref.shape[0]
        self.clipped += int(np.sum(absmax > clip * (1 + 1e-6)))
        self.row_absmax.append(absmax)
        self.row_clip.append(clip)

    def add_float(self, float_out: np.ndarray, compiled_out: np.ndarray) -> None:
        f, c = float_out.astype(np.float64), compiled_out.astype(np.float64)
        self.float_signal += float(np.sum(f**2))
        self.float_noise += float(np.sum((f - c) ** 2))
        self.float_dot += float(np.sum(f * c))
        self.compiled_energy += float(np.sum(c**2))

    def keep_top(self, candidates: list[TopToken], count: int) -> None:
        self.top = sorted(self.top + candidates, key=lambda t: -t.absmax)[:count]

    def result(self) -> dict[str, Any]:
        absmax = np.concatenate(self.row_absmax) if self.row_absmax else np.zeros(0)
        clips = np.concatenate(self.row_clip) if self.row_clip else np.zeros(0)
        used = absmax / np.where(clips > 0, clips, np.inf)
        out: dict[str, Any] = {
            "rows": self.rows,
            "static_db": _db(self.signal, self.static_noise),
            "dynamic_db": _db(self.signal, self.dynamic_noise),
        }
        out["gap_db"] = _difference(out["dynamic_db"], out["static_db"])
        out["static_token_db"] = _median(self.static_row_db)
        out["dynamic_token_db"] = _median(self.dynamic_row_db)
        out["token_gap_db"] = _difference(out["dynamic_token_db"], out["static_token_db"])
        if self.float_signal > 0.0:
            cosine = self.float_dot / math.sqrt(self.float_signal * max(self.compiled_energy, 1e-30))
            out["vs_float_cosine"] = round(cosine, 4)
            out["vs_float_db"] = _db(self.float_signal, self.float_noise) if cosine >= BASIS_COSINE else None
        out.update({
            "clips": _distinct(clips),
            "clipped_rows": self.clipped,
            "median_row_absmax_of_clip": _round(float(np.median(used)), 4) if used.size else None,
            "top_tokens": [{"sample": t.sample, "position": t.position, "token": t.token,
                            "absmax": _round(t.absmax, 4), "of_clip": _round(t.absmax / t.clip, 3) if t.clip > 0
                            else None} for t in self.top],
        })
        return out


def _row_db(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    signal = np.sum(ref.astype(np.float64) ** 2, axis=-1)
    noise = np.sum((ref - out).astype(np.float64) ** 2, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(signal / noise)


def _median(parts: list[np.ndarray]) -> float | None:
    values = np.concatenate(parts) if parts else np.zeros(0)
    values = values[np.isfinite(values)]
    return _round(float(np.median(values))) if values.size else None


def _distinct(values: np.ndarray, most: int = 8) -> list[float] | None:
    """The distinct clips the rows saw (one per static token class), or None if there are many."""
    distinct = np.unique(np.round(values, 6))
    return [float(v) for v in distinct] if distinct.size <= most else None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else _round(a - b)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _db(signal: float, noise: float) -> float | None:
    if signal <= 0.0:
        return None
    return _round(10.0 * math.log10(signal / noise)) if noise > 0.0 else None


def dynamic_fake_quant(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-row symmetric absmax fake-quant (round half to even, as QuantizeLinear)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / qmax, 1e-12).astype(np.float32)
    return (np.clip(np.rint(x / scale), -qmax - 1, qmax) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- one graph


class GraphDiagnosis:
    """Runs a compiled graph (and its float original, if given) over samples and accumulates the figures."""

    def __init__(self, compiled: ir.Model, float_model: ir.Model | None, default_modality: int = TEXT,
                 top: int = 3, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.layers, self.skipped = find_quantized_layers(compiled)
        if not self.layers:
            raise InputModelError(
                "no statically quantized linear layer in the compiled graph (diagnose reads the qdq format with "
                "static activation scales; a --format mqc graph or dynamic activations have none)")
        self.compiled = compiled
        self.float_model = float_model
        self.default_modality = default_modality
        self.top = top
        self.providers = list(providers)
        self.figures: dict[tuple[str, str], ModalityFigures] = {}
        self.float_outputs = self._float_outputs(float_model)
        self.output_figures = ModalityFigures()
        self.samples: list[str] = []

    def _float_outputs(self, float_model: ir.Model | None) -> dict[str, str]:
        """Layer name -> the float model's output value of the linear of that name."""
        if float_model is None:
            return {}
        by_name = {lin.name: lin.output.name for lin in build_model_map(float_model).linears}
        return {layer.name: by_name[layer.name] for layer in self.layers if layer.name in by_name}

    def run(self, samples: Sequence[Sample], progress: Callable[[], None] | None = None) -> None:
        graph_values = {v.name for node in self.compiled.graph for v in node.outputs}
        permutation = [AIFS_PERMUTATION] if AIFS_PERMUTATION in graph_values else []
        output = self.compiled.graph.outputs[0].name
        scales = [layer.scale.name for layer in self.layers if _initializer(layer.scale) is None]
        taps = list(dict.fromkeys([*(v for layer in self.layers for v in (layer.activation.name,
                                                                            layer.quantized.name)),
                                   *scales, *permutation]))
        float_taps = list(dict.fromkeys(self.float_outputs.values()))
        compiled_outputs = list(dict.fromkeys([*(layer.node.outputs[0].name for layer in self.layers), output]))
        taps = list(dict.fromkeys(taps + compiled_outputs))
        float_runs = (capture(self.float_model, [*float_taps, output], [s.feed for s in samples], self.providers)
                      if self.float_model is not None else iter(()))
        for index, (sample, (feed, values)) in enumerate(zip(samples, capture(self.compiled, taps,
                                                                              [s.feed for s in samples],
                                                                              self.providers), strict=True)):
            tapped = dict(zip(taps, values, strict=True))
            reference = dict(zip([*float_taps, output], next(float_runs)[1], strict=True)) if self.float_model else {}
            rows = _RowLayout(feed, tapped.get(AIFS_PERMUTATION), self.default_modality)
            self._accumulate(index, sample, rows, tapped, reference)
            if reference:
                self._accumulate_output(tapped[output], reference[output])
            self.samples.append(sample.name)
            if progress is not None:
                progress()

    def _accumulate(self, index: int, sample: Sample, rows: _RowLayout, tapped: dict[str, np.ndarray],
                    reference: dict[str, np.ndarray]) -> None:
        for layer in self.layers:
            x, positions, modality, keep = rows.flatten(tapped[layer.activation.name])
            xq = rows.flatten(tapped[layer.quantized.name])[0]
            clip = self._row_clip(layer, rows, tapped, x.shape[0])
            float_out = reference.get(self.float_outputs.get(layer.name, ""))
            compiled_out = rows.flatten(tapped[layer.node.outputs[0].name])[0] if float_out is not None else None
            float_rows = rows.flatten(float_out, permuted=False)[0] if float_out is not None else None
            for m in np.unique(modality[keep]):
                name = MODALITY_NAMES.get(int(m), str(m))
                select = keep & (modality == m)
                xm = x[select]
                ref = xm @ layer.weight
                static = xq[select] @ layer.weight
                dynamic = dynamic_fake_quant(xm, layer.bits) @ layer.weight
                absmax = np.abs(xm).max(axis=-1)
                figures = self.figures.setdefault((layer.name, name), ModalityFigures())
                figures.add(ref, static, dynamic, absmax, clip[select])
                if float_rows is not None and float_rows.shape == compiled_out.shape:
                    figures.add_float(float_rows[select], compiled_out[select])
                order = np.argsort(-absmax)[: self.top]
                chosen = positions[select][order]
                clips = clip[select][order]
                figures.keep_top([TopToken(float(absmax[i]), float(c), index, int(p), sample.token(int(p)))
                                  for i, c, p in zip(order, clips, chosen, strict=True)], self.top)

    @staticmethod
    def _row_clip(layer: QuantizedLayer, rows: _RowLayout, tapped: dict[str, np.ndarray], count: int) -> np.ndarray:
        """The clip (scale * qmax) each row was quantized with, in original token order."""
        constant = _initializer(layer.scale)
        if constant is not None:
            return np.full(count, float(constant.reshape(-1)[0]) * layer.qmax, np.float64)
        scale = tapped[layer.scale.name]
        per_row = rows.flatten(scale)[0].reshape(-1) if scale.ndim >= 2 and scale.shape[-1] == 1 else scale.reshape(-1)
        return np.broadcast_to(per_row.astype(np.float64), (count,)) * layer.qmax

    def _accumulate_output(self, compiled: np.ndarray, reference: np.ndarray) -> None:
        if compiled.shape == reference.shape:
            self.output_figures.add_float(reference, compiled)

    def result(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            modalities = {name: self.figures[(layer.name, name)].result()
                          for name in (MODALITY_NAMES[TEXT], MODALITY_NAMES[IMAGE])
                          if (layer.name, name) in self.figures}
            layers.append({"name": layer.name, "a_bits": layer.bits, "scale": layer.scale.name,
                           "float_layer": layer.name in self.float_outputs, "modalities": modalities})
        out: dict[str, Any] = {"samples": self.samples, "layers": layers, "skipped": self.skipped}
        if self.output_figures.float_signal > 0.0:
            out["output"] = {"name": self.compiled.graph.outputs[0].name,
                             "vs_float_db": _db(self.output_figures.float_signal, self.output_figures.float_noise)}
        return out


class _RowLayout:
    """Maps tapped [batch, seq, features] arrays to token rows: original positions (undoing AIFS), modality, and
    which rows are real tokens (not padding)."""

    def __init__(self, feed: dict[str, np.ndarray], permutation: np.ndarray | None, default_modality: int) -> None:
        self.permutation = permutation
        self.modality_ids = feed.get(MODALITY_INPUT)
        self.mask = feed.get("attention_mask")
        self.default_modality = default_modality

    def flatten(self, array: np.ndarray, permuted: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rows [N, features], original position, modality id, keep) of ``array``, in original token order."""
        if array.ndim == 3 and permuted and self.permutation is not None and self.permutation.shape == array.shape[:2]:
            restored = np.empty_like(array)
            for b in range(array.shape[0]):
                restored[b, self.permutation[b]] = array[b]
            array = restored
        lead = array.shape[:-1]
        rows = array.reshape(-1, array.shape[-1])
        positions = np.broadcast_to(np.arange(lead[-1]), lead).reshape(-1) if lead else np.zeros(1, np.int64)
        if self.modality_ids is not None and tuple(self.modality_ids.shape) == tuple(lead):
            modality = self.modality_ids.reshape(-1).astype(np.int64)
        else:
            modality = np.full(rows.shape[0], self.default_modality, np.int64)
        keep = np.ones(rows.shape[0], bool)
        if self.mask is not None and len(lead) == 2 and self.mask.shape[0] == lead[0] and self.mask.shape[1] >= lead[1]:
            keep = self.mask[:, -lead[1]:].reshape(-1) != 0
        return rows, positions, modality, keep


# ------------------------------------------------------------------------------------------------- files, folders


def diagnose_file(float_path: Path | None, compiled_path: Path, samples: Sequence[Sample],
                  default_modality: int = TEXT, top: int = 3, progress: Callable[[], None] | None = None
                  ) -> dict[str, Any]:
    """The diagnosis of one compiled graph against its float original (``float_path`` may be None)."""
    from mqc.ir import load_model

    compiled = load_model(compiled_path)
    float_model = load_model(float_path) if float_path is not None else None
    diagnosis = GraphDiagnosis(compiled, float_model, default_modality, top)
    diagnosis.run(samples, progress)
    return diagnosis.result()


def diagnose(float_source: str | Path, compiled: str | Path, num_samples: int = 8, offset: int = 0,
             calib: Path | None = None, top: int = 3, progress: Callable[[str, int], Callable[[], None]] | None = None,
             components: Sequence[str] = ()) -> dict[str, Any]:
    """Diagnose a compiled model folder against its float folder (validation samples; only ``components`` if
    given) or a compiled .onnx against its float .onnx (``calib`` samples, else synthetic inputs)."""
    from mqc.calibration import load_feeds, random_feeds
    from mqc.compiler import is_model_dir
    from mqc.ir import load_model

    compiled = Path(compiled)
    if is_model_dir(compiled):
        return _diagnose_folder(float_source, compiled, num_samples, offset, top, progress, components)
    float_path = Path(float_source)
    if not float_path.is_file() or not compiled.is_file():
        raise InputModelError(f"give two model folders or two .onnx files (float, then compiled): {float_source}, "
                              f"{compiled}")
    model = load_model(float_path)
    feeds = load_feeds(calib, model, limit=num_samples) if calib is not None else random_feeds(model, num_samples)
    origin = str(calib) if calib is not None else "synthetic inputs (random_feeds)"
    samples = [Sample(feed, f"{origin} #{i}") for i, feed in enumerate(feeds)]
    tick = progress(compiled.name, len(samples)) if progress is not None else None
    return {"format": FORMAT, "float": str(float_path), "compiled": str(compiled), "inputs": origin,
            "components": {compiled.name: diagnose_file(float_path, compiled, samples, TEXT, top, tick)}}


def _diagnose_folder(float_source: str | Path, compiled: Path, num_samples: int, offset: int, top: int,
                     progress: Callable[[str, int], Callable[[], None]] | None, only: Sequence[str]
                     ) -> dict[str, Any]:
    from mqc.packages import component_paths, package_hooks, read_manifest

    hooks = package_hooks()
    if hooks.validation_feeds is None:
        raise InputModelError("diagnosing a model folder needs its package's validation samples (mqc.models)")
    try:
        float_dir = Path(hooks.resolve(str(float_source)))
    except FileNotFoundError as exc:
        raise InputModelError(str(exc)) from exc
    manifest = read_manifest(compiled)
    compiled_files = component_paths(compiled, manifest)
    float_files = component_paths(float_dir, read_manifest(float_dir))
    components = (manifest.get("compiled") or {}).get("components")
    if not components:
        raise InputModelError(f"{compiled} is not a compiled model folder (its manifest names no compiled component)")
    unknown = sorted(set(only) - set(components))
    if unknown:
        raise InputModelError(f"{compiled} has no compiled component {unknown} (it has {components})")
    components = [c for c in components if not only or c in only]
    result: dict[str, Any] = {"format": FORMAT, "float": str(float_dir), "compiled": str(compiled),
                              "inputs": f"validation split, {num_samples} samples from offset {offset}",
                              "components": {}}
    for component in components:
        file = compiled_files[component]
        labelled = hooks.validation_feeds(float_dir, component, num_samples, offset)
        samples = [Sample(f.feed, f.sample, f.tokens) for f in labelled]
        tick = progress(component, len(samples)) if progress is not None else None
        modality = IMAGE if component == "vision" else TEXT
        result["components"][file.name] = diagnose_file(float_files[component], file, samples, modality, top, tick)
    return result


# ------------------------------------------------------------------------------------------------------- rendering


def render(result: dict[str, Any], console, worst: int = 10) -> None:
    """Text form: per component, the layers where static scales cost the median token most against per-token
    scales, then every layer."""
    from rich.table import Table

    console.print(f"[bold]mqc diagnose[/bold] {result['compiled']} against {result['float']} on {result['inputs']}")
    for component, entry in result["components"].items():
        rows = [(layer, modality, figures) for layer in entry["layers"]
                for modality, figures in layer["modalities"].items()]
        output = entry.get("output")
        head = f"{component}: {len(entry['layers'])} static layers, {len(entry['samples'])} samples"
        if output and output.get("vs_float_db") is not None:
            head += f", output {output['name']} {output['vs_float_db']:.1f} dB against float"
        if entry["skipped"]:
            head += f", {len(entry['skipped'])} quantized layers without static activations left out"
        console.print(head)
        ranked = sorted((r for r in rows if r[2]["token_gap_db"] is not None),
                        key=lambda r: -r[2]["token_gap_db"])[:worst]
        console.print(_table(Table(title=f"{component}: the {len(ranked)} largest static-vs-dynamic gaps of the "
                                         "median token"), ranked))
        console.print(_table(Table(title=f"{component}: every layer"), rows))


def plot_panels(result: dict[str, Any]) -> list[Panel]:
    """One panel per component: the median token's output SQNR of every static layer, in graph order, with its
    static scales (solid) and with per-token dynamic scales (dashed what-if), per modality."""
    panels = []
    for component, entry in result["components"].items():
        layers = entry["layers"]
        series = []
        for color, modality in enumerate((MODALITY_NAMES[TEXT], MODALITY_NAMES[IMAGE])):
            if not any(modality in layer["modalities"] for layer in layers):
                continue
            for key, kind, dashed in (("static_token_db", "static", False), ("dynamic_token_db", "dynamic", True)):
                points = [(float(i), layer["modalities"].get(modality, {}).get(key)) for i, layer in enumerate(layers)]
                series.append(Series(f"{modality}, {kind} scales", points, color, dashed))
        panels.append(Panel(f"{component}: median-token output SQNR per static layer", "quantized layer (graph order)",
                            "SQNR dB", series, _block_ticks(layers)))
    return panels


def _block_ticks(layers: list[dict[str, Any]], most: int = 16) -> list[tuple[float, str]] | None:
    """x ticks at the first linear of every k-th numbered block (``layers.N.``), or None without block numbers."""
    first: dict[int, int] = {}
    for index, layer in enumerate(layers):
        found = _BLOCK_NUMBER.search(layer["name"])
        if found:
            first.setdefault(int(found.group(1)), index)
    if not first:
        return None
    every = max(1, math.ceil(len(first) / most))
    return [(float(index), f"L{block}") for block, index in sorted(first.items()) if block % every == 0]


def _table(table, rows) -> Any:
    for column in ("layer", "mod", "static dB", "dynamic dB", "gap", "token static", "token dyn", "vs float dB",
                   "clipped", "median/clip", "largest token (|x|, x clip)"):
        table.add_column(column, justify="left" if column in ("layer", "mod", "largest token (|x|, x clip)")
                         else "right")

    def f(value, fmt=".1f"):
        return "-" if value is None else format(value, fmt)

    for layer, modality, fig in rows:
        top = fig["top_tokens"][0] if fig["top_tokens"] else None
        token = "-" if top is None else f"#{top['sample']} {top['token']} ({top['absmax']:.3g}, {f(top['of_clip'], '.2f')})"
        table.add_row(layer["name"], modality, f(fig["static_db"]), f(fig["dynamic_db"]), f(fig["gap_db"]),
                      f(fig["static_token_db"]), f(fig["dynamic_token_db"]), f(fig.get("vs_float_db")), f"{fig['clipped_rows']}/{fig['rows']}",
                      f(fig["median_row_absmax_of_clip"], ".3f"), token)
    return table
