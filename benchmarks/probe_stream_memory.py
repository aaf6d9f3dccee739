"""Where a layer-streamed compile's memory goes, block by block (issue 16: the per-block growth at the 7B shape).

Runs ``mqc compile --stream`` of one decoder file in this process with hooks: a sampler prints the anonymous RSS
every few seconds labelled with the phase (weight passes, block calibration, GPTQ jobs, ...), and after every block
it prints the anonymous RSS, the peak, the anonymous mappings of ``--map-mb`` or more (``/proc/self/smaps``), the
numpy arrays of ``--array-mb`` or more that Python objects hold (also through the tuples and dicts CPython does not
track, such as ``SampleTreeSum``'s nodes), and the live ``TensorStats`` that still hold Gram nodes.

    python benchmarks/probe_stream_memory.py DECODER.onnx --work /tmp/probe --recipe quarot --samples 4 --blocks 3

Session 11 (BENCHMARKS.md): at the Qwen2-VL-7B shape each layer left one float64 and two float32 19,968² buffers.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from pathlib import Path

import numpy as np
from mqc.passes import gptq_weights

import mqc.streaming as streaming
from mqc.calibration import TensorStats
from mqc.compiler import compile_file

PHASE = ["start"]
START = time.time()


def process_memory() -> dict[str, float]:
    """RssAnon and VmHWM of this process, in GB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                found[key] = int(value.split()[0]) / 2**20
    return found


def anonymous_mappings(min_mb: int) -> list[tuple[str, int]]:
    """(address range, anonymous MiB) of every mapping with at least ``min_mb`` MiB of anonymous pages."""
    mappings, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and all(c in "0123456789abcdef-" for c in first):
                current = [first, 0]
                mappings.append(current)
            elif line.startswith("Anonymous:") and current is not None:
                current[1] = int(line.split()[1]) // 1024
    return [(address, mb) for address, mb in mappings if mb >= min_mb]


def held_arrays(min_bytes: int) -> list[tuple[tuple[int, ...], str, list[str]]]:
    """Base arrays of ``min_bytes`` or more reachable from a gc-tracked object directly or through one untracked
    tuple/dict/list, with the holders' type names."""
    found: dict[int, tuple[tuple[int, ...], str, list[str]]] = {}

    def note(array: np.ndarray, holder: str) -> None:
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        if base.nbytes >= min_bytes:
            found.setdefault(id(base), (base.shape, str(base.dtype), []))[2].append(holder)

    for owner in gc.get_objects():
        for item in gc.get_referents(owner):
            if isinstance(item, np.ndarray):
                note(item, type(owner).__name__)
            elif isinstance(item, (tuple, list, dict)) and not gc.is_tracked(item):
                inner = item.values() if isinstance(item, dict) else item
                for value in inner:
                    if isinstance(value, np.ndarray):
                        note(value, f"{type(owner).__name__}>{type(item).__name__}")
    return list(found.values())


def gram_holders() -> int:
    """Live TensorStats whose Gram sum still holds nodes."""
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, TensorStats) and obj.gram_sum is not None and obj.gram_sum.blocks)


def labelled(owner: type, name: str, label: str) -> None:
    """Wrap ``owner.name`` so the sampler reports ``label`` while it runs."""
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        previous, PHASE[0] = PHASE[0], label
        try:
            return original(self, *args, **kwargs)
        finally:
            PHASE[0] = previous

    setattr(owner, name, wrapper)


def sample_memory(every: float) -> None:
    last = None
    while True:
        memory = process_memory()
        key = (PHASE[0], round(memory["RssAnon"], 1))
        if key != last:
            print(f"  t={time.time() - START:6.0f}s {PHASE[0]:24s} anon {memory['RssAnon']:.2f} GB "
                  f"peak {memory['VmHWM']:.2f}", flush=True)
            last = key
        time.sleep(every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="folder for the output and the stream's spill file")
    parser.add_argument("--recipe", default="quarot")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=0, help="stop after this many blocks (0: run to the end)")
    parser.add_argument("--array-mb", type=int, default=200)
    parser.add_argument("--map-mb", type=int, default=400)
    parser.add_argument("--every", type=float, default=5.0, help="sampler period, seconds")
    args = parser.parse_args()

    labelled(streaming.StreamedCompile, "_calibrate", "block calibration")
    labelled(streaming.StreamedCompile, "_forward", "block forward")
    labelled(gptq_weights.GptqWeightsPass, "_quantize", "gptq jobs")
    labelled(gptq_weights.GptqWeightsPass, "_emit", "gptq emit")
    offload, done = streaming.StreamedCompile._offload, [0]

    def after_block(self, weights):
        offload(self, weights)
        gc.collect()
        memory = process_memory()
        print(f"AFTER BLOCK {done[0]} t={time.time() - START:.0f}s anon {memory['RssAnon']:.2f} GB peak "
              f"{memory['VmHWM']:.2f}; TensorStats with Gram nodes: {gram_holders()}", flush=True)
        print(f"   arrays: {held_arrays(args.array_mb << 20)}", flush=True)
        print(f"   anonymous mappings: {anonymous_mappings(args.map_mb)}", flush=True)
        done[0] += 1
        PHASE[0] = f"after block {done[0]}"
        if args.blocks and done[0] >= args.blocks:
            raise SystemExit(f"stopped after {done[0]} blocks")

    streaming.StreamedCompile._offload = after_block
    PHASE[0] = "weight passes"
    threading.Thread(target=sample_memory, args=(args.every,), daemon=True).start()
    args.work.mkdir(parents=True, exist_ok=True)
    compile_file(args.model, args.work / "model.onnx", args.recipe, num_samples=args.samples, stream=True)


if __name__ == "__main__":
    main()
