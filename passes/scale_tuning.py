"""Scale tuning: the integer weights' scales trained end to end against the float model, their codes fixed (issue 14:
on the packaged tiny VLM the int4 weights, not the static activations, set the remaining perplexity loss of the
static W4A8 decoder; an extension beyond MQuant and MASQuant, after EfficientQAT's E2E-QP, arXiv 2407.11062, which
trains only the quantization step sizes, end to end, once the integer weights are fixed).

GPTQ chooses each linear's codes and scales for that linear's own output error; the errors of 200 linears then add up
through the residual stream. This pass keeps every integer code and trains the scales of all quantized weights
together, on what the model finally computes: its next-token distribution against the float model's.

Rules:
1. Input: a quantized graph whose linears read ``DequantizeLinear(integer initializer, float scale)`` (per channel
   or per group of input rows, possibly behind a ``Transpose``), a graph output ``logits`` and the compile's float
   reference (the source model: same inputs, same ``logits``). The replay starts at the decoder's hidden states: the
   ``inputs_embeds`` input, or the output of the embedding lookup that reads ``input_ids``.
2. The graph from there to ``logits`` is replayed in torch (:mod:`mqc.torch_replay`): the graph's own ops, static
   activation fake-quant with straight-through rounding, and every value that does not depend on the hidden states
   (masks, rotary tables, modality and sink scales, empty caches) captured from onnxruntime per sample. Before any
   training the replay of the unchanged graph is compared with onnxruntime's logits on the first samples; a KL above
   ``replay_tolerance`` refuses the pass. The two never agree exactly: torch and onnxruntime sum in different orders,
   a value within a rounding error of a code boundary rounds the other way, and a code flipped at a coarse static
   scale (the sink row) moves every later token. On the packaged VLM decoder that costs KL 0.025 (the compiled
   model's own KL to float is about 0.09), while every op's output matches onnxruntime's to float precision.
3. Each weight scale s becomes s·exp(θ), θ one number per scale element, starting at 0; the codes stay. Loss: the
   KL divergence of the compiled model's next-token distribution from the float reference's, averaged over the text
   positions of a calibration sample (image positions predict nothing); Adam, ``epochs`` passes over the samples in
   a seeded order, one sample per step.
4. The tuned scales are kept only if onnxruntime's mean KL over all calibration samples went down with them (the
   replay is a guide, the compiled graph decides; both figures recorded, with each linear's median and largest scale
   change); otherwise the graph is left as it was.
5. Not function-preserving: it changes the weights' scales. The graph stays static: only constants change, so
   ``--format mqc`` lowers the tuned scales like any others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import MODALITY_INPUT, TEXT
from mqc.ir import constant_array, replace_initializer
from mqc.pass_manager import MqcPass, declare_fatal
from mqc.torch_replay import GraphSlice

LOGITS = "logits"
#: How the linear quantizers name a weight's DequantizeLinear: ``<linear>/weight_dequant``.
WEIGHT_DEQUANT_SUFFIX = "/weight_dequant"
#: Samples the replay of the unchanged graph is compared with onnxruntime on (rule 2).
REPLAY_CHECK_SAMPLES = 2


@dataclass
class _Weight:
    """One dequantized weight the replay reads: its codes, its scale initializer and how they make [in, out]."""

    name: str  # the linear's name, as the quantizer's layer rows have it
    value: ir.Value  # what the MatMul reads
    scale: ir.Value  # the DequantizeLinear's scale initializer
    codes: np.ndarray  # float32, the integer codes in the DequantizeLinear's layout
    axis: int
    block: int
    transposed: bool


def _dequantized_weights(nodes: list[ir.Node]) -> list[_Weight]:
    """The weights of the slice's MatMuls that are ``DequantizeLinear`` of integer codes (rule 1)."""
    found: dict[str, _Weight] = {}
    for node in nodes:
        if node.op_type != "MatMul" or node.inputs[1] is None or node.inputs[1].name in found:
            continue
        value, producer, transposes = node.inputs[1], node.inputs[1].producer(), 0
        while producer is not None and producer.op_type == "Transpose":
            transposes += 1
            producer = producer.inputs[0].producer()
        if producer is None or producer.op_type != "DequantizeLinear" or len(producer.inputs) < 2:
            continue
        codes, scale = constant_array(producer.inputs[0]), constant_array(producer.inputs[1])
        if codes is None or scale is None or codes.ndim != 2 or not np.issubdtype(scale.dtype, np.floating):
            continue
        if not (np.issubdtype(codes.dtype, np.integer) or codes.dtype.name in ("int4", "uint4")):
            continue
        zero = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
        if zero is not None and np.any(zero.astype(np.int64) != 0):
            continue
        name = producer.name.removesuffix(WEIGHT_DEQUANT_SUFFIX) if producer.name else value.name
        found[value.name] = _Weight(name, value, producer.inputs[1], codes.astype(np.float32),
                                    producer.attributes.get_int("axis", 1) % 2,
                                    producer.attributes.get_int("block_size", 0), bool(transposes % 2))
    return list(found.values())


