"""Scale benchmark: compile time and peak RSS of synthetic decoders of real models' shapes, whole-model and
layer-streamed (``mqc compile --stream``), against depth and width.

Each model is built once with :mod:`mqc.models.synthetic` (random weights, external data) under ``--workdir``;
each compile runs as its own ``mqc compile`` process under ``/usr/bin/time -v``, so its peak resident memory is its
own; its CPU time (user + system) is recorded beside the wall time, which other jobs on a shared machine
stretch. Calibration is synthetic (``--samples 4``, 16 tokens each). Results are merged into the JSON file by run name,
so runs can be done one at a time:

    python benchmarks/bench_scale.py --workdir /work/scale --runs smollm2-135m:30:w8a8:stream qwen2-1.5b:28:w8a8:whole
    python benchmarks/bench_scale.py --plot --svg benchmarks/results/scale.svg

A run is SHAPE:LAYERS:RECIPE:MODE with MODE ``whole`` (the whole-model compile), ``stream`` or ``ray`` (the
whole-model compile on a local Ray cluster of ``RAY_WORKERS`` workers). A Ray run's peak RSS is what
``/usr/bin/time`` reports: the largest single process among the compile and the descendants it reaped, not the
cluster's sum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mqc.models.synthetic import SHAPES, DecoderShape

SAMPLES = 4
SEQ_LEN = 16
RAY_WORKERS = 2
DEFAULT_OUT = Path(__file__).parent / "results" / "scale.json"


def _timed(command: list[str], env: dict[str, str], timeout: int) -> dict:
    """Wall time and peak RSS of ``command`` (``/usr/bin/time -v``), with its exit status and last output lines."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "timeout", str(timeout), *command], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    lines = [line for line in text.splitlines() if "onnxruntime" not in line and not line.startswith("\t")]
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_gb": round(int(peak.group(1)) / 1024 ** 2, 3) if peak else None, "output": lines[-4:]}


def _block_bytes(shape: DecoderShape) -> dict[str, float]:
    """fp32 GB of one layer, of the head (final norm + lm_head), and of the cached block inputs (samples x stream,
    rotary tables and mask)."""
    kv = shape.kv_heads * shape.head_dim
    layer = (2 * shape.hidden ** 2 + 2 * shape.hidden * kv + 3 * shape.hidden * shape.mlp
             + (shape.hidden + 2 * kv) * shape.qkv_bias + 2 * shape.hidden) * 4
    head = (shape.hidden * shape.vocab + shape.hidden) * 4
    cache = SAMPLES * (SEQ_LEN * shape.hidden + 2 * SEQ_LEN * shape.head_dim + SEQ_LEN ** 2) * 4
    return {"layer_gb": round(layer / 1e9, 3), "head_gb": round(head / 1e9, 3), "activation_cache_mb": round(cache / 1e6, 3)}


def _model(workdir: Path, shape_name: str, layers: int, env: dict[str, str]) -> tuple[Path, dict | None]:
    path = workdir / f"{shape_name}-{layers}" / "decoder.onnx"
    if path.exists():
        return path, None
    build = _timed([sys.executable, "-m", "mqc.models.synthetic", shape_name, "-o", str(path), "--layers",
                    str(layers)], env, 3600)
    if build["exit"] != 0:
        raise SystemExit(f"building {path} failed: {build['output']}")
    return path, build


def run(spec: str, workdir: Path, mqc: str, timeout: int, keep: bool) -> dict:
    shape_name, layers, recipe, mode = spec.split(":")
    shape = SHAPES[shape_name]
    env = {**os.environ, "MQC_ORT_THREADS": "1", "OMP_NUM_THREADS": "1"}
    source, build = _model(workdir, shape_name, int(layers), env)
    output = workdir / "out" / f"{spec.replace(':', '-')}.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [mqc, "compile", str(source), "-o", str(output), "--recipe", recipe, "--samples", str(SAMPLES),
               "--stream" if mode == "stream" else "--no-stream"]
    if mode == "ray":
        command += ["--ray", "local", "--ray-workers", str(RAY_WORKERS)]
    result = _timed(command, env, timeout)
    weights = sum(p.stat().st_size for p in source.parent.glob("decoder.onnx*"))
    record = {"run": spec, "shape": shape_name, "layers": int(layers), "hidden": shape.hidden, "mlp": shape.mlp,
              "recipe": recipe, "mode": mode, "source_gb": round(weights / 1e9, 3), **_block_bytes(shape), **result}
    if build is not None:
        record["build"] = {"wall_s": build["wall_s"], "peak_rss_gb": build["peak_rss_gb"]}
    if not keep:
        for file in output.parent.glob(output.name + "*"):
            file.unlink()
        for stray in output.parent.glob(".mqc-stream-*"):
            shutil.rmtree(stray, ignore_errors=True)
    return record


