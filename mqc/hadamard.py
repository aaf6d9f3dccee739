"""Hadamard matrices of size m·2^k and the fast transform, for the rotations of spec §2.6 (QuaRot recipe, R1/R_v).

Every matrix here is built by this module's own code from textbook constructions; nothing is copied from QuaRot,
QuIP# or published tables. The convention is fixed, because the C++ online-Hadamard kernel implements the same:

    H_n = kron(H_m, H_{2^k}) / sqrt(n),   n = m·2^k,

with H_{2^k} the Sylvester matrix (H_1 = [1], H_2j = [[H, H], [H, -H]]) and H_m = ``base_matrix(m)``, a ±1 matrix in
normalised form (first row and first column all +1; this is what makes the online Hadamard put √n·mean(x) in
channel 0, the outlier that RMS of spec §2.7 removes).

Base sizes m and their constructions (``BASE_CONSTRUCTIONS``):

1. m = 1: [1].
2. Paley I, q ≡ 3 (mod 4) a prime power, order q + 1: 12 (q=11), 20 (q=19), 60 (q=59), 108 (q=107), 140 (q=139).
3. Paley II, q ≡ 1 (mod 4) a prime power, order 2(q + 1): 28 (q=13), 36 (q=17), 52 (q=25, arithmetic in GF(25)).
4. Sylvester doubling, order 2m: 40 = kron([[1, 1], [1, -1]], H_20) (no Paley route exists: 39 and 19 fail the
   congruence/prime-power conditions).
5. Goethals–Seidel array on four circulant ±1 sequences whose periodic autocorrelations sum to zero, order 4n:
   156 (n=39) and 172 (n=43). The sequences were found by ``find_gs_sequences`` (a meet-in-the-middle search
   over sequences that are constant on the orbits of a multiplicative subgroup of Z_n^*); the module stores the
   result as (generator, orbit signs) and the tests re-run the search and re-verify H·Hᵀ = n·I.

Rules: when several m fit a size (only 20 and 40 overlap), the larger m is used, as the released code's lookup
tries the 40-factor first (spec §2.6). Sizes with no supported factorisation are refused with ``ValueError``;
``padded_size`` gives the next supported size (e.g. 18944 → 19968 = 156·128, spec §2.6).
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np

#: Supported ±1 base sizes m (H_n exists for n = m·2^k, k ≥ 0).
BASE_SIZES: tuple[int, ...] = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)

#: How each base matrix is built: (construction, parameter).
BASE_CONSTRUCTIONS: dict[int, tuple[str, int]] = {
    1: ("unit", 1),
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    40: ("double", 20),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("goethals_seidel", 39),
    172: ("goethals_seidel", 43),
}

#: Goethals–Seidel sequences found by ``find_gs_sequences(n)``: n -> (generator g of the subgroup <g> ≤ Z_n^*,
#: signs of the four sequences on the <g>-orbits of Z_n, orbits ordered by their smallest element).
_GS_SEQUENCES: dict[int, tuple[int, tuple[tuple[int, ...], ...]]] = {
    39: (
        29,
        (
            (1, 1, 1, -1, -1, -1, -1, -1, 1, 1),
            (1, 1, -1, -1, 1, 1, -1, -1, -1, 1),
            (1, 1, 1, 1, 1, -1, -1, -1, -1, -1),
            (1, 1, 1, -1, -1, -1, 1, 1, -1, 1),
        ),
    ),
    43: (
        4,
        (
            (1, 1, -1, 1, -1, 1, -1),
            (1, 1, -1, 1, -1, -1, 1),
            (1, 1, -1, -1, 1, -1, -1),
            (1, -1, -1, 1, 1, 1, -1),
        ),
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Finite fields GF(p^e) for the Paley constructions (only the quadratic character is needed).


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, or None."""
    for p in range(2, q + 1):
        if q % p == 0:
            e, r = 0, q
            while r % p == 0:
                r //= p
                e += 1
            return (p, e) if r == 1 else None
    return None


