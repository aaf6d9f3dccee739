"""mqc: a compiler that statically quantizes multimodal LLM ONNX graphs for onnxruntime (MQuant, MASQuant)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mqc import compiler
from mqc.session import open_session

__all__ = ["compile", "open_session"]


def compile(source: str | Path, output: str | Path, recipe: Any = "w8a8", **options: Any) -> Any:
    """Compile a model file, a model directory or a packaged model name (:func:`mqc.compiler.compile`).

    Model folders and packaged names need :mod:`mqc.models`, imported here when it is installed.
    """
    with contextlib.suppress(ImportError):
        import mqc.models  # noqa: F401  (registers its package hooks with core)
    return compiler.compile(source, output, recipe, **options)
