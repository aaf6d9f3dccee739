"""Build hook: compiles the ``ai.mqc`` onnxruntime custom-operator library with CMake.

Everything else about the package lives in ``pyproject.toml``; this file only adds two native outputs,
``mqc/runtime_ops/libmqc_ops_cpu.so`` (always) and ``mqc/runtime_ops/libmqc_ops_cuda.so`` (when ``nvcc`` is found),
through setuptools' ``build_ext``, so ``pip install .`` and ``pip install -e .`` both build them.

onnxruntime's C/C++ API headers are not in any PyPI wheel. They come from Debian trixie's ``libonnxruntime-dev``
(1.21): the ``.deb`` is fetched with ``apt-get download`` against a private apt configuration (its own sources
list, state and cache folders under ``build/``; the system's apt configuration is never modified) and unpacked
with ``dpkg -x``. Compiling against 1.21 headers (``ORT_API_VERSION`` 21) gives one binary that loads on every
onnxruntime from 1.21 on.

Environment:
  MQC_ORT_INCLUDE_DIR     use this folder (holding ``onnxruntime_cxx_api.h``) instead of fetching the headers
  MQC_DEBIAN_MIRROR       Debian archive URI for the trixie sources list (default: the one the system's apt uses)
  MQC_BUILD_CUDA=0        skip the CUDA library even when nvcc is found
  MQC_CUDA_ARCHS          CUDA architectures, default "80;86;87;89;90a"
  MQC_BUILD_JOBS          parallel compile jobs, default min(2, cpu count)
  MQC_SKIP_RUNTIME_OPS=1  do not build the native library at all (pure-Python install)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SOURCE_DIR = ROOT / "runtime_ops"
BUILD_ROOT = ROOT / "build"
ORT_DEB_PACKAGE = "libonnxruntime-dev"
ORT_DEB_SUITE = "trixie"
NATIVE = {"mqc.runtime_ops.libmqc_ops_cpu": "libmqc_ops_cpu.so", "mqc.runtime_ops.libmqc_ops_cuda": "libmqc_ops_cuda.so"}


def _log(msg: str) -> None:
    print(f"[mqc build] {msg}", file=sys.stderr, flush=True)


def _system_debian_mirror() -> str | None:
    """The Debian archive URI the system's apt already uses (deb822 ``.sources`` or one-line ``.list`` files)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file() or path.suffix not in {".list", ".sources", ""}:
            continue
        text = path.read_text(errors="replace")
        for uri in re.findall(r"^\s*URIs:\s*(\S+)", text, flags=re.M) + re.findall(
            r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, flags=re.M
        ):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return None


def fetch_ort_headers(dest: Path) -> Path:
    """Fetch and unpack Debian trixie's libonnxruntime-dev into ``dest``; return its include folder."""
    include = dest / "root" / "usr" / "include" / "onnxruntime"
    if (include / "onnxruntime_cxx_api.h").exists():
        return include
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"`{tool}` not found: cannot fetch onnxruntime's headers from Debian's {ORT_DEB_PACKAGE}. "
                "Set MQC_ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h (onnxruntime >= 1.21)."
            )
    mirror = os.environ.get("MQC_DEBIAN_MIRROR") or _system_debian_mirror()
    if not mirror:
        raise RuntimeError("no Debian archive URI found in /etc/apt; set MQC_DEBIAN_MIRROR or MQC_ORT_INCLUDE_DIR")
    keyring = next(
        (p for p in ("/usr/share/keyrings/debian-archive-keyring.gpg",) if Path(p).exists()),
        None,
    )
    apt = dest / "apt"
    for sub in ("etc/sources.list.d", "etc/preferences.d", "state/lists/partial", "cache/archives/partial", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    signed = f"[signed-by={keyring}] " if keyring else "[trusted=yes] "
    (apt / "etc/sources.list").write_text(f"deb {signed}{mirror} {ORT_DEB_SUITE} main\n")
    (apt / "state/status").touch()
    options = [
        f"-oDir::Etc::SourceList={apt}/etc/sources.list",
        f"-oDir::Etc::SourceParts={apt}/etc/sources.list.d",
        f"-oDir::Etc::Preferences={apt}/etc/preferences",
        f"-oDir::Etc::PreferencesParts={apt}/etc/preferences.d",
        f"-oDir::State={apt}/state",
        f"-oDir::State::status={apt}/state/status",
        f"-oDir::Cache={apt}/cache",
        "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=",
        "-oDebug::NoLocking=1",
    ]
    _log(f"fetching {ORT_DEB_PACKAGE} ({ORT_DEB_SUITE}) headers with apt-get download")
    subprocess.run(["apt-get", "-qq", *options, "update"], check=True)
    debs = apt / "debs"
    subprocess.run(["apt-get", "-qq", *options, "download", ORT_DEB_PACKAGE], check=True, cwd=debs)
    (deb,) = sorted(debs.glob(f"{ORT_DEB_PACKAGE}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(dest / "root")], check=True)
    if not (include / "onnxruntime_cxx_api.h").exists():
        raise RuntimeError(f"{deb.name} did not contain include/onnxruntime/onnxruntime_cxx_api.h")
    _log(f"onnxruntime headers from {deb.name} in {include}")
    return include


class CMakeBuildExt(build_ext):
    """Builds both native libraries with one CMake invocation, then places each where setuptools expects it."""

    def get_ext_filename(self, fullname: str) -> str:
        # distutils asks with the full dotted name or with its last part only; both map to a plain ``.so``.
        for dotted, filename in NATIVE.items():
            if fullname == dotted:
                return os.path.join(*dotted.split(".")[:-1], filename)
            if fullname == dotted.rsplit(".", 1)[1]:
                return filename
        return super().get_ext_filename(fullname)

    def _cmake_build(self) -> Path:
        if getattr(self, "_mqc_built", None):
            return self._mqc_built
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake (>= 3.24) is required to build mqc's runtime ops; `apt-get install cmake`")
        include = os.environ.get("MQC_ORT_INCLUDE_DIR") or str(fetch_ort_headers(BUILD_ROOT / "ort-headers"))
        build_dir = BUILD_ROOT / "runtime_ops"
        jobs = os.environ.get("MQC_BUILD_JOBS") or str(min(2, os.cpu_count() or 1))
        args = [
            "cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DMQC_ORT_INCLUDE_DIR={include}",
            f"-DMQC_ENABLE_CUDA={'OFF' if os.environ.get('MQC_BUILD_CUDA') == '0' else 'ON'}",
        ]  # fmt: skip
        if os.environ.get("MQC_CUDA_ARCHS"):
            args.append(f"-DMQC_CUDA_ARCHS={os.environ['MQC_CUDA_ARCHS']}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
            args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
        subprocess.run(args, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        self._mqc_built = build_dir
        return build_dir

    def build_extension(self, ext: Extension) -> None:
        if ext.name not in NATIVE:
            return super().build_extension(ext)
        built = self._cmake_build() / NATIVE[ext.name]
        target = Path(self.get_ext_fullpath(ext.name))
        if not built.exists():
            if ext.optional:
                _log(f"{NATIVE[ext.name]} not built (no CUDA compiler); skipping")
                return None
            raise RuntimeError(f"CMake did not produce {built}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)
        return None


ext_modules = []
if os.environ.get("MQC_SKIP_RUNTIME_OPS") != "1":
    ext_modules = [
        Extension("mqc.runtime_ops.libmqc_ops_cpu", sources=[]),
        Extension("mqc.runtime_ops.libmqc_ops_cuda", sources=[], optional=True),
    ]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuildExt})
