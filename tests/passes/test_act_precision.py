"""Activation precision budget: the worst static int8 activation points go to int16, chosen by measurement."""

from __future__ import annotations

import numpy as np
import pytest
from mqc.passes.act_precision import ActPrecisionPass, static_activation_points

from mqc.calibration import capture, random_feeds
from mqc.compiler import compile_file
from mqc.ir import load_model, save_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.quantizer import sqnr_db
from mqc.recipes import load_recipe

SPIKE_CHANNEL, IMAGE_TOKENS, BUDGET = 3, 5, 3
#: Logits SQNR gain of promoting BUDGET points: at W8 the activations are most of the error, at W4 the weights are.
MIN_GAIN_DB = {"w8a8": 0.5, "w4a8-msq": 0.0}
RUNTIME_SCALE_OPS = {"Abs", "ReduceMax", "ReduceMin", "DynamicQuantizeLinear"}


def _feeds(model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random prefill feeds with an outlier first token, so some static ranges are set by one row."""
    feeds = random_feeds(model, count, seed=seed)
    for feed in feeds:
        feed["inputs_embeds"][:, 0, SPIKE_CHANNEL] = 400.0
        ids = np.zeros_like(feed["modality_ids"])
        ids[..., :IMAGE_TOKENS] = 1
        feed["modality_ids"] = ids
    return feeds


def _logits(path, feeds) -> np.ndarray:
    return np.concatenate([values[0] for _, values in capture(load_model(path), ["logits"], feeds)])


@pytest.fixture(scope="module", params=["w4a8-msq", "w8a8"])
def promoted(request, tiny_decoder, tmp_path_factory):
    """A static recipe on the tiny llama, then the budget pass on a copy: (float, before, after, record, held out, recipe)."""
    root = tmp_path_factory.mktemp("act16")
    source = tiny_decoder("llama")
    calib = _feeds(load_model(source), 4, seed=1)
    before = root / "before.onnx"
    compile_file(source, before, load_recipe(request.param), feeds=lambda: calib, num_samples=len(calib))
    model = load_model(before)
    mqc_pass = ActPrecisionPass(points=BUDGET)
    (record,) = PassManager([mqc_pass], CompileContext(lambda: calib)).run(model)
    after = save_model(model, root / "after.onnx")
    return source, before, after, record, _feeds(load_model(source), 3, seed=7), request.param


def test_the_lowest_points_are_promoted_and_the_rest_kept(promoted):
    _, before, after, record, _, _ = promoted
    points, _ = static_activation_points(load_model(before).graph)
    assert record.matched == len(points) == len(record.layers) > BUDGET
    ranked = sorted(record.layers, key=lambda layer: layer["median_token_sqnr_db"])
    assert [layer["bits"] for layer in ranked] == [16] * BUDGET + [8] * (len(ranked) - BUDGET)
    assert record.changed == BUDGET
    left, _ = static_activation_points(load_model(after).graph)  # the int8 pattern no longer matches them
    assert len(left) == len(points) - BUDGET


def test_graph_stays_static_and_moves_toward_float(promoted):
    source, before, after, _, held_out, recipe = promoted
    assert not RUNTIME_SCALE_OPS & {node.op_type for node in load_model(after).graph}
    reference = _logits(source, held_out)
    old, new = sqnr_db(reference, _logits(before, held_out)), sqnr_db(reference, _logits(after, held_out))
    assert new > old + MIN_GAIN_DB[recipe]


def test_a_budget_of_zero_changes_nothing(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    calib = _feeds(load_model(source), 2, seed=1)
    compiled = tmp_path / "w8a8.onnx"
    compile_file(source, compiled, load_recipe("w8a8"), feeds=lambda: calib, num_samples=len(calib))
    model = load_model(compiled)
    (record,) = PassManager([ActPrecisionPass(points=0)], CompileContext(lambda: calib)).run(model)
    assert record.changed == 0 and "budget 0" in record.notes
