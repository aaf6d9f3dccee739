"""passes/lower_runtime_ops.py: QDQ linears -> ai.mqc::QuantLinear, outputs equal to the QDQ model's.

Tolerance: the lowered op computes the same int8 codes and the same int32 dot products as the QDQ model; only the
fp32 order of the final sum differs (QDQ: sum of dequantized products; op: acc * (s_x * s_w) + bias), so the
outputs agree to ``RTOL`` = 1e-5 of the output's magnitude in fp32, and to one fp16 ulp scale in fp16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from mqc.passes.lower_runtime_ops import (
    LowerRuntimeOpsPass,
    lower_to_runtime_ops,
    pack_int4_rows,
    unpack_int4_rows,
)
from onnx import helper
from rtops_models import int_reference, make_model, qdq_linear_model, quantize, random_linear, session

RTOL = 1e-5


def lower(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    record = lower_to_runtime_ops(model)
    out = ir.serde.serialize_model(model)
    out.ir_version = 10
    return out, record


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("bits", [8, 4])
def test_shared_activation_qdq_with_and_without_bias(bits):
    rng = np.random.default_rng(bits)
    K = 96
    layers = [random_linear(rng, K, n, bits) for n in (64, 48, 80)]
    biases = [rng.standard_normal(64).astype(np.float32), None, rng.standard_normal(80).astype(np.float32)]
    s = 0.03
    qdq = qdq_linear_model(layers, biases, s, bits=bits)
    lowered, record = lower(qdq)
    assert record.changed == 3 and not record.skipped
    assert op_types(lowered) == ["QuantLinear"] * 3
    assert any(o.domain == "ai.mqc" and o.version == 1 for o in lowered.opset_import)
    names = {i.name for i in lowered.graph.initializer}
    assert not names & {"w0_q", "w1_q", "w0_scale", "x_scale", "x_zero"}, names  # dead ones removed
    x = (rng.standard_normal((2, 17, K)) * 2).astype(np.float32)
    expected = session(qdq, custom=False).run(None, {"X": x})
    got = session(lowered).run(None, {"X": x})
    xq = quantize(x.reshape(-1, K), np.float32(s))
    for (wq, ws), b, e, g in zip(layers, biases, expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=RTOL * np.abs(e).max())
        # the integer part: exactly numpy's int32 product of the same codes
        ref = int_reference(xq, wq.T) * (np.float64(np.float32(s)) * ws) + (0 if b is None else b)
        np.testing.assert_allclose(g.reshape(-1, wq.shape[1]), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_unoptimized_qdq_session_agrees_too():
    """With onnxruntime's QDQ fusions off, the QDQ model runs DQ -> fp32 MatMul: same tolerance."""
    rng = np.random.default_rng(9)
    K = 64
    layers = [random_linear(rng, K, 40)]
    qdq = qdq_linear_model(layers, [None], 0.05)
    lowered, _ = lower(qdq)
    x = rng.standard_normal((5, K)).astype(np.float32)
    e = session(qdq, custom=False, optimize=False).run(None, {"X": x})[0]
    g = session(lowered).run(None, {"X": x})[0]
    np.testing.assert_allclose(g, e, rtol=0, atol=RTOL * np.abs(e).max())


def test_float16_model():
    rng = np.random.default_rng(12)
    K = 64
    layers = [random_linear(rng, K, 32)]
    qdq = qdq_linear_model(layers, [rng.standard_normal(32).astype(np.float32)], 0.04, x_dtype=np.float16)
    lowered, record = lower(qdq)
    assert record.changed == 1
    x = rng.standard_normal((6, K)).astype(np.float16)
    e = session(qdq, custom=False, optimize=False).run(None, {"X": x})[0]
    g = session(lowered).run(None, {"X": x})[0]
    assert g.dtype == np.float16
    np.testing.assert_allclose(g.astype(np.float32), e.astype(np.float32), rtol=0, atol=2e-3 * np.abs(e).max())


def test_refusals_are_recorded_and_leave_the_qdq_form():
    rng = np.random.default_rng(0)
    K = 32
    layers = [random_linear(rng, K, 16), random_linear(rng, K, 16)]
    qdq = qdq_linear_model(layers, [None, None], 0.1, shared=False)
    # make the second linear's activations asymmetric (zero point 3)
    qdq.graph.initializer.append(onnx.numpy_helper.from_array(np.array(3, np.int8), "x_zero3"))
    for node in qdq.graph.node:
        if node.output[0] in ("x_q1", "x_dq1"):
            node.input[2] = "x_zero3"
    lowered, record = lower(qdq)
    assert record.changed == 1
    reasons = [s["reason"] for s in record.skipped]
    assert any("zero point is not 0" in r for r in reasons), reasons
    assert op_types(lowered).count("QuantLinear") == 1 and "MatMul" in op_types(lowered)
    x = rng.standard_normal((3, K)).astype(np.float32)
    e = session(qdq, custom=False).run(None, {"X": x})
    g = session(lowered).run(None, {"X": x})
    for a, b in zip(e, g, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=RTOL * np.abs(a).max())


