"""MAS — Modality-Aware Smoothing (spec/algorithms.md §3.4, Eqs. 12–14; Theorem 1 of §3.3 as a diagnostic).

Each group of LLM linears that reads one value X (q/k/v; gate/up; o alone) gets one smoothing vector per modality,
s_t for text tokens and s_v for image tokens. (The released code learns separate vectors for q, k and v, each
linear dividing its own copy of X; one vector per group keeps one smoothed, quantized activation per group in the
graph, which is what a deployed kernel wants.) They start SmoothQuant-style per modality (Eq. 12, square-root form,
``mqc.smoothing.mas_init_scales``) and are learned to minimise the modality-balanced reconstruction loss (Eq. 13–14)

    L = Σ_m λ_m · (n_m / n) · mean_rows_m |Q_a(X_m S_m⁻¹) · Q_w(S_m W) − X_m W|        (W: the group's weights side
                                                                                         by side, [in, Σ out])

with straight-through rounding, AdamW (lr 5e-2, weight decay 0), scales floored at ``scale_floor`` before every
step, as the released code. n_m / n is the modality's share of calibration tokens, so λ = 1 is the code's "sum over
all tokens / number of tokens" normalisation; λ_image is ``image_weight`` (1.0 as the paper, 0.5 as the public code).
Q_w is per-output-channel symmetric RTN; Q_a is per-token dynamic (``acts="dynamic"``, the paper) or one static
scale per modality from that modality's calibration range max_i R_i^m / s_i (``acts="static"``).

Learning (``learning``):
- ``"block"`` (default; the paper's and the released code's procedure, ``mqc.mas_learning.learn_blocks``): decoder
  layer by layer, the layer replayed in torch from this graph (``mqc.torch_replay``), its input the output of the
  already-quantized previous layers, the loss the modality-balanced L1 of the layer output against the float
  layer's output, one calibration sample per step, ``epochs`` passes over the samples. The other quantized linears
  of the layer (down_proj, which the linear quantizer after ``cmc`` quantizes) are fake-quantized in the replay too. Before learning,
  the float replay of the first layer is checked against onnxruntime (relative drift at most ``REPLAY_RTOL``); a
  graph whose layers cannot be replayed (an op without a torch form, layers that do not chain) falls back to
  ``"linear"``, and the note says why.
- ``"linear"``: each linear group on its own, on float calibration rows of its input (a reservoir of ``rows`` rows
  per modality), the loss on the group's output; ``batch_rows`` rows per modality per step, ``epochs`` ×
  ``steps_per_epoch`` steps (by default one step per calibration sample).
If learning ends with a higher loss on all samples than the initialisation, the initialisation is kept (recorded).
torch is imported only inside this pass, with ``torch_threads`` CPU threads (default: torch's own, all cores;
``device`` applies to ``"linear"``).

Graph form (function-preserving in float; ``passes.cmc`` lowers it). Shared ``is_image`` is MSQ's mask
(``passes.msq.is_image_mask``). Per group with input X::

    inv  = Where(is_image, 1/s_v, 1/s_t)                 # [B, S, K]; node {X}/mas_inv_scale
    x_s  = Mul(X, inv)                                   # node {X}/mas_smooth, metadata mqc.mas = "smooth"

and per linear L of the group (weight W, [in, out])::

    y    = MatMul(x_s, S_t W)                            # the original node, metadata mqc.mas_linear = L
    d    = MatMul(x_s, S_v W − S_t W)                    # {L}/mas_delta
    y'   = Add(y, Where(is_image, d, 0))                 # {L}/mas_select, {L}/mas_add; y's readers read y'

so every token computes x W exactly (``--verify`` checks it); ``cmc`` replaces S_t W by B = Q(S_t W) and the delta
branch by the low-rank L1 L2 (or by the ablations' forms).

Rules:
1. Smoothed roles: q, k, v, o, gate, up of the language component (``down`` only with ``smooth_down=True``; the
   public code leaves down_proj unsmoothed, so that is the default). lm_head, other roles, vision/projector
   linears, names matching ``--exclude``, Gemm linears (only MatMul with a [in, out] weight is handled) are left
   alone (recorded); a group with one refused reader is not smoothed.
2. No ``modality_ids`` input: the model has one modality and MAS does not apply (recorded, nothing changes).
3. A modality without calibration rows at a group takes the other modality's vector (recorded).
4. ``init="unified"`` starts both modalities from the one SmoothQuant vector of the pooled ranges (Eq. 11); with
   ``learn=False`` that is the SmoothQuant (dynamic) baseline of MASQuant's table in this graph form.
5. Records per linear: init and learned loss (``mas_loss_init``/``mas_loss_learned``; with block-wise learning the
   loss of the linear's layer output, ``mas_block`` and ``mas_replay_drift``, the relative drift of the float replay
   of all layers from onnxruntime), learning seconds, the
   largest s_v/s_t, and the Theorem 1 diagnostic: the predicted SQNR penalty Δ of unified smoothing for the
   non-dominant modality (``theorem1_sqnr_loss_db``, from the per-modality channel ranges; ``theorem1_dominant``
   names the dominant one) next to the measured mean per-token SQNR of that modality's rows under unified and under
   its own smoothing (``theorem1_sqnr_unified_db``, ``theorem1_sqnr_own_db``). Steps, rows and the process peak RSS
   go to the notes.
"""

