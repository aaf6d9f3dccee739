"""Export Hugging Face (multimodal) language models into the component graphs mqc compiles.

A model directory holds ``manifest.json`` (see :mod:`mqc.models.manifest`), the tokenizer, and up to three graphs:

- ``vision.onnx``: ``pixel_values`` [batch, 3, H, W] (normalized) -> ``image_embeds`` [batch, tokens, hidden],
  the vision tower and the projector, in the language model's embedding space.
- ``embed.onnx``: ``input_ids`` [batch, seq] -> ``inputs_embeds`` [batch, seq, hidden].
- ``decoder.onnx``: ``inputs_embeds``, ``attention_mask`` [batch, past+seq], ``position_ids`` [batch, seq]
  (Qwen2-VL: [3, batch, seq], the M-RoPE temporal/height/width rows), ``modality_ids`` [batch, seq] (0 text,
  1 image; unused by the float graph), ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim]
  -> ``logits`` [batch, seq, vocab], ``present.{i}.key|value`` [batch, kv_heads, past+seq, head_dim].

Every graph comes from ``torch.onnx.export(..., dynamo=True)`` with the weight transposes folded in place so the
initializers keep their module paths (``model.layers.0.self_attn.q_proj.weight``, laid out [in, out]); no fusions.
The decoder's modules are always exported under the names ``model.*`` and ``lm_head``, whatever the family (a LLaVA's
``model.language_model.layers.0`` is ``model.layers.0`` here), so one set of layer hints fits every family.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqc.models import manifest as mf
from mqc.models import onnx_utils

logger = logging.getLogger(__name__)

#: Families the exporter knows, by Hugging Face ``model_type``.
DECODER_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
VLM_FAMILIES = {"llava": "llava", "qwen2_vl": "qwen2_vl"}


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------------------------------------------
# Wrappers: flat tensor signatures around Hugging Face modules
# --------------------------------------------------------------------------------------------------------------


def _decoder_wrapper_class():
    torch = _torch()
    from transformers.cache_utils import DynamicCache

    class DecoderStep(torch.nn.Module):
        """``(inputs_embeds, attention_mask, position_ids, *past) -> (logits, *present)`` around a decoder stack."""

        def __init__(self, base_model, lm_head, num_layers: int, softcap: float | None = None):
            super().__init__()
            self.model = base_model
            self.lm_head = lm_head
            self.num_layers = num_layers
            self.softcap = softcap

        def forward(self, inputs_embeds, attention_mask, position_ids, past):
            cache = DynamicCache()
            for i in range(self.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            logits = self.lm_head(out.last_hidden_state)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            present = []
            for layer in out.past_key_values.layers[: self.num_layers]:
                present += [layer.keys, layer.values]
            return (logits, *present)

    return DecoderStep


def _embed_wrapper_class():
    torch = _torch()

    class Embed(torch.nn.Module):
        def __init__(self, embed_tokens):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.embed_tokens = embed_tokens

        def forward(self, input_ids):
            return self.model.embed_tokens(input_ids)

    return Embed


def _llava_vision_class():
    torch = _torch()

    class LlavaVision(torch.nn.Module):
        """Vision tower, LLaVA feature selection (layer, CLS crop) and the multimodal projector."""

        def __init__(self, vision_tower, projector, feature_layer: int, strategy: str):
            super().__init__()
            self.vision_tower = vision_tower
            self.multi_modal_projector = projector
            self.feature_layer = feature_layer
            self.strategy = strategy

        def forward(self, pixel_values):
            out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            feats = out.hidden_states[self.feature_layer]
            if self.strategy == "default":
                feats = feats[:, 1:]
            return self.multi_modal_projector(feats)

    return LlavaVision


# --------------------------------------------------------------------------------------------------------------
# Generic export helpers
# --------------------------------------------------------------------------------------------------------------


def _kv_names(num_layers: int, prefix: str) -> list[str]:
    names = []
    for i in range(num_layers):
        names += [f"{prefix}.{i}.key", f"{prefix}.{i}.value"]
    return names


def _export(module, args: tuple, input_names, output_names, dynamic_shapes, path: Path, dim_names, extra_inputs=()):
    """dynamo export -> fold transposes -> optimize -> (extra inputs) -> save with IR version 10."""
    torch = _torch()
    # "torchvision is not installed. Skipping torchvision::nms" and similar registration notes are noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            optimize=False,
            verbose=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
        )
    model = program.model
    onnx_utils.optimize(model)
    for name, dtype, dims, index in extra_inputs:
        onnx_utils.add_unused_input(model, name, dtype, dims, index)
    onnx_utils.rename_dims(model, dim_names)
    onnx_utils.finalize(model, path)
    return path


@dataclass
class DecoderParts:
    """What the decoder export needs from a family: the base model (embed + layers + final norm) and head."""

    base_model: Any
    lm_head: Any
    text_config: Any
    mrope: bool = False
    softcap: float | None = None

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.text_config, "head_dim", None)
        return hd or self.text_config.hidden_size // self.text_config.num_attention_heads


def export_decoder(parts: DecoderParts, path: Path) -> Path:
    """Export the decode step (prefill when past is empty) with dynamic batch, seq and past."""
    torch = _torch()
    from onnx_ir import DataType

    n = parts.num_layers
    hidden = parts.text_config.hidden_size
    wrapper = _decoder_wrapper_class()(parts.base_model, parts.lm_head, n, parts.softcap).eval()
    b, s, p = 2, 5, 3
    emb = torch.randn(b, s, hidden) * 0.02
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    if parts.mrope:
        pos = pos.unsqueeze(0).expand(3, b, s).contiguous()
    past = [torch.randn(b, parts.num_kv_heads, p, parts.head_dim) * 0.1 for _ in range(2 * n)]
    batch, seq, past_d, total = (torch.export.Dim(x) for x in ("batch", "seq", "past", "total"))
    pos_dyn = {1: batch, 2: seq} if parts.mrope else {0: batch, 1: seq}
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, pos_dyn, [{0: batch, 2: past_d} for _ in range(2 * n)])
    past_names = _kv_names(n, "past_key_values")
    present_names = _kv_names(n, "present")
    dim_names = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                 "position_ids": {1: "batch", 2: "seq"} if parts.mrope else {0: "batch", 1: "seq"},
                 "logits": {0: "batch", 1: "seq"}}
    for name in past_names:
        dim_names[name] = {0: "batch", 2: "past"}
    for name in present_names:
        dim_names[name] = {0: "batch", 2: "total"}
    return _export(
        wrapper,
        (emb, mask, pos, past),
        ["inputs_embeds", "attention_mask", "position_ids", *past_names],
        ["logits", *present_names],
        dynamic_shapes,
        path,
        dim_names,
        extra_inputs=[("modality_ids", DataType.INT64, ["batch", "seq"], 3)],
    )


def export_embed(embed_tokens, path: Path) -> Path:
    torch = _torch()
    wrapper = _embed_wrapper_class()(embed_tokens).eval()
    ids = torch.randint(0, embed_tokens.num_embeddings, (2, 5))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return _export(wrapper, (ids,), ["input_ids"], ["inputs_embeds"], ({0: batch, 1: seq},), path,
                   {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}})


def export_vision(module, image_size: tuple[int, int], path: Path, dynamic_batch: bool = True) -> Path:
    """Export ``module(pixel_values) -> image_embeds`` at a fixed image size (dynamic batch)."""
    torch = _torch()
    h, w = image_size
    x = torch.randn(2 if dynamic_batch else 1, 3, h, w)
    dyn = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return _export(module.eval(), (x,), ["pixel_values"], ["image_embeds"], dyn, path,
                   {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})


# --------------------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ExportPlan:
    """Everything one family contributes to a model directory."""

    family: str
    decoder: DecoderParts
    embed_tokens: Any
    vision: Any = None
    image_size: tuple[int, int] | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    num_image_tokens: int | None = None
    image_token_id: int | None = None
    extra: dict = field(default_factory=dict)


def plan_for(model) -> ExportPlan:
    """Pick the family of a loaded Hugging Face model and gather its parts."""
    model_type = model.config.model_type
    if model_type in DECODER_FAMILIES:
        family = DECODER_FAMILIES[model_type]
        cfg = model.config
        softcap = getattr(cfg, "final_logit_softcapping", None) if family == "gemma3" else None
        base = model.model
        if model_type == "gemma3":  # a Gemma3ForConditionalGeneration would have a vision tower; refuse
            raise ValueError("Gemma3 multimodal checkpoints are not supported; export the text model (gemma3_text)")
        return ExportPlan(family, DecoderParts(base, model.lm_head, cfg, softcap=softcap), base.embed_tokens)
    if model_type == "llava":
        return _plan_llava(model)
    if model_type == "qwen2_vl":
        from mqc.models import qwen2_vl

        return qwen2_vl.plan(model)
    raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                     f"{sorted(DECODER_FAMILIES) + sorted(VLM_FAMILIES)}")


def _plan_llava(model) -> ExportPlan:
    cfg = model.config
    inner = model.model
    lm = inner.language_model
    vcfg = cfg.vision_config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("LLaVA with several vision feature layers is not supported")
    vision = _llava_vision_class()(inner.vision_tower, inner.multi_modal_projector, layer,
                                   cfg.vision_feature_select_strategy)
    side = vcfg.image_size
    patches = (side // vcfg.patch_size) ** 2
    tokens = patches + (0 if cfg.vision_feature_select_strategy == "default" else 1)
    return ExportPlan(
        "llava",
        DecoderParts(lm, model.lm_head, cfg.text_config),
        lm.embed_tokens,
        vision=vision,
        image_size=(side, side),
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        num_image_tokens=tokens,
        image_token_id=cfg.image_token_id,
    )


# --------------------------------------------------------------------------------------------------------------
# Whole-model export
# --------------------------------------------------------------------------------------------------------------


def export_model(
    model,
    tokenizer,
    out_dir: Path,
    name: str,
    prompt: dict | None = None,
    plan: ExportPlan | None = None,
    extra_manifest: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a loaded model and its (fast) tokenizer into ``out_dir``; return ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    plan = plan or plan_for(model)
    say = progress or (lambda msg: logger.info(msg))
    components = {}
    timings = {}
    if plan.vision is not None:
        say("exporting vision.onnx")
        t = time.perf_counter()
        static = plan.extra.get("vision_batch") == 1
        with _vision_patches(plan.family):
            export_vision(plan.vision, plan.image_size, out_dir / "vision.onnx", dynamic_batch=not static)
        components["vision"] = "vision.onnx"
        timings["vision"] = time.perf_counter() - t
    say("exporting embed.onnx")
    t = time.perf_counter()
    export_embed(plan.embed_tokens, out_dir / "embed.onnx")
    components["embed"] = "embed.onnx"
    timings["embed"] = time.perf_counter() - t
    say("exporting decoder.onnx")
    t = time.perf_counter()
    export_decoder(plan.decoder, out_dir / "decoder.onnx")
    components["decoder"] = "decoder.onnx"
    timings["decoder"] = time.perf_counter() - t

    tok_file = save_tokenizer(tokenizer, out_dir)
    cfg = plan.decoder.text_config
    eos = _eos_ids(model, tokenizer)
    manifest = mf.Manifest(
        name=name,
        family=plan.family,
        components=components,
        image_token_id=plan.image_token_id,
        num_image_tokens=plan.num_image_tokens,
        hidden_size=cfg.hidden_size,
        num_layers=plan.decoder.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_kv_heads=plan.decoder.num_kv_heads,
        head_dim=plan.decoder.head_dim,
        vocab_size=cfg.vocab_size,
        intermediate_size=cfg.intermediate_size,
        eos_token_ids=eos,
        prompt={**(prompt or default_prompt(tokenizer)), **plan.extra.get("prompt", {})},
        layer_hints=mf.layer_hints(plan.family, plan.decoder.num_layers, plan.vision is not None),
        tokenizer=tok_file,
        position_ids="mrope" if plan.decoder.mrope else "1d",
        image=None if plan.vision is None else {
            "size": list(plan.image_size), "mean": plan.image_mean, "std": plan.image_std,
            "resample": plan.extra.get("resample", "bicubic")},
        export={"torch_dynamo": True, "seconds": {k: round(v, 1) for k, v in timings.items()}},
    )
    if plan.extra:
        manifest.extra.update({k: v for k, v in plan.extra.items() if k not in ("resample", "prompt")})
    if extra_manifest:
        manifest.extra.update(extra_manifest)
    manifest.save(out_dir)
    return out_dir


def _vision_patches(family: str):
    """Family-specific export-time patches of the vision tower (numerically identical for one image)."""
    import contextlib

    if family == "qwen2_vl":
        from mqc.models.qwen2_vl import single_image_attention

        return single_image_attention()
    return contextlib.nullcontext()


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in src if isinstance(src, list | tuple) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def save_tokenizer(tokenizer, out_dir: Path) -> str:
    """Write ``tokenizer.json`` (the ``tokenizers`` library's format) and the HF tokenizer files."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        if hasattr(tokenizer, "save"):  # a bare tokenizers.Tokenizer
            tokenizer.save(str(out_dir / "tokenizer.json"))
            return "tokenizer.json"
        raise ValueError("a fast tokenizer (with a tokenizers backend) is required")
    backend.save(str(out_dir / "tokenizer.json"))
    if hasattr(tokenizer, "save_pretrained"):
        try:
            tokenizer.save_pretrained(str(out_dir / "hf_tokenizer"))
        except Exception as exc:  # informative copy only; tokenizer.json is what the pipeline reads
            logger.debug("save_pretrained of the tokenizer failed: %s", exc)
    return "tokenizer.json"


IMAGE_MARK = "<mqc:image>"
QUESTION_MARK = "<mqc:question>"


def default_prompt(tokenizer, system: str | None = None) -> dict:
    """Render the tokenizer's chat template once, with markers where the image and the question go."""
    template = None
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": IMAGE_MARK + QUESTION_MARK})
        try:
            template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            logger.debug("chat template failed: %s", exc)
    if template is None:
        sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        template = f"{sys_part}<|im_start|>user\n{IMAGE_MARK}{QUESTION_MARK}<|im_end|>\n<|im_start|>assistant\n"
    bos = getattr(tokenizer, "bos_token_id", None)
    return {"template": template, "image_mark": IMAGE_MARK, "question_mark": QUESTION_MARK,
            "bos_token_id": None if bos is None else int(bos), "add_bos": False}


# --------------------------------------------------------------------------------------------------------------
# Loading local checkpoints
# --------------------------------------------------------------------------------------------------------------


def load_checkpoint(folder: Path):
    """Load a local Hugging Face checkpoint folder (safetensors or one GGUF file) in fp32: (model, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if ggufs and not (folder / "config.json").exists():
        kwargs["gguf_file"] = ggufs[0].name
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        return model.eval(), tokenizer
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if config.model_type in VLM_FAMILIES:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return model.eval(), tokenizer


def _image_processor_overrides(folder: Path, plan: ExportPlan) -> None:
    """Take mean/std (and the crop size of a fixed-size model) from the checkpoint's preprocessor_config.json."""
    path = Path(folder) / "preprocessor_config.json"
    if plan.vision is None or not path.exists():
        return
    import json

    cfg = json.loads(path.read_text())
    if cfg.get("image_mean"):
        plan.image_mean = [float(x) for x in cfg["image_mean"]]
    if cfg.get("image_std"):
        plan.image_std = [float(x) for x in cfg["image_std"]]


def export_checkpoint(folder: Path, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Export a local Hugging Face checkpoint folder (config + safetensors + tokenizer, or one GGUF file)."""
    model, tokenizer = load_checkpoint(folder)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    plan = plan_for(model)
    _image_processor_overrides(folder, plan)
    return export_model(model, tokenizer, out_dir, name=Path(folder).name, plan=plan, progress=progress)
