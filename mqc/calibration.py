"""Calibration: run the float model in onnxruntime and stream statistics of the values to be quantized.

The model is augmented with the tapped values as extra graph outputs and only those are requested from each run,
so logits and KV-cache outputs are never kept. Every statistic is streaming (running maxima, a histogram that
doubles its range when needed, a fixed-size reservoir of rows, optional Gram matrices), so memory is bounded by
the number of taps, not by the size of the calibration set.

Statistics are kept per modality. Each token row carries a modality id (0 text, 1 image) taken from the decoder's
``modality_ids`` input; a graph without that input (a vision encoder) sees only ``default_modality``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mqc.calibration_service import CalibrationService, tapped_session
from mqc.errors import CalibrationError
from mqc.quantizer import qrange

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

FeedSource = Callable[[], Iterable[dict[str, np.ndarray]]]


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
    gram: np.ndarray | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.channel_absmax = np.zeros(self.channels, dtype=np.float32)
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)
        self.sample = np.zeros((0, self.channels), dtype=np.float32)
        self._rng = np.random.default_rng(0)

    def track_gram(self) -> None:
        if self.gram is None:
            self.gram = np.zeros((self.channels, self.channels), dtype=np.float64)

    def update(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        rows = rows.astype(np.float32, copy=False)
        magnitude = np.abs(rows)
        self.channel_absmax = np.maximum(self.channel_absmax, magnitude.max(axis=0))
        batch_max = float(magnitude.max())
        self.absmax = max(self.absmax, batch_max)
        self._grow_histogram(batch_max)
        if self.hist_range > 0:
            counts, _ = np.histogram(magnitude, bins=HIST_BINS, range=(0.0, self.hist_range))
            self.hist += counts
        self._reservoir(rows)
        if self.gram is not None:  # one batch's product in fp32 (twice the BLAS rate), the running sum in fp64
            np.add(self.gram, rows.T @ rows, out=self.gram)  # widened inside the add: no fp64 temporary
        self.rows += rows.shape[0]

    def _grow_histogram(self, needed: float) -> None:
        if needed <= self.hist_range:
            return
        if self.hist_range == 0.0:
            self.hist_range = float(2.0 ** np.ceil(np.log2(max(needed, 1e-8))))
            return
        while self.hist_range < needed:
            # Doubling the range merges bin pairs into the lower half: counts stay exact.
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(HIST_BINS // 2, np.int64)])
            self.hist_range *= 2.0

    def _reservoir(self, rows: np.ndarray) -> None:
        """Reservoir sampling (vectorised): every row seen so far is kept with equal probability."""
        free = self.sample_rows - self.sample.shape[0]
        if free > 0:
            self.sample = np.concatenate([self.sample, rows[:free]])
        rest = rows[max(free, 0) :]
        if rest.shape[0] == 0:
            return
        seen = self.rows + max(free, 0) + np.arange(rest.shape[0])
        slots = (self._rng.random(rest.shape[0]) * (seen + 1)).astype(np.int64)
        keep = slots < self.sample_rows
        self.sample[slots[keep]] = rest[keep]

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


def _rebin(stats: TensorStats, target_range: float) -> np.ndarray:
    if stats.hist_range == 0.0:
        return np.zeros(HIST_BINS, np.int64)
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
    ) -> None:
        """``sample_rows``: size of each per-modality row reservoir (:class:`TensorStats`); passes that learn from
        calibration rows (MAS) ask for more than the default 64. ``service``: the compile's session cache
        (:mod:`mqc.calibration_service`); without it each run builds its own session."""
        self.model = model
        self.sample_rows = sample_rows
        self.taps = list(dict.fromkeys(taps))
        self.gram_taps = set(gram_taps)
        self.default_modality = default_modality
        self.providers = list(providers)
        self.service = service

    def run(self, feeds: Iterable[dict[str, np.ndarray]], progress: Callable[[], None] | None = None) -> dict[str, TapStats]:
        stats: dict[str, TapStats] = {}
        runs = (self.service.run(self.model, self.taps, feeds) if self.service is not None
                else capture(self.model, self.taps, feeds, self.providers))
        for feed, outputs in runs:
            self.accumulate(stats, feed, outputs)
            if progress is not None:
                progress()
        return stats

    def accumulate(self, stats: dict[str, TapStats], feed: dict[str, np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """Add one sample's tapped values (in the order of ``self.taps``) to ``stats``."""
        for name, array in zip(self.taps, outputs, strict=True):
            self._accumulate(stats, name, array, feed)

    def _accumulate(self, stats: dict[str, TapStats], name: str, array: np.ndarray, feed: dict[str, np.ndarray]) -> None:
        if array.ndim == 0:
            return
        if np.issubdtype(array.dtype, np.floating) and not float(np.max(np.abs(array), initial=0.0)) <= MAX_MAGNITUDE:
            raise CalibrationError(f"calibration values of {name!r} are NaN, Inf or beyond {MAX_MAGNITUDE:.2g}: the "
                                   "calibration inputs overflow this model")
        channels = array.shape[-1]
        rows = array.reshape(-1, channels)
        modalities = _row_modalities(feed, array.shape[:-1], self.default_modality)
        tap = stats.setdefault(name, TapStats(name, {}))
        for modality in np.unique(modalities):
            entry = tap.by_modality.get(int(modality))
            if entry is None:
                entry = tap.by_modality[int(modality)] = TensorStats(channels, self.sample_rows)
                if name in self.gram_taps:
                    entry.track_gram()
            entry.update(rows[modalities == modality])


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
