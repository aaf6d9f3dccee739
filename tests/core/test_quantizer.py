import numpy as np
import pytest

from mqc.quantizer import fake_quantize, qrange, quantize, quantize_weight_rtn, scale_from_absmax, sqnr_db


def test_ranges_and_rounding_match_onnx_quantizelinear():
    assert qrange(8) == (-128, 127)
    assert qrange(4) == (-8, 7)
    # round half to even, as QuantizeLinear does
    np.testing.assert_array_equal(quantize(np.array([0.5, 1.5, 2.5, -0.5, 300.0, -300.0]), 1.0, 8), [0, 2, 2, 0, 127, -128])


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_rtn_error_bounded_by_half_step(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32) * rng.uniform(0.1, 3, size=32).astype(np.float32)
    qw = quantize_weight_rtn(w, bits)
    assert qw.scale.shape == (32,)
    assert qw.q.min() >= qrange(bits)[0] and qw.q.max() <= qrange(bits)[1]
    err = np.abs(qw.dequantize() - w)
    assert np.all(err <= qw.scale[None, :] / 2 + 1e-6)


def test_group_quantization_beats_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 16)).astype(np.float32)
    w[:32] *= 20.0  # one group of input rows with much larger magnitude
    per_channel = quantize_weight_rtn(w, 4).dequantize()
    grouped = quantize_weight_rtn(w, 4, group_size=32)
    assert grouped.scale.shape == (4, 16)
    # the small rows no longer share a scale with the large group
    assert sqnr_db(w[32:], grouped.dequantize()[32:]) > sqnr_db(w[32:], per_channel[32:]) + 12.0


def test_mse_clip_reduces_int4_error_on_heavy_tails():
    rng = np.random.default_rng(2)
    w = rng.standard_t(df=2, size=(256, 64)).astype(np.float32)
    plain = quantize_weight_rtn(w, 4).dequantize()
    clipped = quantize_weight_rtn(w, 4, mse_clip=True).dequantize()
    assert np.sum((clipped - w) ** 2) < 0.9 * np.sum((plain - w) ** 2)


def test_sqnr_definition():
    x = np.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0)
    scale = scale_from_absmax(1.0, 8)
    assert sqnr_db(np.linspace(-1, 1, 1001), fake_quantize(np.linspace(-1, 1, 1001), scale, 8)) > 40
