"""Small ONNX models and numpy references for the runtime-ops tests (built here, not by the compiler)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from mqc.runtime_ops import DOMAIN, register_library
from onnx import TensorProto, helper, numpy_helper

from mqc.session import keep_qdq_exact

IR_VERSION = 10  # onnxruntime <= 1.31 reads IR <= 13; onnx 1.23 writes 14 by default


def make_model(nodes, inputs, outputs, initializers, opset=21, mqc=True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(DOMAIN, 1)] if mqc else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)


def session(model: onnx.ModelProto, threads: int = 2, custom: bool = True, optimize: bool = True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    keep_qdq_exact(options)  # the QDQ reference must not saturate (a CPU without VNNI)
    if custom:
        register_library(options, kind="cpu")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def file_outputs(path, feeds: dict, custom: bool) -> dict[str, np.ndarray]:
    """Every output of the model at ``path`` on ``feeds`` (the graph's inputs only): with the runtime-ops library, or
    unoptimized without it (the QDQ reference, unfused)."""
    options = ort.SessionOptions()
    if custom:
        register_library(options)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    values = session.run(None, {k: v for k, v in feeds.items() if k in names})
    return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}


def quantize(x: np.ndarray, s) -> np.ndarray:
    """ONNX QuantizeLinear, zero point 0: round half to even, clip to int8 (division, like onnxruntime)."""
    return np.clip(np.rint(x.astype(np.float32) / np.float32(s)), -128, 127).astype(np.int8)


def pack_int4(w: np.ndarray) -> np.ndarray:
    low = w[:, 0::2].astype(np.uint8) & 0x0F
    high = w[:, 1::2].astype(np.uint8) & 0x0F
    return (low | (high << 4)).astype(np.uint8)


def quant_linear_model(K, N, bits=8, x_type=TensorProto.FLOAT, const_weight=True, optional=(), weight=None,
                       **attributes):
    """A one-node ai.mqc::QuantLinear model; ``optional`` names the optional inputs given as graph inputs,
    ``attributes`` the node's other attributes (dynamic, group_size)."""
    names = ["X", "W", "w_scale", "act_scale", "bias", "modality_ids", "split", "lowrank_a", "lowrank_b", "side_row"]
    used = names[:4] + [n if n in optional else "" for n in names[4:]]
    while used[-1] == "":
        used.pop()
    node = helper.make_node("QuantLinear", used, ["Y"], domain=DOMAIN, bits=bits, **attributes)
    inputs = [helper.make_tensor_value_info("X", x_type, None)]
    inits = []
    w_type = TensorProto.INT8 if bits == 8 else TensorProto.UINT8
    w_shape = [N, K] if bits == 8 else [N, K // 2]
    if const_weight:
        inits.append(numpy_helper.from_array(weight, "W"))
    else:
        inputs.append(helper.make_tensor_value_info("W", w_type, w_shape))
    inputs += [helper.make_tensor_value_info("w_scale", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("act_scale", TensorProto.FLOAT, None)]
    types = {"bias": TensorProto.FLOAT, "modality_ids": TensorProto.INT64, "split": TensorProto.INT64,
             "lowrank_a": TensorProto.FLOAT, "lowrank_b": TensorProto.FLOAT, "side_row": TensorProto.FLOAT}
    for name in optional:
        inputs.append(helper.make_tensor_value_info(name, types[name], None))
    y_type = TensorProto.FLOAT16 if x_type == TensorProto.FLOAT16 else TensorProto.FLOAT
    return make_model([node], inputs, [helper.make_tensor_value_info("Y", y_type, None)], inits)


def qdq_linear_model(weights, biases, act_scale, x_dtype=np.float32, bits=8, shared=True):
    """The foundation's QDQ form: X -> Q -> DQ -> MatMul(., DQ(W_q)) [-> Add bias], one output per linear.

    ``weights`` are [K, N] integer arrays (MatMul layout) with their per-output-channel scales.
    """
    onnx_x = TensorProto.FLOAT16 if x_dtype == np.float16 else TensorProto.FLOAT
    scale = np.array(act_scale, dtype=x_dtype)
    inits = [numpy_helper.from_array(scale, "x_scale"), numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zero"], ["x_q"], name="act_quant"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="act_dequant")]
    outputs = []
    for i, ((wq, ws), b) in enumerate(zip(weights, biases, strict=True)):
        if bits == 8:
            wq_t = numpy_helper.from_array(wq.astype(np.int8), f"w{i}_q")
            zp = numpy_helper.from_array(np.zeros(wq.shape[1], np.int8), f"w{i}_zero")
        else:
            wq_t = numpy_helper.from_array(wq.astype(ml_dtypes.int4), f"w{i}_q")
            zp = numpy_helper.from_array(np.zeros(wq.shape[1], ml_dtypes.int4), f"w{i}_zero")
        inits += [wq_t, numpy_helper.from_array(ws.astype(x_dtype), f"w{i}_scale"), zp]
        x_in = "x_dq"
        if not shared and i > 0:
            nodes += [helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zero"], [f"x_q{i}"]),
                      helper.make_node("DequantizeLinear", [f"x_q{i}", "x_scale", "x_zero"], [f"x_dq{i}"])]
            x_in = f"x_dq{i}"
        nodes.append(helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_scale", f"w{i}_zero"], [f"w{i}_dq"], axis=1,
                                      name=f"w{i}/dequant"))
        mm_out = f"y{i}" if b is None else f"mm{i}"
        nodes.append(helper.make_node("MatMul", [x_in, f"w{i}_dq"], [mm_out], name=f"linear{i}"))
        if b is not None:
            inits.append(numpy_helper.from_array(b.astype(x_dtype), f"b{i}"))
            nodes.append(helper.make_node("Add", [mm_out, f"b{i}"], [f"y{i}"], name=f"linear{i}/bias"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx_x, None))
    return make_model(nodes, [helper.make_tensor_value_info("X", onnx_x, None)], outputs, inits, mqc=False)


def random_linear(rng, K, N, bits=8):
    """Integer weight [K, N] and per-channel scales with a realistic spread."""
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    wq = rng.integers(lo, hi, size=(K, N)).astype(np.int8)
    ws = (rng.random(N).astype(np.float32) * 0.02 + 0.002).astype(np.float32)
    return wq, ws


def int_reference(xq: np.ndarray, w_nk: np.ndarray) -> np.ndarray:
    """Exact int32 accumulation of int8 x int8 (numpy in int64, checked to fit int32)."""
    acc = xq.astype(np.int64) @ w_nk.astype(np.int64).T
    assert np.abs(acc).max() < 2**31
    return acc
