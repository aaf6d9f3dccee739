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

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mqc.calibration import IMAGE, TEXT, load_feeds, random_feeds
from mqc.errors import InputModelError, OutputPathError
from mqc.ir import load_model, remove_unused_initializers, save_model
from mqc.model_map import build_model_map
from mqc.pass_manager import DEFAULT_VERIFY_RTOL, CompileContext, PassManager
from mqc.quality_gate import NO_LIMITS, Limits, QualityRejected, hold_out, measure, rejected_path
from mqc.recipes import Recipe, load_recipe, pass_class
from mqc.report import REPORT_KEY, CompileReport

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


def _check_output(source: Path, output: Path) -> None:
    if output.resolve() == source.resolve():
        raise OutputPathError(f"refusing to overwrite the input model {source}; choose another -o path")
    parent = output.parent
    if not parent.is_dir():
        raise OutputPathError(f"output folder does not exist (or is not a folder): {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output folder is not writable: {parent}")


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
    num_samples: int = DEFAULT_SAMPLES,
    fmt: str = "qdq",
    exclude: Sequence[str] = (),
    verify: bool = False,
    verify_rtol: float = DEFAULT_VERIFY_RTOL,
    default_modality: int = TEXT,
    progress: Any = None,
    write: bool = True,
    limits: Limits = NO_LIMITS,
) -> CompileReport:
    """Compile one ONNX file. ``feeds`` (a callable returning an iterable of feed dicts) overrides ``calib``."""
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if write:
        _check_output(source, output)
    passes = recipe.instantiate() + _lowering_passes(fmt)
    model = load_model(source)
    calibration: dict[str, Any]
    if feeds is not None:
        calibration = {"source": "model package"}
    elif calib is not None:
        samples = load_feeds(calib, model)
        feeds = lambda: samples  # noqa: E731
        calibration = {"source": str(calib), "samples": len(samples)}
    else:
        samples = random_feeds(model, num_samples)
        feeds = lambda: samples  # noqa: E731
        calibration = {"source": "synthetic (no --calib given): random inputs, scales are not representative",
                       "samples": len(samples)}
    samples, held_out, disjoint = hold_out(feeds)  # the quality gate's samples (mqc.quality_gate)
    feeds = lambda: samples  # noqa: E731
    calibration["samples"], calibration["held_out_for_quality_gate"] = len(samples), len(held_out) if disjoint else 0
    context = CompileContext(feeds, verify=verify, verify_rtol=verify_rtol, default_modality=default_modality,
                             exclude=exclude, progress=progress)
    context.num_samples = calibration.get("samples", num_samples)
    report = CompileReport(
        recipe=recipe.name, recipe_passes=recipe.passes, source=str(source), format=fmt,
        model_summary=build_model_map(model).summary(), calibration=calibration, mqc_version=_version(),
    )
    task = progress.add_task(f"{recipe.name}: passes", total=len(passes)) if progress is not None else None

    def on_pass(mqc_pass) -> None:
        if task is not None:
            progress.update(task, description=f"{recipe.name}: {mqc_pass.name}")

    report.passes = PassManager(passes, context).run(model, on_pass=on_pass)
    if task is not None:
        progress.remove_task(task)
    remove_unused_initializers(model.graph)  # e.g. norm gammas a fold replaced; onnxruntime warns about each
    report.quality = measure(source, model, held_out, disjoint)
    rejections = limits.violations(report.quality)
    report.seconds = round(time.perf_counter() - start, 2)
    model.metadata_props[REPORT_KEY] = report.to_json()
    if write:
        save_model(model, rejected_path(output) if rejections else output)
    if rejections:
        kept = f"; the model is kept as {rejected_path(output)}" if write else ""
        raise QualityRejected(f"quality gate rejected {output.name}: {'; '.join(rejections)}{kept}", report)
    return report


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def compile_package(
    source: str | Path,
    output: str | Path,
    recipe: str | Recipe = "w8a8",
    num_samples: int = DEFAULT_SAMPLES,
    fmt: str = "qdq",
    exclude: Sequence[str] = (),
    verify: bool = False,
    verify_rtol: float = DEFAULT_VERIFY_RTOL,
    progress: Any = None,
    limits: Limits = NO_LIMITS,
) -> dict[str, CompileReport]:
    """Compile every quantizable component of a model directory (or packaged model name) into ``output``."""
    from mqc.models.calibration import calibration_feeds
    from mqc.models.packaged import resolve

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    try:
        model_dir = resolve(str(source))
    except FileNotFoundError as exc:
        raise InputModelError(str(exc)) from exc
    output = Path(output)
    if output.resolve() == model_dir.resolve():
        raise OutputPathError(f"refusing to overwrite the input model directory {model_dir}")
    if output.exists() and not is_model_dir(output):
        raise OutputPathError(f"output {output} exists and is not a model directory; refusing to replace it")
    if not output.parent.exists() or not os.access(output.parent, os.W_OK):
        raise OutputPathError(f"output folder is missing or not writable: {output.parent}")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    components = manifest.get("components", {})
    if not any(name in components for name in QUANTIZED_COMPONENTS):
        raise InputModelError(f"{model_dir} has no vision or decoder component to quantize")
    reports: dict[str, CompileReport] = {}
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for entry in model_dir.iterdir():
            if entry.name in {components.get(c) for c in QUANTIZED_COMPONENTS} or entry.name.endswith(".onnx.data"):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        kept_float = []
        for component, modality in QUANTIZED_COMPONENTS.items():
            if component not in components:
                continue
            file = components[component]
            component_recipe = recipe.for_component(component)
            if component_recipe is None:
                shutil.copy2(model_dir / file, staging / file)  # its weights are copied with the pass-through data
                kept_float.append(component)
                continue
            samples = list(calibration_feeds(model_dir, component, num_samples))
            try:
                reports[component] = compile_file(
                    model_dir / file, staging / file, component_recipe, feeds=lambda s=samples: s,
                    num_samples=len(samples), fmt=fmt, exclude=exclude, verify=verify, verify_rtol=verify_rtol,
                    default_modality=modality, progress=progress, limits=limits,
                )
            except QualityRejected as exc:  # keep what was compiled beside the output, as <output>.rejected
                os.replace(rejected_path(staging / file), staging / file)
                kept = rejected_path(output)
                shutil.rmtree(kept, ignore_errors=True)
                os.replace(staging, kept)
                raise QualityRejected(f"{component}: {exc}; the model directory is kept as {kept}", exc.report) from None
            reports[component].calibration.update({"source": f"{manifest.get('name', model_dir.name)} calibration "
                                                   "set (easy-vqa train split + text)"})
        # Pass-through components (the embedding table) whose data lived beside them are copied with their data.
        for file in components.values():
            data = model_dir / f"{file}.data"
            if data.exists() and not (staging / data.name).exists():
                shutil.copy2(data, staging / data.name)
        manifest["compiled"] = {"recipe": recipe.name, "format": fmt, "source": str(model_dir),
                                "components": sorted(reports), "float_components": kept_float,
                                "mqc_version": _version()}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if output.exists():
            retired = output.with_name(f".{output.name}.old")
            os.replace(output, retired)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return reports


def compile(
    source: str | Path,
    output: str | Path,
    recipe: str | Recipe = "w8a8",
    **options: Any,
) -> CompileReport | dict[str, CompileReport]:
    """Compile a model file, a model directory or a packaged model name. See :func:`compile_file`."""
    path = Path(source)
    if path.suffix == ".onnx" or path.is_file():
        return compile_file(path, output, recipe, **options)
    options.pop("calib", None)
    return compile_package(source, output, recipe, **options)
