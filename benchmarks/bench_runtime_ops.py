"""Kernel benchmarks of the ai.mqc runtime ops (issue 5).

CPU (default): single linears at the tiny VLM's shapes (SmolLM2-135M decoder: hidden 576, kv 192, intermediate
1536, vocab 49152; DINOv2-S vision tower: width 384, mlp 1536), prefill (M = 256 tokens, 257 for the vision
tower) and decode (M = 1), in three formats measured side by side in one process, interleaved run by run:

* ``float``: ``MatMul(X, W) [+ bias]`` in fp32;
* ``qdq``: the foundation's QDQ form (QuantizeLinear/DequantizeLinear around the MatMul), which onnxruntime's CPU
  EP fuses into its own int8 kernels (MatMulIntegerToFloat) at ``ORT_ENABLE_ALL``;
* ``mqc w8`` / ``mqc w4``: the QDQ model lowered by passes/lower_runtime_ops.py to ``ai.mqc::QuantLinear``;
* with ``--dynamic`` also ``qdq w8 dyn`` (the per-token dynamic activation fake-quant of passes/cmc.py, MASQuant's
  setting, in front of the same QDQ weight) and ``mqc w8 dyn`` / ``mqc w4 dyn`` (it lowered, ``dynamic=1``).

``--group-size G`` instead times per-group against per-channel weights (QuantLinear ``group_size=G``, lowered from
a blocked QDQ weight) at the decoder's linear shapes, static activations: ``float``, ``mqc w8`` / ``mqc w8 gG`` and
``mqc w4`` / ``mqc w4 gG``, interleaved in the same way.

    python benchmarks/bench_runtime_ops.py --threads 2 --repeat 50 --markdown [--dynamic]
    python benchmarks/bench_runtime_ops.py --threads 2 --repeat 30 --markdown --group-size 64
    python benchmarks/bench_runtime_ops.py --gpu      # on a CUDA machine with torch: kernels vs torch fp16 matmul
    bash benchmarks/gpu_check.sh                      # the same from a bare checkout: builds the library first

The GPU mode calls the CUDA kernels through libmqc_ops_cuda.so's C entry points (ctypes) on torch tensors, checks
each against a float64 reference on random (never zero) inputs, and times them with CUDA events against
``torch.matmul`` in fp16 (cuBLAS) at prefill (M = 512 to 8192) and decode (M = 1 to 16) shapes: QuantLinear with
static and with dynamic per-token activation scales (W8A8, W4A8), per-group weights (``group_size``, static and
dynamic, against the same weights per channel), dynamic with the CMC low-rank branch, Hadamard and RMSNorm+quant. It needs only torch and numpy (not mqc installed: the library is found through
``$MQC_RUNTIME_OPS_DIR`` or the checkout), exits with status 1 when a check fails, and ``--tables FILE`` also writes
the markdown tables to FILE.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# The GPU mode runs from a bare checkout (benchmarks/gpu_check.sh: torch, numpy, onnx, a CPU onnxruntime, no mqc
# install, maybe no onnx_ir) and needs none of these; a failed import only disables the CPU modes.
try:
    import ml_dtypes
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from mqc.passes.lower_runtime_ops import lower_to_runtime_ops
    from mqc.runtime_ops import register_library
    from onnx import TensorProto, helper, numpy_helper
except Exception as exc:  # ImportError, or an installed package that fails on import
    _CPU_IMPORT_ERROR: Exception | None = exc
else:
    _CPU_IMPORT_ERROR = None

IR_VERSION = 10

#: (component, layer, K, N, M prefill)
CPU_SHAPES = [
    ("decoder", "q_proj / o_proj", 576, 576, 256),
    ("decoder", "k_proj / v_proj", 576, 192, 256),
    ("decoder", "gate_proj / up_proj", 576, 1536, 256),
    ("decoder", "down_proj", 1536, 576, 256),
    ("decoder", "lm_head", 576, 49152, 256),
    ("vision", "qkv", 384, 1152, 257),
    ("vision", "fc1", 384, 1536, 257),
    ("vision", "fc2", 1536, 384, 257),
]


def _float_model(w: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["Y"])]
    graph = helper.make_graph(nodes, "float", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR_VERSION)


def _qdq_model(w: np.ndarray, bias: np.ndarray, act_scale: float, bits: int, group_size: int = 0) -> onnx.ModelProto:
    """The QDQ linear with weights per output channel, or per group of ``group_size`` input rows (ONNX blocked
    quantization on axis 0 of the [K, N] weight)."""
    qmax = 127 if bits == 8 else 7
    K, N = w.shape
    if group_size:
        w_scale = (np.abs(w.reshape(K // group_size, group_size, N)).max(axis=1) / qmax).astype(np.float32)
        wq = np.clip(np.rint(w / np.repeat(w_scale, group_size, axis=0)), -qmax - 1, qmax)
        dequant = {"axis": 0, "block_size": group_size}
    else:
        w_scale = (np.abs(w).max(axis=0) / qmax).astype(np.float32)
        wq = np.clip(np.rint(w / w_scale), -qmax - 1, qmax)
        dequant = {"axis": 1}
    int_type = np.int8 if bits == 8 else ml_dtypes.int4
    inits = [numpy_helper.from_array(np.array(act_scale, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(wq.astype(int_type), "wq"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(w_scale.shape, int_type), "wz"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], **dequant),
             helper.make_node("MatMul", ["xdq", "wdq"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["Y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR_VERSION)


def _dynamic_qdq_model(w: np.ndarray, bias: np.ndarray, bits: int) -> onnx.ModelProto:
    """``_qdq_model`` with X's Q/DQ replaced by passes/cmc.py's dynamic per-token quantizer (built by cmc.py)."""
    from mqc.graph.qdq import insert_activation_dynamic

    model = ir.serde.deserialize_model(_qdq_model(w, bias, 1.0, bits))
    x = model.graph.inputs[0]
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    matmul.replace_input_with(0, x)
    insert_activation_dynamic(model.graph, x, 8, [matmul])
    ir.passes.common.RemoveUnusedNodesPass()(model)
    proto = ir.serde.serialize_model(model)
    proto.ir_version = IR_VERSION
    return proto


def _lowered(qdq: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(qdq)
    record = lower_to_runtime_ops(model)
    if record.changed != 1:
        raise RuntimeError(f"lowering did not fire: {record.skipped}")
    proto = ir.serde.serialize_model(model)
    proto.ir_version = IR_VERSION
    return proto


def _options(threads: int, custom: bool, spin: bool) -> ort.SessionOptions:
    """``spin=False`` stops onnxruntime's worker threads from busy-waiting between ops: on a shared VM the spinning
    threads compete with the one doing the work, which can make a decode step several times its kernel time."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if custom:
        register_library(options, kind="cpu")
    return options


