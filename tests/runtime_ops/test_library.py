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
    for symbol in ("RegisterCustomOps", "mqc_cuda_quant_linear", "mqc_cuda_quant_linear_ex",
                   "mqc_cuda_quant_linear_group", "mqc_cuda_hadamard", "mqc_cuda_rmsnorm_quant"):
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


def _cuda_c_api():
    lib = ctypes.CDLL(str(rt.library_path("cuda")))
    i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mqc_cuda_last_error.restype = ctypes.c_char_p
    lib.mqc_cuda_quant_linear_ex.argtypes = [c_int, vp, c_int, i64, i64, i64, vp, vp, vp, c_int, vp, vp, c_int, vp, vp,
                                             i64, vp, c_int, vp, vp]
    lib.mqc_cuda_quant_linear_group.argtypes = [c_int, i64, vp, c_int, i64, i64, i64, vp, vp, vp, c_int, vp, vp,
                                                c_int, vp, vp, i64, vp, c_int, vp, vp]
    lib.mqc_cuda_rmsnorm_quant.argtypes = [vp, c_int, i64, i64, vp, vp, ctypes.c_float, vp, vp]
    lib.mqc_cuda_hadamard.argtypes = [vp, vp, c_int, i64, i64, i64, vp, vp]
    lib.mqc_cuda_grid_rows.argtypes = [i64, ctypes.POINTER(ctypes.c_uint32)]
    lib.mqc_cuda_quant_linear_grids.argtypes = [i64, i64, ctypes.POINTER(ctypes.c_uint32)]
    return lib


