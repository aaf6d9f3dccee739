"""The quality gate: compiled vs float on held-out samples after every compile, and --min-sqnr/--max-kl rejection."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner

from mqc.cli import main
from mqc.quality_gate import Limits, compare_outputs, hold_out
from mqc.report import read_report


def test_compare_outputs_measures_kl_and_top1_on_known_logits():
    reference = [np.array([[[2.0, 0.0], [0.0, 2.0]]])]
    compiled = [np.array([[[0.0, 2.0], [0.0, 2.0]]])]
    p, q = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum(), np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum()
    result = compare_outputs(reference, compiled, logits=True)
    assert result["top1_agreement"] == 0.5 and result["tokens"] == 2
    assert np.isclose(result["kl"], float(np.sum(p * np.log(p / q))) / 2, atol=1e-6)
    assert np.isclose(result["sqnr_db"], 10 * np.log10(8 / 8))
    same = compare_outputs(reference, reference, logits=True)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["sqnr_db"] == float("inf")


def test_hold_out_keeps_an_eighth_apart_from_calibration():
    samples = [{"x": np.full(1, i)} for i in range(32)]
    feeds, held, disjoint = hold_out(lambda: samples)
    calibration = list(feeds())
    assert disjoint and len(held) == 4 and len(calibration) == 28
    assert {int(s["x"][0]) for s in held}.isdisjoint(int(s["x"][0]) for s in calibration)
    assert hold_out(lambda: samples[:1])[2] is False


def test_limits_name_each_violation():
    quality = {"output": "logits", "sqnr_db": 12.0, "kl": 0.3}
    assert Limits(min_sqnr=10, max_kl=0.5).violations(quality) == []
    assert len(Limits(min_sqnr=15, max_kl=0.1).violations(quality)) == 2
    assert Limits(max_kl=0.1).violations({"output": "image_embeds", "sqnr_db": 30.0}) != []


def test_a_broken_compile_is_rejected_with_exit_3_and_kept_aside(llama_decoder, tmp_path):
    broken = tmp_path / "clipped.json"  # every activation clipped at its median: a deliberately broken compile
    broken.write_text(json.dumps({"name": "clipped", "description": "W4A8 with activations clipped at their median",
                                  "passes": [{"pass": "upgrade_opset"},
                                             {"pass": "quantize_linears", "weight_bits": 4, "act_bits": 8,
                                              "act_method": "percentile", "act_percentile": 50.0}]}))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["compile", str(llama_decoder), "-o", str(out), "--recipe", str(broken),
                                       "--samples", "16", "--min-sqnr", "15"])
    assert result.exit_code == 3, result.output
    assert "quality gate rejected" in result.output and "--min-sqnr 15" in result.output
    rejected = tmp_path / "q.onnx.rejected"
    assert not out.exists() and rejected.exists()
    onnx.checker.check_model(str(rejected))
    report = read_report(str(rejected))
    assert report is not None and report.quality["sqnr_db"] < 15 and report.quality["samples"] == 2

    good = CliRunner().invoke(main, ["compile", str(llama_decoder), "-o", str(out), "--recipe", "w8a8",
                                     "--samples", "16", "--min-sqnr", "15", "--max-kl", "0.05"])
    assert good.exit_code == 0, good.output
    assert "quality gate on 2 held-out samples" in good.output
    stored = read_report(str(out)).quality
    assert stored["sqnr_db"] >= 15 and stored["kl"] <= 0.05 and stored["held_out"] is True