def _session(model: onnx.ModelProto, threads: int, spin: bool = True) -> ort.InferenceSession:
    options = _options(threads, any(o.domain == "ai.mqc" for o in model.opset_import), spin)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _time_side_by_side(sessions: dict[str, ort.InferenceSession], feed: dict, repeat: int) -> dict[str, float]:
    """Median (and, under ``name + " min"``, best) milliseconds per run; the formats take turns run by run so
    load drift on the shared machine hits them alike."""
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeat):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {**{k: statistics.median(v) for k, v in times.items()}, **{f"{k} min": min(v) for k, v in times.items()}}


def cpu_machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AVX512-VNNI" if "avx512_vnni" in flags else ("AVX2" if "avx2" in flags else "baseline")
    return f"{model}, {os.cpu_count()} cores visible, {isa}; onnxruntime {ort.__version__}, Python {platform.python_version()}"


def run_cpu(threads: int, repeat: int, shapes=CPU_SHAPES, dynamic: bool = False, spin: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for component, layer, K, N, M_prefill in shapes:
        w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
        bias = (rng.standard_normal(N) * 0.1).astype(np.float32)
        models = {"float": _float_model(w, bias)}
        qdq8 = _qdq_model(w, bias, 0.03, 8)
        models["qdq w8"] = qdq8
        models["mqc w8"] = _lowered(qdq8)
        models["mqc w4"] = _lowered(_qdq_model(w, bias, 0.03, 4))
        if dynamic:
            models["qdq w8 dyn"] = _dynamic_qdq_model(w, bias, 8)
            models["mqc w8 dyn"] = _lowered(models["qdq w8 dyn"])
            models["mqc w4 dyn"] = _lowered(_dynamic_qdq_model(w, bias, 4))
        sessions = {k: _session(m, threads, spin) for k, m in models.items()}
        for phase, M in (("prefill", M_prefill), ("decode", 1)):
            x = rng.standard_normal((1, M, K)).astype(np.float32)
            ms = _time_side_by_side(sessions, {"X": x}, repeat if M > 1 or N < 10000 else max(repeat, 20))
            rows.append({"component": component, "layer": layer, "K": K, "N": N, "M": M, "phase": phase, **ms})
            print(f"{component:8s} {layer:22s} M={M:4d} K={K:5d} N={N:6d}  "
                  + "  ".join(f"{k} {v:8.3f} ms" for k, v in ms.items() if not k.endswith("min")), flush=True)
    return rows


#: The decoder's linears (lm_head aside): the shapes of a per-group static W4A8 recipe's QuantLinears.
GROUP_SHAPES = [s for s in CPU_SHAPES if s[0] == "decoder" and s[1] != "lm_head"]


def run_cpu_groups(threads: int, repeat: int, group_size: int, spin: bool = True) -> list[dict]:
    """Per-group (``group_size``) against per-channel QuantLinear at the decoder's shapes, static activations."""
    rng = np.random.default_rng(0)
    rows = []
    for component, layer, K, N, M_prefill in GROUP_SHAPES:
        w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
        bias = (rng.standard_normal(N) * 0.1).astype(np.float32)
        models = {"float": _float_model(w, bias)}
        for bits in (8, 4):
            models[f"mqc w{bits}"] = _lowered(_qdq_model(w, bias, 0.03, bits))
            models[f"mqc w{bits} g"] = _lowered(_qdq_model(w, bias, 0.03, bits, group_size))
        sessions = {k: _session(m, threads, spin) for k, m in models.items()}
        for phase, M in (("prefill", M_prefill), ("decode", 1)):
            x = rng.standard_normal((1, M, K)).astype(np.float32)
            ms = _time_side_by_side(sessions, {"X": x}, repeat)
            rows.append({"component": component, "layer": layer, "K": K, "N": N, "M": M, "phase": phase, **ms})
            print(f"{layer:22s} M={M:4d} K={K:5d} N={N:6d}  "
                  + "  ".join(f"{k} {v:8.3f} ms" for k, v in ms.items() if not k.endswith("min")), flush=True)
    return rows


def markdown_groups(rows: list[dict], threads: int, repeat: int, group_size: int) -> str:
    out = [f"Machine: {cpu_machine()}; intra-op threads {threads}; {repeat} interleaved runs per cell: median "
           f"(best) ms; the ratios use medians. Per-group weights: one scale per {group_size} input rows "
           "(QuantLinear group_size), static per-tensor activations.", "",
           f"| layer | M | K | N | float | mqc W8A8 | mqc W8A8 g{group_size} | mqc W4A8 | mqc W4A8 g{group_size} | "
           "W8 group / channel | W4 group / channel |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r, k):
        return f"{r[k]:.3f} ({r[k + ' min']:.3f})"

    for r in rows:
        out.append(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {cell(r, 'float')} | {cell(r, 'mqc w8')} | "
                   f"{cell(r, 'mqc w8 g')} | {cell(r, 'mqc w4')} | {cell(r, 'mqc w4 g')} | "
                   f"{r['mqc w8 g'] / r['mqc w8']:.2f} | {r['mqc w4 g'] / r['mqc w4']:.2f} |")
    return "\n".join(out)


def markdown_cpu(rows: list[dict], threads: int, repeat: int) -> str:
    out = [f"Machine: {cpu_machine()}; intra-op threads {threads}; {repeat} interleaved runs per cell: median "
           "(best) ms; the ratios use medians.", "",
           "| component | layer | M | K | N | float | QDQ W8A8 | mqc W8A8 | mqc W4A8 | mqc W8 / float | mqc W8 / QDQ | W4 / W8 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r, k):
        return f"{r[k]:.3f} ({r[k + ' min']:.3f})"

    for r in rows:
        out.append(
            f"| {r['component']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {cell(r, 'float')} | {cell(r, 'qdq w8')} | "
            f"{cell(r, 'mqc w8')} | {cell(r, 'mqc w4')} | {r['mqc w8'] / r['float']:.2f} | {r['mqc w8'] / r['qdq w8']:.2f} | "
            f"{r['mqc w4'] / r['mqc w8']:.2f} |"
        )
    for phase in ("prefill", "decode"):
        sel = [r for r in rows if r["phase"] == phase]
        tot = {k: sum(r[k] for r in sel) for k in ("float", "qdq w8", "mqc w8", "mqc w4")}
        out.append(
            f"| **sum, {phase}** | all layers above | | | | {tot['float']:.3f} | {tot['qdq w8']:.3f} | {tot['mqc w8']:.3f} | "
            f"{tot['mqc w4']:.3f} | {tot['mqc w8'] / tot['float']:.2f} | {tot['mqc w8'] / tot['qdq w8']:.2f} | "
            f"{tot['mqc w4'] / tot['mqc w8']:.2f} |"
        )
    if "mqc w8 dyn" in rows[0]:
        out += ["", "Dynamic per-token activations (MASQuant's setting), same runs:", "",
                "| component | layer | M | K | N | QDQ W8A8 dyn | mqc W8A8 dyn | mqc W4A8 dyn | mqc W8 dyn / QDQ dyn | "
                "mqc W8 dyn / static | mqc W4 dyn / static |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(
                f"| {r['component']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {cell(r, 'qdq w8 dyn')} | "
                f"{cell(r, 'mqc w8 dyn')} | {cell(r, 'mqc w4 dyn')} | {r['mqc w8 dyn'] / r['qdq w8 dyn']:.2f} | "
                f"{r['mqc w8 dyn'] / r['mqc w8']:.2f} | {r['mqc w4 dyn'] / r['mqc w4']:.2f} |"
            )
    return "\n".join(out)


# ---- Whole decoder ---------------------------------------------------------------------------------------------

def _decoder_feed(session: ort.InferenceSession, seq: int, past: int, rng: np.random.Generator) -> dict:
    """Feeds for one step of an exported decoder: ``seq`` new tokens after ``past`` cached ones (text tokens)."""
    sizes = {"batch": 1, "seq": seq, "past": past, "total": past + seq}
    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in inp.shape]
        if "past" in inp.name and len(shape) == 4:
            shape[2] = past
        if inp.name == "attention_mask":
            feed[inp.name] = np.ones(shape, np.int64)
        elif inp.name == "position_ids":
            feed[inp.name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), shape).copy()
        elif inp.type == "tensor(int64)":
            feed[inp.name] = np.zeros(shape, np.int64)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float16 if "float16" in inp.type else np.float32)
    return feed


