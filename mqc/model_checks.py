"""Checks on an untrusted ``ModelProto`` before any tensor is read: where its external data may live, and whether
its shapes and graph structure make sense.

A model file names its external data files itself (``location``), so a downloaded model could point at
``../../.ssh/id_rsa``, ``/etc/passwd``, a symlink or a hard link to such a file, and mqc would copy those bytes
into the compiled output. Every external reference, in initializers, in ``Constant``-style attributes, in
subgraphs and in function bodies, must name a plain file inside the model's own folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from mqc.errors import InputModelError

#: Largest dimension mqc accepts in a tensor or a graph input shape (2^31; larger values only exhaust memory).
MAX_DIM = 2**31
#: Largest element count of one tensor (2^36 elements: 256 GiB of float32).
MAX_ELEMENTS = 2**36


def tensor_protos(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor the model stores, with where it sits: initializers, attributes, subgraphs, function bodies."""
    yield from _graph_tensors(model.graph, "graph")
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node, f"function {function.name}")


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    for tensor in graph.initializer:
        yield where, tensor
    for sparse in graph.sparse_initializer:
        yield where, sparse.values
        yield where, sparse.indices
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: onnx.NodeProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    here = f"{where}, node {node.name or node.op_type}"
    for attr in node.attribute:
        if attr.HasField("t"):
            yield here, attr.t
        if attr.HasField("sparse_tensor"):
            yield here, attr.sparse_tensor.values
            yield here, attr.sparse_tensor.indices
        for tensor in attr.tensors:
            yield here, tensor
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g, f"{here} subgraph")
        for graph in attr.graphs:
            yield from _graph_tensors(graph, f"{here} subgraph")


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse any external reference that is not a plain, singly linked file inside ``model_dir``."""
    base = Path(os.path.abspath(model_dir))
    base_real = Path(os.path.realpath(base))
    for where, tensor in tensor_protos(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = tensor.name or "(unnamed)"
        location = _external_info(tensor).get("location", "")
        label = f"tensor {name!r} ({where})"
        if not location:
            raise InputModelError(f"{label} is stored externally but names no data file (empty location)")
        if "\x00" in location or os.path.isabs(location) or PureWindowsPath(location).drive or location.startswith("\\"):
            raise InputModelError(f"{label}: external data location {location!r} is absolute; only files inside "
                                  "the model's folder are read")
        if ".." in PurePosixPath(location.replace("\\", "/")).parts:
            raise InputModelError(f"{label}: external data location {location!r} leaves the model's folder")
        path = base / location
        try:
            info = path.lstat()
        except OSError:
            raise InputModelError(f"{label}: external data file {location!r} not found next to the model") from None
        real = Path(os.path.realpath(path))
        if real != base_real and base_real not in real.parents:
            raise InputModelError(f"{label}: external data file {location!r} is a link to a file outside the "
                                  "model's folder")
        info = real.stat()
        if stat.S_ISDIR(info.st_mode):
            raise InputModelError(f"{label}: external data path {location!r} is a directory, not a data file")
        if not stat.S_ISREG(info.st_mode):
            raise InputModelError(f"{label}: external data path {location!r} is not a regular file")
        if info.st_nlink > 1:
            raise InputModelError(f"{label}: external data file {location!r} has {info.st_nlink} hard links; mqc "
                                  "refuses hard-linked data files because one can expose a file from outside the "
                                  "model's folder (copy the file to break the link)")
        _check_extent(tensor, label, location, info.st_size)


def _check_extent(tensor: onnx.TensorProto, label: str, location: str, file_size: int) -> None:
    info = _external_info(tensor)
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else file_size - offset
    except ValueError:
        raise InputModelError(f"{label}: external data offset/length are not integers") from None
    if offset < 0 or length < 0 or offset + length > file_size:
        raise InputModelError(f"{label}: external data {location!r} is truncated (needs bytes {offset}..{offset + length}, "
                              f"the file has {file_size})")
    expected = _byte_size(tensor, label)
    if expected is not None and length != expected:
        raise InputModelError(f"{label}: external data length {length} disagrees with its shape "
                              f"{list(tensor.dims)} ({expected} bytes)")


def _byte_size(tensor: onnx.TensorProto, label: str) -> int | None:
    """Bytes the tensor's dims and type need, or None for types without a fixed width (strings)."""
    elements = 1
    for dim in tensor.dims:
        if dim < 0 or dim > MAX_DIM:
            raise InputModelError(f"{label}: dimension {dim} in shape {list(tensor.dims)} is out of range")
        elements *= dim
        if elements > MAX_ELEMENTS:
            raise InputModelError(f"{label}: shape {list(tensor.dims)} has more elements than mqc accepts")
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:
        raise InputModelError(f"{label}: unknown tensor data type {tensor.data_type}") from None
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is None and getattr(onnx.TensorProto, "FLOAT4E2M1", -1) == tensor.data_type:
        bits = 4
    if bits is not None:
        return (elements * bits + 7) // 8
    return elements * dtype.itemsize


