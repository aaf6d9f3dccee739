"""MAS learning in torch (spec/algorithms.md §3.4): fake quantizers with straight-through rounding, and the
block-wise learner that trains every decoder layer's smoothing vectors on its output, as the paper and its code.

Block-wise (OmniQuant-style, the released code's procedure): layer i is replayed from the ONNX graph
(``mqc.torch_replay.GraphSlice``) with its quantized linears replaced by

    smoothed group (q/k/v, o, gate/up):  y = Σ_m mask_m · Q_a(X_m S_m⁻¹) · Q_w(S_m W)       (paper Eq. 21)
    other quantized linears (down_proj): y = Q_a(X) · Q_w(W)

Its input is the output of the already-quantized layers 0..i-1 (learned before it), its target the float layer's
output on the float input, and the loss is the modality-balanced L1 of the block output,

    L = (Σ_text |Ŷ − Y| + λ_image · Σ_image |Ŷ − Y|) / (number of elements),

one calibration sample per step (batch 1), AdamW, scales floored before every step. Q_w is per-output-channel
symmetric RTN; Q_a is per-token dynamic, or static per modality: Δ_m = max_i(R_i^m / s_i) / qmax with R^m the
float calibration range of the linear's input (what the deployed graph's MSQ scale will be). Learning runs in fp32
(the released code autocasts to bf16).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_NAMES, TEXT
from mqc.quantizer import qrange
from mqc.torch_replay import GraphSlice


def ste_round(t: Any) -> Any:
    """Round in the forward pass, identity in the backward pass."""
    import torch

    return (torch.round(t) - t).detach() + t


def fake_quant_weight(w: Any, bits: int) -> Any:
    """Per-output-channel symmetric RTN of a [in, out] weight (the columns are output channels)."""
    lo, hi = qrange(bits)
    delta = w.abs().amax(dim=0, keepdim=True).clamp_min(1e-12) / hi
    return ste_round(w / delta).clamp(lo, hi) * delta


def fake_quant_act(x: Any, bits: int, delta: Any = None) -> Any:
    """Symmetric fake quantization of rows of ``x``: per token (``delta`` None) or with the given step."""
    lo, hi = qrange(bits)
    if delta is None:
        delta = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / hi
    return ste_round(x / delta).clamp(lo, hi) * delta


@dataclass
class Block:
    """One decoder layer to learn: its graph slice, its smoothed groups and its other quantized linears."""

    index: int
    graph_slice: GraphSlice
    #: group input value name -> (linear MatMul nodes of the group, their weights [in, out])
    groups: dict[str, list[tuple[ir.Node, np.ndarray]]]
    #: other quantized linears: (MatMul node, weight [in, out])
    plain: list[tuple[ir.Node, np.ndarray]]


@dataclass
class Sample:
    """One calibration sample at the first block: its input, the slices' externals and its image-row mask."""

    x: Any
    externals: dict[str, Any]
    image_rows: Any
    #: onnxruntime's values of some block outputs, by name, to check the float replay against
    references: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockSettings:
    w_bits: int = 4
    a_bits: int = 8
    acts: str = "dynamic"
    image_weight: float = 1.0
    epochs: int = 2
    lr: float = 5e-2
    scale_floor: float = 1e-2
    seed: int = 0
    #: float calibration channel ranges per value and modality (static activations)
    ranges: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)


