"""Writing outputs so that a crash, a kill or a full disk never leaves a broken or half-replaced result.

A compiled ``q.onnx`` references its weights in ``q.onnx.<digest>.data``, named by the first 16 hex digits of the
data's SHA-256. A new output is staged in a private folder beside the target; its data file is renamed to its
content name (a file no existing ``q.onnx`` references, unless the content is identical), and then the ``.onnx`` is
renamed over the old one: the single step that switches outputs. Data files only the previous output referenced
are removed afterwards. Until that rename, ``q.onnx`` still loads with its old data; after it, with the new.

A folder output is assembled in a staging folder and exchanged with the old folder in one ``renameat2`` call
(``RENAME_EXCHANGE``) where the kernel and file system offer it, else by two renames whose gap the next run
repairs (it puts the retired folder back when no output is in place).

Leftovers of killed runs (staging folders of processes that no longer run, data files no output references, the
retired copy of an exchanged folder) are removed by the next run that writes the same output.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx

from mqc.errors import OutputPathError

_STAGING_TAG = ".mqc-staging-"
_RETIRED_TAG = ".mqc-retired-"
_STAGED_DATA = "staged.data"
_DIGEST_CHARS = 16


def check_output_path(path: Path, protected: Iterable[Path] = ()) -> None:
    """Refuse outputs that cannot be written safely: a folder, a device, a FIFO, or any file the input reads."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"output folder does not exist (or is not a folder): {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder is not writable: {parent}")
    if os.path.lexists(path):
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            raise OutputPathError(f"output path is a directory: {path}")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            raise OutputPathError(f"output path {path} is a device, FIFO or socket; mqc writes only regular files")
    for source in protected:
        if _same_file(path, source):
            raise OutputPathError(f"refusing to overwrite the input: {path} is a file the input model reads ({source}); "
                                  "choose another -o path")


def write_text_atomically(path: Path, text: str) -> None:
    """Write a small text output (a JSON report, an SVG chart) beside its target, then rename it into place."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staged.write_text(text)
        staged.replace(path)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _same_file(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_dir(parent: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}{_STAGING_TAG}{os.getpid()}-"))


def remove_dead_staging(parent: Path, name: str) -> None:
    """Remove staging and retired folders for output ``name`` left by processes that no longer run."""
    pattern = re.compile(rf"^\.{re.escape(name)}(?:{re.escape(_STAGING_TAG)}|{re.escape(_RETIRED_TAG)})(\d+)-")
    legacy = parent / f".{name}.old"  # the retired folder of mqc versions before the exchange swap
    if legacy.is_dir() and not legacy.is_symlink():
        shutil.rmtree(legacy, ignore_errors=True)
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif match and not _pid_alive(int(match.group(1))) and entry.is_file():
            entry.unlink(missing_ok=True)


def _data_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(name)}(?:\.[0-9a-f]{{{_DIGEST_CHARS}}})?\.data$")


def referenced_data(onnx_path: Path) -> set[str]:
    """External data file names an existing output references (empty when it is missing or unreadable)."""
    from mqc.model_checks import tensor_protos

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for _, tensor in tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return names


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _relocate(onnx_path: Path, old: str, new: str) -> None:
    """Point the staged model's external references from ``old`` to ``new`` (the graph proto only; no weights)."""
    from mqc.model_checks import tensor_protos

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for _, tensor in tensor_protos(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, str(onnx_path))


def _describe(exc: OSError, folder: Path | None = None) -> str:
    """The reason in words. A short write (a full disk reported without errno) also says how much space is free."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    reason = exc.strerror or str(exc)
    if exc.errno is None and folder is not None:
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(folder).free // 1024} kB free in {folder}"
    return reason


class AtomicModelWriter:
    """Writes one ``.onnx`` (plus its content-named data file) over ``path`` with a single switching rename."""

    def __init__(self, path: Path, protected: Iterable[Path] = ()) -> None:
        self.path = Path(os.path.abspath(path))
        self.protected = [Path(os.path.abspath(p)) for p in protected]

    def write(self, save: Callable[[Path, str], None]) -> Path:
        """``save(onnx_path, data_name)`` writes the model; everything else (naming, renames, cleanup) is here."""
        path, parent = self.path, self.path.parent
        check_output_path(path, self.protected)
        remove_dead_staging(parent, path.name)
        previous = referenced_data(path)
        staging = _staging_dir(parent, path.name)
        placed: Path | None = None
        data_name = None
        try:
            staged_model = staging / path.name
            save(staged_model, _STAGED_DATA)
            staged_data = staging / _STAGED_DATA
            if staged_data.exists() and staged_data.stat().st_size > 0:
                data_name = f"{path.name}.{_sha256(staged_data)[:_DIGEST_CHARS]}.data"
                _relocate(staged_model, _STAGED_DATA, data_name)
                target = parent / data_name
                self._check_data_target(target)
                _fsync(staged_data)
                if not os.path.lexists(target):
                    placed = target
                os.replace(staged_data, target)
            _fsync(staged_model)
            os.replace(staged_model, path)
            placed = None
            _fsync(parent)  # the renames themselves survive a power loss
        except OSError as exc:
            raise OutputPathError(f"cannot write {path}: {_describe(exc, parent)}") from exc
        finally:
            if placed is not None:
                placed.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        self._remove_unreferenced(previous, data_name)
        return path

    def _check_data_target(self, target: Path) -> None:
        if os.path.lexists(target) and not stat.S_ISREG(target.lstat().st_mode):
            raise OutputPathError(f"cannot write {target}: it exists and is not a regular file")
        if any(_same_file(target, p) for p in self.protected):
            raise OutputPathError(f"cannot write {target}: the input model reads that file")

    def _remove_unreferenced(self, previous: set[str], current: str | None) -> None:
        """Data files of this output's naming scheme that the new output does not reference (old ones, orphans)."""
        pattern = _data_pattern(self.path.name)
        for entry in self.path.parent.iterdir():
            if entry.name == current or not pattern.match(entry.name) or not entry.is_file() or entry.is_symlink():
                continue
            if any(_same_file(entry, p) for p in self.protected):
                continue
            if entry.name in previous or entry.name != f"{self.path.name}.data":
                entry.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the call is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


class FolderStaging:
    """A staging folder beside ``output`` that replaces it in one step on :meth:`commit`, or vanishes on failure."""

    def __init__(self, output: Path) -> None:
        self.output = Path(os.path.abspath(output))
        self._restore_retired()
        remove_dead_staging(self.output.parent, self.output.name)
        self.path = _staging_dir(self.output.parent, self.output.name)
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would become the output folder's mode

    def _restore_retired(self) -> None:
        """A run killed between two fallback renames left the old folder retired and none in place: put it back."""
        if os.path.lexists(self.output):
            return
        retired = sorted(self.output.parent.glob(f".{self.output.name}{_RETIRED_TAG}*"))
        if retired:
            os.replace(retired[-1], self.output)

    def commit(self) -> None:
        try:
            if not os.path.lexists(self.output):
                os.replace(self.path, self.output)
            elif _exchange(self.path, self.output):
                shutil.rmtree(self.path, ignore_errors=True)  # now holds the previous output
            else:
                retired = self.output.with_name(f".{self.output.name}{_RETIRED_TAG}{os.getpid()}-0")
                os.replace(self.output, retired)
                os.replace(self.path, self.output)
                shutil.rmtree(retired, ignore_errors=True)
        except OSError as exc:
            raise OutputPathError(f"cannot write {self.output}: {_describe(exc, self.output.parent)}") from exc

    def discard(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
