"""Compile benchmark: `mqc compile --recipe w8a8` against onnxruntime's `quantize_static` on one model.

Both tools get the same float decoder and the same calibration samples; each compile runs in its own subprocess so
its peak resident memory is its own. Reported: compile wall time, peak memory, output SQNR of the logits against
the float model on held-out samples, and CPU latency (median) of float vs each quantized model, all in one run.

    python benchmarks/bench_compile.py --model tiny-vlm --samples 32 --out benchmarks/results/compile.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _feeds(model_dir: Path, count: int, offset: int = 0) -> list[dict[str, np.ndarray]]:
    from mqc.models.calibration import calibration_feeds

    feeds = list(calibration_feeds(model_dir, "decoder", count + offset))
    return feeds[offset:]


def _worker(args: argparse.Namespace) -> None:
    """Runs one compile and prints its time and this process's peak RSS as JSON."""
    model_dir = Path(args.model_dir)
    source = model_dir / "decoder.onnx"
    feeds = []
    for file in sorted(Path(args.feeds).glob("*.npz")):
        with np.load(file) as archive:
            feeds.append({key: archive[key] for key in archive.files})
    start = time.perf_counter()
    if args.tool == "mqc":
        import mqc

        mqc.compile(source, args.output, "w8a8", feeds=lambda: feeds)
    else:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(feeds)

            def get_next(self):
                return next(self.items, None)

        quantize_static(
            str(source), args.output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def _latency_ms(path: Path, feed: dict[str, np.ndarray], repeats: int) -> float:
    from mqc.session import open_session

    session = open_session(path, ["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    run_feed = {k: v for k, v in feed.items() if k in names}
    session.run(["logits"], run_feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], run_feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def _sqnr(reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    from mqc.quantizer import sqnr_db
    from mqc.session import open_session

    ref_session, cand_session = open_session(reference), open_session(candidate)
    names = {i.name for i in ref_session.get_inputs()}
    refs, outs = [], []
    for feed in feeds:
        run_feed = {k: v for k, v in feed.items() if k in names}
        refs.append(ref_session.run(["logits"], run_feed)[0].ravel())
        outs.append(cand_session.run(["logits"], run_feed)[0].ravel())
    return sqnr_db(np.concatenate(refs), np.concatenate(outs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vlm", help="packaged model name or model directory")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--feeds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    from mqc.models.packaged import resolve

    model_dir = resolve(args.model)
    source = model_dir / "decoder.onnx"
    eval_feeds = _feeds(model_dir, args.eval_samples, offset=args.samples)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Calibration samples are built once here, so the workers' peak memory is the compile's own.
        feed_dir = Path(tmp) / "feeds"
        feed_dir.mkdir()
        for index, feed in enumerate(_feeds(model_dir, args.samples)):
            np.savez(feed_dir / f"{index:04d}.npz", **feed)
        outputs = {"mqc w8a8": Path(tmp) / "mqc.onnx", "ort quantize_static": Path(tmp) / "ort.onnx"}
        for label, output in outputs.items():
            tool = "mqc" if label.startswith("mqc") else "ort"
            cmd = [sys.executable, __file__, "--worker", "--tool", tool, "--model-dir", str(model_dir),
                   "--output", str(output), "--feeds", str(feed_dir)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[label] = json.loads(line)
        feed = eval_feeds[0]
        results["float"] = {"latency_ms": _latency_ms(source, feed, args.repeats)}
        for label, output in outputs.items():
            results[label]["sqnr_db"] = _sqnr(source, output, eval_feeds)
            results[label]["latency_ms"] = _latency_ms(output, feed, args.repeats)
            results[label]["size_mb"] = sum(p.stat().st_size for p in output.parent.glob(output.name + "*")) / 2**20
    results["float"]["size_mb"] = sum(p.stat().st_size for p in model_dir.glob("decoder.onnx*")) / 2**20
    meta = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
            "model": str(source), "calibration_samples": args.samples, "eval_samples": args.eval_samples,
            "prompt_tokens": int(feed["inputs_embeds"].shape[1])}
    print(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
