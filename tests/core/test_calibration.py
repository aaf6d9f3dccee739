import numpy as np
import onnx_ir as ir
import pytest
from mqc.passes.canonicalize import FuseNormsPass

from mqc.calibration import (
    HIST_BINS,
    IMAGE,
    TEXT,
    Calibrator,
    TensorStats,
    check_feed,
    load_feeds,
    random_feeds,
)
from mqc.errors import CalibrationError
from mqc.ir import load_model
from mqc.model_map import build_model_map


def test_histogram_growth_keeps_counts_exact():
    rng = np.random.default_rng(0)
    stats = TensorStats(channels=8)
    chunks = [rng.standard_normal((50, 8)) * s for s in (0.1, 1.0, 30.0)]
    for chunk in chunks:
        stats.update(chunk)
    everything = np.abs(np.concatenate(chunks))
    assert stats.rows == 150
    assert stats.hist.sum() == everything.size
    assert stats.absmax == pytest.approx(everything.max())
    np.testing.assert_allclose(stats.channel_absmax, everything.max(axis=0), rtol=1e-6)
    expected, _ = np.histogram(everything, bins=HIST_BINS, range=(0, stats.hist_range))
    # bin edges differ after doubling, so compare coarse cumulative mass
    assert abs(np.cumsum(stats.hist)[HIST_BINS // 4] - np.cumsum(expected)[HIST_BINS // 4]) <= 150


def test_clip_methods_order_and_outlier_handling():
    rng = np.random.default_rng(1)
    stats = TensorStats(channels=4)
    x = rng.standard_normal((20000, 4))
    x[0, 0] = 80.0  # one massive outlier
    stats.update(x)
    minmax = stats.clip_value("minmax")
    assert minmax == pytest.approx(80.0)
    assert stats.clip_value("percentile", percentile=99.9) < 10.0
    mse = stats.clip_value("mse")
    assert mse < minmax


def test_reservoir_and_memory_are_bounded():
    stats = TensorStats(channels=16, sample_rows=32)
    for _ in range(50):
        stats.update(np.random.default_rng(0).standard_normal((100, 16)))
    assert stats.sample.shape == (32, 16)
    assert stats.rows == 5000


def test_merged_stats_equal_union():
    rng = np.random.default_rng(3)
    a, b = TensorStats(4), TensorStats(4)
    xa, xb = rng.standard_normal((100, 4)), rng.standard_normal((100, 4)) * 5
    a.update(xa)
    b.update(xb)
    merged = a.merged(b)
    assert merged.rows == 200
    assert merged.absmax == pytest.approx(max(np.abs(xa).max(), np.abs(xb).max()))
    assert merged.hist.sum() == 800


def test_calibrator_splits_statistics_by_modality(llama_decoder):
    model = load_model(llama_decoder)
    FuseNormsPass()(model)
    linears = build_model_map(model).linears
    tap = linears[0].input.name
    feeds = random_feeds(model, 4)
    stats = Calibrator(model, [tap]).run(feeds)[tap]
    assert set(stats.by_modality) == {TEXT, IMAGE}
    # the same value computed by running the model with it exposed as an output
    image_rows = sum(int((f["modality_ids"] == IMAGE).sum()) for f in feeds)
    assert stats.by_modality[IMAGE].rows == image_rows
    assert stats.by_modality[TEXT].rows == sum(f["modality_ids"].size for f in feeds) - image_rows
    assert len(model.graph.outputs) == len(ir.load(llama_decoder).graph.outputs), "tap outputs must be removed again"


def test_feed_validation_names_the_problem(llama_decoder, tmp_path):
    model = load_model(llama_decoder)
    feed = random_feeds(model, 1)[0]
    good = {k: v for k, v in feed.items() if "past" not in k}
    assert "past_key_values.0.key" in check_feed(good, model, "x")  # past is filled in for prefill
    with pytest.raises(CalibrationError, match="not inputs of the model"):
        check_feed({**good, "pixel_values": np.zeros(3, np.float32)}, model, "x")
    with pytest.raises(CalibrationError, match=r"inputs_embeds.*float64"):
        check_feed({**good, "inputs_embeds": good["inputs_embeds"].astype(np.float64)}, model, "x")
    with pytest.raises(CalibrationError, match="lacks model input 'position_ids'"):
        check_feed({k: v for k, v in good.items() if k != "position_ids"}, model, "x")
    np.savez(tmp_path / "s0.npz", **good)
    assert len(load_feeds(tmp_path, model)) == 1
    with pytest.raises(CalibrationError, match="calibration data not found"):
        load_feeds(tmp_path / "missing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"no \.npz"):
        load_feeds(tmp_path / "empty", model)
