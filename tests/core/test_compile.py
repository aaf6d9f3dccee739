import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import mqc
from mqc.calibration import random_feeds
from mqc.cli import main
from mqc.errors import VerificationError
from mqc.ir import load_model
from mqc.pass_manager import CompileContext, MqcPass, PassManager
from mqc.quantizer import sqnr_db
from mqc.recipes import Recipe, load_recipe, with_overrides
from mqc.report import read_report


def _logits(path, feed):
    return mqc.open_session(path).run(["logits"], feed)[0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(("recipe", "min_sqnr", "int_type"), [("w8a8", 20.0, onnx.TensorProto.INT8), ("w4a8-rtn", 5.0, onnx.TensorProto.INT4)])
def test_compile_runs_in_onnxruntime_and_reports_sqnr(tiny_models, tmp_path, family, recipe, min_sqnr, int_type):
    source = tiny_models[family] / "decoder.onnx"
    out = tmp_path / "q.onnx"
    report = mqc.compile(source, out, recipe, verify=True)
    feed = random_feeds(load_model(source), 1, seed=123)[0]
    ref, got = _logits(source, feed), _logits(out, feed)
    assert sqnr_db(ref, got) > min_sqnr
    stored = read_report(str(out))
    assert stored is not None and stored.recipe == recipe
    layers = stored.layer_table()
    assert len(layers) == 14 and all(np.isfinite(row["sqnr_db"]) for row in layers)
    assert {p.name: p.verify is not None for p in stored.passes} == {"upgrade_opset": True, "fuse_norms": True, "quantize_linears": False}
    assert report.passes[-1].skipped[0]["reason"].startswith("role lm_head")
    weights = [t for t in onnx.load(str(out)).graph.initializer if t.name.endswith(".weight_q")]
    assert len(weights) == 14 and {t.data_type for t in weights} == {int_type}
    assert not any(n.op_type == "RMSNormalization" for n in onnx.load(str(source)).graph.node), "input untouched"


def test_w8a8_is_closer_to_float_than_w4a8(llama_decoder, tmp_path):
    feed = random_feeds(load_model(llama_decoder), 1, seed=7)[0]
    ref = _logits(llama_decoder, feed)
    sqnr = {}
    for recipe in ("w8a8", "w4a8-rtn"):
        mqc.compile(llama_decoder, tmp_path / f"{recipe}.onnx", recipe)
        sqnr[recipe] = sqnr_db(ref, _logits(tmp_path / f"{recipe}.onnx", feed))
    assert sqnr["w8a8"] > sqnr["w4a8-rtn"] + 6


def test_calibration_file_exclude_and_recipe_file(llama_decoder, tmp_path):
    feeds = random_feeds(load_model(llama_decoder), 3, seed=1)
    for i, feed in enumerate(feeds):
        np.savez(tmp_path / f"sample{i}.npz", **{k: v for k, v in feed.items() if "past" not in k})
    recipe_file = tmp_path / "mine.json"
    recipe_file.write_text(json.dumps({"name": "mine", "passes": [
        {"pass": "fuse_norms"}, {"pass": "quantize_linears", "weight_bits": 8, "act_method": "mse", "group_size": 32}]}))
    report = mqc.compile(llama_decoder, tmp_path / "q.onnx", str(recipe_file), calib=tmp_path, exclude=[r"mlp\.down_proj"])
    assert report.calibration["samples"] == 2 and report.calibration["held_out_for_quality_gate"] == 1
    names = {row["name"] for row in report.layer_table()}
    assert not any("down_proj" in n for n in names) and len(names) == 12
    assert sum("--exclude" in s["reason"] for s in report.passes[-1].skipped) == 2
    feed = feeds[0]
    assert sqnr_db(_logits(llama_decoder, feed), _logits(tmp_path / "q.onnx", feed)) > 20


class _BreaksFunction(MqcPass):
    """Claims to preserve function but scales one weight: --verify must catch it."""

    name = "breaks_function"
    function_preserving = True

    def run(self, model):
        from mqc.ir import replace_initializer
        from mqc.model_map import build_model_map

        lin = build_model_map(model).linears[0]
        replace_initializer(lin.weight, lin.weight_array() * 1.01)
        return True


def test_verify_fails_loudly_on_drift(llama_decoder):
    model = load_model(llama_decoder)
    feeds = random_feeds(model, 2)
    ctx = CompileContext(lambda: feeds, verify=True)
    with pytest.raises(VerificationError, match="breaks_function changed the model's outputs"):
        PassManager([_BreaksFunction()], ctx).run(model)
    # without --verify the same pass goes through silently: the check is what catches it
    PassManager([_BreaksFunction()], CompileContext(lambda: feeds)).run(load_model(llama_decoder))


def test_cli_compile_explain_recipes(llama_decoder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.onnx"
    result = runner.invoke(main, ["compile", str(llama_decoder), "-o", str(out), "--recipe", "w4a8-rtn", "--verify"])
    assert result.exit_code == 0, result.output
    explained = runner.invoke(main, ["explain", str(out)])
    assert explained.exit_code == 0 and "SQNR" in explained.output and "self_attn.q_proj" in explained.output
    assert "variant: one static activation scale shared" in " ".join(explained.output.split())
    data = json.loads(runner.invoke(main, ["explain", str(out), "--json"]).output)
    layers = data["cli.onnx"]["passes"][-1]["layers"]
    assert len(layers) == 14 and all("sqnr_db" in layer for layer in layers)
    wide = tmp_path / "w8.onnx"
    result = runner.invoke(main, ["compile", str(llama_decoder), "-o", str(wide), "--recipe", "w4a8-rtn", "--bits", "w8a8"])
    assert result.exit_code == 0 and "w4a8-rtn --bits w8a8" in result.output, result.output
    wide_layers = json.loads(runner.invoke(main, ["explain", str(wide), "--json"]).output)["w8.onnx"]["passes"][-1]["layers"]
    assert {layer["w_bits"] for layer in wide_layers} == {8}
    dry = runner.invoke(main, ["explain", str(llama_decoder), "--recipe", "w8a8"])
    assert dry.exit_code == 0 and "quantize_linears" in dry.output
    assert not (llama_decoder.parent / "decoder.dry-run.onnx").exists()
    listed = runner.invoke(main, ["recipes"])
    assert "w8a8" in listed.output and "w4a8-rtn" in listed.output and "quantize_linears" in listed.output


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8-rtn"])
def test_format_mqc_matches_qdq(llama_decoder, tmp_path, recipe):
    """`--format mqc` lowers the QDQ linears into the runtime-ops library and computes the same logits."""
    feed = random_feeds(load_model(llama_decoder), 1, seed=11)[0]
    mqc.compile(llama_decoder, tmp_path / "qdq.onnx", recipe)
    report = mqc.compile(llama_decoder, tmp_path / "mqc.onnx", recipe, fmt="mqc")
    assert report.format == "mqc" and report.passes[-1].name == "lower_runtime_ops"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "mqc.onnx")).graph.node if n.domain == "ai.mqc"}
    assert ops == {"QuantLinear"}
    np.testing.assert_allclose(_logits(tmp_path / "mqc.onnx", feed), _logits(tmp_path / "qdq.onnx", feed), atol=1e-5)