def run_decoder(name: str, threads: int, repeat: int, workdir: Path, samples: int = 4, recipes: list[str] | None = None,
                spin: bool = True) -> str:
    """float vs QDQ vs mqc for a packaged model's decoder: prefill of 256 tokens and one decode step after 256.

    ``recipes``: compare float, QDQ and mqc for these recipes instead of the standard W8A8/W4A8 (+head) set.
    """
    import json

    from mqc.models.packaged import resolve

    from mqc.compiler import compile_file
    from mqc.ir import save_model

    model_dir = resolve(name)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    decoder = model_dir / manifest["components"]["decoder"]
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"float": decoder}
    from mqc.recipes import Recipe

    def all_linears(bits: int) -> Recipe:  # the recipes leave lm_head in float; these variants quantize it too
        return Recipe(name=f"w{bits}a8-with-head", description="", passes=[
            {"pass": "upgrade_opset"}, {"pass": "fuse_norms"},
            {"pass": "quantize_linears", "weight_bits": bits, "act_bits": 8, "act_method": "minmax", "skip_roles": []}])

    variants = [("w8a8", "w8", False), ("w4a8-rtn", "w4", False), (all_linears(8), "w8+head", True),
                (all_linears(4), "w4+head", True)]
    if recipes:
        variants = [(r, r, False) for r in recipes]
    for recipe, tag, lower_only in variants:
        stem = recipe if isinstance(recipe, str) else recipe.name
        qdq = workdir / f"decoder.{stem}.qdq.onnx"
        if not qdq.exists():
            compile_file(decoder, qdq, recipe=recipe, fmt="qdq", num_samples=samples)
        lowered = workdir / f"decoder.{stem}.mqc.onnx"
        if not lowered.exists():
            model = ir.load(str(qdq))
            record = lower_to_runtime_ops(model)
            print(f"{stem}: {record.notes} skipped={record.skipped[:3]}", flush=True)
            save_model(model, lowered)
        if not lower_only:
            paths[f"qdq {tag}"] = qdq
        paths[f"mqc {tag}"] = lowered
    sessions = {}
    for key, path in paths.items():
        options = _options(threads, key.startswith("mqc"), spin)
        sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    spinning = "" if spin else " (spinning off)"
    if recipes:
        lines = [f"Decoder of `{name}`; machine: {cpu_machine()}; intra-op threads {threads}{spinning}; {repeat} interleaved runs "
                 "per cell: median (best) ms; synthetic calibration.", "",
                 "| step | recipe | float | QDQ | mqc | mqc / float | mqc / QDQ |", "|---|---|---:|---:|---:|---:|---:|"]
        for step, seq, past in (("prefill 256", 256, 0), ("decode (past 256)", 1, 256)):
            feed = _decoder_feed(next(iter(sessions.values())), seq, past, rng)
            ms = _time_side_by_side(sessions, feed, repeat)
            for r in recipes:
                q, m = f"qdq {r}", f"mqc {r}"
                lines.append(f"| {step} | {r} | {ms['float']:.1f} ({ms['float min']:.1f}) | {ms[q]:.1f} ({ms[q + ' min']:.1f}) | "
                             f"{ms[m]:.1f} ({ms[m + ' min']:.1f}) | {ms[m] / ms['float']:.2f} | {ms[m] / ms[q]:.2f} |")
                print(lines[-1], flush=True)
        return "\n".join(lines)
    lines = [f"Decoder of `{name}` ({manifest.get('num_layers')} layers, hidden {manifest.get('hidden_size')}); "
             f"machine: {cpu_machine()}; intra-op threads {threads}{spinning}; {repeat} interleaved runs per cell: median "
             "(best) ms. QDQ and mqc come from the same compile (recipes w8a8 / w4a8-rtn, synthetic calibration; "
             "lm_head stays float in both recipes; the +head columns also quantize lm_head, 576 x 49152).", "",
             "| step | float | QDQ W8A8 | mqc W8A8 | QDQ W4A8 | mqc W4A8 | mqc W8A8 +head | mqc W4A8 +head | mqc W8 / float | "
             "mqc W8 / QDQ W8 | mqc W4 / QDQ W4 | mqc W4 / mqc W8 | +head: W8 / float | +head: W4 / W8 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for step, seq, past in (("prefill 256", 256, 0), ("decode (past 256)", 1, 256)):
        feed = _decoder_feed(next(iter(sessions.values())), seq, past, rng)
        ms = _time_side_by_side(sessions, feed, repeat)

        def cell(k, ms=ms):
            return f"{ms[k]:.1f} ({ms[k + ' min']:.1f})"

        lines.append(f"| {step} | {cell('float')} | {cell('qdq w8')} | {cell('mqc w8')} | {cell('qdq w4')} | {cell('mqc w4')} | "
                     f"{cell('mqc w8+head')} | {cell('mqc w4+head')} | "
                     f"{ms['mqc w8'] / ms['float']:.2f} | {ms['mqc w8'] / ms['qdq w8']:.2f} | {ms['mqc w4'] / ms['qdq w4']:.2f} | "
                     f"{ms['mqc w4'] / ms['mqc w8']:.2f} | {ms['mqc w8+head'] / ms['float']:.2f} | "
                     f"{ms['mqc w4+head'] / ms['mqc w8+head']:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


# ---- GPU --------------------------------------------------------------------------------------------------------

GPU_PREFILL = [(m, k, n) for m in (512, 2048, 4096, 8192) for (k, n) in ((2048, 2048), (4096, 4096), (8192, 8192), (4096, 11008))]
#: Decode rows: M <= 4 runs the __dp4a kernel, 5 to 16 the tensor-core one (quant_linear.cu); the last row checks the
#: latter's edges: rows 8 to 15 partly empty, a partial 32-column block, and a k step count not a multiple of 32.
GPU_DECODE = [(m, k, n) for m in (1, 4, 16) for (k, n) in ((2048, 2048), (4096, 4096), (8192, 8192), (4096, 11008))]
GPU_DECODE += [(11, 1056, 1000)]
#: (phase, M, K, N, rank) of the dynamic QuantLinear with MASQuant's CMC low-rank branch; prefill marks its first
#: half as image tokens (modality_ids), decode passes no modality (the branch applies to every token).
#: Per-group weights (QuantLinear group_size): (phase, M, K, N, group_size). K = 1056 is not a multiple of the CUDA
#: kernels' 64-wide k tile (its zero padding belongs to no group) and N = 1000 leaves partial column tiles.
GPU_GROUPS = [("prefill", 2048, 4096, 4096, 128), ("prefill", 4096, 4096, 11008, 128), ("prefill", 512, 1056, 1000, 32),
              ("decode", 1, 4096, 4096, 128), ("decode", 16, 4096, 11008, 128), ("decode", 3, 1056, 1000, 32),
              ("decode", 11, 1056, 1000, 32)]
#: The last two rows check the low-rank kernel's edges: a rank above its 64-wide rank block and not a multiple of 32,
#: a token count that leaves a partial 8-token tile, and K split in 4 partial sums (launch_geometry.h).
GPU_CMC = [("prefill", 2048, 4096, 4096, 64), ("decode", 1, 4096, 4096, 64), ("decode", 16, 4096, 4096, 64),
           ("prefill", 100, 1056, 1000, 80), ("decode", 3, 1056, 1000, 80)]

#: Bound on max |Y - ref| / max |ref| for QuantLinear with fp16 Y against the float64 reference. The reference
#: recomputes the int8 codes as the kernel must (fp32 IEEE division, half-to-even; the codes and row scales the
#: kernel left in its workspace are compared separately and must match exactly), and the int32 accumulation is
#: exact (|acc| <= K * 128 * 127 < 2^31), so only the epilogue rounds: int32 -> fp32, s_t * w_scale and the
#: product (three fp32 roundings, 3 * 2^-24) and the fp16 store (half an ulp, 2^-11 of the element, so at most
#: 2^-11 of max |ref|): 4.9e-4 in all; 1e-3 leaves a 2x margin.
GPU_REL_TOL = 1e-3
#: The same with the CMC branch: the GEMM's fp16 Y is read back, the branch added in fp32 and the sum stored in
#: fp16 again (two fp16 roundings, 9.8e-4), plus the fp32 sums over K of the branch (at most K * 2^-24 = 2.4e-4 of
#: the branch, which is about a tenth of Y here): 2e-3.
GPU_CMC_REL_TOL = 2e-3


def _cuda_library_path() -> Path:
    """``mqc.runtime_ops.library_path("cuda")`` ($MQC_RUNTIME_OPS_DIR first). When mqc is not importable (a bare
    checkout on a GPU machine, benchmarks/gpu_check.sh), runtime_ops/__init__.py is loaded from its file: it only
    needs the standard library."""
    try:
        from mqc.runtime_ops import library_path
    except Exception:  # not installed, or the package's own dependencies are missing
        spec = importlib.util.spec_from_file_location(
            "_mqc_runtime_ops", Path(__file__).resolve().parents[1] / "runtime_ops" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        library_path = module.library_path
    return library_path("cuda")


def _cuda_lib():
    path = _cuda_library_path()
    print(f"CUDA library: {path}", flush=True)
    lib = ctypes.CDLL(str(path))
    i64, vp, fp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
    lib.mqc_cuda_padded_k.restype = i64
    lib.mqc_cuda_padded_k.argtypes = [i64]
    lib.mqc_cuda_quant_linear_workspace.restype = i64
    lib.mqc_cuda_quant_linear_workspace.argtypes = [i64, i64, i64]
    lib.mqc_cuda_quant_linear.argtypes = [c_int, vp, c_int, i64, i64, i64, vp, fp, fp, c_int, vp, fp, vp, c_int, vp, vp]
    # bits, x, x_kind, M, K, N, w, w_scale, act_scale (host), n_act, ids, bias, dynamic, lowrank_a, lowrank_b, rank, y,
    # y_half, workspace, stream
    lib.mqc_cuda_quant_linear_ex.argtypes = [c_int, vp, c_int, i64, i64, i64, vp, fp, fp, c_int, vp, fp, c_int, fp, fp,
                                             i64, vp, c_int, vp, vp]
    # bits, group_size, then mqc_cuda_quant_linear_ex's arguments from x on (w_scale [K / group_size, N])
    lib.mqc_cuda_quant_linear_group.argtypes = [c_int, i64, vp, c_int, i64, i64, i64, vp, fp, fp, c_int, vp, fp, c_int,
                                                fp, fp, i64, vp, c_int, vp, vp]
    lib.mqc_cuda_hadamard.argtypes = [vp, vp, c_int, i64, i64, i64, fp, vp]
    lib.mqc_cuda_rmsnorm_quant.argtypes = [vp, c_int, i64, i64, fp, fp, ctypes.c_float, vp, vp]
    lib.mqc_cuda_last_error.restype = ctypes.c_char_p
    return lib


def _host_scales(*values: float):
    """Activation scales for the C entry points: HOST fp32 values (they are validated there, then passed to the
    kernels by value), kept alive by the caller as long as the call can run."""
    return (ctypes.c_float * len(values))(*values)


def _cuda_time(fn, repeat: int) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _nonzero_randn(shape: tuple[int, ...], gen, scale: float = 1.0):
    """Normal values moved 0.01 away from zero (fp32, on gen's device): no input is 0, in fp16 either, so a kernel
    that drops or zeroes a term cannot pass unnoticed."""
    import torch

    v = torch.randn(*shape, generator=gen, device=gen.device)
    return torch.where(v >= 0, v + 0.01, v - 0.01) * scale


def _dynamic_scales(x):
    """mqc's per-token scale ``max(absmax / 127, 1e-12)`` in fp32, as float64 [M, 1]."""
    return (x.double().abs().amax(dim=1, keepdim=True) / 127).float().clamp_min(1e-12).double()


def _fp32_codes(x, s):
    """int8 codes (as float64) of x for per-row scales s [M, 1] (fp32 values), as the kernel computes them: the
    float64 quotient of two fp32 values rounded once to fp32 is the IEEE fp32 quotient (53 >= 2 * 24 + 2 bits),
    then half-to-even rounding and the int8 clip."""
    import torch

    return torch.clamp(torch.round((x.double() / s).float().double()), -128, 127)


def _quantized_weights(w, bits: int, Kp: int):
    """Symmetric per-output-channel weights of w [K, N]: codes [N, K] int8, scales [N] fp32, and the device layout
    (int8 [N, Kp], or int4 two per byte [N, Kp / 2] with the low nibble the even k), zero-padded to Kp."""
    import torch

    N, K = w.shape[1], w.shape[0]
    qmax = 127 if bits == 8 else 7
    w_scale = (w.float().abs().amax(dim=0) / qmax).contiguous()
    wq = torch.clamp(torch.round(w.float() / w_scale), -qmax - 1, qmax).to(torch.int8).t().contiguous()
    wq_pad = torch.zeros(N, Kp, dtype=torch.int8, device=w.device)
    wq_pad[:, :K] = wq
    if bits == 8:
        return wq, w_scale, wq_pad
    u = (wq_pad.to(torch.int16) & 0xF).to(torch.uint8)
    return wq, w_scale, (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _grouped_weights(w, bits: int, Kp: int, group_size: int):
    """``_quantized_weights`` with one scale per ``group_size`` input rows: codes [N, K] int8, scales [K / g, N]
    fp32 (QuantLinear's w_scale layout), the same device layout, and the dequantization factor of every code as a
    float64 [K, N] (each row's group scale) for the reference."""
    import torch

    K, N = w.shape
    qmax = 127 if bits == 8 else 7
    w_scale = (w.float().reshape(K // group_size, group_size, N).abs().amax(dim=1) / qmax).contiguous()
    per_row = w_scale.repeat_interleave(group_size, dim=0)
    wq = torch.clamp(torch.round(w.float() / per_row), -qmax - 1, qmax).to(torch.int8).t().contiguous()
    wq_pad = torch.zeros(N, Kp, dtype=torch.int8, device=w.device)
    wq_pad[:, :K] = wq
    if bits == 4:
        u = (wq_pad.to(torch.int16) & 0xF).to(torch.uint8)
        wq_pad = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    return wq, w_scale, wq_pad, per_row.double()


def _workspace_mismatches(workspace, M: int, K: int, Kp: int, codes, scales) -> int:
    """Codes and row scales in quant_linear.cu's workspace (int8 codes [M, Kp], then fp32 scales [M] at the next
    256-byte boundary) that differ from the reference ones: the dynamic mode promises bit-identical codes."""
    import torch

    offset = (M * Kp + 255) // 256 * 256
    got_codes = workspace[: M * Kp].view(torch.int8).view(M, Kp)[:, :K]
    got_scales = workspace[offset : offset + 4 * M].view(torch.float32)
    return int((got_codes.double() != codes).sum()) + int((got_scales.double() != scales.reshape(-1)).sum())


def _launcher(fn, args: tuple, name: str, lib=None):
    def call():
        err = fn(*args)
        if err:
            why = lib.mqc_cuda_last_error().decode() if lib is not None else ""
            raise RuntimeError(f"{name} failed with cudaError {err}" + (f": {why}" if why else ""))

    return call


def _rel_err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def run_gpu(repeat: int) -> tuple[str, list[str]]:
    """GPU kernel tables (markdown) and the list of failed correctness checks (empty when all pass)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs torch with CUDA and a GPU")
    lib = _cuda_lib()
    dev = torch.device("cuda")
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    gen = torch.Generator(device=dev).manual_seed(0)
    failures: list[str] = []
    checks = 0

    def check(what: str, err: float, tol: float, mismatches: int = 0) -> None:
        nonlocal checks
        checks += 1
        if not (err <= tol and mismatches == 0):
            failures.append(f"{what}: max rel err {err:.1e} (tolerance {tol:.0e}), {mismatches} code/scale mismatches")

    lines = [f"Machine: {torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}); median of "
             f"{repeat} runs (CUDA events). Errors: max |Y - ref| / max |ref| against float64 (tolerance {GPU_REL_TOL:.0e}, "
             f"{GPU_CMC_REL_TOL:.0e} with CMC); code/scale mismatches: the kernel's int8 codes and row scales against "
             "the reference's, both calls of the row (must be 0).", "",
             "Static per-tensor activation scale (`mqc_cuda_quant_linear`), fp16 X and Y:", "",
             "| phase | M | K | N | fp16 matmul ms | W8A8 ms | W4A8 ms | W8A8 speed-up | W4A8 speed-up | max rel err W8 | "
             "max rel err W4 | code/scale mismatches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dyn_lines = ["", "Dynamic per-token activation scale (`mqc_cuda_quant_linear_ex`, dynamic = 1; MASQuant's setting), "
                 "same weights and X:", "",
                 "| phase | M | K | N | fp16 matmul ms | W8A8 dyn ms | W4A8 dyn ms | W8A8 dyn speed-up | W4A8 dyn speed-up | "
                 "W8 dyn / static | W4 dyn / static | max rel err W8 | max rel err W4 | code/scale mismatches |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, shapes in (("prefill", GPU_PREFILL), ("decode", GPU_DECODE)):
        for M, K, N in shapes:
            x = _nonzero_randn((M, K), gen).half()
            w = _nonzero_randn((K, N), gen, 0.05).half()
            t_fp16 = _cuda_time(lambda x=x, w=w: torch.matmul(x, w), repeat)
            act_scale = torch.tensor([float(x.abs().max()) / 127], device=dev)
            act_host = _host_scales(float(act_scale))
            Kp = lib.mqc_cuda_padded_k(K)
            workspace = torch.empty(lib.mqc_cuda_quant_linear_workspace(M, K, 0), dtype=torch.uint8, device=dev)
            y = torch.empty(M, N, dtype=torch.float16, device=dev)
            static_s = act_scale.double().view(1, 1).expand(M, 1)
            dyn_s = _dynamic_scales(x)
            scales_codes = {0: (static_s, _fp32_codes(x, static_s)), 1: (dyn_s, _fp32_codes(x, dyn_s))}
            res: dict[tuple[int, int], tuple[float, float]] = {}
            mism = {0: 0, 1: 0}
            for bits in (8, 4):
                wq, w_scale, packed = _quantized_weights(w, bits, Kp)
                wqt = wq.double().t()
                for dynamic in (0, 1):
                    if dynamic:
                        args = (bits, x.data_ptr(), 1, M, K, N, packed.data_ptr(), w_scale.data_ptr(), None, 0, None,
                                None, 1, None, None, 0, y.data_ptr(), 1, workspace.data_ptr(), stream)
                        call = _launcher(lib.mqc_cuda_quant_linear_ex, args, "mqc_cuda_quant_linear_ex", lib)
                    else:
                        args = (bits, x.data_ptr(), 1, M, K, N, packed.data_ptr(), w_scale.data_ptr(), act_host, 1,
                                None, None, y.data_ptr(), 1, workspace.data_ptr(), stream)
                        call = _launcher(lib.mqc_cuda_quant_linear, args, "mqc_cuda_quant_linear", lib)
                    call()
                    torch.cuda.synchronize()
                    s, q = scales_codes[dynamic]
                    n_bad = _workspace_mismatches(workspace, M, K, Kp, q, s)
                    err = _rel_err(y, (q @ wqt) * (s * w_scale.double()))
                    check(f"{phase} M={M} K={K} N={N} W{bits}A8{' dyn' if dynamic else ''}", err, GPU_REL_TOL, n_bad)
                    mism[dynamic] += n_bad
                    res[(bits, dynamic)] = (_cuda_time(call, repeat), err)
            (t8, e8), (t4, e4), (d8, f8), (d4, f4) = res[(8, 0)], res[(4, 0)], res[(8, 1)], res[(4, 1)]
            lines.append(f"| {phase} | {M} | {K} | {N} | {t_fp16:.4f} | {t8:.4f} | {t4:.4f} | {t_fp16 / t8:.2f} | "
                         f"{t_fp16 / t4:.2f} | {e8:.1e} | {e4:.1e} | {mism[0]} |")
            dyn_lines.append(f"| {phase} | {M} | {K} | {N} | {t_fp16:.4f} | {d8:.4f} | {d4:.4f} | {t_fp16 / d8:.2f} | "
                             f"{t_fp16 / d4:.2f} | {d8 / t8:.2f} | {d4 / t4:.2f} | {f8:.1e} | {f4:.1e} | {mism[1]} |")
            print(lines[-1], dyn_lines[-1], sep="\n", flush=True)
    lines += dyn_lines
    # Per-group weights: every group's exact int32 sum times its scale, summed in fp32 (quant_linear.cu).
    lines += ["", "Per-group weights (`mqc_cuda_quant_linear_group`, one scale per g input rows; static per-tensor "
              "activation scale, and dynamic for W4A8), fp16 X and Y, against the same weights per channel:", "",
              "| phase | M | K | N | g | W8A8 ms | W8A8 group ms | W4A8 ms | W4A8 group ms | W4A8 group dyn ms | "
              "W8 group / channel | W4 group / channel | max rel err W8 g | max rel err W4 g | max rel err W4 g dyn | "
              "code/scale mismatches |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, M, K, N, gs in GPU_GROUPS:
        x = _nonzero_randn((M, K), gen).half()
        w = _nonzero_randn((K, N), gen, 0.05).half()
        act_host = _host_scales(float(x.abs().max()) / 127)
        Kp = lib.mqc_cuda_padded_k(K)
        workspace = torch.empty(lib.mqc_cuda_quant_linear_workspace(M, K, 0), dtype=torch.uint8, device=dev)
        y = torch.empty(M, N, dtype=torch.float16, device=dev)
        static_s = torch.full((M, 1), float(act_host[0]), dtype=torch.float64, device=dev)
        dyn_s = _dynamic_scales(x)
        times, errs, n_bad = {}, {}, 0
        for bits in (8, 4):
            _, w_scale, packed = _quantized_weights(w, bits, Kp)
            args = (bits, x.data_ptr(), 1, M, K, N, packed.data_ptr(), w_scale.data_ptr(), act_host, 1, None, None,
                    y.data_ptr(), 1, workspace.data_ptr(), stream)
            times[(bits, "channel")] = _cuda_time(_launcher(lib.mqc_cuda_quant_linear, args, "mqc_cuda_quant_linear",
                                                            lib), repeat)
            wq, g_scale, g_packed, per_row = _grouped_weights(w, bits, Kp, gs)
            for dynamic in ((0, 1) if bits == 4 else (0,)):
                args = (bits, gs, x.data_ptr(), 1, M, K, N, g_packed.data_ptr(), g_scale.data_ptr(),
                        None if dynamic else act_host, 0 if dynamic else 1, None, None, dynamic, None, None, 0,
                        y.data_ptr(), 1, workspace.data_ptr(), stream)
                call = _launcher(lib.mqc_cuda_quant_linear_group, args, "mqc_cuda_quant_linear_group", lib)
                call()
                torch.cuda.synchronize()
                s = dyn_s if dynamic else static_s
                q = _fp32_codes(x, s)
                bad = _workspace_mismatches(workspace, M, K, Kp, q, s)
                key = (bits, "group dyn" if dynamic else "group")
                errs[key] = _rel_err(y, (q @ (wq.double().t() * per_row)) * s)
                check(f"group {phase} M={M} K={K} N={N} g={gs} W{bits}A8{' dyn' if dynamic else ''}", errs[key],
                      GPU_REL_TOL, bad)
                n_bad += bad
                times[key] = _cuda_time(call, repeat)
        lines.append(f"| {phase} | {M} | {K} | {N} | {gs} | {times[(8, 'channel')]:.4f} | {times[(8, 'group')]:.4f} | "
                     f"{times[(4, 'channel')]:.4f} | {times[(4, 'group')]:.4f} | {times[(4, 'group dyn')]:.4f} | "
                     f"{times[(8, 'group')] / times[(8, 'channel')]:.2f} | {times[(4, 'group')] / times[(4, 'channel')]:.2f} | "
                     f"{errs[(8, 'group')]:.1e} | {errs[(4, 'group')]:.1e} | {errs[(4, 'group dyn')]:.1e} | {n_bad} |")
        print(lines[-1], flush=True)
    # Dynamic activations with the CMC low-rank branch, checked against float64 (x @ L1) @ L2 on the image tokens.
    lines += ["", "Dynamic activations with MASQuant's CMC low-rank branch (`mqc_cuda_quant_linear_ex`, rank r; prefill: "
              "the first half of the tokens are image tokens via modality ids, decode: no modality, every token):", "",
              "| phase | M | K | N | r | W8A8 dyn ms | W8A8 dyn + CMC ms | W4A8 dyn + CMC ms | CMC cost W8 ms | "
              "max rel err W8 | max rel err W4 | code/scale mismatches |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, M, K, N, rank in GPU_CMC:
        x = _nonzero_randn((M, K), gen).half()
        w = _nonzero_randn((K, N), gen, 0.05).half()
        la = _nonzero_randn((K, rank), gen, 0.025).contiguous()
        lb = _nonzero_randn((rank, N), gen, 0.025).contiguous()
        image = torch.zeros(M, dtype=torch.int64, device=dev)
        image[: M // 2] = 1
        ids = image if phase == "prefill" else None
        on = image.double() if ids is not None else torch.ones(M, dtype=torch.float64, device=dev)
        Kp = lib.mqc_cuda_padded_k(K)
        workspace = torch.empty(lib.mqc_cuda_quant_linear_workspace(M, K, rank), dtype=torch.uint8, device=dev)
        y = torch.empty(M, N, dtype=torch.float16, device=dev)
        s = _dynamic_scales(x)
        q = _fp32_codes(x, s)
        branch = ((x.double() @ la.double()) @ lb.double()) * on.view(M, 1)
        times, errs, n_bad = {}, {}, 0
        for bits in (8, 4):
            wq, w_scale, packed = _quantized_weights(w, bits, Kp)
            for r in ((0, rank) if bits == 8 else (rank,)):
                args = (bits, x.data_ptr(), 1, M, K, N, packed.data_ptr(), w_scale.data_ptr(), None, 0,
                        ids.data_ptr() if ids is not None else None, None, 1, la.data_ptr() if r else None,
                        lb.data_ptr() if r else None, r, y.data_ptr(), 1, workspace.data_ptr(), stream)
                call = _launcher(lib.mqc_cuda_quant_linear_ex, args, "mqc_cuda_quant_linear_ex", lib)
                call()
                torch.cuda.synchronize()
                if r:
                    bad = _workspace_mismatches(workspace, M, K, Kp, q, s)
                    errs[bits] = _rel_err(y, (q @ wq.double().t()) * (s * w_scale.double()) + branch)
                    check(f"CMC {phase} M={M} K={K} N={N} r={rank} W{bits}A8 dyn", errs[bits], GPU_CMC_REL_TOL, bad)
                    n_bad += bad
                times[(bits, r)] = _cuda_time(call, repeat)
        base, t8, t4 = times[(8, 0)], times[(8, rank)], times[(4, rank)]
        lines.append(f"| {phase} | {M} | {K} | {N} | {rank} | {base:.4f} | {t8:.4f} | {t4:.4f} | {t8 - base:.4f} | "
                     f"{errs[8]:.1e} | {errs[4]:.1e} | {n_bad} |")
        print(lines[-1], flush=True)
    # Hadamard on the pass structure's edges (hadamard.cu: radix-8 passes, then a radix-4/2/1 one; H_m mix or not),
    # fp32 and fp16, and in place, against float64 x @ kron(H_m, H_L) / sqrt(n).
    hadamard_edges = 0
    for n, m in ((1, 1), (2, 1), (8, 1), (16, 1), (32, 1), (12, 12), (24, 12), (320, 20), (1536, 12), (28 * 512, 28)):
        L = n // m
        hs = torch.ones(1, 1, dtype=torch.float64)
        while hs.shape[0] < L:
            hs = torch.cat([torch.cat([hs, hs], 1), torch.cat([hs, -hs], 1)], 0)
        hm = torch.where(torch.rand(m, m, generator=gen, device=dev) < 0.5, -1.0, 1.0) if m > 1 else None
        full = torch.kron(hm.double().cpu() if hm is not None else torch.ones(1, 1, dtype=torch.float64), hs) / n**0.5
        for half, in_place in ((False, False), (True, False), (False, True)):
            x = _nonzero_randn((5, n), gen)
            x = x.half() if half else x
            ref = x.double().cpu() @ full
            y = x if in_place else torch.empty_like(x)
            err = lib.mqc_cuda_hadamard(x.data_ptr(), y.data_ptr(), int(half), 5, n, m,
                                        hm.data_ptr() if hm is not None else None, stream)
            if err:
                raise RuntimeError(f"mqc_cuda_hadamard failed with cudaError {err}: {lib.mqc_cuda_last_error().decode()}")
            torch.cuda.synchronize()
            rel = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
            check(f"Hadamard n={n} m={m} {'fp16' if half else 'fp32'}{' in place' if in_place else ''}", rel,
                  GPU_REL_TOL if half else 1e-5)
            hadamard_edges += 1
    # An X that starts off a 16-byte boundary (the first pass's vector loads fall back to scalar ones).
    for half in (False, True):
        n, rows = 64, 5
        buf = _nonzero_randn((rows * n + 1,), gen)
        buf = buf.half() if half else buf
        x = buf[1:].view(rows, n)
        y = torch.empty(rows, n, dtype=x.dtype, device=dev)
        hs = torch.ones(1, 1, dtype=torch.float64)
        while hs.shape[0] < n:
            hs = torch.cat([torch.cat([hs, hs], 1), torch.cat([hs, -hs], 1)], 0)
        ref = x.double().cpu() @ (hs / n**0.5)
        err = lib.mqc_cuda_hadamard(x.data_ptr(), y.data_ptr(), int(half), rows, n, 1, None, stream)
        if err:
            raise RuntimeError(f"mqc_cuda_hadamard failed with cudaError {err}: {lib.mqc_cuda_last_error().decode()}")
        torch.cuda.synchronize()
        rel = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
        check(f"Hadamard n={n} unaligned {'fp16' if half else 'fp32'}", rel, GPU_REL_TOL if half else 1e-5)
        hadamard_edges += 1
    print(f"Hadamard edge shapes: {hadamard_edges} checks", flush=True)
    # RMSNorm+quant on both kernels' edges (norm_quant.cu): the register kernel's block and chunk sizes, the general
    # kernel for K not a multiple of 8, K beyond the register kernel, and an unaligned X; fp32 and fp16.
    norm_edges = 0
    for K, offset in ((8, 0), (24, 0), (1000, 0), (1001, 0), (4104, 0), (16384, 0), (16392, 0), (4096, 1)):
        for half in (False, True):
            rows = 7
            buf = _nonzero_randn((rows * K + offset,), gen)
            buf = buf.half() if half else buf
            x = buf[offset:].view(rows, K)
            gamma = torch.rand(K, generator=gen, device=dev) + 0.5
            q = torch.empty(rows, K, dtype=torch.int8, device=dev)
            err = lib.mqc_cuda_rmsnorm_quant(x.data_ptr(), int(half), rows, K, gamma.data_ptr(), _host_scales(0.02),
                                             1e-6, q.data_ptr(), stream)
            if err:
                raise RuntimeError(f"mqc_cuda_rmsnorm_quant failed with cudaError {err}: {lib.mqc_cuda_last_error().decode()}")
            torch.cuda.synchronize()
            xd = x.double()
            ref = torch.clamp(torch.round(xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * gamma.double() / 0.02),
                              -128, 127)
            diff = (q.double() - ref).abs()
            off = int((diff > 0).sum())
            check(f"RMSNorm+quant K={K}{' unaligned' if offset else ''} {'fp16' if half else 'fp32'}", float(diff.max()),
                  1.0, 0 if off <= max(1, q.numel() // 1000) else off)
            norm_edges += 1
    print(f"RMSNorm+quant edge shapes: {norm_edges} checks", flush=True)
    # Hadamard and RMSNorm+quant: effective bandwidth against a device-to-device copy of the same bytes.
    lines += ["", "| kernel | rows | n | ms | GB/s | copy GB/s | fraction of copy | max abs err |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rows, n in ((4096, 4096), (8192, 4096), (4096, 28 * 512)):
        x = _nonzero_randn((rows, n), gen).half()
        y = torch.empty_like(x)
        t_copy = _cuda_time(lambda x=x, y=y: y.copy_(x), repeat)
        bw_copy = 2 * x.numel() * 2 / t_copy / 1e6
        m = 1 if (n & (n - 1)) == 0 else 28 if n % 28 == 0 else 1
        hm = torch.where(torch.rand(m, m, generator=gen, device=dev) < 0.5, -1.0, 1.0) if m > 1 else None

        def had(x=x, y=y, m=m, hm=hm, n=n, rows=rows):
            err = lib.mqc_cuda_hadamard(x.data_ptr(), y.data_ptr(), 1, rows, n, m, hm.data_ptr() if hm is not None else None, stream)
            if err:
                raise RuntimeError(f"mqc_cuda_hadamard failed with cudaError {err}: {lib.mqc_cuda_last_error().decode()}")

        had()
        torch.cuda.synchronize()
        L = n // m
        hs = torch.ones(1, 1, dtype=torch.float64)
        while hs.shape[0] < L:
            hs = torch.cat([torch.cat([hs, hs], 1), torch.cat([hs, -hs], 1)], 0)
        full = torch.kron(hm.double().cpu() if hm is not None else torch.ones(1, 1, dtype=torch.float64), hs) / n**0.5
        sample = slice(0, 8)
        ref = x[sample].double().cpu() @ full
        err = float((y[sample].double().cpu() - ref).abs().max())
        check(f"Hadamard rows={rows} n={n} m={m}", err / float(ref.abs().max()), GPU_REL_TOL)
        t = _cuda_time(had, repeat)
        bw = 2 * x.numel() * 2 / t / 1e6
        lines.append(f"| Hadamard fp16 (m={m}) | {rows} | {n} | {t:.4f} | {bw:.0f} | {bw_copy:.0f} | {bw / bw_copy:.2f} | {err:.1e} |")
        gamma = torch.rand(n, generator=gen, device=dev) + 0.5
        s = _host_scales(0.05)
        q = torch.empty(rows, n, dtype=torch.int8, device=dev)

        def norm(x=x, gamma=gamma, s=s, q=q, rows=rows, n=n):
            err = lib.mqc_cuda_rmsnorm_quant(x.data_ptr(), 1, rows, n, gamma.data_ptr(), s, 1e-6, q.data_ptr(), stream)
            if err:
                raise RuntimeError(f"mqc_cuda_rmsnorm_quant failed with cudaError {err}: {lib.mqc_cuda_last_error().decode()}")

        norm()
        torch.cuda.synchronize()
        xd = x.double()
        refq = torch.clamp(torch.round(xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * gamma.double() / 0.05), -128, 127)
        qdiff = (q.double() - refq).abs()
        qerr = float(qdiff.max())
        # fp32 against float64: a code may differ by one where the scaled value lies within rounding of a half.
        off_by_one = int((qdiff > 0).sum())
        check(f"RMSNorm+quant rows={rows} n={n}", qerr, 1.0, 0 if off_by_one <= q.numel() // 10000 else off_by_one)
        t = _cuda_time(norm, repeat)
        bw = (x.numel() * 2 + q.numel()) / t / 1e6
        lines.append(f"| RMSNorm+quant fp16->int8 | {rows} | {n} | {t:.4f} | {bw:.0f} | {bw_copy:.0f} | {bw / bw_copy:.2f} | {qerr:.0f} code |")
        print("\n".join(lines[-2:]), flush=True)
    verdict = (f"Correctness: all {checks} checks passed." if not failures else
               f"Correctness: {len(failures)} of {checks} checks FAILED: " + "; ".join(failures[:8])
               + ("; ..." if len(failures) > 8 else ""))
    lines += ["", verdict]
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table at the end")
    parser.add_argument("--gpu", action="store_true", help="GPU kernels vs torch fp16 matmul (needs torch with CUDA)")
    parser.add_argument("--quick", action="store_true", help="three shapes, few runs (a smoke test)")
    parser.add_argument("--dynamic", action="store_true", help="also per-token dynamic activations (QDQ and mqc)")
    parser.add_argument("--group-size", type=int, default=0, metavar="G",
                        help="CPU: per-group (G input rows per scale) against per-channel weights at the decoder's shapes")
    parser.add_argument("--decoder", metavar="MODEL", help="whole-decoder benchmark of a packaged model (e.g. tiny-vlm)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench_runtime_ops"), help="compiled decoders go here")
    parser.add_argument("--recipes", help="with --decoder: comma-separated recipes to compare instead of W8A8/W4A8")
    parser.add_argument("--tables", type=Path, help="with --gpu: also write the markdown tables to this file")
    parser.add_argument("--no-spin", action="store_true",
                        help="CPU: set session.intra_op.allow_spinning=0 (worker threads sleep between ops)")
    args = parser.parse_args(argv)
    if args.gpu:
        text, failures = run_gpu(args.repeat)
        print(text)
        if args.tables:
            args.tables.parent.mkdir(parents=True, exist_ok=True)
            args.tables.write_text(text + "\n")
        return 1 if failures else 0
    if _CPU_IMPORT_ERROR is not None:
        raise SystemExit(f"the CPU benchmarks need onnx, onnx_ir, onnxruntime and mqc installed: {_CPU_IMPORT_ERROR!r}")
    if args.decoder:
        recipes = args.recipes.split(",") if args.recipes else None
        print(run_decoder(args.decoder, args.threads, args.repeat, args.workdir, recipes=recipes, spin=not args.no_spin))
        return 0
    if args.group_size:
        rows = run_cpu_groups(args.threads, args.repeat, args.group_size, spin=not args.no_spin)
        if args.markdown:
            print()
            print(markdown_groups(rows, args.threads, args.repeat, args.group_size))
        return 0
    shapes = CPU_SHAPES[2:4] + CPU_SHAPES[4:5] if args.quick else CPU_SHAPES
    rows = run_cpu(args.threads, 3 if args.quick else args.repeat, shapes, dynamic=args.dynamic, spin=not args.no_spin)
    if args.markdown:
        print()
        print(markdown_cpu(rows, args.threads, 3 if args.quick else args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
