"""Seeded, time-bounded fuzzing of model and recipe files (issue 13).

Small valid inputs are mutated (field edits, truncations, duplications, byte flips) and compiled; mqc must exit 0
with an output onnxruntime loads, or exit 2 with one line. Never a traceback, never an internal error (exit 1).
``MQC_FUZZ_SECONDS`` (default 4 per test) and ``MQC_FUZZ_SEED`` widen a local run; a failure names its iteration.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from untrusted import HIDDEN, linear_model, run_cli, save_with_data, weight

BUDGET_S = float(os.environ.get("MQC_FUZZ_SECONDS", "4"))
SEED = int(os.environ.get("MQC_FUZZ_SEED", "20261202"))
#: A small valid recipe whose structure the recipe fuzzer edits.
BASE_RECIPE = {"name": "fuzz", "description": "d", "passes": [{"pass": "upgrade_opset"}, {"pass": "fuse_norms"},
                                                               {"pass": "quantize_linears"}]}
PASS_NAMES = ["upgrade_opset", "fuse_norms", "quantize_linears", "norm_folding", "smoothquant", "bogus", ""]


def _base_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return linear_model([weight("W", 0), weight("W2", 1)], nodes=nodes)


def _edit_fields(rng: random.Random, model: onnx.ModelProto) -> onnx.ModelProto:
    model = copy.deepcopy(model)
    graph = model.graph
    choice = rng.randrange(9)
    if choice == 0:
        tensor = rng.choice(graph.initializer)
        tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice([0, 1, -1, HIDDEN + 1, 2**31, 2**62])
    elif choice == 1:
        rng.choice(graph.node).op_type = rng.choice(["Add", "Gemm", "Conv", "MatMul", "Nope", ""])
    elif choice == 2:
        node = rng.choice(graph.node)
        node.input[rng.randrange(len(node.input))] = rng.choice(["x", "W", "h", "r", "y", "missing", ""])
    elif choice == 3:
        graph.node.append(copy.deepcopy(rng.choice(graph.node)))
    elif choice == 4:
        del graph.node[rng.randrange(len(graph.node))]
    elif choice == 5:
        graph.input[0].type.tensor_type.elem_type = rng.choice([TensorProto.FLOAT16, TensorProto.INT64,
                                                                 TensorProto.STRING, TensorProto.BFLOAT16, 99])
    elif choice == 6:
        model.opset_import[0].version = rng.choice([1, 9, 13, 23, 30, 1000])
    elif choice == 7:
        graph.initializer.append(copy.deepcopy(rng.choice(graph.initializer)))
    else:
        tensor = rng.choice(graph.initializer)
        tensor.data_type = rng.choice([TensorProto.FLOAT16, TensorProto.INT8, TensorProto.DOUBLE, TensorProto.STRING, 77])
    return model


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    choice = rng.randrange(3)
    if choice == 0:
        return data[: rng.randrange(len(data))]
    if choice == 1:
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randrange(1, 64))
        return data[:end] + data[start:end] + data[end:]
    mutable = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        mutable[rng.randrange(len(mutable))] = rng.randrange(256)
    return bytes(mutable)


def _mutate_recipe(rng: random.Random) -> bytes:
    recipe = copy.deepcopy(BASE_RECIPE)
    choice = rng.randrange(6)
    if choice == 0:
        recipe["passes"].append(copy.deepcopy(rng.choice(recipe["passes"])))
    elif choice == 1:
        del recipe["passes"][rng.randrange(len(recipe["passes"]))]
    elif choice == 2:
        rng.choice(recipe["passes"])["pass"] = rng.choice(PASS_NAMES)
    elif choice == 3:
        recipe[rng.choice(["name", "passes", "components"])] = rng.choice([None, 3, "x", [], {}, [[]]])
    elif choice == 4:
        recipe["components"] = {rng.choice(["vision", "decoder", "x"]): rng.choice([{"float": True}, {"bogus": 1}, 3])}
    text = json.dumps(recipe).encode()
    if choice == 5 or rng.random() < 0.3:
        text = _mutate_bytes(rng, text)
    return text


def _check_outcome(code: int, text: str, output: Path, label: str) -> None:
    assert "Traceback" not in text, f"{label}: {text}"
    assert code in (0, 2), f"{label}: exit {code}: {text}"
    if code == 2:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: {text}"
        return
    ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])  # exit 0: the output must load


def _fuzz(tmp_path: Path, seed_offset: int, case: Callable[[random.Random, Path], list[str]]) -> int:
    rng = random.Random(SEED + seed_offset)
    deadline = time.monotonic() + BUDGET_S
    runs = 0
    while time.monotonic() < deadline or runs < 3:
        folder = tmp_path / f"run{runs}"
        folder.mkdir()
        (folder / "out").mkdir()
        output = folder / "out" / "q.onnx"
        args = case(rng, folder)
        code, text = run_cli(["compile", *args, "-o", str(output), "--samples", "2"])
        _check_outcome(code, text, output, f"seed {SEED + seed_offset}, run {runs}")
        runs += 1
    return runs


def test_fuzz_model_files(tmp_path):
    base = _base_model()

    def case(rng: random.Random, folder: Path) -> list[str]:
        model = _edit_fields(rng, base) if rng.random() < 0.6 else base
        path = folder / "model.onnx"
        if rng.random() < 0.5:
            save_with_data(model, path)
            data = folder / "model.onnx.data"
            if rng.random() < 0.5 and data.exists() and data.stat().st_size:
                data.write_bytes(_mutate_bytes(rng, data.read_bytes()))
            else:
                path.write_bytes(_mutate_bytes(rng, path.read_bytes()))
        else:
            raw = model.SerializeToString()
            path.write_bytes(_mutate_bytes(rng, raw) if rng.random() < 0.7 else raw)
        return [str(path)]

    assert _fuzz(tmp_path, 0, case) >= 3


def test_fuzz_recipe_files(tmp_path):
    source = save_with_data(_base_model(), tmp_path / "model.onnx")

    def case(rng: random.Random, folder: Path) -> list[str]:
        recipe = folder / "recipe.json"
        recipe.write_bytes(_mutate_recipe(rng))
        return [str(source), "--recipe", str(recipe)]

    assert _fuzz(tmp_path, 1, case) >= 3
