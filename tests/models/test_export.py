"""Float fidelity of the exported graphs against torch, per family, on tiny random configs.

Criteria (issue 3): max abs logit difference <= 1e-3 and identical greedy tokens, prefill and KV-cache decode.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mqc.models.manifest import load as load_manifest  # noqa: E402
from mqc.models.testing import build_tiny  # noqa: E402

from mqc.session import open_session  # noqa: E402

TOL = 1e-3
DECODER_FAMILIES = ["llama", "qwen2", "gemma3"]


def _empty_past(man, batch):
    shape = (batch, man["num_kv_heads"], 0, man["head_dim"])
    feeds = {}
    for i in range(man["num_layers"]):
        feeds[f"past_key_values.{i}.key"] = np.zeros(shape, np.float32)
        feeds[f"past_key_values.{i}.value"] = np.zeros(shape, np.float32)
    return feeds


def _run_decoder(sess, man, embeds, past, start):
    b, s, _ = embeds.shape
    total = start + s
    pos = np.broadcast_to(np.arange(start, total), (b, s)).astype(np.int64)
    if man["position_ids"] == "mrope":
        pos = np.broadcast_to(pos, (3, b, s)).copy()
    feeds = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((b, total), np.int64),
             "position_ids": pos, "modality_ids": np.zeros((b, s), np.int64), **past}
    outs = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, outs, strict=True))
    new_past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
    return res["logits"], new_past


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_fidelity(family, tiny_model_dir):
    model_dir = tiny_model_dir(family)
    man = load_manifest(model_dir)
    model, _ = build_tiny(family)  # same seed as export_tiny: identical weights
    embed = open_session(model_dir / "embed.onnx", providers=["CPUExecutionProvider"])
    dec = open_session(model_dir / "decoder.onnx", providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    ids = rng.integers(10, man["vocab_size"], size=(2, 7)).astype(np.int64)
    (emb,) = embed.run(None, {"input_ids": ids})
    with torch.no_grad():
        ref_emb = model.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6)

    # Prefill with an empty cache, then greedy decode steps with the KV cache, against full torch forwards.
    logits, past = _run_decoder(dec, man, emb, _empty_past(man, 2), 0)
    seq = torch.from_numpy(ids)
    with torch.no_grad():
        ref = model(input_ids=seq).logits.numpy()
    assert np.abs(logits - ref).max() <= TOL
    for _step in range(4):
        nxt = logits[:, -1].argmax(-1)
        ref_next = ref[:, -1].argmax(-1)
        np.testing.assert_array_equal(nxt, ref_next)
        seq = torch.cat([seq, torch.from_numpy(nxt)[:, None]], dim=1)
        (emb,) = embed.run(None, {"input_ids": nxt[:, None].astype(np.int64)})
        logits, past = _run_decoder(dec, man, emb, past, seq.shape[1] - 1)
        with torch.no_grad():
            ref = model(input_ids=seq).logits[:, -1:].numpy()
        assert np.abs(logits - ref).max() <= TOL, f"decode step {_step}"


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_manifest_and_names(family, tiny_model_dir):
    import onnx

    model_dir = tiny_model_dir(family)
    man = json.loads((model_dir / "manifest.json").read_text())
    assert man["format"] == "mqc-model/1"
    assert man["family"] == family
    assert set(man["components"]) == {"embed", "decoder"}
    assert (model_dir / man["tokenizer"]).exists()
    dec = onnx.load(str(model_dir / "decoder.onnx"), load_external_data=False)
    assert dec.ir_version <= 13
    assert any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in dec.opset_import)
    inputs = [i.name for i in dec.graph.input]
    assert inputs[:4] == ["inputs_embeds", "attention_mask", "position_ids", "modality_ids"]
    assert [o.name for o in dec.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    inits = {i.name: list(i.dims) for i in dec.graph.initializer}
    h = man["hidden_size"]
    # Linears keep their module paths and sit [in, out] as the right operand of a MatMul.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert inits[q] == [h, man["num_attention_heads"] * man["head_dim"]]
    matmul_weights = {n.input[1] for n in dec.graph.node if n.op_type == "MatMul"}
    assert q in matmul_weights
    assert "model.layers.1.mlp.down_proj.weight" in matmul_weights


def test_llava_fidelity(tiny_model_dir):
    """vision.onnx against the torch vision path, then the whole ONNX pipeline against the torch VLM."""
    from mqc.models.pipeline import Pipeline

    model_dir = tiny_model_dir("llava")
    man = load_manifest(model_dir)
    assert set(man["components"]) == {"vision", "embed", "decoder"}
    model, _ = build_tiny("llava")
    pipe = Pipeline(model_dir, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, 3, *man["image"]["size"])).astype(np.float32)
    emb = pipe.image_embeds(pixels)
    with torch.no_grad():
        ref = model.model.get_image_features(torch.from_numpy(pixels), vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").pooler_output
    ref = torch.stack(list(ref)).numpy()
    assert emb.shape == (2, man["num_image_tokens"], man["hidden_size"])
    assert np.abs(emb - ref).max() <= TOL

    # The ONNX pipeline (left-padded batch of two prompts of different lengths) against torch, one row at a time.
    questions = ["what is the shape?", "is there a red circle in the image?"]
    gen = pipe.generate(questions, pixel_values=pixels, max_new_tokens=4)
    for r, q in enumerate(questions):
        prompt = pipe.prompt(q)
        ids = torch.from_numpy(prompt.ids)[None]
        with torch.no_grad():
            ref_logits = model(input_ids=ids, pixel_values=torch.from_numpy(pixels[r : r + 1])).logits[0, -1].numpy()
        assert np.abs(gen.first_logits[r] - ref_logits).max() <= TOL
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=torch.from_numpy(pixels[r : r + 1]), max_new_tokens=4,
                                 do_sample=False, eos_token_id=man["eos_token_ids"], pad_token_id=0)
        ref_tokens = [t for t in out[0, ids.shape[1] :].tolist() if t not in man["eos_token_ids"]]
        assert gen.token_ids[r] == ref_tokens[: len(gen.token_ids[r])]
        assert len(gen.token_ids[r]) == len(ref_tokens) or len(gen.token_ids[r]) == 4


def _qwen2_vl_patchify(pixels: np.ndarray, vcfg) -> np.ndarray:
    """Qwen2VLImageProcessor's flattening of one normalized image [3, H, W] (numpy, independent of the graph)."""
    p, m, t = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size
    c, h, w = pixels.shape
    gh, gw = h // p, w // p
    x = np.tile(pixels[None], (t, 1, 1, 1))
    x = x.reshape(1, t, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * t * p * p), np.array([[1, gh, gw]])


