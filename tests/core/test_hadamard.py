"""Hadamard constructions and the fast transform (mqc.hadamard, spec §2.6)."""

from __future__ import annotations

import numpy as np
import pytest

from mqc import hadamard as had


@pytest.mark.parametrize("m", had.BASE_SIZES)
def test_base_matrix_is_hadamard_in_normalised_form(m: int) -> None:
    h = had.base_matrix(m)
    assert h.shape == (m, m)
    assert set(np.unique(h).tolist()) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))
    # Normalised form: first row and column all +1 (channel 0 of x·H is √n·mean(x), the RMS outlier of §2.7).
    assert (h[0] == 1).all() and (h[:, 0] == 1).all()


@pytest.mark.parametrize("q", [11, 19, 59, 107, 139, 13, 17, 25])
def test_jacobsthal_properties(q: int) -> None:
    jac = had._jacobsthal(q)
    # Q·Qᵀ = q·I − J and every row sums to zero; Q is symmetric for q ≡ 1 (mod 4), skew for q ≡ 3 (mod 4).
    np.testing.assert_array_equal(
        jac @ jac.T, q * np.eye(q, dtype=np.int64) - np.ones((q, q), dtype=np.int64)
    )
    assert (jac.sum(axis=1) == 0).all()
    np.testing.assert_array_equal(jac.T, jac if q % 4 == 1 else -jac)


def test_gf25_is_a_real_extension_field() -> None:
    # GF(25) has 12 nonzero squares; a wrong modulus (reducible polynomial) breaks the count or the identity above.
    chi = had._jacobsthal(25)[:, 0]
    assert (chi == 1).sum() == 12 and (chi == -1).sum() == 12


@pytest.mark.parametrize("n", [39, 43])
def test_goethals_seidel_sequences_are_reproduced_and_verified(n: int) -> None:
    # The cached sequences are what this project's search finds, and they satisfy Σ PAF(s) = 0 for s ≠ 0.
    assert had.find_gs_sequences(n) == had._GS_SEQUENCES[n]
    seqs = had.gs_sequences(n)
    assert seqs.shape == (4, n) and set(np.unique(seqs).tolist()) == {-1, 1}
    paf = had.periodic_autocorrelation(seqs).sum(axis=0)
    assert paf[0] == 4 * n and (paf[1:] == 0).all()


@pytest.mark.parametrize("n", [5, 7, 9, 13])
def test_gs_search_on_small_lengths(n: int) -> None:
    g, signs = had.find_gs_sequences(n)
    seqs = had._orbit_sequences(n, g, np.array(signs))
    assert (had.periodic_autocorrelation(seqs).sum(axis=0)[1:] == 0).all()


@pytest.mark.parametrize(
    ("n", "factor"),
    [(1, (1, 1)), (128, (1, 128)), (24, (12, 2)), (80, (40, 2)), (1280, (40, 32)), (5120, (40, 128)),
     (3584, (28, 128)), (19968, (156, 128)), (172 * 4, (172, 4)), (52, (52, 1))],
)  # fmt: skip
def test_hadamard_factor_prefers_larger_base(n: int, factor: tuple[int, int]) -> None:
    assert had.hadamard_factor(n) == factor
    assert had.supported_size(n)


@pytest.mark.parametrize("n", [3, 18944, 100, 4864, 0])
def test_unsupported_sizes_are_refused(n: int) -> None:
    assert not had.supported_size(n)
    with pytest.raises(ValueError):
        had.hadamard_matrix(n)


def test_padded_size() -> None:
    assert had.padded_size(18944) == 19968  # Qwen2-VL-7B intermediate size → 156·128 (spec §2.6)
    assert had.padded_size(3584) == 3584
    assert had.padded_size(100) == 104  # 52·2
    assert had.padded_size(4864) == 4992  # 4864 = 2^8·19 → 156·32
    for n in range(1, 700):
        p = had.padded_size(n)
        assert p >= n and had.supported_size(p)
        assert not any(had.supported_size(k) for k in range(n, p))


@pytest.mark.parametrize("n", [1, 2, 12, 40, 80, 112, 208, 240, 432, 560, 624, 688, 1024])
def test_hadamard_matrix_is_orthogonal_and_kron_convention(n: int) -> None:
    h = had.hadamard_matrix(n)
    assert h.dtype == np.float64
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    m, p = had.hadamard_factor(n)
    np.testing.assert_array_equal(np.rint(h * np.sqrt(n)), np.kron(had.base_matrix(m), had.sylvester(p)))
    np.testing.assert_allclose(h[:, 0], 1 / np.sqrt(n))


def test_sylvester_recursion() -> None:
    h4 = had.sylvester(4)
    np.testing.assert_array_equal(h4[:2, :2], [[1, 1], [1, -1]])
    np.testing.assert_array_equal(had.sylvester(8), np.block([[h4, h4], [h4, -h4]]))


@pytest.mark.parametrize("n", [1, 16, 12, 40, 1280, 156 * 4, 172 * 2, 28 * 8])
def test_fwht_matches_dense(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, 2, n))
    np.testing.assert_allclose(had.fwht(x, n), x @ had.hadamard_matrix(n), atol=1e-12)
    x32 = x.astype(np.float32)
    y32 = had.fwht(x32)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, x @ had.hadamard_matrix(n), atol=1e-4)


def test_fwht_rejects_wrong_width() -> None:
    with pytest.raises(ValueError):
        had.fwht(np.zeros((2, 12)), 24)


def test_random_hadamard_is_signed_rotation() -> None:
    r = had.random_hadamard(80, seed=42)
    np.testing.assert_allclose(r @ r.T, np.eye(80), atol=1e-12)
    signs = had.random_signs(80, seed=42)
    np.testing.assert_array_equal(r, signs[:, None] * had.hadamard_matrix(80))
    assert (signs == 1).any() and (signs == -1).any()
    np.testing.assert_array_equal(had.random_hadamard(80, seed=42), r)
    assert not np.array_equal(had.random_hadamard(80, seed=7), r)
    # Random signs remove the all-positive first column: no more √n·mean(x) outlier channel.
    assert not np.allclose(r[:, 0], r[0, 0])


def test_channel_zero_outlier_of_plain_hadamard() -> None:
    # Spec §2.7: for x with non-zero mean, channel 0 of x·H is √n·mean(x).
    x = np.random.default_rng(0).standard_normal(5120) + 0.3
    y = had.fwht(x)
    np.testing.assert_allclose(y[0], np.sqrt(5120) * x.mean(), rtol=1e-12)
    assert abs(y[0]) > np.abs(y[1:]).max()


@pytest.mark.parametrize("n", [12, 384, 1536])
def test_hadamard_signs_are_the_matrix_entries(n: int) -> None:
    signs = had.hadamard_signs(n)
    assert signs.dtype == np.int8
    np.testing.assert_array_equal(signs.astype(np.float64) / np.sqrt(n), had.hadamard_matrix(n))


def test_transpose_times_uses_the_fast_transform_above_the_dense_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    w = np.random.default_rng(3).standard_normal((640, 9)).astype(np.float32)  # 640 = 20·32
    dense = had.hadamard_matrix(640).T @ w.astype(np.float64)
    np.testing.assert_array_equal(had.hadamard_transpose_times(w), dense)  # at or below the limit: the dense product
    monkeypatch.setattr(had, "DENSE_TRANSFORM_MAX", 64)
    np.testing.assert_allclose(had.hadamard_transpose_times(w), dense, rtol=0, atol=1e-12)