def merge(path: Path, records: list[dict]) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "memory_gb": _memory_gb(),
                       "note": "shared with other jobs; every compile with MQC_ORT_THREADS=1 and OMP_NUM_THREADS=1",
                       "python": platform.python_version()}
    data["settings"] = {"samples": SAMPLES, "seq_len": SEQ_LEN, "calibration": "synthetic (mqc's random feeds)"}
    for record in records:
        data["runs"][record["run"]] = record
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return round(int(line.split()[1]) / 1024 ** 2, 1)
    return 0.0


def svg_plot(data: dict) -> str:
    """Wall time and peak RSS against the number of layers, one line per shape, recipe and mode (an SVG chart)."""
    from mqc.plot import Panel, Series, render_svg

    lines: dict[tuple[str, str, str], list[dict]] = {}
    for r in data["runs"].values():
        if r["exit"] == 0:
            lines.setdefault((r["shape"], r["recipe"], r["mode"]), []).append(r)
    panels = [Panel("compile wall time against depth", "decoder layers", "wall s"),
              Panel("compile peak RSS against depth", "decoder layers", "peak RSS GB")]
    for color, ((shape, recipe, mode), runs) in enumerate(sorted(lines.items())):
        runs.sort(key=lambda r: r["layers"])
        label = f"{shape} {recipe} {mode}"
        dashed = mode == "whole"
        panels[0].series.append(Series(label, [(r["layers"], r["wall_s"]) for r in runs], color, dashed))
        panels[1].series.append(Series(label, [(r["layers"], r["peak_rss_gb"]) for r in runs], color, dashed))
    return render_svg(panels)


def markdown_table(data: dict) -> str:
    """The runs as the BENCHMARKS.md table."""
    runs = sorted(data["runs"].values(), key=lambda r: (r["hidden"], r["layers"], r["mode"], r["recipe"]))
    lines = ["| shape | layers | recipe | mode | fp32 weights GB | largest block GB (layer / head) | wall s | CPU s | "
             "peak RSS GB | exit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['shape']} | {r['layers']} | {r['recipe']} | {r['mode']} | {r['source_gb']:.2f} | "
                     f"{r['layer_gb']:.3f} / {r['head_gb']:.3f} | {r['wall_s']:.1f} | {r.get('cpu_s', '')} | "
                     f"{r['peak_rss_gb']:.2f} | {r['exit']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], help="SHAPE:LAYERS:RECIPE:MODE runs to do.")
    parser.add_argument("--workdir", type=Path, default=Path("/work/scale"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--keep", action="store_true", help="Keep the compiled models (they are deleted by default).")
    parser.add_argument("--drop-models", action="store_true", help="Delete each source model after its runs.")
    parser.add_argument("--plot", action="store_true", help="Print the results file as the BENCHMARKS.md table.")
    parser.add_argument("--svg", type=Path, help="Draw the results file's time and peak RSS against depth here.")
    args = parser.parse_args()
    mqc = str(Path(sys.executable).with_name("mqc"))
    for spec in args.runs:
        record = run(spec, args.workdir, mqc, args.timeout, args.keep)
        merge(args.out, [record])
        print(json.dumps({k: record[k] for k in ("run", "exit", "wall_s", "cpu_s", "peak_rss_gb")}), flush=True)
    if args.drop_models:
        for spec in args.runs:
            shape_name, layers = spec.split(":")[:2]
            shutil.rmtree(args.workdir / f"{shape_name}-{layers}", ignore_errors=True)
    data = json.loads(args.out.read_text()) if args.out.exists() else None
    if args.plot and data is not None:
        print(markdown_table(data))
    if args.svg is not None and data is not None:
        args.svg.write_text(svg_plot(data))


if __name__ == "__main__":
    main()