def test_qwen2_vl_fidelity(tiny_model_dir):
    """Qwen2-VL: vision at a fixed size, M-RoPE positions against get_rope_index, pipeline logits and tokens."""
    from mqc.models.pipeline import Pipeline
    from mqc.models.qwen2_vl import mrope_positions

    model_dir = tiny_model_dir("qwen2_vl")
    man = load_manifest(model_dir)
    assert man["position_ids"] == "mrope"
    model, _ = build_tiny("qwen2_vl")
    vcfg = model.config.vision_config
    pipe = Pipeline(model_dir, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((2, 3, *man["image"]["size"])).astype(np.float32)
    emb = pipe.image_embeds(pixels)
    assert emb.shape == (2, man["num_image_tokens"], man["hidden_size"])
    flat = [_qwen2_vl_patchify(px, vcfg) for px in pixels]
    for r in range(2):
        with torch.no_grad():
            ref = model.model.get_image_features(torch.from_numpy(flat[r][0]),
                                                 image_grid_thw=torch.from_numpy(flat[r][1])).pooler_output[0]
        assert np.abs(emb[r] - ref.numpy()).max() <= TOL

    questions = ["what is the shape?", "is there a red circle in the image?"]
    gen = pipe.generate(questions, pixel_values=pixels, max_new_tokens=4)
    for r, q in enumerate(questions):
        prompt = pipe.prompt(q)
        ids = torch.from_numpy(prompt.ids)[None]
        mm = torch.from_numpy(prompt.modality)[None].int()
        grid = torch.from_numpy(flat[r][1])
        ref_pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
        ours = mrope_positions(np.ones((1, len(prompt.ids)), np.int64), prompt.modality[None], man)
        np.testing.assert_array_equal(ours, ref_pos.numpy())
        kwargs = dict(pixel_values=torch.from_numpy(flat[r][0]), image_grid_thw=grid, mm_token_type_ids=mm)
        with torch.no_grad():
            ref_logits = model(input_ids=ids, **kwargs).logits[0, -1].numpy()
        assert np.abs(gen.first_logits[r] - ref_logits).max() <= TOL
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, eos_token_id=man["eos_token_ids"], pad_token_id=0, **kwargs)
        ref_tokens = [t for t in out[0, ids.shape[1] :].tolist() if t not in man["eos_token_ids"]]
        assert gen.token_ids[r] == ref_tokens[: len(gen.token_ids[r])]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llava"])
def test_export_command_from_checkpoint_folder(family, tmp_path):
    """`mqc export FOLDER -o DIR` on a saved Hugging Face checkpoint (offline) reproduces the torch model."""
    from click.testing import CliRunner
    from mqc.models.commands import export_command
    from mqc.models.pipeline import Pipeline

    model, tok = build_tiny(family, seed=3)
    ckpt = tmp_path / f"ckpt-{family}"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    out = tmp_path / "out"
    r = CliRunner().invoke(export_command, [str(ckpt), "-o", str(out)])
    assert r.exit_code == 0, r.output
    man = load_manifest(out)
    assert man["family"] == family and man["name"] == ckpt.name
    pipe = Pipeline(out, providers=["CPUExecutionProvider"])
    prompt = pipe.prompt("is there a circle?", with_image=False)
    logits = pipe.text_logits(prompt.ids[None])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(prompt.ids)[None]).logits.numpy()
    assert np.abs(logits - ref).max() <= TOL


def test_guarded_optimizer_writes_onnxscripts_graph(tmp_path):
    """``onnx_utils.onnxscript_optimize`` (rules tried on their root op only) = ``onnxscript.optimizer.optimize``."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from mqc.models import onnx_utils

    class HalvesAndLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            first, second = x[..., :4], x[..., 4:]  # two Slices of one tensor: SlicesSplit's pattern
            rotated = torch.cat([-second, first], dim=-1)
            return self.linear(rotated).reshape(x.shape[0], -1, 2, 4).transpose(1, 2).to(torch.float64).float()

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(HalvesAndLinear(), (torch.randn(2, 3, 8),), dynamo=True, optimize=False,
                                dynamic_shapes=({0: batch},))
    path = tmp_path / "unoptimized.onnx"
    ir.save(program.model, path)
    stock, guarded = ir.load(path), ir.load(path)
    unoptimized = len(stock.graph)
    onnxscript.optimizer.optimize(stock, num_iterations=2)
    onnx_utils.onnxscript_optimize(guarded, num_iterations=2)
    assert len(guarded.graph) < unoptimized
    assert ir.serde.serialize_model(guarded) == ir.serde.serialize_model(stock)
