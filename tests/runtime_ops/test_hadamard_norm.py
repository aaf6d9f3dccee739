"""ai.mqc::Hadamard and ai.mqc::RMSNormQuant on the CPU against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from rtops_models import DOMAIN, make_model, session

M_SIZES = [1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_model(x_type, m: int | None, const=True):
    inputs = [helper.make_tensor_value_info("X", x_type, None)]
    inits = []
    node_inputs = ["X"]
    if m is not None:
        node_inputs.append("H")
        if const is True:
            inits.append(numpy_helper.from_array(const_h(m), "H"))
        else:
            inputs.append(helper.make_tensor_value_info("H", TensorProto.FLOAT, None))
    node = helper.make_node("Hadamard", node_inputs, ["Y"], domain=DOMAIN)
    return make_model([node], inputs, [helper.make_tensor_value_info("Y", x_type, None)], inits)


def const_h(m: int) -> np.ndarray:
    """A fixed +-1 matrix standing in for H_m: the op applies whatever +-1 (or any) matrix it is given."""
    rng = np.random.default_rng(m)
    return np.where(rng.random((m, m)) < 0.5, -1.0, 1.0).astype(np.float32)


def hadamard_reference(x: np.ndarray, hm: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    m = hm.shape[0]
    full = np.kron(hm.astype(np.float64), sylvester(n // m)) / np.sqrt(n)
    return x.astype(np.float64) @ full


@pytest.mark.parametrize("m", M_SIZES)
def test_hadamard_all_sizes(m):
    k = 4 if m > 60 else 6
    n = m * 2**k
    x = np.random.default_rng(m).standard_normal((3, 5, n)).astype(np.float32)
    model = hadamard_model(TensorProto.FLOAT, None if m == 1 else m)
    y = session(model).run(None, {"X": x})[0]
    ref = hadamard_reference(x, const_h(m) if m > 1 else np.ones((1, 1)))
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_hadamard_sylvester_is_orthonormal_and_fp16():
    n = 1024
    x = np.random.default_rng(0).standard_normal((7, n)).astype(np.float16)
    y = session(hadamard_model(TensorProto.FLOAT16, None)).run(None, {"X": x})[0]
    assert y.dtype == np.float16
    ref = hadamard_reference(x.astype(np.float32), np.ones((1, 1)))
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64), axis=-1), np.linalg.norm(x.astype(np.float64), axis=-1),
                               rtol=2e-3)


def test_hadamard_with_computed_matrix_input():
    m, n = 12, 12 * 32
    x = np.random.default_rng(1).standard_normal((4, n)).astype(np.float32)
    y = session(hadamard_model(TensorProto.FLOAT, m, const=False)).run(None, {"X": x, "H": const_h(m)})[0]
    np.testing.assert_allclose(y, hadamard_reference(x, const_h(m)), rtol=0, atol=1e-5 * 10)


def test_hadamard_rejects_bad_size():
    x = np.zeros((2, 12 * 24), np.float32)  # 24 is not a power of 2
    x[0, 0] = 1.0
    with pytest.raises(Exception, match="not m \\* 2\\^k"):
        session(hadamard_model(TensorProto.FLOAT, 12)).run(None, {"X": x})


def rmsnorm_quant_model(x_type, K, eps=1e-6, optional=()):
    names = ["X", "gamma", "act_scale"] + [n if n in optional else "" for n in ("modality_ids", "split")]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("RMSNormQuant", names, ["Q"], domain=DOMAIN, epsilon=eps)
    inputs = [helper.make_tensor_value_info("X", x_type, None), helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [K]),
              helper.make_tensor_value_info("act_scale", TensorProto.FLOAT, None)]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in optional]
    return make_model([node], inputs, [helper.make_tensor_value_info("Q", TensorProto.INT8, None)], [])


def rmsnorm_reference(x, gamma, s_tok, eps):
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * gamma
    return y / s_tok


@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
def test_rmsnorm_quant_matches_float64_reference(x_dtype):
    rng = np.random.default_rng(2)
    K = 576
    x = (rng.standard_normal((2, 33, K)) * 3).astype(x_dtype)
    gamma = (rng.random(K) + 0.5).astype(np.float32)
    s = np.float32(0.03)
    x_type = TensorProto.FLOAT if x_dtype == np.float32 else TensorProto.FLOAT16
    q = session(rmsnorm_quant_model(x_type, K)).run(None, {"X": x, "gamma": gamma, "act_scale": np.array([s])})[0]
    assert q.dtype == np.int8 and q.shape == x.shape
    ref = rmsnorm_reference(x.astype(np.float32), gamma, s, 1e-6)
    exact = np.clip(np.rint(ref), -128, 127)
    diff = np.abs(q.astype(np.float64) - exact)
    # fp32 arithmetic can only move values that sit within rounding distance of a .5 boundary, by one code
    assert diff.max() <= 1
    near_tie = np.abs(np.abs(ref - np.floor(ref)) - 0.5) < 1e-4
    assert np.all(diff[~near_tie] == 0)


@pytest.mark.parametrize("form", ["modality_ids", "split"])
def test_rmsnorm_quant_per_modality(form):
    rng = np.random.default_rng(4)
    B, S, K = 2, 9, 64
    x = rng.standard_normal((B, S, K)).astype(np.float32)
    gamma = np.ones(K, np.float32)
    scales = np.array([0.02, 0.05], np.float32)
    if form == "modality_ids":
        ids = (rng.random((B, S)) < 0.5).astype(np.int64)
        feeds = {"modality_ids": ids}
    else:
        ids = np.broadcast_to((np.arange(S) < 4).astype(np.int64), (B, S))
        feeds = {"split": np.array(4, np.int64)}
    q = session(rmsnorm_quant_model(TensorProto.FLOAT, K, optional=(form,))).run(
        None, {"X": x, "gamma": gamma, "act_scale": scales, **feeds})[0]
    ref = rmsnorm_reference(x, gamma, scales[ids][..., None].astype(np.float64), 1e-6)
    assert np.abs(q - np.clip(np.rint(ref), -128, 127)).max() <= 1


def test_rmsnorm_quant_matches_onnxruntime_rmsnorm_then_quantize():
    """Against onnxruntime's own RMSNormalization (opset 23) followed by QuantizeLinear."""
    rng = np.random.default_rng(6)
    K, eps = 384, 1e-5
    x = (rng.standard_normal((64, K)) * 2).astype(np.float32)
    gamma = (rng.random(K) + 0.5).astype(np.float32)
    s = np.float32(0.04)
    nodes = [helper.make_node("RMSNormalization", ["X", "gamma"], ["n"], epsilon=eps, axis=-1),
             helper.make_node("QuantizeLinear", ["n", "s", "z"], ["Q"])]
    ref_model = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                           [helper.make_tensor_value_info("Q", TensorProto.INT8, None)],
                           [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(s, "s"),
                            numpy_helper.from_array(np.array(0, np.int8), "z")], opset=23, mqc=False)
    expected = session(ref_model, custom=False).run(None, {"X": x})[0]
    q = session(rmsnorm_quant_model(TensorProto.FLOAT, K, eps=eps)).run(None, {"X": x, "gamma": gamma, "act_scale": np.array([s])})[0]
    diff = np.abs(q.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= 1
    assert np.mean(diff > 0) < 1e-3


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_hadamard_applies_a_one_by_one_matrix(sign):
    """H_m of size 1 is part of the product too: [[-1]] negates (it used to be ignored for m = 1)."""
    x = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)
    hm = np.array([[sign]], np.float32)
    y = session(hadamard_model(TensorProto.FLOAT, 1, const=False)).run(None, {"X": x, "H": hm})[0]
    np.testing.assert_allclose(y, hadamard_reference(x, hm), rtol=0, atol=1e-5)
