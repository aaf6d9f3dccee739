"""Whitened low-rank compensation, the math of MASQuant's CMC (spec §3.5, Eqs. 22–28, Theorem 2).

A non-text modality m needs the weight S_m·W but only the text-smoothed quantized weight B = Q(S_t·W) is stored; the
residual ΔW = S_m·W − B acts on A = X_m·S_m⁻¹ (Eq. 22). With the Gram matrix C = AᵀA = P Λ Pᵀ, the whitening
T = Λ^{1/2} Pᵀ satisfies Tᵀ T = C (Eq. 23), and by Theorem 2 the best rank-r correction in the data norm is

    L* = argmin_{rank L ≤ r} ‖A(ΔW − L)‖_F² = T⁻¹ · Trunc_r(T ΔW),  with minimum Σ_{i>r} σ_i²(T ΔW),

stored as L1 = T⁻¹ U_r ∈ R^{K×r}, L2 = Σ_r V_rᵀ ∈ R^{r×N} (Eqs. 24–25). ``whiten=False`` is the paper's ablation
(plain truncated SVD of ΔW, i.e. T = I).

Rules:
1. Everything is float64; the Gram matrix is symmetrised and its tiny negative eigenvalues (round-off) clipped to 0.
2. Singular Gram matrices (A without full column rank, e.g. dead channels or fewer tokens than channels): the
   eigen-directions with λ ≤ rtol·λ_max are dropped, T gets zero rows there and T⁻¹ is the pseudo-inverse. Theorem 2
   still holds exactly: T·L ranges over every rank-r matrix in range(T), which contains T·ΔW.
3. Optional damping λ ← λ + damp·mean(λ) (the released code has none: plain inverse).
4. The rank is clamped to min(K, N); ``rank_for`` turns a ratio into a rank with a floor (32 in the public code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def whitening(gram: np.ndarray, damp: float = 0.0, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """(T, T⁻¹) with T = Λ^{1/2} Pᵀ from C = P Λ Pᵀ (Eq. 23); T⁻¹ is the pseudo-inverse when C is singular (rule 2)."""
    c = np.asarray(gram, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"gram must be square, got shape {c.shape}")
    if damp < 0 or rtol < 0:
        raise ValueError("damp and rtol must be ≥ 0")
    lam, p = np.linalg.eigh(0.5 * (c + c.T))
    lam = np.clip(lam, 0.0, None)
    if damp > 0:
        lam = lam + damp * float(lam.mean())
    top = float(lam.max()) if lam.size else 0.0
    keep = lam > rtol * top if top > 0 else np.zeros_like(lam, dtype=bool)
    root = np.sqrt(lam)
    inv_root = np.zeros_like(root)
    inv_root[keep] = 1.0 / root[keep]
    root[~keep] = 0.0
    return root[:, None] * p.T, p * inv_root[None, :]


@dataclass(frozen=True)
class LowRankInfo:
    """Figures of one decomposition, for the compile report."""

    rank: int
    whitened: bool
    #: Singular values of T·ΔW (or of ΔW when not whitened), descending.
    singular_values: np.ndarray
    #: Σ_{i>r} σ_i²: with whitening, exactly the calibration loss ‖A(ΔW − L1 L2)‖_F² (Theorem 2); without, ‖ΔW − L1 L2‖_F².
    residual: float
    #: Σ_i σ_i² (the loss with no compensation, in the same norm).
    total: float

    @property
    def retained(self) -> float:
        """Fraction of the energy the factors capture, 1 − residual / total (1 when there is nothing to capture)."""
        return 1.0 - self.residual / self.total if self.total > 0 else 1.0


def lowrank_compensation(
    delta_w: np.ndarray,
    gram: np.ndarray | None,
    rank: int,
    whiten: bool = True,
    damp: float = 0.0,
    rtol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray, LowRankInfo]:
    """(L1 [K, r], L2 [r, N], info) with ΔW ≈ L1 L2 minimising ‖A(ΔW − L1 L2)‖_F (Theorem 2, Eqs. 24–25).

    ``gram`` = AᵀA of the modality's smoothed activations (any positive scale: the factors do not depend on it);
    ignored when ``whiten`` is False.
    """
    dw = np.asarray(delta_w, dtype=np.float64)
    if dw.ndim != 2:
        raise ValueError(f"delta_w must be [K, N], got shape {dw.shape}")
    if rank < 0:
        raise ValueError(f"rank must be ≥ 0, got {rank}")
    k = dw.shape[0]
    if not whiten:
        return truncated(dw, None, None, rank)
    if gram is None:
        raise ValueError("whitening needs the Gram matrix")
    if np.shape(gram) != (k, k):
        raise ValueError(f"gram must be [{k}, {k}], got {np.shape(gram)}")
    return truncated(dw, *whitening(gram, damp=damp, rtol=rtol), rank)


def truncated(dw: np.ndarray, t: np.ndarray | None, t_inv: np.ndarray | None,
              rank: int) -> tuple[np.ndarray, np.ndarray, LowRankInfo]:
    """Theorem 2's factors of ``dw`` [K, N] for a whitening (T, T⁻¹) computed once (several weights reading one
    input share it), or the plain truncated SVD when ``t`` is None."""
    target = dw if t is None else t @ dw
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    r = min(rank, s.size)
    l1 = u[:, :r] if t_inv is None else t_inv @ u[:, :r]
    l2 = s[:r, None] * vt[:r]
    energy = s**2
    info = LowRankInfo(
        rank=r,
        whitened=t is not None,
        singular_values=s,
        residual=float(energy[r:].sum()),
        total=float(energy.sum()),
    )
    return l1, l2, info


def rank_for(ratio: float, k: int, n: int, min_rank: int = 32) -> int:
    """Rank from ``ratio``: a fraction (≤ 1) of min(K, N), floored, or an absolute rank (> 1), as the public code's
    ``--rank``; then at least ``min_rank`` (the public code's floor is 32) and at most min(K, N)."""
    if ratio <= 0:
        raise ValueError(f"rank ratio must be positive, got {ratio}")
    full = min(k, n)
    r = int(np.floor(ratio * full)) if ratio <= 1 else int(ratio)
    return max(0, min(max(r, min_rank), full))


def effective_rank(matrix: np.ndarray) -> float:
    """exp(entropy of the singular values normalised to sum 1) / min(K, N), in (0, 1] (spec §3.5, Fig. 5); 0 for 0."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"need a non-empty matrix, got shape {m.shape}")
    s = np.linalg.svd(m, compute_uv=False)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))) / min(m.shape))
