"""The compile's calibration service: one onnxruntime session per graph revision, shared by every request.

Every pass that calibrates asks :class:`~mqc.pass_manager.CompileContext` (``ctx.calibrate`` / ``ctx.capture``),
which asks this service. The service keeps at most one session, built from memory
(:func:`mqc.session.session_for_model`, never a copy on disk) for the graph's current *revision*:

- the revision is bumped when the graph changes (the pass manager after a pass that returned ``modified``, a pass
  that rewrites the graph between two of its own requests through ``ctx.invalidate()``), and the session is
  dropped with it, so its weights are freed;
- as a safety net each request also compares a structural signature of the graph (node identities and their
  inputs, graph outputs, initializer tensors): a graph rewritten without a bump gets a new session too, never the
  stale one;
- requests on one revision share the session: a request whose taps the session already outputs reuses it; a request
  that needs more gets a session with the union of both tap sets, so a later request for either is served too.
  ``run`` fetches only the requested taps (BENCHMARKS.md, "calibration service", measures that extra outputs cost
  no run time).

The feeds are read once and kept when they are small (:class:`FeedCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.errors import CalibrationError

#: Largest total size of calibration feeds kept in memory between passes (beyond it they are re-read each time).
FEED_CACHE_BYTES = 512 << 20


def graph_signature(model: ir.Model) -> int:
    """A hash of the graph's structure by object identity: which nodes, wired to which values, which outputs and
    which initializer tensors. It changes when a pass rewires, adds or removes nodes or swaps a weight."""
    graph = model.graph
    nodes = tuple((id(node), *map(id, node.inputs)) for node in graph)
    outputs = tuple(map(id, graph.outputs))
    weights = tuple((name, id(value.const_value)) for name, value in graph.initializers.items())
    return hash((id(graph), nodes, outputs, weights))


@dataclass
class _TappedSession:
    """A session on one graph revision with ``taps`` as extra outputs."""

    revision: int
    signature: int
    taps: frozenset[str]
    session: Any
    input_names: frozenset[str]


class CalibrationService:
    """Runs the current graph on feeds and returns tapped values, with one session per graph revision."""

    def __init__(self, providers: Sequence[str]) -> None:
        self.providers = list(providers)
        self.revision = 0
        #: Sessions built so far (the benchmark and the tests read it).
        self.sessions_built = 0
        self._current: _TappedSession | None = None

    def graph_changed(self) -> None:
        """The graph was rewritten: a new revision, and the session of the old one is released."""
        self.revision += 1
        self._current = None

    def run(self, model: ir.Model, taps: Sequence[str], feeds: Iterable[dict[str, np.ndarray]],
            ) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
        """Yield (feed, the values of ``taps`` in that order) for every feed, on the current graph of ``model``."""
        wanted = list(dict.fromkeys(taps))
        tapped = self._session_for(model, wanted)
        for feed in feeds:
            outputs = dict(zip(wanted, tapped.session.run(wanted, {k: v for k, v in feed.items()
                                                                   if k in tapped.input_names}), strict=True))
            yield feed, [outputs[name] for name in taps]

    def _session_for(self, model: ir.Model, taps: list[str]) -> _TappedSession:
        signature = graph_signature(model)
        current = self._current
        if current is not None and current.signature != signature:
            self.graph_changed()  # rewritten without a bump: the old session must not answer
            current = None
        if current is not None and current.taps.issuperset(taps):
            return current
        union = [*sorted(current.taps), *taps] if current is not None else taps
        self._current = None  # the old session is freed before the new one is built
        session = tapped_session(model, list(dict.fromkeys(union)), self.providers)
        self.sessions_built += 1
        self._current = _TappedSession(self.revision, signature, frozenset(union), session,
                                       frozenset(i.name for i in session.get_inputs()))
        return self._current


def tapped_session(model: ir.Model, taps: Sequence[str], providers: Sequence[str]) -> Any:
    """A session (from memory) on ``model`` with ``taps`` as extra graph outputs; ``model`` is left as it was."""
    from mqc.session import session_for_model

    values = {v.name: v for v in _all_values(model.graph)}
    missing = [t for t in taps if t not in values]
    if missing:
        raise CalibrationError(f"values to calibrate not found in the graph: {missing[:5]}")
    added = [values[t] for t in dict.fromkeys(taps) if values[t] not in model.graph.outputs]
    untyped = {value: value.type for value in added if value.dtype is None}
    for value in untyped:  # an unknown element type cannot be serialized; an absent one onnxruntime infers
        value.type = None
    model.graph.outputs.extend(added)
    try:
        return session_for_model(model, list(providers), optimization_level="basic")
    finally:
        for value in added:
            model.graph.outputs.remove(value)
        for value, original in untyped.items():
            value.type = original


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


class FeedCache:
    """The calibration feeds, read from their source once and kept while they total at most ``budget`` bytes;
    a larger set is streamed from the source on every pass over it (memory stays that of one sample)."""

    def __init__(self, source: Callable[[], Iterable[dict[str, np.ndarray]]], budget: int = FEED_CACHE_BYTES) -> None:
        self._source = source
        self._budget = budget
        self._kept: list[dict[str, np.ndarray]] | None = None
        self._too_large = False

    def __call__(self) -> Iterable[dict[str, np.ndarray]]:
        if self._kept is not None:
            return self._kept
        if self._too_large:
            return self._source()
        return self._reading()

    def _reading(self) -> Iterator[dict[str, np.ndarray]]:
        kept: list[dict[str, np.ndarray]] | None = []
        size = 0
        for feed in self._source():
            if kept is not None:
                size += sum(np.asarray(v).nbytes for v in feed.values())
                if size <= self._budget:
                    kept.append(feed)
                else:
                    kept, self._too_large = None, True
            yield feed
        if kept is not None:  # only a complete pass is kept (a consumer may stop early: verify_feeds)
            self._kept = kept
