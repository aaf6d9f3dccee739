"""Recipes are data: a named, ordered list of passes with parameters, shipped as JSON or read from a user file.

A recipe is checked whole when it loads, before any model is read: every pass name, every parameter key, type and
range (:mod:`mqc.params`), the recipes it extends and its components. A problem is one :class:`RecipeError`
naming the recipe, the pass and the key. :data:`PASS_MODULES` says which module of ``mqc.passes`` defines a pass;
listing and checking recipes never imports a pass module (nor torch).

Recipes compose. ``"extends": "masquant"`` starts from another recipe (a built-in name or a .json path): its pass
list, description and components, unless given again; ``"append"`` adds steps after its passes; ``"overrides"``
(pass name -> parameters) then changes the parameters of every step of that pass::

    {"name": "masquant-static", "extends": "masquant",
     "overrides": {"mas": {"acts": "static"}, "cmc": {"acts": "static"}}}

The command line uses the same mechanism: ``--set pass.key=value``, the ``recipe:pass.key=value`` spec form,
``--bits`` and ``--acts`` are overrides (:func:`with_overrides`, :func:`with_assignments`, :func:`with_bits`,
:func:`with_acts`), checked like the JSON.

Per-component settings (a model folder compiles its ``vision`` and ``decoder`` graphs with one recipe): an optional
top-level ``"components"`` map gives a component its own recipe and/or pass-parameter overrides, e.g. MQuant's
"W8A8 vision / W4A8 LLM"::

    "components": {"vision": {"recipe": "vision-w8a8-rot", "overrides": {"gptq_weights": {"weight_bits": 8}}}}

``recipe`` (a built-in name or a .json path) replaces the pass list for that component; ``overrides`` then applies
to the component's passes; ``"float": true`` leaves the component unquantized (MASQuant quantizes only the language
model). A component that is not listed uses the recipe's own passes. :meth:`Recipe.for_component` resolves it;
``compile_package`` calls it per component.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqc.errors import RecipeError
from mqc.params import ACT_MODES, PASS_PARAMS, PassParams, parse_params

if TYPE_CHECKING:
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
    "sink_scales": "sink_scales:SinkScalesPass",
    "act_precision": "act_precision:ActPrecisionPass",
    "scale_tuning": "scale_tuning:ScaleTuningPass",
}
#: The shortest text-only calibration window a recipe may ask for, in tokens.
MIN_TEXT_WINDOW = 16
_COMPONENT_KEYS = {"recipe", "overrides", "float"}
_RECIPE_KEYS = {"name", "description", "extends", "passes", "append", "overrides", "components", "samples",
                "text_window"}


@dataclass
class Recipe:
    """A checked recipe: ``passes`` are the JSON steps (resolved), ``params`` their parsed parameters."""

    name: str
    description: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The calibration samples the recipe's settings were chosen with (``--samples`` overrides; None: the default).
    samples: int | None = None
    #: Tokens per text-only calibration sample of a packaged model's decoder (None: the package's default).
    text_window: int | None = None
    params: list[PassParams] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.passes = [dict(step) for step in _check_steps(self.passes, self.name)]
        self.params = [parse_params(PASS_PARAMS[step["pass"]], {k: v for k, v in step.items() if k != "pass"},
                                    f"recipe {self.name}, pass {step['pass']}") for step in self.passes]
        _check_components(self.components, self.name)
        self.components = {name: dict(entry) for name, entry in self.components.items()}
        for component in self.components:
            self.for_component(component)  # a component's recipe and overrides are checked with the recipe

    def instantiate(self) -> list[MqcPass]:
        return [pass_class(step["pass"])(params) for step, params in zip(self.passes, self.params, strict=True)]

    def for_component(self, component: str) -> Recipe | None:
        """The recipe a model folder's ``component`` compiles with, or None to keep it in float (module docstring)."""
        entry = self.components.get(component)
        if not entry:
            return self
        if entry.get("float"):
            return None
        base = load_recipe(entry["recipe"]) if "recipe" in entry else self
        name = f"{self.name}[{component}: {base.name}]" if base is not self else f"{self.name}[{component}]"
        overridden = with_overrides(Recipe(name, base.description, base.passes), entry.get("overrides", {}))
        return Recipe(name, base.description, overridden.passes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as JSON data (what ``mqc recipes NAME`` prints)."""
        data: dict[str, Any] = {"name": self.name, "description": self.description, "passes": self.passes}
        if self.components:
            data["components"] = self.components
        if self.samples is not None:
            data["samples"] = self.samples
        if self.text_window is not None:
            data["text_window"] = self.text_window
        return data


def pass_class(name: str) -> type[MqcPass]:
    try:
        module_name, class_name = PASS_MODULES[name].split(":")
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_MODULES))}") from None
    module = importlib.import_module(f"mqc.passes.{module_name}")
    return getattr(module, class_name)


def _check_steps(steps: Any, origin: str) -> list[dict[str, Any]]:
    if not isinstance(steps, list):
        raise RecipeError(f"recipe {origin}: 'passes' must be a list of steps, got {steps!r}")
    for step in steps:
        if not isinstance(step, dict) or "pass" not in step:
            raise RecipeError(f"recipe {origin}: every step needs a 'pass' name, got {step!r}")
        if not isinstance(step["pass"], str) or step["pass"] not in PASS_MODULES:
            raise RecipeError(f"recipe {origin}: unknown pass {step['pass']!r}; known: {', '.join(sorted(PASS_MODULES))}")
    return steps


def _check_components(components: Any, origin: str) -> None:
    if not isinstance(components, dict):
        raise RecipeError(f"recipe {origin}: 'components' maps component names to settings, got {components!r}")
    for component, entry in components.items():
        if not isinstance(entry, dict) or set(entry) - _COMPONENT_KEYS:
            raise RecipeError(f"recipe {origin}: components.{component} takes 'recipe', 'overrides' or 'float', "
                              f"got {entry!r}")
        overrides = entry.get("overrides", {})
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise RecipeError(f"recipe {origin}: components.{component}.overrides maps pass names to parameter objects")
        unknown = [name for name in overrides if name not in PASS_MODULES]
        if unknown:
            raise RecipeError(f"recipe {origin}: components.{component}.overrides names unknown passes {unknown}")
        if "float" in entry and not isinstance(entry["float"], bool):
            raise RecipeError(f"recipe {origin}: components.{component}.float must be true or false")


def _parse(text: str, origin: str, seen: tuple[str, ...] = ()) -> Recipe:
    try:
        data = json.loads(text)
    except RecursionError:
        raise RecipeError(f"recipe {origin} is nested too deeply to be a recipe") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"recipe {origin} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {origin}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"recipe {origin}: unknown key {unknown[0]!r} (a recipe has {', '.join(sorted(_RECIPE_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"recipe {origin}: 'name' must be a non-empty string")
    base = None
    if "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str):
            raise RecipeError(f"recipe {name}: 'extends' names one recipe, got {parent!r}")
        if parent in seen:
            raise RecipeError(f"recipe {name}: 'extends' loops: {' -> '.join([*seen, parent])}")
        base = _load(parent, seen)
    elif "passes" not in data:
        raise RecipeError(f"recipe {name}: needs 'passes' (or 'extends' another recipe)")
    passes = data["passes"] if base is None else data.get("passes", base.passes)
    if "append" in data:
        if base is None or "passes" in data:
            raise RecipeError(f"recipe {name}: 'append' adds steps after the passes of the recipe it extends "
                              "(use it with 'extends' and without 'passes')")
        passes = [*base.passes, *_check_steps(data["append"], name)]
    own_components = data.get("components", {})
    _check_components(own_components, name)
    components = {**(base.components if base is not None else {}), **own_components}
    description = data.get("description", base.description if base is not None else "")
    samples = data.get("samples", base.samples if base is not None else None)
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise RecipeError(f"recipe {name}: 'samples' is a whole number of calibration samples >= 1, got {samples!r}")
    text_window = data.get("text_window", base.text_window if base is not None else None)
    if text_window is not None and (not isinstance(text_window, int) or isinstance(text_window, bool)
                                    or text_window < MIN_TEXT_WINDOW):
        raise RecipeError(f"recipe {name}: 'text_window' is a whole number of tokens >= {MIN_TEXT_WINDOW}, "
                          f"got {text_window!r}")
    recipe = Recipe(name, description, _check_steps(passes, name), components, samples, text_window)
    overrides = data.get("overrides", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise RecipeError(f"recipe {name}: 'overrides' maps pass names to parameter objects, got {overrides!r}")
    return with_overrides(recipe, overrides) if overrides else recipe


def builtin_recipes() -> dict[str, Recipe]:
    return {name: _load(name) for name in _builtin_files()}


def _builtin_files() -> dict[str, Any]:
    folder = resources.files("mqc") / "recipes"
    return {entry.name[:-5]: entry for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".json")}


def _load(name_or_path: str, seen: tuple[str, ...] = ()) -> Recipe:
    files = _builtin_files()
    if name_or_path in files:
        return _parse(files[name_or_path].read_text(), f"{name_or_path}.json", (*seen, name_or_path))
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe {path} is a directory (or not a regular file), not a recipe .json file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return _parse(text, str(path), (*seen, name_or_path))
    raise RecipeError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(files)} (or pass a .json file)")


def load_recipe(spec: str) -> Recipe:
    """A built-in recipe by name or a recipe JSON file by path, optionally with ``:pass.key=value`` overrides."""
    name, *assignments = spec.split(":") if not Path(spec).is_file() else (spec,)
    recipe = _load(name)
    return with_assignments(recipe, assignments, name=spec) if assignments else recipe


def with_overrides(recipe: Recipe, overrides: dict[str, dict[str, Any]], name: str | None = None) -> Recipe:
    """A copy of ``recipe`` with pass parameters replaced, e.g. ``{"quantize_linears": {"act_method": "mse"}}``.

    Overriding a pass the recipe does not run is an error (a misspelt pass would otherwise change nothing).
    """
    absent = [p for p in overrides if p not in {step["pass"] for step in recipe.passes}]
    if absent:
        raise RecipeError(f"recipe {recipe.name}: overrides pass {absent[0]!r}, which the recipe does not run "
                          f"(its passes: {', '.join(step['pass'] for step in recipe.passes)})")
    steps = [{**step, **overrides.get(step["pass"], {})} for step in recipe.passes]
    return Recipe(name or recipe.name, recipe.description, steps, recipe.components, recipe.samples,
                  recipe.text_window)


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """``pass.key=value`` -> (pass, key, value); the value is JSON (``8``, ``true``, ``"x"``) or else a string."""
    target, sep, raw = text.partition("=")
    pass_name, dot, key = target.strip().partition(".")
    if not sep or not dot or not pass_name or not key:
        raise RecipeError(f"--set {text!r}: expected PASS.KEY=VALUE, e.g. hadamard_rotation.head_dim=64")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return pass_name, key, value


def with_assignments(recipe: Recipe, assignments: list[str], name: str | None = None) -> Recipe:
    """``recipe`` with ``pass.key=value`` overrides (``--set`` and the ``recipe:pass.key=value`` form).

    ``components.<component>.<key>=value`` sets a component entry, e.g. ``components.vision.float=true``.
    """
    overrides: dict[str, dict[str, Any]] = {}
    components = {c: dict(entry) for c, entry in recipe.components.items()}
    for text in assignments:
        pass_name, key, value = parse_assignment(text)
        if pass_name == "components":
            component, _, entry_key = key.partition(".")
            components.setdefault(component, {})[entry_key] = value
            continue
        if pass_name not in PASS_MODULES:
            raise RecipeError(f"--set {text!r}: unknown pass {pass_name!r}; known: {', '.join(sorted(PASS_MODULES))}")
        overrides.setdefault(pass_name, {})[key] = value
    changed = Recipe(recipe.name, recipe.description, recipe.passes, components, recipe.samples, recipe.text_window)
    return with_overrides(changed, overrides, name=name or f"{recipe.name} --set {' '.join(assignments)}")


#: ``--bits`` settings: (weight bits, activation bits) of the language side and of the vision tower.
BIT_SETTINGS: dict[str, dict[str, tuple[int, int]]] = {
    "w4a8": {"language": (4, 8), "vision": (4, 8)},
    "w8a8": {"language": (8, 8), "vision": (8, 8)},
    "w8a8-vision": {"language": (4, 8), "vision": (8, 8)},  # MQuant's "vision W8A8 / LLM W4A8"
}


def _taking(passes: list[dict[str, Any]], key: str) -> list[str]:
    """The passes of ``passes`` whose parameters include ``key``."""
    names = [step["pass"] for step in passes if key in PASS_PARAMS[step["pass"]].__dataclass_fields__]
    return list(dict.fromkeys(names))


def _default(pass_name: str, key: str) -> Any:
    """The default of parameter ``key`` of ``pass_name`` (None when it has no such parameter)."""
    param = PASS_PARAMS[pass_name].__dataclass_fields__.get(key)
    return None if param is None else param.default


def _bit_overrides(passes: list[dict[str, Any]], bits: tuple[int, int]) -> dict[str, dict[str, int]]:
    overrides: dict[str, dict[str, int]] = {}
    for name in _taking(passes, "weight_bits"):
        overrides.setdefault(name, {})["weight_bits"] = bits[0]
    for name in _taking(passes, "act_bits"):
        overrides.setdefault(name, {})["act_bits"] = bits[1]
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
    return Recipe(f"{recipe.name} --bits {setting}", recipe.description, language.passes, components, recipe.samples,
                  recipe.text_window)


def with_acts(recipe: Recipe, mode: str) -> Recipe:
    """``recipe`` with activation mode ``mode`` in every pass that chooses one: MASQuant's ``mas`` and ``cmc``, and a
    linear quantizer whose step sets ``acts`` (MASQuant's plain linears after cmc).

    The static recipes (w8a8, mquant, ...) have no such choice: asking one for a mode is an error, not a no-op.
    """
    if mode not in ACT_MODES:
        raise RecipeError(f"unknown activation mode {mode!r}; choose one of {', '.join(ACT_MODES)}")
    choosing = [step["pass"] for step in recipe.passes if "acts" in step or _default(step["pass"], "acts") == "dynamic"]
    overrides = {name: {"acts": mode} for name in dict.fromkeys(choosing)}
    if not overrides:
        raise RecipeError(f"recipe {recipe.name!r} has no activation mode to choose (its activation scales are "
                          f"static); --acts applies to recipes whose passes take an 'acts' parameter (masquant)")
    return with_overrides(recipe, overrides, name=f"{recipe.name} --acts {mode}")
