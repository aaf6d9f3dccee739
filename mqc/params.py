"""Typed, frozen parameters of every pass: the recipe schema, checked when a recipe loads, before any model work.

Each pass's parameters are one frozen dataclass here, keyed by the pass name in :data:`PASS_PARAMS`. A field's
type says what a recipe may write (``int`` refuses ``true`` and ``8.0``, ``float`` refuses ``NaN``, a ``Literal``
lists its choices) and its metadata the allowed range (:func:`bounded`, :func:`choices`). :func:`parse_params`
turns a recipe step's JSON object into the dataclass or raises one :class:`~mqc.errors.RecipeError` naming the
recipe, the pass and the key. This module imports nothing heavy, so listing and validating recipes stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from mqc.errors import RecipeError

#: Activation modes of the passes that offer one (``mas``, ``cmc``) and of ``--acts``.
ACT_MODES = ("dynamic", "static")
#: Bit widths the weight quantizers emit (ONNX int4 and int8 tensors) and activations use (int8).
WEIGHT_BITS = (4, 8)
ACT_BITS = (8,)
#: Activation modes of ``mas``/``cmc``; how static activation scales are computed; how static scales are shared.
ActMode = Literal["dynamic", "static"]
ActMethod = Literal["minmax", "percentile", "mse"]
ActScales = Literal["shared", "per_modality"]
WeightMethod = Literal["rtn", "gptq"]
#: Where GPTQ's Hessians come from: the float graph, or layer by layer behind the already quantized layers.
HessianSource = Literal["sequential", "float"]
#: Where a linear quantizer's statistics come from: its own calibration of the current graph, or the one ``cmc``
#: took of the graph before it lowered the MAS linears (MASQuant's one calibration for every linear).
StatisticsSource = Literal["calibrate", "before_cmc"]


def bounded(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> dict[str, Any]:
    """Field metadata: the value lies in [low, high] (``low_open``: strictly above ``low``)."""
    return {"low": low, "high": high, "low_open": low_open}


def choices(*allowed: Any) -> dict[str, Any]:
    """Field metadata: the value is one of ``allowed`` (for numbers whose valid set is not a range)."""
    return {"choices": allowed}


def _weight_bits(default: int) -> Any:
    return field(default=default, metadata=choices(*WEIGHT_BITS))


def _act_bits() -> Any:
    return field(default=8, metadata=choices(*ACT_BITS))


def _skip_roles() -> Any:
    return field(default=("lm_head",))


@dataclass(frozen=True)
class PassParams:
    """Base of every pass's parameters (a pass without parameters uses it as is)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class UpgradeOpsetParams(PassParams):
    target: int = field(default=23, metadata=bounded(13, 23))


@dataclass(frozen=True)
class LinearQuantParams(PassParams):
    """What every linear quantizer shares (quantize_linears, gptq_weights): the weight rounding, the activation
    quantizer (``acts`` static or dynamic; static scales shared or ``per_modality``), which linears (``skip_roles``,
    ``components``: all when None) and where the statistics come from (``statistics``)."""

    weight_bits: int = _weight_bits(8)
    act_bits: int = _act_bits()
    act_method: ActMethod = "minmax"
    act_percentile: float = field(default=99.99, metadata=bounded(50.0, 100.0))
    weight_mse_clip: bool = False
    group_size: int | None = field(default=None, metadata=bounded(1))
    skip_roles: tuple[str, ...] = _skip_roles()
    act_scales: ActScales = "shared"
    acts: ActMode = "static"
    components: tuple[str, ...] | None = None
    statistics: StatisticsSource = "calibrate"
    #: Roles whose weights are rounded to int8 instead of ``weight_bits`` (a mixed-precision weight budget).
    int8_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeLinearsParams(LinearQuantParams):
    pass