def _irreducible_monic(p: int, e: int) -> list[int]:
    """Coefficients f_0..f_{e-1} of a monic irreducible x^e + Σ f_i x^i over GF(p); e ≤ 3 (root test suffices)."""
    if e == 1:
        return [0]
    if e > 3:
        raise ValueError(f"GF({p}^{e}) is not implemented (degree > 3)")
    for coeffs in itertools.product(range(p), repeat=e):
        if all((pow(x, e, p) + sum(c * pow(x, i, p) for i, c in enumerate(coeffs))) % p for x in range(p)):
            return list(coeffs)
    raise AssertionError("no irreducible polynomial found")  # unreachable: one always exists


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a − b) over GF(q), χ the quadratic character (0 at 0); elements indexed by base-p digits."""
    pe = _prime_power(q)
    if pe is None or pe[0] == 2:
        raise ValueError(f"{q} is not an odd prime power")
    p, e = pe
    digits = np.array([[(a // p**i) % p for i in range(e)] for a in range(q)], dtype=np.int64)  # [q, e]
    weights = p ** np.arange(e)
    f = _irreducible_monic(p, e)
    squares = set()
    for a in range(1, q):
        c = np.convolve(digits[a], digits[a])  # degree ≤ 2e − 2
        c = [int(v) for v in c] + [0] * max(0, e - len(c))
        for k in range(len(c) - 1, e - 1, -1):  # reduce x^k = -Σ f_i x^{k-e+i}
            lead, c[k] = c[k], 0
            for i, fi in enumerate(f):
                c[k - e + i] -= lead * fi
        squares.add(int(np.dot(np.mod(c[:e], p), weights)))
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    diff = np.mod(digits[:, None, :] - digits[None, :, :], p) @ weights  # index of a − b
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    """Paley I, q ≡ 3 (mod 4): H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew, order q + 1."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 mod 4, got {q}")
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Paley II, q ≡ 1 (mod 4): symmetric conference matrix C of order q + 1, H = C⊗[[1,1],[1,−1]] + I⊗[[1,−1],[−1,−1]]."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 mod 4, got {q}")
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


# ---------------------------------------------------------------------------------------------------------------
# Goethals–Seidel: four circulants A, B, C, D with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4n·I.


def _cyclic_subgroup(g: int, n: int) -> tuple[int, ...]:
    elems, x = [1], g % n
    while x != 1:
        elems.append(x)
        x = x * g % n
    return tuple(sorted(elems))


def _orbits(subgroup: tuple[int, ...], n: int) -> list[list[int]]:
    """Orbits of Z_n under multiplication by the subgroup, ordered by their smallest element."""
    seen: set[int] = set()
    out = []
    for x in range(n):
        if x not in seen:
            orbit = sorted({x * h % n for h in subgroup})
            seen.update(orbit)
            out.append(orbit)
    return out


def periodic_autocorrelation(seqs: np.ndarray) -> np.ndarray:
    """PAF_X(s) = Σ_i x_i x_{i+s mod n} for each row of ``seqs`` [..., n] (exact integers)."""
    x = np.asarray(seqs, dtype=np.int64)
    n = x.shape[-1]
    return np.stack([np.sum(x * np.roll(x, -s, axis=-1), axis=-1) for s in range(n)], axis=-1)


def _orbit_sequences(n: int, generator: int, signs: np.ndarray) -> np.ndarray:
    """Expand per-orbit signs [..., r] into ±1 sequences [..., n]."""
    orbits = _orbits(_cyclic_subgroup(generator, n), n)
    member = np.zeros((len(orbits), n), dtype=np.int64)
    for j, orbit in enumerate(orbits):
        member[j, orbit] = 1
    return np.asarray(signs, dtype=np.int64) @ member


