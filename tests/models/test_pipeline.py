"""Pipeline, calibration feeds and ``mqc eval`` on tiny exported models (random weights: plumbing, not quality)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from mqc.models.calibration import calibration_feeds
from mqc.models.data import perplexity_text, vqa_split, vqa_test_set
from mqc.models.evaluate import evaluate, format_table, table_text
from mqc.models.manifest import load as load_manifest
from mqc.models.pipeline import Pipeline


def test_prompt_layout(tiny_model_dir):
    d = tiny_model_dir("llava")
    pipe = Pipeline(d, providers=["CPUExecutionProvider"])
    man = load_manifest(d)
    p = pipe.prompt("what color is the shape?")
    assert int(p.modality.sum()) == man["num_image_tokens"]
    assert np.all(p.ids[p.modality == 1] == man["image_token_id"])
    # the image span is contiguous and the text after it ends with the assistant turn
    pos = p.image_positions
    assert np.all(np.diff(pos) == 1)
    assert pipe.decode(p.ids[pos[-1] + 1 :]).strip().endswith("assistant")
    assert "<|im_start|>" in pipe.tokenizer.decode(p.ids.tolist(), skip_special_tokens=False)


def test_batched_generation_matches_single(tiny_model_dir):
    """Left padding must not change answers: a batch of prompts of different lengths equals one at a time."""
    d = tiny_model_dir("llava")
    pipe = Pipeline(d, providers=["CPUExecutionProvider"])
    items = list(vqa_test_set()[:3])
    qs = [it.question for it in items]
    paths = [it.image_path for it in items]
    batch = pipe.generate(qs, images=paths, max_new_tokens=3)
    for r in range(3):
        one = pipe.generate(qs[r : r + 1], images=paths[r : r + 1], max_new_tokens=3)
        assert one.token_ids[0] == batch.token_ids[r]
        assert np.abs(one.first_logits[0] - batch.first_logits[r]).max() < 1e-4


def test_calibration_feeds_vlm(tiny_model_dir):
    d = tiny_model_dir("llava")
    man = load_manifest(d)
    train_paths = {it.image_path for it in vqa_split("train")}
    feeds = list(calibration_feeds(d, "decoder", 8, seed=0))
    assert len(feeds) == 8
    n_image = 0
    for f in feeds:
        assert {"inputs_embeds", "attention_mask", "position_ids", "modality_ids"} <= set(f)
        assert f["past_key_values.0.key"].shape == (1, man["num_kv_heads"], 0, man["head_dim"])
        assert f["inputs_embeds"].shape[-1] == man["hidden_size"]
        if f["modality_ids"].any():
            n_image += 1
            assert int(f["modality_ids"].sum()) == man["num_image_tokens"]
    assert n_image == 6  # one decoder sample in four is text-only
    vis = list(calibration_feeds(d, "vision", 3, seed=1))
    assert all(v["pixel_values"].shape == (1, 3, *man["image"]["size"]) for v in vis)
    # calibration images come from the train split only
    from mqc.models.calibration import _train_items

    assert all(it.image_path in train_paths for it in _train_items(50, 0))
    # deterministic for a seed
    again = next(iter(calibration_feeds(d, "decoder", 1, seed=0)))
    np.testing.assert_array_equal(again["inputs_embeds"], feeds[0]["inputs_embeds"])


def test_calibration_text_is_not_perplexity_text(tiny_model_dir):
    from mqc.models.data import calibration_text

    cal = calibration_text()
    ppl = perplexity_text()
    assert len(cal) > 100_000
    # no long passage of the perplexity text appears in the calibration text
    probes = [ppl[i : i + 200] for i in range(0, len(ppl) - 200, len(ppl) // 50)]
    assert not any(p in cal for p in probes)
    d = tiny_model_dir("llama")
    feeds = list(calibration_feeds(d, "decoder", 3))
    assert all(not f["modality_ids"].any() for f in feeds)


def test_eval_float_vs_copy(tiny_model_dir, tmp_path):
    """A byte-identical 'compiled' copy must agree 100% with KL 0; every figure is present."""
    d = tiny_model_dir("llava")
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    out = tmp_path / "eval.json"
    res = evaluate(d, [copy], limit=6, ppl_tokens=256, ppl_window=128, latency_runs=1, json_out=out,
                   progress=False)
    assert json.loads(out.read_text())["format"] == "mqc-eval/1"
    f, c = res["models"]
    for m in (f, c):
        assert 0.0 <= m["vqa_accuracy"] <= 1.0
        assert m["vqa_questions"] == 6
        assert np.isfinite(m["perplexity"]) and m["perplexity"] > 1
        assert m["size_mb"] > 0 and m["prefill_ms"] > 0 and m["decode_ms_per_token"] > 0
    assert c["top1_agreement"] == 1.0
    assert abs(c["kl"]) < 1e-6
    assert c["vqa_accuracy"] == f["vqa_accuracy"]
    assert f["perplexity"] == pytest.approx(c["perplexity"], rel=1e-6)
    assert res["prior_baseline"]["num_questions"] == 6
    text = table_text(res)
    assert "VQA acc" in text and "decode ms/tok" in text
    assert format_table(res).row_count == 2


def test_eval_cli_text_only(tiny_model_dir, tmp_path):
    from click.testing import CliRunner
    from mqc.models.commands import eval_cmd

    d = tiny_model_dir("llama")
    out = tmp_path / "e.json"
    r = CliRunner().invoke(eval_cmd, [str(d), "--limit", "2", "--ppl-tokens", "256", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["models"][0]["vqa_accuracy"] is None  # text-only: no VQA
    assert res["models"][0]["perplexity"] > 1
