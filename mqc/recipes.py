"""Recipes are data: a named, ordered list of passes with parameters, shipped as JSON or read from a user file.

A pass is named by its ``name`` attribute; :data:`PASS_MODULES` says which module of ``mqc.passes`` defines it, so
listing recipes never imports heavy passes (and never torch).

Per-component settings (a model folder compiles its ``vision`` and ``decoder`` graphs with one recipe): an optional
top-level ``"components"`` map gives a component its own recipe and/or pass-parameter overrides, e.g. MQuant's
"W8A8 vision / W4A8 LLM"::

    "components": {"vision": {"recipe": "vision-w8a8-rot", "overrides": {"gptq_weights": {"weight_bits": 8}}}}

``recipe`` (a built-in name or a .json path) replaces the pass list for that component; ``overrides`` (pass name ->
parameters, as :func:`with_overrides`) then applies to the component's passes; ``"float": true`` leaves the
component unquantized (MASQuant quantizes only the language model). A component that is not listed uses the
recipe's own passes. :meth:`Recipe.for_component` resolves it; ``compile_package`` calls it per component.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mqc.errors import RecipeError
from mqc.pass_manager import MqcPass

#: pass name -> "module:Class" inside mqc.passes
PASS_MODULES: dict[str, str] = {
    "upgrade_opset": "canonicalize:UpgradeOpsetPass",
    "fuse_norms": "canonicalize:FuseNormsPass",
    "quantize_linears": "quantize_linears:QuantizeLinearsPass",
    "norm_folding": "norm_folding:FoldNormsPass",
    "ln_to_rmsnorm": "ln_to_rmsnorm:LayerNormToRMSNormPass",
    "hadamard_rotation": "hadamard_rotation:RotateResidualPass",
    "gptq_weights": "gptq_weights:GptqWeightsPass",
    "smoothquant": "smoothquant:SmoothQuantPass",
    "mas": "mas:MasPass",
    "cmc": "cmc:CmcPass",
    "aifs": "aifs:AifsPass",
    "rms_split": "rms_split:RmsSplitPass",
    "lower_runtime_ops": "lower_runtime_ops:LowerRuntimeOpsPass",
}


@dataclass
class Recipe:
    name: str
    description: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    def instantiate(self) -> list[MqcPass]:
        return [pass_class(step["pass"])(**{k: v for k, v in step.items() if k != "pass"}) for step in self.passes]

    def for_component(self, component: str) -> Recipe | None:
        """The recipe a model folder's ``component`` compiles with, or None to keep it in float (module docstring)."""
        entry = self.components.get(component)
        if not entry:
            return self
        if entry.get("float"):
            return None
        base = load_recipe(entry["recipe"]) if "recipe" in entry else self
        recipe = with_overrides(base, entry.get("overrides", {}))
        return Recipe(f"{self.name}[{component}: {base.name}]" if base is not self else f"{self.name}[{component}]",
                      base.description, recipe.passes)


def pass_class(name: str) -> type[MqcPass]:
    try:
        module_name, class_name = PASS_MODULES[name].split(":")
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_MODULES))}") from None
    module = importlib.import_module(f"mqc.passes.{module_name}")
    return getattr(module, class_name)


def _parse(text: str, origin: str) -> Recipe:
    try:
        data = json.loads(text)
        recipe = Recipe(name=data["name"], description=data.get("description", ""), passes=list(data["passes"]),
                        components=dict(data.get("components", {})))
    except RecursionError:
        raise RecipeError(f"recipe {origin} is nested too deeply to be a recipe") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RecipeError(f"recipe {origin} does not parse: {exc}") from exc
    for component, entry in recipe.components.items():
        if not isinstance(entry, dict) or set(entry) - {"recipe", "overrides", "float"}:
            raise RecipeError(f"recipe {origin}: components.{component} takes 'recipe', 'overrides' or 'float', got {entry!r}")
        overrides = entry.get("overrides", {})
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise RecipeError(f"recipe {origin}: components.{component}.overrides maps pass names to parameter objects")
        unknown = [name for name in overrides if name not in PASS_MODULES]
        if unknown:
            raise RecipeError(f"recipe {origin}: components.{component}.overrides names unknown passes {unknown}")
    for step in recipe.passes:
        if not isinstance(step, dict) or "pass" not in step:
            raise RecipeError(f"recipe {origin}: every step needs a 'pass' name, got {step!r}")
        if step["pass"] not in PASS_MODULES:
            raise RecipeError(f"recipe {origin}: unknown pass {step['pass']!r}; known: {', '.join(sorted(PASS_MODULES))}")
    return recipe