def _blocked_qdq(K: int, N: int, block: int, rng) -> onnx.ModelProto:
    """Y = MatMul(DQ(Q(X)), DQ(W_q [K, N] int4, s [ceil(K / block), N], axis=0, block_size=block)): ONNX blocked
    quantization along K (a partial last block when block does not divide K)."""
    wq, _ = random_linear(rng, K, N, 4)
    groups = -(-K // block)
    nodes = [helper.make_node("QuantizeLinear", ["X", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], axis=0, block_size=block),
             helper.make_node("MatMul", ["xdq", "wdq"], ["Y"], name="blocked")]
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z"),
             onnx.numpy_helper.from_array(wq.astype(ml_dtypes.int4), "w"),
             onnx.numpy_helper.from_array((rng.random((groups, N)) * 0.02 + 0.001).astype(np.float32), "ws"),
             onnx.numpy_helper.from_array(np.zeros((groups, N), ml_dtypes.int4), "wz")]
    return make_model(nodes, [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)],
                      [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits, mqc=False)


def test_per_group_weights_become_group_size():
    """A blocked weight DequantizeLinear (block 32 over K = 96) becomes QuantLinear group_size=32 with its
    [K / 32, N] scales, equal to the QDQ model within fp32 rounding."""
    rng = np.random.default_rng(1)
    proto = _blocked_qdq(96, 40, 32, rng)
    lowered, record = lower(proto)
    assert record.changed == 1 and not record.skipped
    (node,) = [n for n in lowered.graph.node if n.op_type == "QuantLinear"]
    assert {a.name: a.i for a in node.attribute} == {"bits": 4, "group_size": 32}
    w_scale = next(t for t in lowered.graph.initializer if t.name == node.input[2])
    assert list(w_scale.dims) == [3, 40]
    x = rng.standard_normal((5, 96)).astype(np.float32)
    e = session(proto, custom=False).run(None, {"X": x})[0]
    g = session(lowered).run(None, {"X": x})[0]
    np.testing.assert_allclose(g, e, rtol=0, atol=RTOL * np.abs(e).max())


@pytest.mark.parametrize(("K", "block", "reason"), [
    (80, 32, "block_size dividing K=80 and a multiple of 32, got block_size=32"),  # partial last block
    (64, 16, "block_size dividing K=64 and a multiple of 32, got block_size=16"),
])
def test_per_group_weights_the_op_cannot_take_are_refused(K, block, reason):
    _lowered, record = lower(_blocked_qdq(K, 16, block, np.random.default_rng(K + block)))
    assert record.changed == 0
    assert [s["reason"] for s in record.skipped] == [f"qdq_linear_to_quant_linear: per-group weights need a {reason}"]


def test_int4_packing_roundtrip():
    w = np.random.default_rng(0).integers(-8, 8, size=(5, 12)).astype(np.int8)
    packed = pack_int4_rows(w)
    assert packed.shape == (5, 6) and packed.dtype == np.uint8
    assert (packed[0, 0] & 0x0F) == (w[0, 0] & 0x0F)  # low nibble = even k
    np.testing.assert_array_equal(unpack_int4_rows(packed), w)


def test_pass_class_contract():
    assert LowerRuntimeOpsPass.name == "lower_runtime_ops"
    assert LowerRuntimeOpsPass.function_preserving is False


def _msq_qdq_model(rng, K, widths, scales, bits=8):
    """The MSQ form built by mqc/graph/msq.py itself, in front of QDQ-weight linears reading one activation."""
    from mqc.calibration import MODALITY_INPUT
    from mqc.graph.msq import insert_activation_msq, is_image_mask

    layers = [random_linear(rng, K, n, bits) for n in widths]
    proto = qdq_linear_model(layers, [None] * len(layers), 1.0, bits=bits)
    proto.graph.input.append(helper.make_tensor_value_info(MODALITY_INPUT, onnx.TensorProto.INT64, ["B", "S"]))
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["B", "S", K]))
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    x = graph.inputs[0]
    dq = next(n for n in graph if n.op_type == "DequantizeLinear" and n.name == "act_dequant")
    readers = [u.node for u in dq.outputs[0].uses()]
    for reader in readers:  # back to the float MatMul input, then MSQ in front of it
        reader.replace_input_with(0, x)
    mask = is_image_mask(graph, graph.inputs[1])
    x_dq = insert_activation_msq(graph, x, scales[0], scales[1], 8, readers, mask)
    assert all(r.inputs[0] is x_dq for r in readers)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    out = ir.serde.serialize_model(model)
    out.ir_version = 10
    return out, layers


