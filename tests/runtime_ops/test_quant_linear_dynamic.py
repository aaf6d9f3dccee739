"""ai.mqc::QuantLinear with ``dynamic=1`` against the graph's per-token quantizer (passes/cmc.py), and the
``masquant`` recipe (dynamic W4A8 with CMC) lowered end to end.

The op's int8 codes must equal the graph's ``Mul(Clip(Round(Div(x, s))), s)`` with
``s = Max(Div(ReduceMax(Abs(x)), 127), 1e-12)`` in fp32: with an identity weight and unit weight scales the
output is ``fp32(q * s)`` itself, compared bit for bit. With random weights the outputs agree to ``RTOL`` of their
magnitude (exact int32 sums, fp32 epilogue); one wrong code would move them by ~1e-3.

Run as a script (``MQC_CPU_ISA`` set) by ``test_every_cpu_kernel_variant``: the exactness checks on one kernel
variant, since the variant is fixed per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from mqc.passes.lower_runtime_ops import lower_to_runtime_ops
from onnx import TensorProto, helper
from rtops_models import (
    int_reference,
    make_model,
    pack_int4,
    qdq_linear_model,
    quant_linear_model,
    random_linear,
    session,
)

from mqc.graph.qdq import insert_activation_dynamic
from mqc.quantizer import MIN_SCALE

RTOL = 1e-5
X_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def graph_quantizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, fp32 scale [..., 1]) of passes/cmc.py's per-token quantizer, evaluated in fp32 as the graph."""
    xf = x.astype(np.float32)
    scale = np.maximum(np.abs(xf).max(axis=-1, keepdims=True) / np.float32(127), np.float32(MIN_SCALE))
    return np.clip(np.rint(xf / scale), -128, 127).astype(np.int8), scale