def test_static_shape_linear_with_bias_opens_at_full_optimization(tmp_path):
    """A static 3-D input with a biased linear used to break onnxruntime's MatMulAddFusion on QDQ graphs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    source = tmp_path / "static.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), source)
    mqc.compile(source, tmp_path / "q.onnx", "w8a8")
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    out = mqc.open_session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    assert sqnr_db(x @ weight + bias, out) > 30


def test_grouped_int4_weights_fuse_into_matmulnbits_and_keep_the_graphs_numerics(llama_decoder, tmp_path):
    """Per-group int4 weights stay [in, out], blocked on axis 0 with no Transpose: onnxruntime fuses them into
    MatMulNBits (instead of dequantizing every weight on each call), and at mqc.open_session's accuracy level the
    fused model computes what the unfused graph does. Float activations (masquant's dynamic form), as the fusion
    needs: cmc quantizes the MAS linears (after MAS at its initial scales: cmc refuses a graph without MAS), the
    plain quantizer the others."""
    overrides = {"cmc": {"group_size": 16}, "quantize_linears": {"group_size": 16}, "mas": {"learn": False}}
    recipe = with_overrides(load_recipe("masquant-no-cmc"), overrides)
    mqc.compile(llama_decoder, tmp_path / "q.onnx", recipe)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    dequants = [n for n in graph.node if n.name.endswith("/weight_dequant")]
    assert dequants and not any(n.op_type == "Transpose" and n.name.endswith("/weight_t") for n in graph.node)
    assert {(a.name, a.i) for n in dequants for a in n.attribute} == {("axis", 0), ("block_size", 16)}
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == len(dequants)
    feed = random_feeds(load_model(llama_decoder), 1, seed=3)[0]
    unfused = mqc.open_session(tmp_path / "q.onnx", optimization_level="disable").run(["logits"], feed)[0]
    assert sqnr_db(unfused, _logits(tmp_path / "q.onnx", feed)) > 80
    for bits in (4, 8):  # behind static QDQ activations, in both layouts
        static = Recipe(f"w{bits}-g16", "", [{"pass": "fuse_norms"}, {"pass": "quantize_linears", "weight_bits": bits,
                                                                      "group_size": 16}], {})
        mqc.compile(llama_decoder, tmp_path / f"s{bits}.onnx", static)
        unfused = mqc.open_session(tmp_path / f"s{bits}.onnx", optimization_level="disable").run(["logits"], feed)[0]
        assert sqnr_db(unfused, _logits(tmp_path / f"s{bits}.onnx", feed)) > 80, bits
