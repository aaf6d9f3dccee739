"""CMC math (mqc.lowrank, spec §3.5): whitening, Theorem 2, singular Gram matrices, rank rule, effective rank."""

from __future__ import annotations

import numpy as np
import pytest

from mqc.lowrank import effective_rank, lowrank_compensation, rank_for, whitening


def _anisotropic(t: int, k: int, seed: int) -> np.ndarray:
    """Activations with correlated channels whose scales span ~3 orders of magnitude."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.logspace(-1.5, 1.5, k)[:, None]
    return rng.standard_normal((t, k)) @ mix


def _data_err(a: np.ndarray, dw: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> float:
    return float(np.linalg.norm(a @ (dw - l1 @ l2)) ** 2)


def test_whitening_factorises_gram() -> None:
    a = _anisotropic(300, 24, seed=0)
    gram = a.T @ a
    t, t_inv = whitening(gram)
    np.testing.assert_allclose(t.T @ t, gram, rtol=1e-10, atol=1e-8 * np.abs(gram).max())
    np.testing.assert_allclose(t_inv @ t, np.eye(24), atol=1e-8)
    white = a @ t_inv  # orthonormal columns: A = U_A T
    # up to the eigendecomposition's forward error, eps * cond(C) (cond ~ 1e10 here: 1e-8 failed on some BLAS builds)
    np.testing.assert_allclose(white.T @ white, np.eye(24), atol=np.finfo(float).eps * np.linalg.cond(gram))


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_theorem2_whitened_error_is_tail_energy_and_beats_plain_svd(rank: int) -> None:
    a = _anisotropic(400, 40, seed=rank)
    dw = np.random.default_rng(100 + rank).standard_normal((40, 30))
    gram = a.T @ a
    l1, l2, info = lowrank_compensation(dw, gram, rank)
    assert l1.shape == (40, rank) and l2.shape == (rank, 30) and info.rank == rank and info.whitened
    t, _ = whitening(gram)
    sigma = np.linalg.svd(t @ dw, compute_uv=False)
    tail = float(np.sum(sigma[rank:] ** 2))
    err = _data_err(a, dw, l1, l2)
    assert err == pytest.approx(tail, rel=1e-8)
    assert info.residual == pytest.approx(tail, rel=1e-12)
    assert info.total == pytest.approx(float(np.linalg.norm(a @ dw) ** 2), rel=1e-8)
    # Plain SVD of ΔW (the paper's no-whitening ablation) is strictly worse on anisotropic A.
    p1, p2, pinfo = lowrank_compensation(dw, None, rank, whiten=False)
    plain_err = _data_err(a, dw, p1, p2)
    assert err < 0.9 * plain_err
    assert not pinfo.whitened and pinfo.residual == pytest.approx(
        np.linalg.norm(dw - p1 @ p2) ** 2, rel=1e-10
    )


def test_theorem2_optimality_against_perturbations() -> None:
    a = _anisotropic(200, 16, seed=5)
    dw = np.random.default_rng(6).standard_normal((16, 12))
    l1, l2, info = lowrank_compensation(dw, a.T @ a, 3)
    rng = np.random.default_rng(7)
    for _ in range(20):
        e1, e2 = rng.standard_normal(l1.shape), rng.standard_normal(l2.shape)
        eps = 1e-2 * np.linalg.norm(l1) / np.linalg.norm(e1)
        assert _data_err(a, dw, l1 + eps * e1, l2 + eps * e2) >= info.residual * (1 - 1e-10)


def test_isotropic_activations_make_whitening_equal_plain_svd() -> None:
    q, _ = np.linalg.qr(np.random.default_rng(8).standard_normal((100, 20)))
    a = 3.0 * q  # AᵀA = 9·I
    dw = np.random.default_rng(9).standard_normal((20, 15))
    l1, l2, _ = lowrank_compensation(dw, a.T @ a, 4)
    p1, p2, _ = lowrank_compensation(dw, None, 4, whiten=False)
    np.testing.assert_allclose(l1 @ l2, p1 @ p2, atol=1e-9)


def test_factors_do_not_depend_on_gram_scale() -> None:
    a = _anisotropic(120, 12, seed=10)
    dw = np.random.default_rng(11).standard_normal((12, 9))
    l1, l2, _ = lowrank_compensation(dw, a.T @ a, 3)
    m1, m2, _ = lowrank_compensation(dw, 2.0 / 120 * a.T @ a, 3)  # HessianAccumulator's normalisation
    np.testing.assert_allclose(l1 @ l2, m1 @ m2, atol=1e-9)


@pytest.mark.parametrize("case", ["few_tokens", "dead_channels"])
def test_singular_gram_pseudo_inverse_keeps_theorem2(case: str) -> None:
    k, n, r = 32, 20, 5
    if case == "few_tokens":
        a = _anisotropic(20, k, seed=12)  # 20 tokens < 32 channels: rank-20 Gram
    else:
        a = _anisotropic(200, k, seed=12)
        a[:, [0, 7, 8]] = 0.0
    dw = np.random.default_rng(13).standard_normal((k, n))
    gram = a.T @ a
    l1, l2, info = lowrank_compensation(dw, gram, r)
    assert np.isfinite(l1).all() and np.isfinite(l2).all()
    err = _data_err(a, dw, l1, l2)
    assert err == pytest.approx(info.residual, rel=1e-7)
    t, _ = whitening(gram)
    sigma = np.linalg.svd(t @ dw, compute_uv=False)
    assert info.residual == pytest.approx(float(np.sum(sigma[r:] ** 2)), rel=1e-9)
    p1, p2, _ = lowrank_compensation(dw, None, r, whiten=False)
    assert err < _data_err(a, dw, p1, p2)
    # Damping also gives a finite, slightly sub-optimal answer.
    d1, d2, _ = lowrank_compensation(dw, gram, r, damp=0.01)
    derr = _data_err(a, dw, d1, d2)
    assert np.isfinite(derr) and err * (1 - 1e-9) <= derr < _data_err(a, dw, p1, p2)


def test_zero_gram_and_rank_edges() -> None:
    dw = np.ones((6, 4))
    l1, l2, info = lowrank_compensation(dw, np.zeros((6, 6)), 2)
    assert not (l1 @ l2).any() and info.total == 0 and info.retained == 1.0
    l1, l2, info = lowrank_compensation(dw, np.eye(6), 10)
    assert info.rank == 4
    np.testing.assert_allclose(l1 @ l2, dw, atol=1e-12)
    l1, l2, info = lowrank_compensation(dw, np.eye(6), 0)
    assert l1.shape == (6, 0) and l2.shape == (0, 4) and info.residual == pytest.approx(24.0)
    with pytest.raises(ValueError):
        lowrank_compensation(dw, None, 2)
    with pytest.raises(ValueError):
        lowrank_compensation(dw, np.eye(5), 2)


def test_rank_for() -> None:
    assert rank_for(0.05, 3584, 18944) == 179  # floor(0.05 · 3584)
    assert rank_for(0.05, 512, 512) == 32  # floored at the public code's minimum
    assert rank_for(0.05, 512, 512, min_rank=8) == 25
    assert rank_for(64, 4096, 4096) == 64  # > 1 means an absolute rank
    assert rank_for(0.5, 16, 48) == 16  # never above min(K, N)
    assert rank_for(1.0, 100, 80, min_rank=0) == 80
    with pytest.raises(ValueError):
        rank_for(0.0, 10, 10)


def test_effective_rank() -> None:
    assert effective_rank(np.eye(8)) == pytest.approx(1.0)
    assert effective_rank(np.outer(np.arange(1, 7), np.ones(4))) == pytest.approx(0.25)
    assert effective_rank(np.diag([1.0, 1.0, 0.0, 0.0])) == pytest.approx(0.5)
    assert effective_rank(np.zeros((3, 3))) == 0.0
    # Two equal and two half-size singular values: p = (1/3, 1/3, 1/6, 1/6).
    p = np.array([1, 1, 0.5, 0.5]) / 3
    assert effective_rank(np.diag([2.0, 2.0, 1.0, 1.0])) == pytest.approx(np.exp(-np.sum(p * np.log(p))) / 4)
