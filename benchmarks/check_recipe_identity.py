"""Recipe identity check: every built-in recipe must compile to the same graphs and initializers after a refactor.

Each case is one ``mqc compile`` command line, run in this process:

- on a tiny random-weight llama decoder (2 layers, hidden 64) exported by the project's own exporter
  (``mqc.models.testing.export_tiny("llama")``, seed 0), as a single ``decoder.onnx`` with synthetic calibration
  feeds (``--samples N``; ``random_feeds`` is seeded), for every built-in recipe and the ``--bits``/``--acts``
  forms;
- on the packaged tiny VLM (``~/.cache/mqc/tiny-vlm``, the package's own calibration set, ``--samples N``) for
  the recipes given with ``--vlm-recipes`` (a representative subset by default: the full set takes hours on 2 cores).

Every ``.onnx`` the compile writes gets a canonical digest: the graph inputs and outputs, every node in graph order
(op type, domain, attributes, inputs and outputs written by producer position: ``node 12 output 0``, a graph input
by name, an initializer by dtype, shape and content hash) and every initializer's dtype, shape and SHA-256. Value
and node names are not part of the structural digest, so an internal rename compares equal; they are digested
separately and a difference is printed as a note (``--strict-names`` makes it a failure). Metadata (the compile
report with its timings) is not compared.

    python benchmarks/check_recipe_identity.py --out benchmarks/results/recipe_identity.json
    python benchmarks/check_recipe_identity.py --compare benchmarks/results/recipe_identity.json
    python benchmarks/check_recipe_identity.py --models tiny-vlm \
        --compare benchmarks/results/recipe_identity_vlm_baseline.json.gz     # every built-in recipe, --samples 2

The tiny-VLM baseline (gzip) was taken at main ea473c7 (session 5) with one BLAS thread; every recipe of it compiled
to the same digests after session 6's refactors (session 7).

``--compare`` recompiles the cases of the baseline, prints every difference and exits 1 on any.
Each compile's seconds are printed and stored (a secondary output; they vary with the machine's load).
Where ``mqc compile`` has ``--allow-partial`` it is passed: a recipe whose pass cannot apply to a model (a vision
recipe on the llama decoder) then writes what the other passes did, as every compile did before that flag existed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS thread: numpy's multi-threaded reductions (rotations, GPTQ, SVD) round differently with the thread count,
# so digests taken at another thread count differ in the last bits of every rewritten weight.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import numpy_helper

#: Recipes on the tiny llama: every built-in recipe of the baseline, plus CLI forms.
LLAMA_FORMS = [
    "masquant --bits w8a8", "masquant --acts static", "masquant --bits w8a8 --acts static",
    "mquant-paper --bits w8a8", "masquant-rot --acts static",
]
#: The tiny-VLM subset run by default.
VLM_DEFAULT = ["mquant-paper", "quarot", "w8a8", "masquant-rot-g64", "masquant", "smoothquant"]
#: Recipes that were removed because a CLI form reproduces them: name -> the form that replaces it.
REPLACED: dict[str, str] = {}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _tensor_digest(tensor: onnx.TensorProto) -> str:
    try:
        array = numpy_helper.to_array(tensor)
        payload = array.tobytes()
    except Exception:  # a type numpy cannot hold: fall back to the serialized payload without its name
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = ""
        payload = copy.SerializeToString()
    return f"{onnx.TensorProto.DataType.Name(tensor.data_type)}{list(tensor.dims)}:{_sha(payload)}"


def _attribute(attr: onnx.AttributeProto) -> Any:
    kind = attr.type
    if kind == onnx.AttributeProto.TENSOR:
        return _tensor_digest(attr.t)
    if kind == onnx.AttributeProto.TENSORS:
        return [_tensor_digest(t) for t in attr.tensors]
    if kind == onnx.AttributeProto.GRAPH:
        return _graph_digest(attr.g)["digest"]
    if kind == onnx.AttributeProto.GRAPHS:
        return [_graph_digest(g)["digest"] for g in attr.graphs]
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and np.isnan(value):
        return "nan"
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    return value


def _graph_digest(graph: onnx.GraphProto, outer: dict[str, str] | None = None) -> dict[str, Any]:
    """Canonical lines of ``graph``: producer-position references instead of value names."""
    refs: dict[str, str] = dict(outer or {})
    initializers = {}
    for init in graph.initializer:
        digest = _tensor_digest(init)
        initializers[init.name] = digest
        refs[init.name] = f"init:{digest}"
    for value in graph.input:
        if value.name not in initializers:
            refs[value.name] = f"input:{value.name}"
    nodes, names = [], []
    for index, node in enumerate(graph.node):
        attrs = {a.name: _attribute(a) for a in sorted(node.attribute, key=lambda a: a.name)}
        line = json.dumps([node.domain or "ai.onnx", node.op_type, [refs.get(i, f"outer:{i}") if i else "" for i in node.input],
                           len(node.output), attrs], sort_keys=True, default=str)
        nodes.append(f"{node.op_type}|{_sha(line.encode())}")
        names.append(f"{node.name}|{','.join(node.output)}")
        for position, out in enumerate(node.output):
            if out:
                refs[out] = f"node{index}:{position}"
    inputs = [f"{v.name}:{v.type.SerializeToString().hex()}" for v in graph.input if v.name not in initializers]
    outputs = [f"{v.name}:{refs.get(v.name, '?')}" for v in graph.output]
    body = json.dumps([inputs, outputs, nodes, sorted(initializers.values())])
    return {"digest": _sha(body.encode()), "inputs": inputs, "outputs": outputs, "nodes": nodes,
            "initializers": sorted(initializers.values()), "names": _sha("\n".join(names).encode()),
            "node_names": names}


def model_digest(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=True)
    digest = _graph_digest(model.graph)
    digest["opsets"] = sorted(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    return digest


def _compile(model: str, output: Path, form: str, samples: int) -> tuple[str | None, float]:
    """Run ``mqc compile MODEL -o OUTPUT --recipe FORM --samples N`` in process; the error line, if any, and seconds."""
    from mqc.cli import main

    name, *rest = form.split()
    name = REPLACED.get(name, name)
    args = ["compile", model, "-o", str(output), "--samples", str(samples), "--recipe", *name.split(), *rest]
    if _supports_allow_partial():  # a recipe that cannot apply on this model compiles what applies, as before
        args.append("--allow-partial")
    start = time.perf_counter()
    stderr = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stderr(stderr):
            main(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code in (130, 143):  # Ctrl-C or SIGTERM (the CLI turns both into an exit): stop the whole check
            raise
        if exc.code:
            error = f"exit {exc.code}"
    except Exception as exc:  # the baseline records a failing case as failing
        error = f"{type(exc).__name__}: {exc}"
    if error:
        lines = [line for line in stderr.getvalue().splitlines() if "error" in line.lower()]
        error += (": " + lines[-1].strip()) if lines else ""
    return error, round(time.perf_counter() - start, 1)


def _supports_allow_partial() -> bool:
    from mqc.cli import compile_command

    return any(param.name == "allow_partial" for param in compile_command.params)


def _outputs(output: Path) -> dict[str, Path]:
    if output.is_dir():
        manifest = json.loads((output / "manifest.json").read_text())
        return {c: output / f for c, f in manifest["components"].items()}
    return {"model": output}


def run_case(model_label: str, model: str, form: str, samples: int, workdir: Path) -> dict[str, Any]:
    folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in form)
    output = workdir / model_label / (folder if model_label == "tiny-vlm" else f"{folder}.onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    error, seconds = _compile(model, output, form, samples)
    result: dict[str, Any] = {"seconds": seconds}
    if error:
        result["error"] = error
    else:
        result["outputs"] = {name: model_digest(path) for name, path in _outputs(output).items()}
    print(f"{model_label:9s} {form:40s} {seconds:8.1f} s  " + (error or "ok"), flush=True)
    shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    return result


def _diff_output(where: str, base: dict[str, Any], new: dict[str, Any], strict_names: bool) -> list[str]:
    problems = []
    if base["digest"] == new["digest"] and base.get("opsets") == new.get("opsets"):
        if base["names"] != new["names"]:
            changed = [f"{a} -> {b}" for a, b in zip(base["node_names"], new["node_names"], strict=False) if a != b]
            note = f"{where}: names differ ({len(changed)} nodes), e.g. {changed[:3]}"
            (problems.append if strict_names else print)(("" if strict_names else "note: ") + note)
        return problems
    for key in ("opsets", "inputs", "outputs"):
        if base.get(key) != new.get(key):
            problems.append(f"{where}: {key} differ: {base.get(key)} -> {new.get(key)}")
    bn, nn = base["nodes"], new["nodes"]
    if len(bn) != len(nn):
        problems.append(f"{where}: {len(bn)} nodes -> {len(nn)}")
    for index, (a, b) in enumerate(zip(bn, nn, strict=False)):
        if a != b:
            problems.append(f"{where}: node {index} {base['node_names'][index]} ({a}) -> "
                            f"{new['node_names'][index]} ({b})")
    gone = sorted(set(base["initializers"]) - set(new["initializers"]))
    added = sorted(set(new["initializers"]) - set(base["initializers"]))
    for init in gone:
        problems.append(f"{where}: initializer gone: {init}")
    for init in added:
        problems.append(f"{where}: initializer new: {init}")
    return problems or [f"{where}: digest differs"]


def compare(baseline: dict[str, Any], current: dict[str, Any], strict_names: bool) -> list[str]:
    problems = []
    for model_label, cases in baseline["cases"].items():
        for form, base in cases.items():
            new = current["cases"].get(model_label, {}).get(form)
            where = f"{model_label} {form}"
            if new is None:
                problems.append(f"{where}: not run")
                continue
            if base.get("error") or new.get("error"):
                if base.get("error") != new.get("error"):
                    problems.append(f"{where}: error {base.get('error')!r} -> {new.get('error')!r}")
                continue
            for name, digest in base["outputs"].items():
                if name not in new["outputs"]:
                    problems.append(f"{where}: output {name} missing")
                    continue
                problems += _diff_output(f"{where} [{name}]", digest, new["outputs"][name], strict_names)
            for name in set(new["outputs"]) - set(base["outputs"]):
                problems.append(f"{where}: new output {name}")
    return problems


def _builtin_names() -> list[str]:
    from mqc.recipes import builtin_recipes

    return sorted(builtin_recipes())


def _tiny_llama(workdir: Path) -> Path:
    folder = workdir / "tiny-llama-model"
    if not (folder / "decoder.onnx").exists():
        from mqc.models.testing import export_tiny

        export_tiny("llama", folder)
    return folder / "decoder.onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Write the digests here (JSON).")
    parser.add_argument("--compare", type=Path, help="Baseline JSON: recompile its cases and report every difference.")
    parser.add_argument("--models", default="tiny-llama,tiny-vlm", help="Comma-separated: tiny-llama, tiny-vlm.")
    parser.add_argument("--llama-recipes", nargs="*", help="Forms on the tiny llama (default: all built-ins + forms).")
    parser.add_argument("--vlm-recipes", nargs="*", default=VLM_DEFAULT, help="Forms on the tiny VLM.")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--vlm", default="tiny-vlm", help="Packaged model name or model folder.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mqc-identity"))
    parser.add_argument("--strict-names", action="store_true", help="A renamed node or value is a difference too.")
    args = parser.parse_args()

    baseline = None
    if args.compare:
        opener = gzip.open if args.compare.suffix == ".gz" else open
        with opener(args.compare, "rt", encoding="utf-8") as file:
            baseline = json.load(file)
    models = args.models.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if baseline is not None:
        plan = {m: list(cases) for m, cases in baseline["cases"].items() if m in models}
        samples = baseline["samples"]
    else:
        samples = args.samples
        plan = {}
        if "tiny-llama" in models:
            plan["tiny-llama"] = args.llama_recipes or _builtin_names() + LLAMA_FORMS
        if "tiny-vlm" in models:
            plan["tiny-vlm"] = args.vlm_recipes
    result: dict[str, Any] = {"samples": samples, "cases": {}}
    for model_label, forms in plan.items():
        source = str(_tiny_llama(args.workdir)) if model_label == "tiny-llama" else args.vlm
        if model_label == "tiny-llama":
            result["tiny_llama_input"] = model_digest(Path(source))["digest"]
        cases = result["cases"].setdefault(model_label, {})
        for form in forms:
            cases[form] = run_case(model_label, source, form, samples, args.workdir)
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))
    if baseline is None:
        return 0
    if baseline.get("tiny_llama_input") not in (None, result.get("tiny_llama_input")):
        print("warning: the tiny llama input graph differs from the baseline's (exporter changed?)")
    problems = compare({"cases": {m: baseline["cases"][m] for m in plan}}, result, args.strict_names)
    for problem in problems:
        print(problem)
    print(f"{sum(len(c) for c in plan.values())} cases compared, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
