"""Calibration feeds for each component graph, never from the test split nor the perplexity text.

- Image samples: easy-vqa TRAIN questions with their images (drawn with ``seed``), prompt plus the reference
  answer and ``<|im_end|>`` (so the decoder also sees answer positions).
- Text samples: windows of ``TEXT_TOKENS`` tokens of the standard-library docstrings text
  (:func:`mqc.models.data.calibration_text`), at seeded offsets.

For a VLM, one decoder sample in ``TEXT_EVERY`` is text-only; a text-only model gets text samples only. Decoder
feeds are prefill feeds at batch 1 with zero-length past tensors and ``modality_ids`` marking image tokens; they
are built by running the directory's own ``vision.onnx`` and ``embed.onnx`` with onnxruntime (no torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from mqc.models.data import calibration_text, vqa_split
from mqc.models.prompting import Prompt

#: Every TEXT_EVERY-th decoder sample of a VLM is a text-only window.
TEXT_EVERY = 4
#: Length of a text-only calibration window, in tokens.
TEXT_TOKENS = 96


def _train_items(num: int, seed: int):
    items = vqa_split("train")
    rng = np.random.default_rng(seed)
    return [items[i] for i in rng.permutation(len(items))[:num]]  # a prefix of one fixed order per seed


def _text_windows(pipe, num: int, seed: int) -> list[np.ndarray]:
    ids = pipe.encode(calibration_text())
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, max(1, len(ids) - TEXT_TOKENS), size=num)
    return [ids[s : s + TEXT_TOKENS] for s in starts]


def calibration_feeds(model_dir: Path, component: str, num_samples: int, seed: int = 0,
                      providers=None) -> Iterator[dict[str, np.ndarray]]:
    """One onnxruntime feed dict per sample for ``component`` ("vision", "embed" or "decoder")."""
    from mqc.models.pipeline import Pipeline

    pipe = Pipeline(Path(model_dir), providers=providers or ["CPUExecutionProvider"])
    has_vision = pipe.vision is not None
    if component == "vision":
        if not has_vision:
            raise ValueError(f"{model_dir} has no vision component")
        for it in _train_items(num_samples, seed):
            yield {"pixel_values": pipe.pixel_values([it.image_path])}
        return
    if component not in ("embed", "decoder"):
        raise ValueError(f"unknown component {component!r}")

    n_text = num_samples if not has_vision else num_samples // TEXT_EVERY
    texts = iter(_text_windows(pipe, n_text, seed))
    images = iter(_train_items(num_samples - n_text, seed)) if has_vision else iter(())
    eos = pipe.manifest.get("eos_token_ids") or []
    for k in range(num_samples):
        text_turn = not has_vision or (k % TEXT_EVERY == TEXT_EVERY - 1)
        if text_turn:
            ids = next(texts)
            prompt = Prompt(ids.astype(np.int64), np.zeros(len(ids), np.int64))
            emb = None
        else:
            it = next(images)
            p = pipe.prompt(it.question, with_image=True)
            answer = pipe.encode(it.answer)
            tail = np.concatenate([answer, np.asarray(eos[:1], np.int64)])
            prompt = Prompt(np.concatenate([p.ids, tail]), np.concatenate([p.modality, np.zeros(len(tail), np.int64)]))
            emb = pipe.image_embeds(pipe.pixel_values([it.image_path])) if component == "decoder" else None
        if component == "embed":
            yield {"input_ids": prompt.ids[None]}
        else:
            yield pipe.prefill_feeds([prompt], emb)
