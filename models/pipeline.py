"""One onnxruntime pipeline for float and compiled model directories alike.

Image preprocessing -> ``vision.onnx`` -> prompt with the chat template -> ``embed.onnx`` with the image positions
overwritten by the image embeddings -> ``decoder.onnx`` prefill (empty past) -> greedy decode with the KV cache.
Batches are left-padded: ``attention_mask`` marks padding and ``position_ids`` count real tokens only.
No torch, no transformers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mqc.models import manifest as mf
from mqc.models.prompting import Prompt, build_prompt, preprocess_image, tokenizer_for

from mqc.session import open_session


@dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int]]
    first_logits: np.ndarray  # [batch, vocab]: the prefill's next-token logits
    timings: dict = field(default_factory=dict)


def _past_names(n_layers: int, prefix: str) -> list[str]:
    out = []
    for i in range(n_layers):
        out += [f"{prefix}.{i}.key", f"{prefix}.{i}.value"]
    return out


class Pipeline:
    """Run a model directory with onnxruntime. ``providers`` default to CUDA when present, else CPU."""

    def __init__(self, model_dir: Path, providers: Sequence[str] | None = None, threads: int | None = None):
        self.dir = Path(model_dir)
        self.manifest = mf.load(self.dir)
        comps = self.manifest["components"]
        self.providers = list(providers) if providers else None
        self.vision = (open_session(self.dir / comps["vision"], providers, threads)
                       if comps.get("vision") else None)
        self.embed = open_session(self.dir / comps["embed"], providers, threads)
        self.decoder = open_session(self.dir / comps["decoder"], providers, threads)
        self.tokenizer = tokenizer_for(self.dir, self.manifest)
        self.num_layers = int(self.manifest["num_layers"])
        self.kv_shape = (int(self.manifest["num_kv_heads"]), int(self.manifest["head_dim"]))
        self.mrope = self.manifest.get("position_ids") == "mrope"
        self.eos = set(int(i) for i in self.manifest.get("eos_token_ids", []))
        self._decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        self._vision_batch_static = self.vision is not None and self.vision.get_inputs()[0].shape[0] == 1
        self._past_in = _past_names(self.num_layers, "past_key_values")
        self._present_out = _past_names(self.num_layers, "present")
        self._out_names = [o.name for o in self.decoder.get_outputs()]

    # ---------------------------------------------------------------------------------------------------------
    # Components
    # ---------------------------------------------------------------------------------------------------------

    def pixel_values(self, images) -> np.ndarray:
        cfg = self.manifest["image"]
        return np.stack([preprocess_image(im, cfg) for im in images]).astype(np.float32)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise ValueError(f"{self.dir} has no vision component")
        if self._vision_batch_static and pixel_values.shape[0] != 1:  # one image per call (Qwen2-VL)
            return np.concatenate([self.image_embeds(pixel_values[i : i + 1]) for i in range(len(pixel_values))])
        (out,) = self.vision.run(None, {"pixel_values": pixel_values})
        return out

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        (out,) = self.embed.run(None, {"input_ids": ids.astype(np.int64)})
        return out

    def prompt(self, question: str, with_image: bool = True) -> Prompt:
        return build_prompt(self.tokenizer, self.manifest, question, with_image and self.vision is not None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------------------------------------------------
    # Decoder feeds
    # ---------------------------------------------------------------------------------------------------------

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, *self.kv_shape[:1], 0, self.kv_shape[1]), np.float32)
        return dict.fromkeys(self._past_in, z)

    def positions(self, mask: np.ndarray, modality: np.ndarray) -> np.ndarray:
        """Position ids of left-padded rows: [batch, seq] (M-RoPE models: [3, batch, seq])."""
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        if not self.mrope:
            return pos
        from mqc.models.qwen2_vl import mrope_positions

        return mrope_positions(mask, modality, self.manifest)

    def prefill_feeds(self, prompts: Sequence[Prompt], image_embeds: np.ndarray | None) -> dict[str, np.ndarray]:
        """Decoder feeds for a left-padded batch of prompts (image rows of ``image_embeds`` in prompt order)."""
        b = len(prompts)
        s = max(len(p.ids) for p in prompts)
        ids = np.zeros((b, s), np.int64)
        modality = np.zeros((b, s), np.int64)
        mask = np.zeros((b, s), np.int64)
        for r, p in enumerate(prompts):
            ids[r, s - len(p.ids) :] = p.ids
            modality[r, s - len(p.ids) :] = p.modality
            mask[r, s - len(p.ids) :] = 1
        embeds = self.embed_ids(ids)
        if image_embeds is not None:
            for r in range(b):
                where = np.nonzero(modality[r] == 1)[0]
                if len(where):
                    embeds[r, where] = image_embeds[r]
        feeds = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask,
                 "position_ids": self.positions(mask, modality), "modality_ids": modality,
                 **self.empty_past(b)}
        return {k: v for k, v in feeds.items() if k in self._decoder_inputs}

    def run_decoder(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outs = dict(zip(self._out_names, self.decoder.run(None, feeds), strict=True))
        past = {pi: outs[po] for pi, po in zip(self._past_in, self._present_out, strict=True)}
        return outs["logits"], past

    # ---------------------------------------------------------------------------------------------------------
    # Generation
    # ---------------------------------------------------------------------------------------------------------

    def generate(self, questions: Sequence[str], images: Sequence | None = None, max_new_tokens: int = 6,
                 pixel_values: np.ndarray | None = None) -> Generation:
        """Greedy answers for a batch of questions (each with its image when the model has a vision tower)."""
        timings: dict[str, float] = {}
        with_image = self.vision is not None and (images is not None or pixel_values is not None)
        prompts = [self.prompt(q, with_image) for q in questions]
        image_embeds = None
        if with_image:
            t = time.perf_counter()
            if pixel_values is None:
                pixel_values = self.pixel_values(images)
            image_embeds = self.image_embeds(pixel_values)
            timings["vision"] = time.perf_counter() - t
        t = time.perf_counter()
        feeds = self.prefill_feeds(prompts, image_embeds)
        logits, past = self.run_decoder(feeds)
        timings["prefill"] = time.perf_counter() - t
        first = logits[:, -1].astype(np.float32)
        b = len(prompts)
        mask = feeds["attention_mask"]
        last_pos = feeds["position_ids"][..., -1:]  # [b,1] or [3,b,1]
        out_ids: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        nxt = first.argmax(-1)
        t = time.perf_counter()
        steps = 0
        for step in range(max_new_tokens):
            for r in range(b):
                if not done[r]:
                    if int(nxt[r]) in self.eos:
                        done[r] = True
                    else:
                        out_ids[r].append(int(nxt[r]))
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            last_pos = last_pos + 1
            step_feeds = {"inputs_embeds": self.embed_ids(nxt[:, None]).astype(np.float32), "attention_mask": mask,
                          "position_ids": last_pos, "modality_ids": np.zeros((b, 1), np.int64), **past}
            logits, past = self.run_decoder({k: v for k, v in step_feeds.items() if k in self._decoder_inputs})
            nxt = logits[:, -1].argmax(-1)
            steps += 1
        timings["decode"] = time.perf_counter() - t
        timings["decode_steps"] = steps
        return Generation([self.decode(ids) for ids in out_ids], out_ids, first, timings)

    # ---------------------------------------------------------------------------------------------------------
    # Text scoring
    # ---------------------------------------------------------------------------------------------------------

    def text_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits of a [batch, seq] block of text tokens (no image), prefill with empty past."""
        b, s = ids.shape
        mask = np.ones((b, s), np.int64)
        modality = np.zeros((b, s), np.int64)
        feeds = {"inputs_embeds": self.embed_ids(ids).astype(np.float32), "attention_mask": mask,
                 "position_ids": self.positions(mask, modality), "modality_ids": modality, **self.empty_past(b)}
        logits, _ = self.run_decoder({k: v for k, v in feeds.items() if k in self._decoder_inputs})
        return logits


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
