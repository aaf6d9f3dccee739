"""Outputs are atomic across failures and kills, reproducible, and calibration copies nothing (issue 13, 6-14)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import pytest
from onnx import TensorProto, helper
from untrusted import (
    HIDDEN,
    assert_loads,
    assert_one_line_error,
    linear_model,
    run_cli,
    save_with_data,
    tree_digest,
    weight,
)

import mqc.outputs
import mqc.packages
from mqc.calibration import random_feeds
from mqc.ir import load_model
from mqc.report import read_report


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture()
def source(tmp_path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "out").mkdir()
    return save_with_data(linear_model(), tmp_path / "m" / "model.onnx")


def _compile(source: Path, output: Path, *extra: str) -> str:
    code, text = run_cli(["compile", source, "-o", output, *extra])
    assert code == 0, text
    return text


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".data"))


def test_recompiling_switches_data_and_removes_the_old(source, tmp_path):
    output = tmp_path / "out" / "q.onnx"
    _compile(source, output)
    first = _data_files(output.parent)
    other = save_with_data(linear_model([weight(seed=7)]), tmp_path / "m" / "other.onnx")
    _compile(other, output)
    second = _data_files(output.parent)
    assert len(first) == len(second) == 1 and first != second, (first, second)
    assert second[0].startswith("q.onnx.") and len(second[0]) == len("q.onnx.") + 16 + len(".data")
    assert_loads(output)


def test_failed_switch_keeps_the_previous_output(source, tmp_path, monkeypatch):
    output = tmp_path / "out" / "q.onnx"
    _compile(source, output)
    before = tree_digest(output.parent)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == output:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(mqc.outputs.os, "replace", failing_replace)
    other = save_with_data(linear_model([weight(seed=3)]), tmp_path / "m" / "other.onnx")
    assert_one_line_error(*run_cli(["compile", other, "-o", output]), "Input/output error")
    monkeypatch.undo()
    assert tree_digest(output.parent) == before, "the previous output (and only it) must remain"
    assert_loads(output)


def test_disk_full_is_one_line_and_keeps_the_previous_output(source, tmp_path, monkeypatch):
    """ENOSPC while the new output is written (simulated in the write itself; the error path is under test)."""
    output = tmp_path / "out" / "q.onnx"
    _compile(source, output)
    before = tree_digest(output.parent)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", full_disk)
    assert_one_line_error(*run_cli(["compile", source, "-o", output]), "no space left on the device")
    monkeypatch.undo()
    assert tree_digest(output.parent) == before
    assert_loads(output)


@pytest.fixture()
def small_disk(tmp_path):
    """A 256 kB tmpfs (needs the right to mount: root in CI containers; skipped elsewhere)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_real_full_disk_keeps_the_previous_output(source, tmp_path, small_disk):
    output = small_disk / "q.onnx"
    _compile(source, output)
    before = tree_digest(small_disk)
    big = onnx.numpy_helper.from_array(np.random.default_rng(9).standard_normal((HIDDEN, 4096)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    large = linear_model([big], nodes=nodes)
    large.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 4096
    large_source = save_with_data(large, tmp_path / "m" / "large.onnx")
    code, text = run_cli(["compile", large_source, "-o", output])
    assert_one_line_error(code, text, "cannot write")
    assert "no space left on the device" in text or "kB free in" in text, text
    assert tree_digest(small_disk) == before
    assert_loads(output)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import mqc.outputs
    real = os.replace
    def replace(src, dst):
        if Path(dst).name == "q.onnx":
            os._exit(137)  # killed between placing the new data and switching the .onnx
        return real(src, dst)
    mqc.outputs.os.replace = replace
    from mqc.cli import main
    main(sys.argv[1:])
""")


def test_kill_before_the_switch_keeps_the_previous_output_and_the_next_run_cleans(source, tmp_path):
    output = tmp_path / "out" / "q.onnx"
    _compile(source, output)
    old_data = _data_files(output.parent)
    other = save_with_data(linear_model([weight(seed=5)]), tmp_path / "m" / "other.onnx")
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "compile", str(other), "-o", str(output)],
                            capture_output=True, timeout=300)
    assert killed.returncode == 137, killed.stderr.decode()[-2000:]
    assert_loads(output)
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(".")]
    assert leftovers and len(_data_files(output.parent)) == 2, "the kill should leave a staging folder and new data"
    assert read_report(str(output)) is not None and _data_files(output.parent) != old_data
    _compile(other, output)
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(".")]
    assert len(_data_files(output.parent)) == 1
    assert_loads(output)


def test_leftovers_of_dead_runs_are_removed(source, tmp_path):
    out = tmp_path / "out"
    pid = _dead_pid()
    (out / f".q.onnx.mqc-staging-{pid}-abc").mkdir()
    (out / f".q.onnx.mqc-staging-{pid}-abc" / "q.onnx").write_bytes(b"partial")
    (out / "q.onnx.0123456789abcdef.data").write_bytes(b"orphan")
    (out / "q.onnx.data").mkdir()  # the output's old-style data path being a directory does not matter any more
    _compile(source, out / "q.onnx")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("q.onnx.") or p.is_dir()) == \
        ["q.onnx", "q.onnx.data"]
    assert (out / "q.onnx.data").is_dir()
    assert_loads(out / "q.onnx")


def _package(tmp_path: Path, seed: int) -> Path:
    folder = tmp_path / f"pkg{seed}"
    folder.mkdir()
    save_with_data(linear_model([weight(seed=seed)]), folder / "decoder.onnx")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "manifest.json").write_text('{"format": "mqc-model/1", "name": "t", "components": {"decoder": "decoder.onnx"}}')
    return folder


@pytest.fixture()
def folder_hooks(monkeypatch):
    """Core's package hooks for a hand-made folder: the folder itself and synthetic feeds (no mqc.models)."""
    hooks = mqc.packages.PackageHooks(
        resolve=Path, calibration_feeds=lambda folder, component, n: random_feeds(load_model(folder / "decoder.onnx"), n))
    monkeypatch.setattr(mqc.packages, "_hooks", hooks)


def test_folder_output_is_exchanged_and_leftovers_are_repaired(tmp_path, folder_hooks):
    output = tmp_path / "out" / "pkg"
    output.parent.mkdir()
    _compile(_package(tmp_path, 1), output, "--samples", "2")
    first = tree_digest(output)
    (output.parent / ".pkg.old").mkdir()  # left by a killed run of an earlier mqc
    _compile(_package(tmp_path, 2), output, "--samples", "2")
    assert tree_digest(output) != first and sorted(p.name for p in output.parent.iterdir()) == ["pkg"]
    assert_loads(output / "decoder.onnx")
    # a kill between the two fallback renames leaves only the retired folder: the next run puts it back first
    retired = output.parent / f".pkg.mqc-retired-{_dead_pid()}-0"
    os.replace(output, retired)
    folder = mqc.outputs.FolderStaging(output)
    assert output.is_dir() and not retired.exists()
    folder.discard()


def test_calibration_writes_no_copy_of_the_model(source, tmp_path, monkeypatch):
    """Sessions are built from memory: the only file mqc saves is the output, inside the output folder."""
    saved: list[Path] = []
    real_save = onnx_ir.save

    def recording_save(model, path, *args, **kwargs):
        saved.append(Path(path))
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx_ir, "save", recording_save)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _compile(source, tmp_path / "out" / "q.onnx", "--recipe", "smoothquant", "--verify")
    assert len(saved) == 1 and saved[0].parent.parent == tmp_path / "out", saved
    assert list((tmp_path / "tmp").iterdir()) == []


def test_calib_folder_streams_and_honours_samples(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "out").mkdir()
    source = save_with_data(linear_model(input_dims=("batch", "seq", HIDDEN)), tmp_path / "m" / "model.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for index in range(40):
        np.savez(calib / f"{index:03d}.npz", x=np.random.default_rng(index).standard_normal((1, 5, HIDDEN)).astype(np.float32))
    opened: list[str] = []
    real_load = np.load

    def counting_load(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    _compile(source, tmp_path / "out" / "q.onnx", "--calib", calib, "--samples", "3")
    assert set(opened) == {"000.npz", "001.npz", "002.npz"}
    report = read_report(str(tmp_path / "out" / "q.onnx"))
    assert report.calibration["samples"] == 2 and report.calibration["held_out_for_quality_gate"] == 1


def test_same_inputs_give_byte_identical_outputs(source, tmp_path):
    outputs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        _compile(source, folder / "q.onnx", "--recipe", "smoothquant")
        outputs.append(tree_digest(folder))
    assert outputs[0] == outputs[1]


def test_error_stays_on_one_line_in_a_pipe(tmp_path):
    missing = tmp_path / ("very-long-folder-name-" * 10) / "model.onnx"
    result = subprocess.run([sys.executable, "-m", "mqc.cli", "compile", str(missing), "-o", str(tmp_path / "o.onnx")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "40"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: model file not found"), result.stderr


def test_linears_inside_control_flow_are_reported_as_float(tmp_path):
    out = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, HIDDEN])]
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["z"], name="inner_fc")], "then", [], out)
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["z"], name="pass")], "else", [], out)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),  # cond > 0: a run-time choice, not foldable
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="total"),
             helper.make_node("Greater", ["total", "zero"], ["cond"], name="cond"),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other, name="branch")]
    (tmp_path / "out").mkdir()
    source = tmp_path / "if.onnx"
    zero = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    onnx.save(linear_model([weight(), zero], nodes=nodes), str(source))
    text = _compile(source, tmp_path / "out" / "q.onnx")
    assert "1 MatMul/Gemm inside If/Loop bodies left in float" in text
    report = read_report(str(tmp_path / "out" / "q.onnx"))
    assert report.model_summary["left_float_in_subgraphs"] == ["inner_fc"]


def test_linears_sharing_one_weight_get_their_own_dequant_nodes(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="second")]
    (tmp_path / "out").mkdir()
    source = tmp_path / "shared.onnx"
    onnx.save(linear_model([weight()], nodes=nodes), str(source))
    _compile(source, tmp_path / "out" / "q.onnx")
    names = [node.name for node in onnx.load(str(tmp_path / "out" / "q.onnx")).graph.node]
    assert len(names) == len(set(names)) and sum(n.endswith("/weight_dequant") for n in names) == 2
