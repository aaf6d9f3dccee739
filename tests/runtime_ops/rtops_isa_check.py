"""Run in a subprocess by test_quant_linear.py with MQC_CPU_ISA set: exact checks of W8 and W4 on odd shapes."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).parent))
from rtops_models import int_reference, pack_int4, quant_linear_model, quantize, session


def main() -> None:
    rng = np.random.default_rng(1)
    for bits in (8, 4):
        for M, K, N in [(1, 40, 17), (1, 200, 1040), (7, 96, 130), (61, 264, 65)]:
            lo, hi = (-128, 128) if bits == 8 else (-8, 8)
            w = rng.integers(lo, hi, size=(N, K)).astype(np.int8)
            packed = w if bits == 8 else pack_int4(w)
            xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
            model = quant_linear_model(K, N, bits=bits, x_type=TensorProto.INT8, weight=packed)
            y = session(model).run(None, {"X": xq, "w_scale": np.ones(N, np.float32),
                                          "act_scale": np.ones(1, np.float32)})[0]
            np.testing.assert_array_equal(y, int_reference(xq, w).astype(np.float32))
            x = rng.standard_normal((M, K)).astype(np.float32)
            model = quant_linear_model(K, N, bits=bits, weight=packed)
            y = session(model).run(None, {"X": x, "w_scale": np.ones(N, np.float32),
                                          "act_scale": np.full(1, 0.03, np.float32)})[0]
            ref = int_reference(quantize(x, np.float32(0.03)), w) * np.float64(np.float32(0.03))
            np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        check_groups(rng, bits)
        check_extremes(bits)
    print("ok")


def check_extremes(bits: int) -> None:
    """Every code at its bound: the largest sums the int16 stages of the AVX2 kernels can meet (W4: 4 steps of
    15 x -128 per lane before widening), decode and prefill rows, K with a partial last chunk, per channel and
    per group."""
    N = 24
    wmin, wmax = (-128, 127) if bits == 8 else (-8, 7)
    for K, gs in ((1032, 0), (1024, 256)):
        for wv, xv, M in itertools.product((wmin, wmax), (-128, 127), (1, 20)):
            w = np.full((N, K), wv, np.int8)
            xq = np.full((M, K), xv, np.int8)
            model = quant_linear_model(K, N, bits=bits, x_type=TensorProto.INT8, group_size=gs,
                                       weight=w if bits == 8 else pack_int4(w))
            scales = np.ones((K // gs, N) if gs else N, np.float32)
            y = session(model).run(None, {"X": xq, "w_scale": scales, "act_scale": np.ones(1, np.float32)})[0]
            np.testing.assert_array_equal(y, int_reference(xq, w).astype(np.float32))


def check_groups(rng, bits: int) -> None:
    """Per-group weights (group_size 32 / 64): each group's int32 dot product exact (one-hot scales), on decode
    rows, odd row counts, N tails and M >= 16 (the W4 prefill's unpacked tiles)."""
    for M, K, N, gs in [(1, 64, 17, 32), (7, 192, 130, 64), (21, 128, 65, 32)]:
        lo, hi = (-128, 128) if bits == 8 else (-8, 8)
        w = rng.integers(lo, hi, size=(N, K)).astype(np.int8)
        model = quant_linear_model(K, N, bits=bits, x_type=TensorProto.INT8, group_size=gs,
                                   weight=w if bits == 8 else pack_int4(w))
        xq = rng.integers(-128, 128, size=(M, K)).astype(np.int8)
        run = session(model).run
        for j in range(K // gs):
            one_hot = np.zeros((K // gs, N), np.float32)
            one_hot[j] = 1.0
            y = run(None, {"X": xq, "w_scale": one_hot, "act_scale": np.ones(1, np.float32)})[0]
            cols = slice(j * gs, (j + 1) * gs)
            np.testing.assert_array_equal(y, int_reference(xq[:, cols], w[:, cols]).astype(np.float32))


if __name__ == "__main__":
    main()
