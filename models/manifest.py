"""``manifest.json``: what a model directory holds (format ``mqc-model/1``).

Keys every reader can rely on::

    format, name, family, components {vision?, embed, decoder}, image_token_id, num_image_tokens,
    hidden_size, num_layers, num_attention_heads, num_kv_heads, head_dim, vocab_size, intermediate_size,
    eos_token_ids, prompt {template, image_mark, question_mark, bos_token_id, add_bos}, layer_hints,
    tokenizer ("tokenizer.json"), position_ids ("1d" or "mrope"), image {size, mean, std, resample} (VLMs)

plus free-form extras (``export``, ``training``, ...). Compiled directories copy the manifest and may add keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "mqc-model/1"
FILENAME = "manifest.json"


def layer_hints(family: str, num_layers: int, has_vision: bool) -> dict:
    """Initializer-name patterns of the decoder (and vision) linears and norms; ``{i}`` is the layer index.

    Decoder names are the same for every family because the exporter always names the stack ``model``.
    Weights of linears are stored [in, out] (MatMul's right operand) under the module's name.
    """
    dec = {
        "layer_prefix": "model.layers.{i}",
        "num_layers": num_layers,
        "attn_in": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                    "model.layers.{i}.self_attn.v_proj"],
        "attn_out": "model.layers.{i}.self_attn.o_proj",
        "mlp_in": ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"],
        "mlp_out": "model.layers.{i}.mlp.down_proj",
        "input_norm": "model.layers.{i}.input_layernorm",
        "post_attn_norm": "model.layers.{i}.post_attention_layernorm",
        "final_norm": "model.norm",
        "lm_head": "lm_head",
        "norm_type": "rmsnorm",
        "weight_layout": "in_out",
    }
    if family == "gemma3":
        # Gemma3 norms are (1 + w) RMSNorms, with extra pre/post feed-forward norms and q/k norms.
        dec["pre_ffn_norm"] = "model.layers.{i}.pre_feedforward_layernorm"
        dec["post_ffn_norm"] = "model.layers.{i}.post_feedforward_layernorm"
        dec["qk_norm"] = ["model.layers.{i}.self_attn.q_norm", "model.layers.{i}.self_attn.k_norm"]
        dec["norm_type"] = "rmsnorm_one_plus"
    hints: dict[str, Any] = {"decoder": dec}
    if has_vision:
        hints["vision"] = _vision_hints(family)
    return hints


def _vision_hints(family: str) -> dict:
    if family == "tiny_vlm":
        p = "vision_tower.encoder.layer.{i}"
        return {
            "tower": "dinov2",
            "layer_prefix": p,
            "attn_in": [f"{p}.attention.q_proj", f"{p}.attention.k_proj", f"{p}.attention.v_proj"],
            "attn_out": f"{p}.attention.o_proj",
            "mlp_in": [f"{p}.mlp.fc1"],
            "mlp_out": f"{p}.mlp.fc2",
            "norm1": f"{p}.norm1",
            "norm2": f"{p}.norm2",
            "layer_scale": [f"{p}.layer_scale1.lambda1", f"{p}.layer_scale2.lambda1"],
            "final_norm": "vision_tower.layernorm",
            "projector": ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"],
            "norm_type": "layernorm",
        }
    if family == "llava":
        p = "vision_tower.vision_model.encoder.layers.{i}"
        return {
            "tower": "clip",
            "layer_prefix": p,
            "attn_in": [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
            "attn_out": f"{p}.self_attn.out_proj",
            "mlp_in": [f"{p}.mlp.fc1"],
            "mlp_out": f"{p}.mlp.fc2",
            "norm1": f"{p}.layer_norm1",
            "norm2": f"{p}.layer_norm2",
            "projector": ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"],
            "norm_type": "layernorm",
        }
    if family == "qwen2_vl":
        p = "visual.blocks.{i}"
        return {
            "tower": "qwen2_vl",
            "layer_prefix": p,
            "attn_in": [f"{p}.attn.qkv"],
            "attn_out": f"{p}.attn.proj",
            "mlp_in": [f"{p}.mlp.fc1"],
            "mlp_out": f"{p}.mlp.fc2",
            "norm1": f"{p}.norm1",
            "norm2": f"{p}.norm2",
            "projector": ["visual.merger.mlp.0", "visual.merger.mlp.2"],
            "norm_type": "layernorm",
        }
    return {}


@dataclass
class Manifest:
    name: str
    family: str
    components: dict[str, str]
    image_token_id: int | None
    num_image_tokens: int | None
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    eos_token_ids: list[int]
    prompt: dict
    layer_hints: dict
    tokenizer: str = "tokenizer.json"
    position_ids: str = "1d"
    image: dict | None = None
    export: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format: str = FORMAT

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return {"format": d.pop("format"), **d}

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load(model_dir: Path) -> dict:
    """The manifest of a model directory as a dict (raises when missing or of another format)."""
    path = Path(model_dir) / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no {FILENAME})")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def is_model_dir(path: Path) -> bool:
    return (Path(path) / FILENAME).exists()