def find_gs_sequences(n: int, max_orbits: int = 12) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """Search four ±1 sequences of odd length n whose periodic autocorrelations sum to zero at every shift s ≠ 0.

    The search restricts each sequence to be constant on the orbits of a cyclic subgroup <g> ≤ Z_n^* (then the
    autocorrelation is constant on the orbits of shifts too, so there are few constraints), keeps sequences whose
    power spectrum is ≤ 4n everywhere, and matches pairs (A, B) against pairs (C, D) with PAF_A + PAF_B =
    −(PAF_C + PAF_D) by hashing (meet in the middle). Subgroups are tried largest first, g ascending. Deterministic.
    Returns (g, signs per orbit of the four sequences); raises ``ValueError`` when no subgroup yields a solution.
    """
    if n % 2 == 0 or n < 3:
        raise ValueError(f"n must be odd and ≥ 3, got {n}")
    groups: dict[tuple[int, ...], int] = {}
    for g in range(2, n):
        if math.gcd(g, n) == 1:
            groups.setdefault(_cyclic_subgroup(g, n), g)
    for subgroup, g in sorted(groups.items(), key=lambda kv: (-len(kv[0]), kv[1])):
        orbits = _orbits(subgroup, n)
        r = len(orbits)
        if r > max_orbits:
            continue
        signs = np.array(list(itertools.product([1, -1], repeat=r)), dtype=np.int64)  # [2^r, r]
        seqs = _orbit_sequences(n, g, signs)
        psd = np.abs(np.fft.fft(seqs, axis=-1)) ** 2
        keep = np.all(psd <= 4 * n + 1e-6, axis=1)
        signs, seqs = signs[keep], seqs[keep]
        reps = [orbit[0] for orbit in orbits if orbit[0] != 0]
        paf = periodic_autocorrelation(seqs)[:, reps]  # constraints: one per shift orbit
        i, j = np.triu_indices(len(seqs))
        pair = (paf[i] + paf[j]).astype(np.int64)
        mult = np.random.default_rng(12345).integers(1, 2**40, size=pair.shape[1], dtype=np.int64)
        key_pos = pair @ mult
        key_neg = -key_pos
        _, ia, ib = np.intersect1d(key_pos, key_neg, return_indices=True)
        for a, b in zip(ia, ib, strict=True):
            if np.array_equal(pair[a], -pair[b]):
                found = np.stack([signs[i[a]], signs[j[a]], signs[i[b]], signs[j[b]]])
                return g, tuple(tuple(int(v) for v in row) for row in found)
    raise ValueError(f"no Goethals–Seidel sequences of length {n} found with ≤ {max_orbits} orbits")


def gs_sequences(n: int) -> np.ndarray:
    """The four ±1 sequences [4, n] used for order 4n (cached search result; searched if not cached)."""
    g, signs = _GS_SEQUENCES[n] if n in _GS_SEQUENCES else find_gs_sequences(n)
    return _orbit_sequences(n, g, np.array(signs))