@dataclass(frozen=True)
class GptqWeightsParams(LinearQuantParams):
    weight_bits: int = _weight_bits(4)
    weight_mse_clip: bool = True
    act_order: bool = True
    percdamp: float = field(default=0.01, metadata=bounded(0.0, 1.0))
    block_size: int = field(default=128, metadata=bounded(1))
    #: At most this many decoder layers per Hessian run (None: as many as the context's Gram budget holds).
    layers_per_group: int | None = field(default=None, metadata=bounded(1))
    hessians: HessianSource = "float"
    #: ``static``: group scales searched on the original weight before the row loop (act-order compatible);
    #: ``dynamic``: each group's searched when GPTQ reaches it, on its error-updated rows (needs act_order off).
    group_scales: Literal["static", "dynamic"] = "static"
    #: Rank of a float branch x·L1·L2 added to each GPTQ linear that compensates its weight's rounding error
    #: (whitened SVD of W − Ŵ against the linear's Hessian; 0: none).
    error_rank: int = field(default=0, metadata=bounded(0))
    #: Rounds of refitting the scales to GPTQ's integer codes by least squares against the Hessian, each after a
    #: GPTQ run with the scales the last round fitted (0: GPTQ's scales as searched up front).
    scale_refit: int = field(default=0, metadata=bounded(0))

    def __post_init__(self) -> None:
        if self.group_scales == "dynamic" and (self.act_order or self.group_size is None
                                               or self.block_size % self.group_size):
            raise RecipeError("pass gptq_weights, key 'group_scales': 'dynamic' needs act_order false and a "
                              "group_size that divides block_size")


@dataclass(frozen=True)
class RotateResidualParams(PassParams):
    seed: int = field(default=0, metadata=bounded(0))
    entry: str = "inputs_embeds"
    online_down: bool = True
    rotate_vo: bool = False
    head_dim: int | None = field(default=None, metadata=bounded(1))
    num_kv_heads: int | None = field(default=None, metadata=bounded(1))
    tower: Literal["auto", "decoder", "vision"] = "auto"


@dataclass(frozen=True)
class SmoothQuantParams(PassParams):
    alpha: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    skip_roles: tuple[str, ...] = _skip_roles()


@dataclass(frozen=True)
class MasParams(PassParams):
    weight_bits: int = _weight_bits(4)
    act_bits: int = _act_bits()
    acts: ActMode = "dynamic"
    init: Literal["per_modality", "unified"] = "per_modality"
    alpha: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    learn: bool = True
    learning: Literal["block", "linear"] = "block"
    epochs: int = field(default=2, metadata=bounded(0))
    lr: float = field(default=5e-2, metadata=bounded(0.0, low_open=True))
    steps_per_epoch: int | None = field(default=None, metadata=bounded(1))
    batch_rows: int = field(default=256, metadata=bounded(1))
    rows: int = field(default=512, metadata=bounded(1))
    image_weight: float = field(default=1.0, metadata=bounded(0.0))
    smooth_down: bool = False
    scale_floor: float = field(default=1e-2, metadata=bounded(0.0, low_open=True))
    torch_threads: int | None = field(default=None, metadata=bounded(1))
    device: str = "cpu"
    seed: int = field(default=0, metadata=bounded(0))
    skip_roles: tuple[str, ...] = _skip_roles()


@dataclass(frozen=True)
class CmcParams(PassParams):
    weight_bits: int = _weight_bits(4)
    act_bits: int = _act_bits()
    acts: ActMode = "dynamic"
    compensation: Literal["cmc", "per_modality_weights", "none"] = "cmc"
    rank_ratio: float = field(default=0.05, metadata=bounded(0.0, 1.0, low_open=True))
    min_rank: int = field(default=32, metadata=bounded(0))
    whiten: bool = True
    damp: float = field(default=0.0, metadata=bounded(0.0))
    quant_cmc: bool = False
    weights: WeightMethod = "rtn"
    group_size: int | None = field(default=None, metadata=bounded(1))
    rows: int = field(default=256, metadata=bounded(1))
    skip_roles: tuple[str, ...] = _skip_roles()


@dataclass(frozen=True)
class AifsParams(PassParams):
    logits: str = "logits"
    cache_prefix: str = "present."


@dataclass(frozen=True)
class RmsSplitParams(PassParams):
    ratio: float = field(default=4.0, metadata=bounded(0.0))  # 0 flags every linear (heuristic criteria)
    criterion: Literal["paper", "either", "weight", "activation"] = "paper"
    side_branch: Literal["float", "w8"] = "float"
    roles: tuple[str, ...] = ("down", "fc2")
    require_online_hadamard: bool = True


