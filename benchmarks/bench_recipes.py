"""Results table: compile the packaged tiny VLM with several recipes and evaluate them against the float model.

Every recipe is compiled with the package's own calibration set (easy-vqa train split + text), then all compiled
folders are evaluated in one `mqc.models.evaluate.evaluate` run next to the float model: easy-vqa accuracy,
perplexity, top-1 agreement and KL vs float, size, latency. Compile time and peak RSS are measured per recipe in a
subprocess of its own.

    python benchmarks/bench_recipes.py --limit 200 --recipes w8a8 w4a8-rtn smoothquant quarot mquant-paper \
        --out benchmarks/results/recipes_tiny_vlm.json

A recipe may carry parameter overrides, ``NAME:PASS.PARAM=VALUE:...`` (values parsed as JSON), e.g. the CMC rank
curve ``masquant:cmc.min_rank=0:cmc.rank_ratio=0.2``, or a component setting such as
``components.vision.float=true`` (the decoder alone quantized); its folder is named after the whole spec.
``--compile-only`` compiles into ``--workdir`` and stops; a later ``--reuse`` run evaluates every folder side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RECIPES = [
    "w8a8", "w4a8-rtn", "smoothquant", "quarot", "mquant-static", "mquant-msq-aifs", "mquant-paper", "mquant", "mquant-w8a8-vision",
    "masquant", "masquant-static", "masquant-no-cmc", "masquant-cmc-nowhite",
]


def recipe_from_spec(spec: str):
    """``NAME[:PASS.PARAM=VALUE...]`` -> the recipe with those overrides, renamed to the spec."""
    from mqc.recipes import Recipe, load_recipe, with_overrides

    name, *assignments = spec.split(":")
    overrides: dict[str, dict] = {}
    components: dict[str, dict] = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        pass_name, _, param = key.partition(".")
        if pass_name == "components":  # components.vision.float=true
            component, _, field = param.partition(".")
            components.setdefault(component, {})[field] = json.loads(value)
        else:
            overrides.setdefault(pass_name, {})[param] = json.loads(value)
    recipe = with_overrides(load_recipe(name), overrides)
    if not assignments:
        return recipe
    return Recipe(spec, recipe.description, recipe.passes, {**recipe.components, **components})


def folder_name(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.replace("=", "-"))


def lower_folder(source: Path, target: Path) -> Path:
    """A copy of the compiled folder ``source`` with every quantized component lowered to ``--format mqc``.

    The same QDQ graphs (no second calibration): ``passes/lower_runtime_ops.py`` rewrites them to the ai.mqc ops,
    and its record joins each component's compile report.
    """
    import onnx_ir as ir
    from mqc.passes.lower_runtime_ops import lower_to_runtime_ops

    from mqc.ir import save_model
    from mqc.report import REPORT_KEY, CompileReport

    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    manifest = json.loads((source / "manifest.json").read_text())
    for component in manifest["compiled"]["components"]:
        file = manifest["components"][component]
        model = ir.load(str(source / file))
        record = lower_to_runtime_ops(model)
        report = CompileReport.from_json(model.metadata_props[REPORT_KEY])
        report.passes.append(record)
        report.format = "mqc"
        model.metadata_props[REPORT_KEY] = report.to_json()
        save_model(model, staging / file)
    manifest["compiled"]["format"] = "mqc"
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _compile_worker(args: argparse.Namespace) -> None:
    from mqc.compiler import compile_package

    start = time.perf_counter()
    compile_package(args.model, args.output, recipe_from_spec(args.recipe), num_samples=args.samples)
    seconds = time.perf_counter() - start
    print(json.dumps({"compile_s": round(seconds, 1),
                      "compile_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vlm")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples per component")
    parser.add_argument("--limit", type=int, default=200, help="easy-vqa test questions (1000 = all)")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench_recipes"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recipes_tiny_vlm.json"))
    parser.add_argument("--reuse", action="store_true", help="evaluate folders already compiled by an earlier run")
    parser.add_argument("--compile-only", action="store_true", help="compile into --workdir, do not evaluate")
    parser.add_argument("--mqc-format", nargs="*", default=[], metavar="RECIPE",
                        help="also evaluate these recipes lowered to --format mqc (folder NAME.mqc)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _compile_worker(args)
        return
    from mqc.models.evaluate import evaluate, table_text
    from mqc.models.packaged import resolve

    float_dir = resolve(args.model)
    args.workdir.mkdir(parents=True, exist_ok=True)
    compile_figures: dict[str, dict] = {}
    compiled = []
    for recipe in args.recipes:
        output = args.workdir / folder_name(recipe)
        manifest = output / "manifest.json"
        if args.reuse and manifest.exists() and json.loads(manifest.read_text()).get("compiled", {}).get("recipe") == recipe:
            figures_file = output / "compile_figures.json"
            compile_figures[recipe] = json.loads(figures_file.read_text()) if figures_file.exists() else {}
            compile_figures[recipe]["reused"] = str(output)
            compiled.append(output)
            print(f"{recipe}: reusing {output}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", "--model", str(float_dir), "--recipe", recipe,
               "--output", str(output), "--samples", str(args.samples)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            compile_figures[recipe] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
            print(f"{recipe}: compile failed: {compile_figures[recipe]['error']}", flush=True)
            continue
        compile_figures[recipe] = json.loads(run.stdout.strip().splitlines()[-1])
        (output / "compile_figures.json").write_text(json.dumps(compile_figures[recipe]))
        compiled.append(output)
        print(f"{recipe}: compiled in {compile_figures[recipe]['compile_s']} s", flush=True)
    if args.compile_only:
        return
    for recipe in args.mqc_format:
        source = args.workdir / folder_name(recipe)
        if source in compiled:
            compiled.append(lower_folder(source, source.with_name(source.name + ".mqc")))
    result = evaluate(float_dir, compiled, limit=args.limit, progress=True)
    result["compile"] = compile_figures
    result["calibration_samples"] = args.samples
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table_text(result))


if __name__ == "__main__":
    main()
