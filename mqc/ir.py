"""Loading, validating and saving models with onnx_ir, plus small graph helpers the passes share.

Models stay in ``onnx_ir`` form: external data is memory-mapped, so there is no 2 GB protobuf limit. Outputs are
written to a temporary sibling and renamed into place, so a failed compile never leaves a partial file, and the
input file is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from mqc.errors import InputModelError
from mqc.model_checks import (
    check_external_data,
    check_graph_structure,
    check_tensor_shapes,
    check_text_fields,
)

#: Oldest default-domain opset mqc accepts; older models are converted up from here.
MIN_OPSET = 13
#: Newest default-domain opset the installed onnx knows; a newer model cannot be checked or converted.
MAX_OPSET = onnx.defs.onnx_opset_version()
#: Opset of compiled models: int4 QuantizeLinear/DequantizeLinear need 21, RMSNormalization needs 23.
TARGET_OPSET = 23
#: onnxruntime 1.21 reads IR version 10; newer onnx writes newer IR versions by default.
OUTPUT_IR_VERSION = 10
#: Tensors above this size go to the external data file when saving.
EXTERNAL_DATA_THRESHOLD = 1024


def load_model(path: str | Path) -> ir.Model:
    """Load ``path`` as an onnx_ir model, turning every way it can be wrong into one clear error.

    The path is made absolute first, so external data is always resolved against the model's own folder and every
    reference is checked (:mod:`mqc.model_checks`) before any tensor is read.
    """
    path = Path(os.path.abspath(path))
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputModelError(f"model file not found: {path}") from None
    except OSError as exc:
        raise InputModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputModelError(f"expected an .onnx file, got a directory: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise InputModelError(f"model path is not a regular file: {path}")
    if info.st_size == 0:
        raise InputModelError(f"model file is empty: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for corrupt input
        raise InputModelError(f"not a readable ONNX model ({type(exc).__name__}): {path}") from exc
    if len(proto.graph.node) == 0 or not proto.graph.output:
        raise InputModelError(f"not a usable ONNX model (empty graph): {path}")
    check_text_fields(proto)
    check_external_data(proto, path.parent)
    check_tensor_shapes(proto)
    check_graph_structure(proto)
    opset = _proto_opset(proto)
    if opset < MIN_OPSET:
        raise InputModelError(f"opset {opset} is too old: mqc needs opset {MIN_OPSET} or newer ({path})")
    if opset > MAX_OPSET:
        raise InputModelError(f"opset {opset} is newer than this onnx release knows (up to {MAX_OPSET}) ({path})")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise InputModelError(f"not a usable ONNX model ({_first_line(exc)}): {path}") from exc
    del proto
    try:
        _bind_external_data(model, str(path.parent))
    except Exception as exc:
        raise InputModelError(f"model weights are truncated or missing next to {path}: {_first_line(exc)}") from exc
    return model


def _proto_opset(proto: onnx.ModelProto) -> int:
    versions = {op.domain: op.version for op in proto.opset_import}
    return versions.get("", versions.get("ai.onnx", 1))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _bind_external_data(model: ir.Model, base_dir: str) -> None:
    """Point every external tensor at the model's (checked) folder and read each once, so truncated data fails here.

    Tensors held in node attributes (``Constant``) and in function bodies are read into memory: they are small, and
    a saved output must not reference a file next to the input.
    """
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    node.attributes[attr.name] = ir.AttrTensor(attr.name, _in_memory(attr.value, base_dir))
                elif attr.type == ir.AttributeType.TENSORS and any(isinstance(t, ir.ExternalTensor) for t in attr.value):
                    node.attributes[attr.name] = ir.AttrTensors(attr.name, [_in_memory(t, base_dir) for t in attr.value])
            for attr in node.attributes.values():
                if not attr.is_ref() and attr.type == ir.AttributeType.GRAPH:
                    _bind_initializers(attr.value, base_dir)
                elif not attr.is_ref() and attr.type == ir.AttributeType.GRAPHS:
                    for subgraph in attr.value:
                        _bind_initializers(subgraph, base_dir)
    _bind_initializers(model.graph, base_dir)


def _bind_initializers(graph: ir.Graph, base_dir: str) -> None:
    """External initializers read from the checked folder; inline ones become numpy arrays once (reading a
    protobuf field copies it, so a proto-backed weight would be copied again for every calibration session)."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = base_dir
            tensor.numpy()  # touches the mapping: truncated external data fails here
        elif isinstance(tensor, ir.serde.TensorProtoTensor) and tensor.dtype != ir.DataType.STRING:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


def _in_memory(tensor: ir.ExternalTensor, base_dir: str) -> ir.Tensor:
    tensor.base_dir = base_dir
    return ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def save_model(model: ir.Model, path: str | Path, protected: Iterable[Path] = (),
               callback: Callable[[Any, Any], None] | None = None) -> Path:
    """Save so that ``path`` is always either the previous output or the complete new one (:mod:`mqc.outputs`).

    ``callback`` is called before each external tensor is written (the streamed compile unmaps the previous one)."""
    from mqc.outputs import AtomicModelWriter

    model.ir_version = OUTPUT_IR_VERSION
    clear_unknown_types(model)
    return AtomicModelWriter(Path(path), protected).write(
        lambda onnx_path, data_name: ir.save(model, onnx_path, external_data=data_name,
                                             size_threshold_bytes=EXTERNAL_DATA_THRESHOLD, callback=callback))


def clear_unknown_types(model: ir.Model) -> None:
    """Forget tensor types whose element type a pass left unknown (``Tensor(None)``): they cannot be serialized,
    and an absent type is what an unknown one means in ONNX."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.type is not None and value.dtype is None and value not in model.graph.outputs:
                value.type = None


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


def depends_on(value: ir.Value, source: ir.Value) -> bool:
    """Whether ``source`` is an ancestor of ``value`` (e.g. a run-time scale computed from the activation it scales)."""
    seen, stack = set(), [value]
    while stack:
        current = stack.pop()
        if current is source:
            return True
        producer = current.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return False


#: Where initializers stored by :func:`add_initializer` / :func:`replace_initializer` go, inside
#: :func:`initializers_stored_by` only: called with the value and the tensor it replaced (None for a new one).
_INITIALIZER_STORE: ContextVar[Callable[[ir.Value, ir.TensorProtocol | None], None] | None] = ContextVar(
    "mqc_initializer_store", default=None)


@contextlib.contextmanager
def initializers_stored_by(store: Callable[[ir.Value, ir.TensorProtocol | None], None]) -> Iterator[None]:
    """Within the ``with``, hand every initializer a pass writes to ``store`` as soon as it is written (the streamed
    compile moves rotated weights to its spill file one by one, instead of holding them all in memory)."""
    token = _INITIALIZER_STORE.set(store)
    try:
        yield
    finally:
        _INITIALIZER_STORE.reset(token)


def _stored(value: ir.Value, replaced: ir.TensorProtocol | None) -> None:
    store = _INITIALIZER_STORE.get()
    if store is not None:
        store(value, replaced)


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
    _stored(value, None)
    return value


def replace_initializer(value: ir.Value, array: np.ndarray) -> None:
    """Give an existing initializer new contents (shape and dtype may change)."""
    replaced = value.const_value
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    _stored(value, replaced)


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
