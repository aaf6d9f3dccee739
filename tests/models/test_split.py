"""The validation split never meets what trained the projector, what calibrates, nor what is reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mqc.models import data
from mqc.models.calibration import _train_items


def test_val_questions_are_on_projector_held_out_images():
    val = data.vqa_val_set()
    assert len(val) == 1509 and len({it.image_id for it in val}) == 159
    assert all(it.image_id % data.PROJECTOR_HOLDOUT_MOD == 0 for it in val)
    assert all("/train/" in it.image_path for it in val)
    source = (Path(data.__file__).parent / "train_projector.py").read_text()
    assert int(re.search(r"^HOLDOUT_MOD = (\d+)$", source, re.M).group(1)) == data.PROJECTOR_HOLDOUT_MOD
    assert "it.image_id % HOLDOUT_MOD != 0" in source  # the projector trains only on the other images


def test_val_never_meets_a_calibration_image():
    val_images = {it.image_id for it in data.vqa_val_set()}
    reachable = {it.image_id for it in data.calibration_train_items(data.CALIBRATION_RESERVE)}
    assert val_images and not val_images & reachable
    # mqc compile's calibration (seed 0) draws exactly these items, and no more than the reserve
    assert _train_items(64, 0) == data.calibration_train_items(64)
    with pytest.raises(ValueError, match="at most"):
        _train_items(data.CALIBRATION_RESERVE + 1, 0)


def test_val_is_not_the_test_set_and_is_fixed():
    test_paths = {it.image_path for it in data.vqa_test_set()}
    assert not test_paths & {it.image_path for it in data.vqa_val_set()}
    first = data.vqa_val_set()[:3]
    data.vqa_val_set.cache_clear()
    assert data.vqa_val_set()[:3] == first
    assert data.vqa_eval_set("test") == data.vqa_test_set()
    with pytest.raises(ValueError):
        data.vqa_eval_set("train")


def test_validation_text_is_neither_the_calibration_nor_the_perplexity_text():
    assert not set(data.VALIDATION_MODULES) & set(data.CALIBRATION_MODULES)
    val = data.validation_text()
    assert len(val) > 50_000
    paragraphs = {p for p in val.split("\n\n") if len(p) > 80}
    for other in (data.calibration_text(), data.perplexity_text()):
        assert not paragraphs & {p for p in other.split("\n\n") if len(p) > 80}


def test_eval_scores_the_val_slice_asked_for(tiny_model_dir):
    from click.testing import CliRunner
    from mqc.models.commands import eval_cmd
    from mqc.models.evaluate import evaluate

    model = tiny_model_dir("llava")
    result = evaluate(model, [], limit=2, offset=3, split="val", ppl_tokens=256, ppl_window=128, latency_runs=1,
                      progress=False)
    assert result["settings"]["split"] == "val" and result["settings"]["ppl_text"].startswith("validation_text")
    assert result["models"][0]["vqa_questions"] == 2
    assert result["prior_baseline"]["num_questions"] == 2
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, [], limit=1, offset=len(data.vqa_val_set()), split="val", progress=False)
    bad = CliRunner().invoke(eval_cmd, [str(model), "--split", "val", "--offset", "99999"])
    assert bad.exit_code == 2 and "1509 questions" in bad.output
