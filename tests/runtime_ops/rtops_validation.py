"""One-node models and C descriptors for the validator tests: the same inputs go through onnxruntime sessions and
through the libraries' ``mqc_validate_node`` entry point (``runtime_ops/src/validate.h``)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from mqc.runtime_ops import DOMAIN, library_path, register_library
from onnx import TensorProto, helper, numpy_helper
from rtops_models import make_model

#: Input names of each op, in the schema's order.
SCHEMAS = {
    "QuantLinear": ["X", "W", "w_scale", "act_scale", "bias", "modality_ids", "split", "lowrank_a", "lowrank_b",
                    "side_row"],
    "Hadamard": ["X", "H_m"],
    "RMSNormQuant": ["X", "gamma", "act_scale", "modality_ids", "split"],
}
#: Inputs given as initializers (the CUDA kernel prepacks a constant W); every other input is a graph input.
CONSTANTS = {"W"}


@dataclass(frozen=True)
class Node:
    """One ai.mqc node: its op, attributes and input values by name (absent optional inputs are left out)."""

    op: str
    inputs: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)

    def ordered(self) -> list[np.ndarray | None]:
        names = SCHEMAS[self.op]
        last = max(names.index(n) for n in self.inputs)
        return [self.inputs.get(n) for n in names[: last + 1]]

    def model(self) -> onnx.ModelProto:
        names = SCHEMAS[self.op]
        node_inputs, graph_inputs, inits = [], [], []
        for name, value in zip(names, self.ordered(), strict=False):
            if value is None:
                node_inputs.append("")
                continue
            node_inputs.append(name)
            if name in CONSTANTS:
                inits.append(numpy_helper.from_array(value, name))
            else:
                graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None))
        x_type = helper.np_dtype_to_tensor_dtype(self.inputs["X"].dtype)
        out_type = {"QuantLinear": TensorProto.FLOAT16 if x_type == TensorProto.FLOAT16 else TensorProto.FLOAT,
                    "Hadamard": x_type, "RMSNormQuant": TensorProto.INT8}[self.op]
        node = helper.make_node(self.op, node_inputs, ["Y"], domain=DOMAIN, **self.attrs)
        return make_model([node], graph_inputs, [helper.make_tensor_value_info("Y", out_type, None)], inits)

    def feeds(self) -> dict[str, np.ndarray]:
        return {n: v for n, v in self.inputs.items() if n not in CONSTANTS}

    def run(self, kind: str = "cpu") -> np.ndarray:
        """Create a CPU-EP session with the ``kind`` library registered and run the node once."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        register_library(options, kind=kind)
        session = ort.InferenceSession(self.model().SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, self.feeds())[0]


class TensorDescC(ctypes.Structure):
    """``mqc_tensor_desc`` of validate.cc."""

    _fields_ = [("present", ctypes.c_int32), ("type", ctypes.c_int32), ("rank", ctypes.c_int32),
                ("dims", ctypes.c_int64 * 8), ("data", ctypes.c_void_p)]


def validator(kind: str):
    """``mqc_validate_node`` of the built ``kind`` library, as a function of a Node: "" when valid, else the
    message."""
    lib = ctypes.CDLL(str(library_path(kind)))
    fn = lib.mqc_validate_node
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(TensorDescC), ctypes.c_int32, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_float, ctypes.c_char_p, ctypes.c_size_t]

    def validate(node: Node) -> str:
        values = [None if v is None else np.require(v, requirements="C") for v in node.ordered()]  # keeps rank 0
        descs = (TensorDescC * len(values))()
        for d, v in zip(descs, values, strict=True):
            if v is None:
                continue
            d.present, d.type, d.rank = 1, helper.np_dtype_to_tensor_dtype(v.dtype), v.ndim
            for i, n in enumerate(v.shape):
                d.dims[i] = n
            d.data = v.ctypes.data
        message = ctypes.create_string_buffer(1024)
        rc = fn(node.op.encode(), descs, len(values), node.attrs.get("bits", 8), node.attrs.get("dynamic", 0),
                node.attrs.get("group_size", 0), node.attrs.get("epsilon", 1e-6), message, len(message))
        assert rc in (0, 1), f"mqc_validate_node returned {rc}"
        return message.value.decode() if rc else ""

    return validate