def test_msq_per_modality_form_is_lowered_with_modality_ids():
    rng = np.random.default_rng(21)
    K, scales = 64, (0.02, 0.3)
    qdq, layers = _msq_qdq_model(rng, K, (48, 32), scales)
    assert "Where" in op_types(qdq) and "QuantizeLinear" not in op_types(qdq)
    lowered, record = lower(qdq)
    assert record.changed == 2, record.skipped
    assert set(op_types(lowered)) == {"QuantLinear"}, op_types(lowered)
    ql = next(n for n in lowered.graph.node if n.op_type == "QuantLinear")
    assert ql.input[5] == "modality_ids"
    B, S = 2, 9
    ids = (rng.random((B, S)) < 0.5).astype(np.int64)
    x = (rng.standard_normal((B, S, K)) * np.where(ids[..., None] == 1, 20.0, 1.0)).astype(np.float32)
    feeds = {"X": x, "modality_ids": ids}
    # Reference: the MSQ model as written. onnxruntime 1.31's CPU optimizer turns float-activation
    # MatMul(., DequantizeLinear(int8 W, axis=1)) into com.microsoft::MatMulNBits, which re-quantizes the activation
    # dynamically and moves outputs by ~10%; so the graph's own semantics are evaluated without graph optimizations.
    expected = session(qdq, custom=False, optimize=False).run(None, feeds)
    got = session(lowered).run(None, feeds)
    s_tok = np.where(ids.reshape(-1) == 1, np.float32(scales[1]), np.float32(scales[0]))
    xq = np.stack([quantize(r, s) for r, s in zip(x.reshape(-1, K), s_tok, strict=True)])
    for (wq, ws), e, g in zip(layers, expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=RTOL * np.abs(e).max())
        ref = int_reference(xq, wq.T) * (s_tok.astype(np.float64)[:, None] * ws)
        np.testing.assert_allclose(g.reshape(-1, wq.shape[1]), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("n", [576, 1536, 64])
def test_online_hadamard_matmul_is_lowered(n):
    """passes/hadamard_rotation.py's online Hadamard (MatMul by Mul(Cast(int8 signs), 1/sqrt(n))) -> ai.mqc::Hadamard."""
    from mqc.hadamard import hadamard_matrix

    h = hadamard_matrix(n)
    signs = np.rint(h * np.sqrt(n)).astype(np.int8)
    nodes = [helper.make_node("Cast", ["signs"], ["hf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["hf", "scale"], ["H"]),
             helper.make_node("MatMul", ["X", "H"], ["Y"], name="down/online_hadamard")]
    inits = [onnx.numpy_helper.from_array(signs, "signs"),
             onnx.numpy_helper.from_array(np.array(1 / np.sqrt(n), np.float32), "scale")]
    from rtops_models import make_model

    proto = make_model(nodes, [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)],
                       [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits, mqc=False)
    lowered, record = lower(proto)
    assert op_types(lowered) == ["Hadamard"], record.skipped
    x = np.random.default_rng(n).standard_normal((2, 5, n)).astype(np.float32)
    e = session(proto, custom=False).run(None, {"X": x})[0]
    g = session(lowered).run(None, {"X": x})[0]
    np.testing.assert_allclose(g, x.astype(np.float64) @ h, rtol=0, atol=1e-5 * np.abs(e).max())
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max())


def test_randomized_rotation_is_not_a_hadamard_op():
    from mqc.hadamard import hadamard_matrix

    n = 64
    d = np.where(np.random.default_rng(0).random(n) < 0.5, -1, 1)
    signs = (np.rint(hadamard_matrix(n) * np.sqrt(n)) * d).astype(np.int8)
    nodes = [helper.make_node("Cast", ["signs"], ["hf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["hf", "scale"], ["H"]), helper.make_node("MatMul", ["X", "H"], ["Y"], name="r1")]
    inits = [onnx.numpy_helper.from_array(signs, "signs"), onnx.numpy_helper.from_array(np.array(1 / 8, np.float32), "scale")]
    from rtops_models import make_model

    proto = make_model(nodes, [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)],
                       [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits, mqc=False)
    lowered, record = lower(proto)
    assert "MatMul" in op_types(lowered)
    assert any("kron" in s["reason"] for s in record.skipped), record.skipped
