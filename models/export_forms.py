"""The ONNX graphs users bring: one tiny random decoder exported by the tools people use, for tests.

``mqc export`` writes one form (``inputs_embeds`` in, KV cache, weight transposes folded). Users export their own
model with ``torch.onnx.export`` (dynamo or TorchScript), Optimum's ``optimum-cli export onnx`` or onnxruntime-genai's
model builder, and get other graphs of the same function: a tied ``lm_head`` reading ``Transpose(embedding table)``,
``input_ids`` in with the embedding ``Gather`` inside, decomposed norms with casts, ``position_ids`` beside the KV
cache, fused ``SkipSimplifiedLayerNormalization`` / ``GroupQueryAttention``. :class:`ExportForm` names one such
variant; :func:`export_form` writes it from the weights :func:`build_model` makes, so every form of a family holds the
same weights and a recipe's result on a form can be compared with its result on the ``mqc export`` graph
(:func:`export_reference`). All offline; a few seconds per graph.

Optimum (``optimum-onnx`` 0.1.0, optimum 2.1.0) pins ``transformers<4.58`` and mqc needs transformers 5, so its
exporter runs from ``.venv-optimum`` (``make setup``; pins in ``requirements-optimum.txt``: transformers 4.57.6
over the main environment's torch), on a float32 checkpoint folder saved here with the config fields transformers 4
reads; ``--dtype fp16`` gives the float16 form, and ``--dtype bf16`` fails in TorchScript's serializer.

Vision towers: DINOv2 (opset 14, decomposed LayerNorm), a LLaVA-style CLIP tower, and Qwen2-VL's vision model as a
user exports it with TorchScript (flattened patches in; :func:`export_qwen2_vl_tower`) beside ``mqc export``'s tower
of the same weights. ``torch.onnx.export(dynamo=True)`` cannot export transformers' Qwen2-VL vision model, with the
grid as an input or as a constant: torch.export stops at the per-image split of its attention,
``torch.split(tensor, lengths.tolist(), dim=2)`` (modeling_qwen2_vl.py), with "GuardOnDataDependentSymNode: Could
not guard on data-dependent expression Eq(u3, 0)" (torch 2.13.0, transformers 5.24.0); ``mqc export`` replaces
that attention by one full-attention segment for its own export.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mqc.models.testing import tiny_config, tiny_tokenizer

EXPORTERS = ("dynamo", "torchscript", "genai", "optimum")
#: Optimum's exporter runs from its own environment (``make setup`` builds it from ``requirements-optimum.txt``):
#: optimum-onnx 0.1.0 pins ``transformers<4.58`` and mqc needs transformers 5.
OPTIMUM_VENV = Path(__file__).resolve().parent.parent / ".venv-optimum"


@dataclass(frozen=True)
class ExportForm:
    """One way a decoder reaches mqc: which exporter, tied or untied lm_head, token ids or embeddings in."""

    family: str = "llama"
    exporter: str = "dynamo"
    tied: bool = True
    inputs: str = "input_ids"  # "input_ids" | "inputs_embeds"
    dtype: str = "float32"  # the weights' type: "float32" | "float16" | "bfloat16"
    kv_cache: bool = False  # past_key_values.N.key|value in, present.N.key|value out (the decoder-with-past form)

    @property
    def name(self) -> str:
        name = f"{self.family}-{self.exporter}-{'tied' if self.tied else 'untied'}-{self.inputs}"
        name += "-with-past" if self.kv_cache else ""
        return name if self.dtype == "float32" else f"{name}-{self.dtype}"


def build_model(family: str, tied: bool, seed: int = 0):
    """A tiny random fp32 causal LM of ``family`` whose norms have non-trivial gammas (folding must matter)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma stores w of (1 + w): centred at 0, others at 1
                base = 0.0 if family == "gemma3" else 1.0
                param.copy_(base + 0.3 * torch.randn(param.shape, generator=generator))
            elif param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)  # as mqc.models.testing: default init gives near-uniform logits
    return model


