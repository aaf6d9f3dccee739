"""``--format mqc`` of sink_scales' three-way scale selection: one QuantLinear per linear with act_scale (text, image,
sink) and a shared per-token class input, equal to the QDQ form in prefill (through AIFS) and in KV-cache decode.

The tiny llama compiled with ``mquant-sink`` (GPTQ weights per output channel, and per group of 32 input rows: the
group-wise static W4A8 form) on feeds whose first token carries a massive activation (an attention sink) and whose
image tokens come last (AIFS moves them first). Reference: the QDQ model without onnxruntime's graph
optimizations. mquant's online Hadamards run as ``ai.mqc::Hadamard`` (an FWHT) in the lowered model, so activations
behind them differ in fp32 rounding and a value on a .5 boundary may take the neighbouring int8 code: the outputs
agree within the bound of test_compile_mqc.py's Hadamard-fed case and above 40 dB SQNR.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from mqc.passes.lower_runtime_ops import AIFS_LAYOUT_NOTE, lower_to_runtime_ops
from rtops_models import file_outputs

from mqc.calibration import capture, random_feeds
from mqc.compiler import compile_file
from mqc.ir import load_model, save_model

pytestmark = pytest.mark.slow

SPIKE_CHANNEL, IMAGE_TOKENS, PAST = 3, 5, 7


def _sink_feeds(model: ir.Model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    feeds = random_feeds(model, count, seed=seed)
    for feed in feeds:
        feed["inputs_embeds"][:, 0, SPIKE_CHANNEL] = 400.0
        ids = np.zeros_like(feed["modality_ids"])
        ids[..., -IMAGE_TOKENS:] = 1
        feed["modality_ids"] = ids
    return feeds


def _decode_step(prefill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One text token at position PAST after PAST cached positions (random cache values)."""
    rng = np.random.default_rng(5)
    step = dict(prefill)
    for name, value in prefill.items():
        if "past" in name:
            step[name] = rng.standard_normal((*value.shape[:2], PAST, value.shape[3])).astype(value.dtype)
    step.update(inputs_embeds=prefill["inputs_embeds"][:, 1:2].copy(), attention_mask=np.ones((1, PAST + 1), np.int64),
                position_ids=np.array([[PAST]], np.int64), modality_ids=np.zeros((1, 1), np.int64))
    return step



#: (recipe, the group_size every lowered QuantLinear must carry: 0 per channel)
RECIPES = [("mquant-sink", 0), ("mquant-sink:gptq_weights.group_size=32", 32)]


@pytest.fixture(scope="module", params=RECIPES, ids=["per-channel", "group-32"])
def lowered(request, tiny_decoder, tmp_path_factory):
    """(QDQ path, lowered path, lowered model, lowering record, held-out feeds)."""
    recipe, group_size = request.param
    root = tmp_path_factory.mktemp("sink-lowering")
    source = tiny_decoder("llama")
    feeds = _sink_feeds(load_model(source), 4, seed=1)
    qdq = root / "mquant-sink.qdq.onnx"
    compile_file(source, qdq, recipe, feeds=lambda: feeds, num_samples=len(feeds), fmt="qdq")
    model = ir.load(str(qdq))
    assert {n.attributes.get_int("block_size", 0) for n in model.graph if n.op_type == "DequantizeLinear"
            and n.inputs[0].dtype == ir.DataType.INT4} == {group_size}
    record = lower_to_runtime_ops(model)
    assert {n.attributes.get_int("group_size", 0) for n in model.graph if n.op_type == "QuantLinear"} == {group_size}
    mqc = save_model(model, root / "mquant-sink.mqc.onnx")
    return qdq, mqc, model, record, _sink_feeds(load_model(source), 2, seed=7)


def test_every_sink_scaled_linear_is_one_quant_linear(lowered):
    qdq, _, model, record, _ = lowered
    sink_points = sum(1 for n in load_model(qdq).graph if n.op_type == "Where" and (n.name or "").endswith("/sink_scale"))
    assert sink_points > 0
    ops = [n.op_type for n in model.graph]
    assert not {"QuantizeLinear", "DequantizeLinear", "Round"} & set(ops), record.skipped
    three = [n for n in model.graph if n.op_type == "QuantLinear" and n.inputs[3].const_value.numpy().size == 3]
    assert three and all(n.inputs[5].name == "mqc_scale_class_0" for n in three)
    # one class value for the whole graph: its Equal/Cast/Where run once, not once per linear
    assert ops.count("Cast") <= [n.op_type for n in load_model(qdq).graph].count("Cast") + 1
    assert AIFS_LAYOUT_NOTE in record.notes  # explain says why AIFS's contiguous blocks are not read through `split`


def test_prefill_matches_qdq_through_aifs(lowered):
    qdq, mqc, _, _, feeds = lowered
    for feed in feeds:
        _assert_close(file_outputs(mqc, feed, custom=True), file_outputs(qdq, feed, custom=False))


def test_decode_step_matches_qdq_and_reads_the_text_scale(lowered):
    qdq, mqc, model, _, feeds = lowered
    step = _decode_step(feeds[0])
    _assert_close(file_outputs(mqc, step, custom=True), file_outputs(qdq, step, custom=False))
    (_, (decode_class,)), = capture(model, ["mqc_scale_class_0"], [step])
    assert decode_class.reshape(-1).tolist() == [0]  # position 7, text: the text scale
    (_, (prefill_class, perm)), = capture(model, ["mqc_scale_class_0", "mqc_aifs_perm"], feeds[:1])
    first = int(np.nonzero(perm.reshape(-1) == 0)[0][0])
    expected = np.where(np.arange(prefill_class.size) < IMAGE_TOKENS, 1, 0)
    expected[first] = 2  # AIFS moved the image tokens first; original position 0 is the sink
    assert prefill_class.reshape(-1).tolist() == expected.tolist()


def _assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name, e in expected.items():
        if not (np.issubdtype(e.dtype, np.floating) and e.size):
            continue
        g = got[name]
        err = np.abs(g - e) / max(float(np.abs(e).max()), 1e-6)
        assert (err > 1e-5).sum() <= err.size // 8 and err.max() < 1e-2, (name, float(err.max()))
        sqnr = 10 * np.log10(float((e.astype(np.float64) ** 2).sum()) / max(float(((g - e) ** 2).sum()), 1e-30))
        assert sqnr > 40.0, (name, sqnr)


def test_norms_fused_with_three_scales(lowered):
    """Opt-in rule 6 on the sink form: RMSNormQuant takes the three scales and the class input of its readers.
    Not bit-exact (the norm is recomputed inside the op), so as test_compile_mqc.py's fused case: 1e-3."""
    qdq, _, _, _, feeds = lowered
    model = ir.load(str(qdq))
    record = lower_to_runtime_ops(model, fuse_norms=True)
    fused = [n for n in model.graph if n.op_type == "RMSNormQuant"]
    assert fused and all(n.inputs[2].const_value.numpy().size == 3 for n in fused), record.skipped
    path = save_model(model, qdq.with_name("fused.onnx"))
    for feed in (feeds[0], _decode_step(feeds[0])):
        expected, got = file_outputs(qdq, feed, custom=False), file_outputs(path, feed, custom=True)
        for name, e in expected.items():
            if np.issubdtype(e.dtype, np.floating) and e.size:
                np.testing.assert_allclose(got[name], e, rtol=0, atol=1e-3 * max(np.abs(e).max(), 1e-6), err_msg=name)
