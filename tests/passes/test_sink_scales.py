"""Sink scales: a third static class for the first token, through AIFS and KV-cache decode (real sessions)."""

from __future__ import annotations

import numpy as np
import pytest
from mqc.passes.sink_scales import SinkScalesPass

from mqc.calibration import capture, random_feeds
from mqc.compiler import compile_file
from mqc.diagnose import Sample, diagnose_file
from mqc.ir import load_model, save_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.recipes import Recipe, load_recipe

SPIKE_CHANNEL, IMAGE_TOKENS = 3, 5
RUNTIME_SCALE_OPS = {"Abs", "ReduceMax", "ReduceMin", "DynamicQuantizeLinear"}


def _sink_feeds(model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random prefill feeds whose first token carries a massive activation in one channel (an attention sink's
    signature) and whose image tokens come LAST, so AIFS has to move them."""
    feeds = random_feeds(model, count, seed=seed)
    for feed in feeds:
        feed["inputs_embeds"][:, 0, SPIKE_CHANNEL] = 400.0
        ids = np.zeros_like(feed["modality_ids"])
        ids[..., -IMAGE_TOKENS:] = 1
        feed["modality_ids"] = ids
    return feeds


@pytest.fixture(scope="module")
def compiled(tiny_decoder, tmp_path_factory):
    """w4a8-msq + AIFS on the tiny llama, then the sink pass on a copy: (float, before, after, record, feeds)."""
    root = tmp_path_factory.mktemp("sink")
    source = tiny_decoder("llama")
    feeds = _sink_feeds(load_model(source), 4, seed=1)
    base = load_recipe("w4a8-msq")
    recipe = Recipe("w4a8-msq-aifs", base.description, [*base.passes, {"pass": "aifs"}])
    before = root / "before.onnx"
    compile_file(source, before, recipe, feeds=lambda: feeds, num_samples=len(feeds))
    model = load_model(before)
    (record,) = PassManager([SinkScalesPass()], CompileContext(lambda: feeds)).run(model)
    after = save_model(model, root / "after.onnx")
    return source, before, after, record, feeds


def test_text_ranges_shrink_and_graph_stays_static(compiled):
    _, _, after, record, _ = compiled
    assert record.changed == len(record.layers) > 0
    shrink = [layer["text_range_shrink"] for layer in record.layers]
    assert min(shrink) < 0.5  # the first layer's q/k/v input: the sink set the old text range
    # re-calibrated on the quantized graph, where upstream rounding noise reaches the later inputs: a range may
    # grow a little where the sink did not set it
    assert all(s <= 1.15 for s in shrink)
    assert not RUNTIME_SCALE_OPS & {node.op_type for node in load_model(after).graph}


def test_sink_scale_follows_position_zero_through_aifs(compiled):
    _, _, after, record, feeds = compiled
    model = load_model(after)
    point = record.layers[0]["name"]
    (_, (scale, perm)), = capture(model, [f"{point}_sink_scale", "mqc_aifs_perm"], feeds[:1])
    scale = scale.reshape(-1)
    first = int(np.nonzero(perm.reshape(-1) == 0)[0][0])
    assert first == IMAGE_TOKENS  # AIFS moved the five image tokens in front of original position 0
    assert scale[first] == pytest.approx(record.layers[0]["act_absmax_sink"] / 127, rel=1e-5)
    others = np.delete(scale, first)
    assert np.all(others < scale[first] / 2)


def test_decode_steps_use_the_text_scale(compiled):
    _, _, after, record, feeds = compiled
    model = load_model(after)
    point = record.layers[0]["name"]
    step = _decode_step(feeds[0], 7, position_ids=np.array([[7]], np.int64), modality_ids=np.zeros((1, 1), np.int64))
    (_, (scale,)), = capture(model, [f"{point}_sink_scale"], [step])
    assert float(scale.reshape(-1)[0]) == pytest.approx(record.layers[0]["act_absmax_text"] / 127, rel=1e-5)


def test_ordinary_text_tokens_gain_in_the_diagnosis(compiled):
    source, before, after, _, _ = compiled
    samples = [Sample(f, "") for f in _sink_feeds(load_model(source), 3, seed=9)]
    old, new = (diagnose_file(source, path, samples) for path in (before, after))
    first = old["layers"][0]["name"]
    text_old = next(x for x in old["layers"] if x["name"] == first)["modalities"]["text"]
    text_new = next(x for x in new["layers"] if x["name"] == first)["modalities"]["text"]
    assert text_new["static_token_db"] > text_old["static_token_db"] + 3.0
    assert text_new["top_tokens"][0]["position"] == 0


@pytest.mark.parametrize("recipe", ["mquant-paper", "mquant-sink", "mquant"])
def test_mquant_recipes_compile_fully_static(recipe, tiny_decoder, tmp_path):
    """MQuant's promise: no activation scale is computed at run time, with or without the sink class and groups."""
    source = tiny_decoder("llama")
    feeds = _sink_feeds(load_model(source), 3, seed=2)
    out = tmp_path / f"{recipe}.onnx"
    compile_file(source, out, load_recipe(recipe), feeds=lambda: feeds, num_samples=len(feeds))
    ops = {node.op_type for node in load_model(out).graph}
    assert "Where" in ops and "Round" in ops  # MSQ's per-modality static fake-quant is there
    assert not RUNTIME_SCALE_OPS & ops, sorted(RUNTIME_SCALE_OPS & ops)


def test_mse_ranges_clip_inside_the_minmax_ranges(compiled):
    """method=mse sets each class's clip from its |x| histogram: never above the rows' max, below it somewhere."""
    from mqc.params import SinkScalesParams

    _, before, _, minmax_record, feeds = compiled
    model = load_model(before)
    (record,) = PassManager([SinkScalesPass(SinkScalesParams(method="mse"))], CompileContext(lambda: feeds)).run(model)
    assert "MSE-clipped" in SinkScalesPass(SinkScalesParams(method="mse")).variant()
    for mse, minmax in zip(record.layers, minmax_record.layers, strict=True):
        for key in ("act_absmax_sink", "act_absmax_text", "act_absmax_image"):
            assert mse[key] <= minmax[key] * (1 + 1e-6)
    assert any(m["act_absmax_text"] < 0.99 * n["act_absmax_text"] for m, n in zip(record.layers, minmax_record.layers, strict=True))


def test_trimmed_ranges_leave_an_outlier_row_away_from_the_sink_out(compiled):
    """A massive token at position 3 of one sample sets min/max text ranges; ``trimmed`` drops such rows from them
    (they are clipped at run time) and records them; sink ranges are never trimmed."""
    from mqc.params import SinkScalesParams

    _, before, _, _, feeds = compiled
    spiked = [{k: v.copy() for k, v in feed.items()} for feed in feeds]
    spiked[1]["inputs_embeds"][:, 3, SPIKE_CHANNEL + 1] = 400.0
    records = {}
    for method in ("minmax", "trimmed"):  # the tiny model's norms bound the spike row's max at sqrt(64) = 8
        params = SinkScalesParams(method=method, outlier_ratio=2.5)
        (records[method],) = PassManager([SinkScalesPass(params)],
                                         CompileContext(lambda: spiked)).run(load_model(before))
    pairs = list(zip(records["minmax"].layers, records["trimmed"].layers, strict=True))
    trimmed = [(m, t) for m, t in pairs if "outlier_rows_clipped_text" in t]
    assert trimmed, [(m["act_absmax_text"], t["act_absmax_text"]) for m, t in pairs]
    for minmax, kept in trimmed:
        assert kept["act_absmax_text"] < 0.75 * minmax["act_absmax_text"] and kept["outlier_rows_clipped_text"] >= 1
    assert "outlier_rows_clipped_text" in records["trimmed"].layers[0]  # layer 0's q/k/v input: the spiked row
    assert all(t["act_absmax_text"] <= m["act_absmax_text"] and t["act_absmax_sink"] == m["act_absmax_sink"]
               for m, t in pairs)
    assert "outlier rows" in SinkScalesPass(SinkScalesParams(method="trimmed")).variant()


def test_output_clip_search_lowers_the_readers_output_error(compiled):
    """clip_search=output: every text/image clip is the method's times a searched ratio, the error of the readers'
    outputs on the sampled rows is never above the method's (ratio 1 is a candidate) and lower somewhere. (Layer by
    layer only: on this random tiny model the logits end 2.5 % further from float than with min/max alone.)"""
    from mqc.passes.sink_scales import CLIP_SEARCH_RATIOS

    from mqc.params import SinkScalesParams

    _, before, _, minmax_record, feeds = compiled
    model = load_model(before)
    params = SinkScalesParams(clip_search="output", search_rows=64)
    (record,) = PassManager([SinkScalesPass(params)], CompileContext(lambda: feeds)).run(model)
    assert "least output error" in SinkScalesPass(params).variant()
    for searched, minmax in zip(record.layers, minmax_record.layers, strict=True):
        for label in ("text", "image"):
            ratio = searched[f"clip_ratio_{label}"]
            assert ratio in CLIP_SEARCH_RATIOS and searched[f"output_sqnr_gain_db_{label}"] >= 0.0
            assert np.isclose(searched[f"act_absmax_{label}"], ratio * minmax[f"act_absmax_{label}"], rtol=1e-5)
        assert searched["act_absmax_sink"] == minmax["act_absmax_sink"]
    assert any(row["output_sqnr_gain_db_text"] > 0.1 for row in record.layers)
    assert any(row["clip_ratio_text"] != 1.0 for row in record.layers)
    ops = {node.op_type for node in model.graph}
    assert not RUNTIME_SCALE_OPS & ops  # still fully static


def _without_position_ids(path, out):
    """The graph of ``path`` as an exporter that computes the positions inside would write it: ``position_ids`` is
    ``Range(past, past + S)`` from the attention mask's and the embeddings' shapes instead of an input."""
    import onnx_ir as ir

    from mqc.ir import add_initializer

    model = load_model(path)
    graph = model.graph
    pos = next(v for v in graph.inputs if v.name == "position_ids")
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    embeds = next(v for v in graph.inputs if v.name == "inputs_embeds")
    one = add_initializer(graph, "test_one", np.array(1, np.int64))
    nodes = [ir.node("Shape", [mask], attributes={"start": 1, "end": 2}),
             ir.node("Shape", [embeds], attributes={"start": 1, "end": 2})]
    nodes.append(ir.node("Sub", [nodes[0].outputs[0], nodes[1].outputs[0]]))
    nodes += [ir.node("Squeeze", [nodes[2].outputs[0]]), ir.node("Squeeze", [nodes[0].outputs[0]])]
    nodes.append(ir.node("Range", [nodes[3].outputs[0], nodes[4].outputs[0], one]))
    zero = add_initializer(graph, "test_axes", np.array([0], np.int64))
    nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], zero]))
    graph.insert_before(next(iter(graph)), nodes)
    pos.replace_all_uses_with(nodes[-1].outputs[0])
    graph.inputs.remove(pos)
    return save_model(model, out)


