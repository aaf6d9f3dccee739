"""Scale tuning: the integer weights' scales trained end to end on the KL to the float model, codes fixed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mqc.passes.scale_tuning import ScaleTuningPass

from mqc.calibration import capture, random_feeds
from mqc.compiler import compile_file
from mqc.diagnose import dequantized_weight
from mqc.errors import RecipeNotApplied
from mqc.ir import load_model, save_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.quality_gate import compare_outputs
from mqc.recipes import load_recipe

RUNTIME_SCALE_OPS = {"Abs", "ReduceMax", "ReduceMin", "DynamicQuantizeLinear"}


def _text_logits(path, feeds) -> np.ndarray:
    """The logits of the text positions, where the pass measures its KL."""
    return np.concatenate([values[0][feed["modality_ids"] == 0]
                           for feed, values in capture(load_model(path), ["logits"], feeds)])


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean per-position KL(reference || logits), as the quality gate reports it."""
    return compare_outputs([reference], [logits], logits=True)["kl"]


@pytest.fixture(scope="module")
def tuned(tiny_decoder, tmp_path_factory):
    """The tiny llama compiled with static W4A8 (MSQ, sink class), then scale_tuning on a copy."""
    root = tmp_path_factory.mktemp("scale_tuning")
    source = tiny_decoder("llama")
    calib = random_feeds(load_model(source), 6, seed=1)
    before = root / "before.onnx"
    compile_file(source, before, load_recipe("mquant-sink-g64"), feeds=lambda: calib, num_samples=len(calib))
    model = load_model(before)
    context = CompileContext(lambda: calib)
    context.reference = source
    (record,) = PassManager([ScaleTuningPass(epochs=3, lr=2e-2)], context).run(model)
    after = save_model(model, root / "after.onnx")
    return source, before, after, record, calib


def test_the_replay_matches_onnxruntime_and_the_calibration_kl_goes_down(tuned):
    _, _, _, record, _ = tuned
    notes = " ".join(record.notes)
    replay = float(re.search(r"unchanged graph: KL (\S+) from", notes).group(1))
    kl_before, kl_after = (float(v) for v in re.search(r"text positions: (\S+) before, (\S+) after", notes).groups())
    assert replay < 1e-4
    assert kl_after < 0.9 * kl_before
    assert record.changed == record.matched == len(record.layers) > 0
    assert all(layer["scale_change_max_pct"] > 0 for layer in record.layers)


def test_only_scales_change_and_the_graph_stays_static(tuned):
    _, before, after, _, _ = tuned
    old, new = load_model(before), load_model(after)
    assert [n.op_type for n in old.graph] == [n.op_type for n in new.graph]
    assert not RUNTIME_SCALE_OPS & {node.op_type for node in new.graph}
    changed = 0
    for a, b in zip(old.graph, new.graph, strict=True):
        if a.op_type == "DequantizeLinear" and a.inputs[0].const_value is not None:
            np.testing.assert_array_equal(a.inputs[0].const_value.numpy(), b.inputs[0].const_value.numpy())
            changed += not np.array_equal(a.inputs[1].const_value.numpy(), b.inputs[1].const_value.numpy())
    assert changed > 0
    assert any(dequantized_weight(n) is not None for n in new.graph if n.op_type == "MatMul")


def test_onnxruntime_sees_the_kl_drop(tuned):
    source, before, after, _, calib = tuned
    reference = _text_logits(source, calib)
    assert _kl(reference, _text_logits(after, calib)) < 0.9 * _kl(reference, _text_logits(before, calib))


def test_compile_gives_the_pass_its_reference_and_explain_has_the_figures(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    calib = random_feeds(load_model(source), 3, seed=2)
    recipe = tmp_path / "tuned.json"
    recipe.write_text(json.dumps({"name": "tuned", "description": "test", "extends": "w4a8-rtn",
                                  "append": [{"pass": "scale_tuning", "epochs": 1}]}))
    report = compile_file(source, tmp_path / "out.onnx", load_recipe(str(recipe)), feeds=lambda: calib,
                          num_samples=len(calib))
    record = report.passes[-1]
    assert record.name == "scale_tuning" and "E2E-QP" in record.variant
    assert any("text positions" in note for note in record.notes)
    quantized = {layer["name"] for p in report.passes[:-1] for layer in p.layers}
    assert record.layers and {layer["name"] for layer in record.layers} <= quantized  # the quantizer's rows
    rows = {row["name"]: row for row in report.layer_table()}
    assert all("scale_change_median_pct" in rows[name] for name in quantized)


def test_without_a_reference_it_refuses(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    calib = random_feeds(load_model(source), 2, seed=1)
    compiled = tmp_path / "w4.onnx"
    compile_file(source, compiled, load_recipe("w4a8-rtn"), feeds=lambda: calib, num_samples=len(calib))
    with pytest.raises(RecipeNotApplied, match="float source model"):
        PassManager([ScaleTuningPass()], CompileContext(lambda: calib)).run(load_model(compiled))


def test_channel_granularity_moves_every_group_of_a_channel_together(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    calib = random_feeds(load_model(source), 3, seed=3)
    compiled = tmp_path / "g64.onnx"
    compile_file(source, compiled, load_recipe("mquant-sink-g64"), feeds=lambda: calib, num_samples=len(calib))
    model = load_model(compiled)
    before = {n.name: n.inputs[1].const_value.numpy().copy() for n in model.graph
              if n.op_type == "DequantizeLinear" and n.attributes.get_int("block_size", 0)}
    context = CompileContext(lambda: calib)
    context.reference = source
    (record,) = PassManager([ScaleTuningPass(epochs=2, lr=2e-2, granularity="channel")], context).run(model)
    assert record.changed > 0 and before
    for node in model.graph:
        if node.name in before:
            ratio = node.inputs[1].const_value.numpy() / before[node.name]  # [groups, out]
            np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-6)
            assert not np.allclose(ratio, 1.0)