class _QuantizedBlockForward:
    """The MatMul hook of one block: per-modality smoothing and fake quantization of its quantized linears."""

    def __init__(self, block: Block, params: Mapping[str, Mapping[int, Any]], settings: BlockSettings) -> None:
        import torch

        self.settings = settings
        self.params = params
        self.smoothed = {id(node): (name, torch.from_numpy(w.astype(np.float32)))
                         for name, members in block.groups.items() for node, w in members}
        self.plain = {id(node): (node.inputs[0].name, fake_quant_weight(torch.from_numpy(w.astype(np.float32)), settings.w_bits))
                      for node, w in block.plain}
        self.ranges = {name: {m: torch.from_numpy(r.astype(np.float32)) for m, r in by_m.items()}
                       for name, by_m in settings.ranges.items()}
        self._rows_by_modality: list[tuple[int, Any]] = []
        self._acts: dict[str, dict[int, Any]] = {}

    def start(self, image_rows: Any) -> None:
        """Begin one forward pass of a sample: its row indices per modality present; no cached activations."""
        import torch

        picks = [(m, torch.nonzero(image_rows == (m == IMAGE)).reshape(-1)) for m in (TEXT, IMAGE)]
        self._rows_by_modality = [(m, idx) for m, idx in picks if idx.numel()]
        self._acts = {}

    def _delta(self, value: str, modality: int, s: Any) -> Any:
        if self.settings.acts == "dynamic":
            return None
        _, hi = qrange(self.settings.a_bits)
        by_m = self.ranges[value]
        r = by_m.get(modality, by_m.get(TEXT if modality == IMAGE else IMAGE))
        return ((r / s) if s is not None else r).max().clamp_min(1e-12) / hi

    def __call__(self, node: ir.Node, x: Any, w: Any) -> Any:
        import torch

        key = id(node)
        if key not in self.smoothed and key not in self.plain:
            return None
        rows = x.reshape(-1, x.shape[-1])
        modalities = self._rows_by_modality
        parts, order = [], []
        if key in self.plain:
            value, wq = self.plain[key]
            for m, idx in modalities:
                parts.append(fake_quant_act(rows[idx], self.settings.a_bits, self._delta(value, m, None)) @ wq)
                order.append(idx)
        else:
            group, weight = self.smoothed[key]
            cache = self._acts.setdefault(group, {})
            for m, idx in modalities:
                s = self.params[group].get(m)
                if s is None:
                    s = self.params[group][TEXT if m == IMAGE else IMAGE]
                if m not in cache:
                    cache[m] = fake_quant_act(rows[idx] / s, self.settings.a_bits, self._delta(group, m, s))
                parts.append(cache[m] @ fake_quant_weight(s[:, None] * weight, self.settings.w_bits))
                order.append(idx)
        out = torch.cat(parts)[torch.argsort(torch.cat(order))]
        return out.reshape(*x.shape[:-1], out.shape[-1])


def mbr_loss(out: Any, target: Any, image_rows: Any, image_weight: float) -> tuple[Any, dict[int, float]]:
    """Modality-balanced L1 of a block output (module docstring) and the mean |error| per modality present."""
    err = (out - target).abs().reshape(-1, out.shape[-1])
    per_row = err.sum(dim=-1)
    weights = 1.0 + (image_weight - 1.0) * image_rows.to(per_row.dtype)
    loss = (weights * per_row).sum() / err.numel()
    by_m = {m: float(err[image_rows == (m == IMAGE)].detach().mean()) for m in (TEXT, IMAGE) if bool((image_rows == (m == IMAGE)).any())}
    return loss, by_m


def _evaluate(graph_slice: GraphSlice, hook: _QuantizedBlockForward, inputs: Sequence[Any], samples: Sequence[Sample],
              targets: Sequence[Any], image_weight: float) -> tuple[float, dict[str, float], list[Any]]:
    """Mean MBR loss of the quantized block over all samples, the mean |error| per modality, and its outputs."""
    import torch

    total, per, outs = 0.0, {}, []
    with torch.no_grad():
        for x, s, y in zip(inputs, samples, targets, strict=True):
            hook.start(s.image_rows)
            out = graph_slice.run(x, s.externals, hook)
            loss, by_m = mbr_loss(out, y, s.image_rows, image_weight)
            total += float(loss)
            for m, v in by_m.items():
                per.setdefault(MODALITY_NAMES[m], []).append(v)
            outs.append(out)
    return total / len(samples), {k: float(np.mean(v)) for k, v in per.items()}, outs


