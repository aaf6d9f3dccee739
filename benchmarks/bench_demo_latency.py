"""Prefill and decode cost of a float model folder against compiled ones, robust to a shared machine's load.

Wall time on a loaded machine measures the other tenants; this script also reports each step's CPU time with one
onnxruntime thread (``time.process_time``: the process's own CPU, nothing spins), which does not grow with load.
The models take turns run by run, as in ``mqc eval``. Prefill: one easy-vqa prompt (vision + embed + decoder);
decode: the median step with the KV cache after it.

    python benchmarks/bench_demo_latency.py tiny-vlm out/tiny-vlm.mquant-sink.mqc --runs 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from mqc.models.data import vqa_test_set
from mqc.models.packaged import resolve
from mqc.models.pipeline import Pipeline


def _one_run(pipe: Pipeline, item, steps: int) -> dict[str, float]:
    prompts = [pipe.prompt(item.question, True)]
    pixels = pipe.pixel_values([item.image_path])
    wall, cpu = time.perf_counter(), time.process_time()
    feeds = pipe.prefill_feeds(prompts, pipe.image_embeds(pixels))
    logits, past = pipe.run_decoder(feeds)
    out = {"prefill_wall": time.perf_counter() - wall, "prefill_cpu": time.process_time() - cpu}
    mask, pos, nxt = feeds["attention_mask"], feeds["position_ids"][..., -1:], logits[:, -1].argmax(-1)
    walls, cpus = [], []
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos + 1
        wall, cpu = time.perf_counter(), time.process_time()
        step = {"inputs_embeds": pipe.embed_ids(nxt[:, None]), "attention_mask": mask, "position_ids": pos,
                "modality_ids": np.zeros((1, 1), np.int64), **past}
        logits, past = pipe.run_decoder({k: v for k, v in step.items() if k in pipe._decoder_inputs})
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        nxt = logits[:, -1].argmax(-1)
    out.update(decode_wall=statistics.median(walls), decode_cpu=statistics.median(cpus))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model")
    parser.add_argument("compiled", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dirs = [resolve(args.float_model), *args.compiled]
    pipes = [Pipeline(d, providers=["CPUExecutionProvider"], threads=args.threads) for d in dirs]
    item = vqa_test_set()[0]
    runs: list[list[dict[str, float]]] = [[] for _ in pipes]
    for r in range(args.runs + 1):
        for m, pipe in enumerate(pipes):
            result = _one_run(pipe, item, args.steps if r else 2)
            if r:  # round 0 warms up
                runs[m].append(result)
    table = {}
    for d, results in zip(dirs, runs, strict=True):
        table[Path(d).name] = {k: 1000 * statistics.median(r[k] for r in results) for k in results[0]}
    base = table[Path(dirs[0]).name]
    print(f"threads {args.threads}, {args.runs} interleaved runs, medians in ms (ratio to float)")
    for name, row in table.items():
        print(f"{name:40s} " + "  ".join(f"{k} {v:8.1f} ({v / base[k]:.2f})" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "ms": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
