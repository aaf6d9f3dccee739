"""Open onnxruntime sessions for float and compiled models alike.

A compiled model in the ``mqc`` format uses operators of the project's own domain; the library that implements
them is registered here, so callers never have to know which format a file is in.

Sessions on a model being compiled are built from memory (:func:`session_for_model`): the graph goes to
onnxruntime as bytes, weights still unchanged since loading are read from the input's own (checked) external data
files, and weights a pass rewrote are handed over as in-memory initializers. Nothing is copied to ``$TMPDIR``.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from mqc.errors import InputModelError

#: The custom operator domain of the runtime-ops library.
MQC_DOMAIN = "ai.mqc"
#: onnxruntime optimizers that break valid QDQ graphs: with a static 3-D activation, MatMulAddFusion reshapes a
#: QDQ MatMul + bias into a Gemm and builds a QuantizeLinear whose int8 output type contradicts its uint8 zero
#: point ("output_dtype INT8 does not match y_zero_point type UINT8"), so the session cannot be created.
DISABLED_OPTIMIZERS = ["MatMulAddFusion"]
#: In-memory initializers from this size up are passed to onnxruntime by reference instead of inside the graph bytes.
BY_REFERENCE_BYTES = 64 * 1024
#: numpy dtypes onnxruntime accepts as OrtValues without conversion.
_ORT_NUMPY_DTYPES = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16,
                                           np.uint16, np.int32, np.int64, np.bool_)}
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
#: Environment variable: onnxruntime intra-op threads of every session mqc opens (default: onnxruntime's, one per
#: core). Set it where several processes share the cores (parallel test workers, a loaded build machine).
THREADS_ENV = "MQC_ORT_THREADS"


def _env_threads() -> int | None:
    raw = os.environ.get(THREADS_ENV)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InputModelError(f"{THREADS_ENV}={raw!r}: expected a positive whole number of threads")
    return int(raw)


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@functools.cache
def fused_int8_is_exact() -> bool:
    """Whether onnxruntime's fused int8 GEMMs sum exactly on this CPU. Its x86 kernels without VNNI add pairs of
    u8 x s8 products in int16 (``vpmaddubsw``), which saturates: on such a CPU a static W8A8 QDQ vision tower ran at
    16.4 dB SQNR fused against 33.3 dB with the QDQ nodes left unfused (BENCHMARKS.md, session 12). Unknown x86
    CPUs count as inexact; other architectures as exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def keep_qdq_exact(options) -> None:
    """Leave QuantizeLinear/DequantizeLinear unfused where the fused int8 GEMMs saturate (:func:`fused_int8_is_exact`):
    the model's own numerics, at float speed."""
    if not fused_int8_is_exact():
        options.add_session_config_entry("session.disable_quant_qdq", "1")


def _options(optimization_level: str, intra_op_threads: int | None, runtime_ops: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization_level]
    # onnxruntime fuses an int4 weight DequantizeLinear + MatMul into MatMulNBits whenever the activation is plain
    # float (the per-modality fake-quant form); its default accuracy level 4 then re-quantizes the activation to
    # int8 blocks the graph never asked for. Level 1 keeps the graph's own numerics.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    keep_qdq_exact(options)
    threads = intra_op_threads or _env_threads()
    if threads:
        options.intra_op_num_threads = threads
    if runtime_ops:
        from mqc.runtime_ops import register_library

        register_library(options)
    return options


def open_session(
    path: str | Path,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    optimization_level: str = "all",
):
    """An ``onnxruntime.InferenceSession`` for ``path``, registering the runtime-ops library when needed.

    The file's external data references are checked first (:func:`mqc.model_checks.check_external_data`), so a
    downloaded model cannot make the session read files outside its folder.
    """
    import onnxruntime as ort

    from mqc.model_checks import check_external_data

    path = Path(os.path.abspath(path))
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputModelError(f"not a readable ONNX model ({type(exc).__name__}): {path}") from exc
    check_external_data(header, path.parent)
    runtime_ops = any(op.domain == MQC_DOMAIN for op in header.opset_import)
    del header
    options = _options(optimization_level, intra_op_threads, runtime_ops)
    return ort.InferenceSession(
        str(path), options, providers=list(providers or default_providers()), disabled_optimizers=DISABLED_OPTIMIZERS
    )


def session_for_model(model: ir.Model, providers: Sequence[str], optimization_level: str = "all"):
    """A session on the in-memory ``model`` without writing it anywhere (module docstring)."""
    from mqc.ir import clear_unknown_types

    clear_unknown_types(model)
    folders = {os.fspath(t.base_dir) for t in _external_tensors(model)}
    if len(folders) > 1:
        raise InputModelError(f"the model's external data comes from several folders: {sorted(folders)}")
    names, values, proto = _serialize_by_reference(model)
    return session_from_proto(proto, names, values, providers, optimization_level, folders.pop() if folders else None)


def session_from_proto(proto: onnx.ModelProto, names: Sequence[str], values: Sequence[Any], providers: Sequence[str],
                       optimization_level: str = "all", external_folder: str | None = None, prepack: bool = True):
    """A session on ``proto`` whose initializers ``names`` are the OrtValues ``values`` (shared, not copied);
    external data references are read from ``external_folder``. ``prepack=False`` keeps onnxruntime from making
    packed copies of the weights (a one-off run then reads the mapped originals: half the memory of a big head)."""
    import onnxruntime as ort

    options = _options(optimization_level, None, any(op.domain == MQC_DOMAIN for op in proto.opset_import))
    # No CPU arena: a compile opens and closes many sessions, and the arena's regions outlived the closed ones (a
    # streamed 7B-shaped compile kept 8.3 GB per decoder layer, the run-time Hadamard's float32 H among them;
    # BENCHMARKS.md, session 12). Allocation strategy does not change what a session computes.
    options.enable_cpu_mem_arena = False
    if external_folder is not None:
        options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, external_folder)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if names:
        options.add_external_initializers(list(names), list(values))
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers),
                                       disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as exc:  # onnxruntime reports every unloadable graph as a generic failure
        raise InputModelError(f"onnxruntime cannot run the model: {_one_line(exc)}") from exc
    session.mqc_initializers = values  # the OrtValues share the arrays' memory: keep both alive with the session
    return session


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """External initializers of the graph and of every subgraph (attribute tensors are in memory, see load_model)."""
    graphs = [model.graph]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if not attr.is_ref() and attr.type == ir.AttributeType.GRAPH:
                graphs.append(attr.value)
            elif not attr.is_ref() and attr.type == ir.AttributeType.GRAPHS:
                graphs.extend(attr.value)
    return [v.const_value for graph in graphs for v in graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)]


def _serialize_by_reference(model: ir.Model) -> tuple[list[str], list[Any], onnx.ModelProto]:
    """The graph proto with large in-memory initializers left out: each is named by a placeholder external
    reference and handed to onnxruntime as an OrtValue sharing the array's memory, so no weight is copied."""
    import onnxruntime as ort

    names: list[str] = []
    values: list[Any] = []
    swapped: list[tuple[ir.Value, Any]] = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < BY_REFERENCE_BYTES:
            continue
        array = tensor.numpy()
        if array.dtype not in _ORT_NUMPY_DTYPES:
            continue
        array = np.ascontiguousarray(array)
        placeholder = ir.ExternalTensor(f"mqc-in-memory-{len(names)}", offset=0, length=array.nbytes,
                                        dtype=tensor.dtype, shape=tensor.shape, name=value.name)
        swapped.append((value, tensor))
        value.const_value = placeholder
        names.append(value.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    return names, values, proto


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__
