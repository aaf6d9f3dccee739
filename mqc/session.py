"""Open onnxruntime sessions for float and compiled models alike.

A compiled model in the ``mqc`` format uses operators of the project's own domain; the library that implements
them is registered here, so callers never have to know which format a file is in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

#: The custom operator domain of the runtime-ops library.
MQC_DOMAIN = "ai.mqc"
#: onnxruntime optimizers that break valid QDQ graphs: with a static 3-D activation, MatMulAddFusion reshapes a
#: QDQ MatMul + bias into a Gemm and builds a QuantizeLinear whose int8 output type contradicts its uint8 zero
#: point ("output_dtype INT8 does not match y_zero_point type UINT8"), so the session cannot be created.
DISABLED_OPTIMIZERS = ["MatMulAddFusion"]


def uses_runtime_ops(path: str | Path) -> bool:
    """True when the model imports the ``ai.mqc`` domain (reads only the header, not the weights)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(op.domain == MQC_DOMAIN for op in model.opset_import)


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_session(
    path: str | Path,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    optimization_level: str = "all",
):
    """An ``onnxruntime.InferenceSession`` for ``path``, registering the runtime-ops library when needed."""
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
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if uses_runtime_ops(path):
        from mqc.runtime_ops import register_library

        register_library(options)
    return ort.InferenceSession(
        str(path), options, providers=list(providers or default_providers()), disabled_optimizers=DISABLED_OPTIMIZERS
    )