#: Types whose typed data field holds exactly one value per element (packed and complex types are left out).
_ONE_VALUE_PER_ELEMENT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                          onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                          onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
                          onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def check_tensor_shapes(model: onnx.ModelProto) -> None:
    """Every stored tensor's dims are in range and agree with its inline data; graph input dims are sane."""
    for where, tensor in tensor_protos(model):
        label = f"tensor {tensor.name or '(unnamed)'!r} ({where})"
        expected = _byte_size(tensor, label)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or expected is None:
            continue
        if tensor.HasField("raw_data"):
            if len(tensor.raw_data) != expected:
                raise InputModelError(f"{label}: shape {list(tensor.dims)} needs {expected} bytes, the file stores "
                                      f"{len(tensor.raw_data)}")
        elif tensor.data_type in _ONE_VALUE_PER_ELEMENT:
            stored = len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type)))
            elements = expected // onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            if stored != elements:
                raise InputModelError(f"{label}: shape {list(tensor.dims)} has {elements} elements, the file "
                                      f"stores {stored} values")
    for value in [*model.graph.input, *model.graph.output]:
        shape = value.type.tensor_type.shape if value.type.HasField("tensor_type") else None
        if shape is None:
            continue
        for dim in shape.dim:
            if dim.HasField("dim_value") and not 0 <= dim.dim_value <= MAX_DIM:
                raise InputModelError(f"graph input/output {value.name!r} has dimension {dim.dim_value}, out of range")


def check_text_fields(message: Message, where: str = "model") -> None:
    """Every string field (names, op types, metadata) is valid UTF-8; protobuf hands invalid ones over as bytes."""
    if isinstance(message, onnx.TensorProto):  # listing its fields would copy the weights out of raw_data
        texts = [message.name, message.doc_string, *(t for e in message.external_data for t in (e.key, e.value))]
        if any(isinstance(text, bytes) for text in texts):
            raise InputModelError(f"not a readable ONNX model: a tensor name or data location in {where} is not "
                                  "valid UTF-8")
        return
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            for text in value if field.is_repeated else [value]:
                if isinstance(text, bytes):
                    raise InputModelError(f"not a readable ONNX model: {where}.{field.name} is not valid UTF-8 "
                                          f"({text[:40]!r})")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                check_text_fields(item, f"{where}.{field.name}")


def check_graph_structure(model: onnx.ModelProto) -> None:
    """Names are unique, every node input is defined before use, and the main graph has no cycle."""
    graph = model.graph
    initializers = [t.name for t in graph.initializer]
    duplicates = sorted({n for n in initializers if initializers.count(n) > 1}) if len(set(initializers)) != len(initializers) else []
    if duplicates:
        raise InputModelError(f"initializer names are not unique: {duplicates[:5]} (which one a runtime uses is "
                              "undefined, so mqc cannot know which weights it quantizes)")
    names = [n.name for n in graph.node if n.name]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        repeated = sorted({n for n in names if n in seen or seen.add(n)})
        raise InputModelError(f"node names are not unique: {repeated[:5]}")
    defined = {v.name for v in graph.input} | set(initializers) | {""}
    defined |= {t.values.name for t in graph.sparse_initializer}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for node in graph.node:
        for name in node.input:
            if name not in defined and name not in producer:
                raise InputModelError(f"node {node.name or node.op_type!r} reads {name!r}, which no node, input or "
                                      "initializer defines")
    waiting = [sum(1 for name in set(node.input) if name not in defined) for node in graph.node]
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            if name not in defined:
                readers.setdefault(name, []).append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:  # Kahn's algorithm: nodes left waiting at the end sit on a cycle
        index = ready.pop()
        done += 1
        for name in graph.node[index].output:
            for reader in readers.pop(name, []):
                waiting[reader] -= 1
                if waiting[reader] == 0:
                    ready.append(reader)
        defined.update(graph.node[index].output)
    if done < len(graph.node):
        node = next(graph.node[i] for i, count in enumerate(waiting) if count > 0)
        raise InputModelError(f"the graph has a cycle (through node {node.name or node.op_type!r})")
    missing_outputs = [o.name for o in graph.output if o.name not in defined]
    if missing_outputs:
        raise InputModelError(f"graph outputs {missing_outputs[:5]} are never produced")
