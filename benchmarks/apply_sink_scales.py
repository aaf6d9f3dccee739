"""Apply ``passes/sink_scales.py`` to an already compiled model folder (the pass is not registered in a recipe yet:
``mqc/recipes.py`` is owned elsewhere). Calibrates on the float folder's own calibration feeds, as ``mqc compile``.

    python benchmarks/apply_sink_scales.py ~/.cache/mqc/tiny-vlm /tmp/static/mq /tmp/static/mq-sink --samples 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from mqc.models.calibration import calibration_feeds
from mqc.passes.sink_scales import SinkScalesPass

from mqc.ir import load_model, save_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.report import REPORT_KEY, CompileReport


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("float_dir", type=Path)
    ap.add_argument("compiled_dir", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--positions", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    if args.output.exists():
        raise SystemExit(f"{args.output} exists")
    manifest = json.loads((args.compiled_dir / "manifest.json").read_text())
    decoder = manifest["components"]["decoder"]
    feeds = list(calibration_feeds(args.float_dir, "decoder", args.samples))
    model = load_model(args.compiled_dir / decoder)
    records = PassManager([SinkScalesPass(args.positions)], CompileContext(lambda: feeds)).run(model)
    if REPORT_KEY in model.metadata_props:  # so `mqc explain` shows the added pass
        report = CompileReport.from_json(model.metadata_props[REPORT_KEY])
        report.passes.extend(records)
        model.metadata_props[REPORT_KEY] = report.to_json()
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:
        for entry in args.compiled_dir.iterdir():
            if entry.name not in (decoder, f"{decoder}.data"):
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        save_model(model, staging / decoder)
        manifest["compiled"]["recipe"] = f"{manifest['compiled']['recipe']} + sink_scales{args.positions}"
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.rename(args.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps(asdict(records[0]), indent=1, default=str))


if __name__ == "__main__":
    main()
