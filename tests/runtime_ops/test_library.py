"""The built libraries: loader errors, registration, and the CUDA library (compiled wherever nvcc exists)."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import mqc.runtime_ops as rt
import numpy as np
import onnxruntime as ort
import pytest
from rtops_models import pack_int4, quant_linear_model


def test_cpu_library_is_built_and_exports_only_the_entry_point():
    path = rt.library_path("cpu")
    assert path.name == "libmqc_ops_cpu.so"
    lib = ctypes.CDLL(str(path))
    assert hasattr(lib, "RegisterCustomOps")
    assert not hasattr(lib, "_ZN3mqc12pack_weightsEPKvill")  # internal symbols stay hidden


def test_default_cpu_kernels_match_the_cpu():
    lib = ctypes.CDLL(str(rt.library_path("cpu")))
    lib.mqc_cpu_isa.restype = ctypes.c_char_p
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    want = "avx512vnni" if "avx512_vnni" in flags and "avx512bw" in flags else ("avx2" if " avx2" in flags else "generic")
    if os.environ.get("MQC_CPU_ISA"):
        pytest.skip("MQC_CPU_ISA overrides the choice")
    assert lib.mqc_cpu_isa().decode() == want


def test_missing_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(rt, "_HERE", tmp_path / "nowhere")
    monkeypatch.delenv("MQC_RUNTIME_OPS_DIR", raising=False)
    with pytest.raises(rt.RuntimeOpsNotBuiltError, match=r"pip install -e \."):
        rt.library_path("cpu")
    with pytest.raises(ValueError, match="kind must be one of"):
        rt.library_path("rocm")


def test_register_twice_is_harmless():
    options = ort.SessionOptions()
    first = rt.register_library(options)
    second = rt.register_library(options)
    assert first == second


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the CUDA library is only built where nvcc exists")
def test_cuda_library_is_built_and_runs_its_cpu_kernels_without_a_gpu():
    """CI has nvcc but no GPU: the CUDA library must build, load in a CPU-only onnxruntime, and serve the CPU EP."""
    path = rt.library_path("cuda")
    lib = ctypes.CDLL(str(path))
    for symbol in ("RegisterCustomOps", "mqc_cuda_quant_linear", "mqc_cuda_quant_linear_ex", "mqc_cuda_hadamard",
                   "mqc_cuda_rmsnorm_quant"):
        assert hasattr(lib, symbol), symbol
    assert lib.mqc_cuda_padded_k(ctypes.c_int64(100)) == 128
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(24, 64)).astype(np.int8)
    model = quant_linear_model(64, 24, bits=4, x_type=1, weight=pack_int4(w))
    options = ort.SessionOptions()
    rt.register_library(options, kind="cuda")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.integers(-128, 128, size=(3, 64)).astype(np.float32)
    y = session.run(None, {"X": x, "w_scale": np.ones(24, np.float32), "act_scale": np.ones(1, np.float32)})[0]
    np.testing.assert_array_equal(y, (x.astype(np.int64) @ w.T.astype(np.int64)).astype(np.float32))
