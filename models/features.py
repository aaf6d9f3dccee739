"""Cached DINOv2 features of easy-vqa images, for projector training.

The vision tower is frozen, so its pooled output (CLS + 4x4-pooled patches, [17, 384]) is computed once with
onnxruntime and stored as ``.npy`` under ``$MQC_CACHE/tiny-vlm-features/`` (never in git).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from mqc.models import assemble
from mqc.models.cache import cache_dir
from mqc.models.data import vqa_split
from mqc.models.prompting import preprocess_image

logger = logging.getLogger(__name__)


def features_dir() -> Path:
    return cache_dir("tiny-vlm-features")


def export_feature_graph(path: Path) -> Path:
    from mqc.models.export import export_vision

    if not path.exists():
        export_vision(assemble.vision_features_module(), (assemble.IMAGE_SIZE, assemble.IMAGE_SIZE), path)
    return path


def compute_features(split: str, batch: int = 32, threads: int | None = None, log_every: int = 10) -> Path:
    """Pooled DINOv2 features of every image of ``split``: ``features_{split}.npy`` [num_images, 17, 384] (fp32),
    row ``i`` for image id ``i``. Returns the path (cached)."""
    out = features_dir() / f"features_{split}.npy"
    if out.exists():
        return out
    from mqc.session import open_session

    graph = export_feature_graph(features_dir() / "dinov2_pooled.onnx")
    sess = open_session(graph, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    paths = {it.image_id: it.image_path for it in vqa_split(split)}
    n = max(paths) + 1
    feats = np.zeros((n, assemble.NUM_IMAGE_TOKENS, assemble.VISION_WIDTH), np.float32)
    t0 = time.perf_counter()
    ids = sorted(paths)
    for k in range(0, len(ids), batch):
        chunk = ids[k : k + batch]
        x = np.stack([preprocess_image(paths[i], assemble.IMAGE_CFG) for i in chunk])
        (y,) = sess.run(None, {"pixel_values": x})
        feats[chunk] = y
        if (k // batch) % log_every == 0:
            logger.info("%s features: %d/%d images, %.1f s", split, k + len(chunk), len(ids), time.perf_counter() - t0)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.rename(out)
    return out


if __name__ == "__main__":  # python -m mqc.models.features
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for s in ("train", "test"):
        print(compute_features(s))
