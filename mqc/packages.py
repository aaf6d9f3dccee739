"""Model folders (``manifest.json`` plus component graphs), read as untrusted input, and the hooks through which
``mqc.models`` lends core what it cannot know: packaged model names and each component's calibration feeds.

Core never imports ``mqc.models``; importing ``mqc.models`` registers its :class:`PackageHooks` here (the CLI and
:func:`mqc.compile` import it when it is installed).

Every path a manifest names must be a relative path inside the folder, and the folder must hold no symlinks, no
hard-linked files and nothing but regular files and folders: a compiled folder copies everything it holds.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mqc.errors import InputModelError

MANIFEST = "manifest.json"
#: Largest manifest mqc reads (a real one is a few kB).
MAX_MANIFEST_BYTES = 1 << 20

#: ``(folder, component, samples, **options)``; options a package may honour: ``text_window`` (tokens per
#: text-only decoder sample).
FeedBuilder = Callable[..., Iterable[dict[str, np.ndarray]]]


@dataclass
class LabelledFeed:
    """One feed, what it is, and per token position what the token is (text piece and id, or image patch); empty
    for the vision tower, whose rows are its own patch tokens."""

    feed: dict[str, np.ndarray]
    sample: str
    tokens: list[str]


@dataclass(frozen=True)
class PackageHooks:
    """``resolve(name) -> model folder``, ``calibration_feeds(folder, component, samples) -> feeds`` and
    ``validation_feeds(folder, component, samples, offset=0) -> [LabelledFeed]``: samples calibration never draws
    (the quality gate's and ``mqc diagnose``'s); a package without them gates on calibration samples."""

    resolve: Callable[[str], Path]
    calibration_feeds: FeedBuilder
    validation_feeds: Callable[..., list[LabelledFeed]] | None = None


_hooks: PackageHooks | None = None


def register_package_hooks(hooks: PackageHooks) -> None:
    global _hooks
    _hooks = hooks


def package_hooks() -> PackageHooks:
    if _hooks is None:
        raise InputModelError("model folders and packaged names need the mqc.models package (import mqc.models)")
    return _hooks


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(model_dir: Path) -> dict:
    """The folder's manifest as a dict, with one clear error for every way it can be unreadable."""
    path = model_dir / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise InputModelError(f"{model_dir}: {MANIFEST} is missing or not a regular file")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InputModelError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputModelError(f"{path} is not valid UTF-8 JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("components", {}), dict):
        raise InputModelError(f"{path}: expected an object with a 'components' object")
    return data


def component_paths(model_dir: Path, manifest: dict) -> dict[str, Path]:
    """Each component's file, checked to be a plain relative path to a regular file inside ``model_dir``."""
    base = Path(os.path.realpath(model_dir))
    paths = {}
    for component, name in manifest.get("components", {}).items():
        if not isinstance(name, str) or not name:
            raise InputModelError(f"{model_dir}/{MANIFEST}: component {component!r} must name a file, got {name!r}")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if os.path.isabs(name) or name.startswith("\\") or ".." in parts or "\x00" in name:
            raise InputModelError(f"{model_dir}/{MANIFEST}: component {component!r} path {name!r} leaves the folder")
        path = model_dir / name
        if path.is_symlink() or os.path.realpath(path) != str(base / name):
            raise InputModelError(f"{model_dir}/{MANIFEST}: component {component!r} ({name}) is a link; mqc reads "
                                  "only files inside the folder")
        if not path.is_file():
            raise InputModelError(f"{model_dir}/{MANIFEST}: component {component!r} file {name!r} not found")
        paths[str(component)] = path
    return paths


def folder_entries(model_dir: Path) -> list[Path]:
    """Every file and folder under ``model_dir`` (relative), refusing links and special files: all get copied."""
    entries = []
    for root, dirs, files in os.walk(model_dir):
        for name in [*dirs, *files]:
            path = Path(root) / name
            info = path.lstat()
            relative = path.relative_to(model_dir)
            if stat.S_ISLNK(info.st_mode):
                raise InputModelError(f"{model_dir} holds a symlink ({relative}); mqc copies model folders only "
                                      "without links")
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                raise InputModelError(f"{model_dir} holds {relative}, which is not a regular file or folder")
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                raise InputModelError(f"{model_dir} holds {relative} with {info.st_nlink} hard links; mqc refuses "
                                      "hard-linked files (copy the file to break the link)")
            entries.append(relative)
    return entries
