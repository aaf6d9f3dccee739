"""Where exported models and cached features live: ``$MQC_CACHE`` or ``~/.cache/mqc``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("MQC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mqc"


def cache_dir(name: str) -> Path:
    return cache_root() / name
