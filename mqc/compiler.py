"""``mqc.compile``: load, run a recipe's passes, lower, and write the compiled model with its report.

Two kinds of input:
- one ``.onnx`` file, calibrated with ``--calib`` samples (``.npz``) or, without them, synthetic feeds built from
  the graph's inputs (said so in the report);
- a model directory (``manifest.json`` plus component graphs, as ``mqc export`` writes) or a packaged model name:
  every quantizable component (vision encoder with projector, decoder) is compiled with calibration data that the
  package builds itself, and the output is a directory of the same layout.

The input is only ever read. Outputs appear atomically: a file is renamed into place, a directory is assembled
beside its final name and renamed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from mqc.calibration import IMAGE, TEXT, load_feeds, random_feeds
from mqc.distributed import LocalExecutor
from mqc.errors import InputModelError, OutputPathError
from mqc.graph.half_precision import widen_to_float32
from mqc.ir import load_model, remove_unused_initializers, save_model
from mqc.model_checks import check_external_data, tensor_protos
from mqc.model_map import build_model_map
from mqc.outputs import FolderStaging, check_output_path
from mqc.packages import component_paths, folder_entries, is_model_dir, package_hooks, read_manifest
from mqc.pass_manager import DEFAULT_VERIFY_RTOL, CompileContext, PassManager
from mqc.quality_gate import (
    NO_LIMITS,
    Limits,
    QualityRejected,
    gate_size,
    hold_out,
    measure,
    quality_figures,
    rejected_path,
)
from mqc.recipes import Recipe, load_recipe, pass_class
from mqc.report import REPORT_KEY, CompileReport
from mqc.streaming import (
    STREAM_THRESHOLD_BYTES,
    StreamedCompile,
    StreamedContext,
    StreamingError,
    release_after_write,
    streaming_plan,
    weight_bytes,
)

FORMATS = ("qdq", "mqc")
#: Components of a model directory that get quantized, and the modality their tokens carry.
QUANTIZED_COMPONENTS = {"vision": IMAGE, "decoder": TEXT}
DEFAULT_SAMPLES = 32


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mqc")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def _input_files(source: Path, model: ir.Model) -> list[Path]:
    """Every file the loaded model reads: the .onnx itself and its (checked) external data files."""
    files = {Path(os.path.abspath(source))}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(os.path.abspath(tensor.path)))
    return sorted(files)


#: Linear ops mqc quantizes; inside If/Loop/Scan bodies they are left in float and reported.
_LINEAR_OPS = {"MatMul", "Gemm"}


def _widen_half_precision(model: ir.Model) -> dict[str, str]:
    """Widen a float16/bfloat16 model to float32 compute (:mod:`mqc.graph.half_precision`); the summary entry."""
    kinds = widen_to_float32(model)
    if not kinds:
        return {}
    interface = ("its float16 inputs and outputs are kept (Cast at the boundary)" if kinds == ["float16"] else
                 "its bfloat16 inputs and outputs become float32 (onnxruntime's CPU kernels cannot run bfloat16)")
    return {"half_precision": f"{'/'.join(kinds)} model widened to float32 on load: the compiled model computes in "
                              f"float32 outside its integer weights; {interface}"}


def _gate_reference(source: Path, model: ir.Model, summary: dict[str, str]):
    """What the quality gate compares against: the source file, or for bfloat16 (which onnxruntime's CPU kernels do
    not cover) a session on the widened model, opened before any pass changes it."""
    if "bfloat16" not in summary.get("half_precision", ""):
        return source
    from mqc.session import default_providers, session_for_model

    return session_for_model(model, default_providers())


def _linears_in_subgraphs(model: ir.Model) -> list[str]:
    """Names of MatMul/Gemm nodes inside control-flow bodies, which no pass rewrites."""
    top = {id(node) for node in model.graph}
    return [node.name or node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if id(node) not in top and node.op_type in _LINEAR_OPS and node.domain in ("", "ai.onnx")]


def _without_timings(report: CompileReport) -> CompileReport:
    """The stored report leaves wall-clock times out, so equal inputs give byte-identical outputs."""
    return replace(report, seconds=0.0, passes=[replace(record, seconds=0.0) for record in report.passes])


def _lowering_passes(fmt: str) -> list:
    if fmt not in FORMATS:
        raise OutputPathError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "qdq":
        return []
    return [pass_class("lower_runtime_ops")()]


def compile_file(
    source: str | Path,
    output: str | Path,
    recipe: str | Recipe = "w8a8",
    calib: str | Path | None = None,
    feeds: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
    num_samples: int | None = None,
    fmt: str = "qdq",
    exclude: Sequence[str] = (),
    verify: bool = False,
    verify_rtol: float = DEFAULT_VERIFY_RTOL,
    default_modality: int = TEXT,
    progress: Any = None,
    write: bool = True,
    allow_partial: bool = False,
    limits: Limits = NO_LIMITS,
    gate_feeds: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
    executor: LocalExecutor | None = None,
    stream: bool | None = None,
    stream_inputs: str = "float",
    feeds_origin: dict[str, Any] | None = None,
) -> CompileReport:
    """Compile one ONNX file. ``feeds`` (a callable returning an iterable of feed dicts) overrides ``calib``;
    ``feeds_origin`` says in the report what they are (default: ``{"source": "model package"}``).

    ``stream``: compile layer by layer with bounded memory (:mod:`mqc.streaming`); None streams a model above
    ``STREAM_THRESHOLD_BYTES`` of weights when its recipe can. ``stream_inputs``: what block i+1 calibrates on.

    ``gate_feeds``, samples calibration never sees, are what the quality gate runs on; without them the gate holds
    back the last eighth of ``--calib`` files, runs on more synthetic inputs, or (``feeds`` from the API) on the first
    calibration samples, recorded as not held out. ``executor`` runs calibration and per-layer jobs (in this
    process by default; ``mqc.distributed.RayExecutor`` on a Ray cluster, with the same result)."""
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    num_samples = num_samples or recipe.samples or DEFAULT_SAMPLES  # the recipe's choice unless asked otherwise
    if write:
        check_output_path(output, [source])
    passes = recipe.instantiate() + _lowering_passes(fmt)
    model = load_model(source)
    precision = _widen_half_precision(model)
    inputs = _input_files(source, model)
    if write:
        check_output_path(output, inputs)
    streamed = _streams(stream, model, passes, precision, verify)
    calibration: dict[str, Any]
    hold_back = False
    if feeds is not None:
        calibration = dict(feeds_origin or {"source": "model package"})
    elif calib is not None:
        files = load_feeds(calib, model, limit=num_samples)
        feeds = lambda: files  # noqa: E731
        calibration = {"source": str(calib), "samples": len(files)}
        hold_back = gate_feeds is None
    else:
        samples = random_feeds(model, num_samples)
        feeds = lambda: samples  # noqa: E731
        calibration = {"source": "synthetic (no --calib given): random inputs, scales are not representative",
                       "samples": len(samples)}
        if gate_feeds is None:  # more synthetic inputs from another seed: calibration keeps all its samples
            gate_samples = random_feeds(model, gate_size(num_samples), seed=1)
            gate_feeds = lambda: gate_samples  # noqa: E731
    if gate_feeds is not None:
        held_out, disjoint = list(gate_feeds()), True
    elif hold_back:  # the user's --calib samples: the gate's are held back from them (mqc.quality_gate)
        feeds, held_out, disjoint = hold_out(feeds)
        calibration["samples"], calibration["held_out_for_quality_gate"] = len(feeds()), len(held_out) if disjoint else 0
    else:  # feeds given through the API without gate feeds: the gate checks on calibration samples, and says so
        held_out, disjoint = list(itertools.islice(feeds(), gate_size(num_samples))), False
    calibration.setdefault("samples", num_samples)
    context_class = StreamedContext if streamed else CompileContext
    context = context_class(feeds, verify=verify, verify_rtol=verify_rtol, default_modality=default_modality,
                            exclude=exclude, progress=progress, allow_partial=allow_partial, executor=executor)
    context.num_samples = calibration.get("samples", num_samples)
    summary = {**build_model_map(model).summary(), **precision}
    gate_reference = _gate_reference(source, model, precision)
    context.reference = gate_reference
    nested = _linears_in_subgraphs(model)
    if nested:
        summary["left_float_in_subgraphs"] = nested
    report = CompileReport(
        recipe=recipe.name, recipe_passes=recipe.passes, source=str(source), format=fmt,
        model_summary=summary, calibration=calibration, mqc_version=_version(),
    )
    task = progress.add_task(f"{recipe.name}: passes", total=len(passes)) if progress is not None else None

    def on_pass(mqc_pass) -> None:
        if task is not None:
            progress.update(task, description=f"{recipe.name}: {mqc_pass.name}")

    runner = (StreamedCompile(model, passes, context, stream_inputs, work_folder=output.parent if write else None)
              if streamed else None)
    try:
        report.passes = (runner.run(on_pass=on_pass) if runner is not None
                         else PassManager(passes, context).run(model, on_pass=on_pass))
        if task is not None:
            progress.remove_task(task)
        remove_unused_initializers(model.graph)  # e.g. norm gammas a fold replaced; onnxruntime warns about each
        if runner is None:
            report.quality = measure(gate_reference, model, held_out, disjoint)
            if gate_reference is not source:
                report.quality["reference"] = ("the float32 widening of the bfloat16 model (onnxruntime cannot run "
                                               "bfloat16)")
        elif held_out:
            report.quality = quality_figures(*runner.gate_outputs(source, held_out), disjoint)
        else:
            report.quality = {"skipped": "no samples to check on"}
        _finish(report, model, limits, start, output, inputs, write, runner)
    finally:
        if runner is not None:
            runner.close()
    return report


def _streams(stream: bool | None, model: ir.Model, passes: list, precision: dict[str, str], verify: bool) -> bool:
    """Whether this compile runs layer by layer: asked for (checked), or by default above the size threshold."""
    if stream is None:
        if weight_bytes(model) < STREAM_THRESHOLD_BYTES or precision or verify:
            return False
        try:
            streaming_plan(passes)
        except StreamingError:
            return False
        return True
    if stream:
        streaming_plan(passes)
        if precision:
            raise StreamingError("--stream: half-precision models are not streamed; give the float32 export")
        if verify:
            raise StreamingError("--stream: --verify runs the whole model; it cannot be combined with --stream")
    return stream


def _finish(report: CompileReport, model: ir.Model, limits: Limits, start: float, output: Path, inputs: list[Path],
            write: bool, runner: StreamedCompile | None) -> None:
    """Store the report in the model, write it (or the rejected form) and raise the quality gate's rejection."""
    rejections = limits.violations(report.quality)
    report.seconds = round(time.perf_counter() - start, 2)
    model.metadata_props[REPORT_KEY] = _without_timings(report).to_json()
    if write:
        save_model(model, rejected_path(output) if rejections else output, protected=inputs,
                   callback=release_after_write() if runner is not None else None)
    if rejections:
        kept = f"; the model is kept as {rejected_path(output)}" if write else ""
        raise QualityRejected(f"quality gate rejected {output.name}: {'; '.join(rejections)}{kept}", report)


