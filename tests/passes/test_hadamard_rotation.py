"""RotateResidualPass: R1 residual rotation, online Hadamard before down_proj (padded too), optional V/O."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from decoder_helpers import with_random_gammas
from mqc.passes.canonicalize import FuseNormsPass
from mqc.passes.hadamard_rotation import RotateResidualPass
from mqc.passes.ln_to_rmsnorm import LayerNormToRMSNormPass
from mqc.passes.norm_folding import FoldNormsPass
from vision_models import export_tower, with_projector

from mqc.calibration import random_feeds
from mqc.errors import RecipeNotApplied
from mqc.hadamard import hadamard_matrix
from mqc.ir import add_initializer, load_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.session import open_session


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotation_preserves_all_outputs(tiny_decoder, family):
    model, ctx = with_random_gammas(tiny_decoder(family))
    fold, rotate = PassManager([FoldNormsPass(), RotateResidualPass(seed=7)], ctx).run(model)  # verify=True
    assert fold.verify["max_rel"] < 1e-4 and rotate.verify["max_rel"] < 1e-4
    assert not rotate.skipped and rotate.changed == 15 + 2  # every linear reads or writes the stream, + 2 online Hadamards
    assert "seed=7" in rotate.notes[0]
    rows = {row["name"]: row for row in rotate.layers}
    assert sum(row["r1"] == "input" for row in rows.values()) == 11
    assert {name for name, row in rows.items() if row["r1"] == "output"} == {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert rows["model.layers.1.mlp.down_proj"]["online_hadamard"] == 128
    assert rows["model.layers.1.mlp.down_proj"]["online_hadamard_padded_from"] is None
    assert rows["lm_head"]["r1"] == "input"
    linears = ctx.model_map(model).linears
    assert len(linears) == 15, "rotation matrices must not show up as linear layers"
    assert not any(lin.name.startswith("mqc.") for lin in linears)


def test_refuses_unfolded_norms(tiny_decoder):
    model, ctx = with_random_gammas(tiny_decoder("llama"))
    with pytest.raises(RecipeNotApplied, match=r"pass hadamard_rotation cannot do its work on this model: .*non-folded"):
        PassManager([RotateResidualPass()], ctx).run(model)  # a failed precondition stops the recipe
    ctx.allow_partial = True  # --allow-partial: recorded, and the recipe goes on
    (record,) = PassManager([RotateResidualPass()], ctx).run(model)
    assert record.changed == 0 and "non-folded gamma: run norm_folding first" in record.not_applied


def test_rotate_vo_keeps_logits_and_rotates_cached_values_per_head(tiny_decoder):
    model, _ = with_random_gammas(tiny_decoder("qwen2"))
    ctx = CompileContext(lambda: random_feeds(model, 1, seed=5))
    PassManager([FoldNormsPass()], ctx).run(model)
    before = ctx.run_outputs(model)[0]
    (record,) = PassManager([RotateResidualPass(rotate_vo=True)], ctx).run(model)
    after = ctx.run_outputs(model)[0]
    rows = {row["name"]: row for row in record.layers}
    assert rows["model.layers.0.self_attn.v_proj"]["vo_hadamard"] == "H16 on 2 output blocks"
    assert rows["model.layers.0.self_attn.o_proj"]["vo_hadamard"] == "H16 on 4 input blocks"
    h = hadamard_matrix(16)
    for name, a, b in zip(("logits", "k0", "v0", "k1", "v1"), before, after, strict=True):
        expected = a @ h if name.startswith("v") else a  # [batch, kv_heads, seq, head_dim]: V·H per head
        np.testing.assert_allclose(b, expected, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_rotate_vo_verifies_and_decodes_from_its_own_cache(tiny_decoder, tmp_path):
    """Under --verify the value cache is left out (recorded); a decode step fed this graph's cache matches float."""
    path = tiny_decoder("llama")
    model, ctx = with_random_gammas(path)
    _, rotate = PassManager([FoldNormsPass(), RotateResidualPass(rotate_vo=True)], ctx).run(model)
    assert rotate.changed and rotate.verify["max_rel"] < 1e-4
    assert rotate.verify["excluded"] == ["present.0.value", "present.1.value"]
    assert "present.*.value" in rotate.verify["excluded_reason"]
    reference, _ = with_random_gammas(path)
    PassManager([FoldNormsPass()], CompileContext(lambda: random_feeds(reference, 1))).run(reference)
    sessions = []
    for name, graph in (("float", reference), ("rotated", model)):
        ir.save(graph, tmp_path / f"{name}.onnx")
        sessions.append(open_session(tmp_path / f"{name}.onnx"))
    prefill = random_feeds(model, 1, seed=3)[0]
    seq = prefill["inputs_embeds"].shape[1]
    step = {**prefill, "inputs_embeds": np.random.default_rng(4).standard_normal(prefill["inputs_embeds"][:, :1].shape).astype(np.float32),
            "attention_mask": np.ones((1, seq + 1), prefill["attention_mask"].dtype),
            "position_ids": np.full((1, 1), seq, prefill["position_ids"].dtype),
            "modality_ids": np.zeros((1, 1), prefill["modality_ids"].dtype)}
    logits = []
    for session in sessions:
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(None, prefill), strict=True))
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        logits.append(session.run(["logits"], {**step, **past})[0])
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4 * np.abs(logits[0]).max())