CUDA_INVALID_VALUE = 1  # cudaErrorInvalidValue: returned before anything is launched


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the CUDA library is only built where nvcc exists")
@pytest.mark.parametrize(("scales", "bits", "dynamic", "message"), [
    ([0.0], 8, 0, "act_scale entries must be finite and > 0, got 0 at index 0"),
    ([0.1, -2.0], 8, 0, "act_scale entries must be finite and > 0, got -2 at index 1"),
    ([float("nan")], 4, 0, "act_scale entries must be finite and > 0, got nan at index 0"),
    ([float("inf")], 8, 0, "act_scale entries must be finite and > 0, got inf at index 0"),
    ([], 8, 0, "act_scale must be float32 with 1 to 3 entries (text, image, sink), got [0]"),
    ([0.1, 0.2], 8, 1, "with dynamic=1 act_scale is not read"),
    ([0.1], 3, 0, "attribute bits must be 8 or 4, got 3"),
])
def test_cuda_entry_points_refuse_through_the_shared_validator(scales, bits, dynamic, message):
    """The benchmark's C entry points check each call with the validator of the onnxruntime kernels (act_scale is
    a host array there too) and refuse before touching the GPU: this runs on a machine without one."""
    lib = _cuda_c_api()
    host = (ctypes.c_float * max(len(scales), 1))(*scales)
    dummy = ctypes.c_void_p(16)  # never dereferenced: the call is refused first
    rc = lib.mqc_cuda_quant_linear_ex(bits, dummy, 0, 4, 64, 16, dummy, dummy, host, len(scales), None, None, dynamic,
                                      None, None, 0, dummy, 0, dummy, None)
    assert rc == CUDA_INVALID_VALUE
    error = lib.mqc_cuda_last_error().decode()
    assert error.startswith("ai.mqc::QuantLinear: ") and message in error, error
    zero = (ctypes.c_float * 1)(0.0)
    assert lib.mqc_cuda_rmsnorm_quant(dummy, 1, 4, 64, dummy, zero, 1e-6, dummy, None) == CUDA_INVALID_VALUE
    assert "act_scale entries must be finite and > 0, got 0" in lib.mqc_cuda_last_error().decode()
    assert lib.mqc_cuda_hadamard(dummy, dummy, 1, 4, 24, 1, None, None) == CUDA_INVALID_VALUE
    assert "last dimension 24 is not m * 2^k" in lib.mqc_cuda_last_error().decode()


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the CUDA library is only built where nvcc exists")
@pytest.mark.parametrize(("group_size", "K", "message"), [
    (48, 96, "attribute group_size must be 0 (per channel) or a positive multiple of 32, got 48"),
    (-32, 96, "attribute group_size must be 0 (per channel) or a positive multiple of 32, got -32"),
    (64, 96, "group_size=64 does not divide W's K=96"),
])
def test_cuda_group_entry_point_refuses_through_the_shared_validator(group_size, K, message):
    """mqc_cuda_quant_linear_group (the benchmark's per-group entry point) checks group_size and the weight's K
    with the onnxruntime kernels' validator before touching the GPU."""
    lib = _cuda_c_api()
    host = (ctypes.c_float * 1)(0.1)
    dummy = ctypes.c_void_p(16)  # never dereferenced: the call is refused first
    rc = lib.mqc_cuda_quant_linear_group(4, group_size, dummy, 0, 4, K, 16, dummy, dummy, host, 1, None, None, 0,
                                         None, None, 0, dummy, 0, dummy, None)
    assert rc == CUDA_INVALID_VALUE
    error = lib.mqc_cuda_last_error().decode()
    assert error.startswith("ai.mqc::QuantLinear: ") and message in error, error


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the CUDA library is only built where nvcc exists")
@pytest.mark.parametrize("M", [1, 4, 5, 16, 17, 65_535, 65_536, 70_001, 128 * 65_535 + 1, 2**31 + 5])
@pytest.mark.parametrize("N", [1, 4096])
def test_cuda_launch_grids_stay_within_the_device_limits(M, N):
    """Every QuantLinear launch (rows, GEMM/GEMV, epilogue) and the row kernels keep gridDim.x <= 2^31 - 1 and
    gridDim.y, z <= 65,535; below the caps the grid has one block per row (tile), so nothing is strided then.
    The kernels stride over the rest (launch_geometry.h): with g blocks, block b takes rows b, b + g, ... The
    old branches launch had gridDim.y = M, which the driver refuses above 65,535."""
    lib = _cuda_c_api()
    out = (ctypes.c_uint32 * 9)()
    lib.mqc_cuda_quant_linear_grids(M, N, out)
    rows, gemm, epilogue = out[0:3], out[3:6], out[6:9]
    for x, y, z in (rows, gemm, epilogue):
        assert 1 <= x <= 2**31 - 1 and 1 <= y <= 65_535 and z == 1
    assert rows[0] == min(M, 2**31 - 1) and rows[1] == 1
    assert epilogue == [(N + 255) // 256, min((M + 7) // 8, 65_535), 1]
    if M <= 4:
        assert gemm == [(N + 7) // 8, 1, 1]
    elif M <= 16:
        assert gemm == [(N + 31) // 32, 1, 1]
    else:
        assert gemm == [(N + 127) // 128, min((M + 127) // 128, 65_535), 1]
    xyz = (ctypes.c_uint32 * 3)()
    lib.mqc_cuda_grid_rows(M, xyz)
    assert list(xyz) == [min(M, 2**31 - 1), 1, 1]


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the CUDA library is only built where nvcc exists")
def test_cuda_workspace_holds_the_low_rank_branch_split_partial_sums():
    """With few tokens the CMC branch's T = X @ A splits K over up to 64 blocks, each writing a partial T [M, rank]
    into the workspace (launch_geometry.h). The workspace size must follow K: sized without it (found on an H200),
    the partial sums overran it. One token, rank 64: K = 4096 splits in 16, K = 256 does not split."""
    lib = _cuda_c_api()
    lib.mqc_cuda_quant_linear_workspace.restype = ctypes.c_int64
    lib.mqc_cuda_quant_linear_workspace.argtypes = [ctypes.c_int64] * 3
    unsplit = lib.mqc_cuda_quant_linear_workspace(1, 256, 64)
    split = lib.mqc_cuda_quant_linear_workspace(1, 4096, 64)
    codes_growth = 4096 - 256  # one token's int8 codes
    assert split - unsplit >= codes_growth + 16 * 64 * 4
    assert lib.mqc_cuda_quant_linear_workspace(1, 4096, 0) < split - 16 * 64 * 4
