"""Tiny random-weight decoders exported with the project's own exporter (torch dynamo), shared by core tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mqc.models.testing import export_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {family: export_tiny(family, root / family) for family in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def llama_decoder(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"] / "decoder.onnx"


@pytest.fixture(scope="session")
def qwen2_decoder(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["qwen2"] / "decoder.onnx"
