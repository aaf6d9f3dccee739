"""Crafted inputs, as an attacker or a careless exporter would write them (issue 13).

Every case is refused with one line and exit 2, or compiles to an output that loads. Around every case: nothing
outside the model's and the output's folders is read (a sentinel secret's bytes appear in no output) or written,
the input is unchanged, and a previous output in the output folder still loads.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from untrusted import (
    HIDDEN,
    SECRET,
    assert_loads,
    assert_one_line_error,
    assert_secret_absent,
    external,
    linear_model,
    run_cli,
    save_with_data,
    tree_digest,
    weight,
)

import mqc
from mqc.errors import MqcError


@dataclass
class Place:
    """One crafted case's folders: the model's, the output's (with a previous good output) and a secret's."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "m"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def secret(self) -> Path:
        return self.root / "private" / "secret.bin"

    @property
    def previous(self) -> Path:
        return self.out_dir / "q.onnx"


@pytest.fixture(scope="session")
def previous_output(tmp_path_factory) -> Path:
    """A compiled output, copied into every case's output folder before the case runs."""
    folder = tmp_path_factory.mktemp("previous")
    source = save_with_data(linear_model(), folder / "good.onnx")
    (folder / "out").mkdir()
    code, text = run_cli(["compile", source, "-o", folder / "out" / "q.onnx"])
    assert code == 0, text
    return folder / "out"


@pytest.fixture()
def place(tmp_path, previous_output) -> Place:
    spot = Place(tmp_path)
    spot.model_dir.mkdir()
    spot.secret.parent.mkdir()
    spot.secret.write_bytes(SECRET)
    shutil.copytree(previous_output, spot.out_dir)
    return spot


def _guarded(spot: Place, action: Callable[[], None], ok: bool = False) -> None:
    """Run ``action`` and check what every case must keep true, failed or not."""
    before_in, before_out = tree_digest(spot.model_dir), tree_digest(spot.out_dir)
    before_secret = tree_digest(spot.secret.parent)
    action()
    assert tree_digest(spot.model_dir) == before_in, "the input folder changed"
    assert tree_digest(spot.secret.parent) == before_secret
    assert_secret_absent(spot.out_dir)
    assert_loads(spot.previous)
    if not ok:
        assert tree_digest(spot.out_dir) == before_out, "a failed compile changed the output folder"
    assert not [p for p in spot.out_dir.iterdir() if p.name.startswith(".")], "staging left behind"


# ------------------------------------------------------------------------------------ 1. external-data containment

def _dotdot(spot: Place) -> str:
    return "../private/secret.bin"


def _absolute(spot: Place) -> str:
    return str(spot.secret)


def _symlink(spot: Place) -> str:
    (spot.model_dir / "w.bin").symlink_to(spot.secret)
    return "w.bin"


def _hardlink(spot: Place) -> str:
    os.link(spot.secret, spot.model_dir / "w.bin")
    return "w.bin"


ESCAPES = {
    "dotdot": (_dotdot, "leaves the model's folder"),
    "absolute": (_absolute, "is absolute"),
    "symlink": (_symlink, "link to a file outside"),
    "hardlink": (_hardlink, "hard links"),
}


@pytest.mark.parametrize("how", ["relative", "absolute", "api", "explain"])
@pytest.mark.parametrize("shape", sorted(ESCAPES))
def test_external_data_outside_the_folder_is_refused(place, monkeypatch, shape, how):
    make_location, message = ESCAPES[shape]
    model_path = place.model_dir / "model.onnx"
    onnx.save(linear_model([external("W", make_location(place))]), str(model_path))
    output = place.out_dir / "new.onnx"

    def attempt() -> None:
        if how == "api":
            with pytest.raises(MqcError, match=message):
                mqc.compile(model_path, output)
            return
        if how == "relative":
            monkeypatch.chdir(place.model_dir)
            args = ["compile", "model.onnx", "-o", os.path.relpath(output, place.model_dir)]
        elif how == "explain":
            monkeypatch.chdir(place.model_dir)
            args = ["explain", "--recipe", "w8a8", "model.onnx"]
        else:
            args = ["compile", model_path, "-o", output]
        assert_one_line_error(*run_cli(args), message)

    _guarded(place, attempt)


def _function_with_external_constant(location: str) -> onnx.FunctionProto:
    const = helper.make_node("Constant", [], ["w"], value=external("fw", location))
    return helper.make_function("local", "Proj", ["a"], ["b"], [const, helper.make_node("MatMul", ["a", "w"], ["b"])],
                                [helper.make_opsetid("", 18)])