def _hidden_input(graph: ir.Graph) -> ir.Value | None:
    """Where the decoder's hidden states start (rule 1)."""
    inputs = {v.name: v for v in graph.inputs}
    if "inputs_embeds" in inputs:
        return inputs["inputs_embeds"]
    ids = inputs.get("input_ids")
    if ids is None:
        return None
    lookup = next((u.node for u in ids.uses() if u.node.op_type == "Gather" and u.idx == 1), None)
    return lookup.outputs[0] if lookup is not None else None


class _TunedWeights:
    """θ per weight scale, and the torch weights [in, out] they give (rule 3)."""

    def __init__(self, weights: list[_Weight], granularity: str = "scale") -> None:
        """``granularity``: one θ per scale element (``scale``), or per output channel, shared by its groups."""
        import torch

        self.weights = weights
        self.codes = [torch.from_numpy(w.codes) for w in weights]
        self.scales = [torch.from_numpy(np.array(constant_array(w.scale), np.float32)) for w in weights]
        self.theta = [torch.nn.Parameter(torch.zeros(self._theta_shape(w, s, granularity)))
                      for w, s in zip(weights, self.scales, strict=True)]

    @staticmethod
    def _theta_shape(weight: _Weight, scale: Any, granularity: str) -> tuple[int, ...]:
        shape = list(scale.shape)
        if granularity == "channel" and weight.block and len(shape) == 2:
            shape[weight.axis] = 1  # the groups of a channel lie along the blocked axis
        return tuple(shape)

    def _spread(self, w: _Weight, scale: Any) -> Any:
        if scale.dim() == 0:
            return scale
        if w.block:
            return scale.repeat_interleave(w.block, dim=w.axis).narrow(w.axis, 0, w.codes.shape[w.axis])
        return scale.reshape([-1, 1] if w.axis == 0 else [1, -1])

    def tensors(self) -> dict[str, Any]:
        import torch

        out = {}
        for w, codes, scale, theta in zip(self.weights, self.codes, self.scales, self.theta, strict=True):
            weight = codes * self._spread(w, scale * torch.exp(theta))
            out[w.value.name] = weight.T if w.transposed else weight
        return out

    def tuned_scales(self) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            return [(s * torch.exp(t)).numpy() for s, t in zip(self.scales, self.theta, strict=True)]


def _text_positions(feed: dict[str, np.ndarray], length: int) -> np.ndarray:
    """Indices of the positions whose next-token prediction counts: the text tokens (all when no modality input)."""
    modality = feed.get(MODALITY_INPUT)
    if modality is None:
        return np.arange(length)
    return np.flatnonzero(np.asarray(modality).reshape(-1)[-length:] == TEXT)


def _rows(logits: Any, rows: Any) -> Any:
    """The given positions' rows of [batch, seq, vocab] logits (numpy or torch), as a torch [rows, vocab]."""
    import torch

    logits = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
    return logits.reshape(-1, logits.shape[-1])[rows]


