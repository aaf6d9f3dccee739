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


class InternalError(Exception):
    """mqc's own fault, never the user's input (a pass broke its postcondition): exit code 1 with the message."""

    exit_code = 1


class VerificationError(MqcError):
    """A function-preserving pass changed what the model computes (--verify)."""


class ClusterError(MqcError):
    """The Ray cluster (--ray) cannot be used: Ray missing, unreachable, or workers with other library versions."""


#: Characters a terminal acts on: C0/C1 controls and the bidirectional overrides that reorder what is shown.
_UNSAFE = {*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def printable(text: object) -> str:
    """``text`` on one line with every terminal control character shown as an escape (``\\x1b``), for messages that
    quote a file's contents (layer names, metadata, paths)."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x100 and ord(c) in _UNSAFE
                   else f"\\u{ord(c):04x}" if ord(c) in _UNSAFE else c for c in str(text))