def _mlp_graph(hidden: int, inter: int, seed: int = 0) -> ir.Model:
    """inputs_embeds -> RMSNorm -> up -> Relu -> down -> + residual -> RMSNorm -> lm_head, with biases."""
    x = ir.Value(name="inputs_embeds", shape=ir.Shape([1, 5, hidden]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="mlp")
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return add_initializer(graph, name, rng.standard_normal(shape).astype(np.float32))

    ones = add_initializer(graph, "norm.weight", np.ones(hidden, np.float32))
    n1 = ir.node("RMSNormalization", [x, ones], name="n1")
    up = ir.node("MatMul", [n1.outputs[0], init("model.layers.0.mlp.up_proj.weight", hidden, inter)], name="up")
    act = ir.node("Relu", [up.outputs[0]], name="act")
    down = ir.node("MatMul", [act.outputs[0], init("model.layers.0.mlp.down_proj.weight", inter, hidden)], name="down")
    bias = ir.node("Add", [down.outputs[0], init("model.layers.0.mlp.down_proj.bias", hidden)], name="down_bias")
    res = ir.node("Add", [x, bias.outputs[0]], name="residual")
    n2 = ir.node("RMSNormalization", [res.outputs[0], ones], name="n2")
    head = ir.node("MatMul", [n2.outputs[0], init("lm_head.weight", hidden, 10)], name="lm_head")
    for node in (n1, up, act, down, bias, res, n2, head):
        graph.append(node)
    head.outputs[0].name = "logits"
    graph.outputs.append(head.outputs[0])
    return ir.Model(graph, ir_version=10)


def test_online_hadamard_pads_a_non_hadamard_intermediate_size():
    model = _mlp_graph(hidden=8, inter=11)
    feeds = [{"inputs_embeds": np.random.default_rng(i).standard_normal((1, 5, 8)).astype(np.float32)} for i in range(2)]
    ctx = CompileContext(lambda: feeds, verify=True)
    (record,) = PassManager([RotateResidualPass(seed=1)], ctx).run(model)
    assert record.verify["max_rel"] < 1e-5
    down_row = next(row for row in record.layers if row["role"] == "down")
    assert down_row["online_hadamard"] == 12 and down_row["online_hadamard_padded_from"] == 11
    assert any(node.op_type == "Pad" for node in model.graph)
    down = next(lin for lin in ctx.model_map(model).linears if lin.role == "down")
    assert down.in_features == 12


def test_refuses_a_stream_value_read_by_a_non_commuting_op():
    model = _mlp_graph(hidden=8, inter=16)
    x = model.graph.inputs[0]
    probe = ir.node("ReduceMax", [x], name="probe")
    model.graph.append(probe)
    probe.outputs[0].name = "probe"
    model.graph.outputs.append(probe.outputs[0])
    feeds = [{"inputs_embeds": np.ones((1, 5, 8), np.float32)}]
    (record,) = PassManager([RotateResidualPass()], CompileContext(lambda: feeds, allow_partial=True)).run(model)
    assert record.changed == 0
    assert "is read by ReduceMax probe, which does not commute with the rotation" in record.skipped[0]["reason"]


# --- vision tower (rule 7): R_v after ln_to_rmsnorm ------------------------------------------------------------

REAL_TOWER = Path.home() / ".cache/mqc/tiny-vlm-features/dinov2_pooled.onnx"


@pytest.fixture(scope="module")
def towers(export_cache) -> dict[str, Path]:
    """The DINOv2 towers of test_ln_to_rmsnorm, exported once per run."""
    return {name: export_cache.get(f"tower-{name}", partial(export_tower, name)) for name in ("dinov2", "dinov2_pooled")}


def rotate_tower(path: Path, convert: bool = True, projector: bool = False,
                 allow_partial: bool = False, **rotate: object) -> tuple[ir.Model, CompileContext, list]:
    model = load_model(path)
    if projector:
        model = with_projector(model)
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=5), verify=True, allow_partial=allow_partial)
    passes = [FuseNormsPass(), *([LayerNormToRMSNormPass()] if convert else []), RotateResidualPass(seed=7, **rotate)]
    return model, ctx, PassManager(passes, ctx).run(model)


