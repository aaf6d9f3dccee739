"""A recipe that cannot do its essential work stops (exit 2, nothing written) unless --allow-partial is given,
in which case the summary's first line and the report say what did not apply. Per-node refusals stay skips."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mqc.cli import main
from mqc.report import read_report


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    return tiny_decoder("llama")


def _compile(llama, out, *extra):
    return CliRunner().invoke(main, ["compile", str(llama), "-o", str(out), "--samples", "2", *extra])


def test_refused_pass_exits_2_and_writes_nothing(llama, tmp_path):
    out = tmp_path / "v.onnx"
    result = _compile(llama, out, "--recipe", "mquant-vision")  # a vision-tower recipe on a decoder
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "pass ln_to_rmsnorm cannot do its work on this model: no LayerNormalization" in text
    assert "--allow-partial" in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_allow_partial_says_first_what_did_not_apply(llama, tmp_path):
    out = tmp_path / "v.onnx"
    result = _compile(llama, out, "--recipe", "mquant-vision", "--allow-partial")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("partial (--allow-partial): did not apply:")
    assert "ln_to_rmsnorm: no LayerNormalization" in lines[0] and "hadamard_rotation:" in " ".join(lines[:3])
    report = read_report(str(out))
    assert [r.name for r in report.passes if r.not_applied] == ["ln_to_rmsnorm", "hadamard_rotation"]
    assert any(layer.get("w_bits") == 4 for r in report.passes for layer in r.layers)  # the rest still ran
    fatal = {s["fatal"] for r in report.passes for s in r.skipped if "fatal" in s}
    assert "no_layernorm" in fatal  # the reason code the pass declares, recorded with the skip
    explained = " ".join(CliRunner().invoke(main, ["explain", str(out)]).output.split())
    assert "fatal skips (stop the recipe with exit 2 unless --allow-partial)" in explained
    for code in ("no_layernorm", "stream_not_centrable", "norms_not_affine_free", "head_layout_unknown"):
        assert code in explained  # every fatal skip of the recipe's passes is listed, the ones that hit marked
    assert "did not apply: no LayerNormalization" in explained


def test_cmc_without_mas_is_refused_not_a_plain_quantizer(llama, tmp_path):
    result = _compile(llama, tmp_path / "c.onnx", "--recipe", "masquant:mas.epochs=0", "--set", "mas.learn=false")
    assert result.exit_code == 0, result.output  # with MAS: compensates
    spec = tmp_path / "cmc-only.json"
    spec.write_text('{"name": "cmc-only", "passes": [{"pass": "fuse_norms"}, {"pass": "cmc"}]}')
    result = _compile(llama, tmp_path / "d.onnx", "--recipe", str(spec))
    assert result.exit_code == 2
    assert "no MAS-smoothed linear" in " ".join(result.output.split())