def dynamic_model(K: int, N: int, weight: np.ndarray, bits: int = 8, x_type: int = TensorProto.FLOAT,
                  optional: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A one-node QuantLinear model (rtops_models) with ``dynamic=1``."""
    model = quant_linear_model(K, N, bits=bits, x_type=x_type, optional=optional, weight=weight)
    model.graph.node[0].attribute.append(helper.make_attribute("dynamic", 1))
    return model


def activations(rng: np.random.Generator, M: int, K: int, dtype) -> np.ndarray:
    """Rows of magnitudes 1e-3 to 1e2 (non-zero), row 0 all zeros, row 1 (when M > 2) on exact .5 ties."""
    x = rng.standard_normal((M, K)) * 10.0 ** rng.uniform(-3, 2, size=(M, 1))
    x[0] = 0.0
    if M > 2:  # absmax 127 gives s = 1 exactly: x / s lands on .5 ties, rounded half to even like Round
        x[1] = np.resize([127.0, 0.5, 1.5, 2.5, -0.5, -3.5, 126.5, -126.5], K)
    return x.astype(dtype)


def _weights(rng: np.random.Generator, N: int, K: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    w = rng.integers(lo, hi, size=(N, K)).astype(np.int8)
    return w, (w if bits == 8 else pack_int4(w))


def check_codes(dtype, bits: int, M: int) -> None:
    """Identity W, unit w_scale: Y = fp32(q * s) per element, bit-identical to the graph's fake-quant."""
    K = 200
    rng = np.random.default_rng(M + bits)
    eye = np.eye(K, dtype=np.int8)
    model = dynamic_model(K, K, eye if bits == 8 else pack_int4(eye), bits=bits, x_type=X_TYPES[dtype])
    x = activations(rng, M, K, dtype)
    y = session(model).run(None, {"X": x, "w_scale": np.ones(K, np.float32), "act_scale": np.zeros(0, np.float32)})[0]
    q, scale = graph_quantizer(x)
    np.testing.assert_array_equal(y, (q.astype(np.float32) * scale).astype(dtype))


def check_random_weights(dtype, bits: int, with_bias: bool, M: int) -> float:
    """Random W: Y against a float64 evaluation of the graph's codes, within RTOL of the output magnitude (plus
    one fp16 rounding for fp16 Y); returns the max error / output magnitude."""
    K, N = 200, 70
    rng = np.random.default_rng(3 * M + bits + with_bias)
    w, packed = _weights(rng, N, K, bits)
    w_scale = (rng.random(N) * 0.01 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    model = dynamic_model(K, N, packed, bits=bits, x_type=X_TYPES[dtype], optional=("bias",) if with_bias else ())
    x = activations(rng, M, K, dtype).reshape(1, M, K)
    feeds = {"X": x, "w_scale": w_scale, "act_scale": np.zeros(0, np.float32)}
    if with_bias:
        feeds["bias"] = bias
    y = session(model).run(None, feeds)[0]
    assert y.dtype == dtype and y.shape == (1, M, N)
    q, scale = graph_quantizer(x.reshape(M, K))
    ref = int_reference(q, w) * (scale.astype(np.float64) * w_scale) + (bias if with_bias else 0.0)
    err = np.abs(y.reshape(M, N).astype(np.float64) - ref)
    atol = RTOL * np.abs(ref).max()
    if dtype == np.float16:  # plus one fp16 rounding of each output
        atol = atol + np.abs(ref) * 2.0**-11
    assert (err <= atol).all(), err.max()  # row 0 is all zeros: scale 1e-12, codes 0, Y = bias
    return float(err.max() / np.abs(ref).max())


@pytest.mark.parametrize("M", [1, 5, 37, 300])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_codes_equal_the_graph_quantizer(dtype, bits, M):
    check_codes(dtype, bits, M)


def test_numpy_reference_is_the_graph():
    """graph_quantizer reproduces passes/cmc.py's ONNX form as onnxruntime runs it (fp32), ties included."""
    K = 96
    x = activations(np.random.default_rng(0), 9, K, np.float32)
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("qmin", TensorProto.FLOAT, [], [-128.0]),
             helper.make_tensor("qmax", TensorProto.FLOAT, [], [127.0]),
             helper.make_tensor("floor", TensorProto.FLOAT, [], [MIN_SCALE])]
    nodes = [helper.make_node("Abs", ["X"], ["a"]), helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
             helper.make_node("Div", ["m", "qmax"], ["r"]), helper.make_node("Max", ["r", "floor"], ["s"]),
             helper.make_node("Div", ["X", "s"], ["d"]), helper.make_node("Round", ["d"], ["n"]),
             helper.make_node("Clip", ["n", "qmin", "qmax"], ["q"]), helper.make_node("Mul", ["q", "s"], ["Y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits, mqc=False)
    y = session(model, custom=False, optimize=False).run(None, {"X": x})[0]
    q, scale = graph_quantizer(x)
    np.testing.assert_array_equal(y, q.astype(np.float32) * scale)


@pytest.mark.parametrize("M", [3, 37])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_random_weights(dtype, bits, with_bias, M):
    check_random_weights(dtype, bits, with_bias, M)


def test_side_row_and_lowrank_branch():
    """The scale is the absmax of the quantized channels only (channel 0, an outlier here, goes to side_row);
    modality_ids selects the low-rank tokens and nothing else."""
    rng = np.random.default_rng(5)
    S, K, N, r = 10, 64, 24, 4
    w, packed = _weights(rng, N, K, 8)
    w_scale = np.full(N, 0.01, np.float32)
    x = rng.standard_normal((1, S, K + 1)).astype(np.float32)
    x[..., 0] *= 1000.0
    ids = np.array([[1, 1, 1, 0, 0, 0, 0, 1, 0, 0]], np.int64)
    la = (rng.standard_normal((K, r)) * 0.1).astype(np.float32)
    lb = (rng.standard_normal((r, N)) * 0.1).astype(np.float32)
    side = rng.standard_normal(N).astype(np.float32)
    model = dynamic_model(K, N, packed, optional=("modality_ids", "lowrank_a", "lowrank_b", "side_row"))
    feeds = {"X": x, "w_scale": w_scale, "act_scale": np.zeros(0, np.float32), "modality_ids": ids,
             "lowrank_a": la, "lowrank_b": lb, "side_row": side}
    y = session(model).run(None, feeds)[0].reshape(S, N)
    xs = x.reshape(S, K + 1)
    q, scale = graph_quantizer(xs[:, 1:])
    ref = int_reference(q, w) * (scale.astype(np.float64) * w_scale)
    ref += (ids.reshape(-1, 1) == 1) * ((xs[:, 1:].astype(np.float64) @ la) @ lb)
    ref += xs[:, :1].astype(np.float64) * side
    np.testing.assert_allclose(y, ref, rtol=0, atol=RTOL * np.abs(ref).max())


def test_act_scale_is_not_read():
    """A one-entry placeholder is accepted and ignored (a negative value would fail the static check);
    two entries are refused."""
    rng = np.random.default_rng(2)
    K, N = 64, 16
    _, packed = _weights(rng, N, K, 8)
    model = dynamic_model(K, N, packed)
    x = activations(rng, 4, K, np.float32)
    feeds = {"X": x, "w_scale": np.ones(N, np.float32)}
    empty = session(model).run(None, {**feeds, "act_scale": np.zeros(0, np.float32)})[0]
    placeholder = session(model).run(None, {**feeds, "act_scale": np.array([-1.0], np.float32)})[0]
    np.testing.assert_array_equal(empty, placeholder)
    with pytest.raises(Exception, match="with dynamic=1 act_scale is not read"):
        session(model).run(None, {**feeds, "act_scale": np.ones(2, np.float32)})


def test_int8_x_is_refused():
    _, packed = _weights(np.random.default_rng(0), 16, 32, 8)
    model = dynamic_model(32, 16, packed, x_type=TensorProto.INT8)
    with pytest.raises(Exception, match="dynamic=1 takes each token's scale from its float row, but X is int8"):
        session(model).run(None, {"X": np.ones((2, 32), np.int8), "w_scale": np.ones(16, np.float32),
                                  "act_scale": np.zeros(0, np.float32)})


def test_bad_dynamic_attribute_fails_at_session_creation():
    _, packed = _weights(np.random.default_rng(0), 16, 32, 8)
    model = quant_linear_model(32, 16, weight=packed)
    model.graph.node[0].attribute.append(helper.make_attribute("dynamic", 2))
    with pytest.raises(Exception, match="attribute dynamic must be 0 or 1"):
        session(model)


ISA_CHECKS = [(np.float32, 8, 300), (np.float16, 4, 37), (np.float32, 4, 5), (np.float16, 8, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512vnni"])
def test_every_cpu_kernel_variant(isa):
    """The absmax and quantization of every CPU variant give the graph's codes (the variant is fixed per process)."""
    env = {**os.environ, "MQC_CPU_ISA": isa}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


# ---- lowering --------------------------------------------------------------------------------------------------

def _dynamic_qdq_model(rng: np.random.Generator, K: int, widths: tuple[int, ...], dtype, bits: int = 8) -> ir.Model:
    """passes/cmc.py's dynamic quantizer (built by cmc.py itself) in front of QDQ-weight linears sharing X."""
    layers = [random_linear(rng, K, n, bits) for n in widths]
    proto = qdq_linear_model(layers, [None] * len(layers), 1.0, x_dtype=dtype, bits=bits)
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", X_TYPES[dtype], ["B", "S", K]))
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    x = graph.inputs[0]
    dq = next(n for n in graph if n.op_type == "DequantizeLinear" and n.name == "act_dequant")
    readers = [u.node for u in dq.outputs[0].uses()]
    for reader in readers:
        reader.replace_input_with(0, x)
    insert_activation_dynamic(graph, x, 8, readers)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_form_is_lowered(bits):
    rng = np.random.default_rng(bits)
    K = 96
    model = _dynamic_qdq_model(rng, K, (48, 32), np.float32, bits)
    qdq = ir.serde.serialize_model(model)
    qdq.ir_version = 10
    record = lower_to_runtime_ops(model)
    assert record.changed == 2, record.skipped
    assert sorted({n.op_type for n in model.graph}) == ["QuantLinear"]
    for node in model.graph:  # dynamic, with an empty act_scale
        assert node.attributes.get_int("dynamic", 0) == 1 and node.inputs[3].const_value.numpy().size == 0
    lowered = ir.serde.serialize_model(model)
    lowered.ir_version = 10
    x = np.concatenate([activations(rng, 7, K, np.float32)[None], activations(rng, 7, K, np.float32)[None]])
    expected = session(qdq, custom=False, optimize=False).run(None, {"X": x})
    got = session(lowered).run(None, {"X": x})
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=RTOL * np.abs(e).max())


def test_float16_dynamic_form_is_refused():
    """An fp16 graph computes the scale in fp16 (its 1e-12 floor is 0 there): the op's fp32 codes would differ."""
    model = _dynamic_qdq_model(np.random.default_rng(1), 64, (32,), np.float16)
    record = lower_to_runtime_ops(model)
    assert record.changed == 0
    assert any("float16" in s["reason"] for s in record.skipped), record.skipped


def test_masquant_lowered_matches_qdq(tiny_decoder, tmp_path):
    """The masquant recipe (dynamic W4A8, CMC): every dynamic quantizer and low-rank branch goes into a
    QuantLinear, and the outputs equal the QDQ model's (text-only and image-token samples)."""
    from test_compile_mqc import assert_lowered_matches_qdq

    from mqc.calibration import random_feeds
    from mqc.compiler import compile_file
    from mqc.ir import save_model
    from mqc.recipes import load_recipe, with_overrides

    qdq_path = tmp_path / "masquant.qdq.onnx"
    recipe = with_overrides(load_recipe("masquant"), {"mas": {"steps_per_epoch": 4}})
    compile_file(tiny_decoder("llama"), qdq_path, recipe=recipe, fmt="qdq")
    model = ir.load(str(qdq_path))
    assert any(n.op_type == "ReduceMax" for n in model.graph)
    record = lower_to_runtime_ops(model)
    assert not record.skipped, record.skipped
    ops = [n.op_type for n in model.graph]
    assert not {"ReduceMax", "Round", "Clip", "DequantizeLinear"} & set(ops), sorted(set(ops))
    linears = [n for n in model.graph if n.op_type == "QuantLinear"]
    assert linears and all(n.attributes.get_int("dynamic", 0) == 1 for n in linears)
    assert sum(len(n.inputs) > 7 and n.inputs[7] is not None for n in linears) == 12  # q/k/v, o, gate/up x 2
    mqc_path = tmp_path / "masquant.mqc.onnx"
    save_model(model, mqc_path)
    assert_lowered_matches_qdq(qdq_path, mqc_path, random_feeds(model, 2))  # sample 1 has image tokens


if __name__ == "__main__":
    for dtype, bits, M in ISA_CHECKS:
        check_codes(dtype, bits, M)
        check_random_weights(dtype, bits, True, M)
    print("ok")
