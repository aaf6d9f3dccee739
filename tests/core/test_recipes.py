"""Recipes are checked whole when they load (typed pass parameters), compose by ``extends``, and take overrides
from the command line (``--set``, ``recipe:pass.key=value``, ``--bits``, ``--acts``) through the same check."""

from __future__ import annotations

import json
import math
import sys

import pytest
from click.testing import CliRunner

import mqc
from mqc.cli import main
from mqc.errors import RecipeError
from mqc.params import PASS_PARAMS
from mqc.recipes import (
    PASS_MODULES,
    Recipe,
    builtin_recipes,
    load_recipe,
    with_acts,
    with_assignments,
    with_bits,
)


def _recipe(step: dict) -> Recipe:
    return Recipe("r", "", [{"pass": "upgrade_opset"}, step])


@pytest.mark.parametrize(("step", "message"), [
    ({"pass": "quantize_linears", "weight_bit": 8}, "pass quantize_linears: unknown key 'weight_bit'"),
    ({"pass": "quantize_linears", "weight_bits": 3}, "key 'weight_bits': 3 is not one of 4, 8"),
    ({"pass": "quantize_linears", "weight_bits": 16}, "key 'weight_bits': 16 is not one of 4, 8"),
    ({"pass": "quantize_linears", "weight_bits": 0}, "key 'weight_bits': 0 is not one of 4, 8"),
    ({"pass": "quantize_linears", "weight_bits": "eight"}, "key 'weight_bits': expected an integer, got 'eight'"),
    ({"pass": "quantize_linears", "weight_bits": True}, "key 'weight_bits': expected an integer, got True"),
    ({"pass": "quantize_linears", "weight_bits": 8.0}, "key 'weight_bits': expected an integer, got 8.0"),
    ({"pass": "cmc", "act_bits": -8}, "pass cmc, key 'act_bits': -8 is not one of 8"),
    ({"pass": "cmc", "rank_ratio": math.nan}, "key 'rank_ratio': expected a finite number, got nan"),
    ({"pass": "cmc", "rank_ratio": 0}, "key 'rank_ratio': 0 is out of range (must be > 0.0)"),
    ({"pass": "cmc", "acts": "per_tensor"}, "key 'acts': 'per_tensor' is not one of 'dynamic', 'static'"),
    ({"pass": "cmc", "whiten": 1}, "key 'whiten': expected true or false, got 1"),
    ({"pass": "smoothquant", "alpha": 1.5}, "key 'alpha': 1.5 is out of range (must be <= 1.0)"),
    ({"pass": "gptq_weights", "group_size": 0}, "key 'group_size': 0 is out of range (must be >= 1)"),
    ({"pass": "hadamard_rotation", "tower": "audio"}, "key 'tower': 'audio' is not one of 'auto', 'decoder', 'vision'"),
    ({"pass": "rms_split", "roles": "down"}, "key 'roles': expected a list of strings, got 'down'"),
    ({"pass": ["mas"]}, "unknown pass ['mas']"),
    ({"pass": "nope"}, "unknown pass 'nope'"),
])
def test_bad_parameters_are_one_error_naming_recipe_pass_and_key(step, message):
    with pytest.raises(RecipeError) as caught:
        _recipe(step)
    assert str(caught.value).startswith("recipe r: " if "unknown pass" in message else "recipe r, pass ")
    assert message in str(caught.value)


def test_parameters_are_typed_frozen_and_defaults_filled():
    recipe = _recipe({"pass": "gptq_weights", "weight_bits": 8, "group_size": 64})
    params = recipe.params[1]
    assert (params.weight_bits, params.group_size, params.act_order, params.skip_roles) == (8, 64, True, ("lm_head",))
    with pytest.raises(AttributeError):
        params.weight_bits = 4  # type: ignore[misc]
    assert set(PASS_PARAMS) == set(PASS_MODULES)


