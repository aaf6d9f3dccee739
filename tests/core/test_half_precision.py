"""float16 / bfloat16 models compile: widened to float32 on load, float16 interfaces kept, bfloat16 ones widened."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from untrusted import HIDDEN, linear_model

from mqc.cli import main
from mqc.report import read_report


def _weight(dtype) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((HIDDEN, HIDDEN)).astype(dtype)


def _compile(source: Path, out: Path) -> str:
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out), "--samples", "4"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _io_types(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)]


def test_float16_model_keeps_its_interface_and_is_quantized(tmp_path):
    source = tmp_path / "fp16.onnx"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT, name="up"),  # exporters' mixed casts
             helper.make_node("Relu", ["h32"], ["r"], name="act"),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT16, name="down")]
    onnx.save(linear_model([numpy_helper.from_array(_weight(np.float16), "W")], nodes=nodes,
                           elem=TensorProto.FLOAT16), str(source))
    before = source.read_bytes()
    text = _compile(source, tmp_path / "q.onnx")
    assert "float16 model widened to float32 on load" in text and "float16 inputs and outputs are kept" in text
    assert _io_types(tmp_path / "q.onnx") == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    report = read_report(str(tmp_path / "q.onnx"))
    assert [layer["w_bits"] for p in report.passes for layer in p.layers if "w_bits" in layer] == [8]
    x = np.random.default_rng(1).standard_normal((1, 4, HIDDEN)).astype(np.float16)
    want = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x})[0]
    assert got.dtype == np.float16 and report.quality["sqnr_db"] > 20
    assert 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got).astype(np.float64) ** 2)) > 20
    assert source.read_bytes() == before


def test_bfloat16_model_is_widened_and_checked_against_its_widening(tmp_path):
    source = tmp_path / "bf16.onnx"
    weight = _weight(ml_dtypes.bfloat16)
    tensor = helper.make_tensor("W", TensorProto.BFLOAT16, [HIDDEN, HIDDEN], weight.view(np.uint16).tobytes(), raw=True)
    onnx.save(linear_model([tensor], elem=TensorProto.BFLOAT16), str(source))
    text = _compile(source, tmp_path / "q.onnx")
    assert "bfloat16 inputs and outputs become float32" in text
    assert _io_types(tmp_path / "q.onnx") == [TensorProto.FLOAT, TensorProto.FLOAT]
    report = read_report(str(tmp_path / "q.onnx"))
    assert "widening of the bfloat16 model" in report.quality["reference"] and report.quality["sqnr_db"] > 20
    x = np.random.default_rng(1).standard_normal((1, 4, HIDDEN)).astype(np.float32)
    want = np.maximum(x @ weight.astype(np.float32), 0)
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x})[0]
    assert 10 * np.log10(np.sum(want ** 2) / np.sum((want - got) ** 2)) > 20


def test_float32_model_casting_to_float16_inside_is_widened(tmp_path):
    """No value is typed float16 (the exporter left the inner values untyped): the Casts alone mark the model."""
    source = tmp_path / "cast16.onnx"
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="down"),
             helper.make_node("Cast", ["W32"], ["W16"], to=TensorProto.FLOAT16, name="w_down"),
             helper.make_node("MatMul", ["x16", "W16"], ["h16"], name="fc"),
             helper.make_node("Cast", ["h16"], ["y"], to=TensorProto.FLOAT, name="up")]
    onnx.save(linear_model([numpy_helper.from_array(_weight(np.float32), "W32")], nodes=nodes), str(source))
    text = _compile(source, tmp_path / "q.onnx")
    assert "float16 model widened to float32 on load" in text
    assert not any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16
                   for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    assert read_report(str(tmp_path / "q.onnx")).quality["sqnr_db"] > 20
