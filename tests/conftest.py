"""Fixtures shared by every test folder: tiny random-weight models, exported once and shared by all workers.

Exports (a few seconds of torch.onnx each) go to an on-disk cache under pytest's cache folder, keyed by a digest
of the code that produces them and the library versions, so the xdist workers of one run and the runs after it
share them; a file lock makes each export happen once. ``make clean`` or ``pytest --cache-clear`` drops them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One compute thread per test process (set before torch or numpy load their thread pools). `make test` runs two
# xdist workers on two cores: with torch's default of one OpenMP thread per core, four threads spin-wait for two
# cores, and MAS learning ran 7x slower (32 s instead of 5 s of CPU for one masquant compile of the tiny llama).
# onnxruntime's pools likewise (mqc.session reads MQC_ORT_THREADS).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MQC_ORT_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
#: What an export depends on besides the library versions: the exporter and the test builders.
EXPORT_SOURCES = ("mqc", "models", "tests/conftest.py", "tests/passes/vision_models.py", "requirements-optimum.txt")
EXPORT_LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "tokenizers")


def export_digest() -> str:
    """A digest of the exporting code and libraries: a change to either makes every cached export stale."""
    digest = hashlib.sha256(sys.version.encode())
    for lib in EXPORT_LIBRARIES:
        digest.update(f"{lib}=={metadata.version(lib)}".encode())
    for source in EXPORT_SOURCES:
        path = ROOT / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _file_digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ExportCache:
    """Named exports in ``root``, each built once by whichever process asks first and checked on every first use.

    An export is built in a staging folder and renamed into place; ``NAME.json`` beside it keeps its file digests,
    and a folder whose files no longer match them (a test wrote into a shared export) is rebuilt, not handed out.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._checked: dict[str, Path] = {}

    def get(self, name: str, build: Callable[[Path], Path]) -> Path:
        """``build(folder)`` exports into ``folder`` and returns the path to hand out (the folder or a file in it)."""
        if name not in self._checked:
            with _locked(self.root / f"{name}.lock"):
                self._checked[name] = self._valid(name) or self._build(name, build)
        return self._checked[name]

    def _valid(self, name: str) -> Path | None:
        record = self.root / f"{name}.json"
        folder = self.root / name
        if not (record.is_file() and folder.is_dir()):
            return None
        saved = json.loads(record.read_text())
        return folder / saved["result"] if saved["files"] == _file_digests(folder) else None

    def _build(self, name: str, build: Callable[[Path], Path]) -> Path:
        folder, staging = self.root / name, self.root / f".{name}.staging"
        for stale in (folder, staging):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
        result = build(staging).relative_to(staging)
        (self.root / f"{name}.json").write_text(json.dumps({"result": str(result), "files": _file_digests(staging)}))
        staging.rename(folder)
        return folder / result


@pytest.fixture(scope="session")
def export_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    """The run's export cache; older digests' folders are removed when a new one is started. Without pytest's
    cache (``-p no:cacheprovider``) each process exports into its own temporary folder."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return ExportCache(tmp_path_factory.mktemp("mqc-exports"))
    base = cache.mkdir("mqc-exports")
    digest = export_digest()
    with _locked(base / "digest.lock"):
        for old in base.iterdir():
            if old.is_dir() and old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
        return ExportCache(base / digest)


@pytest.fixture(scope="session")
def tiny_model_dir(export_cache: ExportCache) -> Callable[[str], Path]:
    """``tiny_model_dir(family)``: the exported model folder of a tiny random ``family`` model (read-only)."""
    from mqc.models.testing import export_tiny

    return lambda family: export_cache.get(f"tiny-{family}", lambda folder: export_tiny(family, folder))


@pytest.fixture(scope="session")
def tiny_decoder(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """``tiny_decoder(family)``: the decoder.onnx of that tiny model."""
    return lambda family: tiny_model_dir(family) / "decoder.onnx"
