"""QuaRot-style Hadamard rotations of the LLM decoder (spec/algorithms.md §2.6), folded into the weights.

With R1 = D_s·H (random ±1 diagonal times a normalised Hadamard matrix, orthogonal) the decoder computes the
same function on a rotated residual stream x·R1, because an affine-free RMSNorm commutes with it:
RMSNorm₀(x R1) = RMSNorm₀(x)·R1 (§2.5; the γ must be folded first by ``norm_folding``).

Rules, in the order the pass applies them:

1. Precondition: every RMSNorm of the model is affine-free (γ all ones, or no scale) and there is no
   LayerNorm. Otherwise the whole pass is refused with the reason (run ``norm_folding`` / ``ln_to_rmsnorm``).
   A refusal of the whole pass (here or in rules 2, 6, 7) is fatal for the recipe unless ``--allow-partial``.
2. The residual stream is traced by the tracer ``ln_to_rmsnorm`` uses too (``mqc.graph.stream``): the RMSNorms
   it reaches from the graph input ``entry`` (``inputs_embeds``) through residual ``Add`` nodes, their outputs
   read only by linears (the *readers*: q/k/v, gate/up, lm_head; directly or through token-only ops), and, walking
   back from those norms to ``entry``, what writes the stream (the *writers*: o/down/fc2, constants, LayerScales).
   A stream value may only be read by ``Shape``, by the residual ``Add`` nodes and by those norms. Any other
   consumer, a stream value that is a graph output, or a writer whose output leaves the stream refuses the whole
   pass with the reason (node and why): nothing is changed then.
3. Entry: where the stream starts at an embedding ``Gather`` (a decoder exported with ``input_ids`` only; see
   ``model_map.stream_entry``), the table absorbs R1 (E ← E·R1, copied first when an lm_head shares it). Else one
   ``MatMul(inputs_embeds, R1)`` is inserted at the graph input. When a whole model folder is
   compiled, the embedding table and the projector's last linear could absorb it (E ← E·R1, W ← W·R1); the
   decoder graph alone takes its embeddings from outside, so the MatMul stays here.
4. Readers: W ← R1ᵀ·W (input side). Writers: W ← W·R1 and b ← b·R1 (output side). Weights or biases shared
   with another node (a tied embedding) are copied first.
5. Online Hadamard before each down/fc2 (``online_down``): ``MatMul(x, H_n)`` with H_n = hadamard_matrix(n) of
   the intermediate size n (deterministic, no random signs), and W_down ← H_nᵀ·W_down. If n is no Hadamard size,
   the activation is zero-padded to ``padded_size(n)`` by ``Pad(axes=[-1])`` and W_down gets zero rows first.
6. Per-head V/O Hadamard (``rotate_vo``, off by default): the exact H_hd (no random signs) on v_proj's output
   columns per kv-head block (bias too) and H_hdᵀ on o_proj's input rows per attention head. Attention mixes V
   rows within a kv head, so this is exact with GQA. It changes what the KV cache holds (``present.*.value``
   is V·H_hd per head): consistent for a cache that this graph wrote itself (decode steps), so ``--verify``
   compares every output except ``present.*.value`` (recorded); a float cache fed from outside would be misread. The head size comes from
   ``head_dim`` / ``num_kv_heads`` or else from the ``past_key_values.*.value`` input shape
   [batch, kv_heads, past, head_dim]. Fused qkv linears are refused for it.
7. Vision tower (``tower="vision"``, or ``"auto"`` when the graph has no ``entry`` input): after ``ln_to_rmsnorm``
   the encoder's stream is zero-mean and normalized by affine-free RMSNorms, so it is rotated by R_v =
   random_hadamard(d, seed) (§2.6 "Vision residual"). What writes the stream is found by walking back from every
   RMSNorm input (``mqc.graph.stream.trace_stream``: residual Adds, Concat, Expand, Transpose, shape-proven Reshape)
   and absorbs R_v on its channel axis: the patch-embedding ``Conv`` output channels (weight [out, in, kh, kw]
   contracted over ``out``, bias too), the class-token and position-embedding constants, and the writers' output
   side (o/fc2, the centring linear of a ``ln_pre``; W ← W·R_v, b ← b·R_v; a LayerScale left in the graph is
   folded first). Readers of a norm whose output is read only by linears (q/k/v, fc1, the projector's first
   linear), directly or through token-only ops (``mqc.graph.stream.TOKEN_OPS``: CLS split, patch pooling), get
   W ← R_vᵀ·W. A norm whose output has other readers (token pooling, a graph output) gets an online
   ``MatMul(·, R_vᵀ)`` after it, recorded, so what follows sees the unrotated value. Each fc2/down writer gets the
   online Hadamard of rule 5 (1536 = 12·128 for DINOv2-small); ``rotate_vo`` adds rule 6's per-head V/O
   Hadamard inside every vision attention (the released code does; no KV cache there, so all outputs verify). Anything the walk cannot prove (a stream value read
   by something else, a graph output on the stream, a writer it cannot absorb R_v into) refuses the whole pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.graph.stream import (
    StreamClosure,
    StreamRefused,
    apply_transform,
    norm_output_readers,
    norm_readers,
    stream_norms,
    trace_stream,
)
from mqc.graph.weights import left_multiply_weight, live_uses, own_bias, own_weight, set_bias, set_weight
from mqc.graph_forms import absorb_into_embedding
from mqc.hadamard import (
    hadamard_matrix,
    hadamard_signs,
    hadamard_transpose_times,
    padded_size,
    random_hadamard,
    supported_size,
)
from mqc.ir import add_initializer, constant_array, remove_unused_initializers
from mqc.model_map import Linear, ModelMap, infer_head_layout, post_norm_reason, stream_entry
from mqc.pass_manager import MqcPass, declare_fatal

PLAIN_RMSNORM = {"RMSNormalization", "SimplifiedLayerNormalization"}


def _is_value_cache(name: str) -> bool:
    return name.startswith("present") and name.endswith("value")


class RotateResidualPass(MqcPass):
    """Rotate the decoder's residual stream by R1, add online Hadamards before down_proj, optionally V/O."""

    name = "hadamard_rotation"
    function_preserving = True
    verify_exclusion_reason = (
        "rotate_vo stores V·H_hd per head in present.*.value: decode steps read back the cache this graph wrote, "
        "so logits and keys are compared and the value cache is not"
    )
    fatal_skips = declare_fatal(
        norms_not_affine_free="a LayerNorm is left, or an RMSNorm's gamma is not folded (rule 1: run ln_to_rmsnorm "
                              "/ norm_folding first, or see why norm_folding skipped it)",
        no_stream_entry="the residual stream's entry (the graph input `entry` or an embedding Gather) is missing",
        stream_not_traceable="the residual stream has a reader, writer or shape the rotation cannot prove exact "
                             "(rules 2 and 7; the node is named)",
        excluded_stream_linear="--exclude keeps a stream reader or writer in float, but every one must be rotated",
        no_rmsnorm="vision tower: no RMSNorm in the graph to rotate at (run ln_to_rmsnorm first)",
        no_hadamard_size="vision tower: no Hadamard matrix of the stream width",
        head_layout_unknown="rotate_vo: the head size is unknown or does not split the V/O widths (set head_dim)",
    )

    def variant(self) -> str:
        vo = ("per-head V/O Hadamard on (the released code)" if self.params.rotate_vo
              else "per-head V/O Hadamard off (the released code rotates V/O per head)")
        down = "online Hadamard before down_proj/fc2, zero-padded where no size fits (the released code)"
        return f"{vo}; {down}" if self.params.online_down else vo

    def verify_outputs(self, model: ir.Model) -> list[str] | None:
        if not self.params.rotate_vo:
            return None
        return [v.name for v in model.graph.outputs if v.name and not _is_value_cache(v.name)]

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        model_map = self.ctx.model_map(model)
        has_entry = stream_entry(graph, self.params.entry) is not None
        if self.params.tower == "vision" or (self.params.tower == "auto" and not has_entry):
            return self._run_vision(graph, model_map)
        entry, readers, closure = self._trace(graph, model_map)
        heads = self._head_layout(graph, model_map) if self.params.rotate_vo else None
        hidden = readers[0].in_features
        r1 = random_hadamard(hidden, self.params.seed)
        rows: dict[str, dict[str, Any]] = {}

        def row(lin: Linear) -> dict[str, Any]:
            return rows.setdefault(lin.name, {"name": lin.name, "role": lin.role, "layer": lin.layer})

        table = absorb_into_embedding(graph, entry, r1)
        if table is None:
            self._rotate_entry(graph, entry, r1)
        for lin in readers:
            own_weight(graph, lin)
            left_multiply_weight(lin, r1.T)
            row(lin)["r1"] = "input"
        writers = closure.writers
        for lin in writers:
            row(lin)
        apply_transform(graph, closure, r1, "r1", rows)  # W <- W·R1, b <- b·R1 (and constants, LayerScales)
        for lin in writers:
            rows[lin.name]["r1"] = "output"
        for entry_row in rows.values():
            entry_row.pop("kind", None)
        changed = len(readers) + len(writers)
        if self.params.online_down:
            for lin in model_map.linears:
                if lin.role in ("down", "fc2") and lin.component == "language":
                    row(lin).update(self._online_hadamard(graph, lin))
                    changed += 1
        if heads is not None:
            head_dim, kv_heads = heads
            for lin in model_map.linears:
                if lin.role in ("v", "o") and lin.component == "language":
                    row(lin).update(self._rotate_head(graph, lin, head_dim, kv_heads))
                    changed += 1
        remove_unused_initializers(graph)
        self.record.matched = len(model_map.linears)
        self.record.changed = changed
        self.record.layers.extend(rows.values())
        self.record.notes.append(f"R1 = random_hadamard({hidden}, seed={self.params.seed})")
        self.record.notes.append(
            f"R1 absorbed into the embedding table {table} (E <- E·R1)" if table is not None else
            f"R1 applied by MatMul at graph input {entry.name!r}: the embedding table / projector output could absorb it "
            "when a whole model folder is compiled"
        )
        if heads is not None:
            self.record.notes.append(
                f"per-head V/O Hadamard (head_dim {heads[0]}, {heads[1]} kv heads): present.*.value holds V·H per head"
            )
        return True

    # --- vision tower (rule 7) ------------------------------------------------------------------------------

    def _run_vision(self, graph: ir.Graph, model_map: ModelMap) -> bool:
        norms = [n for n in model_map.norms if n.node.op_type in PLAIN_RMSNORM]
        if not norms:
            raise self.refuse("no_rmsnorm", "vision tower: no RMSNorm in the graph (run ln_to_rmsnorm first)")
        width = int(constant_array(norms[0].scale).reshape(-1).shape[0]) if norms[0].scale is not None else None
        if width is None or not supported_size(width):
            raise self.refuse("no_hadamard_size", f"vision tower: no Hadamard matrix of the stream width {width}")
        try:
            closure = trace_stream(graph, model_map, [n.node for n in norms], width, transform="rotation")
        except StreamRefused as exc:
            raise self.refuse("stream_not_traceable", f"vision tower: {exc}") from None
        linear_nodes = {id(lin.node): lin for lin in model_map.linears}
        readers = {id(n.node): norm_output_readers(graph, n.node, linear_nodes) for n in norms}
        for lin in [*closure.writers, *(r for rs in readers.values() if rs for r in rs)]:
            if self.ctx.excluded(lin.name):
                raise self.refuse("excluded_stream_linear", f"{lin.name} matches --exclude, but every stream "
                                  "reader/writer must be rotated", lin.name)
        r_v = random_hadamard(width, self.params.seed)
        rows: dict[str, dict[str, Any]] = {}
        apply_transform(graph, closure, r_v, "r_v", rows)
        unrotated = []
        for norm in norms:
            lins = readers[id(norm.node)]
            if lins:
                for lin in lins:
                    own_weight(graph, lin)
                    left_multiply_weight(lin, r_v.T)
                    row = rows.setdefault(lin.name, {"name": lin.name})
                    row["r_v"] = "both sides" if "r_v" in row else "input side"  # e.g. ln_pre's centring linear
            else:
                self._unrotate(graph, norm.node, r_v)
                unrotated.append(norm.name)
        heads = self._head_layout(graph, model_map) if self.params.rotate_vo else None
        if heads is not None:  # rule 6 inside each vision attention (the released code's per-head V/O)
            for lin in model_map.linears:
                if lin.role in ("v", "o") and lin.component == "vision":
                    rows.setdefault(lin.name, {"name": lin.name}).update(self._rotate_head(graph, lin, *heads))
        hadamards = 0
        if self.params.online_down:
            for lin in closure.writers:
                if lin.role in ("fc2", "down"):
                    rows.setdefault(lin.name, {"name": lin.name}).update(self._online_hadamard(graph, lin))
                    hadamards += 1
        remove_unused_initializers(graph)
        for row in rows.values():
            row.pop("kind", None)  # apply_transform's kind: the r_v value already says it
        self.record.matched = len(model_map.linears)
        self.record.changed = len(rows) + len(unrotated)
        self.record.layers.extend(rows.values())
        self.record.notes.append(f"R_v = random_hadamard({width}, seed={self.params.seed}) on the vision residual stream")
        self.record.notes.append(
            f"vision stream writers rotated: {len(closure.writers)} linears, {len(closure.convs)} convs, "
            f"{len(closure.constants)} constants; {hadamards} online Hadamards before fc2"
        )
        for name in unrotated:
            self.record.notes.append(f"{name}: output is read by more than linears, un-rotated online by MatMul(R_vᵀ)")
        if heads is not None:
            self.record.notes.append(f"per-head V/O Hadamard in the vision attention (head_dim {heads[0]})")
        return True

    def _unrotate(self, graph: ir.Graph, node: ir.Node, r_v: np.ndarray) -> None:
        out = node.outputs[0]
        dtype = out.dtype.numpy() if out.dtype is not None else np.float32
        r_t = self._scaled_sign_matrix(graph, "mqc.Rv_T", _signs(r_v.T), dtype)
        uses = live_uses(out, graph)
        matmul = ir.node("MatMul", [out, r_t], name=f"{node.name}/unrotate")
        matmul.outputs[0].name = f"{out.name}_unrotated"
        matmul.outputs[0].dtype, matmul.outputs[0].shape = out.dtype, out.shape
        graph.insert_after(node, [matmul])
        for use in uses:
            use.node.replace_input_with(use.idx, matmul.outputs[0])
        if out in graph.outputs:
            graph.outputs[graph.outputs.index(out)] = matmul.outputs[0]
            matmul.outputs[0].name, out.name = out.name, f"{out.name}_rotated"

    # --- postcondition --------------------------------------------------------------------------------------

    def ensures(self, model: ir.Model) -> None:
        """Every linear recorded as rotated is still a linear reading its own constant (rotated) weight, and every
        recorded online Hadamard is the MatMul that feeds its linear, of the recorded size."""
        linears = {lin.name: lin for lin in self.ctx.model_map(model).linears}
        for row in self.record.layers:
            rotated = row.get("r1") in ("input", "output") or row.get("r_v") in ("input side", "output side",
                                                                                  "both sides")
            if not rotated and "online_hadamard" not in row:
                continue
            lin = linears.get(row["name"])
            if lin is None:
                raise self.broken(f"{row['name']} is recorded as rotated but no linear of that name reads a constant "
                                  "weight")
            size = row.get("online_hadamard")
            if size is None:
                continue
            producer = lin.input.producer()
            if producer is None or producer.name != f"{lin.name}/online_hadamard" or lin.in_features != size:
                raise self.broken(f"{lin.name} is recorded with an online Hadamard of size {size}, but its input is "
                                  f"not that MatMul (in_features {lin.in_features})")

    # --- analysis -------------------------------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        """Rule 1: every norm is an affine-free RMSNorm (LayerNorms converted, gammas folded)."""
        self._check_norms(self.ctx.model_map(model))

    def _check_norms(self, model_map: ModelMap) -> None:
        post_norms = [post_norm_reason(model_map, n.node) for n in model_map.norms if n.kind == "layernorm"]
        if any(post_norms):  # no conversion can help: say so rather than "run ln_to_rmsnorm first"
            raise self.refuse("norms_not_affine_free", next(reason for reason in post_norms if reason))
        for norm in model_map.norms:
            if norm.kind == "layernorm":
                raise self.refuse("norms_not_affine_free", f"{norm.name} is a LayerNorm: run ln_to_rmsnorm first", norm.name)
            if norm.scale is None:
                continue
            gamma = constant_array(norm.scale)
            if gamma is None or not np.all(gamma == 1.0):
                raise self.refuse("norms_not_affine_free", f"{norm.name} has a non-folded gamma: run norm_folding first",
                                  norm.name)

    def _trace(self, graph: ir.Graph, model_map: ModelMap) -> tuple[ir.Value, list[Linear], StreamClosure]:
        """Rule 2 with the shared tracer: the norms the stream from ``entry`` reaches, their reader linears, and
        what writes the stream back to ``entry`` (``mqc.graph.stream.trace_stream``)."""
        entry = stream_entry(graph, self.params.entry)
        if entry is None:
            raise self.refuse("no_stream_entry", f"graph input {self.params.entry!r} (the residual stream's entry) "
                              "not found")
        linear_nodes = {id(lin.node): lin for lin in model_map.linears}
        norms = stream_norms(graph, entry, PLAIN_RMSNORM)
        readers: dict[int, Linear] = {}
        try:
            for norm in norms:
                readers.update((id(lin.node), lin) for lin in norm_readers(graph, norm, linear_nodes))
            if not readers:
                raise StreamRefused("no linear reads the residual stream through an RMSNorm")
            closure = trace_stream(graph, model_map, norms, next(iter(readers.values())).in_features,
                                   sources=[entry], transform="rotation")
        except StreamRefused as exc:
            raise self.refuse("stream_not_traceable", str(exc)) from None
        for lin in [*readers.values(), *closure.writers]:
            if self.ctx.excluded(lin.name):
                raise self.refuse("excluded_stream_linear", f"{lin.name} matches --exclude, but every stream "
                                  "reader/writer must be rotated", lin.name)
        return entry, list(readers.values()), closure

    def _head_layout(self, graph: ir.Graph, model_map: ModelMap) -> tuple[int, int]:
        if model_map.by_role("qkv"):
            raise self.refuse("head_layout_unknown", "rotate_vo: fused qkv linears are not supported")
        head_dim, kv_heads = self.params.head_dim, self.params.num_kv_heads
        cache = next((v for v in graph.inputs if v.name and v.name.startswith("past_key_values") and v.name.endswith("value")), None)
        if cache is not None and cache.shape is not None and len(cache.shape) == 4:
            dims = cache.shape.dims
            if head_dim is None and isinstance(dims[3], int):
                head_dim = dims[3]
            if kv_heads is None and isinstance(dims[1], int):
                kv_heads = dims[1]
        v_lins = model_map.by_role("v")
        if head_dim is None and kv_heads is None:
            head_dim, kv_heads, how = infer_head_layout(model_map, graph)
            self.record.notes.append(f"rotate_vo: head_dim {head_dim}, {kv_heads} kv heads, from {how}")
        if head_dim is None and kv_heads is not None and v_lins:
            head_dim = v_lins[0].out_features // kv_heads
        if head_dim is None:
            raise self.refuse("head_layout_unknown", "rotate_vo: head_dim unknown (no past_key_values.*.value input, no "
                              "attention op, no "
                                  "constant head split after v_proj); set head_dim")
        if not supported_size(head_dim):
            raise self.refuse("head_layout_unknown", f"rotate_vo: no Hadamard matrix of head_dim {head_dim}")
        for lin in [*v_lins, *model_map.by_role("o")]:
            width = lin.out_features if lin.role == "v" else lin.in_features
            if width % head_dim:
                raise self.refuse("head_layout_unknown", f"rotate_vo: {lin.name} width {width} is not a multiple of "
                                  f"head_dim {head_dim}", lin.name)
        return head_dim, kv_heads or 0

    # --- rewriting ------------------------------------------------------------------------------------------

    def _rotate_entry(self, graph: ir.Graph, entry: ir.Value, r1: np.ndarray) -> None:
        dtype = entry.dtype.numpy() if entry.dtype is not None else np.float32
        r_value = self._scaled_sign_matrix(graph, "mqc.R1", _signs(r1), dtype)
        uses = live_uses(entry, graph)
        node = ir.node("MatMul", [entry, r_value], name="mqc/rotate_residual_entry")
        node.outputs[0].name = f"{entry.name}_rotated"
        node.outputs[0].dtype = entry.dtype
        node.outputs[0].shape = entry.shape
        graph.insert_before(next(iter(graph)), [node])
        for use in uses:
            use.node.replace_input_with(use.idx, node.outputs[0])

    def _scaled_sign_matrix(self, graph: ir.Graph, name: str, signs: np.ndarray, dtype: np.dtype) -> ir.Value:
        """``Mul(Cast(S), 1/sqrt(n))`` for the ±1 int8 matrix S [n, n] of a rotation, computed once per name.

        Stored as ±1 int8, not as a float initializer: a ``MatMul`` with a constant float weight is a linear
        layer of the model map, and the rotation must not be quantized as one.
        """
        cache = self.__dict__.setdefault("_matrices", {})
        if name in cache:
            return cache[name]
        n = signs.shape[0]
        s_value = add_initializer(graph, f"{name}.signs", signs)
        f_value = add_initializer(graph, f"{name}.scale", np.array(1.0 / np.sqrt(n), dtype=dtype))
        cast = ir.node("Cast", [s_value], attributes={"to": ir.DataType.from_numpy(np.dtype(dtype))}, name=f"{name}/cast")
        mul = ir.node("Mul", [cast.outputs[0], f_value], name=f"{name}/scale")
        mul.outputs[0].name = name
        graph.insert_before(next(iter(graph)), [cast, mul])
        cache[name] = mul.outputs[0]
        return mul.outputs[0]

    def _online_hadamard(self, graph: ir.Graph, lin: Linear) -> dict[str, Any]:
        n = lin.in_features
        size = n if supported_size(n) else padded_size(n)
        x = lin.input
        dtype = constant_array(lin.weight).dtype
        h_value = self._scaled_sign_matrix(graph, f"mqc.H{size}", hadamard_signs(size), dtype)
        nodes = []
        if size != n:
            pads = add_initializer(graph, f"{lin.name}/hadamard_pads", np.array([0, size - n], dtype=np.int64))
            axes = add_initializer(graph, f"{lin.name}/hadamard_axes", np.array([-1], dtype=np.int64))
            pad = ir.node("Pad", [x, pads, None, axes], name=f"{lin.name}/hadamard_pad")
            pad.outputs[0].name = f"{lin.name}/hadamard_padded"
            nodes.append(pad)
            x = pad.outputs[0]
        matmul = ir.node("MatMul", [x, h_value], name=f"{lin.name}/online_hadamard")
        matmul.outputs[0].name = f"{lin.name}/hadamard_out"
        # The rotated value keeps the input's rank (and its width when unpadded): MSQ needs the [batch, seq, K] form.
        matmul.outputs[0].dtype = ir.DataType.from_numpy(np.dtype(dtype))
        if lin.input.shape is not None:
            dims = list(lin.input.shape)
            matmul.outputs[0].shape = ir.Shape([*dims[:-1], size if size != n else dims[-1]])
        nodes.append(matmul)
        graph.insert_before(lin.node, nodes)
        lin.node.replace_input_with(0, matmul.outputs[0])
        weight = lin.weight_array().astype(np.float64)
        if size != n:
            weight = np.vstack([weight, np.zeros((size - n, weight.shape[1]))])
        own_weight(graph, lin)
        set_weight(lin, hadamard_transpose_times(weight))
        return {"online_hadamard": size, "online_hadamard_padded_from": n if size != n else None}

    def _rotate_head(self, graph: ir.Graph, lin: Linear, head_dim: int, kv_heads: int) -> dict[str, Any]:
        h = hadamard_matrix(head_dim)
        own_weight(graph, lin)
        weight = lin.weight_array().astype(np.float64)
        if lin.role == "v":  # output columns, one H per kv-head block
            blocks = weight.shape[1] // head_dim
            weight = (weight.reshape(-1, blocks, head_dim) @ h).reshape(weight.shape)
            if lin.bias is not None:
                own_bias(graph, lin)
                bias = constant_array(lin.bias).astype(np.float64)
                set_bias(lin, (bias.reshape(blocks, head_dim) @ h).reshape(-1))
        else:  # o: input rows, Hᵀ per attention head
            blocks = weight.shape[0] // head_dim
            weight = np.einsum("ji,bjo->bio", h, weight.reshape(blocks, head_dim, -1)).reshape(weight.shape)
        set_weight(lin, weight)
        return {"vo_hadamard": f"H{head_dim} on {blocks} {'output' if lin.role == 'v' else 'input'} blocks"}


def _signs(matrix: np.ndarray) -> np.ndarray:
    """The ±1 int8 entries of a rotation whose entries are ±1/sqrt(n) (R1, R_v)."""
    signs = np.rint(matrix * np.sqrt(matrix.shape[0]))
    assert np.array_equal(np.abs(signs), np.ones_like(signs)), "not a scaled ±1 matrix"
    return signs.astype(np.int8)