@dataclass(frozen=True)
class SinkScalesParams(PassParams):
    positions: tuple[int, ...] = (0,)
    #: How each class's scale is set from its rows: their max |x| (the default); the clip minimising the squared
    #: rounding-plus-clipping error of the rows' |x| histogram (``mse``) or a percentile of it; or ``trimmed``: the
    #: max |x| of the rows left after dropping the outlier rows (a row max above ``outlier_ratio`` x the class's
    #: median row max: massive-activation tokens away from the sink positions, which are then clipped).
    method: Literal["minmax", "percentile", "mse", "trimmed"] = "minmax"
    percentile: float = field(default=99.99, metadata=bounded(50.0, 100.0))
    outlier_ratio: float = field(default=8.0, metadata=bounded(1.0))
    #: ``output``: each text/image clip from ``method`` is then scaled by the ratio in ``CLIP_SEARCH_RATIOS`` that
    #: gives the least squared error of the readers' outputs, ‖(fq(X) - X) W‖², on up to ``search_rows`` sampled
    #: rows of the class (issue 14 point 5); ``none`` keeps the method's clip.
    clip_search: Literal["none", "output"] = "none"
    search_rows: int = field(default=512, metadata=bounded(16))

    def __post_init__(self) -> None:
        if not self.positions or any(p < 0 for p in self.positions):
            raise RecipeError(f"pass sink_scales, key 'positions': one or more non-negative token positions, "
                              f"got {list(self.positions)}")


@dataclass(frozen=True)
class ActPrecisionParams(PassParams):
    points: int = field(default=8, metadata=bounded(0))


@dataclass(frozen=True)
class ScaleTuningParams(PassParams):
    #: Passes over the calibration samples, one sample per Adam step.
    epochs: int = field(default=2, metadata=bounded(1))
    #: Adam's step size on θ, the log of each scale's multiplier (1e-3 first raised the packaged decoder's
    #: calibration KL from 0.068 to 0.21 in one epoch: Adam's first steps move every scale by about lr).
    lr: float = field(default=1e-4, metadata=bounded(0.0, 1.0, low_open=True))
    #: One trained multiplier per scale element (``scale``: every group of every channel), or per output channel
    #: (``channel``: shared by the channel's groups; fewer parameters for the same calibration tokens).
    granularity: Literal["scale", "channel"] = "scale"
    seed: int = 0
    #: The largest KL of the torch replay's logits from onnxruntime's on the unchanged graph (rule 2).
    replay_tolerance: float = field(default=0.05, metadata=bounded(0.0, low_open=True))


@dataclass(frozen=True)
class LowerRuntimeOpsParams(PassParams):
    fuse_norms: bool = False


#: pass name -> its parameter class (passes without parameters take :class:`PassParams`).
PASS_PARAMS: dict[str, type[PassParams]] = {
    "upgrade_opset": UpgradeOpsetParams,
    "fuse_norms": PassParams,
    "quantize_linears": QuantizeLinearsParams,
    "norm_folding": PassParams,
    "ln_to_rmsnorm": PassParams,
    "hadamard_rotation": RotateResidualParams,
    "gptq_weights": GptqWeightsParams,
    "smoothquant": SmoothQuantParams,
    "mas": MasParams,
    "cmc": CmcParams,
    "aifs": AifsParams,
    "rms_split": RmsSplitParams,
    "sink_scales": SinkScalesParams,
    "act_precision": ActPrecisionParams,
    "scale_tuning": ScaleTuningParams,
    "lower_runtime_ops": LowerRuntimeOpsParams,
}


def parse_params(cls: type[PassParams], raw: dict[str, Any], where: str) -> PassParams:
    """``raw`` (a recipe step without its ``pass`` key) as ``cls``; ``where`` ("recipe X, pass Y") prefixes errors."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: parameters must be an object, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (its parameters: {known})")
    hints = typing.get_type_hints(cls)
    values = {name: _check(f"{where}, key {name!r}", hints[name], fields[name].metadata, value)
              for name, value in raw.items()}
    return cls(**values)


def _check(where: str, hint: Any, metadata: Any, value: Any) -> Any:
    value = _typed(where, hint, value)
    if value is None:
        return value
    if "choices" in metadata and value not in metadata["choices"]:
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, metadata['choices']))}")
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and (value <= low if metadata.get("low_open") else value < low):
        raise RecipeError(f"{where}: {value!r} is out of range (must be {'>' if metadata.get('low_open') else '>='} {low})")
    if high is not None and value > high:
        raise RecipeError(f"{where}: {value!r} is out of range (must be <= {high})")
    return value


def _typed(where: str, hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(where, inner, value)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        item = args[0]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise RecipeError(f"{where}: expected a list of {'strings' if item is str else 'integers'}, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported parameter type {hint!r}")  # a bug in this module, not in the recipe
