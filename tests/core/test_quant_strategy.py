"""The shared quantization strategies: weight rounding against numpy references, and each activation-quantizer form
inserted into a real graph, run in onnxruntime and compared with the fake-quant math written out here."""

import numpy as np
import onnx_ir as ir
import pytest

import mqc
from mqc.calibration import IMAGE, MODALITY_INPUT, TEXT, Calibrator
from mqc.gptq import relative_output_error
from mqc.graph.msq import is_image_mask
from mqc.ir import add_initializer
from mqc.quant_strategy import ActivationQuantizer, WeightRounding

K, N, SEQ = 32, 8, 6


def _reference_rtn(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """Symmetric RTN written from the definition: scale = absmax / (2^(b-1) - 1) per (group of rows, column)."""
    qmax = 2 ** (bits - 1) - 1
    g = w.shape[0] if group is None else group
    out = np.empty_like(w)
    for start in range(0, w.shape[0], g):
        block = w[start:start + g]
        scale = np.maximum(np.abs(block).max(axis=0).astype(np.float64) / qmax, 1e-12).astype(np.float32)
        out[start:start + g] = np.clip(np.rint(block / scale), -qmax - 1, qmax) * scale
    return out


@pytest.mark.parametrize(("bits", "group"), [(4, None), (8, None), (4, 8), (8, 16)])
def test_rtn_matches_the_reference_per_channel_and_per_group(bits, group):
    w = np.random.default_rng(bits + (group or 0)).standard_normal((K, N)).astype(np.float32)
    qweight, figures = WeightRounding(bits, group_size=group).round(w, group_size=group)
    assert figures == {"weight_method": "rtn"} and qweight.group_size == group
    np.testing.assert_array_equal(qweight.dequantize(), _reference_rtn(w, bits, group))
    assert np.abs(qweight.q).max() <= 2 ** (bits - 1)


def test_group_that_does_not_divide_falls_back_to_per_channel_with_a_note():
    rounding = WeightRounding(4, group_size=12)
    assert rounding.group_for(36) == 12 and rounding.group_note("a", 36) is None
    assert rounding.group_for(K) is None and "not a multiple of group size 12" in rounding.group_note("a", K)


@pytest.mark.parametrize("group", [None, 8])
def test_gptq_rounds_onto_the_same_grid_with_less_output_error_than_rtn(group):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, K)) @ rng.standard_normal((K, K))  # correlated inputs: GPTQ has room to win
    w = rng.standard_normal((K, N)).astype(np.float32)
    hessian = 2.0 / x.shape[0] * x.T @ x
    qweight, figures = WeightRounding(4, "gptq", group, mse_clip=True).round(w, hessian, group)
    assert figures["weight_method"] == "gptq"
    assert figures["gptq_rel_error"] < figures["rtn_rel_error"]
    assert figures["gptq_rel_error"] == round(relative_output_error(w, qweight.dequantize(), hessian), 5)
    expanded = qweight.scale if group is None else np.repeat(qweight.scale, group, axis=0)
    np.testing.assert_allclose(qweight.dequantize() / expanded, np.rint(qweight.dequantize() / expanded), atol=1e-4)
    with pytest.raises(ValueError, match="needs a Hessian"):
        WeightRounding(4, "gptq").round(w, None)


def _graph() -> tuple[ir.Model, ir.Value, ir.Node]:
    """x [1, SEQ, K] @ W [K, N] with a modality_ids input, as a decoder's linear sees it."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, SEQ, K]))
    ids = ir.Value(name=MODALITY_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, SEQ]))
    graph = ir.Graph([x, ids], [], nodes=[], opset_imports={"": 21}, name="g")
    weight = add_initializer(graph, "w", np.random.default_rng(0).standard_normal((K, N)).astype(np.float32))
    matmul = ir.node("MatMul", [x, weight], name="linear")
    matmul.outputs[0].name = "y"
    matmul.outputs[0].type, matmul.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, SEQ, N])
    graph.append(matmul)
    graph.outputs.append(matmul.outputs[0])
    return ir.Model(graph, ir_version=10), x, matmul


def _feed(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, SEQ, K)).astype(np.float32)
    ids = np.array([[IMAGE, IMAGE, IMAGE, TEXT, TEXT, TEXT]], np.int64)
    x[ids == IMAGE] *= 20.0  # image rows ~20x larger: the per-modality scales differ
    return {"x": x, MODALITY_INPUT: ids}


def _fake(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -128, 127).astype(np.float32) * np.float32(scale)


@pytest.mark.parametrize("form", ["static", "per_modality", "dynamic"])
def test_inserted_activation_quantizer_runs_in_onnxruntime_and_matches_the_fake_quant_math(form, tmp_path):
    model, x, matmul = _graph()
    feeds = [_feed(seed) for seed in range(3)]
    tap = Calibrator(model, ["x"]).run(feeds)["x"]
    is_image = is_image_mask(model.graph, model.graph.inputs[1]) if form == "per_modality" else None
    quantizer = ActivationQuantizer(form)
    inserted = quantizer.insert(model.graph, x, [matmul], tap, is_image)
    ir.save(model, tmp_path / "q.onnx")
    session = mqc.open_session(tmp_path / "q.onnx")
    weight = model.graph.initializers["w"].const_value.numpy()
    probe = _feed(11)
    rows, ids = probe["x"][0], probe[MODALITY_INPUT][0]
    image_max = max(np.abs(f["x"][0][f[MODALITY_INPUT][0] == IMAGE]).max() for f in feeds)
    text_max = max(np.abs(f["x"][0][f[MODALITY_INPUT][0] == TEXT]).max() for f in feeds)
    if form == "static":  # one scale from every calibration row
        expected = _fake(rows, np.float32(max(image_max, text_max) / 127))
        assert inserted.scale == pytest.approx(max(image_max, text_max) / 127)
    elif form == "per_modality":  # each token row under its own modality's scale
        scales = np.where(ids == IMAGE, np.float32(image_max / 127), np.float32(text_max / 127))[:, None]
        expected = _fake(rows, scales)
        assert inserted.scale == pytest.approx({TEXT: text_max / 127, IMAGE: image_max / 127})
    else:  # one scale per token row, computed from the row itself
        expected = _fake(rows, np.maximum(np.abs(rows).max(axis=-1, keepdims=True) / np.float32(127), np.float32(1e-12)))
        assert inserted.scale is None
    got = session.run(["y"], probe)[0][0]
    np.testing.assert_allclose(got, expected @ weight, rtol=1e-5, atol=1e-4)
    reference = np.stack([quantizer.fake(row[None], int(m), inserted.scale)[0] for row, m in zip(rows, ids, strict=True)])
    np.testing.assert_allclose(reference, expected, rtol=1e-6, atol=1e-6)  # the records' numpy reference agrees


def test_per_modality_without_a_rank_3_input_falls_back_to_one_static_scale():
    model, x, matmul = _graph()
    tap = Calibrator(model, ["x"]).run([_feed(0)])["x"]
    x.shape = ir.Shape([SEQ, K])
    inserted = ActivationQuantizer("per_modality").insert(model.graph, x, [matmul], tap, is_image_mask(model.graph, model.graph.inputs[1]))
    assert inserted.form == "static" and "rank 2" in inserted.fallback
    assert any(node.op_type == "QuantizeLinear" for node in model.graph)
