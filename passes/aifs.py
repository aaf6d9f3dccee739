"""AIFS: attention-invariant flexible switching (spec/algorithms.md §2.4; graph form §5 item 4).

Inside the decoder graph, the tokens of every sequence are permuted so that image tokens form one contiguous block
at the front, text tokens follow, each in their original relative order. Every per-token op (norms, MLPs, all
linears) commutes with the permutation P; attention is kept exact by a mask built from ORIGINAL token indices:
M'[a, b] = 0 iff orig(b) ≤ orig(a) and key b is not padding. So softmax(Q'K'ᵀ/√d + M')V' = P·softmax(QKᵀ/√d + M)V.

Graph form, all standard ONNX ops (node and value names start with ``mqc_aifs``). With ``seq = Shape(modality_ids)[1]``,
``total = Shape(attention_mask)[1]`` and ``past = total - seq``::

    group  = Where(attention_mask[:, past:] == 0, 0, Where(modality_ids == 1, 1, 2))    # pad, image, text
    key    = group * seq + Range(0, seq)                                                # unique per row
    perm   = TopK(key, k=seq, axis=1, largest=0, sorted=1).indices                      # [B, seq], π: new -> orig
    inv    = TopK(perm, k=seq, axis=1, largest=0, sorted=1).indices                     # π⁻¹
    rows   = perm + seq * Range(0, B)[:, None], flattened                                 # [B * seq]
    inputs_embeds' = Reshape(Gather(Flatten(inputs_embeds, 2), rows, axis=0))           # per row (batch > 1)
    position_ids', modality_ids' = GatherElements(..., perm, axis=1)
    q_orig = past + perm                                   # original index of each query   [B, seq]
    k_orig = Concat(Range(0, past) per row, q_orig)        # original index of each key slot [B, total]
    logits = Reshape(Gather(Flatten(logits', 2), inv + seq * Range(0, B)[:, None], axis=0))   # original order

Rules:
1. The graph needs the inputs ``inputs_embeds`` [B, S, D], ``attention_mask`` [B, past+S], ``position_ids``
   [B or 1, S] and ``modality_ids`` [B, S]; otherwise the pass is refused with the reason (nothing changed).
   3-D (M-RoPE) position ids are refused.
2. The causal mask: every ``LessOrEqual(kv_idx, q_idx)`` (or ``GreaterOrEqual(q_idx, kv_idx)``) whose operands are
   ``Unsqueeze`` chains of ``Range`` values (the query side through ``Add(Range, past)``, the cache position) is
   found; all uses of its key operand (the causal compare and the padding ``GatherND`` into ``attention_mask``) are
   given ``k_orig`` and all uses of the query operand ``q_orig``, both reshaped to the operand's rank with the batch
   on axis 0. None found: refused. Stale static shapes (batch 1) downstream are cleared.
3. RoPE sees the original positions because ``position_ids`` itself is permuted with the tokens.
4. Every other use of ``inputs_embeds``, ``position_ids`` and ``modality_ids`` reads the permuted value; in
   particular MSQ's ``is_image`` mask (``mqc/graph/msq.py``) reads the permuted ``modality_ids`` (recorded), so its
   per-token scales follow the tokens. ``attention_mask`` stays in original order (only the mask builder reads it).
5. ``logits`` is un-permuted, so it equals the original graph's token by token. ``present.*`` (the KV cache) stays in
   permuted order: exact for decode, since a decode token at a later position attends to every cached entry and
   the cached keys already carry their rotary phase. ``verify_outputs`` therefore compares every output but
   ``present.*``. Padding tokens go first (group 0): for left padding they keep their slots, so the padding
   bits of ``attention_mask[:, :past]`` still match the permuted cache in later decode steps.
6. Order in a recipe: after the quantization pass. The calibrator labels token rows with the feed's
   ``modality_ids`` in original order, so a per-modality quantization pass refuses a graph that AIFS already
   permuted (``passes/quantize_linears.py``); AIFS at inference is step 5 of the paper's pipeline (§2.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_INPUT
from mqc.graph.markers import aifs_applied, mark_aifs
from mqc.ir import add_initializer
from mqc.pass_manager import MqcPass

PREFIX = "mqc_aifs"
#: The permuted modality ids (the value MSQ reads after AIFS).
PERMUTED_MODALITY = f"{PREFIX}_modality_ids"
PERMUTATION = f"{PREFIX}_perm"
INDEX_CHAIN_OPS = {"Unsqueeze", "Cast", "Reshape", "Identity"}


class AifsRefused(Exception):
    """The graph lacks what AIFS needs; the message is the recorded reason."""


class AifsPass(MqcPass):
    """Permute tokens image-first inside the decoder with an original-position attention mask."""

    name = "aifs"
    function_preserving = True
    verify_exclusion_reason = (
        "AIFS leaves the KV cache (present.*) in its permuted token order; logits are un-permuted and compared"
    )

    def variant(self) -> str:
        return ("the paper's AIFS (§2.4; the released code has none), applied after quantization: calibration labels "
                "rows in the feed's order and static scales do not depend on token order")

    def verify_outputs(self, model: ir.Model) -> list[str] | None:
        return [v.name for v in model.graph.outputs if v.name and not v.name.startswith(self.params.cache_prefix)]

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        try:
            if aifs_applied(graph):
                raise AifsRefused("the graph is already permuted by AIFS")
            inputs = self._inputs(graph)
            compares = self._causal_compares(graph)
            logits = next((v for v in graph.outputs if v.name == self.params.logits), None)
            if logits is None:
                raise AifsRefused(f"no graph output {self.params.logits!r} to un-permute")
        except AifsRefused as exc:
            self.record.skip("model", str(exc))
            return False
        self._rewrite(graph, inputs, compares, logits)
        self.record.matched = self.record.changed = len(compares)
        for key, query in compares:
            self.record.layers.append({"name": f"{PREFIX}/mask", "key_index": key.name, "query_index": query.name})
        self.record.notes.append(
            f"tokens permuted pad|image|text per row ({PERMUTATION}); the causal mask compares original indices "
            f"({len(compares)} compare(s) rewired); logits un-permuted; present.* stays in permuted order")
        self.record.notes.append(
            f"MSQ composes through the permuted modality ids ({PERMUTED_MODALITY}): every reader of modality_ids, "
            "including the is_image mask of mqc/graph/msq.py, now reads it")
        return True

    def ensures(self, model: ir.Model) -> None:
        """Once applied, only the permutation reads the token inputs (rule 4) and ``logits`` is un-permuted (rule 5)."""
        if not self.record.changed:
            return
        graph = model.graph
        for value in graph.inputs:
            if value.name not in ("inputs_embeds", "position_ids", MODALITY_INPUT):
                continue
            stray = [use.node for use in value.uses() if use.node.graph is graph
                     and not (use.node.name or "").startswith(f"{PREFIX}/")]
            if stray:
                raise self.broken(f"graph input {value.name} is still read unpermuted by {stray[0].op_type} "
                                  f"{stray[0].name}")
        logits = next((v for v in graph.outputs if v.name == self.params.logits), None)
        producer = logits.producer() if logits is not None else None
        if producer is None or producer.name != f"{PREFIX}/unpermute_logits":
            raise self.broken(f"graph output {self.params.logits!r} is not the un-permuted logits")

    # --- analysis -------------------------------------------------------------------------------------------

    def _inputs(self, graph: ir.Graph) -> dict[str, ir.Value]:
        found = {v.name: v for v in graph.inputs}
        inputs = {}
        for name in ("inputs_embeds", "attention_mask", "position_ids", MODALITY_INPUT):
            if name not in found:
                raise AifsRefused(f"graph input {name!r} not found")
            inputs[name] = found[name]
        pos = inputs["position_ids"]
        if pos.shape is not None and len(pos.shape) != 2:
            raise AifsRefused(f"position_ids has rank {len(pos.shape)} (M-RoPE?): only [batch, seq] is supported")
        return inputs

    def _causal_compares(self, graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
        """(key index, query index) operands of the causal comparisons (rule 2)."""
        compares = []
        for node in graph:
            if node.op_type == "LessOrEqual":
                key, query = node.inputs[0], node.inputs[1]
            elif node.op_type == "GreaterOrEqual":
                query, key = node.inputs[0], node.inputs[1]
            else:
                continue
            if key is None or query is None:
                continue
            key_root, query_root = _index_root(key), _index_root(query)
            if key_root is None or query_root is None:
                continue
            cache_position = query_root.op_type == "Add" and any(
                v is not None and v.producer() is not None and v.producer().op_type == "Range" for v in query_root.inputs)
            if key_root.op_type == "Range" and cache_position:
                if _rank(key) is None or _rank(query) is None:
                    raise AifsRefused(f"causal compare {node.name}: operand ranks unknown")
                compares.append((key, query))
        if not compares:
            raise AifsRefused("no causal comparison LessOrEqual(kv_idx, q_idx) of Range-derived indices found")
        return compares

    # --- rewriting ------------------------------------------------------------------------------------------

    def _rewrite(self, graph: ir.Graph, inputs: dict[str, ir.Value], compares: Sequence[tuple[ir.Value, ir.Value]],
                 logits: ir.Value) -> None:
        b = _Builder(graph)
        embeds, mask, pos, modality = (inputs[n] for n in ("inputs_embeds", "attention_mask", "position_ids", MODALITY_INPUT))
        old_uses = {name: list(value.uses()) for name, value in inputs.items()}
        i64 = lambda name, v: add_initializer(graph, f"{PREFIX}_{name}", np.array(v, dtype=np.int64))  # noqa: E731
        zero, one, two = i64("zero", 0), i64("one", 1), i64("two", 2)
        axis1 = i64("axis1", [1])
        mod_shape = b("Shape", [modality], "mod_shape")
        seq_1d = b("Shape", [modality], "seq_1d", start=1, end=2)
        batch_1d = b("Shape", [modality], "batch_1d", start=0, end=1)
        total_1d = b("Shape", [mask], "total_1d", start=1, end=2)
        past_1d = b("Sub", [total_1d, seq_1d], "past_1d")
        seq = b("Squeeze", [seq_1d], "seq")
        past = b("Squeeze", [past_1d], "past")
        arange = b("Range", [zero, seq, one], "arange")
        current_mask = b("Slice", [mask, past_1d, total_1d, axis1], "current_mask")
        is_pad = b("Equal", [current_mask, b("CastLike", [zero, current_mask], "zero_like")], "is_pad")
        image_id = add_initializer(graph, f"{PREFIX}_image_id", np.array(IMAGE, dtype=np.int64))
        is_image = b("Equal", [b("Cast", [modality], "modality_i64", to=ir.DataType.INT64), image_id], "is_image")
        group = b("Where", [is_pad, zero, b("Where", [is_image, one, two], "group_tokens")], "group")
        key = b("Add", [b("Mul", [group, seq], "group_offset"), arange], "sort_key")
        perm = b("TopK", [key, seq_1d], "sort", outputs=2, axis=1, largest=0, sorted=1)[1]
        mark_aifs(perm.producer())
        perm.name = PERMUTATION
        inv = b("TopK", [perm, seq_1d], "inverse_sort", outputs=2, axis=1, largest=0, sorted=1)[1]
        inv.name = f"{PREFIX}_inverse"
        # Row r of a flattened [B*seq, ...] tensor is token (r // seq, r % seq): one Gather of whole rows reorders the
        # embeddings and the logits (GatherElements needs its index expanded to the data's shape, [B, seq, vocab] int64
        # for the logits; 43 tokens of the tiny VLM's vocabulary: 4.4 ms against 1.4 ms, one thread).
        row_base = b("Mul", [b("Unsqueeze", [b("Range", [zero, b("Squeeze", [batch_1d], "batch"), one], "batch_range"),
                                             i64("axis1_u", [1])], "batch_range_u"), seq], "row_base")
        flat = i64("flat", [-1])
        flat_perm = b("Reshape", [b("Add", [perm, row_base], "perm_rows"), flat], "flat_perm")
        new = {
            "inputs_embeds": _reorder_rows(b, embeds, flat_perm, "inputs_embeds"),
            "position_ids": b("GatherElements", [b("Expand", [pos, mod_shape], "pos_b"), perm], "position_ids", axis=1),
            MODALITY_INPUT: b("GatherElements", [modality, perm], "modality_ids", axis=1),
        }
        new[MODALITY_INPUT].name = PERMUTED_MODALITY
        for name, value in new.items():
            value.dtype, value.shape = inputs[name].dtype, inputs[name].shape
            for use in old_uses[name]:
                use.node.replace_input_with(use.idx, value)
        q_orig = b("Add", [perm, past], "q_orig")
        past_range = b("Range", [zero, past, one], "past_range")
        past_rows = b("Expand", [b("Unsqueeze", [past_range, i64("axis0", [0])], "past_range_u"),
                                 b("Concat", [batch_1d, past_1d], "past_shape", axis=0)], "past_rows")
        k_orig = b("Concat", [past_rows, q_orig], "k_orig", axis=1)
        for key_value, query_value in compares:
            self._rewire(graph, b, key_value, k_orig, "k")
            self._rewire(graph, b, query_value, q_orig, "q")
        # logits: rename the permuted value, un-permute into a new output of the old name
        flat_inv = b("Reshape", [b("Add", [inv, row_base], "inv_rows"), flat], "flat_inv")
        out_name = logits.name
        logits.name = f"{PREFIX}_{out_name}_permuted"
        restored = _reorder_rows(b, logits, flat_inv, "unpermute_logits")
        restored.name, restored.dtype, restored.shape = out_name, logits.dtype, logits.shape
        graph.outputs[list(graph.outputs).index(logits)] = restored
        graph.sort()

    def _rewire(self, graph: ir.Graph, b: _Builder, old: ir.Value, orig: ir.Value, tag: str) -> None:
        """Give every reader of ``old`` (rank r, one non-1 axis) ``orig`` [B, L] reshaped to rank r, batch on axis 0."""
        rank = _rank(old)
        dims = list(old.shape.dims)
        long_axes = [i for i, d in enumerate(dims) if d != 1]
        if rank is None or len(long_axes) != 1 or long_axes[0] == 0:
            raise AifsRefused(f"index {old.name} has shape {old.shape}: expected one non-1 axis after axis 0")
        axes = [i for i in range(1, rank) if i != long_axes[0]]
        axes_value = add_initializer(graph, f"{PREFIX}_{tag}_axes", np.array(axes, dtype=np.int64))
        value = b("Unsqueeze", [orig, axes_value], f"{tag}_index") if axes else orig
        uses = list(old.uses())
        for use in uses:
            use.node.replace_input_with(use.idx, value)
        _clear_batch1_shapes([use.node for use in uses])


class _Builder:
    """Appends ``mqc_aifs/<name>`` nodes in front of the graph's first node; returns the output value(s)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.anchor = next(iter(graph))

    def __call__(self, op: str, inputs: Sequence[ir.Value | None], name: str, outputs: int = 1, **attrs: Any) -> Any:
        node = ir.node(op, list(inputs), attributes=attrs, name=f"{PREFIX}/{name}", num_outputs=outputs)
        for index, out in enumerate(node.outputs):
            out.name = f"{PREFIX}_{name}" if index == 0 or outputs == 1 else f"{PREFIX}_{name}_{index}"
        self.graph.insert_before(self.anchor, node)
        return node.outputs if outputs > 1 else node.outputs[0]


def _reorder_rows(b: _Builder, data: ir.Value, flat_index: ir.Value, name: str) -> ir.Value:
    """``data`` [B, seq, ...] with each row's tokens in the order of ``flat_index`` (row-major into [B*seq]); the
    last node is named ``name``."""
    rows = b("Flatten", [data], f"{name}_rows", axis=2)
    gathered = b("Gather", [rows, flat_index], f"{name}_gather", axis=0)
    return b("Reshape", [gathered, b("Shape", [data], f"{name}_shape")], name)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _index_root(value: ir.Value) -> ir.Node | None:
    """The first producer of ``value`` that is not an Unsqueeze/Cast/Reshape/Identity."""
    for _ in range(8):
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type not in INDEX_CHAIN_OPS:
            return producer
        value = producer.inputs[0]
    return None


def _clear_batch1_shapes(nodes: list[ir.Node]) -> None:
    """Forget static shapes with batch 1 downstream of ``nodes`` (they now broadcast over the batch)."""
    frontier = list(nodes)
    seen: set[int] = set()
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.outputs:
            if out.shape is not None and len(out.shape) > 0 and out.shape.dims[0] == 1:
                out.shape = None
                frontier.extend(use.node for use in out.uses())
