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
def test_decoder_fidelity(family, tiny_dir):
    model_dir = tiny_dir(family)
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
def test_manifest_and_names(family, tiny_dir):
    import onnx

    model_dir = tiny_dir(family)
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
