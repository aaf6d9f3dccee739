"""Core tests use the tiny llama and qwen2 decoders from the shared export cache in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir: Callable[[str], Path]) -> dict[str, Path]:
    return {family: tiny_model_dir(family) for family in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def llama_decoder(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama") / "decoder.onnx"
