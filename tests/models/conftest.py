"""Shared fixtures: tiny exported models are built once per test session and family."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(family) -> Path``: the exported tiny random model of that family (cached per session)."""
    from mqc.models.testing import export_tiny

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = export_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return cache[family]

    return get
