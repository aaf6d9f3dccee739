"""Compare two compiled outputs (files or model folders) by the recipe identity check's canonical digest.

    python benchmarks/compare_outputs.py OUT_A OUT_B

Prints each ``.onnx`` that differs (graph structure, initializers, opsets) and exits 1 on any difference; value and
node names are compared too and reported as notes. Metadata (the compile report with its timings) is ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_recipe_identity import model_digest


def _onnx_files(root: Path) -> dict[str, Path]:
    if root.is_file():
        return {root.name: root}
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.onnx"))}


def main() -> int:
    a, b = (Path(arg) for arg in sys.argv[1:3])
    files_a, files_b = _onnx_files(a), _onnx_files(b)
    differences = 0
    if sorted(files_a) != sorted(files_b):
        print(f"different files: {sorted(files_a)} vs {sorted(files_b)}")
        differences += 1
    for name in sorted(set(files_a) & set(files_b)):
        da, db = model_digest(files_a[name]), model_digest(files_b[name])
        same = {key: da[key] == db[key] for key in ("digest", "opsets", "initializers")}
        if not all(same.values()):
            differences += 1
            print(f"{name}: DIFFERENT ({', '.join(k for k, v in same.items() if not v)}); "
                  f"{sum(x != y for x, y in zip(da['nodes'], db['nodes'], strict=False))} node lines differ")
        else:
            note = "" if da["names"] == db["names"] else " (value/node names differ)"
            print(f"{name}: identical, {len(da['nodes'])} nodes, {len(da['initializers'])} initializers{note}")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
