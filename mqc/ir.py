"""Loading, validating and saving models with onnx_ir, plus small graph helpers the passes share.

Models stay in ``onnx_ir`` form: external data is memory-mapped, so there is no 2 GB protobuf limit. Outputs are
written to a temporary sibling and renamed into place, so a failed compile never leaves a partial file, and the
input file is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mqc.errors import InputModelError, OutputPathError

#: Oldest default-domain opset mqc accepts; older models are converted up from here.
MIN_OPSET = 13
#: Opset of compiled models: int4 QuantizeLinear/DequantizeLinear need 21, RMSNormalization needs 23.
TARGET_OPSET = 23
#: onnxruntime 1.21 reads IR version 10; newer onnx writes newer IR versions by default.
OUTPUT_IR_VERSION = 10
#: Tensors above this size go to the external data file when saving.
EXTERNAL_DATA_THRESHOLD = 1024


def load_model(path: str | Path) -> ir.Model:
    """Load ``path`` as an onnx_ir model, turning every way it can be wrong into one clear error."""
    path = Path(path)
    if not path.exists():
        raise InputModelError(f"model file not found: {path}")
    if path.is_dir():
        raise InputModelError(f"expected an .onnx file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise InputModelError(f"model file is empty: {path}")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types for corrupt input
        raise InputModelError(f"not a readable ONNX model ({type(exc).__name__}): {path}") from exc
    if len(model.graph) == 0 or not model.graph.outputs:
        raise InputModelError(f"not a usable ONNX model (empty graph): {path}")
    try:
        for tensor in model.graph.initializers.values():
            if tensor.const_value is not None and isinstance(tensor.const_value, ir.ExternalTensor):
                tensor.const_value.numpy()  # touches the mapping: truncated external data fails here
    except Exception as exc:
        raise InputModelError(f"model weights are truncated or missing next to {path}: {exc}") from exc
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise InputModelError(f"opset {opset} is too old: mqc needs opset {MIN_OPSET} or newer ({path})")
    return model


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def save_model(model: ir.Model, path: str | Path) -> Path:
    """Save atomically: write into a temporary folder beside ``path``, then rename model and data into place."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise OutputPathError(f"output path is a directory: {path}")
    if not parent.is_dir():
        raise OutputPathError(f"output folder does not exist (or is not a folder): {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output folder is not writable: {parent}")
    data_name = path.name + ".data"
    model.ir_version = OUTPUT_IR_VERSION
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".{path.name}.") as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=EXTERNAL_DATA_THRESHOLD)
        tmp_data = Path(tmp) / data_name
        if tmp_data.exists():
            os.replace(tmp_data, parent / data_name)
        elif (parent / data_name).exists():
            (parent / data_name).unlink()
        os.replace(tmp_model, path)
    return path


@contextlib.contextmanager
def temporary_model_file(model: ir.Model) -> Iterator[Path]:
    """The model saved into a private temporary folder, for onnxruntime to open; removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="mqc-")
    try:
        path = Path(tmp) / "model.onnx"
        model.ir_version = OUTPUT_IR_VERSION
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=EXTERNAL_DATA_THRESHOLD)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    model.ir_version = OUTPUT_IR_VERSION
    return ir.serde.serialize_model(model)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant-produced value, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a name unique in ``graph``."""
    unique = name
    suffix = 0
    while unique in graph.initializers:
        suffix += 1
        unique = f"{name}_{suffix}"
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=unique)
    graph.register_initializer(value)
    return value


def replace_initializer(value: ir.Value, array: np.ndarray) -> None:
    """Give an existing initializer new contents (shape and dtype may change)."""
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    if model.opset_imports.get(domain, 0) < version:
        model.opset_imports[domain] = version


def remove_unused_initializers(graph: ir.Graph) -> int:
    """Drop initializers no node of the graph (or its subgraphs) reads.

    Reads are collected from the nodes themselves, not from ``value.uses()``: a node a pass detached from the graph
    can still be registered as a user and would keep a replaced initializer alive.
    """
    read = {id(value) for node in ir.traversal.RecursiveGraphIterator(graph) for value in node.inputs if value is not None}
    unused = [name for name, value in graph.initializers.items() if id(value) not in read and value not in graph.outputs]
    for name in unused:
        graph.initializers.pop(name)
    return len(unused)
