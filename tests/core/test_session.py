"""Session options mqc applies to every onnxruntime session it opens."""

from __future__ import annotations

import pytest

from mqc.errors import InputModelError
from mqc.session import THREADS_ENV, open_session


def test_thread_count_comes_from_the_environment(llama_decoder, monkeypatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert open_session(llama_decoder).get_session_options().intra_op_num_threads == 3
    assert open_session(llama_decoder, intra_op_threads=2).get_session_options().intra_op_num_threads == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(InputModelError, match=THREADS_ENV):
            open_session(llama_decoder)


def test_a_static_w8a8_matmul_sums_exactly_on_any_cpu(tmp_path) -> None:
    """Codes near ±127 on both sides: onnxruntime's fused int8 GEMM saturates its int16 pair sums on x86 without VNNI,
    so mqc's sessions leave the QDQ nodes unfused there; the output is the exact int32 sum either way."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n, s_x, s_w = 256, 8, 0.05, 0.01
    w_q = rng.choice(np.array([-127, 127], np.int8), size=(k, n))
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.array(s_x, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int8), "zx"),
             numpy_helper.from_array(w_q, "w"), numpy_helper.from_array(np.array(s_w, np.float32), "sw"),
             numpy_helper.from_array(np.array(0, np.int8), "zw")]
    graph = helper.make_graph(nodes, "w8a8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    path = tmp_path / "w8a8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    x_q = rng.choice(np.array([-127, 127]), size=(4, k))
    exact = (x_q @ w_q.astype(np.int64)) * (s_x * s_w)
    got = open_session(path).run(None, {"x": (x_q * s_x).astype(np.float32)})[0]
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-3)