def learn_blocks(
    blocks: Sequence[Block],
    samples: Sequence[Sample],
    init: Mapping[str, Mapping[int, np.ndarray]],
    settings: BlockSettings,
    progress: Any = None,
) -> tuple[dict[str, dict[int, np.ndarray]], list[dict[str, Any]], float]:
    """Learn every block's smoothing vectors in order (module docstring).

    ``init[group][m]``: the initial vector of each smoothed group and modality. Returns the learned vectors (the
    initial ones where learning did not lower the block's loss over all samples), per-block figures, and the
    relative drift of the float replay of all blocks from onnxruntime's last block output (``Sample.references``).
    """
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    fp_in = [s.x for s in samples]
    q_in = [s.x for s in samples]
    learned: dict[str, dict[int, np.ndarray]] = {}
    figures: list[dict[str, Any]] = []
    for block in blocks:
        start = time.perf_counter()
        run = block.graph_slice.run
        with torch.no_grad():
            targets = [run(x, s.externals) for x, s in zip(fp_in, samples, strict=True)]
        params = {g: {m: torch.nn.Parameter(torch.tensor(np.asarray(v, np.float32))) for m, v in init[g].items()}
                  for g in block.groups}
        hook = _QuantizedBlockForward(block, params, settings)

        init_loss, init_per, init_out = _evaluate(block.graph_slice, hook, q_in, samples, targets, settings.image_weight)
        flat = [p for by_m in params.values() for p in by_m.values()]
        steps = 0
        if flat and settings.epochs > 0:
            optimizer = torch.optim.AdamW(flat, lr=settings.lr, weight_decay=0.0)
            for _ in range(settings.epochs):
                for k in torch.randperm(len(samples), generator=gen).tolist():
                    with torch.no_grad():
                        for p in flat:
                            p.clamp_(min=settings.scale_floor)
                    optimizer.zero_grad()
                    hook.start(samples[k].image_rows)
                    out = run(q_in[k], samples[k].externals, hook)
                    loss, _ = mbr_loss(out, targets[k], samples[k].image_rows, settings.image_weight)
                    loss.backward()
                    optimizer.step()
                    steps += 1
            with torch.no_grad():
                for p in flat:
                    p.clamp_(min=settings.scale_floor)
        final_loss, final_per, final_out = _evaluate(
            block.graph_slice, hook, q_in, samples, targets, settings.image_weight) if steps else (init_loss, init_per, init_out)
        kept_init = not final_loss < init_loss
        for g, by_m in params.items():
            learned[g] = {m: (np.asarray(init[g][m], np.float64) if kept_init else p.detach().double().numpy())
                          for m, p in by_m.items()}
        q_in = init_out if kept_init else final_out
        fp_in = targets
        figures.append({
            "block": block.index, "mas_loss_init": init_loss, "mas_loss_learned": min(init_loss, final_loss),
            "mas_loss_init_by_modality": init_per, "mas_loss_learned_by_modality": init_per if kept_init else final_per,
            "mas_steps": steps, "mas_kept_init": kept_init, "mas_learn_seconds": round(time.perf_counter() - start, 3),
        })
        if progress is not None:
            progress()
    last = blocks[-1].graph_slice.output.name
    drift = max((_relative_drift(y, s.references[last]) for y, s in zip(fp_in, samples, strict=True)
                 if last in s.references), default=0.0)
    return learned, figures, drift


def _relative_drift(x: Any, ref: Any) -> float:
    """max |x - ref| / max |ref|."""
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def replay_drift(blocks: Sequence[Block], samples: Sequence[Sample]) -> float:
    """Largest relative difference (to the value's max magnitude) between the float replay of ``blocks`` from the
    first block's input and onnxruntime's value of the last block's output."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for s in samples:
            x = s.x
            for block in blocks:
                x = block.graph_slice.run(x, s.externals)
            worst = max(worst, _relative_drift(x, s.references[blocks[-1].graph_slice.output.name]))
    return worst
