"""Tiny random-weight models of every supported family, built offline from config objects, for tests.

``export_tiny("llama", tmp_path)`` returns a model directory (manifest, tokenizer, graphs) in a few seconds.
The tokenizer is a byte-level BPE trained on the fly on Python's own documentation text, with ChatML specials,
so nothing is downloaded. Random weights carry none of the outliers of real models: use these for plumbing and
float-fidelity tests, never to judge a quantization recipe.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

FAMILIES = ("llama", "qwen2", "gemma3", "llava", "qwen2_vl")
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from mqc.models.data import calibration_text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([calibration_text()[:60_000]], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` with ChatML specials and a chat template (vocab <= 512)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(family: str):
    """A small random config of ``family`` (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 512)."""
    from transformers import (
        CLIPVisionConfig,
        Gemma3TextConfig,
        LlamaConfig,
        LlavaConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**{**common, "head_dim": 16, "sliding_window": 6,
                                   "layer_types": ["sliding_attention", "full_attention"],
                                   "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16})
    if family == "llava":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
        return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**common), image_token_id=3,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           projector_hidden_act="gelu")
    if family == "qwen2_vl":
        from mqc.models.qwen2_vl import tiny_config as qwen2_vl_tiny

        return qwen2_vl_tiny(common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def build_tiny(family: str, seed: int = 0):
    """``(model, tokenizer)``: a random-weight fp32 model of ``family`` in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = tiny_config(family)
    if family in ("llava", "qwen2_vl"):
        model = AutoModelForImageTextToText.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model = model.float().eval()
    # Default init (std 0.02) gives near-uniform logits; widen it so argmax comparisons are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(4.0)
    return model, tiny_tokenizer()


def export_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random model of ``family`` and export it into ``out_dir``; return the model directory."""
    from mqc.models.export import export_model

    model, tokenizer = build_tiny(family, seed)
    return export_model(model, tokenizer, Path(out_dir), name=f"tiny-{family}")
