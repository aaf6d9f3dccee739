"""Every bad input gets one clear message and exit code 2; the input is never modified, no partial output is left."""

import hashlib
import shutil

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from mqc.cli import main


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.fixture()
def model_copy(llama_decoder, tmp_path):
    target = tmp_path / "in" / "decoder.onnx"
    target.parent.mkdir()
    shutil.copy(llama_decoder, target)
    data = llama_decoder.parent / "decoder.onnx.data"
    if data.exists():
        shutil.copy(data, target.parent / data.name)
    return target


def _assert_clean_failure(args, message, tmp_path, output):
    code, text = _run(args)
    assert code == 2, text
    assert message in text
    assert "Traceback" not in text
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_missing_file(tmp_path):
    out = tmp_path / "o.onnx"
    _assert_clean_failure(["compile", str(tmp_path / "nope.onnx"), "-o", str(out)], "model file not found", tmp_path, out)


def test_truncated_file(model_copy, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model_copy.read_bytes()[:2000])
    out = tmp_path / "o.onnx"
    _assert_clean_failure(["compile", str(broken), "-o", str(out)], "not a readable ONNX model", tmp_path, out)


def test_not_onnx(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(["compile", str(text), "-o", str(out)], "not a readable ONNX model", tmp_path, out)


def test_opset_too_old(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    old = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=7), old)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(["compile", str(old), "-o", str(out)], "opset 9 is too old", tmp_path, out)


def test_nothing_to_quantize(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    plain = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), plain)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(["compile", str(plain), "-o", str(out)], "no linear layer", tmp_path, out)


def test_calibration_mismatch(model_copy, tmp_path):
    import numpy as np

    bad = tmp_path / "calib.npz"
    np.savez(bad, pixel_values=np.zeros((1, 3, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    before = _digest(model_copy)
    _assert_clean_failure(["compile", str(model_copy), "-o", str(out), "--calib", str(bad)], "not inputs of the model", tmp_path, out)
    assert _digest(model_copy) == before


def test_unknown_recipe(model_copy, tmp_path):
    out = tmp_path / "o.onnx"
    _assert_clean_failure(["compile", str(model_copy), "-o", str(out), "--recipe", "w3a3-magic"], "unknown recipe 'w3a3-magic'", tmp_path, out)


def test_unwritable_output(model_copy, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "o.onnx"  # parent is a file: nothing can be written there
    code, text = _run(["compile", str(model_copy), "-o", str(out)])
    assert code == 2 and "output folder does not exist" in text and "Traceback" not in text


def test_refuses_to_overwrite_input(model_copy):
    before = _digest(model_copy)
    code, text = _run(["compile", str(model_copy), "-o", str(model_copy)])
    assert code == 2 and "refusing to overwrite the input" in text
    assert _digest(model_copy) == before


def test_explain_on_float_model_says_what_to_do(model_copy):
    code, text = _run(["explain", str(model_copy)])
    assert code == 2 and "not compiled by mqc" in text


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code != 0 and result.exception is not None


def test_failed_compile_leaves_previous_output_intact(model_copy, tmp_path):
    out = tmp_path / "keep.onnx"
    code, _ = _run(["compile", str(model_copy), "-o", str(out)])
    assert code == 0
    before = _digest(out)
    code, _ = _run(["compile", str(model_copy), "-o", str(out), "--recipe", "nope"])
    assert code == 2 and _digest(out) == before


@pytest.mark.slow
def test_sigterm_mid_compile_leaves_no_staging(tiny_model_dir, tmp_path):
    """A killed package compile (SIGTERM, as a scheduler sends) unwinds and removes its staging folder."""
    import signal
    import subprocess
    import sys
    import time

    source, output = tiny_model_dir("llava"), tmp_path / "out" / "compiled"
    output.parent.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "mqc.cli", "compile", str(source), "-o", str(output),
                                "--recipe", "quarot", "--samples", "8"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".") for p in output.parent.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the compile ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    # 143 = 128 + SIGTERM; 1 when the signal lands inside an import, whose machinery re-raises it as ImportError
    assert process.wait(timeout=60) in (128 + signal.SIGTERM, 1)
    assert list(output.parent.iterdir()) == []
