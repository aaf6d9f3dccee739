"""User-facing errors: one clear message and exit code 2, no traceback unless --debug."""

from __future__ import annotations


class MqcError(Exception):
    """A problem with the user's input that mqc reports in one sentence."""

    exit_code = 2


class InputModelError(MqcError):
    """The model file is missing, unreadable, not ONNX, or unsupported."""


class CalibrationError(MqcError):
    """Calibration data is missing or does not match the model's inputs."""


class RecipeError(MqcError):
    """Unknown recipe, or a recipe file that does not parse."""


class OutputPathError(MqcError):
    """The output cannot be written where the user asked."""


class NothingToQuantizeError(MqcError):
    """The model has no linear layer with a constant weight."""


class RecipeNotApplied(MqcError):
    """A pass of the recipe could not do its essential work on this model (``--allow-partial`` compiles anyway)."""


class VerificationError(MqcError):
    """A function-preserving pass changed what the model computes (--verify)."""