def test_external_tensor_in_a_function_body_is_confined(place):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Proj", ["h"], ["y"], domain="local", name="proj")]
    model = linear_model(nodes=nodes, functions=[_function_with_external_constant("../private/secret.bin")],
                         extra_opsets=[("local", 1)])
    onnx.save(model, str(place.model_dir / "model.onnx"))
    _guarded(place, lambda: assert_one_line_error(
        *run_cli(["compile", place.model_dir / "model.onnx", "-o", place.out_dir / "new.onnx"]), "function Proj"))


def test_external_tensor_in_a_subgraph_is_confined(place):
    branch = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [HIDDEN, HIDDEN])],
                               [external("sub_w", str(place.secret))])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("If", ["cond"], ["w2"], then_branch=branch, else_branch=branch, name="pick"),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    onnx.save(linear_model([weight(), cond], nodes=nodes), str(place.model_dir / "model.onnx"))
    _guarded(place, lambda: assert_one_line_error(
        *run_cli(["compile", place.model_dir / "model.onnx", "-o", place.out_dir / "new.onnx"]), "is absolute"))


def test_constant_with_external_data_inside_the_folder_compiles(place):
    """A main-graph Constant whose value sits in the model's own data file is read from there, not from the cwd."""
    array = np.random.default_rng(1).standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    (place.model_dir / "const.bin").write_bytes(array.tobytes())
    nodes = [helper.make_node("Constant", [], ["W"], value=external("W", "const.bin"), name="wconst"),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"])]
    onnx.save(linear_model([], nodes=nodes), str(place.model_dir / "model.onnx"))
    output = place.out_dir / "new.onnx"

    def attempt() -> None:
        code, text = run_cli(["compile", place.model_dir / "model.onnx", "-o", output])
        assert code == 0, text
        assert_loads(output)

    _guarded(place, attempt, ok=True)
    outside = place.out_dir.resolve()
    proto = onnx.load(str(output), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                assert (outside / entry.value).resolve().parent == outside


def test_open_session_refuses_escaping_data(place):
    onnx.save(linear_model([external("W", "../private/secret.bin")]), str(place.model_dir / "model.onnx"))
    with pytest.raises(MqcError, match="leaves the model's folder"):
        mqc.open_session(place.model_dir / "model.onnx")


# --------------------------------------------------------------------------------------- 2. model folders confined

def _folder(spot: Place, components: dict[str, str], extra: Callable[[Path], None] = lambda d: None) -> Path:
    folder = spot.model_dir / "pkg"
    folder.mkdir()
    save_with_data(linear_model(), folder / "decoder.onnx")
    (folder / "manifest.json").write_text(json.dumps({"format": "mqc-model/1", "name": "t", "components": components}))
    extra(folder)
    return folder


FOLDER_CASES = {
    "dotdot component": (lambda s: {"decoder": "../../private/decoder.onnx"}, lambda d: None, "leaves the folder"),
    "absolute component": (lambda s: {"decoder": str(s.secret)}, lambda d: None, "leaves the folder"),
    "symlinked component": (lambda s: {"decoder": "link.onnx"},
                            lambda d: (d / "link.onnx").symlink_to(d / "decoder.onnx"), "is a link"),
    "symlinked entry": (lambda s: {"decoder": "decoder.onnx"},
                        lambda d: (d / "tokenizer.json").symlink_to(d.parent.parent / "private" / "secret.bin"),
                        "holds a symlink"),
}


@pytest.mark.parametrize("command", ["compile", "explain"])
@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_model_folder_paths_are_confined(place, case, command):
    components, extra, message = FOLDER_CASES[case]
    if command == "explain" and case == "symlinked entry":
        pytest.skip("explain reads only the manifest's components")
    (place.root / "private" / "decoder.onnx").write_bytes(SECRET)
    folder = _folder(place, components(place), extra)
    args = ["compile", folder, "-o", place.out_dir / "pkg"] if command == "compile" else ["explain", folder]
    _guarded(place, lambda: assert_one_line_error(*run_cli(args), message))


# ------------------------------------------------------------------------------------------ 4. explain escapes text

EVIL = "fc\x1b]0;pwned\x07\x1b[31m[link=http://evil.example]click[/link][/bogus]\u202e"


def _strings(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return set().union(*(_strings(item) for item in items)) if items else set()


def test_explain_shows_names_from_the_file_inertly(place):
    model = linear_model([weight(EVIL)], nodes=[helper.make_node("MatMul", ["x", EVIL], ["h"], name=EVIL),
                                                helper.make_node("Relu", ["h"], ["y"], name="act")])
    source = save_with_data(model, place.model_dir / "model.onnx")
    output = place.out_dir / "evil.onnx"

    def attempt() -> None:
        code, text = run_cli(["compile", source, "-o", output])
        assert code == 0, text
        code, text = run_cli(["explain", output], env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
        assert code == 0, text
        assert "\x1b]" not in text, "an OSC sequence (window title or hyperlink) reached the terminal"
        assert "\x07" not in text and "\u202e" not in text and "\x1b[31m" not in text
        assert "[/bogus]" in text and "\\x1b" in text
        code, text = run_cli(["explain", "--json", output])
        assert code == 0
        assert EVIL in _strings(json.loads(text)), "JSON output carries the name exactly, as JSON"

    _guarded(place, attempt, ok=True)


# ------------------------------------------------------------------------------------- 5. -o never aliases an input

def test_output_naming_the_inputs_data_file_is_refused(place):
    source = save_with_data(linear_model(), place.model_dir / "model.onnx")
    _guarded(place, lambda: assert_one_line_error(
        *run_cli(["compile", source, "-o", place.model_dir / "model.onnx.data"]), "refusing to overwrite the input"))
    assert_loads(source)


def test_output_that_is_a_hard_link_to_the_input_data_is_refused(place):
    source = save_with_data(linear_model(), place.model_dir / "model.onnx")
    alias = place.out_dir / "alias.onnx"
    shutil.copy(source.with_name("model.onnx.data"), place.root / "data-copy")  # keep nlink at 1 for the input
    os.link(source, alias)
    assert_one_line_error(*run_cli(["compile", source, "-o", alias]), "refusing to overwrite the input")
    assert_loads(source)


@pytest.mark.parametrize("target", ["device", "fifo"])
def test_output_that_is_a_device_or_fifo_is_refused(place, target):
    source = save_with_data(linear_model(), place.model_dir / "model.onnx")
    if target == "fifo":
        output = place.out_dir / "pipe.onnx"
        os.mkfifo(output)
    else:
        output = Path("/dev/null")
    _guarded(place, lambda: assert_one_line_error(*run_cli(["compile", source, "-o", output]), "device, FIFO"))
    assert (target == "device" and output.is_char_device()) or output.is_fifo()


# ---------------------------------------------------------------------------------------------- 8, 10. bad input

def _cycle() -> onnx.ModelProto:
    return linear_model(nodes=[helper.make_node("Add", ["x", "y"], ["h"], name="a"),
                               helper.make_node("MatMul", ["h", "W"], ["y"], name="fc")])


def _undefined_input() -> onnx.ModelProto:
    return linear_model(nodes=[helper.make_node("MatMul", ["x", "ghost"], ["y"], name="fc")])


def _dims(dims: list[int]) -> onnx.ModelProto:
    tensor = weight()
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return linear_model([tensor])


def _renamed(old: bytes, new: bytes) -> Callable[[], bytes]:
    return lambda: linear_model(nodes=[helper.make_node("MatMul", ["x", "W"], ["h"], name=old.decode()),
                                       helper.make_node("Relu", ["h"], ["y"], name="act")]
                                ).SerializeToString().replace(old, new)


def _duplicate_initializers() -> onnx.ModelProto:
    return linear_model([weight("W", 0), weight("W", 1)])


def _custom_op() -> onnx.ModelProto:
    return linear_model(nodes=[helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
                               helper.make_node("Boom", ["h"], ["y"], domain="evil.ops", name="boom")],
                        extra_opsets=[("evil.ops", 1)])


BAD_MODELS: dict[str, tuple[Callable[[], onnx.ModelProto | bytes], str]] = {
    "cycle": (_cycle, "cycle"),
    "undefined input": (_undefined_input, "'ghost', which no node"),
    "dims overflow int64": (lambda: _dims([2**62, 2**62]), "out of range"),
    "negative dims": (lambda: _dims([-1, HIDDEN]), "out of range"),
    "dims disagree with data": (lambda: _dims([HIDDEN, HIDDEN + 1]), f"needs {HIDDEN * (HIDDEN + 1) * 4} bytes"),
    "dims disagree with float_data": (lambda: linear_model([TensorProto(name="W", data_type=TensorProto.FLOAT,
                                                                        dims=[HIDDEN, 2], float_data=[0.5] * HIDDEN)]),
                                      f"has {HIDDEN * 2} elements, the file stores {HIDDEN} values"),
    "input dim 2^40": (lambda: linear_model(input_dims=(1, 2**40, HIDDEN)), "out of range"),
    "duplicate node names": (lambda: linear_model(nodes=[helper.make_node("MatMul", ["x", "W"], ["h"], name="n"),
                                                         helper.make_node("Relu", ["h"], ["y"], name="n")]),
                             "node names are not unique"),
    "duplicate initializers": (_duplicate_initializers, "initializer names are not unique"),
    "unknown custom op": (_custom_op, "evil.ops"),
    "opset 30": (lambda: linear_model(opset=30), "opset 30 is newer"),
    "non-UTF-8 node name": (_renamed(b"fcXXXX", b"fc\xff\xfe\xfd\xfc"), "is not valid UTF-8"),
    "empty location": (lambda: linear_model([external("W", "")]), "names no data file"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_gives_one_line(place, case):
    build, message = BAD_MODELS[case]
    built = build()
    source = place.model_dir / "model.onnx"
    source.write_bytes(built if isinstance(built, bytes) else built.SerializeToString())
    _guarded(place, lambda: assert_one_line_error(*run_cli(["compile", source, "-o", place.out_dir / "new.onnx"]),
                                                  message))


def test_external_data_that_is_a_directory(place):
    (place.model_dir / "w.bin").mkdir()
    onnx.save(linear_model([external("W", "w.bin")]), str(place.model_dir / "model.onnx"))
    _guarded(place, lambda: assert_one_line_error(
        *run_cli(["compile", place.model_dir / "model.onnx", "-o", place.out_dir / "new.onnx"]), "is a directory"))


def _dynamic_model(place: Place) -> Path:
    return save_with_data(linear_model(input_dims=("batch", "seq", HIDDEN)), place.model_dir / "model.onnx")


def _npz(path: Path, array: np.ndarray) -> Path:
    np.savez(path, x=array)
    return path


CALIBRATION_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zero tokens": (lambda d: _npz(d / "c.npz", np.zeros((1, 0, HIDDEN), np.float32)), "is empty"),
    "nan": (lambda d: _npz(d / "c.npz", np.full((1, 4, HIDDEN), np.nan, np.float32)), "NaN or Inf"),
    "inf": (lambda d: _npz(d / "c.npz", np.full((1, 4, HIDDEN), np.inf, np.float32)), "NaN or Inf"),
    "3e38": (lambda d: _npz(d / "c.npz", np.full((1, 4, HIDDEN), 3e38, np.float32)), "overflow float32"),
}


def _npz_with_text_member(folder: Path) -> Path:
    path = folder / "c.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.txt", "not an array")
    return path


CALIBRATION_CASES["npz member not .npy"] = (_npz_with_text_member, "x.txt")


@pytest.mark.parametrize("case", sorted(CALIBRATION_CASES))
def test_bad_calibration_gives_one_line(place, case):
    build, message = CALIBRATION_CASES[case]
    source = _dynamic_model(place)
    calib = build(place.root / "private")
    _guarded(place, lambda: assert_one_line_error(
        *run_cli(["compile", source, "-o", place.out_dir / "new.onnx", "--calib", calib]), message))


def test_recipe_file_problems(place):
    source = save_with_data(linear_model(), place.model_dir / "model.onnx")
    folder = place.root / "private"
    (folder / "dir.json").mkdir()
    (folder / "deep.json").write_text('{"name": "d", "passes": ' + "[" * 5000 + "]" * 5000 + "}")
    (folder / "latin1.json").write_bytes('{"name": "caf\u00e9", "passes": []}'.encode("latin-1"))
    cases = {"dir.json": "is a directory", "deep.json": "nested too deeply", "latin1.json": "not UTF-8"}

    def attempt() -> None:
        for name, message in cases.items():
            assert_one_line_error(*run_cli(["compile", source, "-o", place.out_dir / "n.onnx", "--recipe",
                                            folder / name]), message)

    _guarded(place, attempt)


def test_compile_summary_shows_a_recipe_name_from_a_file_inertly(place):
    source = save_with_data(linear_model(), place.model_dir / "model.onnx")
    recipe = place.root / "private" / "evil.json"
    recipe.write_text(json.dumps({"name": EVIL, "passes": [{"pass": "quantize_linears"}]}))

    def attempt() -> None:
        code, text = run_cli(["compile", source, "-o", place.out_dir / "new.onnx", "--recipe", recipe],
                             env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
        assert code == 0, text
        assert "\x1b]" not in text and "[/bogus]" in text

    _guarded(place, attempt, ok=True)
