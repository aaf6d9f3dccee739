"""Test helper shared by the decoder pass tests: a tiny decoder whose norms carry distinct random gammas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from mqc.passes.canonicalize import FuseNormsPass

from mqc.calibration import random_feeds
from mqc.ir import add_initializer, constant_array, load_model
from mqc.pass_manager import CompileContext, PassManager


def with_random_gammas(path: Path, seed: int = 0) -> tuple[ir.Model, CompileContext]:
    """The decoder with fused norms and a distinct random gamma per norm (exported gammas are all ones)."""
    model = load_model(path)
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=5), verify=True)
    PassManager([FuseNormsPass()], ctx).run(model)
    rng = np.random.default_rng(seed)
    for norm in ctx.model_map(model).norms:
        width = constant_array(norm.scale).shape[0]
        gamma = add_initializer(model.graph, f"{norm.name}.gamma", (1 + 0.5 * rng.standard_normal(width)).astype(np.float32))
        norm.node.replace_input_with(1, gamma)
    ctx.invalidate()
    return model, ctx


def channel_gap_feeds(model_path: Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """random_feeds with channel 0 of every image row x30: the modality gap as visual tokens show it.

    Scaling whole image rows would be normalised away by the first RMSNorm; an outlier channel survives it and makes
    the image rows' absmax about 2x the text rows' after the norm.
    """
    feeds = []
    for feed in random_feeds(load_model(model_path), n, seed=seed):
        embeds = feed["inputs_embeds"].copy()
        embeds[feed["modality_ids"] == 1, :1] *= 30.0
        feeds.append({**feed, "inputs_embeds": embeds})
    return feeds


def with_outputs(path: Path, names: list[str], out: Path) -> Path:
    """A copy of the model at ``path`` that also returns the intermediate values ``names``."""
    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(out))
    return out
