"""Fixtures shared by every test folder: tiny random-weight models exported once per test session (per worker)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family)``: the exported model folder of a tiny random ``family`` model, built on first use."""
    from mqc.models.testing import export_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = export_tiny(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_decoder(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """``tiny_decoder(family)``: the decoder.onnx of that tiny model."""
    return lambda family: tiny_model_dir(family) / "decoder.onnx"