def _decode_step(prefill: dict[str, np.ndarray], past: int, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """One decode step after ``past`` cached tokens (zero caches), shaped from a prefill feed."""
    step = dict(prefill)
    for name, value in step.items():
        if "past" in name:
            step[name] = np.zeros((*value.shape[:2], past, value.shape[3]), value.dtype)
    step.update(inputs_embeds=step["inputs_embeds"][:, :1].copy(), attention_mask=np.ones((1, past + 1), np.int64),
                **inputs)
    return step


def test_a_graph_without_position_ids_takes_its_sink_positions_from_the_attention_mask(compiled, tmp_path):
    """No position_ids input: the sink rows are found from CumSum(attention_mask) - 1, with the same scales and
    outputs as the graph that is fed its positions, and a decode step still takes the text scale."""
    original, _, _, _, feeds = compiled
    plain = load_recipe("w4a8-msq")
    source = _without_position_ids(original, tmp_path / "no_pos.onnx")
    no_pos_feeds = [{k: v for k, v in f.items() if k != "position_ids"} for f in feeds]
    quantized = tmp_path / "no_pos_q.onnx"
    compile_file(source, quantized, plain, feeds=lambda: no_pos_feeds, num_samples=len(feeds))
    with_pos = tmp_path / "with_pos_q.onnx"
    compile_file(original, with_pos, plain, feeds=lambda: feeds, num_samples=len(feeds))
    records, outputs = [], []
    for path, fed in ((with_pos, feeds), (quantized, no_pos_feeds)):
        model = load_model(path)
        (rec,) = PassManager([SinkScalesPass()], CompileContext(lambda fed=fed: fed)).run(model)
        records.append(rec)
        point = rec.layers[0]["name"]
        (_, (logits, scale)), = capture(model, ["logits", f"{point}_sink_scale"], fed[:1])
        outputs.append((logits, scale.reshape(-1)))
    assert "attention_mask" in records[1].notes[-1]
    assert [r["act_absmax_sink"] for r in records[1].layers] == [r["act_absmax_sink"] for r in records[0].layers]
    np.testing.assert_array_equal(outputs[1][0], outputs[0][0])
    assert outputs[1][1][0] > 2 * outputs[1][1][1:].max()  # the first token takes the sink scale
    model = load_model(quantized)
    PassManager([SinkScalesPass()], CompileContext(lambda: no_pos_feeds)).run(model)
    step = _decode_step(no_pos_feeds[0], 7, modality_ids=np.zeros((1, 1), np.int64))
    point = records[1].layers[0]["name"]
    (_, (scale,)), = capture(model, [f"{point}_sink_scale"], [step])
    assert float(scale.reshape(-1)[0]) == pytest.approx(records[1].layers[0]["act_absmax_text"] / 127, rel=1e-5)


def _text_only(path, out):
    """The graph of ``path`` as a text-only export writes it: no ``modality_ids`` input."""
    model = load_model(path)
    graph = model.graph
    ids = next(v for v in graph.inputs if v.name == "modality_ids")
    assert not list(ids.uses()), "the float decoder does not read modality_ids"
    graph.inputs.remove(ids)
    return save_model(model, out)


def test_a_text_only_graph_gets_a_sink_class_on_its_per_tensor_points(tiny_decoder, tmp_path):
    """No modality_ids (rule 7): the linear quantizer's per-tensor QDQ points become MSQ's form with an all-text
    modality, computing what the QDQ pairs computed; then the first token gets its own static scale, the graph
    stays static and a decode step takes the text scale. The flagship recipe compiles such a graph."""
    original = tiny_decoder("llama")
    source = _text_only(original, tmp_path / "text_only.onnx")
    feeds = [{k: v for k, v in f.items() if k != "modality_ids"} for f in _sink_feeds(load_model(original), 3, seed=4)]
    qdq = tmp_path / "qdq.onnx"
    compile_file(source, qdq, load_recipe("w4a8-msq"), feeds=lambda: feeds, num_samples=len(feeds))
    converted = load_model(qdq)
    SinkScalesPass()._text_only(converted.graph, next(v for v in converted.graph.inputs if v.name == "inputs_embeds"))
    converted.graph.sort()
    (_, (expected,)), = capture(load_model(qdq), ["logits"], feeds[:1])
    (_, (same,)), = capture(converted, ["logits"], feeds[:1])
    np.testing.assert_allclose(same, expected, rtol=1e-4, atol=1e-4)
    assert not any(node.op_type == "QuantizeLinear" for node in converted.graph)

    model = load_model(qdq)
    (record,) = PassManager([SinkScalesPass()], CompileContext(lambda: feeds)).run(model)
    assert record.changed > 0 and "no modality_ids" in record.notes[0]
    first = record.layers[0]
    assert first["act_absmax_sink"] > 2 * first["act_absmax_text"]  # the spike at position 0 has its own range
    assert min(layer["text_range_shrink"] for layer in record.layers) < 0.5
    assert not RUNTIME_SCALE_OPS & {node.op_type for node in model.graph}
    step = _decode_step(feeds[0], 5, position_ids=np.array([[5]], np.int64))
    (_, (scale,)), = capture(model, [f"{first['name']}_sink_scale"], [step])
    assert float(scale.reshape(-1)[0]) == pytest.approx(first["act_absmax_text"] / 127, rel=1e-5)

    out = tmp_path / "mquant.onnx"
    report = compile_file(source, out, load_recipe("mquant"), feeds=lambda: feeds, num_samples=len(feeds))
    assert next(p for p in report.passes if p.name == "sink_scales").changed > 0
    assert not RUNTIME_SCALE_OPS & {node.op_type for node in load_model(out).graph}


def test_a_graph_without_positions_mask_or_cache_takes_positions_0_to_s(tmp_path):
    """Rule 3's last case (``input_ids -> logits`` exports): P = Range(0, S) from the tokens' count; with a cache
    and neither input the pass refuses, naming why."""
    import onnx_ir as ir
    from mqc.passes.sink_scales import _positions_from_range

    from mqc.pass_manager import PassRefused

    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    same = ir.node("Identity", [ids])
    graph = ir.Graph([ids], [same.outputs[0]], nodes=[same], opset_imports={"": 20})
    positions = _positions_from_range(graph, ids)
    graph.outputs.append(positions)
    model = ir.Model(graph, ir_version=10)
    (_, (got,)), = capture(model, [positions.name], [{"input_ids": np.zeros((2, 5), np.int64)}])
    np.testing.assert_array_equal(got, np.arange(5)[None, :])
    past = ir.Value(name="past_key_values.0.key", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 0, 4]))
    graph.inputs.append(past)
    with pytest.raises(PassRefused, match="no position_ids or attention_mask input"):
        SinkScalesPass().requires(model)
