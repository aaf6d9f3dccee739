"""Calibration: run the float model in onnxruntime and stream statistics of the values to be quantized.

The model is augmented with the tapped values as extra graph outputs and only those are requested from each run,
so logits and KV-cache outputs are never kept. Every statistic is streaming (running maxima, a histogram that
doubles its range when needed, a fixed-size reservoir of rows, optional Gram matrices), so memory is bounded by
the number of taps, not by the size of the calibration set (a Gram matrix's sum holds O(log samples) matrices:
:meth:`SampleTreeSum.most_held`).

Statistics are kept per modality. Each token row carries a modality id (0 text, 1 image) taken from the decoder's
``modality_ids`` input; a graph without that input (a vision encoder) sees only ``default_modality``.

Every statistic is a function of the calibration samples, not of the order in which one process met them, so the
samples can be split into contiguous shards (``mqc.distributed``) and the shards' statistics merged
(:func:`merge_shards`) to the same bits as one pass over all of them: maxima are exact; the histogram's range is
the smallest power of two above every magnitude, so doubling it merges bin pairs exactly; the reservoir keeps the
rows with the smallest keys, each key drawn from (sample index, row); Gram matrices are summed over a fixed binary
tree of sample indices (:class:`SampleTreeSum`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mqc.calibration_service import CalibrationService, tapped_session
from mqc.errors import CalibrationError
from mqc.quantizer import qrange
from mqc.threads import available_cpus, map_in_threads

TEXT, IMAGE = 0, 1
MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}
MODALITY_INPUT = "modality_ids"
HIST_BINS = 2048
#: Largest unpacked size of one calibration sample (.npz), in bytes.
MAX_SAMPLE_BYTES = 4 << 30
#: Largest calibration magnitude: the square root of float32's maximum, so squared statistics stay finite.
MAX_MAGNITUDE = float(np.sqrt(np.finfo(np.float32).max))
#: Largest synthetic input (elements) built when no calibration data is given: 256 Mi float32 values.
MAX_SYNTHETIC_ELEMENTS = 1 << 28
#: Seed of the reservoir's row keys (with the sample index).
RESERVOIR_SEED = 0

FeedSource = Callable[[], Iterable[dict[str, np.ndarray]]]


class SampleTreeSum:
    """The sum of per-sample float64 matrices, added over a fixed binary tree of sample indices.

    Floating-point addition is not associative, so a running sum would depend on where a sharded calibration split
    the samples. Here node (level, j) covers samples [j·2^level, (j+1)·2^level) and its value is left + right (with
    a child that saw no sample: the other child unchanged); the sum is the root's value. A shard holds the nodes it
    completed (O(log n) matrices); shards of any contiguous split merge (:meth:`merged`) to the same bits as one
    pass over all samples.

    Matrices handed to :meth:`add` (float32 or float64: a float32 value is summed as its exact float64 widening)
    become the sum's own, and a node it formed itself is summed into in place: the same bits as ``left + right``
    without a new matrix per node or a float64 copy per sample. Values that came from :meth:`of` or another shard
    are never written to.
    """

    def __init__(self, start: int = 0) -> None:
        """``start``: the first sample index this sum can see; nodes reaching below it belong to an earlier shard."""
        self.start = start
        self.end = start  # every sample before this one was added or is absent
        self.blocks: list[tuple[int, int, np.ndarray]] = []  # completed nodes (level, j, value), in sample order
        self._owned: set[int] = set()  # ids of the values in ``blocks`` this sum may overwrite

    def __getstate__(self) -> dict:
        """A copy (another process's shard, a deep copy) owns nothing: its values may be shared."""
        return {**self.__dict__, "_owned": set()}

    @classmethod
    def of(cls, value: np.ndarray) -> SampleTreeSum:
        """A sum already resolved to ``value``."""
        out = cls()
        out.blocks = [(0, 0, value)]
        out.end = math.inf
        return out

    @staticmethod
    def most_held(samples: int) -> int:
        """The most matrices a sum over ``samples`` samples holds at once: the completed nodes before a sample (at
        most one per bit of its index), that sample's matrix and one sum of two nodes being formed."""
        return max(samples - 1, 0).bit_length() + 2

    def add(self, sample: int, value: np.ndarray) -> None:
        if sample < self.end:
            raise ValueError(f"sample {sample} comes after sample {self.end - 1}: samples are added in order")
        self._owned.add(id(value))
        self._push((0, sample, value))

    def _push(self, block: tuple[int, int, np.ndarray]) -> None:
        level, index, _ = block
        self._collapse(index << level)
        self.blocks.append(block)
        self.end = (index + 1) << level
        self._collapse(self.end)

    def _collapse(self, frontier: float) -> None:
        """Complete the nodes above the last block whose samples before ``frontier`` have all been seen."""
        while self.blocks:
            level, index, value = self.blocks[-1]
            parent_lo = (index >> 1) << (level + 1)
            if index & 1:  # a right child: its left sibling is the block before, or absent
                left = self.blocks[-2] if len(self.blocks) > 1 else None
                if left is not None and left[:2] == (level, index - 1):
                    self.blocks[-2:] = [(level + 1, index >> 1, self._sum(left[2], value))]
                elif parent_lo >= self.start and (left is None or (left[1] + 1) << left[0] <= parent_lo):
                    self.blocks[-1] = (level + 1, index >> 1, value)
                else:  # the sibling reaches into an earlier shard
                    return
            elif parent_lo + (2 << level) <= frontier and (index or frontier != math.inf):
                self.blocks[-1] = (level + 1, index >> 1, value)  # a left child whose right sibling is absent
            else:
                return

    def _sum(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """left + right in float64, into ``left`` when the sum owns it; neither operand is held afterwards."""
        self._owned.discard(id(right))
        if id(left) in self._owned and left.dtype == np.float64:
            return np.add(left, right, out=left)
        self._owned.discard(id(left))
        total = np.add(left, right, dtype=np.float64)
        self._owned.add(id(total))
        return total

    def merged(self, later: SampleTreeSum) -> SampleTreeSum:
        """This shard's sum followed by the next contiguous shard's."""
        out = SampleTreeSum(self.start)
        for block in [*self.blocks, *later.blocks]:
            out._push(block)
        out.end = max(self.end, later.end)
        return out

    def total(self) -> np.ndarray | None:
        """The root's value (None when no sample was added); the sum is complete from here on."""
        if self.start != 0:
            raise ValueError("a shard's partial sum has no total: merge it with the shards before it")
        while len(self.blocks) > 1:
            count = len(self.blocks)
            self._collapse(math.inf)
            if len(self.blocks) == count:
                raise AssertionError("sample tree sum cannot complete its root")
        self.end = math.inf
        if not self.blocks:
            return None
        level, index, value = self.blocks[0]
        if value.dtype != np.float64:  # a single sample's float32 product
            self.blocks[0] = (level, index, value.astype(np.float64))
        return self.blocks[0][2]


@dataclass
class TensorStats:
    """Streaming statistics of one tapped value for one modality, over rows of its last axis."""

    channels: int
    sample_rows: int = 64
    rows: int = 0
    absmax: float = 0.0
    channel_absmax: np.ndarray = field(init=False)
    hist: np.ndarray = field(init=False)
    hist_range: float = 0.0
    sample: np.ndarray = field(init=False)
    #: Each kept row's key and (sample index, row): the reservoir keeps the smallest keys, in sample order.
    sample_keys: np.ndarray = field(init=False, repr=False)
    sample_origin: np.ndarray = field(init=False, repr=False)
    gram_sum: SampleTreeSum | None = field(default=None, repr=False)
    _updates: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.channel_absmax = np.zeros(self.channels, dtype=np.float32)
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)
        self.sample = np.zeros((0, self.channels), dtype=np.float32)
        self.sample_keys = np.zeros(0, dtype=np.float64)
        self.sample_origin = np.zeros((0, 2), dtype=np.int64)

    @property
    def gram(self) -> np.ndarray | None:
        """Σ xᵀx over the rows (float64), when tracked."""
        return None if self.gram_sum is None else self.gram_sum.total()

    @gram.setter
    def gram(self, value: np.ndarray | None) -> None:
        self.gram_sum = None if value is None else SampleTreeSum.of(value)

    def track_gram(self, first_sample: int = 0) -> None:
        if self.gram_sum is None:
            self.gram_sum = SampleTreeSum(first_sample)

    def update(self, rows: np.ndarray, sample: int | None = None, keys: np.ndarray | None = None,
               positions: np.ndarray | None = None) -> None:
        """Add the rows one calibration sample gave this value; ``keys`` (the reservoir's) and ``positions`` (the
        rows' places in the sample) default to ones drawn from the sample index (by default: the update count)."""
        sample = self._updates if sample is None else sample
        self._updates = sample + 1
        if rows.shape[0] == 0:
            return
        if keys is None:
            keys = row_keys(sample, rows.shape[0])
            positions = np.arange(rows.shape[0])
        rows = rows.astype(np.float32, copy=False)
        magnitude = np.abs(rows)
        self.channel_absmax = np.maximum(self.channel_absmax, magnitude.max(axis=0))
        batch_max = float(magnitude.max())
        self.absmax = max(self.absmax, batch_max)
        self._grow_histogram(batch_max)
        self.hist += _bin_counts(magnitude, self.hist_range)
        origin = np.stack([np.full(rows.shape[0], sample, np.int64), np.asarray(positions, np.int64)], axis=1)
        self._keep(rows, np.asarray(keys, np.float64), origin)
        if self.gram_sum is not None:  # one sample's product in fp32 (twice the BLAS rate), summed in fp64
            self.gram_sum.add(sample, rows.T @ rows)
        self.rows += rows.shape[0]

    def _grow_histogram(self, needed: float) -> None:
        """Keep the range the smallest power of two above ``needed``: bins are then half-open, and doubling the
        range merges bin pairs into the lower half with the counts a histogram at the new range would have."""
        if needed < self.hist_range or needed == 0.0:
            return
        target = math.ldexp(1.0, math.frexp(needed)[1])
        if self.hist_range == 0.0:  # only zeros so far: they stay in bin 0 at any range
            self.hist_range = target
            return
        while self.hist_range < target:
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(HIST_BINS // 2, np.int64)])
            self.hist_range *= 2.0

    def _keep(self, rows: np.ndarray, keys: np.ndarray, origin: np.ndarray) -> None:
        """Bottom-k reservoir: of all rows seen, the ``sample_rows`` with the smallest keys, in sample order."""
        sample = np.concatenate([self.sample, rows])
        sample_keys = np.concatenate([self.sample_keys, keys])
        sample_origin = np.concatenate([self.sample_origin, origin])
        if sample.shape[0] > self.sample_rows:
            kept = np.sort(np.lexsort((sample_origin[:, 1], sample_origin[:, 0], sample_keys))[: self.sample_rows])
            sample, sample_keys, sample_origin = sample[kept], sample_keys[kept], sample_origin[kept]
        self.sample, self.sample_keys, self.sample_origin = sample, sample_keys, sample_origin

    def absorb(self, later: TensorStats) -> None:
        """Add the statistics of a later contiguous shard of samples: the result is what one pass over both gives."""
        self.rows += later.rows
        self.absmax = max(self.absmax, later.absmax)
        self.channel_absmax = np.maximum(self.channel_absmax, later.channel_absmax)
        self._grow_histogram(later.absmax)
        self.hist = self.hist + _rebin(later, self.hist_range)
        self._keep(later.sample, later.sample_keys, later.sample_origin)
        self._updates = max(self._updates, later._updates)
        if self.gram_sum is not None and later.gram_sum is not None:
            self.gram_sum = self.gram_sum.merged(later.gram_sum)
        elif later.gram_sum is not None:
            self.gram_sum = later.gram_sum

    def merged(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of both row sets (used for one shared scale across modalities)."""
        out = TensorStats(self.channels, self.sample_rows)
        out.rows = self.rows + other.rows
        out.absmax = max(self.absmax, other.absmax)
        out.channel_absmax = np.maximum(self.channel_absmax, other.channel_absmax)
        out.hist_range = max(self.hist_range, other.hist_range)
        out.hist = _rebin(self, out.hist_range) + _rebin(other, out.hist_range)
        out.sample = np.concatenate([self.sample, other.sample])[: 2 * self.sample_rows]
        if self.gram is not None and other.gram is not None:
            out.gram = self.gram + other.gram
        return out

    def clip_value(self, method: str, bits: int = 8, percentile: float = 99.99) -> float:
        """The absolute clipping bound for a static symmetric scale: minmax, percentile or mse."""
        if self.rows == 0 or self.absmax == 0.0:
            return 0.0
        if method == "minmax":
            return self.absmax
        centers = (np.arange(HIST_BINS) + 0.5) * (self.hist_range / HIST_BINS)
        if method == "percentile":
            cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
            index = int(np.searchsorted(cdf, percentile / 100.0))
            return float(min(self.absmax, (index + 1) * self.hist_range / HIST_BINS))
        if method == "mse":
            return _mse_optimal_clip(self.hist, centers, self.absmax, bits)
        raise ValueError(f"unknown activation calibration method {method!r}")


def row_keys(sample: int, count: int) -> np.ndarray:
    """The reservoir keys of the ``count`` rows of one calibration sample: uniform in [0, 1), from the index alone."""
    return np.random.default_rng((RESERVOIR_SEED, sample)).random(count)


def _bin_counts(magnitude: np.ndarray, hist_range: float) -> np.ndarray:
    """Counts of ``magnitude`` (all below ``hist_range``) in HIST_BINS equal bins; the bin index is exact because the
    range is a power of two. With range 0 every value is 0."""
    if hist_range == 0.0:
        counts = np.zeros(HIST_BINS, np.int64)
        counts[0] = magnitude.size
        return counts
    bins = (magnitude.astype(np.float64) * (HIST_BINS / hist_range)).astype(np.int64)
    return np.bincount(bins.reshape(-1), minlength=HIST_BINS)


def _rebin(stats: TensorStats, target_range: float) -> np.ndarray:
    if stats.hist_range == 0.0:  # zeros only, in bin 0 at any range
        return stats.hist
    hist = stats.hist
    current = stats.hist_range
    while current < target_range:
        hist = np.concatenate([hist.reshape(-1, 2).sum(axis=1), np.zeros(HIST_BINS // 2, np.int64)])
        current *= 2.0
    return hist


def _mse_optimal_clip(hist: np.ndarray, centers: np.ndarray, absmax: float, bits: int, steps: int = 100) -> float:
    """Clip bound minimising the expected squared error of rounding plus clipping, from the |x| histogram."""
    qmax = qrange(bits)[1]
    best_clip, best_err = absmax, np.inf
    for step in range(steps):
        clip = absmax * (1.0 - 0.7 * step / steps)
        scale = clip / qmax
        dequant = np.minimum(np.rint(centers / scale), qmax) * scale
        err = float(np.sum(hist * (centers - dequant) ** 2))
        if err < best_err:
            best_clip, best_err = clip, err
    return float(best_clip)


@dataclass
class TapStats:
    """Per-modality statistics of one tapped value."""

    name: str
    by_modality: dict[int, TensorStats]

    def combined(self) -> TensorStats:
        stats = list(self.by_modality.values())
        out = stats[0]
        for other in stats[1:]:
            out = out.merged(other)
        return out

    def modality(self, modality: int) -> TensorStats | None:
        stats = self.by_modality.get(modality)
        return stats if stats is not None and stats.rows > 0 else None


def _row_modalities(feed: dict[str, np.ndarray], rows_shape: tuple[int, ...], default: int) -> np.ndarray:
    ids = feed.get(MODALITY_INPUT)
    if ids is not None and tuple(ids.shape) == tuple(rows_shape):
        return ids.reshape(-1).astype(np.int64)
    return np.full(int(np.prod(rows_shape)), default, dtype=np.int64)


class Calibrator:
    """Runs a model over feeds and collects :class:`TapStats` for the named values."""

    def __init__(
        self,
        model: ir.Model,
        taps: Sequence[str],
        default_modality: int = TEXT,
        gram_taps: Sequence[str] = (),
        providers: Sequence[str] = ("CPUExecutionProvider",),
        sample_rows: int = 64,
        service: CalibrationService | None = None,
        threads: int | None = None,
    ) -> None:
        """``sample_rows``: size of each per-modality row reservoir (:class:`TensorStats`); passes that learn from
        calibration rows (MAS) ask for more than the default 64. ``service``: the compile's session cache
        (:mod:`mqc.calibration_service`); without it each run builds its own session. ``threads``: how many taps'
        statistics are updated side by side (default: the CPUs this process may use)."""
        self.threads = threads or available_cpus()
        self.model = model
        self.sample_rows = sample_rows
        self.taps = list(dict.fromkeys(taps))
        self.gram_taps = set(gram_taps)
        self.default_modality = default_modality
        self.providers = list(providers)
        self.service = service

    def run(self, feeds: Iterable[dict[str, np.ndarray]], progress: Callable[[], None] | None = None,
            first_sample: int = 0) -> dict[str, TapStats]:
        """Statistics of the taps over ``feeds``, whose first is calibration sample number ``first_sample`` (a shard
        of the samples starts later; :func:`merge_shards` joins the shards' statistics)."""
        stats: dict[str, TapStats] = {}
        runs = (self.service.run(self.model, self.taps, feeds) if self.service is not None
                else capture(self.model, self.taps, feeds, self.providers))
        for sample, (feed, outputs) in enumerate(runs, first_sample):
            self.accumulate(stats, feed, outputs, sample, first_sample)
            if progress is not None:
                progress()
        return stats

    def accumulate(self, stats: dict[str, TapStats], feed: dict[str, np.ndarray], outputs: Sequence[np.ndarray],
                   sample: int, first_sample: int = 0) -> None:
        """Add calibration sample number ``sample`` (its tapped values, in the order of ``self.taps``) to ``stats``;
        for callers that run the graph themselves (a streamed compile's block sessions)."""
        keys: dict[int, np.ndarray] = {}
        jobs = []
        for name, array in zip(self.taps, outputs, strict=True):
            if array.ndim == 0:
                continue
            count = int(np.prod(array.shape[:-1]))
            if count not in keys:
                keys[count] = row_keys(sample, count)
            tap = stats.setdefault(name, TapStats(name, {}))
            jobs.append((tap, array, feed, sample, keys[count], first_sample))
        # taps are independent: each one's statistics see their samples in order
        map_in_threads(lambda job: self._accumulate(*job), jobs, self.threads, "mqc-calibrate")

    def _accumulate(self, tap: TapStats, array: np.ndarray, feed: dict[str, np.ndarray], sample: int,
                    keys: np.ndarray, first_sample: int) -> None:
        name = tap.name
        if np.issubdtype(array.dtype, np.floating) and not float(np.max(np.abs(array), initial=0.0)) <= MAX_MAGNITUDE:
            raise CalibrationError(f"calibration values of {name!r} are NaN, Inf or beyond {MAX_MAGNITUDE:.2g}: the "
                                   "calibration inputs overflow this model")
        channels = array.shape[-1]
        rows = array.reshape(-1, channels)
        modalities = _row_modalities(feed, array.shape[:-1], self.default_modality)
        for modality in np.unique(modalities):
            entry = tap.by_modality.get(int(modality))
            if entry is None:
                entry = tap.by_modality[int(modality)] = TensorStats(channels, self.sample_rows)
                if name in self.gram_taps:
                    entry.track_gram(first_sample)
            positions = np.flatnonzero(modalities == modality)
            entry.update(rows[positions], sample, keys[positions], positions)


def merge_shards(shards: Sequence[dict[str, TapStats]]) -> dict[str, TapStats]:
    """The statistics of every shard of the calibration samples (contiguous, in sample order, the first from sample
    0) joined into those of one pass over all of them, bit for bit (module docstring); the shards' entries are
    reused. Taps and modalities keep the order of their first appearance, as one pass would have them."""
    merged: dict[str, TapStats] = {}
    for shard in shards:
        for name, tap in shard.items():
            into = merged.setdefault(name, TapStats(name, {}))
            for modality, entry in tap.by_modality.items():
                if modality in into.by_modality:
                    into.by_modality[modality].absorb(entry)
                    continue
                if entry.gram_sum is not None:  # first seen in a later shard: the samples before it had no rows
                    entry.gram_sum = SampleTreeSum().merged(entry.gram_sum)
                into.by_modality[modality] = entry
    return merged


def capture(
    model: ir.Model, taps: Sequence[str], feeds: Iterable[dict[str, np.ndarray]],
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """Run ``model`` on each feed and yield (feed, the values of ``taps``); the taps are extra graph outputs only
    while the session is built, so ``model`` is left as it was."""
    session = tapped_session(model, taps, providers)
    input_names = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield feed, session.run(list(taps), {k: v for k, v in feed.items() if k in input_names})


# ---------------------------------------------------------------------------------------------- calibration data


def _dim(dim: object, default: int) -> int:
    return dim if isinstance(dim, int) else default


def random_feeds(model: ir.Model, num_samples: int, seed: int = 0, seq_len: int = 16) -> list[dict[str, np.ndarray]]:
    """Synthetic feeds built from the graph's inputs, for graphs that come without calibration data.

    Naming conventions of exported decoders are honoured: ``attention_mask`` is all ones over past + sequence,
    ``position_ids`` count from 0, past key/value inputs are empty, ``modality_ids`` marks the first half of the
    sequence as image tokens in every other sample, and integer ``input_ids`` stay below the embedding table size.
    """
    rng = np.random.default_rng(seed)
    vocab = _embedding_rows(model)
    feeds = []
    for index in range(num_samples):
        feed: dict[str, np.ndarray] = {}
        for value in model.graph.inputs:
            name = value.name or ""
            dims = list(value.shape.dims) if value.shape is not None else []
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            if "past" in name and len(dims) == 4:
                shape = (_dim(dims[0], 1), _dim(dims[1], 1), 0, _dim(dims[3], 1))
                feed[name] = np.zeros(shape, dtype=dtype)
                continue
            shape = tuple(_dim(d, 1 if i == 0 else seq_len) for i, d in enumerate(dims))
            if int(np.prod(shape, dtype=np.float64)) > MAX_SYNTHETIC_ELEMENTS:
                raise CalibrationError(f"input {name!r} of shape {list(shape)} is too large for synthetic "
                                       "calibration data; give samples with --calib")
            if name == "attention_mask":
                feed[name] = np.ones(shape, dtype=dtype)
            elif name == "position_ids":
                feed[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            elif name == MODALITY_INPUT:
                ids = np.zeros(shape, dtype=dtype)
                if index % 2 == 1:
                    ids[..., : shape[-1] // 2] = IMAGE
                feed[name] = ids
            elif np.issubdtype(dtype, np.integer):
                feed[name] = rng.integers(0, vocab or 2, size=shape).astype(dtype)
            elif dtype == np.bool_:
                feed[name] = np.ones(shape, dtype=np.bool_)
            else:
                feed[name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _embedding_rows(model: ir.Model) -> int | None:
    for node in model.graph:
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            return int(node.inputs[0].shape[0])
    return None


def _npz_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.npz") if p.is_file())
        if not files:
            raise CalibrationError(f"no .npz calibration samples in {path}")
        return files
    if path.is_file():
        return [path]
    raise CalibrationError(f"calibration data not found: {path}")


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as archive:
            if not hasattr(archive, "zip"):
                raise CalibrationError(f"calibration sample {file} is not an .npz archive")
            strays = [name for name in archive.zip.namelist() if not name.endswith(".npy")]
            if strays:
                raise CalibrationError(f"calibration sample {file}: member {strays[0]!r} is not a .npy array")
            size = sum(info.file_size for info in archive.zip.infolist())
            if size > MAX_SAMPLE_BYTES:  # a small archive can declare gigabytes (a zip bomb)
                raise CalibrationError(f"calibration sample {file} unpacks to {size} bytes, more than "
                                       f"{MAX_SAMPLE_BYTES}")
            return {key: archive[key] for key in archive.files}
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"cannot read calibration sample {file}: {exc}") from exc


class CalibrationFiles:
    """Calibration samples from an ``.npz`` file (one sample) or the first ``limit`` files of a folder of them.

    Samples are read one at a time each time the set is iterated, so memory is that of one sample however many
    files there are. Every file is read and checked once when the set is made, before any compile work.
    """

    def __init__(self, path: str | Path, model: ir.Model, limit: int | None = None) -> None:
        self.files = _npz_files(Path(path))[:limit]
        self.model = model
        for _ in self:
            pass

    def __len__(self) -> int:
        return len(self.files)

    def split_last(self, count: int) -> tuple[CalibrationFiles, list[Path]]:
        """These samples without the last ``count`` files, and those files' samples (the quality gate's)."""
        kept = copy.copy(self)
        kept.files = self.files[:-count]
        return kept, [check_feed(_read_npz(file), self.model, str(file)) for file in self.files[-count:]]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file in self.files:
            yield check_feed(_read_npz(file), self.model, str(file))


def load_feeds(path: str | Path, model: ir.Model, limit: int | None = None) -> CalibrationFiles:
    """Calibration samples checked against the graph (:class:`CalibrationFiles`).

    Each archive maps graph input names to arrays. Missing past key/value inputs are filled with empty tensors
    (prefill), anything else missing, unknown, or of the wrong type or rank is an error naming the input.
    """
    return CalibrationFiles(path, model, limit)


def check_feed(feed: dict[str, np.ndarray], model: ir.Model, origin: str) -> dict[str, np.ndarray]:
    inputs = {v.name: v for v in model.graph.inputs}
    unknown = sorted(set(feed) - set(inputs))
    if unknown:
        raise CalibrationError(f"{origin}: {unknown} are not inputs of the model (inputs: {sorted(inputs)})")
    out = dict(feed)
    for name, value in inputs.items():
        dims = list(value.shape.dims) if value.shape is not None else None
        expected = value.dtype.numpy() if value.dtype is not None else None
        if name not in out:
            if "past" in name and dims is not None and len(dims) == 4:
                batch = next(iter(feed.values())).shape[0] if feed else 1
                out[name] = np.zeros((batch, _dim(dims[1], 1), 0, _dim(dims[3], 1)), dtype=expected)
                continue
            raise CalibrationError(f"{origin}: calibration data lacks model input {name!r}")
        array = out[name]
        if array.size == 0:
            raise CalibrationError(f"{origin}: input {name!r} is empty (shape {list(array.shape)}); a calibration "
                                   "sample needs at least one token")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CalibrationError(f"{origin}: input {name!r} contains NaN or Inf")
        if np.issubdtype(array.dtype, np.floating) and float(np.max(np.abs(array))) > MAX_MAGNITUDE:
            raise CalibrationError(f"{origin}: input {name!r} has values beyond {MAX_MAGNITUDE:.2g}, whose squares "
                                   "overflow float32 (calibration statistics would be Inf/NaN)")
        if expected is not None and array.dtype != expected:
            raise CalibrationError(f"{origin}: input {name!r} is {array.dtype}, the model expects {expected}")
        if dims is not None and array.ndim != len(dims):
            raise CalibrationError(f"{origin}: input {name!r} has rank {array.ndim}, the model expects {len(dims)}")
        if dims is not None:
            for axis, (got, want) in enumerate(zip(array.shape, dims, strict=True)):
                if isinstance(want, int) and got != want:
                    raise CalibrationError(f"{origin}: input {name!r} axis {axis} is {got}, the model expects {want}")
    return out
