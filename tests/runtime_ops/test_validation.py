"""The shared validator of the ai.mqc ops (runtime_ops/src/validate.h): every rule through real onnxruntime
sessions on the CPU library, the same messages from both libraries' ``mqc_validate_node``, and K = 0."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from mqc.runtime_ops import DOMAIN
from onnx import TensorProto, helper, numpy_helper
from rtops_models import pack_int4, session
from rtops_validation import Node, validator

K, N = 64, 16
NAN, INF = np.float32("nan"), np.float32("inf")
HAS_CUDA_LIBRARY = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def f32(*shape, fill=None):
    rng = np.random.default_rng(sum(shape) + len(shape))
    return np.full(shape, fill, np.float32) if fill is not None else rng.standard_normal(shape).astype(np.float32)


def quant_linear(drop=(), attrs=None, **inputs) -> Node:
    """A valid static W8 QuantLinear on X [1, 4, K], with inputs replaced (or added) by keyword, or dropped."""
    base = {"X": f32(1, 4, K), "W": np.ones((N, K), np.int8), "w_scale": f32(N, fill=0.5),
            "act_scale": np.array([0.1], np.float32)}
    base.update(inputs)
    return Node("QuantLinear", {k: v for k, v in base.items() if k not in drop}, attrs or {})


def hadamard(**inputs) -> Node:
    base = {"X": f32(3, 12 * 8), "H_m": np.ones((12, 12), np.float32), **inputs}
    return Node("Hadamard", {k: v for k, v in base.items() if v is not None})


def rmsnorm_quant(attrs=None, **inputs) -> Node:
    return Node("RMSNormQuant", {"X": f32(1, 4, K), "gamma": f32(K, fill=1.0),
                                 "act_scale": np.array([0.05], np.float32), **inputs}, attrs or {})


ONE_BYTE_ROWS = np.zeros((N, K // 2), np.uint8)

# (id, node, the validator's message; for the rows whose input type is wrong, onnxruntime refuses first from the
# same schema's declared types and names the input: schema_type_error holds that input's name).
RULES = [
    ("ql-bits", quant_linear(attrs={"bits": 3}), "attribute bits must be 8 or 4, got 3", None),
    ("ql-dynamic-attr", quant_linear(attrs={"dynamic": 2}), "attribute dynamic must be 0 or 1, got 2", None),
    ("ql-dynamic-int8-x", quant_linear(attrs={"dynamic": 1}, X=np.ones((2, K), np.int8)),
     "dynamic=1 takes each token's scale from its float row, but X is int8", None),
    ("ql-w-rank", quant_linear(W=np.ones(N * K, np.int8)), "W must be 2-D [N, K] (bits 8) or [N, K/2] (bits 4), got [1024]",
     None),
    ("ql-w8-type", quant_linear(W=np.ones((N, K), np.uint8)), "bits=8 needs an int8 W, got uint8", None),
    ("ql-w4-type", quant_linear(attrs={"bits": 4}, W=np.ones((N, K // 2), np.int8)),
     "bits=4 needs a uint8 W (two int4 per byte), got int8", None),
    ("ql-x-type", quant_linear(X=np.ones((2, K), np.int32)), "X must be one of the registered types, got other", "X"),
    ("ql-x-rank", quant_linear(X=np.array(1.0, np.float32)), "X must have rank >= 1", None),
    ("ql-side-row-no-channel", quant_linear(X=f32(2, 0), side_row=f32(N)),
     "side_row takes channel 0 of X, but X [2, 0] has no channel", None),
    ("ql-k-mismatch", quant_linear(X=f32(1, 4, K - 1)), "X [1, 4, 63] gives K=63 but W holds K=64", None),
    ("ql-k-plus-one-w8", quant_linear(X=f32(2, K - 1), W=np.ones((N, K), np.int8)), "gives K=63 but W holds K=64",
     None),
    ("ql-k-even-w4", quant_linear(attrs={"bits": 4}, X=f32(2, K - 2), W=ONE_BYTE_ROWS),
     "X [2, 62] gives K=62 but W holds K=64 (bits=4 packs two per byte)", None),
    ("ql-k-side-row", quant_linear(X=f32(2, K), side_row=f32(N)),
     "X [2, 64] (channel 0 on the side branch) gives K=63 but W holds K=64", None),
    ("ql-w-scale-len", quant_linear(w_scale=f32(N - 1)), "w_scale must have 16 entries, got shape [15]", None),
    ("ql-w-scale-type", quant_linear(w_scale=np.ones(N, np.float16)), "w_scale must be float32, got float16",
     "w_scale"),
    ("ql-act-scale-len", quant_linear(act_scale=f32(4, fill=0.1)),
     "act_scale must be float32 with 1 to 3 entries (text, image, sink), got [4]", None),
    ("ql-act-scale-empty", quant_linear(act_scale=np.zeros(0, np.float32)),
     "act_scale must be float32 with 1 to 3 entries (text, image, sink), got [0]", None),
    ("ql-act-scale-type", quant_linear(act_scale=np.ones(1, np.float16)), "act_scale must be float32, got float16",
     "act_scale"),
    ("ql-act-scale-zero", quant_linear(act_scale=f32(1, fill=0.0)),
     "act_scale entries must be finite and > 0, got 0 at index 0", None),
    ("ql-act-scale-negative", quant_linear(act_scale=np.array([0.1, -0.5], np.float32)),
     "act_scale entries must be finite and > 0, got -0.5 at index 1", None),
    ("ql-act-scale-nan", quant_linear(act_scale=np.array([NAN], np.float32)),
     "act_scale entries must be finite and > 0, got nan at index 0", None),
    ("ql-act-scale-inf", quant_linear(act_scale=np.array([INF], np.float32)),
     "act_scale entries must be finite and > 0, got inf at index 0", None),
    ("ql-dynamic-two-scales", quant_linear(attrs={"dynamic": 1}, act_scale=f32(2, fill=0.1)),
     "with dynamic=1 act_scale is not read", None),
    ("ql-bias-len", quant_linear(bias=f32(N + 1)), "bias must have 16 entries, got shape [17]", None),
    ("ql-bias-type", quant_linear(bias=np.ones(N, np.float64)), "bias must be float32, got other", "bias"),
    ("ql-side-row-len", quant_linear(X=f32(2, K + 1), side_row=f32(3)), "side_row must have 16 entries, got shape [3]",
     None),
    ("ql-ids-len", quant_linear(modality_ids=np.zeros((1, 3), np.int64)),
     "modality_ids [1, 3] has 3 entries, X [1, 4, 64] has 4 tokens", None),
    ("ql-ids-type", quant_linear(modality_ids=np.zeros((1, 4), np.int32)), "modality_ids must be int64, got other",
     "modality_ids"),
    ("ql-split-len", quant_linear(split=np.array([1, 2], np.int64)),
     "split must be one int64 (the number of leading image tokens), got [2]", None),
    ("ql-split-negative", quant_linear(split=np.array([-1], np.int64)), "split must be >= 0, got -1", None),
    ("ql-lowrank-alone", quant_linear(lowrank_a=f32(K, 2)), "lowrank_a and lowrank_b must be given together", None),
    ("ql-lowrank-shape", quant_linear(lowrank_a=f32(K, 2), lowrank_b=f32(3, N)),
     "lowrank_a [64, 2] / lowrank_b [3, 16] must be [K, r] / [r, N] with K=64, N=16", None),
    ("ql-lowrank-type", quant_linear(lowrank_a=np.ones((K, 2), np.float16), lowrank_b=f32(2, N)),
     "lowrank_a must be float32, got float16", "lowrank_a"),
    ("ql-int8-x-lowrank", quant_linear(X=np.ones((2, K), np.int8), lowrank_a=f32(K, 2), lowrank_b=f32(2, N)),
     "the low-rank and channel-0 branches need float X, got int8", None),
    ("ql-int8-x-side-row", quant_linear(X=np.ones((2, K + 1), np.int8), side_row=f32(N)),
     "the low-rank and channel-0 branches need float X, got int8", None),
    ("ql-group-size-attr", quant_linear(attrs={"group_size": 48}, w_scale=f32(1, N)),
     "attribute group_size must be 0 (per channel) or a positive multiple of 32, got 48", None),
    ("ql-group-size-negative", quant_linear(attrs={"group_size": -32}, w_scale=f32(2, N)),
     "attribute group_size must be 0 (per channel) or a positive multiple of 32, got -32", None),
    ("ql-group-w-k", quant_linear(attrs={"group_size": 64}, X=f32(2, 96), W=np.ones((N, 96), np.int8),
                                  w_scale=f32(1, N)),
     "group_size=64 does not divide W's K=96 (W [16, 96])", None),
    ("ql-group-x-k-pad-nibble", quant_linear(attrs={"bits": 4, "group_size": 32}, X=f32(2, K - 1), W=ONE_BYTE_ROWS,
                                             w_scale=f32(2, N)),
     "group_size=32 does not divide K=63 (X [2, 63])", None),
    ("ql-group-k-side-row", quant_linear(attrs={"group_size": 32}, X=f32(2, K), W=np.ones((N, K - 1), np.int8),
                                         w_scale=f32(2, N), side_row=f32(N)),
     "group_size=32 does not divide W's K=63", None),
    ("ql-group-w-scale-per-channel", quant_linear(attrs={"group_size": 32}),
     "with group_size=32 w_scale must be [K/group_size, N] = [2, 16], got [16]", None),
    ("ql-group-w-scale-transposed", quant_linear(attrs={"group_size": 32}, w_scale=f32(N, 2)),
     "with group_size=32 w_scale must be [K/group_size, N] = [2, 16], got [16, 2]", None),
    ("had-x-rank", hadamard(X=np.array(1.0, np.float32)), "X must have rank >= 1", None),
    ("had-h-not-square", hadamard(H_m=f32(12, 6)), "H_m must be a float32 square matrix of size >= 1, got float [12, 6]",
     None),
    ("had-h-empty", hadamard(H_m=np.zeros((0, 0), np.float32)),
     "H_m must be a float32 square matrix of size >= 1, got float [0, 0]", None),
    ("had-h-type", hadamard(H_m=np.ones((12, 12), np.float16)), "H_m must be float32, got float16", "H_m"),
    ("had-size", hadamard(X=f32(2, 12 * 24)), "last dimension 288 is not m * 2^k for the given H_m of size m=12",
     None),
    ("had-size-zero", hadamard(X=f32(2, 0)), "last dimension 0 is not m * 2^k", None),
    ("rq-epsilon-negative", rmsnorm_quant(attrs={"epsilon": -1e-6}),
     "attribute epsilon must be finite and >= 0, got -1e-06", None),
    ("rq-epsilon-nan", rmsnorm_quant(attrs={"epsilon": float("nan")}), "attribute epsilon must be finite and >= 0",
     None),
    ("rq-x-rank", rmsnorm_quant(X=np.array(1.0, np.float32)), "X must have rank >= 1", None),
    ("rq-gamma-len", rmsnorm_quant(gamma=f32(K - 1)), "gamma must have 64 entries, got shape [63]", None),
    ("rq-gamma-type", rmsnorm_quant(gamma=np.ones(K, np.float16)), "gamma must be float32, got float16", "gamma"),
    ("rq-act-scale-len", rmsnorm_quant(act_scale=f32(4, fill=0.1)),
     "act_scale must be float32 with 1 to 3 entries (text, image, sink), got [4]", None),
    ("rq-act-scale-type", rmsnorm_quant(act_scale=np.ones(1, np.float16)), "act_scale must be float32, got float16",
     "act_scale"),
    ("rq-act-scale-zero", rmsnorm_quant(act_scale=f32(1, fill=0.0)),
     "act_scale entries must be finite and > 0, got 0 at index 0", None),
    ("rq-act-scale-negative", rmsnorm_quant(act_scale=np.array([0.05, -1.0], np.float32)),
     "act_scale entries must be finite and > 0, got -1 at index 1", None),
    ("rq-act-scale-nan", rmsnorm_quant(act_scale=np.array([NAN], np.float32)),
     "act_scale entries must be finite and > 0, got nan at index 0", None),
    ("rq-act-scale-inf", rmsnorm_quant(act_scale=np.array([INF], np.float32)),
     "act_scale entries must be finite and > 0, got inf at index 0", None),
    ("rq-ids-len", rmsnorm_quant(modality_ids=np.zeros(5, np.int64)),
     "modality_ids [5] has 5 entries, X [1, 4, 64] has 4 tokens", None),
    ("rq-split-negative", rmsnorm_quant(act_scale=f32(2, fill=0.1), split=np.array([-3], np.int64)),
     "split must be >= 0, got -3", None),
]
RULE_IDS = [r[0] for r in RULES]

# Valid nodes at the edges of the rules: each must run (and the validator must accept it).
VALID = [
    ("ql-odd-k-w4", quant_linear(attrs={"bits": 4}, X=f32(2, K - 1), W=ONE_BYTE_ROWS)),
    ("ql-two-scales-split", quant_linear(act_scale=np.array([0.1, 0.2], np.float32), split=np.array([2], np.int64))),
    ("ql-dynamic-empty-scale", quant_linear(attrs={"dynamic": 1}, act_scale=np.zeros(0, np.float32))),
    ("ql-dynamic-placeholder", quant_linear(attrs={"dynamic": 1}, act_scale=np.array([-1.0], np.float32))),
    ("ql-lowrank-rank-0", quant_linear(lowrank_a=f32(K, 0), lowrank_b=f32(0, N))),
    ("ql-group-one-group", quant_linear(attrs={"group_size": 64}, w_scale=f32(1, N))),
    ("ql-group-w4-dynamic-side-row", quant_linear(attrs={"bits": 4, "group_size": 32, "dynamic": 1}, X=f32(2, K + 1),
                                                  W=ONE_BYTE_ROWS, w_scale=f32(2, N), act_scale=np.zeros(0, np.float32),
                                                  side_row=f32(N))),
    ("had-no-matrix", hadamard(X=f32(2, 64), H_m=None)),
    ("rq-epsilon-zero", rmsnorm_quant(attrs={"epsilon": 0.0})),
    ("rq-two-scales-ids", rmsnorm_quant(act_scale=np.array([0.05, 0.07], np.float32),
                                        modality_ids=np.array([[1, 1, 0, 0]], np.int64))),
]


def _session_error(node: Node, kind: str = "cpu") -> str:
    with pytest.raises(Exception) as info:  # onnxruntime raises several classes; the text is checked
        node.run(kind)
    return str(info.value)


@pytest.mark.parametrize(("case", "node", "message", "schema_type_error"), RULES, ids=RULE_IDS)
def test_each_rule_refuses_in_a_session(case, node, message, schema_type_error):
    """The CPU library's session refuses the node with the validator's message (or, for a wrong input type,
    onnxruntime's type check from the same schema, naming the input)."""
    error = _session_error(node)
    if schema_type_error:
        assert re.search(rf"Type Error: Type '[^']+' of input parameter \({schema_type_error}\)", error), error
    else:
        assert f"ai.mqc::{node.op}: " in error and message in error, error


@pytest.mark.parametrize(("case", "node", "message", "schema_type_error"), RULES, ids=RULE_IDS)
def test_validator_entry_point_gives_the_session_message(case, node, message, schema_type_error):
    """mqc_validate_node (the validators without onnxruntime) refuses with the same text the session printed."""
    got = validator("cpu")(node)
    assert got.startswith(f"ai.mqc::{node.op}: ") and message in got, got
    if not schema_type_error:
        assert got in _session_error(node)


@pytest.mark.parametrize(("node", "message"), [
    (quant_linear(attrs={"bits": 4.0}), "ai.mqc::QuantLinear: attribute bits must be an integer, got a float"),
    (quant_linear(attrs={"dynamic": 1.0}), "ai.mqc::QuantLinear: attribute dynamic must be an integer, got a float"),
    (rmsnorm_quant(attrs={"epsilon": 1}), "ai.mqc::RMSNormQuant: attribute epsilon must be a float, got an integer"),
], ids=["bits-float", "dynamic-float", "epsilon-int"])
def test_wrongly_typed_attribute_is_refused_not_defaulted(node, message):
    """An attribute of the wrong type is refused at session creation (onnxruntime reports it like an absent one,
    which used to fall back to the default silently)."""
    assert message in _session_error(node)


@pytest.mark.parametrize(("case", "node"), VALID, ids=[v[0] for v in VALID])
def test_valid_edges_pass_both(case, node):
    assert validator("cpu")(node) == ""
    y = node.run()
    assert np.isfinite(y.astype(np.float64)).all()


@pytest.mark.skipif(not HAS_CUDA_LIBRARY, reason="the CUDA library is only built where nvcc exists")
def test_cuda_library_validates_with_the_same_code():
    """The CUDA library links the same validator: identical verdicts and messages on every rule, and its sessions
    (its CPU kernels, registered from the same schema) refuse with them too."""
    cpu, cuda = validator("cpu"), validator("cuda")
    for case, node, _, _ in RULES:
        assert cuda(node) == cpu(node), case
    for _, node in VALID:
        assert cuda(node) == ""
    for case, node, message, schema_type_error in RULES[::7]:
        error = _session_error(node, "cuda")
        assert (schema_type_error or message) in error, (case, error)


# ---- K = 0: a GEMM with an empty reduction is bias (or zeros), never stale memory ------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dynamic", [0, 1])
def test_k_zero_gives_bias_or_zeros(bits, x_dtype, with_bias, dynamic):
    w = np.zeros((N, 0), np.int8) if bits == 8 else np.zeros((N, 0), np.uint8)
    bias = np.linspace(-3, 3, N).astype(np.float32)
    extra = {"bias": bias} if with_bias else {}
    act = np.zeros(0, np.float32) if dynamic else np.array([0.1], np.float32)
    node = quant_linear(attrs={"bits": bits, "dynamic": dynamic}, X=np.ones((2, 3, 0), x_dtype), W=w, act_scale=act,
                        **extra)
    want = np.broadcast_to(bias if with_bias else np.zeros(N, np.float32), (2, 3, N)).astype(
        np.float16 if x_dtype == np.float16 else np.float32)
    for y in (node.run(), node.run()):
        assert y.shape == (2, 3, N) and y.dtype == want.dtype
        np.testing.assert_array_equal(y, want)


def test_k_zero_after_a_real_product_in_the_same_session():
    """A K = 0 node in a session that ran a K = 64 node first: its output holds the bias, not a reused buffer."""
    big = quant_linear(W=np.full((N, K), 3, np.int8), X=f32(1, 4, K, fill=1.0))
    model = big.model()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((N, 0), np.int8), "W0"))
    model.graph.input.extend([helper.make_tensor_value_info("X0", TensorProto.FLOAT, None),
                              helper.make_tensor_value_info("b0", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("QuantLinear", ["X0", "W0", "w_scale", "act_scale", "b0"], ["Y0"],
                                             domain=DOMAIN))
    model.graph.output.append(helper.make_tensor_value_info("Y0", TensorProto.FLOAT, None))
    s = session(model, threads=1)
    feeds = {**big.feeds(), "X0": np.zeros((1, 4, 0), np.float32), "b0": np.full(N, 0.25, np.float32)}
    for _ in range(3):
        y, y0 = s.run(None, feeds)
        # x = 1, act_scale 0.1: codes 10; W = 3 over K = 64: acc 1920; scales 0.1 * 0.5
        np.testing.assert_allclose(y, np.full((1, 4, N), 96.0, np.float32), rtol=1e-6)
        np.testing.assert_array_equal(y0, np.full((1, 4, N), 0.25, np.float32))


def test_k_zero_with_side_row_adds_channel_zero():
    """Kx = 1 with side_row: K = 0 quantized channels, so Y = bias + x[..., 0] * side_row."""
    x = np.array([[2.0], [-1.0], [0.5]], np.float32)
    side = np.arange(N, dtype=np.float32)
    bias = np.full(N, 1.5, np.float32)
    node = quant_linear(X=x, W=np.zeros((N, 0), np.int8), side_row=side, bias=bias)
    np.testing.assert_allclose(node.run(), bias + x * side, rtol=0, atol=0)


def test_k_zero_w4_matches_pack_of_empty_rows():
    """bits=4 with K = 0 stores [N, 0] bytes (pack_int4 of an empty matrix)."""
    node = quant_linear(attrs={"bits": 4}, X=np.ones((1, 0), np.float32), W=pack_int4(np.zeros((N, 0), np.int8)))
    np.testing.assert_array_equal(node.run(), np.zeros((1, N), np.float32))
