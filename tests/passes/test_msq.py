"""MSQ (spec §2.3): per-modality static activation scales, their graph form and the decode path."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from decoder_helpers import channel_gap_feeds, with_outputs

import mqc
from mqc.quantizer import fake_quantize, sqnr_db
from mqc.recipes import load_recipe, with_overrides


@pytest.fixture(scope="module")
def llama(tiny_decoder) -> Path:
    return tiny_decoder("llama")




def _text_sqnr(source: Path, compiled: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    ref, got = mqc.open_session(source), mqc.open_session(compiled)
    refs, outs = [], []
    for feed in feeds:
        text = feed["modality_ids"] == 0
        refs.append(ref.run(["logits"], feed)[0][text])
        outs.append(got.run(["logits"], feed)[0][text])
    return sqnr_db(np.concatenate(refs), np.concatenate(outs))


def test_per_modality_scales_beat_shared_on_text_tokens(llama, tmp_path):
    calib, evals = channel_gap_feeds(llama, 8, 0), [f for f in channel_gap_feeds(llama, 4, 99) if (f["modality_ids"] == 1).any()]
    sqnr, reports = {}, {}
    for mode in ("shared", "per_modality"):
        recipe = with_overrides(load_recipe("w8a8"), {"quantize_linears": {"act_scales": mode}})
        reports[mode] = mqc.compile(llama, tmp_path / f"{mode}.onnx", recipe, feeds=lambda: calib)
        sqnr[mode] = _text_sqnr(llama, tmp_path / f"{mode}.onnx", evals)
    # measured: shared 37.2 dB, per_modality 39.3 dB on text-token logits
    assert sqnr["per_modality"] > sqnr["shared"] + 1.0, sqnr
    q_proj = reports["per_modality"].passes[-1].layers[0]
    assert q_proj["act_scale_image"] > 1.5 * q_proj["act_scale_text"]
    assert {"sqnr_db_text", "sqnr_db_image"} <= set(q_proj)
    assert q_proj["act_scale_text"] < reports["shared"].passes[-1].layers[0]["act_scale"]




def test_msq_graph_runs_at_every_ort_level_and_decode_uses_text_scale(llama, tmp_path):
    calib = channel_gap_feeds(llama, 4, 0)
    compiled = tmp_path / "msq.onnx"
    mqc.compile(llama, compiled, "w4a8-msq", feeds=lambda: calib)
    graph = onnx.load(str(compiled)).graph
    assert sum(n.op_type == "Where" and n.name.endswith("/msq_scale") for n in graph.node) == 8  # 4 points x 2 layers
    assert not any(n.op_type in ("QuantizeLinear",) for n in graph.node)
    div = next(n for n in graph.node if n.name.endswith("/msq_div"))
    x_name = div.input[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    s_text, s_image = float(inits[f"{x_name}_act_scale_text"]), float(inits[f"{x_name}_act_scale_image"])
    assert s_image > s_text
    probe = with_outputs(compiled, [x_name, f"{x_name}_dq"], tmp_path / "probe.onnx")

    sessions = {}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        # ORT_ENABLE_ALL fuses DequantizeLinear(int weight) + MatMul with a float activation into MatMulNBits, whose
        # default accuracy_level 4 re-quantizes the activation dynamically to int8 per block (logits moved by 0.044
        # of 2.6 here). accuracy_level 1 keeps the activation in fp32: the graph then computes exactly what it says.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        sessions[level] = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
    prefill = channel_gap_feeds(llama, 2, 5)[1]  # sample 1: the first half of the tokens are image tokens
    names = [o.name for o in sessions[ort.GraphOptimizationLevel.ORT_DISABLE_ALL].get_outputs()]
    outs = {level: s.run(None, prefill) for level, s in sessions.items()}
    for a, b in zip(*outs.values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    result = dict(zip(names, outs[ort.GraphOptimizationLevel.ORT_DISABLE_ALL], strict=True))
    x, x_dq = result[x_name], result[f"{x_name}_dq"]
    image = prefill["modality_ids"] == 1
    np.testing.assert_allclose(x_dq[image], fake_quantize(x[image], s_image, 8), atol=1e-6)
    np.testing.assert_allclose(x_dq[~image], fake_quantize(x[~image], s_text, 8), atol=1e-6)

    # one decode step: a text token reading the prefill's KV cache
    past = prefill["inputs_embeds"].shape[1]
    decode = {
        "inputs_embeds": np.random.default_rng(3).standard_normal((1, 1, 64)).astype(np.float32),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.array([[past]], np.int64),
        "modality_ids": np.zeros((1, 1), np.int64),
    }
    for name, value in result.items():
        if name.startswith("present."):
            decode[name.replace("present.", "past_key_values.")] = value
    step = dict(zip(names, sessions[ort.GraphOptimizationLevel.ORT_ENABLE_ALL].run(None, decode), strict=True))
    assert step["logits"].shape[1] == 1
    np.testing.assert_allclose(step[f"{x_name}_dq"], fake_quantize(step[x_name], s_text, 8), atol=1e-6)
