"""Smoothing math (mqc.smoothing, spec §3.2–§3.4, §4): SmoothQuant scales, folding, MAS init, Theorem 1.

Agreement of Theorem 1 with measurement on synthetic data (d = 128, α_i log-uniform over [1, e³]):
- Eq. 16 with its constant (uniform-noise model) predicts the measured per-token SQNR to ≈ 0.1 dB at 8 bits.
- For tokens whose channels sit near their ranges (|x_i| ∈ [0.9, 1]·R_i, the theorem's extremal case) the
  measured unified-vs-specific gap is within ≈ 0.4 dB of Δ at 8 bits (≈ 1 dB at 4 bits).
- For uniformly distributed tokens the measured gap is smaller than |Δ| (≈ 6.4 dB against 8.2 dB): Δ describes
  the extremal token, and a random token rarely peaks on the worst channel.
"""

from __future__ import annotations

import numpy as np
import pytest

from mqc.smoothing import (
    mas_init_scales,
    smooth_activation,
    smooth_weight,
    smoothquant_scales,
    sqnr_under_smoothing,
    theorem1_sqnr_loss_db,
    token_sqnr_model_db,
    unified_scales,
)


def _ranges(seed: int, d: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(dominant, other) channel ranges with a non-uniform ratio α ∈ [1, e³]."""
    rng = np.random.default_rng(seed)
    r_other = np.exp(rng.uniform(-1, 1, d))
    return r_other * np.exp(rng.uniform(0, 3, d)), r_other


def test_smoothquant_scales_formula_and_floor() -> None:
    act = np.array([4.0, 1.0, 0.0, 9.0])
    w = np.array([[1.0, -0.25], [-4.0, 2.0], [0.5, 0.5], [0.0, 0.0]])
    s = smoothquant_scales(act, w)
    np.testing.assert_allclose(s, [2.0 / 1.0, 1.0 / 2.0, np.sqrt(1e-5) / np.sqrt(0.5), 3.0 / np.sqrt(1e-5)])
    s75 = smoothquant_scales(act, w, alpha=0.75)
    np.testing.assert_allclose(s75[0], 4.0**0.75 / 1.0**0.25)
    np.testing.assert_allclose(smoothquant_scales(act[:2], w[:2], alpha=1.0), [4.0, 1.0])
    np.testing.assert_allclose(smoothquant_scales(act[:2], w[:2], alpha=0.0), [1.0, 0.25])
    assert s.dtype == np.float64


def test_smoothquant_balances_activation_and_weight_ranges() -> None:
    # With α = 0.5, channel i's activation range and weight-row range both become sqrt(max|x_i|·max|W_i|).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)) * np.logspace(-2, 2, 16)
    w = rng.standard_normal((16, 8)) * np.logspace(1, -1, 16)[:, None]
    s = smoothquant_scales(np.abs(x).max(axis=0), w)
    xs, ws = smooth_activation(x, s), smooth_weight(w, s)
    np.testing.assert_allclose(np.abs(xs).max(axis=0), np.abs(ws).max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(xs @ ws, x @ w, rtol=1e-10, atol=1e-10)  # the folding identity


def test_unified_and_mas_init_scales() -> None:
    w = np.random.default_rng(1).standard_normal((6, 3))
    stats = {"text": np.array([1.0, 2, 3, 4, 5, 6]), "vision": np.array([10.0, 1, 30, 1, 50, 1])}
    mas = mas_init_scales(stats, w)
    assert set(mas) == {"text", "vision"}
    np.testing.assert_allclose(mas["text"], smoothquant_scales(stats["text"], w))
    uni = unified_scales(stats, w)
    # Eq. 11: each channel follows its dominant modality.
    dominant = np.where(stats["vision"] > stats["text"], mas["vision"], mas["text"])
    np.testing.assert_allclose(uni, dominant)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: smoothquant_scales(np.ones(3), np.ones((4, 2))),
        lambda: smoothquant_scales(np.ones(4), np.ones((4, 2)), alpha=1.5),
        lambda: smoothquant_scales(-np.ones(4), np.ones((4, 2))),
        lambda: smoothquant_scales(np.array([1.0, np.nan]), np.ones((2, 2))),
        lambda: unified_scales({}, np.ones((2, 2))),
        lambda: theorem1_sqnr_loss_db(np.ones(3), np.ones(4)),
        lambda: theorem1_sqnr_loss_db(np.ones(3), np.array([1.0, 0.0, 1.0])),
    ],
)
def test_refusals(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_theorem1_exact_formula() -> None:
    # α = (1, 2): (min α)² · Σ α⁻² / d = 1 · (1 + 1/4) / 2 = 0.625.
    assert theorem1_sqnr_loss_db(np.array([3.0, 8.0]), np.array([3.0, 4.0])) == pytest.approx(
        10 * np.log10(0.625)
    )
    alpha = np.array([1.0, 2.0, 4.0, 0.5])
    expected = 10 * np.log10(0.25 * np.sum(alpha**-2.0) / 4)
    assert theorem1_sqnr_loss_db(alpha * 7.0, np.full(4, 7.0)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_theorem1_sign_and_equality_case(seed: int) -> None:
    dom, other = _ranges(seed)
    delta = theorem1_sqnr_loss_db(dom, other)
    assert delta < -1.0
    # Depends on how non-uniform α is, not on its size.
    assert theorem1_sqnr_loss_db(1000.0 * dom, other) == pytest.approx(delta, abs=1e-9)
    # Equality iff α is uniform.
    assert theorem1_sqnr_loss_db(37.5 * other, other) == pytest.approx(0.0, abs=1e-12)
    bumped = 37.5 * other.copy()
    bumped[seed] *= 1.01
    assert theorem1_sqnr_loss_db(bumped, other) < 0.0


@pytest.mark.parametrize("bits", [8, 4])
def test_eq16_noise_model_matches_measured_sqnr(bits: int) -> None:
    dom, other = _ranges(10)
    x = np.random.default_rng(11).uniform(-1, 1, (400, 128)) * other
    for s in (other, dom):
        model = float(token_sqnr_model_db(x, s, bits).mean())
        assert sqnr_under_smoothing(x, s, bits) == pytest.approx(model, abs=0.3 if bits == 8 else 0.6)


@pytest.mark.parametrize("seed", range(3))
def test_theorem1_predicts_measured_gap_on_extremal_tokens(seed: int) -> None:
    dom, other = _ranges(seed)
    rng = np.random.default_rng(100 + seed)
    x = rng.choice([-1.0, 1.0], (300, 128)) * rng.uniform(0.9, 1.0, (300, 128)) * other  # near-range tokens
    gap = sqnr_under_smoothing(x, dom, 8) - sqnr_under_smoothing(x, other, 8)
    assert gap == pytest.approx(theorem1_sqnr_loss_db(dom, other), abs=0.75)


def test_unified_smoothing_loses_sqnr_for_the_non_dominant_modality() -> None:
    # Vision dominates every channel by a non-uniform factor; text tokens smoothed with the unified (vision-led)
    # factor lose SQNR against text's own factor, as MAS's motivation says (§3.3, Fig. 2). With α = 0.5 the scale
    # ratio is only sqrt of the range ratio; measured loss here ≈ 2.4 dB at both 8 and 4 bits.
    rng = np.random.default_rng(3)
    k, n = 128, 64
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    text_range = np.exp(rng.uniform(-1, 1, k))
    vision_range = text_range * np.exp(rng.uniform(0, 3, k))
    text = rng.uniform(-1, 1, (300, k)) * text_range
    stats = {"text": np.abs(text).max(axis=0), "vision": vision_range}
    uni = unified_scales(stats, w)
    own = mas_init_scales(stats, w)["text"]
    for bits in (8, 4):
        specific, unified = sqnr_under_smoothing(text, own, bits), sqnr_under_smoothing(text, uni, bits)
        assert unified < specific - 1.5
    # For the dominant modality itself the unified factor is its own: no loss.
    vision = rng.uniform(-1, 1, (300, k)) * vision_range
    np.testing.assert_allclose(uni, mas_init_scales(stats, w)["vision"])
    assert sqnr_under_smoothing(vision, uni, 8) == sqnr_under_smoothing(
        vision, mas_init_scales(stats, w)["vision"], 8
    )


def test_sqnr_under_smoothing_skips_zero_tokens() -> None:
    x = np.vstack([np.zeros(8), np.arange(1.0, 9.0)])
    assert np.isfinite(sqnr_under_smoothing(x, np.ones(8), 8))
    with pytest.raises(ValueError):
        sqnr_under_smoothing(np.zeros((2, 8)), np.ones(8), 8)