from __future__ import annotations

import itertools
import resource
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_NAMES, TEXT, TapStats, TensorStats
from mqc.graph.markers import MAS_LINEAR_KEY, MAS_SMOOTH_KEY
from mqc.graph.msq import is_image_mask, modality_input
from mqc.ir import add_initializer, remove_unused_initializers
from mqc.mas_learning import (
    Block,
    BlockSettings,
    Sample,
    fake_quant_act,
    fake_quant_weight,
    learn_blocks,
    replay_drift,
)
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass, declare_fatal
from mqc.quantizer import qrange
from mqc.smoothing import mas_init_scales, smoothquant_scales, sqnr_under_smoothing, theorem1_sqnr_loss_db

#: Largest relative drift of the torch replay of the first layer against onnxruntime before learning trusts it.
REPLAY_RTOL = 1e-4
SMOOTH_ROLES = ("q", "k", "v", "o", "gate", "up")


# ------------------------------------------------------------------------------------------------------ learning


def learn_scales(
    rows: dict[int, np.ndarray],
    ranges: dict[int, np.ndarray],
    shares: dict[int, float],
    weight: np.ndarray,
    init: dict[int, np.ndarray],
    *,
    w_bits: int = 4,
    a_bits: int = 8,
    acts: str = "dynamic",
    lambdas: dict[int, float] | None = None,
    epochs: int = 2,
    steps_per_epoch: int = 128,
    batch_rows: int = 256,
    lr: float = 5e-2,
    scale_floor: float = 1e-2,
    seed: int = 0,
    threads: int = 0,
    device: str = "cpu",
) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Learn per-modality smoothing vectors minimising the MBR loss of the module docstring (torch, CPU).

    ``rows[m]``: calibration rows of modality m [n_m, K]; ``ranges[m]``: its channel absmax over all calibration
    rows (static activation scales); ``shares[m]``: its share of calibration tokens; ``weight``: [K, N].
    Returns the learned vectors (float64) and figures: loss at init and at the end on all rows, per modality too.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        lambdas = lambdas or {}
        gen = torch.Generator().manual_seed(seed)
        w = torch.tensor(np.asarray(weight, np.float32), device=device)
        xs = {m: torch.tensor(np.asarray(r, np.float32), device=device) for m, r in rows.items() if r.shape[0] > 0}
        targets = {m: x @ w for m, x in xs.items()}
        rng_t = {m: torch.tensor(np.asarray(ranges[m], np.float32), device=device) for m in xs}
        params = {m: torch.nn.Parameter(torch.tensor(np.asarray(init[m], np.float32), device=device)) for m in xs}
        _, a_hi = qrange(a_bits)

        def q_act(t: torch.Tensor, s: torch.Tensor, m: int) -> torch.Tensor:
            delta = None if acts == "dynamic" else (rng_t[m] / s).max().clamp_min(1e-12) / a_hi
            return fake_quant_act(t, a_bits, delta)

        def loss_of(m: int, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            out = q_act(x / s, s, m) @ fake_quant_weight(s[:, None] * w, w_bits)
            return (out - y).abs().mean()

        def full_loss() -> tuple[float, dict[str, float]]:
            with torch.no_grad():
                per = {m: float(loss_of(m, xs[m], targets[m], params[m])) for m in xs}
            total = sum(lambdas.get(m, 1.0) * shares[m] * v for m, v in per.items())
            return total, {MODALITY_NAMES.get(m, str(m)): v for m, v in per.items()}

        init_loss, init_per = full_loss()
        optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
        steps = epochs * steps_per_epoch
        start = time.perf_counter()
        for _ in range(steps):
            with torch.no_grad():
                for p in params.values():
                    p.clamp_(min=scale_floor)
            optimizer.zero_grad()
            loss = torch.zeros((), device=device)
            for m, x in xs.items():
                n = x.shape[0]
                pick = torch.randperm(n, generator=gen)[: min(batch_rows, n)].to(device)
                loss = loss + lambdas.get(m, 1.0) * shares[m] * loss_of(m, x[pick], targets[m][pick], params[m])
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for p in params.values():
                p.clamp_(min=scale_floor)
        seconds = time.perf_counter() - start
        final_loss, final_per = full_loss()
        kept_init = not final_loss < init_loss
        learned = {m: (np.asarray(init[m], np.float64) if kept_init else params[m].detach().double().cpu().numpy()) for m in xs}
        info = {
            "mas_loss_init": init_loss,
            "mas_loss_learned": min(final_loss, init_loss),
            "mas_loss_init_by_modality": init_per,
            "mas_loss_learned_by_modality": init_per if kept_init else final_per,
            "mas_steps": steps,
            "mas_kept_init": kept_init,
            "mas_learn_seconds": round(seconds, 3),
        }
        return learned, info
    finally:
        torch.set_num_threads(previous_threads)


# ---------------------------------------------------------------------------------------------------------- pass


class MasPass(MqcPass):
    """Per-modality smoothing vectors for q/k/v, o, gate/up, learned on calibration rows; emits the MAS graph form."""

    name = "mas"
    function_preserving = True
    fatal_skips = declare_fatal(
        no_modality_ids="the graph has no modality_ids input: nothing to smooth per modality",
        nothing_to_smooth="every linear is refused (the first refusal is named)",
    )

    def requires(self, model: ir.Model) -> None:
        if modality_input(model.graph) is None:
            raise self.refuse("no_modality_ids", "the graph has no modality_ids input (one modality): nothing to smooth per modality")

    def variant(self) -> str:
        return self._describe(self.params.learning)

    def _describe(self, learning_ran: str) -> str:
        """The variant text once learning ran ``block``-wise or fell back to ``linear`` (``run`` records which)."""
        p = self.params
        weight = "the paper's" if p.image_weight == 1.0 else ("the released code's" if p.image_weight == 0.5 else "custom")
        down = "down_proj smoothed too" if p.smooth_down else "down_proj not smoothed (the released code)"
        if not p.learn:
            learn = "not learned (initial scales)"
        elif learning_ran == "block":
            learn = "learned block-wise on the outputs of the already-quantized layers (the paper)"
        else:
            learn = "learned per linear group on float calibration rows (deviation: the paper learns block-wise)"
        return f"{learn}; λ_image {p.image_weight:g} ({weight}); {down}; {p.acts} activations"

    # -------------------------------------------------------------------------------------------- selection

    def _refusal(self, lin: Linear) -> str | None:
        if lin.role in self.params.skip_roles:
            return f"role {lin.role} is not smoothed (skip_roles)"
        if lin.role not in SMOOTH_ROLES and not (lin.role == "down" and self.params.smooth_down):
            return f"role {lin.role} is not smoothed by MAS" + (" (smooth_down=False, as the public code)" if lin.role == "down" else "")
        if lin.component != "language":
            return f"{lin.component} linear: MASQuant smooths the LLM decoder only"
        if self.ctx.excluded(lin.name):
            return "name matches --exclude"
        if lin.node.op_type != "MatMul" or lin.transposed:
            return "MAS handles MatMul linears with an [in, out] weight only"
        return None

    def _groups(self, model: ir.Model) -> dict[str, list[Linear]]:
        model_map = self.ctx.model_map(model)
        self.record.matched = len(model_map.linears)
        groups: dict[str, list[Linear]] = {}
        for lin in model_map.linears:
            groups.setdefault(lin.input.name, []).append(lin)
        selected = {}
        for value_name, group in groups.items():
            reasons = {lin.name: self._refusal(lin) for lin in group}
            refused = [name for name, why in reasons.items() if why]
            if refused:
                for lin in group:
                    why = reasons[lin.name] or f"shares its input with {refused[0]}, which is not smoothed"
                    self.record.skip(lin.name, f"not smoothed: {why}")
                continue
            selected[value_name] = group
        return selected

    # ------------------------------------------------------------------------------------------------- run

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        modality_ids = modality_input(graph)
        groups = self._groups(model)
        if not groups:
            first = self.record.skipped[0] if self.record.skipped else {"node": "model", "reason": "no linear"}
            raise self.refuse("nothing_to_smooth", f"no linear can be smoothed (e.g. {first['node']}: {first['reason']})")
        p = self.params
        plain = self._plain_linears(model, groups)
        stats = self.ctx.calibrate(model, [*groups, *(lin.input.name for lin in plain)], label="calibrating MAS",
                                   sample_rows=p.rows)
        present = {}
        for value_name, group in list(groups.items()):
            tap = stats.get(value_name)
            if tap is None or all(e.rows == 0 for e in tap.by_modality.values()):
                for lin in group:
                    self.record.skip(lin.name, "no calibration data reached its input")
                del groups[value_name]
                continue
            present[value_name] = {m: e for m, e in ((TEXT, tap.modality(TEXT)), (IMAGE, tap.modality(IMAGE))) if e is not None}
        if not groups:
            return False
        weights = {v: np.concatenate([lin.weight_array() for lin in g], axis=1).astype(np.float64) for v, g in groups.items()}
        inits = {v: self._init_scales(present[v], weights[v]) for v in groups}
        figures = {v: self._theorem1({m: e.channel_absmax.astype(np.float64) for m, e in present[v].items()}, present[v], weights[v])
                   for v in groups}
        learned = inits
        peak_rss_mb = 0.0
        if p.learn and p.epochs > 0:
            start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            learned = None
            if p.learning == "block":
                learned = self._learn_blockwise(model, groups, plain, inits, stats, figures)
            if learned is None:
                self.record.variant = self._describe("linear")
                learned = {v: self._learn_linear(v, present[v], weights[v], inits[v], figures[v]) for v in groups}
                self.record.notes.append(
                    f"MAS learning per linear group on float calibration rows: {p.epochs} epochs x "
                    f"{self._steps_per_epoch()} steps, {p.batch_rows} rows per modality per step, lambda text 1.0 / "
                    f"image {p.image_weight}, acts {p.acts}, W{p.weight_bits}A{p.act_bits}")
            peak_rss_mb = max(start_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
        is_image = is_image_mask(graph, modality_ids)
        changed = 0
        for value_name, group in groups.items():
            scales = self._complete(value_name, learned[value_name])
            figures[value_name]["s_image_over_text_max"] = float(np.max(scales[IMAGE] / scales[TEXT]))
            self._rewrite(graph, group, scales, is_image)
            for lin in group:
                self.record.layers.append({**lin.to_dict(), **figures[value_name]})
                changed += 1
        remove_unused_initializers(graph)
        if peak_rss_mb:
            self.record.notes.append(f"process peak RSS after learning: {peak_rss_mb:.0f} MB")
        self.record.changed = changed
        return changed > 0

    def _plain_linears(self, model: ir.Model, groups: dict[str, list[Linear]]) -> list[Linear]:
        """The language linears quantized without smoothing (down_proj, after ``cmc``): fake-quantized in block replays."""
        smoothed = {id(lin.node) for g in groups.values() for lin in g}
        return [lin for lin in self.ctx.model_map(model).linears
                if id(lin.node) not in smoothed and lin.component == "language" and lin.role not in self.params.skip_roles
                and not self.ctx.excluded(lin.name) and lin.node.op_type == "MatMul" and not lin.transposed]

    def _init_scales(self, present: dict[int, TensorStats], weight: np.ndarray) -> dict[int, np.ndarray]:
        ranges = {m: e.channel_absmax.astype(np.float64) for m, e in present.items()}
        if self.params.init == "unified":
            pooled = np.max(np.stack(list(ranges.values())), axis=0)
            return {m: smoothquant_scales(pooled, weight, self.params.alpha) for m in ranges}
        return mas_init_scales(ranges, weight, self.params.alpha)

    def _complete(self, value_name: str, scales: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Both modalities' vectors: a modality without calibration rows takes the other's (recorded)."""
        scales = dict(scales)
        for m, other in ((TEXT, IMAGE), (IMAGE, TEXT)):
            if m not in scales:
                scales[m] = scales[other]
                self.record.notes.append(
                    f"MAS {value_name}: no {MODALITY_NAMES[m]} calibration rows, {MODALITY_NAMES[m]} tokens use the "
                    f"{MODALITY_NAMES[other]} vector")
        return scales

    def _learn_linear(self, value_name: str, present: dict[int, TensorStats], weight: np.ndarray,
                      init: dict[int, np.ndarray], figures: dict[str, Any]) -> dict[int, np.ndarray]:
        p = self.params
        total_rows = sum(e.rows for e in present.values())
        learned, info = learn_scales(
            {m: e.sample for m, e in present.items()}, {m: e.channel_absmax.astype(np.float64) for m, e in present.items()},
            {m: e.rows / total_rows for m, e in present.items()}, weight, init, w_bits=p.weight_bits, a_bits=p.act_bits,
            acts=p.acts, lambdas={TEXT: 1.0, IMAGE: p.image_weight}, epochs=p.epochs,
            steps_per_epoch=self._steps_per_epoch(), batch_rows=p.batch_rows, lr=p.lr, scale_floor=p.scale_floor,
            seed=p.seed, threads=p.torch_threads or 0, device=p.device,
        )
        figures.update({key: info[key] for key in ("mas_loss_init", "mas_loss_learned", "mas_learn_seconds")})
        if info["mas_kept_init"]:
            self.record.notes.append(f"MAS {value_name}: learning did not lower the loss, the initialisation is kept")
        return learned

    def _steps_per_epoch(self) -> int:
        """Layer-wise learning: one step per calibration sample unless ``steps_per_epoch`` is set."""
        return self.params.steps_per_epoch or int(self.ctx.num_samples or 32)

    # ------------------------------------------------------------------------------------------- block-wise

    def _learn_blockwise(self, model: ir.Model, groups: dict[str, list[Linear]], plain: list[Linear],
                         inits: dict[str, dict[int, np.ndarray]], stats: dict[str, TapStats],
                         figures: dict[str, dict[str, Any]]) -> dict[str, dict[int, np.ndarray]] | None:
        """Block-wise learning (module docstring); None, with the reason in the notes, when the graph cannot take it."""
        import torch

        p = self.params
        blocks, why = self._blocks(model, groups, plain)
        if why is not None:
            self.record.notes.append(f"MAS block-wise learning refused ({why}): learning per linear group instead")
            return None
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(p.torch_threads or previous_threads)
        try:
            samples = self._block_samples(model, blocks)
            drift = replay_drift(blocks[:1], samples[:4])
            if not drift <= REPLAY_RTOL:
                self.record.notes.append(f"MAS block-wise learning refused (the torch replay of the first layer drifts "
                                         f"{drift:.2e} from onnxruntime): learning per linear group instead")
                return None
            ranges = {name: {m: e.channel_absmax.astype(np.float64) for m, e in tap.by_modality.items()}
                      for name, tap in stats.items()}
            settings = BlockSettings(w_bits=p.weight_bits, a_bits=p.act_bits, acts=p.acts, image_weight=p.image_weight,
                                     epochs=p.epochs, lr=p.lr, scale_floor=p.scale_floor, seed=p.seed, ranges=ranges)
            task = self.ctx.progress.add_task("learning MAS blocks", total=len(blocks)) if self.ctx.progress else None
            learned, block_figures, end_drift = learn_blocks(
                blocks, samples, inits, settings,
                progress=(lambda: self.ctx.progress.advance(task)) if task is not None else None)
            if task is not None:
                self.ctx.progress.remove_task(task)
        finally:
            torch.set_num_threads(previous_threads)
        by_block = {f["block"]: f for f in block_figures}
        for block in blocks:
            f = by_block[block.index]
            for value_name in block.groups:
                figures[value_name].update({"mas_block": block.index, "mas_replay_drift": end_drift, **{k: f[k] for k in (
                    "mas_loss_init", "mas_loss_learned", "mas_learn_seconds")}})
            if f["mas_kept_init"]:
                self.record.notes.append(f"MAS layer {block.index}: learning did not lower its loss, the initialisation is kept")
        seconds = [f["mas_learn_seconds"] for f in block_figures]
        self.record.notes.append(
            f"MAS learned block-wise: {len(blocks)} layers, {p.epochs} epochs x {len(samples)} samples (batch 1), "
            f"lambda text 1.0 / image {p.image_weight}, acts {p.acts}, W{p.weight_bits}A{p.act_bits}; torch replay "
            f"of layer {blocks[0].index} vs onnxruntime {drift:.1e}, of all {len(blocks)} layers {end_drift:.1e}; {np.median(seconds):.1f} s per layer (median), "
            f"{sum(seconds):.0f} s in all")
        return learned

    def _blocks(self, model: ir.Model, groups: dict[str, list[Linear]], plain: list[Linear]) -> tuple[list, str | None]:
        """One :class:`mqc.mas_learning.Block` per decoder layer holding smoothed groups, or the reason there is none."""
        from mqc.model_map import residual_add_after
        from mqc.torch_replay import GraphSlice

        model_map = self.ctx.model_map(model)
        layer_of = {v: {lin.layer for lin in g} for v, g in groups.items()}
        if any(len(ls) != 1 or None in ls for ls in layer_of.values()):
            return [], "a smoothed group has no single decoder layer index"
        writers = {(lin.layer, lin.role): lin for lin in model_map.linears if lin.component == "language"}
        blocks = []
        for layer in sorted({next(iter(ls)) for ls in layer_of.values()}):
            o, down = writers.get((layer, "o")), writers.get((layer, "down"))
            into_o = residual_add_after(o) if o is not None else None
            into_down = residual_add_after(down) if down is not None else None
            if into_o is None or into_down is None:
                return [], f"layer {layer}: no residual adds after o_proj and down_proj to bound the block"
            graph_slice = GraphSlice(model.graph, into_o[1], into_down[0].outputs[0])
            why = graph_slice.check()
            if why is not None:
                return [], f"layer {layer}: {why}"
            inside = {id(n) for n in graph_slice.nodes}
            members = {v: [(lin.node, lin.weight_array()) for lin in g] for v, g in groups.items() if layer in layer_of[v]}
            if any(id(node) not in inside for ms in members.values() for node, _ in ms):
                return [], f"layer {layer}: a smoothed linear lies outside the layer's slice"
            blocks.append(Block(layer, graph_slice, members,
                                [(lin.node, lin.weight_array()) for lin in plain if id(lin.node) in inside]))
        for before, after in itertools.pairwise(blocks):
            if before.graph_slice.output is not after.graph_slice.input:
                return [], f"layers {before.index} and {after.index} do not chain (nodes between them)"
        return blocks, None

    def _block_samples(self, model: ir.Model, blocks: list) -> list:
        """Per calibration sample: the first block's input, every slice's externals, the image-row mask, references."""
        import torch

        from mqc.calibration import capture

        graph_inputs = {v.name for v in model.graph.inputs}
        first, last = blocks[0].graph_slice, blocks[-1].graph_slice
        externals = list(dict.fromkeys(name for b in blocks for name in b.graph_slice.externals))
        wanted = [first.input.name, *externals]
        references = list(dict.fromkeys([first.output.name, last.output.name]))
        taps = [n for n in dict.fromkeys([*wanted, *references]) if n not in graph_inputs]
        samples = []
        for feed, outputs in capture(model, taps, self.ctx.feeds(), self.ctx.providers):
            values = {**{n: feed[n] for n in wanted if n in graph_inputs}, **dict(zip(taps, outputs, strict=True))}
            tensors = {n: torch.from_numpy(np.array(values[n])) for n in [*wanted, *references]}
            image_rows = torch.from_numpy(np.asarray(feed[modality_input(model.graph).name]).reshape(-1) == IMAGE)
            samples.append(Sample(tensors[first.input.name], {n: tensors[n] for n in externals}, image_rows,
                                  {n: tensors[n] for n in references}))
        return samples

    # ------------------------------------------------------------------------------------------ diagnostics

    def _theorem1(self, ranges: dict[int, np.ndarray], present: dict, weight: np.ndarray) -> dict[str, Any]:
        """Theorem 1 (§3.3): predicted and measured SQNR cost of unified smoothing for the non-dominant modality."""
        if len(ranges) < 2:
            return {"theorem1": "one modality at this input: no misalignment"}
        dominant = max(ranges, key=lambda m: float(ranges[m].max()))
        other = IMAGE if dominant == TEXT else TEXT
        floor = 1e-8
        rd, ro = np.maximum(ranges[dominant], floor), np.maximum(ranges[other], floor)
        out: dict[str, Any] = {
            "theorem1_dominant": MODALITY_NAMES[dominant],
            "theorem1_sqnr_loss_db": round(theorem1_sqnr_loss_db(rd, ro), 3),
        }
        rows = present[other].sample
        rows = rows[np.abs(rows).max(axis=1) > 0]
        if rows.shape[0]:
            unified = smoothquant_scales(np.maximum(rd, ro), weight, self.params.alpha)
            own = smoothquant_scales(ro, weight, self.params.alpha)
            bits = self.params.act_bits
            out["theorem1_sqnr_unified_db"] = round(sqnr_under_smoothing(rows, unified, bits), 3)
            out["theorem1_sqnr_own_db"] = round(sqnr_under_smoothing(rows, own, bits), 3)
        return out

    # ------------------------------------------------------------------------------------------------ graph

    @staticmethod
    def _rewrite(graph: ir.Graph, group: list[Linear], scales: dict[int, np.ndarray], is_image: ir.Value) -> None:
        value = group[0].input
        base = value.name or "act"
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        inv_t = add_initializer(graph, f"{base}_mas_inv_scale_text", (1.0 / scales[TEXT]).astype(dtype))
        inv_v = add_initializer(graph, f"{base}_mas_inv_scale_image", (1.0 / scales[IMAGE]).astype(dtype))
        where = ir.node("Where", [is_image, inv_v, inv_t], name=f"{base}/mas_inv_scale")
        where.outputs[0].name = f"{base}_mas_inv_scale"
        mul = ir.node("Mul", [value, where.outputs[0]], name=f"{base}/mas_smooth")
        mul.metadata_props[MAS_SMOOTH_KEY] = "smooth"
        x_s = mul.outputs[0]
        x_s.name, x_s.dtype, x_s.shape = f"{base}_mas_smoothed", value.dtype, value.shape
        order = {id(node): i for i, node in enumerate(graph)}
        graph.insert_before(min((lin.node for lin in group), key=lambda n: order[id(n)]), [where, mul])
        zero = add_initializer(graph, "mqc_mas_zero", np.array(0, dtype=dtype)) if "mqc_mas_zero" not in graph.initializers \
            else graph.initializers["mqc_mas_zero"]
        for lin in group:
            w = lin.weight_array().astype(np.float64)
            w_t, w_v = scales[TEXT][:, None] * w, scales[IMAGE][:, None] * w
            stored_dtype = lin.weight_array().dtype
            lin.node.replace_input_with(0, x_s)
            lin.node.replace_input_with(1, add_initializer(graph, f"{lin.name}.weight_mas_text", w_t.astype(stored_dtype)))
            lin.node.metadata_props[MAS_LINEAR_KEY] = lin.name
            y = lin.node.outputs[0]
            uses = list(y.uses())
            delta_w = add_initializer(graph, f"{lin.name}.weight_mas_delta", (w_v - w_t).astype(stored_dtype))
            delta = ir.node("MatMul", [x_s, delta_w], name=f"{lin.name}/mas_delta")
            select = ir.node("Where", [is_image, delta.outputs[0], zero], name=f"{lin.name}/mas_select")
            add = ir.node("Add", [y, select.outputs[0]], name=f"{lin.name}/mas_add")
            add.outputs[0].name = f"{y.name}_mas"
            add.outputs[0].dtype, add.outputs[0].shape = y.dtype, y.shape
            graph.insert_after(lin.node, [delta, select, add])
            for use in uses:
                use.node.replace_input_with(use.idx, add.outputs[0])
