"""MASQuant variants of the tiny-VLM results table, sharing one MAS learning run per (bits, acts) setting.

MAS (the expensive, learned step) writes a float, function-preserving graph; CMC (and its ablations) then only
lower that graph. So each MAS setting (the passes up to and including ``mas``) is learned once into
``WORKDIR/_mas-{acts}-w{bits}-{hash}`` and every variant that shares it compiles ``cmc`` from there; a later run
with the same setting reuses that folder (``stage_figures.json``). The same passes in the same order as the
one-recipe compile, on the same calibration samples. Compile time and peak RSS are recorded per stage in each folder's ``compile_figures.json``;
evaluate the folders with ``bench_recipes.py --reuse`` (the folder and manifest recipe name is the variant spec).

    python benchmarks/bench_masquant_stages.py --samples 64 --workdir out/final \
        --variants masquant masquant-no-cmc masquant-cmc-nowhite masquant-static
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipes import folder_name, recipe_from_spec


def _run_stage(source: str, output: Path, recipe: dict, samples: int) -> dict:
    """Compile ``source`` with ``recipe`` through ``bench_recipes.py``'s worker (its own process and peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / "recipe.json"
        recipe_file.write_text(json.dumps(recipe))
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_recipes.py")), "--worker",
                              "--model", source, "--recipe", str(recipe_file), "--output", str(output),
                              "--samples", str(samples)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{output.name}: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _stage_key(stage_recipe: dict) -> str:
    """A folder name per MAS setting: acts, bits and a hash of the passes up to MAS (rotations, overrides)."""
    mas = stage_recipe["passes"][-1]
    digest = hashlib.sha1(json.dumps(stage_recipe, sort_keys=True).encode()).hexdigest()[:8]
    return f"{mas['acts']}-w{mas['w_bits']}-{digest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vlm")
    parser.add_argument("--variants", nargs="+", required=True, help="recipe specs whose passes end with mas, cmc")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="MAS steps per epoch (default: one per sample)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("out/bench_recipes"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    learned: dict[str, tuple[Path, dict]] = {}
    for spec in args.variants:
        recipe = recipe_from_spec(spec)
        names = [step["pass"] for step in recipe.passes]
        if names[-2:] != ["mas", "cmc"]:
            raise SystemExit(f"{spec}: the recipe must end with mas, cmc (got {names})")
        mas = dict(recipe.passes[-2], torch_threads=args.torch_threads)
        if args.steps_per_epoch:
            mas["steps_per_epoch"] = args.steps_per_epoch
        key = json.dumps(mas, sort_keys=True)
        if key not in learned:
            stage_recipe = {"passes": [*recipe.passes[:-2], mas], "components": recipe.components}
            stage = args.workdir / f"_mas-{_stage_key(stage_recipe)}"
            saved = stage / "stage_figures.json"
            if saved.is_file() and json.loads(saved.read_text())["recipe"] == stage_recipe:
                figures = json.loads(saved.read_text())["figures"]
                print(f"{stage.name}: MAS stage reused ({figures['compile_s']} s when learned)", flush=True)
            else:
                figures = _run_stage(args.model, stage, {"name": stage.name, **stage_recipe}, args.samples)
                saved.write_text(json.dumps({"recipe": stage_recipe, "figures": figures}))
                print(f"{stage.name}: MAS learned in {figures['compile_s']} s", flush=True)
            learned[key] = (stage, figures)
        stage, mas_figures = learned[key]
        output = args.workdir / folder_name(spec)
        cmc_recipe = {"name": spec, "passes": [recipe.passes[-1]], "components": recipe.components}
        figures = _run_stage(str(stage), output, cmc_recipe, args.samples)
        figures = {"compile_s": round(mas_figures["compile_s"] + figures["compile_s"], 1),
                   "compile_peak_mb": max(mas_figures["compile_peak_mb"], figures["compile_peak_mb"]),
                   "mas_stage": {"folder": stage.name, **mas_figures}, "cmc_stage": figures}
        (output / "compile_figures.json").write_text(json.dumps(figures))
        print(f"{spec}: cmc in {figures['cmc_stage']['compile_s']} s", flush=True)


if __name__ == "__main__":
    main()
