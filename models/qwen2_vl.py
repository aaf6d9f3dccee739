"""Qwen2-VL: vision export at a fixed image size, and the M-RoPE position ids the decoder takes.

Vision (``vision.onnx``): input ``pixel_values`` [1, 3, H, W] (one image per call: the batch axis is static,
the pipeline loops over images), normalized with the CLIP mean/std. The graph does what Qwen2VLImageProcessor
does after normalization (the frame is repeated ``temporal_patch_size`` times and cut into 14x14 patches in
2x2-merge order), runs the vision transformer with the constant grid ``[1, H/14, W/14]`` and the patch merger,
and returns ``image_embeds`` [1, H*W/(14*14*4), hidden]. transformers' dynamo patches make the vision
attention export-safe (one image = one attention segment).

Decoder (``decoder.onnx``): ``position_ids`` is [3, batch, seq]: rows are the temporal, height and width
positions. Text tokens carry the same position in all three rows; the image's tokens get
``start + (0, row, col)`` on the LLM grid (H/28 x W/28), and the text after the image continues at
``start + max(grid_h, grid_w)``, as ``Qwen2VLModel.get_rope_index`` computes. Decode steps continue from the
largest position so far plus one. :func:`mrope_positions` implements this on left-padded batches.
"""

from __future__ import annotations

import numpy as np

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_config(common: dict):
    from transformers import Qwen2VLConfig

    text = {k: v for k, v in common.items() if k not in ("tie_word_embeddings",)}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": common["hidden_size"], "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=6, vision_start_token_id=4,
                         vision_end_token_id=5, video_token_id=7, tie_word_embeddings=False)


def _vision_class():
    import torch

    class Qwen2VLVision(torch.nn.Module):
        """[1, 3, H, W] -> patchify (processor layout) -> vision transformer + merger -> [1, tokens, hidden]."""

        def __init__(self, visual, image_size: tuple[int, int]):
            super().__init__()
            self.visual = visual
            cfg = visual.config
            self.patch = cfg.patch_size
            self.merge = cfg.spatial_merge_size
            self.temporal = cfg.temporal_patch_size
            self.gh, self.gw = image_size[0] // self.patch, image_size[1] // self.patch
            self.register_buffer("grid_thw", torch.tensor([[1, self.gh, self.gw]], dtype=torch.int64),
                                 persistent=False)
            # Constant for a fixed image size: precomputed so the trace has no data-dependent shapes.
            from transformers.vision_utils import get_vision_position_ids

            self.register_buffer("vision_pos", get_vision_position_ids(self.grid_thw, self.merge), persistent=False)
            n = self.gh * self.gw
            self.register_buffer("cu_seqlens", torch.tensor([0, n], dtype=torch.int32), persistent=False)

        def forward(self, pixel_values):
            c = pixel_values.shape[1]
            x = pixel_values[:1].unsqueeze(1).expand(1, self.temporal, c, self.gh * self.patch, self.gw * self.patch)
            m, p = self.merge, self.patch
            x = x.reshape(1, self.temporal, c, self.gh // m, m, p, self.gw // m, m, p)
            x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            x = x.reshape(self.gh * self.gw, c * self.temporal * p * p)
            out = self.visual(x, grid_thw=self.grid_thw, position_ids=self.vision_pos, cu_seqlens=self.cu_seqlens,
                              max_seqlen=self.gh * self.gw)
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            return feats.unsqueeze(0)

    return Qwen2VLVision


def single_image_attention():
    """Context: Qwen2-VL vision attention as one full-attention segment (what one image is), export-safe."""
    import contextlib

    import torch
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    def forward(self, hidden_states, cu_seqlens=None, position_embeddings=None, max_seqlen=None, **kwargs):
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = mq.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(seq, -1))

    @contextlib.contextmanager
    def patched():
        original = mq.VisionAttention.forward
        mq.VisionAttention.forward = forward
        try:
            yield
        finally:
            mq.VisionAttention.forward = original

    return patched()


def plan(model, image_size: tuple[int, int] = (56, 56)):
    """ExportPlan for a ``Qwen2VLForConditionalGeneration``."""
    from mqc.models.export import DecoderParts, ExportPlan

    cfg = model.config
    inner = model.model
    lm = inner.language_model
    vis = inner.visual
    merge = vis.config.spatial_merge_size
    patch = vis.config.patch_size
    gh, gw = image_size[0] // patch, image_size[1] // patch
    tokens = (gh // merge) * (gw // merge)
    return ExportPlan(
        "qwen2_vl",
        DecoderParts(lm, model.lm_head, cfg.text_config, mrope=True),
        lm.embed_tokens,
        vision=_vision_class()(vis, image_size),
        image_size=image_size,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        num_image_tokens=tokens,
        image_token_id=cfg.image_token_id,
        extra={"mrope": {"llm_grid": [1, gh // merge, gw // merge]}, "vision_batch": 1, "resample": "bicubic",
               "prompt": {"image_prefix": "<|vision_start|>", "image_suffix": "<|vision_end|>"}},
    )


def mrope_positions(mask: np.ndarray, modality: np.ndarray, manifest: dict) -> np.ndarray:
    """[3, batch, seq] M-RoPE positions of left-padded rows (padding positions are 1, as HF fills them)."""
    _, gh, gw = manifest["mrope"]["llm_grid"]
    b, s = mask.shape
    pos = np.ones((3, b, s), np.int64)
    for r in range(b):
        cols = np.nonzero(mask[r])[0]
        mod = modality[r, cols]
        out = np.zeros((3, len(cols)), np.int64)
        cur = 0
        k = 0
        while k < len(cols):
            if mod[k] == 1:
                n = gh * gw
                hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
                out[0, k : k + n] = cur
                out[1, k : k + n] = cur + hh.reshape(-1)
                out[2, k : k + n] = cur + ww.reshape(-1)
                cur += max(gh, gw)
                k += n
            else:
                out[:, k] = cur
                cur += 1
                k += 1
        pos[:, r, cols] = out
    return pos
