"""ai.mqc::QuantLinear with per-group weight scales (group_size > 0) on the CPU against numpy: each group's int32
dot product exact, the fp32 sum over the groups within its rounding bound, with every activation-scale form."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from rtops_models import pack_int4, quant_linear_model, quantize, session

# (M, K, N, group_size): decode rows (M = 1, the W4 one-row kernel), odd row counts, N tails of a 16-column panel
# and of a 4-panel block, M >= 16 (W4 prefill unpacks its tiles to int8), the tiny VLM's decoder shapes.
SHAPES = [(1, 128, 17, 32), (5, 192, 70, 64), (37, 576, 200, 64), (20, 256, 130, 128), (1, 1536, 192, 128),
          (3, 576, 1536, 64)]


def _weights(rng, N, K, bits):
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    w = rng.integers(lo, hi, size=(N, K)).astype(np.int8)
    return w, (w if bits == 8 else pack_int4(w))


def group_accumulators(xq: np.ndarray, w: np.ndarray, group_size: int) -> np.ndarray:
    """[G, M, N] exact int64 dot products of each group of group_size input channels."""
    K = xq.shape[1]
    return np.stack([xq[:, k:k + group_size].astype(np.int64) @ w[:, k:k + group_size].astype(np.int64).T
                     for k in range(0, K, group_size)])


def grouped_reference(xq, w, w_scale, s_tok, group_size, bias=None) -> tuple[np.ndarray, np.ndarray]:
    """(Y in float64, its fp32 rounding bound): Y = s_tok * sum_g acc_g * w_scale[g] + bias. The op rounds each
    product and each partial sum over G groups once, then the scaling and the bias: (G + 3) ulp of the magnitude."""
    acc = group_accumulators(xq, w, group_size).astype(np.float64)
    terms = acc * w_scale.astype(np.float64)[:, None, :]
    s = np.asarray(s_tok, np.float64).reshape(-1, 1)
    b = 0.0 if bias is None else bias.astype(np.float64)
    y = terms.sum(axis=0) * s + b
    bound = (acc.shape[0] + 3) * 2.0**-24 * (np.abs(terms).sum(axis=0) * s + np.abs(b)) + 1e-30
    return y, bound


def _assert_within(y, ref, bound):
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("M", "K", "N", "gs"), SHAPES)
def test_each_group_dot_product_is_exact(bits, M, K, N, gs):
    """int8 X, act_scale 1 and a one-hot w_scale row: Y is group j's int32 accumulator itself, for every j."""
    rng = np.random.default_rng(M * 1000 + K + N + gs + bits)
    w, packed = _weights(rng, N, K, bits)
    run = session(quant_linear_model(K, N, bits=bits, x_type=TensorProto.INT8, weight=packed, group_size=gs)).run
    xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
    acc = group_accumulators(xq, w, gs)
    groups = K // gs
    for j in sorted({0, groups // 2, groups - 1}):
        one_hot = np.zeros((groups, N), np.float32)
        one_hot[j] = 1.0
        y = run(None, {"X": xq, "w_scale": one_hot, "act_scale": np.ones(1, np.float32)})[0]
        np.testing.assert_array_equal(y, acc[j].astype(np.float32), err_msg=f"group {j}")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("M", "K", "N", "gs"), SHAPES)
def test_float_path_with_bias_within_rounding(bits, M, K, N, gs):
    """Float X, one static scale, random per-group scales and a bias against float64 numpy."""
    rng = np.random.default_rng(M + K + N + gs + bits)
    w, packed = _weights(rng, N, K, bits)
    model = quant_linear_model(K, N, bits=bits, optional=("bias",), weight=packed, group_size=gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ws = (rng.random((K // gs, N)) * 0.02 + 0.001).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    s = np.float32(0.025)
    y = session(model).run(None, {"X": x, "w_scale": ws, "act_scale": np.array([s]), "bias": bias})[0]
    _assert_within(y, *grouped_reference(quantize(x, s), w, ws, np.full(M, s), gs, bias))


def _token_codes(x: np.ndarray, s_tok: np.ndarray) -> np.ndarray:
    return np.stack([quantize(row, s) for row, s in zip(x, s_tok, strict=True)])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("form", ["msq", "sink", "split", "dynamic"])
def test_activation_scale_forms_combine_with_groups(bits, form):
    """Per-modality (text, image), sink three-class, split-index and dynamic per-token scales pick s_tok exactly as
    with per-channel weights; only the weight side is per group."""
    rng = np.random.default_rng(7 + bits)
    B, S, K, N, gs = 2, 9, 192, 80, 64
    w, packed = _weights(rng, N, K, bits)
    x = (rng.standard_normal((B, S, K)) * 2).astype(np.float32)
    x[:, 0] *= 40  # an attention-sink row
    ws = (rng.random((K // gs, N)) * 0.02 + 0.001).astype(np.float32)
    scales = np.array([0.02, 0.05, 0.6], np.float32)
    feeds = {"X": x, "w_scale": ws}
    attrs, optional = {"group_size": gs}, ()
    if form == "dynamic":
        attrs["dynamic"] = 1
        feeds["act_scale"] = np.zeros(0, np.float32)
        absmax = np.abs(x.reshape(-1, K)).max(axis=1)
        s_tok = np.maximum(absmax / np.float32(127), np.float32(1e-12)).astype(np.float32)
    elif form == "split":
        optional = ("split",)
        feeds["act_scale"], feeds["split"] = scales[:2], np.array([4], np.int64)
        s_tok = np.where(np.arange(B * S) % S < 4, scales[1], scales[0])
    else:
        optional = ("modality_ids",)
        ids = rng.integers(0, 2, size=(B, S)).astype(np.int64)
        if form == "sink":
            ids[:, 0] = 2
        feeds["act_scale"] = scales if form == "sink" else scales[:2]
        feeds["modality_ids"] = ids
        s_tok = feeds["act_scale"][ids.reshape(-1)]
    model = quant_linear_model(K, N, bits=bits, optional=optional, weight=packed, **attrs)
    y = session(model).run(None, feeds)[0].reshape(B * S, N)
    xr = x.reshape(B * S, K)
    _assert_within(y, *grouped_reference(_token_codes(xr, s_tok), w, ws, s_tok, gs))


def test_lowrank_and_channel0_branches_add_to_the_grouped_product():
    """The CMC low-rank branch (image tokens) and the RMS channel-0 side row are added after the grouped product:
    K = Kx - 1 quantized channels, grouped."""
    rng = np.random.default_rng(3)
    M, K, N, gs, r = 6, 128, 48, 32, 4
    w, packed = _weights(rng, N, K, 4)
    model = quant_linear_model(K, N, bits=4, weight=packed, group_size=gs,
                               optional=("modality_ids", "lowrank_a", "lowrank_b", "side_row"))
    x = rng.standard_normal((M, K + 1)).astype(np.float32)
    ws = (rng.random((K // gs, N)) * 0.02 + 0.001).astype(np.float32)
    ids = np.array([1, 0, 1, 1, 0, 0], np.int64)
    la, lb = rng.standard_normal((K, r)).astype(np.float32), rng.standard_normal((r, N)).astype(np.float32)
    side = rng.standard_normal(N).astype(np.float32)
    s = np.float32(0.03)
    y = session(model).run(None, {"X": x, "w_scale": ws, "act_scale": np.array([s]), "modality_ids": ids,
                                  "lowrank_a": la, "lowrank_b": lb, "side_row": side})[0]
    ref, bound = grouped_reference(quantize(x[:, 1:], s), w, ws, np.full(M, s), gs)
    branch = (x[:, 1:].astype(np.float64) @ la @ lb) * (ids == 1)[:, None] + np.outer(x[:, 0], side)
    np.testing.assert_allclose(y, ref + branch, rtol=0, atol=1e-5 * np.abs(ref + branch).max() + bound.max())


@pytest.mark.parametrize("bits", [8, 4])
def test_computed_weight_is_packed_per_call_with_its_groups(bits):
    """A W that is not a constant initializer is packed on each call, with the per-group corrections."""
    rng = np.random.default_rng(5 + bits)
    M, K, N, gs = 18, 128, 40, 32
    w, packed = _weights(rng, N, K, bits)
    model = quant_linear_model(K, N, bits=bits, const_weight=False, group_size=gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ws = (rng.random((K // gs, N)) * 0.02 + 0.001).astype(np.float32)
    s = np.float32(0.02)
    y = session(model).run(None, {"X": x, "W": packed, "w_scale": ws, "act_scale": np.array([s])})[0]
    _assert_within(y, *grouped_reference(quantize(x, s), w, ws, np.full(M, s), gs))


def test_float16_activations_with_groups():
    """float16 X and Y: the same codes; the result rounds once more, to half precision."""
    rng = np.random.default_rng(11)
    M, K, N, gs = 5, 256, 64, 128
    w, packed = _weights(rng, N, K, 4)
    model = quant_linear_model(K, N, bits=4, x_type=TensorProto.FLOAT16, weight=packed, group_size=gs)
    x = rng.standard_normal((M, K)).astype(np.float16)
    ws = (rng.random((K // gs, N)) * 0.02 + 0.001).astype(np.float32)
    s = np.float32(0.03)
    y = session(model).run(None, {"X": x, "w_scale": ws, "act_scale": np.array([s])})[0]
    assert y.dtype == np.float16
    ref, _ = grouped_reference(quantize(x.astype(np.float32), s), w, ws, np.full(M, s), gs)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2**-10, atol=2**-24)
