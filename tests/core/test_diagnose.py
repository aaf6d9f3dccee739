"""mqc diagnose: real compiles, real onnxruntime sessions on both graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mqc.calibration import random_feeds
from mqc.cli import main
from mqc.compiler import compile_file, compile_package
from mqc.diagnose import Sample, diagnose, diagnose_file, dynamic_fake_quant, find_quantized_layers
from mqc.errors import InputModelError
from mqc.ir import constant_array, load_model

SEQ, WIDTH = 12, 32
OUTLIER_POSITION = 2


def _two_layer_mlp(path: Path) -> Path:
    """x [1, seq, 32] -> fc1 (32 x 64) -> Relu -> fc2 (64 x 16)."""
    rng = np.random.default_rng(0)
    fc1 = numpy_helper.from_array(rng.standard_normal((WIDTH, 64)).astype(np.float32) / 6, "fc1.weight")
    fc2 = numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32) / 8, "fc2.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["a"], name="act"),
         helper.make_node("MatMul", ["a", "fc2.weight"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 16])], [fc1, fc2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, path)
    return path


def _inputs(count: int, seed: int, outlier: float) -> list[dict[str, np.ndarray]]:
    """Gaussian tokens; the token at OUTLIER_POSITION carries a massive activation in channel 5 (an attention
    sink's signature) when ``outlier`` > 0."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((1, SEQ, WIDTH)).astype(np.float32)
        x[0, OUTLIER_POSITION, 5] = outlier
        feeds.append({"x": x})
    return feeds


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diagnose_mlp")
    source = _two_layer_mlp(root / "mlp.onnx")
    out = {"float": source}
    for name, outlier in (("outlier", 200.0), ("plain", 0.0)):
        calib = root / f"calib_{name}"
        calib.mkdir()
        for i, feed in enumerate(_inputs(8, seed=1, outlier=outlier)):
            np.savez(calib / f"{i}.npz", **feed)
        out[name] = root / f"mlp.{name}.onnx"
        compile_file(source, out[name], "w8a8", calib=calib)
        out[f"calib_{name}"] = calib
    return out


def _figures(result: dict, layer: str) -> dict:
    entry = next(iter(result["components"].values())) if "components" in result else result
    return next(item for item in entry["layers"] if item["name"] == layer)["modalities"]["text"]


def test_finds_the_planted_outlier_token_that_sets_the_static_range(mlp):
    samples = [Sample(f, f"val {i}") for i, f in enumerate(_inputs(4, seed=7, outlier=200.0))]
    result = diagnose_file(mlp["float"], mlp["outlier"], samples, top=2)
    fc1 = _figures(result, "fc1")
    assert [t["position"] for t in fc1["top_tokens"]] == [OUTLIER_POSITION, OUTLIER_POSITION]
    assert fc1["top_tokens"][0]["absmax"] == pytest.approx(200.0, rel=1e-4)
    assert fc1["top_tokens"][0]["of_clip"] == pytest.approx(1.0, abs=0.01)  # calibration saw the same sink
    assert fc1["clips"] == [pytest.approx(200.0, rel=1e-3)]
    assert fc1["median_row_absmax_of_clip"] < 0.02  # a typical token uses under 2 % of the int8 grid
    # per-token scales would recover what the one static range costs an ordinary token
    assert fc1["token_gap_db"] > 20.0 and fc1["static_token_db"] < fc1["static_db"] - 10
    # the first layer's input is the float input: against float it loses what the static range loses (W8 is small)
    assert abs(fc1["vs_float_db"] - fc1["static_db"]) < 1.0
    plain = diagnose_file(mlp["float"], mlp["plain"], [Sample(f, "") for f in _inputs(4, 7, 0.0)])
    assert result["output"]["vs_float_db"] < plain["output"]["vs_float_db"] - 10


def test_without_an_outlier_static_is_close_to_dynamic(mlp):
    samples = [Sample(f, "") for f in _inputs(4, seed=7, outlier=0.0)]
    fc1 = _figures(diagnose_file(mlp["float"], mlp["plain"], samples), "fc1")
    assert fc1["gap_db"] < 6.0 and fc1["token_gap_db"] < 6.0
    assert fc1["static_db"] > 30.0
    assert fc1["median_row_absmax_of_clip"] > 0.4


def test_reads_the_static_scale_and_weight_the_compiled_graph_holds(mlp):
    layers, skipped = find_quantized_layers(load_model(mlp["outlier"]))
    assert [layer.name for layer in layers] == ["fc1", "fc2"] and skipped == []
    fc1 = layers[0]
    assert fc1.bits == 8
    assert float(constant_array(fc1.scale)) * fc1.qmax == pytest.approx(200.0, rel=1e-3)  # calibration min/max
    float_weight = numpy_helper.to_array(onnx.load(mlp["float"]).graph.initializer[0])
    assert np.abs(fc1.weight - float_weight).max() <= np.abs(float_weight).max(axis=0).max() / 127 / 2 + 1e-6


def test_dynamic_fake_quant_is_exact_on_the_grid():
    x = np.array([[127.0, -64.0, 1.0], [0.5, 0.25, -0.5]], np.float32)
    out = dynamic_fake_quant(x, 8)
    np.testing.assert_allclose(out[0], x[0])
    assert np.abs(out[1] - x[1]).max() <= 0.5 / 127 / 2 + 1e-7


@pytest.fixture(scope="module")
def mquant_llama(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    source = tiny_model_dir("llama") / "decoder.onnx"
    out = tmp_path_factory.mktemp("diagnose_llama") / "decoder.mquant.onnx"
    compile_file(source, out, "mquant", num_samples=4)
    return source, out


def test_positions_are_original_after_aifs(mquant_llama):
    """Image tokens at the END of the sequence: AIFS moves them first inside the graph; the diagnosis must report
    every row at its original position, so each top token's position holds its own modality in the feed."""
    source, compiled = mquant_llama
    feeds = random_feeds(load_model(source), 3, seed=3)
    for feed in feeds:
        ids = np.zeros_like(feed["modality_ids"])
        ids[..., -5:] = 1
        feed["modality_ids"] = ids
    result = diagnose_file(source, compiled, [Sample(f, f"#{i}") for i, f in enumerate(feeds)], top=5)
    assert any(node.name.startswith("mqc_aifs") for node in load_model(compiled).graph)
    modality_id = {"text": 0, "image": 1}
    checked = 0
    for layer in result["layers"]:
        for modality, figures in layer["modalities"].items():
            for token in figures["top_tokens"]:
                assert feeds[token["sample"]]["modality_ids"][0, token["position"]] == modality_id[modality]
                checked += 1
    assert checked > 20
    # rotated outputs (V/O Hadamards, R1 into the residual stream) are not compared with float, q/k are
    by_name = {layer["name"]: layer for layer in result["layers"]}
    q = next(v for k, v in by_name.items() if k.endswith("q_proj"))
    o = next(v for k, v in by_name.items() if k.endswith("o_proj"))
    assert q["modalities"]["text"]["vs_float_db"] is not None
    assert o["modalities"]["text"]["vs_float_db"] is None and abs(o["modalities"]["text"]["vs_float_cosine"]) < 0.5


def test_model_folder_uses_labelled_validation_samples(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llava")
    compiled = tmp_path / "llava.w8a8"
    compile_package(source, compiled, "w8a8", num_samples=4)
    result = diagnose(source, compiled, num_samples=4)
    assert result["inputs"].startswith("validation split")
    decoder = result["components"]["decoder.onnx"]
    assert len(decoder["samples"]) == 4 and decoder["samples"][0].startswith("image ")
    tokens = [t["token"] for layer in decoder["layers"] for t in layer["modalities"]["image"]["top_tokens"]]
    assert tokens and all(t.startswith("image patch ") for t in tokens)
    texts = [t["token"] for layer in decoder["layers"] for t in layer["modalities"]["text"]["top_tokens"]]
    assert all("(id " in t for t in texts)
    assert decoder["output"]["vs_float_db"] is not None
    vision = result["components"]["vision.onnx"]
    assert set(vision["layers"][0]["modalities"]) == {"image"}
    only = diagnose(source, compiled, num_samples=1, components=["vision"])
    assert list(only["components"]) == ["vision.onnx"]
    with pytest.raises(InputModelError, match="no compiled component"):
        diagnose(source, compiled, num_samples=1, components=["audio"])


def test_cli_json_and_bad_input(mlp, tmp_path):
    runner = CliRunner()
    out = tmp_path / "diag.json"
    done = runner.invoke(main, ["diagnose", str(mlp["float"]), str(mlp["outlier"]), "--calib",
                                str(mlp["calib_outlier"]), "--samples", "2", "--json", "-o", str(out)])
    assert done.exit_code == 0, done.output
    written = json.loads(out.read_text())
    assert written["components"]["mlp.outlier.onnx"]["layers"][0]["name"] == "fc1"
    text = runner.invoke(main, ["diagnose", str(mlp["float"]), str(mlp["outlier"]), "--samples", "1"])
    assert text.exit_code == 0 and "largest static-vs-dynamic gaps" in text.output
    for args in ([str(mlp["float"]), str(tmp_path)],  # a file against a folder
                 [str(mlp["float"]), str(mlp["float"])]):  # a float graph has no static layer
        bad = runner.invoke(main, ["diagnose", *args])
        assert bad.exit_code == 2 and "error" in bad.output, bad.output
    assert mlp["float"].read_bytes() == _two_layer_mlp(tmp_path / "again.onnx").read_bytes()  # input untouched


def test_plot_draws_static_and_dynamic_sqnr_of_every_layer(mlp, tmp_path):
    import xml.etree.ElementTree as ET

    plot, data = tmp_path / "sqnr.svg", tmp_path / "diag.json"
    done = CliRunner().invoke(main, ["diagnose", str(mlp["float"]), str(mlp["outlier"]), "--calib",
                                     str(mlp["calib_outlier"]), "--samples", "2", "-o", str(data), "--plot", str(plot)])
    assert done.exit_code == 0, done.output
    layers = json.loads(data.read_text())["components"]["mlp.outlier.onnx"]["layers"]
    lines = {p.get("data-label"): p.get("points").split() for p in ET.parse(plot).getroot().iter()
             if p.tag.endswith("polyline")}
    assert set(lines) == {"text, static scales", "text, dynamic scales"}
    static = [float(xy.split(",")[1]) for xy in lines["text, static scales"]]
    dynamic = [float(xy.split(",")[1]) for xy in lines["text, dynamic scales"]]
    assert len(static) == len(dynamic) == len(layers) == 2
    for layer, y_static, y_dynamic in zip(layers, static, dynamic, strict=True):  # higher dB is drawn higher up
        figures = layer["modalities"]["text"]
        assert (y_static < y_dynamic) == (figures["static_token_db"] > figures["dynamic_token_db"])
    bad = CliRunner().invoke(main, ["diagnose", str(mlp["float"]), str(mlp["outlier"]), "--plot",
                                    str(tmp_path / "missing" / "x.svg")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_dequantized_weight_reads_blocked_scales_and_zero_points():
    """Per-group weights (GPTQ group_size, ONNX blocked DequantizeLinear on the input axis) with zero points."""
    import onnx_ir as ir

    from mqc.diagnose import dequantized_weight

    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, size=(64, 8)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=(2, 8)).astype(np.float32)
    zero = rng.integers(-2, 3, size=(2, 8)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], axis=0, block_size=32),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    expected = (q.astype(np.float32) - np.repeat(zero, 32, axis=0)) * np.repeat(scale, 32, axis=0)
    np.testing.assert_array_equal(dequantized_weight(matmul), expected)
