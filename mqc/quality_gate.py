"""The quality gate: every compile is checked against the float model on samples calibration never saw.

A recipe can run to the end and still write a useless model (a rotation that did not apply, a broken scale).
After the passes, the compiled model and the float source run in onnxruntime on the held-out samples, and the
report records, for the ``logits`` output of a language model, the logits SQNR, the mean per-token KL divergence
KL(float ‖ compiled) of the next-token distributions and the top-1 agreement; for any other graph, the SQNR of its
first output. ``--min-sqnr`` / ``--max-kl`` turn a result past either limit into :class:`QualityRejected`
(exit 3); the compiler keeps the rejected model beside the output as ``<output>.rejected``.

Samples: a model package gives the gate its own validation samples and synthetic calibration gets more random
inputs from another seed, so calibration keeps every sample it was given; a user's ``--calib`` set has its last
``max(1, n // 8)`` samples held back for the gate (at least two needed; with one the gate runs on it). Feeds given
through the Python API without ``gate_feeds`` are all calibrated on and the gate runs on the first of them; the
report then says the samples were not held out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mqc.errors import MqcError
from mqc.quantizer import sqnr_db

LOGITS = "logits"


class QualityRejected(MqcError):
    """The compiled model is worse than the user's --min-sqnr / --max-kl allow; carries the compile report."""

    exit_code = 3

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Limits:
    """The user's acceptance limits; None means no limit on that figure."""

    min_sqnr: float | None = None
    max_kl: float | None = None

    def violations(self, quality: dict[str, Any]) -> list[str]:
        found = []
        sqnr = quality.get("sqnr_db")
        if self.min_sqnr is not None and (sqnr is None or not sqnr >= self.min_sqnr):
            found.append(f"{quality.get('output')} SQNR {sqnr:.2f} dB < --min-sqnr {self.min_sqnr}")
        kl = quality.get("kl")
        if self.max_kl is not None and kl is not None and not kl <= self.max_kl:
            found.append(f"KL {kl:.4g} > --max-kl {self.max_kl}")
        if self.max_kl is not None and kl is None:
            found.append(f"--max-kl needs a logits output; {quality.get('output')} is not one")
        return found


NO_LIMITS = Limits()


def gate_size(num_samples: int) -> int:
    """How many samples the gate runs on for a calibration set of ``num_samples``: an eighth, at least two."""
    return max(2, num_samples // 8)


def hold_out(feeds: Callable[[], Iterable[dict[str, np.ndarray]]]
             ) -> tuple[Callable[[], Iterable[dict[str, np.ndarray]]], list[dict[str, np.ndarray]], bool]:
    """``(calibration feeds, held_out, disjoint)`` for samples that come only from the user: the last
    ``max(1, n // 8)`` are kept for the gate; with a single sample both use it (``disjoint`` False).

    A sized set of samples (:class:`~mqc.calibration.CalibrationFiles`, a list) is split without loading it.
    """
    samples = feeds()
    if not hasattr(samples, "split_last"):
        samples = CalibrationList(list(samples))
    if len(samples) < 2:
        return feeds, list(samples), False
    kept, held = samples.split_last(max(1, len(samples) // 8))
    return (lambda: kept), list(held), True


class CalibrationList(list):
    """In-memory samples with the same ``split_last`` as :class:`~mqc.calibration.CalibrationFiles`."""

    def split_last(self, count: int) -> tuple[list, list]:
        return CalibrationList(self[:-count]), CalibrationList(self[-count:])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_outputs(reference: list[np.ndarray], compiled: list[np.ndarray], logits: bool) -> dict[str, float]:
    """SQNR over all samples; for logits also mean per-token KL(reference ‖ compiled) and top-1 agreement."""
    ref = np.concatenate([r.reshape(-1) for r in reference])
    got = np.concatenate([c.reshape(-1) for c in compiled])
    result = {"sqnr_db": round(float(sqnr_db(ref, got)), 3)}
    if logits:
        kls, agree, tokens = 0.0, 0, 0
        for r, c in zip(reference, compiled, strict=True):
            lr = _log_softmax(r.astype(np.float64).reshape(-1, r.shape[-1]))
            lc = _log_softmax(c.astype(np.float64).reshape(-1, c.shape[-1]))
            kls += float(np.sum(np.exp(lr) * (lr - lc)))
            agree += int(np.sum(lr.argmax(-1) == lc.argmax(-1)))
            tokens += lr.shape[0]
        result["kl"] = round(kls / tokens, 6)
        result["top1_agreement"] = round(agree / tokens, 4)
        result["tokens"] = tokens
    return result


def measure(source: Path | Any, compiled: ir.Model, held_out: list[dict[str, np.ndarray]],
            disjoint: bool) -> dict[str, Any]:
    """Run ``source`` (the float model's path, or a session on it) and ``compiled`` on ``held_out``; the figures
    the report stores."""
    from mqc.session import open_session, session_for_model

    if not held_out:
        return {"skipped": "no samples to check on"}
    reference_session = open_session(source) if isinstance(source, Path) else source
    names = [o.name for o in reference_session.get_outputs()]
    output = LOGITS if LOGITS in names else names[0]
    compiled_session = session_for_model(compiled, reference_session.get_providers())
    reference, result = [], []
    for feed in held_out:
        reference.append(reference_session.run([output], feed)[0])
        result.append(compiled_session.run([output], feed)[0])
    return quality_figures(reference, result, output, disjoint)


def quality_figures(reference: list[np.ndarray], result: list[np.ndarray], output: str,
                    disjoint: bool) -> dict[str, Any]:
    """The report's quality entry from the float and compiled values of ``output`` on the held-out samples."""
    quality: dict[str, Any] = {"output": output, "samples": len(reference),
                               "held_out": disjoint, **compare_outputs(reference, result, output == LOGITS)}
    if not disjoint:
        quality["note"] = "the gate ran on samples calibration also used (no held-out samples were given)"
    return quality


def summary_line(quality: dict[str, Any]) -> str:
    """One line for the compile summary."""
    if "sqnr_db" not in quality:
        return f"quality gate: {quality.get('skipped', 'not run')}"
    kind = "held-out" if quality.get("held_out") else "calibration (not held-out)"
    line = f"quality gate on {quality['samples']} {kind} samples: {quality['output']} SQNR {quality['sqnr_db']:.1f} dB"
    if "kl" in quality:
        line += f", KL {quality['kl']:.4f}, top-1 agreement {100 * quality['top1_agreement']:.1f} %"
    return line


def rejected_path(output: Path) -> Path:
    """Where a rejected compile is kept: beside the output, ``<output>.rejected``."""
    return output.with_name(output.name + ".rejected")
