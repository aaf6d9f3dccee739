"""Compiling a whole model folder: every quantizable component, calibrated from the package's own data."""

import json

import pytest
from mqc.models.calibration import calibration_feeds

import mqc
from mqc.errors import InputModelError, OutputPathError
from mqc.quantizer import sqnr_db
from mqc.report import read_report


def test_llava_folder_compiles_vision_and_decoder(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llava")
    out = tmp_path / "llava.w8a8"
    reports = mqc.compile(source, out, "w8a8", num_samples=4, verify=True)
    assert set(reports) == {"vision", "decoder"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compiled"]["recipe"] == "w8a8" and manifest["compiled"]["components"] == ["decoder", "vision"]
    for component in ("vision", "decoder"):
        report = read_report(str(out / manifest["components"][component]))
        assert report is not None and report.layer_table(), component
    vision_rows = reports["vision"].layer_table()
    assert all("sqnr_db_image" in row and "sqnr_db_text" not in row for row in vision_rows), "vision tokens are image"
    # the compiled folder runs: vision features feed the decoder like the float one
    vision = mqc.open_session(out / "vision.onnx")
    pixel = next(iter(calibration_feeds(source, "vision", 1, seed=7)))["pixel_values"]  # a real easy-vqa image
    embeds = vision.run(None, {"pixel_values": pixel})[0]
    reference = mqc.open_session(source / "vision.onnx").run(None, {"pixel_values": pixel})[0]
    assert sqnr_db(reference, embeds) > 20
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging folder left behind"


def test_folder_errors(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llava")
    with pytest.raises(OutputPathError, match="refusing to overwrite the input"):
        mqc.compile(source, source, "w8a8")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="not a model directory"):
        mqc.compile(source, blocker, "w8a8")
    with pytest.raises(InputModelError, match="neither a packaged model"):
        mqc.compile("no-such-model", tmp_path / "x", "w8a8")


def test_component_kept_in_float(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llava")
    recipe = tmp_path / "llm-only.json"
    recipe.write_text(json.dumps({"name": "llm-only", "components": {"vision": {"float": True}},
                                  "passes": [{"pass": "quantize_linears", "weight_bits": 8}]}))
    reports = mqc.compile(source, tmp_path / "out", str(recipe), num_samples=2)
    assert set(reports) == {"decoder"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["compiled"]["float_components"] == ["vision"]
    assert read_report(str(tmp_path / "out" / "vision.onnx")) is None
    assert (tmp_path / "out" / "vision.onnx").read_bytes() == (source / "vision.onnx").read_bytes()


def test_a_recipes_text_window_sets_the_decoders_text_samples(tiny_model_dir, tmp_path):
    from mqc.models.calibration import TEXT_EVERY, TEXT_TOKENS

    source = tiny_model_dir("llava")
    for window in (TEXT_TOKENS, 40):
        feeds = list(calibration_feeds(source, "decoder", TEXT_EVERY, text_window=window))
        assert feeds[TEXT_EVERY - 1]["modality_ids"].shape == (1, window)  # the text-only sample
        assert feeds[0]["modality_ids"].any()  # an image question, whatever the window
    recipe = tmp_path / "long-text.json"
    recipe.write_text(json.dumps({"name": "long-text", "extends": "w8a8", "text_window": 40}))
    reports = mqc.compile(source, tmp_path / "out", str(recipe), num_samples=TEXT_EVERY)
    stored = read_report(str(tmp_path / "out" / "decoder.onnx"))  # what explain shows
    assert stored.calibration == reports["decoder"].calibration
    assert stored.calibration["text_window"] == 40 and "calibration set" in stored.calibration["source"]
    assert "text_window" not in reports["vision"].calibration