class _LogitsOf:
    """Factories of the flat-signature wrappers users write around a causal LM before exporting it."""

    @staticmethod
    def ids(model):
        import torch

        class FromIds(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.m = lm

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return FromIds(model).eval()

    @staticmethod
    def embeds(model):
        import torch

        class FromEmbeds(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.m = lm

            def forward(self, inputs_embeds, attention_mask):
                return self.m(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits

        return FromEmbeds(model).eval()


    @staticmethod
    def ids_with_past(model):
        """``(input_ids, attention_mask, *past) -> (logits, *present)``: the decoder-with-past signature."""
        import torch
        from transformers.cache_utils import DynamicCache

        class FromIdsWithPast(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.m = lm
                self.layers = lm.config.num_hidden_layers

            def forward(self, input_ids, attention_mask, past):
                cache = DynamicCache()
                for i in range(self.layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
                present = [t for layer in out.past_key_values.layers[:self.layers] for t in (layer.keys, layer.values)]
                return (out.logits, *present)

        return FromIdsWithPast(model).eval()


def _kv_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _export_with_past(model, path: Path) -> Path:
    """The dynamo decoder-with-past form: token ids, a mask over past + new tokens, the cache in and out."""
    import torch

    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = torch.randint(0, config.vocab_size, (2, 5))
    past = [torch.randn(2, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    mask = torch.ones(2, 8, dtype=torch.int64)
    batch, seq, past_len, total = (torch.export.Dim(x) for x in ("batch", "seq", "past", "total"))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, [{0: batch, 2: past_len} for _ in past])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_LogitsOf.ids_with_past(model), (ids, mask, past), dynamo=True, verbose=False,
                                    input_names=["input_ids", "attention_mask", *_kv_names(layers, "past_key_values")],
                                    output_names=["logits", *_kv_names(layers, "present")], dynamic_shapes=shapes)
        program.save(str(path))
    return path


def _torch_export(form: ExportForm, model, path: Path) -> Path:
    import torch

    first = "input_ids" if form.inputs == "input_ids" else "inputs_embeds"
    wrapper = _LogitsOf.ids(model) if form.inputs == "input_ids" else _LogitsOf.embeds(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    x = ids if form.inputs == "input_ids" else model.get_input_embeddings()(ids).detach()
    mask = torch.ones(2, 7, dtype=torch.int64)
    names = [first, "attention_mask"]
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if form.exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            program = torch.onnx.export(wrapper, (x, mask), dynamo=True, verbose=False, input_names=names, output_names=["logits"],
                                        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
            program.save(str(path))
        else:
            axes = {n: {0: "batch", 1: "seq"} for n in names}
            torch.onnx.export(wrapper, (x, mask), str(path), dynamo=False, input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=17)
    return path


def _genai_export(form: ExportForm, model, out_dir: Path) -> Path:
    """onnxruntime-genai's model builder at fp32 on a checkpoint folder saved here, run as users run it (its
    command line, offline)."""
    import os
    import subprocess
    import sys

    checkpoint = out_dir / "hf"
    model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    target = out_dir / "genai"
    if form.inputs != "input_ids":
        raise ValueError("the genai forms take input_ids (the builder's exclude_embeds form is not in the corpus)")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", form.family, "-i", str(checkpoint),
               "-o", str(target), "-p", "fp32", "-e", "cpu", "-c", str(out_dir / "cache")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(f"onnxruntime-genai builder failed: {done.stderr[-2000:]}")
    return target / "model.onnx"


def optimum_cli() -> Path | None:
    """``optimum-cli`` of the Optimum environment, or None where ``make setup`` has not built it."""
    cli = OPTIMUM_VENV / "bin" / "optimum-cli"
    return cli if cli.is_file() else None


def _checkpoint_for_transformers4(model, folder: Path) -> Path:
    """``model`` saved as a checkpoint transformers 4.57 loads: the safetensors as transformers 5 writes them, and
    the config with the fields 4.57 reads (``rope_theta`` where 5 writes ``rope_parameters``; ``torch_dtype``)."""
    import json

    model.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope {rope['rope_type']!r}: only the default rope is written for transformers 4")
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config["torch_dtype"] = config.pop("dtype", "float32")
    config_file.write_text(json.dumps(config, indent=2))
    return folder


def _optimum_export(form: ExportForm, model, out_dir: Path) -> Path:
    """Optimum's exporter on a float32 checkpoint folder saved here, run as users run it: ``optimum-cli export onnx
    --task text-generation-with-past --dtype fp32|fp16`` (TorchScript underneath, opset 18, ``position_ids`` input,
    KV cache in and out)."""
    import subprocess

    cli = optimum_cli()
    if cli is None:
        raise FileNotFoundError(f"no Optimum environment at {OPTIMUM_VENV} (`make setup` builds it)")
    if (form.inputs, form.kv_cache) != ("input_ids", True):
        raise ValueError("the optimum forms are decoders with past taking input_ids (text-generation-with-past)")
    dtypes = {"float32": "fp32", "float16": "fp16"}
    if form.dtype not in dtypes:
        raise ValueError(f"the optimum forms are {' or '.join(dtypes)}: optimum-cli --dtype bf16 fails in TorchScript's "
                         "serializer (ScalarType ComplexDouble is an unexpected tensor scalar type)")
    checkpoint = _checkpoint_for_transformers4(model, out_dir / "hf")
    target = out_dir / "optimum"
    command = [str(cli), "export", "onnx", "-m", str(checkpoint), "--task", "text-generation-with-past",
               "--dtype", dtypes[form.dtype], str(target)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(f"optimum-cli export failed: {done.stderr[-2000:]}")
    return target / "model.onnx"


def export_form(form: ExportForm, out_dir: Path, seed: int = 0) -> Path:
    """Write ``form`` of the tiny ``form.family`` model (weights from :func:`build_model`) into ``out_dir``."""
    if form.exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {form.exporter!r}; choose from {EXPORTERS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(form.family, form.tied, seed)
    if form.exporter == "optimum":  # from the float32 checkpoint, the dtype is the exporter's --dtype
        return _optimum_export(form, model, out_dir)
    if form.dtype != "float32":
        if form.exporter == "genai":
            raise ValueError("the genai forms are fp32 (the builder's fp16/bf16 targets are CUDA/DML builds)")
        import torch

        model = model.to(getattr(torch, form.dtype))
    if form.exporter == "genai":
        return _genai_export(form, model, out_dir)
    if form.kv_cache:
        if (form.exporter, form.inputs) != ("dynamo", "input_ids"):
            raise ValueError("the with-past forms are dynamo exports taking input_ids")
        return _export_with_past(model, out_dir / f"{form.name}.onnx")
    return _torch_export(form, model, out_dir / f"{form.name}.onnx")


def export_reference(family: str, tied: bool, out_dir: Path, seed: int = 0) -> Path:
    """The ``mqc export`` decoder graph of the same weights as :func:`export_form` (``inputs_embeds`` in, KV cache)."""
    from mqc.models.export import export_decoder, plan_for

    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(family, tied, seed)
    return export_decoder(plan_for(model).decoder, out_dir / "decoder.onnx")


def embedding_table(family: str, tied: bool, seed: int = 0) -> np.ndarray:
    """The token-embedding table of the model (for feeds of ``inputs_embeds`` graphs), scale included."""
    import torch

    model = build_model(family, tied, seed)
    with torch.no_grad():
        return model.model.embed_tokens(torch.arange(model.config.vocab_size)).numpy()


def token_windows(num: int, length: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """``num`` token-id windows of ``length`` from the tiny tokenizer on the calibration text (real text, not noise)."""
    from mqc.models.data import calibration_text

    ids = np.asarray(tiny_tokenizer()(calibration_text()[:40_000])["input_ids"], np.int64)
    ids = ids[ids < vocab]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, num)
    return [ids[s:s + length] for s in starts]


def prefill_feed(model_path: Path, ids: np.ndarray, table: np.ndarray, head_dim: int) -> dict[str, np.ndarray]:
    """The feed that runs one prefill of ``ids`` through any form: token ids or their embeddings, an all-ones
    mask, positions 0.., text modality and an empty KV cache, each given only where the graph has that input."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    seq = len(ids)
    feed: dict[str, np.ndarray] = {}
    for value in graph.input:
        name = value.name
        if name == "input_ids":
            feed[name] = ids[None].astype(np.int64)
        elif name == "inputs_embeds":
            feed[name] = table[ids][None].astype(np.float32)
        elif name == "attention_mask":
            dtype = np.int32 if value.type.tensor_type.elem_type == onnx.TensorProto.INT32 else np.int64
            feed[name] = np.ones((1, seq), dtype)
        elif name == "position_ids":
            feed[name] = np.arange(seq, dtype=np.int64)[None]
        elif name == "modality_ids":
            feed[name] = np.zeros((1, seq), np.int64)
        elif name.startswith("past_key_values"):
            kv_heads = value.type.tensor_type.shape.dim[1].dim_value
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feed[name] = np.zeros((1, kv_heads, 0, head_dim), dtype)
        else:
            raise ValueError(f"{model_path}: no feed for input {name!r}")
    return feed


def build_vision_tower(seed: int = 0):
    """A tiny random DINOv2 (hidden 64, 2 layers, LayerScale, 28x28 images of 14x14 patches) with non-trivial
    LayerNorm gammas and betas."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                          image_size=28, patch_size=14, layerscale_value=1.0)
    torch.manual_seed(seed)
    model = Dinov2Model(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.3 * torch.randn(param.shape, generator=generator))
    return model


def export_vision_opset14(out_dir: Path, seed: int = 0, dynamic_batch: bool = False) -> Path:
    """The DINOv2 tower as an older TorchScript export writes it: opset 14, LayerNorm decomposed into
    ReduceMean/Sub/Pow/Sqrt/Div, the class token concatenated and the position table interpolated by a ``Resize``
    of constants, fixed batch of one; ``pixel_values`` -> ``last_hidden_state``."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self, dinov2):
            super().__init__()
            self.m = dinov2

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).last_hidden_state

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"dinov2-opset14{'-dynamic-batch' if dynamic_batch else ''}.onnx"
    axes = {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tower(build_vision_tower(seed)).eval(), (torch.randn(1, 3, 28, 28),), str(path),
                          dynamo=False, opset_version=14, input_names=["pixel_values"],
                          output_names=["last_hidden_state"], dynamic_axes=axes)
    return path


def export_post_ln_encoder(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random BERT sentence encoder (post-LN: each LayerNorm normalizes the residual sum) as a TorchScript
    export writes it: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``, dynamic batch and length."""
    import torch
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.m = bert

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bert-post-ln.onnx"
    names = ["input_ids", "attention_mask"]
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(BertModel(config).eval()), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          input_names=names, output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    return path


def export_branching_heads(out_dir: Path, seed: int = 0) -> Path:
    """The tiny Llama with two output heads chosen at run time by ``torch.cond`` on a boolean input (``use_draft``,
    as speculative-decoding drafts export): the dynamo exporter writes the heads' MatMuls inside an ``If`` node's
    branches. ``input_ids``, ``attention_mask``, ``use_draft`` -> ``logits``."""
    import torch

    class BranchingHeads(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.body = lm.model
            self.head = lm.lm_head
            self.draft = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False)

        def forward(self, input_ids, attention_mask, use_draft):
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return torch.cond(use_draft, lambda h: self.draft(h), lambda h: self.head(h), (hidden,))

    model = build_model("llama", tied=False, seed=seed)
    torch.manual_seed(seed + 2)
    wrapper = BranchingHeads(model).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "llama-branching-heads.onnx"
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (ids, torch.ones_like(ids), torch.tensor(False)), dynamo=True,
                                    verbose=False, input_names=["input_ids", "attention_mask", "use_draft"],
                                    output_names=["logits"],
                                    dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, None))
        program.save(str(path))
    return path


def export_llava_style_tower(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random CLIP vision tower as LLaVA uses it, exported by TorchScript at opset 17 (fused
    ``LayerNormalization``): the second-to-last hidden state without its class token, through a two-layer GELU
    projector; fixed batch of one. ``pixel_values`` -> ``image_features``."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14)
    torch.manual_seed(seed)

    class LlavaTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = CLIPVisionModel(config)
            self.projector = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 96))

        def forward(self, pixel_values):
            hidden = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
            return self.projector(hidden[:, 1:])

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "llava-clip-tower.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(LlavaTower().eval(), (torch.randn(1, 3, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["image_features"])
    return path


def build_qwen2_vl(seed: int = 0):
    """The tiny random Qwen2-VL of ``mqc.models.testing`` (vision: 2 blocks, width 32, merger to 64) with
    non-trivial LayerNorm gammas and betas in its vision tower."""
    import torch
    from mqc.models.testing import build_tiny

    model, _ = build_tiny("qwen2_vl", seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.model.visual.named_parameters():
            if "norm" in name or "ln_q" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.3 * torch.randn(param.shape, generator=generator))
    return model


#: The image both Qwen2-VL tower forms take: 56x56 pixels, 4x4 patches of 14, merged 2x2 into 4 tokens.
QWEN2_VL_IMAGE = (56, 56)


def qwen2_vl_patches(pixels: np.ndarray, vision_config) -> np.ndarray:
    """Qwen2VLImageProcessor's flattening of one normalized image [3, H, W]: the frame repeated over the temporal
    patch, cut into patches in 2x2-merge order, one row per patch (what users feed the vision model)."""
    p, m, t = vision_config.patch_size, vision_config.spatial_merge_size, vision_config.temporal_patch_size
    c, h, w = pixels.shape
    gh, gw = h // p, w // p
    x = np.tile(pixels[None], (t, 1, 1, 1))
    x = x.reshape(1, t, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def export_qwen2_vl_tower(out_dir: Path, seed: int = 0) -> Path:
    """transformers' Qwen2-VL vision model as a user exports it with TorchScript at opset 17: the processor's
    flattened patches and the image grid in (``pixel_values`` [16, 1176], ``image_grid_thw`` [[1, 4, 4]]), the
    merger's output out (``image_embeds`` [4, 64]). The trace turns the grid into constants, so the graph takes
    the patches only and is fixed to that grid."""
    import torch

    class VisionModel(torch.nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values, image_grid_thw):
            return self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output

    visual = build_qwen2_vl(seed).model.visual
    pixels = np.random.default_rng(seed).standard_normal((3, *QWEN2_VL_IMAGE)).astype(np.float32)
    patches = torch.from_numpy(qwen2_vl_patches(pixels, visual.config))
    grid = torch.tensor([[1, *(side // visual.config.patch_size for side in QWEN2_VL_IMAGE)]])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "qwen2-vl-tower-torchscript.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(VisionModel(visual).eval(), (patches, grid), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values", "image_grid_thw"], output_names=["image_embeds"])
    return path


def export_qwen2_vl_tower_reference(out_dir: Path, seed: int = 0) -> Path:
    """The ``mqc export`` vision graph of the same weights as :func:`export_qwen2_vl_tower`: ``pixel_values``
    [1, 3, 56, 56] in (patchified inside the graph), ``image_embeds`` [1, 4, 64] out."""
    from mqc.models.export import export_vision
    from mqc.models.qwen2_vl import plan, single_image_attention

    out_dir.mkdir(parents=True, exist_ok=True)
    vision = plan(build_qwen2_vl(seed), QWEN2_VL_IMAGE).vision
    with single_image_attention():
        return export_vision(vision, QWEN2_VL_IMAGE, out_dir / "vision.onnx", dynamic_batch=False)
