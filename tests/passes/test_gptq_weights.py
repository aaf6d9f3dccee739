"""GptqWeightsPass and the quarot recipe: GPTQ W4 + static A8 after folding and rotation, closer to float than RTN."""

from __future__ import annotations

import numpy as np
import onnx
from mqc.passes.gptq_weights import GptqWeightsPass

import mqc
from mqc.calibration import random_feeds
from mqc.ir import load_model
from mqc.pass_manager import CompileContext, PassManager
from mqc.quantizer import sqnr_db


def _logits(path, feeds):
    session = mqc.open_session(path)
    return np.concatenate([session.run(["logits"], feed)[0] for feed in feeds])


def test_quarot_recipe_verifies_and_beats_w4a8_rtn(tiny_decoder, tmp_path):
    source = tiny_decoder("llama")
    feeds = random_feeds(load_model(source), 3, seed=123)
    ref = _logits(source, feeds)
    sqnr = {}
    for recipe in ("w4a8-rtn", "quarot"):
        report = mqc.compile(source, tmp_path / f"{recipe}.onnx", recipe, verify=True)
        sqnr[recipe] = sqnr_db(ref, _logits(tmp_path / f"{recipe}.onnx", feeds))
    records = {p.name: p for p in report.passes}
    assert records["hadamard_rotation"].verify["max_rel"] < 1e-4 and records["norm_folding"].verify is not None
    gptq = records["gptq_weights"]
    assert gptq.changed == 14 and gptq.skipped[0]["reason"].startswith("role lm_head")
    rows = gptq.layers
    assert all(row["weight_method"] == "gptq" and np.isfinite(row["sqnr_db"]) for row in rows)
    assert np.mean([r["gptq_rel_error"] for r in rows]) < np.mean([r["rtn_rel_error"] for r in rows])
    assert sqnr["quarot"] > sqnr["w4a8-rtn"], sqnr
    weights = [t for t in onnx.load(str(tmp_path / "quarot.onnx")).graph.initializer if t.name.endswith(".weight_q")]
    assert len(weights) == 14 and {t.data_type for t in weights} == {onnx.TensorProto.INT4}


def test_hessians_are_collected_one_layer_group_at_a_time(tiny_decoder):
    model = load_model(tiny_decoder("llama"))
    ctx = CompileContext(lambda: random_feeds(model, 2, seed=1))
    calls = []
    calibrate = ctx.calibrate

    def spy(model, taps, gram_taps=(), label=""):
        calls.append((list(taps), list(gram_taps)))
        return calibrate(model, taps, gram_taps=gram_taps, label=label)

    ctx.calibrate = spy
    (record,) = PassManager([GptqWeightsPass(weight_bits=8, layers_per_group=1)], ctx).run(model)
    assert len(calls) == 2 and all(len(taps) == 4 and taps == grams for taps, grams in calls)
    assert record.changed == 14
    assert all(row["gptq_rel_error"] < 0.02 for row in record.layers)  # W8
