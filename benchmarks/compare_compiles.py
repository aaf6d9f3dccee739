"""Compare two compiled .onnx files: the nodes, every initializer bit for bit, and the stored quality gate.

Used for BENCHMARKS.md's "Compiling on Ray" section: a compile before and after a change, or in one process and on
a Ray cluster. Usage: python benchmarks/compare_compiles.py A.onnx B.onnx
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from mqc.report import REPORT_KEY


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _quality(model: onnx.ModelProto) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[REPORT_KEY]).get("quality", {}) if REPORT_KEY in props else {}


def main(first: str, second: str) -> None:
    a, b = onnx.load(first), onnx.load(second)
    same_nodes = [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    weights_a, weights_b = _initializers(a), _initializers(b)
    differing = [name for name in weights_a
                 if name not in weights_b or weights_a[name].tobytes() != weights_b[name].tobytes()]
    elements = sum(int(np.sum(weights_a[n] != weights_b[n])) for n in differing
                   if n in weights_b and weights_a[n].shape == weights_b[n].shape)
    print(f"nodes identical: {same_nodes}")
    print(f"initializers: {len(weights_a)} vs {len(weights_b)}; differing {len(differing)} "
          f"({elements} of {sum(w.size for w in weights_a.values())} elements)")
    print(f"quality gate A: {_quality(a)}")
    print(f"quality gate B: {_quality(b)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
