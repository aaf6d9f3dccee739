"""Compiling on Ray gives the single-process result bit for bit: calibration shards merge exactly, and a whole
compile through a local Ray cluster writes the same bytes."""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mqc.passes.canonicalize import FuseNormsPass

import mqc
from mqc.calibration import (
    HIST_BINS,
    IMAGE,
    TEXT,
    Calibrator,
    SampleTreeSum,
    TapStats,
    TensorStats,
    merge_shards,
)
from mqc.cli import main
from mqc.distributed import LocalExecutor
from mqc.ir import load_model
from mqc.model_map import build_model_map


def _canonical_sum(values: dict[int, np.ndarray], lo: int, hi: int) -> np.ndarray | None:
    """The fixed tree over sample indices, written out recursively: left + right, a lone child as it is."""
    if hi - lo == 1:
        return values.get(lo)
    mid = (lo + hi) // 2
    left, right = _canonical_sum(values, lo, mid), _canonical_sum(values, mid, hi)
    return right if left is None else left if right is None else left + right


def test_tree_sum_is_the_same_for_every_split_of_the_samples():
    """Float32 samples (a Gram product) are summed as their float64 widening; a sum adds into the matrices it owns
    in place, never into a shard's it merged."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        count = int(rng.integers(1, 40))
        present = [i for i in range(count) if rng.random() < rng.choice([0.3, 1.0])]
        dtype = rng.choice([np.float32, np.float64])
        values = {i: (rng.standard_normal(3) * 10.0 ** rng.integers(-8, 8, size=3)).astype(dtype) for i in present}
        widened = {i: v.astype(np.float64) for i, v in values.items()}
        expected = _canonical_sum(widened, 0, 1 << math.ceil(math.log2(count)) if count > 1 else 1)
        cuts = sorted({0, count, *rng.integers(0, count + 1, size=int(rng.integers(0, 5))).tolist()})
        shards = []
        for lo, hi in itertools.pairwise(cuts):
            shard = SampleTreeSum(lo)
            for i in present:
                if lo <= i < hi:
                    shard.add(i, values[i].copy())
            assert len(shard.blocks) <= 2 * math.log2(count + 1) + 2  # O(log n) matrices held per shard
            shards.append(shard)
        held = [[block[2].copy() for block in shard.blocks] for shard in shards]
        merged = shards[0]
        for shard in shards[1:]:
            merged = merged.merged(shard)
        total = merged.total()
        assert (expected is None and total is None) or (total.dtype == np.float64
                                                        and total.tobytes() == expected.tobytes())
        if len(shards) > 1:
            assert all(np.array_equal(block[2], before) for shard, kept in zip(shards, held, strict=True)
                       for block, before in zip(shard.blocks, kept, strict=True))
    with pytest.raises(ValueError, match="in order"):
        tree = SampleTreeSum()
        tree.add(3, np.ones(1))
        tree.add(2, np.ones(1))
    with pytest.raises(ValueError, match="partial sum"):
        SampleTreeSum(4).total()


def _same_stats(a: dict[str, TapStats], b: dict[str, TapStats]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert list(a[name].by_modality) == list(b[name].by_modality), name
        for modality, x in a[name].by_modality.items():
            y = b[name].by_modality[modality]
            assert (x.rows, x.absmax, x.hist_range) == (y.rows, y.absmax, y.hist_range)
            for field in ("channel_absmax", "hist", "sample", "sample_keys", "sample_origin"):
                assert getattr(x, field).tobytes() == getattr(y, field).tobytes(), (name, modality, field)
            assert (x.gram is None) == (y.gram is None)
            if x.gram is not None:
                assert x.gram.tobytes() == y.gram.tobytes(), (name, modality, "gram")


def test_shards_of_any_split_merge_to_the_single_pass_bit_for_bit(llama_decoder):
    model = load_model(llama_decoder)
    FuseNormsPass()(model)
    taps = list(dict.fromkeys(lin.input.name for lin in build_model_map(model).linears))[:3]
    feeds = mqc.calibration.random_feeds(model, 7)  # image rows in odd samples only: IMAGE first in sample 1
    calibrator = Calibrator(model, taps, gram_taps=taps[:2], sample_rows=24)  # 16 rows a sample: the reservoir fills
    single = calibrator.run(feeds)
    assert set(single[taps[0]].by_modality) == {TEXT, IMAGE} and single[taps[0]].by_modality[TEXT].rows > 24
    for cuts in [(0, 7), (0, 1, 7), (0, 3, 4, 7), (0, 2, 4, 6, 7), tuple(range(8))]:
        shards = [calibrator.run(feeds[lo:hi], first_sample=lo) for lo, hi in itertools.pairwise(cuts)]
        _same_stats(single, merge_shards(shards))


def test_statistics_are_exact():
    rng = np.random.default_rng(5)
    stats = TensorStats(channels=8, sample_rows=16)
    chunks = [rng.standard_normal((40, 8)).astype(np.float32) * s for s in (0.0, 0.1, 30.0, 1.0)]
    for chunk in chunks:
        stats.update(chunk)
    everything = np.abs(np.concatenate(chunks))
    assert stats.hist_range > everything.max() >= stats.hist_range / 2  # the power of two above the maximum
    expected, _ = np.histogram(everything, bins=HIST_BINS, range=(0.0, stats.hist_range))
    assert np.array_equal(stats.hist, expected)  # zeros of the first chunk included, no bin moved by doubling
    keys = np.concatenate([mqc.calibration.row_keys(i, 40) for i in range(4)])
    assert np.array_equal(stats.sample, np.concatenate(chunks)[np.sort(np.argsort(keys)[:16])])


def _thread_and_square(value: int) -> tuple[str, int]:
    return threading.current_thread().name, value * value


def test_local_jobs_run_on_threads_as_far_as_their_memory_allows():
    jobs = [(value,) for value in range(12)]
    executor = LocalExecutor(threads=2, memory_budget=100)
    side_by_side = executor.map(_thread_and_square, jobs, job_bytes=[50] * 12)
    assert [square for _, square in side_by_side] == [v * v for v in range(12)]  # in job order
    assert all(name.startswith("mqc-map") for name, _ in side_by_side)
    one_at_a_time = executor.map(_thread_and_square, jobs, job_bytes=[50] * 11 + [60])  # two do not fit
    assert {name for name, _ in one_at_a_time} == {threading.current_thread().name}
    assert [square for _, square in one_at_a_time] == [v * v for v in range(12)]


def test_ray_workers_need_an_address(llama_decoder, tmp_path, monkeypatch):
    monkeypatch.delenv("MQC_RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["compile", str(llama_decoder), "-o", str(tmp_path / "x.onnx"),
                                       "--ray-workers", "2"])
    assert result.exit_code == 2 and "--ray-workers needs --ray" in result.output
    assert not (tmp_path / "x.onnx").exists()


def _counted(run, calls: dict[str, int], method: str):
    def counted(*args, **kwargs):
        calls[method] += 1
        return run(*args, **kwargs)
    return counted


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.slow
def test_compile_on_a_local_ray_cluster_writes_the_same_bytes(tiny_decoder, tmp_path):
    """mquant (calibration, RMS, GPTQ W4 with per-modality scales, AIFS) in one process and on 2 Ray workers."""
    pytest.importorskip("ray", reason="the distributed extra (pip install 'mqc[distributed]') is not installed")
    from mqc.distributed import RayExecutor

    source = tiny_decoder("llama")
    (tmp_path / "single").mkdir()
    (tmp_path / "ray").mkdir()
    single = mqc.compile(source, tmp_path / "single" / "model.onnx", "mquant", num_samples=6)
    with RayExecutor("local", workers=2) as executor:
        calls = {"calibrate": 0, "map": 0}
        for method in calls:
            setattr(executor, method, _counted(getattr(executor, method), calls, method))
        spread = mqc.compile(source, tmp_path / "ray" / "model.onnx", "mquant", num_samples=6, executor=executor)
    assert calls == {"calibrate": 2, "map": 1}  # rms_split's and GPTQ's calibration, GPTQ's one group of linears
    assert [p.name for p in spread.passes] == [p.name for p in single.passes]
    single_files, ray_files = _files(tmp_path / "single"), _files(tmp_path / "ray")
    assert list(single_files) == list(ray_files) and len(single_files) == 2  # model.onnx and its external data
    for name, data in single_files.items():
        assert ray_files[name] == data, name
