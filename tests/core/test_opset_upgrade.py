"""The opset upgrade: onnxruntime's opset-14 LayerNormalization converts (no traceback, same outputs), and a model
onnx's converter cannot convert is one clear error, not a model that claims an opset it was never converted to."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mqc.errors import InputModelError
from mqc.graph.opset import upgrade_opset
from mqc.ir import load_model, save_model

HIDDEN = 8


def _save(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], path, opset: int = 14):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), str(path))
    return path


def test_opset14_layernorm_written_by_onnxruntime_converts_to_23(tmp_path, caplog, capfd):
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "gamma"),
                    numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "beta"),
                    numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "W")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5, name="ln"),
             helper.make_node("MatMul", ["n", "W"], ["h"], name="fc"),
             helper.make_node("ReduceMean", ["h"], ["y"], axes=[-1], name="mean")]  # opset-14 attribute form
    source = _save(nodes, initializers, tmp_path / "ln14.onnx")
    model = load_model(source)
    with caplog.at_level(logging.WARNING):
        assert upgrade_opset(model)
    assert model.opset_imports[""] == 23 and set(model.opset_imports) == {""}
    assert [(n.op_type, n.domain) for n in model.graph] == [("LayerNormalization", ""), ("MatMul", ""),
                                                            ("Constant", ""), ("ReduceMean", "")]
    assert not caplog.records and "Traceback" not in capfd.readouterr().err
    save_model(model, tmp_path / "ln23.onnx")
    x = {"x": rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)}
    want = ort.InferenceSession(str(source)).run(None, x)[0]
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "ln23.onnx")).run(None, x)[0], want, rtol=1e-6)


def test_a_model_the_converter_cannot_convert_is_one_clear_error(tmp_path, capfd):
    # Gelu exists in onnx from opset 20: a default-domain Gelu at opset 14 has no adapter
    source = _save([helper.make_node("Gelu", ["x"], ["y"], name="gelu")], [], tmp_path / "gelu14.onnx")
    model = load_model(source)
    with pytest.raises(InputModelError, match="cannot convert the model from opset 14 to 23: No Adapter From Version "
                                              "19 for Gelu"):
        upgrade_opset(model)
    assert "Traceback" not in capfd.readouterr().err
