"""Calibration feeds for each component graph, never from the test split nor the perplexity text; and validation
feeds (the same construction on the validation split) for ``mqc diagnose``.

- Image samples: easy-vqa TRAIN questions with their images (calibration: the first items of one seeded order,
  :func:`mqc.models.data.calibration_train_items`; validation: :func:`mqc.models.data.vqa_val_set`), prompt plus
  the reference answer and ``<|im_end|>`` (so the decoder also sees answer positions).
- Text samples: windows of ``TEXT_TOKENS`` tokens at seeded offsets of the calibration text
  (:func:`mqc.models.data.calibration_text`) or, for validation, of :func:`mqc.models.data.validation_text`.

For a VLM, one decoder sample in ``TEXT_EVERY`` is text-only; a text-only model gets text samples only. Decoder
feeds are prefill feeds at batch 1 with zero-length past tensors and ``modality_ids`` marking image tokens; they
are built by running the directory's own ``vision.onnx`` and ``embed.onnx`` with onnxruntime (no torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from mqc.models.data import (
    CALIBRATION_RESERVE,
    VQAItem,
    calibration_text,
    validation_text,
    vqa_split,
    vqa_val_set,
)
from mqc.models.prompting import Prompt

from mqc.packages import LabelledFeed

#: Every TEXT_EVERY-th decoder sample of a VLM is a text-only window.
TEXT_EVERY = 4
#: Length of a text-only calibration window, in tokens, unless the recipe asks for another (``text_window``).
TEXT_TOKENS = 96


def _train_items(num: int, seed: int) -> list[VQAItem]:
    """A prefix of one fixed order per seed; with the default seed 0 these are ``calibration_train_items(num)``,
    which the validation split is disjoint from (other seeds are not checked against it)."""
    if num > CALIBRATION_RESERVE:
        raise ValueError(f"calibration draws at most {CALIBRATION_RESERVE} train items (asked {num}); more would "
                         "reach the images of the validation split")
    items = vqa_split("train")
    rng = np.random.default_rng(seed)
    return [items[i] for i in rng.permutation(len(items))[:num]]


def _text_windows(pipe, text: str, num: int, seed: int, length: int) -> list[np.ndarray]:
    ids = pipe.encode(text)
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, max(1, len(ids) - length), size=num)
    return [ids[s : s + length] for s in starts]


def calibration_feeds(model_dir: Path, component: str, num_samples: int, seed: int = 0,
                      providers=None, text_window: int = TEXT_TOKENS) -> Iterator[dict[str, np.ndarray]]:
    """One onnxruntime feed dict per sample for ``component`` ("vision", "embed" or "decoder"); text-only samples
    are ``text_window`` tokens long."""
    source = _FeedBuilder(model_dir, providers)
    items = _train_items(source.image_samples(component, num_samples), seed) if source.has_vision else []
    for labelled in source.feeds(component, num_samples, items, calibration_text(), seed, text_window):
        yield labelled.feed


def validation_feeds(model_dir: Path, component: str, num_samples: int, offset: int = 0,
                     providers=None) -> list[LabelledFeed]:
    """``num_samples`` labelled feeds for ``component`` from the validation split (questions ``offset`` on, and
    text windows of the validation text): what ``mqc diagnose`` runs a model folder on."""
    source = _FeedBuilder(model_dir, providers)
    count = source.image_samples(component, num_samples) if source.has_vision else 0
    items = list(vqa_val_set()[offset : offset + count])
    if len(items) < count:
        raise ValueError(f"the validation split has {len(vqa_val_set())} questions; offset {offset} leaves "
                         f"{len(items)}, {count} asked")
    return list(source.feeds(component, num_samples, items, validation_text(), offset, TEXT_TOKENS))


class _FeedBuilder:
    """Builds prefill feeds from questions and text windows with one model directory's own graphs."""

    def __init__(self, model_dir: Path, providers=None) -> None:
        from mqc.models.pipeline import Pipeline

        self.pipe = Pipeline(Path(model_dir), providers=providers or ["CPUExecutionProvider"])
        self.has_vision = self.pipe.vision is not None

    def image_samples(self, component: str, num_samples: int) -> int:
        """How many of ``num_samples`` are image questions (the rest are text windows)."""
        if component == "vision":
            if not self.has_vision:
                raise ValueError(f"{self.pipe.dir} has no vision component")
            return num_samples
        if component not in ("embed", "decoder"):
            raise ValueError(f"unknown component {component!r}")
        return num_samples - self._text_samples(num_samples)

    def _text_samples(self, num_samples: int) -> int:
        return num_samples if not self.has_vision else num_samples // TEXT_EVERY

    def feeds(self, component: str, num_samples: int, items: Sequence[VQAItem], text: str,
              seed: int, text_window: int) -> Iterator[LabelledFeed]:
        pipe = self.pipe
        if component == "vision":
            for it in items:
                yield LabelledFeed({"pixel_values": pipe.pixel_values([it.image_path])}, f"image {it.image_id}", [])
            return
        texts = iter(_text_windows(pipe, text, self._text_samples(num_samples), seed, text_window))
        images = iter(items)
        eos = pipe.manifest.get("eos_token_ids") or []
        for k in range(num_samples):
            text_turn = not self.has_vision or (k % TEXT_EVERY == TEXT_EVERY - 1)
            if text_turn:
                ids = next(texts)
                prompt = Prompt(ids.astype(np.int64), np.zeros(len(ids), np.int64))
                emb, sample = None, f"text window {k}"
            else:
                it = next(images)
                p = pipe.prompt(it.question, with_image=True)
                answer = pipe.encode(it.answer)
                tail = np.concatenate([answer, np.asarray(eos[:1], np.int64)])
                prompt = Prompt(np.concatenate([p.ids, tail]),
                                np.concatenate([p.modality, np.zeros(len(tail), np.int64)]))
                emb = pipe.image_embeds(pipe.pixel_values([it.image_path])) if component == "decoder" else None
                sample = f"image {it.image_id}: {it.question!r}"
            feed = {"input_ids": prompt.ids[None]} if component == "embed" else pipe.prefill_feeds([prompt], emb)
            yield LabelledFeed(feed, sample, self._token_labels(prompt))

    def _token_labels(self, prompt: Prompt) -> list[str]:
        labels, patch = [], 0
        for token, modality in zip(prompt.ids.tolist(), prompt.modality.tolist(), strict=True):
            if modality == 1:
                labels.append(f"image patch {patch}")
                patch += 1
            else:
                piece = self.pipe.tokenizer.id_to_token(int(token))
                labels.append(f"{piece!r} (id {token})")
        return labels