def test_vision_tower_rotation_is_exact(towers):
    model, ctx, records = rotate_tower(towers["dinov2"])
    rotate = records[-1]
    assert rotate.verify["max_rel"] < 1e-5 and not rotate.skipped
    assert rotate.params["tower"] == "auto" and "random_hadamard(32, seed=7)" in rotate.notes[0]
    rows = {row["name"]: row for row in rotate.layers}
    assert rows["node_conv2d"]["r_v"] == "output channels"
    assert rows["vision_tower.embeddings.position_embeddings.centred"]["r_v"] == "axis 2"
    assert rows["multi_modal_projector.0"]["r_v"] == "input side"
    for i in (0, 1):
        layer = f"vision_tower.encoder.layer.{i}"
        assert rows[f"{layer}.attention.o_proj"]["r_v"] == "output side"
        assert rows[f"{layer}.mlp.fc2"]["r_v"] == "output side" and rows[f"{layer}.mlp.fc2"]["online_hadamard"] == 128
        for reader in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"):
            assert rows[f"{layer}.{reader}"]["r_v"] == "input side"
    assert "multi_modal_projector.2" not in rows
    linears = ctx.model_map(model).linears
    assert len(linears) == 14 and not any(lin.name.startswith("mqc.") for lin in linears)


def test_vision_tower_per_head_vo_hadamard_is_exact(towers):
    """The released code's per-head V/O Hadamard inside each vision attention (2 heads of 16)."""
    _, _, records = rotate_tower(towers["dinov2"], rotate_vo=True, head_dim=16)
    rotate = records[-1]
    assert rotate.verify["max_rel"] < 1e-5 and not rotate.skipped, rotate.verify
    rows = {row["name"]: row for row in rotate.layers}
    for i in (0, 1):
        layer = f"vision_tower.encoder.layer.{i}.attention"
        assert rows[f"{layer}.v_proj"]["vo_hadamard"] == "H16 on 2 output blocks"
        assert rows[f"{layer}.o_proj"]["vo_hadamard"] == "H16 on 2 input blocks"
    assert rotate.notes[-1] == "per-head V/O Hadamard in the vision attention (head_dim 16)"


def test_vision_norm_with_pooling_reader_is_unrotated_online(towers):
    _, _, records = rotate_tower(towers["dinov2_pooled"])
    rotate = records[-1]
    assert rotate.verify["max_rel"] < 1e-5 and not rotate.skipped
    assert any("vision_tower.layernorm: output is read by more than linears, un-rotated" in n for n in rotate.notes)


def test_vision_tower_with_layernorm_is_refused(towers):
    _, _, (_, rotate) = rotate_tower(towers["dinov2"], convert=False, allow_partial=True)
    assert rotate.changed == 0 and rotate.verify["max_abs"] == 0.0
    assert "is a LayerNorm: run ln_to_rmsnorm first" in rotate.skipped[0]["reason"]


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TOWER.exists(), reason="the tiny VLM's DINOv2 feature graph is not in the cache")
def test_real_dinov2_small_tower_rotation():
    _, _, records = rotate_tower(REAL_TOWER, projector=True)
    print(f"real DINOv2-small: ln_to_rmsnorm drift {records[1].verify}, rotation drift {records[2].verify}")
    assert records[2].verify["max_rel"] < 1e-4 and "random_hadamard(384" in records[2].notes[0]
    assert sum(row.get("online_hadamard") == 1536 for row in records[2].layers) == 12
    rows = {row["name"]: row for row in records[2].layers}
    assert rows["multi_modal_projector.linear_1"]["r_v"] == "input side" and "un-rotated" not in " ".join(records[2].notes)


def test_refusal_names_a_norm_read_by_a_non_linear():
    model = _mlp_graph(hidden=8, inter=16)
    n2 = next(node for node in model.graph if node.name == "n2")
    probe = ir.node("ReduceMax", [n2.outputs[0]], name="probe")
    model.graph.append(probe)
    probe.outputs[0].name = "probe"
    model.graph.outputs.append(probe.outputs[0])
    feeds = [{"inputs_embeds": np.ones((1, 5, 8), np.float32)}]
    (record,) = PassManager([RotateResidualPass()], CompileContext(lambda: feeds, allow_partial=True)).run(model)
    assert record.changed == 0 and record.not_applied == "norm n2 output is read by ReduceMax probe, not a linear"
    assert record.skipped == [{"node": "model", "reason": record.not_applied, "fatal": "stream_not_traceable"}]


def test_decoder_stream_constant_absorbs_r1_like_the_vision_tower():
    """The one tracer: a constant added into the decoder's stream (a learned offset) is rotated with it, exactly."""
    model = _mlp_graph(hidden=8, inter=16)
    residual = next(node for node in model.graph if node.name == "residual")
    offset = add_initializer(model.graph, "stream_offset", np.linspace(-1, 1, 8, dtype=np.float32))
    shift = ir.node("Add", [residual.outputs[0], offset], name="offset")
    model.graph.insert_after(residual, [shift])
    n2 = next(node for node in model.graph if node.name == "n2")
    n2.replace_input_with(0, shift.outputs[0])
    feeds = [{"inputs_embeds": np.random.default_rng(i).standard_normal((1, 5, 8)).astype(np.float32)} for i in range(2)]
    (record,) = PassManager([RotateResidualPass(seed=3)], CompileContext(lambda: feeds, verify=True)).run(model)
    assert record.verify["max_rel"] < 1e-5 and not record.skipped
    rows = {row["name"]: row for row in record.layers}
    assert rows["stream_offset"]["r1"] == "axis 0" and rows["model.layers.0.mlp.down_proj"]["r1"] == "output"
