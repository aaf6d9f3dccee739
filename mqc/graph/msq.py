"""MSQ: modality-specific static activation quantization (spec/algorithms.md §2.3; graph form §5 item 4).

One static symmetric scale per modality per quantization point: Δ_t from the calibration rows of text tokens, Δ_v
from the rows of image tokens (``TapStats.modality``), each clipped by the activation method of the quantization
pass. At run time every token row uses the scale of its own modality; decode steps (text tokens) use Δ_t.

It is enabled by ``QuantizeLinearsPass(act_scales="per_modality")`` (recipe ``w4a8-msq``); this module holds the
graph form, which only uses standard ONNX ops so stock onnxruntime runs it.

Graph pattern (exact; ``passes.lower_runtime_ops`` matches it). Shared once per graph::

    is_image = Equal(Unsqueeze(modality_ids, axes=[-1]), 1)            # bool [B, S, 1]; 1 is an int64 scalar
                                                                       # initializer "mqc_msq_image_id"

and per quantization point (value ``X`` of float type T, its readers all quantized linears)::

    s    = Where(is_image, s_image, s_text)                            # T [B, S, 1]; s_* are T scalars
    x_dq = Mul(Clip(Round(Div(X, s)), qmin, qmax), s)                  # qmin/qmax: T scalars (-128, 127 for int8)

Node names: ``mqc_msq/is_image_unsqueeze``, ``mqc_msq/is_image`` (shared); ``{X}/msq_scale`` (Where),
``{X}/msq_div``, ``{X}/msq_round``, ``{X}/msq_clip``, ``{X}/msq_dequant`` (Mul). Initializers: ``{X}_act_scale_text``,
``{X}_act_scale_image``, ``{X}_act_qmin``, ``{X}_act_qmax``. ``Round`` is round-half-to-even, as QuantizeLinear.

Rules:
1. A modality with no calibration rows at a quantization point takes the other modality's scale (recorded).
2. A graph without a ``modality_ids`` input (a vision encoder) has one modality: the pass emits the plain
   per-tensor QDQ with that modality's scale and records that MSQ degenerated.
3. ``X`` must have rank 3 ([batch, seq, features], the layout of ``modality_ids`` plus one axis); any other rank
   (a flattened [tokens, features] input) is refused for MSQ and falls back to the shared per-tensor QDQ (recorded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from mqc.calibration import IMAGE, MODALITY_INPUT
from mqc.ir import add_initializer
from mqc.quantizer import qrange

IS_IMAGE_NAME = "mqc_msq_is_image"


def modality_input(graph: ir.Graph) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == MODALITY_INPUT), None)


def is_image_mask(graph: ir.Graph, modality_ids: ir.Value) -> ir.Value:
    """The shared ``Equal(Unsqueeze(modality_ids, [-1]), 1)`` mask, created once at the top of the graph."""
    for node in graph:
        if node.outputs and node.outputs[0].name == IS_IMAGE_NAME:
            return node.outputs[0]
    axes = add_initializer(graph, "mqc_msq_axes", np.array([-1], dtype=np.int64))
    image_id = add_initializer(graph, "mqc_msq_image_id", np.array(IMAGE, dtype=np.int64))
    unsqueeze = ir.node("Unsqueeze", [modality_ids, axes], name="mqc_msq/is_image_unsqueeze")
    unsqueeze.outputs[0].name = "mqc_msq_modality_ids_u"
    equal = ir.node("Equal", [unsqueeze.outputs[0], image_id], name="mqc_msq/is_image")
    equal.outputs[0].name = IS_IMAGE_NAME
    first = next(iter(graph))
    graph.insert_before(first, [unsqueeze, equal])
    return equal.outputs[0]


def value_rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def insert_activation_msq(
    graph: ir.Graph,
    value: ir.Value,
    scale_text: float,
    scale_image: float,
    bits: int,
    readers: Sequence[ir.Node],
    is_image: ir.Value,
) -> ir.Value:
    """The per-token fake-quant of the module docstring (MSQ) in front of ``readers``; returns ``x_dq``."""
    base = value.name or "act"
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    lo, hi = qrange(bits)
    s_text = add_initializer(graph, f"{base}_act_scale_text", np.array(scale_text, dtype=dtype))
    s_image = add_initializer(graph, f"{base}_act_scale_image", np.array(scale_image, dtype=dtype))
    qmin = add_initializer(graph, f"{base}_act_qmin", np.array(lo, dtype=dtype))
    qmax = add_initializer(graph, f"{base}_act_qmax", np.array(hi, dtype=dtype))
    where = ir.node("Where", [is_image, s_image, s_text], name=f"{base}/msq_scale")
    where.outputs[0].name = f"{base}_msq_scale"
    div = ir.node("Div", [value, where.outputs[0]], name=f"{base}/msq_div")
    rnd = ir.node("Round", [div.outputs[0]], name=f"{base}/msq_round")
    clip = ir.node("Clip", [rnd.outputs[0], qmin, qmax], name=f"{base}/msq_clip")
    clip.outputs[0].name = f"{base}_msq_q"
    mul = ir.node("Mul", [clip.outputs[0], where.outputs[0]], name=f"{base}/msq_dequant")
    mul.outputs[0].name = f"{base}_dq"
    mul.outputs[0].dtype = value.dtype
    mul.outputs[0].shape = value.shape
    order = {id(node): i for i, node in enumerate(graph)}
    first = min(readers, key=lambda node: order[id(node)])
    graph.insert_before(first, [where, div, rnd, clip, mul])
    for reader in readers:
        for index, inp in enumerate(reader.inputs):
            if inp is value:
                reader.replace_input_with(index, mul.outputs[0])
    return mul.outputs[0]
