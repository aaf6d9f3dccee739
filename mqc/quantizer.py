"""Symmetric integer quantizer math shared by calibration, weight passes and lowering.

Conventions (spec/algorithms.md §1):
- Symmetric, zero point 0, signed grid [-2^(b-1), 2^(b-1) - 1], scale = absmax / (2^(b-1) - 1).
- Weights are stored as the ONNX MatMul operand, shape [in, out] (``K x N``); "per channel" means one scale
  per output feature, i.e. along axis 1. Per-group scales split the input axis into groups of ``group_size``.
- Activations get one static scale per tensor (or per modality, for MSQ) from calibration statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Scales never go below this, so an all-zero channel still dequantizes to zeros without NaNs.
MIN_SCALE = 1e-12


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-wide symmetric quantizer."""
    if bits not in (2, 3, 4, 5, 6, 8, 16):
        raise ValueError(f"unsupported bit width {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_absmax(absmax: np.ndarray | float, bits: int) -> np.ndarray:
    """Scale that maps ``absmax`` onto the largest positive integer."""
    return np.maximum(np.asarray(absmax, dtype=np.float64) / qrange(bits)[1], MIN_SCALE).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray | float, bits: int) -> np.ndarray:
    """Round-to-nearest-even onto the signed grid, as ONNX QuantizeLinear does."""
    lo, hi = qrange(bits)
    return np.clip(np.rint(x / scale), lo, hi).astype(np.int8 if bits <= 8 else np.int16)


def fake_quantize(x: np.ndarray, scale: np.ndarray | float, bits: int) -> np.ndarray:
    """Quantize then dequantize, in float32."""
    return (quantize(x, scale, bits).astype(np.float32) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖x‖² / ‖x − x̂‖²), spec §1."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approximation, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weight in the MatMul layout [K, N] with its scales.

    ``scale`` has shape [N] for per-channel, or [K // group_size, N] for per-group.
    """

    q: np.ndarray
    scale: np.ndarray
    bits: int
    group_size: int | None = None

    def dequantize(self) -> np.ndarray:
        if self.group_size is None:
            return self.q.astype(np.float32) * self.scale[None, :]
        expanded = np.repeat(self.scale, self.group_size, axis=0)
        return self.q.astype(np.float32) * expanded


def _grouped(weight: np.ndarray, group_size: int | None) -> np.ndarray:
    """View [K, N] as [G, g, N] so that reductions over axis 1 give per-group statistics."""
    k, n = weight.shape
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"input size {k} is not a multiple of group size {g}")
    return weight.reshape(k // g, g, n)


def mse_clip_ratios(
    weight: np.ndarray,
    bits: int,
    group_size: int | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> np.ndarray:
    """Per-(group, channel) clip ratio in [1 - max_shrink, 1] minimising the L_norm weight error.

    The search shrinks absmax in ``grid`` steps, as MQuant's weight quantizer does (spec §2.6: 100 steps down to
    0.2 x absmax, L_2.4 norm). Returns ratios shaped like the scale ([N] or [G, N]).
    """
    w = _grouped(np.asarray(weight, dtype=np.float32), group_size)
    lo, hi = qrange(bits)
    absmax = np.abs(w).max(axis=1)  # [G, N]
    best_err = np.full(absmax.shape, np.inf)
    best_ratio = np.ones(absmax.shape, dtype=np.float32)
    buf = np.empty_like(w)  # fake_quantize(w) - w in place: the search is the slowest step of a GPTQ compile
    for step in range(int(max_shrink * grid) + 1):
        ratio = 1.0 - step / grid
        scale = scale_from_absmax(absmax * ratio, bits)[:, None, :]
        np.divide(w, scale, out=buf)
        np.rint(buf, out=buf)
        np.clip(buf, lo, hi, out=buf)
        np.multiply(buf, scale, out=buf)
        np.subtract(buf, w, out=buf)
        np.abs(buf, out=buf)
        np.power(buf, np.float32(norm), out=buf)
        err = buf.sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, ratio, best_ratio)
    return best_ratio if group_size is not None else best_ratio[0]


def weight_scales(weight: np.ndarray, bits: int, group_size: int | None = None, mse_clip: bool = False) -> np.ndarray:
    """Per-channel or per-(group, channel) scales, [G, N], absmax optionally shrunk by the MSE clip search."""
    w = np.asarray(weight, dtype=np.float32)
    absmax = np.abs(_grouped(w, group_size)).max(axis=1)  # [G, N]
    if mse_clip:
        ratios = mse_clip_ratios(w, bits, group_size)
        absmax = absmax * (ratios if group_size is not None else ratios[None, :])
    return scale_from_absmax(absmax, bits)


def quantize_weight_rtn(
    weight: np.ndarray,
    bits: int,
    group_size: int | None = None,
    mse_clip: bool = False,
    scale: np.ndarray | None = None,
) -> QuantizedWeight:
    """Round-to-nearest per-channel (or per-group) symmetric weight quantization, optional MSE clipping.

    ``scale`` ([G, N], from ``weight_scales``) skips the scale search when the caller already ran it.
    """
    w = np.asarray(weight, dtype=np.float32)
    grouped = _grouped(w, group_size)
    if scale is None:
        scale = weight_scales(w, bits, group_size, mse_clip)
    q = quantize(grouped, scale[:, None, :], bits).reshape(w.shape)
    return QuantizedWeight(q=q, scale=scale if group_size is not None else scale[0], bits=bits, group_size=group_size)


def quantize_tensor_per_tensor(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32]:
    """Per-tensor absmax quantization (used for tests and reference math)."""
    scale = scale_from_absmax(np.abs(x).max(), bits)
    return quantize(x, scale, bits), np.float32(scale)
