"""ai.mqc::QuantLinear on the CPU against numpy: exact int32 accumulation, fp32 epilogue within rounding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto
from rtops_models import int_reference, pack_int4, quant_linear_model, quantize, session

# Tolerance of the fp32 epilogue against a float64 evaluation of the same integer result: acc * (s * s_w) + b
# rounds twice in fp32, so the error is a few ulp of the output magnitude.
RTOL = 1e-6


def _weights(rng, N, K, bits):
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    w = rng.integers(lo, hi, size=(N, K)).astype(np.int8)
    return w, (w if bits == 8 else pack_int4(w))


def _reference(x, w, w_scale, s_tok, bias=None):
    xq = quantize(x / s_tok[:, None], 1.0) if s_tok.ndim else quantize(x, s_tok)
    acc = int_reference(xq, w)
    y = acc.astype(np.float64) * (s_tok.astype(np.float64).reshape(-1, 1) * w_scale.astype(np.float64))
    return y + (0 if bias is None else bias.astype(np.float64))


def _quantize_rows(x, s_tok):
    return np.stack([quantize(row, s) for row, s in zip(x, s_tok, strict=True)])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("M", "K", "N"), [(1, 64, 16), (5, 200, 70), (37, 576, 1536), (256, 96, 40)])
def test_integer_accumulation_is_exact(bits, M, K, N):
    """int8 X, unit scales: Y is the int32 accumulator itself, compared exactly with numpy."""
    rng = np.random.default_rng(M * 1000 + K + N + bits)
    w, packed = _weights(rng, N, K, bits)
    model = quant_linear_model(K, N, bits=bits, x_type=TensorProto.INT8, weight=packed)
    xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
    y = session(model).run(None, {"X": xq, "w_scale": np.ones(N, np.float32), "act_scale": np.ones(1, np.float32)})[0]
    acc = int_reference(xq, w)
    assert np.abs(acc).max() < 2**24  # exactly representable in fp32
    np.testing.assert_array_equal(y, acc.astype(np.float32))


@pytest.mark.parametrize(("M", "K", "N"), [(1, 8, 16), (1, 24, 16), (1, 576, 192), (1, 576, 576), (1, 1536, 576),
                                       (1, 576, 1536), (1, 136, 1040), (6, 200, 70), (1, 160000, 16)])
@pytest.mark.parametrize("extreme", [False, True])
def test_int4_one_row_is_exact(M, K, N, extreme):
    """W4 rows computed one at a time (decode, and the last row of a batch of 6) are exact. The one-row kernel
    keeps the high nibbles as 16 * hi in their own accumulator and shifts it back per K chunk: odd step counts
    (K = 24, 136), 1 and 4 panels per call (N = 1040 = 16 x 4 + 1 panels), the decoder's shapes; ``extreme`` gives
    every product its largest magnitude (w = 7, stored nibble 15, times x = -128), where K = 160000 would overflow
    that accumulator in int32 without the chunks. The accumulators may exceed 2^24: Y is their one
    round-to-nearest conversion to fp32, as numpy's."""
    rng = np.random.default_rng(K + N + M + extreme)
    if extreme:
        w = np.where(np.arange(N)[:, None] % 2 == 0, 7, -8).astype(np.int8).repeat(K, axis=1)
        xq = np.full((M, K), -128, np.int8)
    else:
        w = rng.integers(-8, 8, size=(N, K)).astype(np.int8)
        xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
    model = quant_linear_model(K, N, bits=4, x_type=TensorProto.INT8, weight=pack_int4(w))
    y = session(model).run(None, {"X": xq, "w_scale": np.ones(N, np.float32), "act_scale": np.ones(1, np.float32)})[0]
    np.testing.assert_array_equal(y, int_reference(xq, w).astype(np.float32))


@pytest.mark.parametrize(("M", "K", "N"), [(1, 4, 16), (1, 12, 16), (1, 576, 192), (1, 576, 576), (1, 1536, 576),
                                       (1, 136, 1040), (7, 200, 70)])
@pytest.mark.parametrize("extreme", [False, True])
def test_int8_one_row_is_exact(M, K, N, extreme):
    """W8 rows computed one at a time (decode, the last row of a batch of 7), with K of 1, 3 and 34 four-byte steps
    (a kernel that unrolls K must handle the tail) and N = 1040 ending in a single panel. ``extreme``: every product
    at its largest magnitude (w = 127 or -128, x = 127)."""
    rng = np.random.default_rng(K + N + M + extreme + 8)
    if extreme:
        w = np.where(np.arange(N)[:, None] % 2 == 0, 127, -128).astype(np.int8).repeat(K, axis=1)
        xq = np.full((M, K), 127, np.int8)
    else:
        w = rng.integers(-128, 128, size=(N, K)).astype(np.int8)
        xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
    model = quant_linear_model(K, N, bits=8, x_type=TensorProto.INT8, weight=w)
    y = session(model).run(None, {"X": xq, "w_scale": np.ones(N, np.float32), "act_scale": np.ones(1, np.float32)})[0]
    np.testing.assert_array_equal(y, int_reference(xq, w).astype(np.float32))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("const_weight", [True, False])
