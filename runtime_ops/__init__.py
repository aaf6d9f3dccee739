"""Custom onnxruntime operator library of the ``ai.mqc`` domain (CPU and CUDA), and its loader.

The native libraries are built by the package's own build (``setup.py`` runs CMake on ``runtime_ops/``) when mqc is
installed, ``pip install -e .`` included:

* ``libmqc_ops_cpu.so``: CPU kernels of every op (always built).
* ``libmqc_ops_cuda.so``: the same CPU kernels plus CUDA kernels for the CUDA execution provider (built when
  ``nvcc`` is found). A session registers exactly one of the two, so the domain is defined once.

Both are compiled against onnxruntime 1.21's C API headers and ask for API version 21 at load, so one binary runs
on every onnxruntime from 1.21 on. The op signatures are documented in ``runtime_ops/README.md``.

Usage::

    import onnxruntime as ort
    from mqc.runtime_ops import register_library

    options = ort.SessionOptions()
    register_library(options)
    session = ort.InferenceSession("model.mqc.onnx", options)
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DOMAIN", "OPSET_VERSION", "RuntimeOpsNotBuiltError", "library_path", "register_library"]

#: Custom operator domain and its version.
DOMAIN = "ai.mqc"
OPSET_VERSION = 1

_NAMES = {"cpu": "libmqc_ops_cpu.so", "cuda": "libmqc_ops_cuda.so"}
_HERE = Path(__file__).resolve().parent


class RuntimeOpsNotBuiltError(FileNotFoundError):
    """The native library was not built (or not for this kind)."""


def _candidates(kind: str) -> list[Path]:
    name = _NAMES[kind]
    found = []
    if os.environ.get("MQC_RUNTIME_OPS_DIR"):
        found.append(Path(os.environ["MQC_RUNTIME_OPS_DIR"]) / name)
    found.append(_HERE / name)
    # A source checkout whose CMake build ran without an install (``python setup.py build_ext``).
    found.append(_HERE.parent / "build" / "runtime_ops" / name)
    return found


def library_path(kind: str = "cpu") -> Path:
    """Path of the built library: ``kind`` is ``"cpu"`` or ``"cuda"``.

    Looks in ``$MQC_RUNTIME_OPS_DIR``, then next to this module, then in the source tree's ``build/runtime_ops``.
    Raises :class:`RuntimeOpsNotBuiltError` naming the build command when it is missing.
    """
    if kind not in _NAMES:
        raise ValueError(f"kind must be one of {sorted(_NAMES)}, got {kind!r}")
    for path in _candidates(kind):
        if path.is_file():
            return path
    hint = (
        "the CUDA library is built only where `nvcc` is found at install time"
        if kind == "cuda"
        else "the CPU library is built by the package install"
    )
    raise RuntimeOpsNotBuiltError(
        f"mqc runtime ops library {_NAMES[kind]!r} not found ({hint}). Build it with `pip install -e .` "
        "(or `python setup.py build_ext --inplace`) from the repository root; it needs cmake and a C++17 compiler, "
        "and fetches onnxruntime's headers from Debian trixie's libonnxruntime-dev (or set MQC_ORT_INCLUDE_DIR). "
        f"Looked in: {', '.join(str(p) for p in _candidates(kind))}"
    )


def _cuda_ep_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def register_library(options, kind: str | None = None) -> Path:
    """Register the ``ai.mqc`` ops on ``options`` (an ``onnxruntime.SessionOptions``); return the library path.

    ``kind=None`` picks the CUDA library when onnxruntime has the CUDA execution provider and the CUDA library
    was built, else the CPU library. Registering twice on the same options is a no-op.
    """
    if kind is None:
        kind = "cpu"
        if _cuda_ep_available():
            try:
                library_path("cuda")
                kind = "cuda"
            except RuntimeOpsNotBuiltError:
                kind = "cpu"
    path = library_path(kind)
    registered = getattr(options, "_mqc_registered", None)
    if registered is None:
        registered = set()
        try:
            options._mqc_registered = registered
        except AttributeError:  # pybind objects without a __dict__
            registered = None
    if registered is not None and str(path) in registered:
        return path
    options.register_custom_ops_library(str(path))
    if registered is not None:
        registered.add(str(path))
    return path
