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
from mqc.calibration import Calibrator, TensorStats
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
    """Base arrays of ``min_bytes`` or more reachable from Python, with the type names on one path to each: a walk
    from every gc-tracked object and every thread's executing frames (their locals, which ``gc.get_objects`` does
    not list) through any depth of containers, tracked or not."""
    import sys

    found: dict[int, tuple[tuple[int, ...], str, list[str]]] = {}
    seen: set[int] = set()
    frames = []
    for frame in sys._current_frames().values():
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
    queue = [(obj, type(obj).__name__) for obj in [*gc.get_objects(), *frames, *(f.f_locals for f in frames)]]
    while queue:
        obj, path = queue.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            if base.nbytes >= min_bytes:
                found.setdefault(id(base), (base.shape, str(base.dtype), []))[2].append(path)
            continue
        if isinstance(obj, (str, bytes, int, float, type)):
            continue
        label = path if len(path) < 120 else path[:117] + "..."
        queue.extend((ref, f"{label}>{type(ref).__name__}") for ref in gc.get_referents(obj) if id(ref) not in seen)
    return list(found.values())


def malloc_mapped_gb() -> tuple[float, int]:
    """The C allocator's own count of its mmap'd chunks (glibc ``mallinfo2``: hblkhd in GB, hblks): memory the
    allocator handed out and that was not freed, as opposed to mappings some library made itself."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.hblkhd / 2**30, info.hblks


def live_sessions() -> dict[str, int]:
    """Live onnxruntime session and OrtValue wrappers (their native memory is invisible to the array walk)."""
    import onnxruntime as ort

    counts = {"InferenceSession": 0, "OrtValue": 0}
    for obj in gc.get_objects():
        if isinstance(obj, ort.InferenceSession):
            counts["InferenceSession"] += 1
        elif isinstance(obj, ort.OrtValue):
            counts["OrtValue"] += 1
    return counts


def gram_holders() -> int:
    """Live TensorStats whose Gram sum still holds nodes."""
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, TensorStats) and obj.gram_sum is not None and obj.gram_sum.blocks)


#: Phase labels after whose end the arrays Python holds are walked too (``--walk-after``), and the array size.
WALK_AFTER: set[str] = set()
WALK_BYTES = [200 << 20]


def labelled(owner: type, name: str, label: str) -> None:
    """Wrap ``owner.name`` so the sampler reports ``label`` while it runs, and report the memory at its end."""
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        previous, PHASE[0] = PHASE[0], label
        try:
            return original(self, *args, **kwargs)
        finally:
            PHASE[0] = previous
            gc.collect()
            mapped, chunks = malloc_mapped_gb()
            print(f"  end of {label}: anon {process_memory()['RssAnon']:.2f} GB; malloc's mapped chunks "
                  f"{mapped:.2f} GB in {chunks}", flush=True)
            if label in WALK_AFTER:
                print(f"   arrays: {held_arrays(WALK_BYTES[0])}", flush=True)

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
    parser.add_argument("--walk-after", action="append", default=[],
                        help="also walk the arrays Python holds at the end of this phase (repeatable)")
    args = parser.parse_args()

    WALK_AFTER.update(args.walk_after)
    WALK_BYTES[0] = args.array_mb << 20
    labelled(streaming.BlockSession, "__init__", "block session opened")
    labelled(streaming.BlockSession, "run", "block session run")
    labelled(streaming.BlockSession, "close", "block session closed")
    labelled(Calibrator, "accumulate", "statistics of a sample")
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
        print(f"   malloc's mapped chunks (GB, count): {malloc_mapped_gb()}; live: {live_sessions()}", flush=True)
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