def test_float_path_with_bias(bits, const_weight):
    rng = np.random.default_rng(7 + bits)
    B, S, K, N = 2, 19, 136, 72
    w, packed = _weights(rng, N, K, bits)
    w_scale = (rng.random(N) * 0.01 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    s = np.float32(0.025)
    x = (rng.standard_normal((B, S, K)) * 1.5).astype(np.float32)
    model = quant_linear_model(K, N, bits=bits, const_weight=const_weight, optional=("bias",), weight=packed)
    feeds = {"X": x, "w_scale": w_scale, "act_scale": np.array([s], np.float32), "bias": bias}
    if not const_weight:
        feeds["W"] = packed
    y = session(model).run(None, feeds)[0]
    assert y.shape == (B, S, N)
    xq = quantize(x.reshape(-1, K), s)
    ref = int_reference(xq, w) * (np.float64(s) * w_scale.astype(np.float64)) + bias
    np.testing.assert_allclose(y.reshape(-1, N), ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_float16_activations(bits):
    rng = np.random.default_rng(11)
    M, K, N = 33, 128, 48
    w, packed = _weights(rng, N, K, bits)
    w_scale = (rng.random(N) * 0.01 + 1e-3).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float16)
    s = np.float32(0.02)
    model = quant_linear_model(K, N, bits=bits, x_type=TensorProto.FLOAT16, weight=packed)
    y = session(model).run(None, {"X": x, "w_scale": w_scale, "act_scale": np.array([s], np.float32)})[0]
    assert y.dtype == np.float16
    xq = quantize(x.astype(np.float32), s)
    ref = (int_reference(xq, w) * (np.float64(s) * w_scale)).astype(np.float16)
    np.testing.assert_array_equal(y, ref)  # one fp32 -> fp16 rounding of a value exact to fp32 rounding


@pytest.mark.parametrize("form", ["modality_ids", "split"])
def test_per_modality_scales(form):
    """Two activation scales (text, image); the image tokens are chosen by modality_ids or by a split index."""
    rng = np.random.default_rng(3)
    B, S, K, N = 2, 12, 64, 32
    w, packed = _weights(rng, N, K, 8)
    w_scale = np.full(N, 0.01, np.float32)
    scales = np.array([0.01, 0.2], np.float32)  # text, image
    x = (rng.standard_normal((B, S, K)) * np.where(np.arange(S) < 5, 20.0, 1.0)[None, :, None]).astype(np.float32)
    if form == "modality_ids":
        ids = (rng.random((B, S)) < 0.4).astype(np.int64)
        feeds = {"modality_ids": ids}
    else:
        ids = np.broadcast_to((np.arange(S) < 5).astype(np.int64), (B, S))
        feeds = {"split": np.array([5], np.int64)}
    model = quant_linear_model(K, N, optional=(form,), weight=packed)
    y = session(model).run(None, {"X": x, "w_scale": w_scale, "act_scale": scales, **feeds})[0]
    s_tok = scales[ids.reshape(-1)]
    xq = _quantize_rows(x.reshape(-1, K), s_tok)
    ref = int_reference(xq, w) * (s_tok.astype(np.float64)[:, None] * w_scale)
    np.testing.assert_allclose(y.reshape(-1, N), ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n_scales", [3, 2])
def test_sink_class_scales(bits, n_scales):
    """Three activation scales (text, image, sink) chosen per token by class ids 0, 1, 2 (passes/sink_scales.py,
    lowered); any other id is text. A two-scale op reads id 2 as text, as before the third class existed."""
    rng = np.random.default_rng(11 + bits)
    B, S, K, N = 2, 9, 64, 48
    w, packed = _weights(rng, N, K, bits)
    w_scale = np.full(N, 0.01, np.float32)
    scales = np.array([0.01, 0.2, 12.0], np.float32)[:n_scales]  # text, image, sink
    ids = rng.integers(0, 2, size=(B, S)).astype(np.int64)
    ids[:, 0] = 2  # the sink row
    ids[1, 4] = 7  # not a class: text
    x = (rng.standard_normal((B, S, K)) * np.where(ids == 2, 300.0, np.where(ids == 1, 20.0, 1.0))[..., None]
         ).astype(np.float32)
    model = quant_linear_model(K, N, bits=bits, optional=("modality_ids",), weight=packed)
    y = session(model).run(None, {"X": x, "w_scale": w_scale, "act_scale": scales, "modality_ids": ids})[0]
    classes = np.where(ids.reshape(-1) < n_scales, ids.reshape(-1), 0)
    s_tok = scales[classes]
    xq = _quantize_rows(x.reshape(-1, K), s_tok)
    assert (n_scales == 3) == (np.abs(xq[0]).max() < 127)  # only the sink scale keeps row 0 unclipped
    ref = int_reference(xq, w) * (s_tok.astype(np.float64)[:, None] * w_scale)
    np.testing.assert_allclose(y.reshape(-1, N), ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def test_lowrank_branch_on_image_tokens_and_channel0_side_branch():
    rng = np.random.default_rng(5)
    S, K, N, r = 10, 64, 24, 4
    w, packed = _weights(rng, N, K, 8)
    w_scale = np.full(N, 0.01, np.float32)
    scales = np.array([0.05, 0.1], np.float32)
    x = rng.standard_normal((1, S, K + 1)).astype(np.float32)
    ids = np.array([[1, 1, 1, 0, 0, 0, 0, 1, 0, 0]], np.int64)
    la = rng.standard_normal((K, r)).astype(np.float32) * 0.1
    lb = rng.standard_normal((r, N)).astype(np.float32) * 0.1
    side = rng.standard_normal(N).astype(np.float32)
    model = quant_linear_model(K, N, optional=("modality_ids", "lowrank_a", "lowrank_b", "side_row"), weight=packed)
    feeds = {"X": x, "w_scale": w_scale, "act_scale": scales, "modality_ids": ids, "lowrank_a": la, "lowrank_b": lb,
             "side_row": side}
    y = session(model).run(None, feeds)[0].reshape(S, N)
    xs = x.reshape(S, K + 1).astype(np.float64)
    s_tok = scales[ids.reshape(-1)]
    xq = _quantize_rows(x.reshape(S, K + 1)[:, 1:], s_tok)
    ref = int_reference(xq, w) * (s_tok.astype(np.float64)[:, None] * w_scale)
    ref += (ids.reshape(-1, 1) == 1) * ((xs[:, 1:] @ la) @ lb)
    ref += xs[:, :1] * side
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("k_mismatch", "gives K=63 but W holds K=64"),
        ("bad_scale_len", "w_scale must have 32 entries"),
        ("four_scales", "act_scale must be float32 with 1 to 3 entries"),
        ("ids_len", "modality_ids [1, 3] has 3 entries"),
    ],
)
def test_clear_errors(change, message):
    rng = np.random.default_rng(0)
    K, N = 64, 32
    _w, packed = _weights(rng, N, K, 8)
    model = quant_linear_model(K, N, optional=("modality_ids",), weight=packed)
    feeds = {"X": rng.standard_normal((1, 4, K)).astype(np.float32), "w_scale": np.ones(N, np.float32),
             "act_scale": np.ones(1, np.float32), "modality_ids": np.zeros((1, 4), np.int64)}
    if change == "k_mismatch":
        feeds["X"] = feeds["X"][..., :63].copy()
    elif change == "bad_scale_len":
        feeds["w_scale"] = np.ones(N - 1, np.float32)
    elif change == "four_scales":
        feeds["act_scale"] = np.ones(4, np.float32)
    elif change == "ids_len":
        feeds["modality_ids"] = np.zeros((1, 3), np.int64)
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        session(model).run(None, feeds)


def test_bad_bits_attribute_fails_at_session_creation():
    rng = np.random.default_rng(0)
    _, packed = _weights(rng, 16, 32, 8)
    model = quant_linear_model(32, 16, bits=3, weight=packed)
    with pytest.raises(Exception, match="bits must be 8 or 4"):
        session(model)


def test_int4_weight_must_be_uint8():
    rng = np.random.default_rng(0)
    w, _ = _weights(rng, 16, 32, 8)
    model = quant_linear_model(32, 16, bits=4, weight=w)
    with pytest.raises(Exception, match="bits=4 needs a uint8 W"):
        session(model)


ISA_SCRIPT = Path(__file__).with_name("rtops_isa_check.py")


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512vnni"])
def test_every_cpu_kernel_variant(isa):
    """The portable, AVX2 and AVX512-VNNI kernels (the variant is fixed per process) give identical results."""
    env = {**os.environ, "MQC_CPU_ISA": isa}
    out = subprocess.run([sys.executable, str(ISA_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("side", [False, True])
def test_int4_odd_k_with_pad_nibble(M, side):
    """K = 127 (the RMS split leaves 2^k - 1 quantized channels): W4 rows end with one zero pad nibble."""
    rng = np.random.default_rng(M + side)
    K, N = 127, 40
    w = rng.integers(-8, 8, size=(N, K)).astype(np.int8)
    packed = pack_int4(np.hstack([w, np.zeros((N, 1), np.int8)]))
    optional = ("side_row",) if side else ()
    model = quant_linear_model(K, N, bits=4, optional=optional, weight=packed)
    x = rng.standard_normal((M, K + side)).astype(np.float32)
    s = np.float32(0.02)
    feeds = {"X": x, "w_scale": np.ones(N, np.float32), "act_scale": np.array([s])}
    row = rng.standard_normal(N).astype(np.float32)
    if side:
        feeds["side_row"] = row
    y = session(model).run(None, feeds)[0]
    ref = int_reference(quantize(x[:, int(side):], s), w) * np.float64(s)
    if side:
        ref = ref + x[:, :1].astype(np.float64) * row
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