def builtin_recipes() -> dict[str, Recipe]:
    folder = resources.files("mqc") / "recipes"
    recipes = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            recipe = _parse(entry.read_text(), entry.name)
            recipes[recipe.name] = recipe
    return recipes


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe JSON file by path."""
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe {path} is a directory (or not a regular file), not a recipe .json file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return _parse(text, str(path))
    raise RecipeError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin)} (or pass a .json file)")


def with_overrides(recipe: Recipe, overrides: dict[str, dict[str, Any]]) -> Recipe:
    """A copy of ``recipe`` with pass parameters replaced, e.g. ``{"quantize_linears": {"act_method": "mse"}}``."""
    steps = []
    for step in recipe.passes:
        step = dict(step)
        step.update(overrides.get(step["pass"], {}))
        steps.append(step)
    return Recipe(recipe.name, recipe.description, steps, dict(recipe.components))


#: ``--bits`` settings: (weight bits, activation bits) of the language side and of the vision tower.
BIT_SETTINGS: dict[str, dict[str, tuple[int, int]]] = {
    "w4a8": {"language": (4, 8), "vision": (4, 8)},
    "w8a8": {"language": (8, 8), "vision": (8, 8)},
    "w8a8-vision": {"language": (4, 8), "vision": (8, 8)},  # MQuant's "vision W8A8 / LLM W4A8"
}
_WEIGHT_PARAMS, _ACT_PARAMS = ("weight_bits", "w_bits"), ("act_bits", "a_bits")


def _bit_overrides(passes: list[dict[str, Any]], bits: tuple[int, int]) -> dict[str, dict[str, int]]:
    overrides: dict[str, dict[str, int]] = {}
    for step in passes:
        params = {k: bits[0] for k in _WEIGHT_PARAMS if k in step} | {k: bits[1] for k in _ACT_PARAMS if k in step}
        if params:
            overrides[step["pass"]] = params
    return overrides


def with_bits(recipe: Recipe, setting: str) -> Recipe:
    """``recipe`` at the bit widths of ``setting`` (``BIT_SETTINGS``), for every quantizing pass of every component.

    A component kept in float stays in float. For a single .onnx file the language setting applies.
    """
    if setting not in BIT_SETTINGS:
        raise RecipeError(f"unknown bit setting {setting!r}; choose one of {', '.join(BIT_SETTINGS)}")
    bits = BIT_SETTINGS[setting]
    language = with_overrides(recipe, _bit_overrides(recipe.passes, bits["language"]))
    components = {name: dict(entry) for name, entry in recipe.components.items()}
    vision = components.setdefault("vision", {})
    if not vision.get("float"):
        base = load_recipe(vision["recipe"]) if "recipe" in vision else recipe
        overrides = {name: dict(params) for name, params in vision.get("overrides", {}).items()}
        for name, params in _bit_overrides(base.passes, bits["vision"]).items():
            overrides.setdefault(name, {}).update(params)
        vision["overrides"] = overrides
    return Recipe(f"{recipe.name} --bits {setting}", recipe.description, language.passes, components)


#: Activation modes of the passes that offer one (``mas``, ``cmc``) and of ``--acts``.
ACT_MODES = ("dynamic", "static")


def with_acts(recipe: Recipe, mode: str) -> Recipe:
    """``recipe`` with activation mode ``mode`` in every pass that has one (MASQuant's ``mas`` and ``cmc``).

    The static recipes (w8a8, mquant, ...) have no such choice: asking one for a mode is an error, not a no-op.
    """
    if mode not in ACT_MODES:
        raise RecipeError(f"unknown activation mode {mode!r}; choose one of {', '.join(ACT_MODES)}")
    overrides = {step["pass"]: {"acts": mode} for step in recipe.passes if "acts" in step}
    if not overrides:
        raise RecipeError(f"recipe {recipe.name!r} has no activation mode to choose (its activation scales are "
                          f"static); --acts applies to recipes whose passes take an 'acts' parameter (masquant)")
    chosen = with_overrides(recipe, overrides)
    return Recipe(f"{recipe.name} --acts {mode}", recipe.description, chosen.passes, chosen.components)