def test_every_builtin_recipe_loads_and_listing_imports_no_pass_or_torch():
    import subprocess

    code = ("import sys; from mqc.recipes import builtin_recipes; r = builtin_recipes(); "
            "print(len(r), any(m.startswith('mqc.passes.') for m in sys.modules), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(builtin_recipes())), "False", "False"]


def test_extends_applies_overrides_and_components():
    static = load_recipe("masquant-static")
    base = load_recipe("masquant")
    assert [s["pass"] for s in static.passes] == [s["pass"] for s in base.passes]
    assert {s["acts"] for s in static.passes if "acts" in s} == {"static"}
    assert static.components == base.components == {"vision": {"float": True}}
    g64 = load_recipe("masquant-rot-g64")
    cmc = next(p for s, p in zip(g64.passes, g64.params, strict=True) if s["pass"] == "cmc")
    assert (cmc.group_size, cmc.weights) == (64, "gptq")  # from the override and from masquant-rot


def test_extends_errors(tmp_path):
    loop_a, loop_b = tmp_path / "a.json", tmp_path / "b.json"
    loop_a.write_text(json.dumps({"name": "a", "extends": str(loop_b)}))
    loop_b.write_text(json.dumps({"name": "b", "extends": str(loop_a)}))
    with pytest.raises(RecipeError, match="'extends' loops"):
        load_recipe(str(loop_a))
    absent = tmp_path / "c.json"
    absent.write_text(json.dumps({"name": "c", "extends": "w8a8", "overrides": {"mas": {"lr": 0.1}}}))
    with pytest.raises(RecipeError, match="recipe c: overrides pass 'mas', which the recipe does not run"):
        load_recipe(str(absent))
    typo = tmp_path / "d.json"
    typo.write_text(json.dumps({"name": "d", "extends": "w8a8", "overides": {}}))
    with pytest.raises(RecipeError, match=r"recipe .*d\.json: unknown key 'overides'"):
        load_recipe(str(typo))
    bad_value = tmp_path / "e.json"
    bad_value.write_text(json.dumps({"name": "e", "extends": "w8a8", "overrides": {"quantize_linears": {"act_bits": 4}}}))
    with pytest.raises(RecipeError, match="recipe e, pass quantize_linears, key 'act_bits'"):
        load_recipe(str(bad_value))


def test_set_spec_bits_and_acts_are_overrides():
    spec = load_recipe("quarot:hadamard_rotation.head_dim=64:gptq_weights.act_method=mse")
    assert spec.params[3].head_dim == 64 and spec.params[4].act_method == "mse"
    same = with_assignments(load_recipe("quarot"), ["hadamard_rotation.head_dim=64", "gptq_weights.act_method=mse"])
    assert same.params == spec.params
    assert with_assignments(load_recipe("masquant"), ["components.vision.float=false"]).for_component("vision")
    with pytest.raises(RecipeError, match=r"expected PASS\.KEY=VALUE"):
        with_assignments(load_recipe("w8a8"), ["quantize_linears"])
    assert with_bits(load_recipe("masquant"), "w8a8").params == load_recipe("masquant-w8a8").params
    assert with_acts(load_recipe("masquant"), "static").params == load_recipe("masquant-static").params
    with pytest.raises(RecipeError, match="no activation mode"):
        with_acts(load_recipe("mquant"), "static")


def test_cli_bad_recipe_value_exits_2_before_reading_the_model(tmp_path):
    runner = CliRunner()
    missing = str(tmp_path / "no-such-model.onnx")
    for args in (["--recipe", "w8a8", "--set", "quantize_linears.weight_bits=3"],
                 ["--recipe", "w8a8:quantize_linears.weight_bits=3"]):
        result = runner.invoke(main, ["compile", missing, "-o", str(tmp_path / "out.onnx"), *args])
        assert result.exit_code == 2, result.output
        assert "pass quantize_linears, key 'weight_bits': 3 is not one of 4, 8" in " ".join(result.output.split())
        assert "no-such-model" not in result.output  # the recipe is checked first
    assert not (tmp_path / "out.onnx").exists()


def test_cli_recipes_name_prints_the_resolved_recipe():
    result = CliRunner().invoke(main, ["recipes", "masquant-w8a8-static:cmc.min_rank=16"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    cmc = next(s for s in data["passes"] if s["pass"] == "cmc")
    assert (cmc["weight_bits"], cmc["acts"], cmc["min_rank"]) == (8, "static", 16)
    assert data["components"] == {"vision": {"float": True}}


def test_a_recipe_carries_the_calibration_size_it_was_chosen_with(tiny_decoder, tmp_path):
    flagship = load_recipe("mquant")
    assert flagship.samples == 128 and flagship.passes == load_recipe("mquant-sink-g64").passes
    assert load_recipe("mquant-paper").samples is None
    assert with_bits(with_assignments(flagship, ["gptq_weights.group_size=32"]), "w8a8").samples == 128
    assert json.loads(CliRunner().invoke(main, ["recipes", "mquant"]).output)["samples"] == 128
    for bad in (0, 2.5, True, "many"):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"name": "bad", "extends": "w8a8", "samples": bad}))
        with pytest.raises(RecipeError, match="recipe bad: 'samples' is a whole number"):
            load_recipe(str(path))
    few = tmp_path / "few.json"
    few.write_text(json.dumps({"name": "few", "extends": "w8a8", "samples": 3}))
    out = tmp_path / "q.onnx"
    assert mqc.compile(tiny_decoder("llama"), out, str(few)).calibration["samples"] == 3  # no --samples: the recipe's
    assert mqc.compile(tiny_decoder("llama"), out, str(few), num_samples=2).calibration["samples"] == 2


def test_text_window_is_inherited_and_checked(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"name": "base", "extends": "mquant", "text_window": 256}))
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"name": "child", "extends": str(base)}))
    assert load_recipe(str(child)).text_window == 256
    assert with_bits(with_assignments(load_recipe(str(child)), ["gptq_weights.group_size=32"]), "w8a8").text_window == 256
    for bad in (8, 40.5, True):
        base.write_text(json.dumps({"name": "base", "extends": "w8a8", "text_window": bad}))
        with pytest.raises(RecipeError, match="'text_window' is a whole number of tokens >= 16"):
            load_recipe(str(base))
    result = CliRunner().invoke(main, ["compile", "model.onnx", "-o", str(tmp_path / "q.onnx"), "--text-window", "64"])
    assert result.exit_code != 0 and "--text-window sets the text samples" in result.output