def compile_package(
    source: str | Path,
    output: str | Path,
    recipe: str | Recipe = "w8a8",
    num_samples: int | None = None,
    fmt: str = "qdq",
    exclude: Sequence[str] = (),
    verify: bool = False,
    verify_rtol: float = DEFAULT_VERIFY_RTOL,
    progress: Any = None,
    allow_partial: bool = False,
    limits: Limits = NO_LIMITS,
    executor: LocalExecutor | None = None,
) -> dict[str, CompileReport]:
    """Compile every quantizable component of a model directory (or packaged model name) into ``output``."""
    hooks = package_hooks()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    num_samples = num_samples or recipe.samples or DEFAULT_SAMPLES  # the recipe's choice unless asked otherwise
    try:
        model_dir = Path(os.path.abspath(hooks.resolve(str(source))))
    except FileNotFoundError as exc:
        raise InputModelError(str(exc)) from exc
    output = Path(os.path.abspath(output))
    if output == model_dir or model_dir in output.parents or os.path.realpath(output) == os.path.realpath(model_dir):
        raise OutputPathError(f"refusing to overwrite the input model directory {model_dir} (or write inside it)")
    if os.path.lexists(output) and (output.is_symlink() or not is_model_dir(output)):
        raise OutputPathError(f"output {output} exists and is not a model directory; refusing to replace it")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise OutputPathError(f"output folder is missing or not writable: {output.parent}")
    manifest = read_manifest(model_dir)
    files = component_paths(model_dir, manifest)
    entries = folder_entries(model_dir)
    if not any(name in files for name in QUANTIZED_COMPONENTS):
        raise InputModelError(f"{model_dir} has no vision or decoder component to quantize")
    components = {path.relative_to(model_dir) for path in files.values()}
    reports: dict[str, CompileReport] = {}
    staging = FolderStaging(output)
    try:
        for entry in entries:
            if entry in components or entry.name.endswith(".onnx.data") or any(p.startswith(".") for p in entry.parts):
                continue
            source_path, target = model_dir / entry, staging.path / entry
            if source_path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source_path, target, follow_symlinks=False)
        kept_float = []
        for component, modality in QUANTIZED_COMPONENTS.items():
            if component not in files:
                continue
            relative = files[component].relative_to(model_dir)
            component_recipe = recipe.for_component(component)
            if component_recipe is None:
                kept_float.append(component)
                continue
            window = {"text_window": recipe.text_window} if recipe.text_window and component == "decoder" else {}
            samples = list(hooks.calibration_feeds(model_dir, component, num_samples, **window))
            gate = ([labelled.feed for labelled in hooks.validation_feeds(model_dir, component, gate_size(num_samples))]
                    if hooks.validation_feeds is not None else None)
            target = staging.path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                reports[component] = compile_file(
                    files[component], target, component_recipe, feeds=lambda s=samples: s,
                    num_samples=len(samples), fmt=fmt, exclude=exclude,
                    verify=verify, verify_rtol=verify_rtol, default_modality=modality, progress=progress,
                    allow_partial=allow_partial, limits=limits,
                    gate_feeds=(lambda g=gate: g) if gate is not None else None, executor=executor,
                    feeds_origin={"source": f"{manifest.get('name', model_dir.name)} calibration set (easy-vqa train "
                                            "split + text)", **window},
                )
            except QualityRejected as exc:  # keep what was compiled beside the output, as <output>.rejected
                os.replace(rejected_path(target), target)
                kept = rejected_path(output)
                shutil.rmtree(kept, ignore_errors=True)
                os.replace(staging.path, kept)
                raise QualityRejected(f"{component}: {exc}; the model directory is kept as {kept}", exc.report) from None
        _copy_float_components(model_dir, staging.path, [files[c] for c in files if c not in reports])
        manifest["compiled"] = {"recipe": recipe.name, "format": fmt, "source": model_dir.name,
                                "components": sorted(reports), "float_components": kept_float,
                                "mqc_version": _version()}
        (staging.path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.commit()
    except OSError as exc:
        raise OutputPathError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        staging.discard()
    return reports


def _copy_float_components(model_dir: Path, staging: Path, files: list[Path]) -> None:
    """Components kept in float are copied with exactly the external data files they reference (checked)."""
    for file in files:
        try:
            header = onnx.load(str(file), load_external_data=False)
        except Exception as exc:
            raise InputModelError(f"not a readable ONNX model ({type(exc).__name__}): {file}") from exc
        check_external_data(header, file.parent)
        locations = {e.value for _, t in tensor_protos(header) if t.data_location == onnx.TensorProto.EXTERNAL
                     for e in t.external_data if e.key == "location"}
        for path in [file, *(file.parent / location for location in sorted(locations))]:
            target = staging / path.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target, follow_symlinks=False)


def compile(
    source: str | Path,
    output: str | Path,
    recipe: str | Recipe = "w8a8",
    **options: Any,
) -> CompileReport | dict[str, CompileReport]:
    """Compile a model file, a model directory or a packaged model name. See :func:`compile_file`."""
    path = Path(source)
    if path.suffix == ".onnx" or (os.path.lexists(path) and not path.is_dir()):
        return compile_file(path, output, recipe, **options)
    options.pop("calib", None)
    if options.pop("stream", None) or options.pop("stream_inputs", "float") != "float":
        raise StreamingError("--stream compiles one .onnx file (a decoder); give the component's file")
    return compile_package(source, output, recipe, **options)
