"""MAS — Modality-Aware Smoothing (spec/algorithms.md §3.4, Eqs. 12–14; Theorem 1 of §3.3 as a diagnostic).

Each group of LLM linears that reads one value X (q/k/v; gate/up; o alone) gets one smoothing vector per modality,
s_t for text tokens and s_v for image tokens. They start SmoothQuant-style per modality (Eq. 12, square-root form,
``mqc.smoothing.mas_init_scales``) and are learned to minimise the modality-balanced reconstruction loss (Eq. 13–14)

    L = Σ_m λ_m · (n_m / n) · mean_rows_m |Q_a(X_m S_m⁻¹) · Q_w(S_m W) − X_m W|        (W: the group's weights side
                                                                                         by side, [in, Σ out])

with straight-through rounding, AdamW (lr 5e-2, weight decay 0), scales floored at ``scale_floor`` before every
step, as the released code. n_m / n is the modality's share of calibration tokens, so λ = 1 is the code's "sum over
all tokens / number of tokens" normalisation; λ_image is ``image_weight`` (1.0 as the paper, 0.5 as the public code).
Q_w is per-output-channel symmetric RTN; Q_a is per-token dynamic (``acts="dynamic"``, the paper) or one static
scale per modality from that modality's calibration range max_i R_i^m / s_i (``acts="static"``).

**Deviation (documented behaviour): learning is layer-wise on float inputs.** The paper trains block by block
(a whole decoder layer, inputs from the already-quantized previous blocks, loss on the block output). Here each
linear group is trained on its own: X_m are calibration rows of the group's input in the float model (a reservoir
of ``rows`` rows per modality, ``CompileContext.calibrate(sample_rows=...)``), the loss is on the group's output.
One step draws ``batch_rows`` rows per modality; ``epochs`` × ``steps_per_epoch`` steps (by default one step per
calibration sample, the paper's batch 1 over 128 samples, 2 epochs). If learning ends with a higher loss on all
rows than the initialisation, the initialisation is kept (recorded). torch is imported only inside this pass, with
``torch_threads`` CPU threads, on ``device`` ("cpu", or "cuda" where torch has it).

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
5. Records per linear: init and learned loss (``mas_loss_init``/``mas_loss_learned``), learning seconds, the
   largest s_v/s_t, and the Theorem 1 diagnostic: the predicted SQNR penalty Δ of unified smoothing for the
   non-dominant modality (``theorem1_sqnr_loss_db``, from the per-modality channel ranges; ``theorem1_dominant``
   names the dominant one) next to the measured mean per-token SQNR of that modality's rows under unified and under
   its own smoothing (``theorem1_sqnr_unified_db``, ``theorem1_sqnr_own_db``). Steps, rows and the process peak RSS
   go to the notes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from mqc.passes.msq import is_image_mask, modality_input

from mqc.calibration import IMAGE, MODALITY_NAMES, TEXT, TapStats
from mqc.ir import add_initializer, remove_unused_initializers
from mqc.model_map import Linear
from mqc.pass_manager import MqcPass
from mqc.quantizer import qrange
from mqc.smoothing import mas_init_scales, smoothquant_scales, sqnr_under_smoothing, theorem1_sqnr_loss_db

MAS_SMOOTH_KEY = "mqc.mas"
MAS_LINEAR_KEY = "mqc.mas_linear"
SMOOTH_ROLES = ("q", "k", "v", "o", "gate", "up")
ACT_MODES = ("dynamic", "static")


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
    threads: int = 1,
    device: str = "cpu",
) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Learn per-modality smoothing vectors minimising the MBR loss of the module docstring (torch, CPU).

    ``rows[m]``: calibration rows of modality m [n_m, K]; ``ranges[m]``: its channel absmax over all calibration
    rows (static activation scales); ``shares[m]``: its share of calibration tokens; ``weight``: [K, N].
    Returns the learned vectors (float64) and figures: loss at init and at the end on all rows, per modality too.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        lambdas = lambdas or {}
        gen = torch.Generator().manual_seed(seed)
        w = torch.tensor(np.asarray(weight, np.float32), device=device)
        xs = {m: torch.tensor(np.asarray(r, np.float32), device=device) for m, r in rows.items() if r.shape[0] > 0}
        targets = {m: x @ w for m, x in xs.items()}
        rng_t = {m: torch.tensor(np.asarray(ranges[m], np.float32), device=device) for m in xs}
        params = {m: torch.nn.Parameter(torch.tensor(np.asarray(init[m], np.float32), device=device)) for m in xs}
        w_lo, w_hi = qrange(w_bits)
        a_lo, a_hi = qrange(a_bits)

        def ste_round(t: torch.Tensor) -> torch.Tensor:
            return (torch.round(t) - t).detach() + t

        def q_weight(t: torch.Tensor) -> torch.Tensor:
            delta = t.abs().amax(dim=0, keepdim=True).clamp_min(1e-12) / w_hi
            return torch.clamp(ste_round(t / delta), w_lo, w_hi) * delta

        def q_act(t: torch.Tensor, s: torch.Tensor, m: int) -> torch.Tensor:
            if acts == "dynamic":
                delta = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / a_hi
            else:
                delta = (rng_t[m] / s).max().clamp_min(1e-12) / a_hi
            return torch.clamp(ste_round(t / delta), a_lo, a_hi) * delta

        def loss_of(m: int, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            out = q_act(x / s, s, m) @ q_weight(s[:, None] * w)
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

    def __init__(
        self,
        w_bits: int = 4,
        a_bits: int = 8,
        acts: str = "dynamic",
        init: str = "per_modality",
        alpha: float = 0.5,
        learn: bool = True,
        epochs: int = 2,
        lr: float = 5e-2,
        steps_per_epoch: int | None = None,
        batch_rows: int = 256,
        rows: int = 512,
        image_weight: float = 1.0,
        smooth_down: bool = False,
        scale_floor: float = 1e-2,
        torch_threads: int = 1,
        device: str = "cpu",
        seed: int = 0,
        skip_roles: Sequence[str] = ("lm_head",),
    ) -> None:
        super().__init__(
            w_bits=w_bits, a_bits=a_bits, acts=acts, init=init, alpha=alpha, learn=learn, epochs=epochs, lr=lr,
            steps_per_epoch=steps_per_epoch, batch_rows=batch_rows, rows=rows, image_weight=image_weight,
            smooth_down=smooth_down, scale_floor=scale_floor, torch_threads=torch_threads, device=device, seed=seed,
            skip_roles=list(skip_roles),
        )
        if acts not in ACT_MODES:
            raise ValueError(f"acts must be one of {ACT_MODES}, not {acts!r}")
        if init not in ("per_modality", "unified"):
            raise ValueError(f"init must be per_modality or unified, not {init!r}")
        qrange(w_bits)
        qrange(a_bits)
        self.roles = set(SMOOTH_ROLES) | ({"down"} if smooth_down else set())
        self.skip_roles = set(skip_roles)

    def variant(self) -> str:
        p = self.params
        weight = "the paper's" if p["image_weight"] == 1.0 else ("the released code's" if p["image_weight"] == 0.5 else "custom")
        down = "down_proj smoothed too" if p["smooth_down"] else "down_proj not smoothed (the released code)"
        learn = ("learned per linear group on float calibration rows (deviation: the paper learns block-wise on the "
                 "outputs of already-quantized blocks)") if p["learn"] else "not learned (initial scales)"
        return f"{learn}; λ_image {p['image_weight']:g} ({weight}); {down}; {p['acts']} activations"

    # -------------------------------------------------------------------------------------------- selection

    def _refusal(self, lin: Linear) -> str | None:
        if lin.role in self.skip_roles:
            return f"role {lin.role} is not smoothed (skip_roles)"
        if lin.role not in self.roles:
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
        if modality_ids is None:
            self.record.notes.append("MAS: the graph has no modality_ids input (one modality): nothing to smooth per modality")
            return False
        groups = self._groups(model)
        if not groups:
            return False
        p = self.params
        stats = self.ctx.calibrate(model, list(groups), label="calibrating MAS", sample_rows=p["rows"])
        is_image = is_image_mask(graph, modality_ids)
        steps_per_epoch = p["steps_per_epoch"] or int(self.ctx.num_samples or 32)
        self.record.notes.append(
            f"MAS learning is layer-wise on float calibration rows (deviation from the paper's block-wise training); "
            f"{p['epochs']} epochs x {steps_per_epoch} steps, {p['batch_rows']} rows per modality per step, "
            f"lambda text 1.0 / image {p['image_weight']}, acts {p['acts']}, W{p['w_bits']}A{p['a_bits']}")
        changed = 0
        self.peak_rss_mb = 0.0
        for value_name, group in groups.items():
            tap = stats.get(value_name)
            if tap is None or all(e.rows == 0 for e in tap.by_modality.values()):
                for lin in group:
                    self.record.skip(lin.name, "no calibration data reached its input")
                continue
            scales, figures = self._scales(value_name, tap, group)
            self._rewrite(graph, group, scales, is_image)
            for lin in group:
                self.record.layers.append({**lin.to_dict(), **figures})
                changed += 1
        remove_unused_initializers(graph)
        if self.peak_rss_mb:
            self.record.notes.append(f"process peak RSS after learning: {self.peak_rss_mb:.0f} MB")
        self.record.changed = changed
        return changed > 0

    def _scales(self, value_name: str, tap: TapStats, group: list[Linear]) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
        p = self.params
        weight = np.concatenate([lin.weight_array() for lin in group], axis=1).astype(np.float64)
        present = {m: e for m, e in ((TEXT, tap.modality(TEXT)), (IMAGE, tap.modality(IMAGE))) if e is not None}
        ranges = {m: e.channel_absmax.astype(np.float64) for m, e in present.items()}
        if p["init"] == "unified":
            pooled = np.max(np.stack(list(ranges.values())), axis=0)
            init = {m: smoothquant_scales(pooled, weight, p["alpha"]) for m in ranges}
        else:
            init = mas_init_scales(ranges, weight, p["alpha"])
        figures: dict[str, Any] = self._theorem1(ranges, present, weight)
        learned = dict(init)
        if p["learn"] and p["epochs"] > 0:
            total_rows = sum(e.rows for e in present.values())
            start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            learned, info = learn_scales(
                {m: e.sample for m, e in present.items()}, ranges, {m: e.rows / total_rows for m, e in present.items()},
                weight, init, w_bits=p["w_bits"], a_bits=p["a_bits"], acts=p["acts"],
                lambdas={TEXT: 1.0, IMAGE: p["image_weight"]}, epochs=p["epochs"],
                steps_per_epoch=p["steps_per_epoch"] or int(self.ctx.num_samples or 32), batch_rows=p["batch_rows"],
                lr=p["lr"], scale_floor=p["scale_floor"], seed=p["seed"], threads=p["torch_threads"], device=p["device"],
            )
            self.peak_rss_mb = max(self.peak_rss_mb, start_rss / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            figures.update({key: info[key] for key in ("mas_loss_init", "mas_loss_learned", "mas_learn_seconds")})
            if info["mas_kept_init"]:
                self.record.notes.append(f"MAS {value_name}: learning did not lower the loss, the initialisation is kept")
        for m, other in ((TEXT, IMAGE), (IMAGE, TEXT)):
            if m not in learned:
                learned[m] = learned[other]
                self.record.notes.append(
                    f"MAS {value_name}: no {MODALITY_NAMES[m]} calibration rows, {MODALITY_NAMES[m]} tokens use the "
                    f"{MODALITY_NAMES[other]} vector")
        figures["s_image_over_text_max"] = float(np.max(learned[IMAGE] / learned[TEXT]))
        return learned, figures

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
            unified = smoothquant_scales(np.maximum(rd, ro), weight, self.params["alpha"])
            own = smoothquant_scales(ro, weight, self.params["alpha"])
            bits = self.params["a_bits"]
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
