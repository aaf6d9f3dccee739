"""Channel-wise smoothing math: SmoothQuant scales, MAS initialisation and MASQuant's Theorem 1 (spec §3.2–§3.4, §4).

Smoothing uses the invariance y = x W = (x / s)(diag(s) W) (spec §3.2, Eqs. 2–3): the activation's input channel i is
divided by s_i and row i of the MatMul weight W [K = in, N = out] multiplied by s_i.

- SmoothQuant (Eq. 8, §4): s_i = max_t|x_{t,i}|^α / max_j|W_{i,j}|^{1−α}, the weight maximum taken over row i
  (all outputs). Both maxima are floored at 1e-5 as the released MASQuant code does; α = 0.5 by default.
- Unified smoothing (Eq. 11): the same formula on the channel maxima over all modalities, i.e. fixed by the
  dominant modality m* = argmax_m R_i^m of each channel.
- MAS initialisation (Eq. 12, §3.4): one SmoothQuant vector per modality from that modality's channel maxima
  R_i^m = max_t |x^m_{t,i}| (square-root form, α = 0.5, as the code does).
- Theorem 1 (§3.3, Eqs. 16–20): under per-token dynamic quantization with uniform rounding noise, smoothing the
  non-dominant modality m' with the dominant modality's factor instead of its own costs
  Δ = 10·log10((min_i α_i)² · Σ_i α_i⁻² / d) dB, α_i = R_i^m / R_i^{m'}; Δ ≤ 0 with equality iff all α_i are equal.

Refusals: non-finite or negative statistics, shape mismatches, α outside [0, 1]; Theorem 1 needs strictly positive
ranges (a zero range makes α undefined).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mqc.quantizer import qrange, quantize, scale_from_absmax, sqnr_db

#: Floor applied to activation and weight maxima before the power law (released MASQuant code).
DEFAULT_FLOOR = 1e-5


def smoothquant_scales(
    act_absmax: np.ndarray, weight: np.ndarray, alpha: float = 0.5, floor: float = DEFAULT_FLOOR
) -> np.ndarray:
    """s [K] = max|x_i|^α / max_j|W_ij|^(1−α) (Eq. 8), maxima floored at ``floor``; float64."""
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or a.shape != (w.shape[0],):
        raise ValueError(f"act_absmax must be [K] and weight [K, N]; got {a.shape} and {w.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if floor <= 0:
        raise ValueError(f"floor must be positive, got {floor}")
    if not np.isfinite(a).all() or (a < 0).any() or not np.isfinite(w).all():
        raise ValueError("statistics must be finite and act_absmax non-negative")
    a = np.maximum(a, floor)
    w_max = np.maximum(np.abs(w).max(axis=1), floor)
    return a**alpha / w_max ** (1.0 - alpha)


def unified_scales(
    act_absmax_by_modality: Mapping[str, np.ndarray],
    weight: np.ndarray,
    alpha: float = 0.5,
    floor: float = DEFAULT_FLOOR,
) -> np.ndarray:
    """One SmoothQuant vector for all modalities from the channel maxima over modalities (Eq. 11)."""
    if not act_absmax_by_modality:
        raise ValueError("need the statistics of at least one modality")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in act_absmax_by_modality.values()])
    return smoothquant_scales(stacked.max(axis=0), weight, alpha, floor)


def mas_init_scales(
    act_absmax_by_modality: Mapping[str, np.ndarray],
    weight: np.ndarray,
    alpha: float = 0.5,
    floor: float = DEFAULT_FLOOR,
) -> dict[str, np.ndarray]:
    """Per-modality SmoothQuant vectors s^m, the starting point of MAS training (Eq. 12, §3.4)."""
    return {m: smoothquant_scales(v, weight, alpha, floor) for m, v in act_absmax_by_modality.items()}


def smooth_activation(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x · diag(s)⁻¹: divide input channel i (last axis) by s_i."""
    return np.asarray(x) / np.asarray(s)


def smooth_weight(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """diag(s) · W: multiply row i of W [K, N] by s_i, so (x / s)(diag(s) W) = x W."""
    return np.asarray(s)[:, None] * np.asarray(weight)


def _range_ratio(range_dominant: np.ndarray, range_other: np.ndarray) -> np.ndarray:
    rd = np.asarray(range_dominant, dtype=np.float64)
    ro = np.asarray(range_other, dtype=np.float64)
    if rd.ndim != 1 or rd.shape != ro.shape or rd.size == 0:
        raise ValueError(f"ranges must be two non-empty [d] vectors, got {rd.shape} and {ro.shape}")
    if not (np.isfinite(rd).all() and np.isfinite(ro).all()) or (rd <= 0).any() or (ro <= 0).any():
        raise ValueError("Theorem 1 needs finite, strictly positive channel ranges")
    return rd / ro


def theorem1_sqnr_loss_db(range_dominant: np.ndarray, range_other: np.ndarray) -> float:
    """Δ = 10·log10((min_i α_i)² · Σ_i α_i⁻² / d), α_i = R_i^m / R_i^{m'} (Theorem 1, Eq. 20); always ≤ 0.

    It is SQNR(s^uni, x^{m'}) − SQNR(s^{m'}, x^{m'}) = Eq. 19 − Eq. 18 for the token whose channels all reach their
    ranges, with s^uni ∝ R^m and s^{m'} ∝ R^{m'}: the loss depends on how non-uniform α is, not on its size.
    """
    alpha = _range_ratio(range_dominant, range_other)
    value = float(alpha.min() ** 2 * np.sum(alpha**-2.0) / alpha.size)
    return min(0.0, 10.0 * float(np.log10(value)))  # the bound is ≤ 1 exactly; clip round-off above 0


def token_sqnr_model_db(x_rows: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """Eq. 16 with its constant: per-token SQNR of x/s predicted by the uniform-noise model, [T] in dB.

    With Δ_t = max_i|x_ti/s_i| / q_max and noise d·Δ_t²/12: SQNR_t = 12·q_max²/d · Σ_i (x_ti/s_i)² / max_i (x_ti/s_i)².
    """
    xs = np.asarray(smooth_activation(np.asarray(x_rows, dtype=np.float64), np.asarray(s, dtype=np.float64)))
    xs = xs.reshape(-1, xs.shape[-1])
    qmax = qrange(bits)[1]
    peak = np.abs(xs).max(axis=1)
    if (peak == 0).any():
        raise ValueError("all-zero tokens have no SQNR")
    return 10.0 * np.log10(12.0 * qmax**2 / xs.shape[1] * np.sum(xs**2, axis=1) / peak**2)


def sqnr_under_smoothing(x_rows: np.ndarray, s: np.ndarray, bits: int) -> float:
    """Measured mean per-token SQNR (dB) of x/s under per-token dynamic symmetric quantization (spec Eq. 16 setting).

    SQNR is taken in the smoothed domain, as in the paper; all-zero tokens are skipped (SQNR undefined).
    """
    xs = np.asarray(smooth_activation(np.asarray(x_rows, dtype=np.float64), np.asarray(s, dtype=np.float64)))
    xs = xs.reshape(-1, xs.shape[-1])
    values = []
    for row in xs:
        peak = float(np.abs(row).max())
        if peak == 0.0:
            continue
        scale = np.float64(scale_from_absmax(peak, bits))
        values.append(sqnr_db(row, quantize(row, scale, bits).astype(np.float64) * scale))
    if not values:
        raise ValueError("no non-zero tokens")
    return float(np.mean(values))