def _circulant(a: np.ndarray) -> np.ndarray:
    """C[i, j] = a[(j − i) mod n]."""
    n = len(a)
    return a[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def _goethals_seidel(n: int) -> np.ndarray:
    """Goethals–Seidel array of order 4n from circulants A, B, C, D and the back-identity R."""
    a, b, c, d = (_circulant(s) for s in gs_sequences(n))
    r = np.eye(n, dtype=np.int64)[::-1]
    return np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# Public API.


def _normalise(h: np.ndarray) -> np.ndarray:
    """Flip row and column signs so the first row and first column are all +1."""
    h = h * h[:, :1]  # first column → +1
    return h * h[:1, :]  # first row → +1 (h[0, 0] is +1 now)


@cache
def _base_matrix_cached(m: int) -> np.ndarray:
    kind, param = BASE_CONSTRUCTIONS[m]
    if kind == "unit":
        h = np.ones((1, 1), dtype=np.int64)
    elif kind == "paley1":
        h = _paley1(param)
    elif kind == "paley2":
        h = _paley2(param)
    elif kind == "double":
        h = np.kron(np.array([[1, 1], [1, -1]], dtype=np.int64), _base_matrix_cached(param))
    else:
        h = _goethals_seidel(param)
    h = _normalise(h)
    h.setflags(write=False)
    return h


def base_matrix(m: int) -> np.ndarray:
    """The ±1 Hadamard matrix H_m (int64, normalised form) for a supported base size m; H_m·H_mᵀ = m·I."""
    if m not in BASE_CONSTRUCTIONS:
        raise ValueError(f"no base Hadamard matrix of size {m}; supported: {BASE_SIZES}")
    return _base_matrix_cached(m).copy()


def hadamard_factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k, m a supported base size; the largest such m wins (40 over 20, spec §2.6)."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    for m in sorted(BASE_SIZES, reverse=True):
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    raise ValueError(
        f"no Hadamard matrix of size {n}: it is not m·2^k with m in {BASE_SIZES}; pad to {padded_size(n)}"
    )


def supported_size(n: int) -> bool:
    """True when ``hadamard_matrix(n)`` exists."""
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


def padded_size(n: int) -> int:
    """Smallest supported size ≥ n (the intermediate size the MLP is zero-padded to, spec §2.6)."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    best = None
    for m in BASE_SIZES:
        p = 1
        while m * p < n:
            p *= 2
        best = m * p if best is None else min(best, m * p)
    assert best is not None
    return best


def sylvester(p: int) -> np.ndarray:
    """±1 Sylvester matrix of size p = 2^k (int64)."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester size must be a power of two, got {p}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_signs(n: int) -> np.ndarray:
    """The ±1 entries of H_n, i.e. kron(H_m, H_{2^k}), as int8 [n, n] (400 MB at n = 19,968, where int64 is 3.2 GB)."""
    m, p = hadamard_factor(n)
    return np.kron(_base_matrix_cached(m).astype(np.int8), sylvester(p).astype(np.int8))


def hadamard_matrix(n: int) -> np.ndarray:
    """Normalised orthogonal H_n = kron(H_m, H_{2^k}) / sqrt(n), float64 [n, n]. Dense: prefer ``fwht`` for big n."""
    return hadamard_signs(n).astype(np.float64) / math.sqrt(n)


#: Largest n for which :func:`hadamard_transpose_times` multiplies by the dense H_n. Above it the fast transform is
#: used: a dense float64 H is 3.2 GB at 7B's padded 19,968 and the product costs 2n²·N flops instead of about
#: 2n·(log n + m)·N. At and below it the dense product stays, so compiles of smaller models keep their bytes.
DENSE_TRANSFORM_MAX = 4096


def hadamard_transpose_times(weight: np.ndarray) -> np.ndarray:
    """H_nᵀ·W in float64 for W [n, N] (the online Hadamard's inverse folded into the weight after it)."""
    weight = np.asarray(weight, dtype=np.float64)  # no copy of a float64 weight (fwht makes its own)
    n = weight.shape[0]
    if n <= DENSE_TRANSFORM_MAX:
        return hadamard_matrix(n).T @ weight
    return fwht(weight.T).T  # (Wᵀ·H)ᵀ


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """R = diag(random ±1)·H_n, the randomised rotation R1 / R_v of spec §2.6 (orthogonal, float64)."""
    return random_signs(n, seed)[:, None] * hadamard_matrix(n)


def random_signs(n: int, seed: int) -> np.ndarray:
    """The ±1 diagonal of ``random_hadamard(n, seed)`` (float64 [n])."""
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)


def fwht(x: np.ndarray, n: int | None = None) -> np.ndarray:
    """x @ H_n over the last axis without forming H_n: FWHT over the 2^k axis of x viewed as [..., m, 2^k], then H_mᵀ
    over the m axis, then 1/sqrt(n). O(n·(log n + m)) per row; keeps a floating dtype (float64 otherwise)."""
    x = np.asarray(x)
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"last axis is {x.shape[-1]}, expected {n}")
    m, p = hadamard_factor(n)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    lead = x.shape[:-1]
    y = np.array(x, dtype=dtype).reshape(-1, m, p)
    h = 1
    while h < p:  # butterflies: [a, b] -> [a + b, a − b] on blocks of 2h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        top, bot = y[..., 0, :], y[..., 1, :]
        y = np.stack([top + bot, top - bot], axis=-2).reshape(-1, m, p)
        h *= 2
    if m > 1:
        y = np.einsum("tap,ac->tcp", y, _base_matrix_cached(m).astype(dtype))
    return (y * dtype.type(1.0 / math.sqrt(n))).reshape(*lead, n)
