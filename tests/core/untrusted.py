"""Builders of tiny crafted models and the checks every untrusted-input test makes (no test functions here)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mqc.cli import main

HIDDEN = 64
WEIGHT_BYTES = HIDDEN * HIDDEN * 4
#: Bytes of a file outside every model folder; they must never appear in anything mqc writes.
SECRET = (b"MQC-SENTINEL-SECRET!" * (WEIGHT_BYTES // 20 + 1))[:WEIGHT_BYTES]


def weight(name: str = "W", seed: int = 0) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal((HIDDEN, HIDDEN)).astype(np.float32), name)


def external(name: str, location: str, dims: Sequence[int] = (HIDDEN, HIDDEN), length: int | None = None,
             data_type: int = TensorProto.FLOAT) -> TensorProto:
    """A tensor whose bytes the model says live in ``location``."""
    tensor = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(WEIGHT_BYTES if length is None else length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def linear_model(initializers: Sequence[TensorProto] | None = None, nodes: Sequence[onnx.NodeProto] | None = None,
                 opset: int = 18, input_dims: Sequence[int | str] = (1, 4, HIDDEN), elem: int = TensorProto.FLOAT,
                 functions: Sequence[onnx.FunctionProto] = (), extra_opsets: Sequence[tuple[str, int]] = ()) -> onnx.ModelProto:
    """x -> MatMul(W) -> Relu -> y, or the given nodes."""
    nodes = list(nodes) if nodes is not None else [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
                                                   helper.make_node("Relu", ["h"], ["y"], name="act")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, list(input_dims))],
                              [helper.make_tensor_value_info("y", elem, [*list(input_dims[:-1]), HIDDEN])],
                              list(initializers) if initializers is not None else [weight()])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9, functions=list(functions))


def save_with_data(model: onnx.ModelProto, path: Path) -> Path:
    """``model`` with its weights in ``<name>.data`` beside it (the common exporter layout)."""
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return path


def run_cli(args: Sequence[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) with its content hash."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_symlink():
                digests[str(path.relative_to(folder))] = "link:" + os.readlink(path)
            elif path.is_file():
                digests[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digests[str(path.relative_to(folder))] = "special"
    return digests


def assert_secret_absent(folder: Path) -> None:
    marker = SECRET[:40]
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                assert marker not in path.read_bytes(), f"{path} holds bytes of the secret file"


def assert_loads(path: Path) -> None:
    """The model loads and runs in onnxruntime (its external data included)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for i in session.get_inputs():
        dims = [d if isinstance(d, int) else 2 for d in i.shape]
        feed[i.name] = np.zeros(dims, np.float32)
    session.run(None, feed)


def assert_one_line_error(code: int, text: str, message: str, expected_code: int = 2) -> None:
    assert code == expected_code, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert message in lines[0], text
