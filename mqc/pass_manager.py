"""Pass infrastructure: the compile context, the pass base classes and the manager that runs a recipe.

Passes are ``onnx_ir`` in-place passes with one job each. A pass that must not change what the model computes
declares ``function_preserving = True``; with ``--verify`` the manager runs the float model before and after such a
pass in onnxruntime on fixed inputs and stops with an error when any output drifts beyond the tolerance (the idea
of LLVM's ``-verify-each``). Everything a pass decides goes into its :class:`~mqc.report.PassRecord`.

A pass that preserves some outputs exactly but legitimately changes the layout of others (AIFS keeps ``logits``
but leaves the KV cache in its permuted token order) overrides :meth:`MqcPass.verify_outputs` to name the outputs
to compare; the manager then compares only those and records the excluded ones with ``verify_exclusion_reason``
in ``record.verify``. Later passes are verified against this pass's outputs, all of them.

Contracts, as in ``onnx_ir``'s passes. Preconditions: a pass checks in :meth:`MqcPass.requires` what the model must
offer (folded norms, a ``modality_ids`` input, MAS's graph form); a whole-model refusal found while running (a
residual stream that cannot be traced) is raised too, before anything is changed. Each pass declares in
``fatal_skips`` the reason codes of those refusals, with what each means (``mqc explain`` lists them), and raises
one as ``raise self.refuse(code, why, node)``. That is fatal for the recipe: the manager raises
:class:`~mqc.errors.RecipeNotApplied` (exit 2, nothing written) unless the compile allows a partial result, in which
case the pass's record says what did not apply and the recipe goes on. Per-node refusals stay recorded skips.
Postconditions: :meth:`MqcPass.ensures` checks what the pass promises (no LayerNorm left, folded gammas all ones,
every linear quantized or skipped); a failure is a compiler bug, :class:`PostconditionBroken` (exit 1, nothing
written).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

from mqc.calibration import TEXT, Calibrator, TapStats, TensorStats
from mqc.calibration_service import CalibrationService, FeedCache
from mqc.distributed import LocalExecutor
from mqc.errors import InternalError, RecipeNotApplied, VerificationError
from mqc.model_map import ModelMap, build_model_map
from mqc.params import PASS_PARAMS, PassParams, parse_params
from mqc.report import PassRecord

#: Relative output drift (max |a - b| / max |a|) a function-preserving pass may cause in fp32.
DEFAULT_VERIFY_RTOL = 1e-4
#: The least Gram budget (bytes of float64 Gram matrices one calibration run may hold): 2 GiB.
MIN_GRAM_BUDGET = 2 << 30


@functools.cache
def default_gram_budget() -> int:
    """A quarter of the memory available when first asked (Linux ``MemAvailable``), in whole GiB, at least 2 GiB: the
    Gram matrices of a run are the largest transient a compile holds, and fewer runs mean fewer passes over the
    model. Fixed for the process, so repeated compiles (and a Ray compile beside a local one) record the same."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return MIN_GRAM_BUDGET
    return max(MIN_GRAM_BUDGET, available // 4 >> 30 << 30)


class PassRefused(ir.passes.PreconditionError):
    """The model lacks what the pass needs to do its essential work: ``code`` (one of the pass's ``fatal_skips``),
    the ``node`` it is about (``model`` for the whole graph) and ``why`` (module docstring)."""

    def __init__(self, code: str, why: str, node: str = "model") -> None:
        super().__init__(why)
        self.code, self.why, self.node = code, why, node


def declare_fatal(**meanings: str) -> Mapping[str, str]:
    """A pass's ``fatal_skips`` declaration: reason code -> what it means, read-only."""
    return MappingProxyType(meanings)


class PostconditionBroken(InternalError, ir.passes.PostconditionError):
    """A pass left the model in a state its ``ensures`` rules out: a bug in mqc, never the user's input."""


class CompileContext:
    """What passes share during one compile: calibration data, statistics, options and the model map cache.

    Calibration goes through one :class:`~mqc.calibration_service.CalibrationService` (a session per graph
    revision, reused by every request on it); the feeds are read once (:class:`~mqc.calibration_service.FeedCache`).
    ``gram_budget`` bounds the bytes of Gram matrices one calibration run may accumulate (GPTQ's Hessians; by
    default :func:`default_gram_budget`).
    """

    def __init__(
        self,
        feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
        *,
        verify: bool = False,
        verify_rtol: float = DEFAULT_VERIFY_RTOL,
        verify_samples: int = 2,
        default_modality: int = TEXT,
        exclude: Sequence[str] = (),
        providers: Sequence[str] = ("CPUExecutionProvider",),
        progress: Any = None,
        allow_partial: bool = False,
        gram_budget: int | None = None,
        executor: LocalExecutor | None = None,
    ) -> None:
        """``executor`` runs calibration and the passes' independent per-layer jobs (``mqc.distributed``; by
        default in this process)."""
        self._feeds = FeedCache(feeds)
        self.gram_budget = default_gram_budget() if gram_budget is None else gram_budget
        self.executor = executor or LocalExecutor()
        if self.executor.memory_budget is None:
            self.executor.memory_budget = self.gram_budget
        self.allow_partial = allow_partial
        self.verify = verify
        self.verify_rtol = verify_rtol
        self.verify_samples = verify_samples
        self.default_modality = default_modality
        self.exclude = [re.compile(p) for p in exclude]
        self.providers = list(providers)
        self.progress = progress
        self.calibration = CalibrationService(self.providers)
        self._map: ModelMap | None = None
        self._verify_feeds: list[dict[str, np.ndarray]] | None = None
        self.num_samples: int | None = None
        #: The float model the compile started from (its path, or a session on its float32 widening): what the
        #: quality gate and ``scale_tuning`` compare against; None when the caller gave none.
        self.reference: Any = None

    def feeds(self) -> Iterable[dict[str, np.ndarray]]:
        return self._feeds()

    def excluded(self, name: str) -> bool:
        return any(p.search(name) for p in self.exclude)

    def model_map(self, model: ir.Model) -> ModelMap:
        if self._map is None:
            self._map = build_model_map(model)
        return self._map

    def invalidate(self) -> None:
        """The graph changed: the model map is rebuilt and calibration runs on a new graph revision."""
        self._map = None
        self.calibration.graph_changed()

    def calibrate(
        self, model: ir.Model, taps: Sequence[str], gram_taps: Sequence[str] = (), label: str = "calibrating",
        sample_rows: int = 64,
    ) -> dict[str, TapStats]:
        """Stream the calibration set through the current model and return statistics for ``taps``.

        ``sample_rows`` is the per-modality row reservoir size of every tap (64 by default).
        """
        calibrator = Calibrator(model, taps, self.default_modality, gram_taps, self.providers, sample_rows=sample_rows,
                                service=self.calibration)
        task = None
        if self.progress is not None:
            task = self.progress.add_task(label, total=self.num_samples)
        stats = self.executor.calibrate(calibrator, self.feeds(),
                                        (lambda: self.progress.advance(task)) if task is not None else None)
        if task is not None:
            self.progress.remove_task(task)
        return stats

    def capture(self, model: ir.Model, taps: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
        """(feed, the values of ``taps``) for every calibration feed, from the calibration session of this revision."""
        return self.calibration.run(model, taps, self.feeds())

    def verify_feeds(self) -> list[dict[str, np.ndarray]]:
        if self._verify_feeds is None:
            feeds = []
            for feed in self.feeds():
                feeds.append(feed)
                if len(feeds) >= self.verify_samples:
                    break
            self._verify_feeds = feeds
        return self._verify_feeds

    def run_outputs(self, model: ir.Model) -> list[list[np.ndarray]]:
        """All graph outputs of ``model`` on the verification feeds."""
        from mqc.session import session_for_model

        session = session_for_model(model, self.providers, optimization_level="disable")
        names = {i.name for i in session.get_inputs()}
        return [session.run(None, {k: v for k, v in feed.items() if k in names}) for feed in self.verify_feeds()]


def output_drift(before: list[list[np.ndarray]], after: list[list[np.ndarray]]) -> dict[str, float]:
    """Largest absolute and relative (to the output's own max magnitude) difference over all outputs."""
    max_abs = max_rel = 0.0
    for outs_a, outs_b in zip(before, after, strict=True):
        for a, b in zip(outs_a, outs_b, strict=True):
            if a.shape != b.shape:
                return {"max_abs": float("inf"), "max_rel": float("inf")}
            if a.size == 0 or not np.issubdtype(a.dtype, np.floating):
                continue
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            scale = max(float(np.max(np.abs(a))), 1e-12)
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale)
    return {"max_abs": max_abs, "max_rel": max_rel}


class MqcPass(ir.passes.InPlacePass):
    """Base of every mqc pass. Subclasses set ``name``, ``function_preserving`` and implement ``run``.

    ``self.context`` and ``self.record`` are attached by the :class:`PassManager` before the pass runs.
    """

    name: ClassVar[str] = ""
    function_preserving: ClassVar[bool] = False
    #: Why the outputs left out by :meth:`verify_outputs` may differ (recorded under ``--verify``).
    verify_exclusion_reason: ClassVar[str] = ""
    #: Reason code -> what it means, for each refusal that stops the recipe (module docstring; ``mqc explain``).
    fatal_skips: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init__(self, params: PassParams | None = None, **raw: Any) -> None:
        """``params`` as parsed by the recipe, or the keyword parameters (checked the same way)."""
        super().__init__()
        if params is None:
            params = parse_params(PASS_PARAMS.get(self.name, PassParams), raw, f"pass {self.name}")
        elif raw:
            raise TypeError("give a pass its parameters either parsed or as keywords, not both")
        self.params = params
        self.context: CompileContext | None = None
        self.record = self.new_record()

    def new_record(self) -> PassRecord:
        return PassRecord(self.name, self.params.to_dict(), self.function_preserving)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.record = self.new_record()  # a pass is stateless between runs: each run records afresh
        modified = self.run(model)
        self.record.variant = self.record.variant or self.variant()  # run may record the variant it fell back to
        if modified and self.context is not None:
            self.context.invalidate()  # ensures (and the next pass) map the rewritten model
        return ir.passes.PassResult(model, modified=bool(modified))

    def requires(self, model: ir.Model) -> None:
        """Raise :meth:`refuse` when ``model`` lacks what this pass needs (none by default)."""

    def ensures(self, model: ir.Model) -> None:
        """Raise :meth:`broken` when the pass left ``model`` in a state it promises to rule out (none by default)."""

    def refuse(self, code: str, why: str, node: str = "model") -> PassRefused:
        """The refusal to raise when the pass cannot do its essential work; ``code`` must be in ``fatal_skips``."""
        if code not in self.fatal_skips:
            raise KeyError(f"pass {self.name} refuses with {code!r}, which it does not declare in fatal_skips")
        return PassRefused(code, why, node)

    def broken(self, why: str) -> PostconditionBroken:
        """The error to raise from :meth:`ensures`."""
        return PostconditionBroken(f"pass {self.name} broke its postcondition: {why}")

    def variant(self) -> str:
        """Which variant ran where the paper and its released code differ ("" where they agree); ``mqc explain``."""
        return ""

    def run(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def verify_outputs(self, model: ir.Model) -> list[str] | None:
        """Names of the graph outputs ``--verify`` compares after this pass ran (``model`` is the rewritten one).

        ``None`` (the default) compares every output. A name must exist before and after the pass.
        """
        return None

    def usable_stats(self, tap: TapStats | None, linears: Iterable[Any]) -> TensorStats | None:
        """All-modality statistics of ``tap``; None, with each of ``linears`` recorded as skipped, when no data came."""
        combined = tap.combined() if tap is not None else None
        if combined is None or combined.rows == 0 or combined.absmax == 0.0:
            for lin in linears:
                self.record.skip(lin.name, "no calibration data reached its input (or it is all zeros)")
            return None
        return combined

    @property
    def ctx(self) -> CompileContext:
        assert self.context is not None, "pass used outside a PassManager"
        return self.context


class RewriteRulesPass(MqcPass):
    """A pass made of onnxscript rewrite rules. Rules whose ``check`` failed are recorded as skips with the reason."""

    def rules(self) -> pattern.RewriteRuleSet:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, model: ir.Model) -> None:
        """No match of the pass's rules is left that passes its check: the pass rewrote everything it claims to."""
        tracer = MatchingTracer()
        self.rules().apply_to_model(model, tracer=tracer)  # with a tracer nothing is rewritten
        left = [match.root_node.name or match.root_node.op_type for matches in tracer.best_matches_map.values()
                for match in matches if match.status == MatchStatus.SUCCESS]
        if left:
            raise self.broken(f"its rules still match {len(left)} nodes it should have rewritten, e.g. {left[0]}")

    def run(self, model: ir.Model) -> bool:
        rules = self.rules()
        tracer = MatchingTracer()
        rules.apply_to_model(model, tracer=tracer)  # with a tracer nothing is rewritten: this only collects why
        for rule, matches in tracer.best_matches_map.items():
            for match in matches:
                if match.status == MatchStatus.CONDITION_FAILED:
                    self.record.skip(match.root_node.name or match.root_node.op_type, f"{rule.name}: {match.match_result.reason}")
        count = rules.apply_to_model(model)
        self.record.matched = count + len(self.record.skipped)
        self.record.changed = count
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return count > 0


class PassManager:
    """Runs passes in order, verifying function-preserving ones and collecting their records."""

    def __init__(self, passes: Sequence[MqcPass], context: CompileContext) -> None:
        self.passes = list(passes)
        self.context = context

    def run(self, model: ir.Model, on_pass: Callable[[MqcPass], None] | None = None) -> list[PassRecord]:
        ctx = self.context
        reference: list[list[np.ndarray]] | None = None
        reference_names: list[str] = []
        records = []
        for mqc_pass in self.passes:
            mqc_pass.context = ctx
            if on_pass is not None:
                on_pass(mqc_pass)
            checking = ctx.verify and mqc_pass.function_preserving
            if checking and reference is None:
                reference = ctx.run_outputs(model)
                reference_names = _output_names(model)
            start = time.perf_counter()
            result = self._run_pass(mqc_pass, model)
            mqc_pass.record.seconds = round(time.perf_counter() - start, 3)
            if checking:
                after = ctx.run_outputs(model)
                after_names = _output_names(model)
                compared = mqc_pass.verify_outputs(model)
                if compared is None:
                    drift = output_drift(reference, after)
                    excluded: dict[str, Any] = {}
                else:
                    drift = output_drift(_select(reference, reference_names, compared), _select(after, after_names, compared))
                    excluded = {"compared": list(compared),
                                "excluded": [n for n in after_names if n not in compared],
                                "excluded_reason": mqc_pass.verify_exclusion_reason}
                mqc_pass.record.verify = {**drift, "rtol": ctx.verify_rtol, "samples": len(ctx.verify_feeds()), **excluded}
                if not drift["max_rel"] <= ctx.verify_rtol:
                    raise VerificationError(
                        f"--verify: pass {mqc_pass.name} changed the model's outputs by {drift['max_rel']:.3g} "
                        f"relative (max abs {drift['max_abs']:.3g}), above the tolerance {ctx.verify_rtol:g}"
                    )
                reference, reference_names = after, after_names
            elif result.modified:
                reference = None
            records.append(mqc_pass.record)
        return records

    def _run_pass(self, mqc_pass: MqcPass, model: ir.Model) -> ir.passes.PassResult:
        """Run one pass; a refusal stops the recipe, or with ``allow_partial`` is recorded and the recipe goes on."""
        mqc_pass.record = mqc_pass.new_record()
        try:
            return mqc_pass(model)
        except PassRefused as exc:
            reason, code, node = exc.why, exc.code, exc.node
        except ir.passes.PostconditionError as exc:
            if isinstance(exc, PostconditionBroken):
                raise
            raise PostconditionBroken(f"pass {mqc_pass.name} broke its postcondition: {exc.__cause__}") from exc
        except ir.passes.PreconditionError as exc:  # requires() failed with another exception: onnx_ir wraps it
            reason, code, node = f"{exc}: {exc.__cause__}", "precondition", "model"
        if not self.context.allow_partial:
            raise RecipeNotApplied(
                f"pass {mqc_pass.name} cannot do its work on this model: {reason} ({code}). Nothing was written; "
                "--allow-partial compiles the rest of the recipe anyway")
        mqc_pass.record.not_applied = reason
        mqc_pass.record.skipped.append({"node": node, "reason": reason, "fatal": code})
        return ir.passes.PassResult(model, modified=False)


def _output_names(model: ir.Model) -> list[str]:
    return [value.name or "" for value in model.graph.outputs]


def _select(outputs: list[list[np.ndarray]], names: list[str], wanted: Sequence[str]) -> list[list[np.ndarray]]:
    """The ``wanted`` outputs, by name, of every verification run (``verify_outputs``)."""
    missing = [n for n in wanted if n not in names]
    if missing:
        raise VerificationError(f"--verify: outputs {missing} to compare are not graph outputs ({names})")
    return [[outs[names.index(n)] for n in wanted] for outs in outputs]