def _kl(logits: Any, reference: Any) -> Any:
    """Mean over rows of KL(reference || logits), both [rows, vocab]."""
    import torch

    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


class ScaleTuningPass(MqcPass):
    """Train every integer weight's scales end to end on the KL to the float model, codes fixed (module docstring)."""

    name = "scale_tuning"
    fatal_skips = declare_fatal(
        no_reference="the compile has no float reference model to tune against",
        no_logits="the graph has no 'logits' output",
        no_hidden_input="the graph has neither an inputs_embeds input nor an embedding lookup of input_ids",
        no_weights="no linear reads a DequantizeLinear of integer codes between the hidden states and the logits",
        not_replayable="the graph between the hidden states and the logits cannot be replayed in torch",
    )

    def variant(self) -> str:
        return ("an extension beyond both papers (EfficientQAT's E2E-QP, arXiv 2407.11062): every integer weight's "
                f"scales trained end to end on the KL to the float model, codes fixed (one multiplier per "
                f"{'output channel' if self.params.granularity == 'channel' else 'scale element'}, "
                f"{self.params.epochs} epochs, lr {self.params.lr:g} on log-scales)")

    def run(self, model: ir.Model) -> bool:
        import torch

        start = time.perf_counter()
        graph = model.graph
        reference = self.ctx.reference
        if reference is None:
            raise self.refuse("no_reference", "scale_tuning needs the compile's float source model (mqc compile sets it)")
        logits = next((v for v in graph.outputs if v.name == LOGITS), None)
        if logits is None:
            raise self.refuse("no_logits", f"outputs are {[v.name for v in graph.outputs]}")
        hidden = _hidden_input(graph)
        if hidden is None:
            raise self.refuse("no_hidden_input", "no inputs_embeds input and no Gather reading input_ids")
        graph_slice = GraphSlice(graph, hidden, logits)
        why = graph_slice.check()
        if why is not None:
            raise self.refuse("not_replayable", why)
        weights = _dequantized_weights(graph_slice.nodes)
        if not weights:
            raise self.refuse("no_weights", "nothing to tune")
        weight_names = {w.value.name for w in weights}
        captured = [name for name in graph_slice.externals if name not in weight_names]
        torch.manual_seed(self.params.seed)

        samples, kl_before = self._samples(model, hidden.name, captured, reference)
        tuned = _TunedWeights(weights, self.params.granularity)
        replay_kl = self._replay_kl(graph_slice, tuned, samples)
        self.record.notes.append(f"replay of the unchanged graph: KL {replay_kl:.3g} from onnxruntime's logits on "
                                 f"{REPLAY_CHECK_SAMPLES} samples (the compiled model's own KL to float: {kl_before:.4g})")
        if replay_kl > self.params.replay_tolerance:
            raise self.refuse("not_replayable", f"the torch replay's logits are KL {replay_kl:.4f} from onnxruntime's "
                              f"(tolerance {self.params.replay_tolerance:g})")
        steps = self._train(graph_slice, tuned, samples)
        old_scales = [constant_array(w.scale) for w in weights]
        for weight, scale, old in zip(weights, tuned.tuned_scales(), old_scales, strict=True):
            replace_initializer(weight.scale, scale.astype(old.dtype))
        self.ctx.invalidate()
        kl_after = self._onnxruntime_kl(model, samples)
        self.record.matched = len(weights)
        self.record.notes.append(f"onnxruntime's mean KL to the float model on {len(samples)} calibration samples' "
                                 f"text positions: {kl_before:.4g} before, {kl_after:.4g} after {steps} steps")
        self.record.layers.extend(self._changes(tuned))
        self.record.notes.append(f"{time.perf_counter() - start:.0f} s; median |scale change| "
                                 f"{np.median([layer['scale_change_median_pct'] for layer in self.record.layers]):.3f} %")
        if kl_after < kl_before:
            self.record.changed = len(weights)
            return True
        for weight, old in zip(weights, old_scales, strict=True):
            replace_initializer(weight.scale, old)
        self.record.notes.append("KL did not go down: the scales are left as they were")
        return False

    def _train(self, graph_slice: GraphSlice, tuned: _TunedWeights, samples: list[dict[str, Any]]) -> int:
        """Adam on θ, one sample per step (rule 3); the number of steps."""
        import torch

        optimizer = torch.optim.Adam(tuned.theta, lr=self.params.lr)
        order = torch.Generator().manual_seed(self.params.seed)
        progress = self.ctx.progress
        task = progress.add_task("scale_tuning", total=self.params.epochs * len(samples)) if progress else None
        steps = 0
        for _ in range(self.params.epochs):
            for k in torch.randperm(len(samples), generator=order).tolist():
                sample = samples[k]
                optimizer.zero_grad()
                out = graph_slice.run(sample["hidden"], {**sample["externals"], **tuned.tensors()})
                loss = _kl(_rows(out, sample["rows"]), sample["reference"])
                loss.backward()
                optimizer.step()
                steps += 1
                if task is not None:
                    progress.advance(task)
        if task is not None:
            progress.remove_task(task)
        return steps

    def _samples(self, model: ir.Model, hidden: str, captured: list[str],
                 reference: Any) -> tuple[list[dict[str, Any]], float]:
        """Per calibration sample: the hidden states, the captured externals, the counted rows and the float logits
        there (onnxruntime's compiled logits too, for the first samples' replay check); and onnxruntime's mean KL."""
        import torch

        from mqc.session import open_session

        float_session = open_session(reference) if isinstance(reference, str | Path) else reference
        float_inputs = {i.name for i in float_session.get_inputs()}
        samples, losses = [], []
        taps = [hidden, *captured, LOGITS]
        for feed, values in self.ctx.capture(model, taps):
            tensors = dict(zip(taps, values, strict=True))
            (float_logits,) = float_session.run([LOGITS], {k: v for k, v in feed.items() if k in float_inputs})
            rows = torch.from_numpy(_text_positions(feed, float_logits.shape[-2]))
            sample = {
                "hidden": torch.from_numpy(tensors[hidden]),
                "externals": {name: torch.from_numpy(np.array(tensors[name])) for name in captured},
                "rows": rows,
                "reference": _rows(float_logits, rows),
            }
            compiled = _rows(tensors[LOGITS], rows)
            losses.append(float(_kl(compiled, sample["reference"])))
            if len(samples) < REPLAY_CHECK_SAMPLES:
                sample["onnxruntime"] = compiled
            samples.append(sample)
        return samples, float(np.mean(losses))

    def _onnxruntime_kl(self, model: ir.Model, samples: list[dict[str, Any]]) -> float:
        """onnxruntime's mean KL of the current graph to the float logits on the samples (rule 4)."""
        losses = [float(_kl(_rows(values[0], s["rows"]), s["reference"]))
                  for s, (_, values) in zip(samples, self.ctx.capture(model, [LOGITS]), strict=True)]
        return float(np.mean(losses))

    @staticmethod
    def _replay_kl(graph_slice: GraphSlice, tuned: _TunedWeights, samples: list[dict[str, Any]]) -> float:
        """Mean KL of the replay's logits from onnxruntime's on the first samples (rule 2)."""
        import torch

        with torch.no_grad():
            weights = tuned.tensors()
            losses = [float(_kl(_rows(graph_slice.run(s["hidden"], {**s["externals"], **weights}), s["rows"]),
                                s["onnxruntime"])) for s in samples[:REPLAY_CHECK_SAMPLES]]
        return float(np.mean(losses))

    @staticmethod
    def _changes(tuned: _TunedWeights) -> list[dict[str, Any]]:
        """Per tuned linear (the quantizer's layer rows): median and largest |scale change|, in %."""
        rows = []
        for weight, theta in zip(tuned.weights, tuned.theta, strict=True):
            change = 100 * np.abs(np.expm1(theta.detach().numpy()))
            rows.append({"name": weight.name, "scale_change_median_pct": round(float(np.median(change)), 4),
                         "scale_change_max_pct": round(float(np.max(change)), 4)})
        return rows
