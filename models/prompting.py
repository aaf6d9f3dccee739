"""Image preprocessing and prompt construction shared by training, calibration and the onnxruntime pipeline.

No torch here: numpy, Pillow and the ``tokenizers`` library only.

The manifest's ``prompt.template`` is the chat template rendered once at export time with two markers, one where
the image tokens go and one where the question goes. A prompt is built by tokenizing the text segments between
markers separately (no special tokens added) and splicing in ``num_image_tokens`` copies of ``image_token_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def preprocess_image(image, image_cfg: dict) -> np.ndarray:
    """``image`` (path or PIL image) -> float32 [3, H, W], resized and normalized as the manifest says."""
    from PIL import Image

    if not hasattr(image, "convert"):
        with Image.open(image) as im:
            image = im.convert("RGB")
    else:
        image = image.convert("RGB")
    h, w = image_cfg["size"]
    image = image.resize((w, h), resample=_RESAMPLE[image_cfg.get("resample", "bicubic")])
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(image_cfg["mean"], np.float32)) / np.asarray(image_cfg["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@lru_cache(maxsize=8)
def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenizer_for(model_dir: Path, manifest: dict):
    return load_tokenizer(str(Path(model_dir) / manifest.get("tokenizer", "tokenizer.json")))


@dataclass
class Prompt:
    """Token ids of one prompt and, per position, whether it is an image token (1) or text (0)."""

    ids: np.ndarray  # int64 [seq]
    modality: np.ndarray  # int64 [seq]

    @property
    def image_positions(self) -> np.ndarray:
        return np.nonzero(self.modality == 1)[0]


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []


def build_prompt(tokenizer, manifest: dict, question: str, with_image: bool = True) -> Prompt:
    """The chat prompt for ``question`` (with the image's tokens when ``with_image``), ending where the answer starts."""
    p = manifest["prompt"]
    template: str = p["template"]
    image_mark, question_mark = p["image_mark"], p["question_mark"]
    before_image, rest = template.split(image_mark, 1)
    between, after = rest.split(question_mark, 1)
    ids: list[int] = []
    mod: list[int] = []
    if p.get("add_bos") and p.get("bos_token_id") is not None:
        ids.append(int(p["bos_token_id"]))
        mod.append(0)
    if with_image and manifest.get("num_image_tokens"):
        before_image += p.get("image_prefix", "")
    seg = encode_text(tokenizer, before_image)
    ids += seg
    mod += [0] * len(seg)
    if with_image and manifest.get("num_image_tokens"):
        n = int(manifest["num_image_tokens"])
        ids += [int(manifest["image_token_id"])] * n
        mod += [1] * n
        seg = encode_text(tokenizer, p.get("image_suffix", "") + between + question + after)
    else:
        seg = encode_text(tokenizer, between + question + after)
    ids += seg
    mod += [0] * len(seg)
    return Prompt(np.asarray(ids, np.int64), np.asarray(mod, np.int64))


def normalize_answer(text: str) -> str:
    """Lower-case first word of a generated answer, punctuation stripped."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""
