"""GPTQ weight quantization with Hessian-based error feedback, as MQuant quantizes every linear (spec §2.6).

Layout: the ONNX MatMul operand W [K = in, N = out], y = x @ W. GPTQ minimises ‖X W − X Ŵ‖_F² one input row of W at a
time: row i is rounded, and its error, scaled by the inverse-Hessian row, is pushed onto the rows not yet quantized.
H = 2/n · Σ xᵀx is the Hessian of that loss (``HessianAccumulator``).

Rules, in the order ``gptq_quantize`` applies them:

1. Dead inputs: rows whose Hessian diagonal is 0 (the input never fires) get H_ii = 1 and W_i = 0, so they cost
   nothing and cannot make H singular.
2. Scales are fixed up front from the (dead-row-zeroed) weight: symmetric, one per output channel (or per
   (group, channel) with ``group_size``: static groups of consecutive original rows, which keeps act-order
   compatible with the ``QuantizedWeight`` layout), optionally shrunk by ``mse_clip_ratios`` (spec §2.6: 100 steps
   down to 0.2×absmax, L_2.4).
3. act_order: rows are processed in decreasing order of H_ii; the result is permuted back.
4. Damping: H += percdamp · mean(diag H) · I (spec §2.6: percdamp = 0.01).
5. U = upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U); refused with ``ValueError`` if H is not positive definite
   after damping.
6. Blockwise propagation (block_size rows): inside a block each row's error e_i = (w_i − q_i)/U_ii updates the
   remaining rows of the block by U_{i, j>i} ⊗ e_i; after the block the accumulated errors update all later rows at
   once (a single matmul), which is mathematically the same as row-by-row propagation.

7. ``refit_scales`` (optional, after the loop): with the codes fixed, the scales that minimise the output error
   solve a small least-squares problem per output channel; GPTQ may then run again under the fitted scales.

All arithmetic is float64; the integer weight uses ``mqc.quantizer.quantize`` (round half to even, clamp).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mqc.quantizer import QuantizedWeight, qrange, quantize, weight_scales

if TYPE_CHECKING:
    from mqc.calibration import TapStats


class HessianAccumulator:
    """Streaming H = 2/n · Σ_t x_tᵀ x_t over calibration rows, in float64 with O(K²) memory (spec §2.6)."""

    def __init__(self, k: int, chunk_rows: int = 8192) -> None:
        if k < 1:
            raise ValueError(f"input size must be positive, got {k}")
        self.k = k
        self.chunk_rows = chunk_rows
        self._sum = np.zeros((k, k), dtype=np.float64)
        self.num_rows = 0

    def update(self, rows: np.ndarray) -> None:
        """Add activation rows [..., K] (any leading shape; e.g. [batch, tokens, K])."""
        x = np.asarray(rows)
        if x.shape[-1] != self.k:
            raise ValueError(f"rows have {x.shape[-1]} features, expected {self.k}")
        x = x.reshape(-1, self.k)
        for start in range(0, x.shape[0], self.chunk_rows):  # bounded float64 temporaries
            chunk = x[start : start + self.chunk_rows].astype(np.float64)
            self._sum += chunk.T @ chunk
        self.num_rows += x.shape[0]

    def hessian(self) -> np.ndarray:
        """2/n · Σ xᵀx (a copy); zeros before any update."""
        if self.num_rows == 0:
            return np.zeros_like(self._sum)
        return self._sum * (2.0 / self.num_rows)


class GPTQResult(NamedTuple):
    """What ``gptq_quantize`` returns; unpacks as ``(quantized, rel_error)``."""

    quantized: QuantizedWeight
    #: sqrt(tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)) = ‖X(W − Ŵ)‖_F / ‖X W‖_F on the calibration rows (undamped H).
    rel_error: float


def relative_output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """‖X(W − Ŵ)‖_F / ‖X W‖_F computed through H ∝ XᵀX (0 when both are 0)."""
    w = np.asarray(weight, dtype=np.float64)
    d = w - np.asarray(approx, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    num = float(np.sum(d * (h @ d)))  # trace(dᵀ H d) through one BLAS matmul, not a K·K·N einsum loop
    den = float(np.sum(w * (h @ w)))
    if den <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return float(np.sqrt(max(num, 0.0) / den))


class HessianFactor(NamedTuple):
    """What GPTQ needs from one Hessian (rules 1, 3-5), computed once and shared by every linear reading the same
    input (q/k/v, gate/up): the dead rows, the act-order permutation and U, the upper Cholesky factor of H⁻¹."""

    dead: np.ndarray
    perm: np.ndarray
    u: np.ndarray


def factor_hessian(hessian: np.ndarray, act_order: bool = True, percdamp: float = 0.01) -> HessianFactor:
    """Rules 1 and 3-5 on H [K, K]; ``ValueError`` when H is not positive definite after damping.

    The factor of the last Hessian is kept (:class:`_LastFactor`): the linears reading one input reach GPTQ one
    after the other with equal Hessians, and the factorization is the costliest step for wide inputs.
    """
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be square, got {h.shape}")
    if percdamp < 0:
        raise ValueError("percdamp must be ≥ 0")
    return _LAST_FACTOR.get(h, act_order, percdamp)


#: Hessians from this size up are factored in place (:func:`_factor_in_place`): 11,586 inputs and wider, such as
#: 7B's padded down_proj (K = 19,968, 3.2 GB per K×K float64 array).
IN_PLACE_BYTES = 1 << 30


def factors_in_place(k: int) -> bool:
    """True when a K×K Hessian is factored in place (:data:`IN_PLACE_BYTES`)."""
    return 8 * k * k >= IN_PLACE_BYTES


def _factor(hessian: np.ndarray, act_order: bool, percdamp: float) -> HessianFactor:
    """The factor of H. Below :data:`IN_PLACE_BYTES` through numpy, holding at most four K×K float64 arrays besides
    ``hessian`` (each intermediate is dropped as soon as the next is computed); from it up in one array."""
    k = hessian.shape[0]
    diagonal = np.diag(hessian).copy()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    perm = np.argsort(-diagonal, kind="stable") if act_order else np.arange(k)
    in_place = factors_in_place(k)
    order = perm[::-1] if in_place else perm  # the in-place route factors the reversed matrix (its docstring)
    h = hessian[np.ix_(order, order)]  # the private copy, permuted (fancy indexing copies)
    on_diagonal = np.diag_indices(k)
    h[on_diagonal] = diagonal[order]  # dead inputs' H_ii = 1
    h[on_diagonal] += percdamp * float(np.mean(np.diag(h)))
    try:
        if in_place:
            u = _factor_in_place(h)
        else:
            lower = np.linalg.cholesky(h)
            del h
            lower_inv = np.linalg.inv(lower)  # H⁻¹ = L⁻ᵀ L⁻¹; inv is solve(L, I): LAPACK gesv with identity
            del lower
            product = lower_inv.T @ lower_inv
            del lower_inv
            u = np.linalg.cholesky(product).T  # H⁻¹ = Uᵀ U, U upper
    except np.linalg.LinAlgError as exc:
        raise ValueError("Hessian is not positive definite after damping; increase percdamp") from exc
    for array in (dead, perm, u):
        array.flags.writeable = False  # shared by every later caller with an equal Hessian
    return HessianFactor(dead, perm, u)


def _factor_in_place(reversed_h: np.ndarray) -> np.ndarray:
    """U (upper, H⁻¹ = Uᵀ U) in the memory of ``reversed_h`` = J H J (J reverses the order), with two LAPACK calls
    and no inverse of H: potrf gives J H J = L Lᵀ, so H = V Vᵀ with V = J L J upper, and U = V⁻¹ = J L⁻¹ J; trtri
    inverts L in place. 2K³/3 flops (the numpy chain does about 5K³) in one K×K array instead of four; the rounding
    differs from the numpy chain, which is why smaller Hessians keep that one (their compiles keep their bytes).
    Returns a reversed view of the array. Raises ``LinAlgError`` when H is not positive definite."""
    from scipy.linalg import lapack

    a = reversed_h.T  # Fortran-ordered view of the same memory (the matrix is symmetric): LAPACK works in place
    lower, info = lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1)
    if info != 0 or not np.shares_memory(lower, reversed_h):
        raise np.linalg.LinAlgError(f"LAPACK potrf failed (info {info}) or did not work in place")
    lower_inv, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0 or not np.shares_memory(lower_inv, reversed_h):
        raise np.linalg.LinAlgError(f"LAPACK trtri failed (info {info}) or did not work in place")
    return lower_inv[::-1, ::-1]  # J L⁻¹ J: upper triangular


class _LastFactor:
    """The factor of the most recent Hessian, returned again for a Hessian equal in content (and settings).

    The Hessian is remembered by a digest of its bytes, not a copy. A factor above ``max_bytes`` is not kept past
    its call: 7B's padded down_proj factor (3.2 GB) would otherwise stay resident while the next block calibrates.
    The entry is one tuple, read and replaced whole, so jobs on several threads (``LocalExecutor.map``) never pair
    one Hessian with another's factor."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._last: tuple[tuple, HessianFactor] | None = None

    @staticmethod
    def _digest(hessian: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(hessian).data, digest_size=32).digest()

    def get(self, hessian: np.ndarray, act_order: bool, percdamp: float) -> HessianFactor:
        key = (hessian.shape, act_order, percdamp, self._digest(hessian))
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        factor = _factor(hessian, act_order, percdamp)
        self._last = (key, factor) if factor.u.nbytes <= self.max_bytes else None
        return factor


_LAST_FACTOR = _LastFactor()


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int | None = None,
    act_order: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    mse_clip: bool = True,
    scale: np.ndarray | None = None,
) -> GPTQResult:
    """Quantize W [K, N] with GPTQ against H [K, K] (see the module docstring for the rules). Spec §2.6."""
    scales = None if scale is None else [scale]
    return gptq_quantize_readers([weight], hessian, bits, group_size, act_order, percdamp, block_size, mse_clip,
                                 scales)[0]


def gptq_quantize_readers(
    weights: Sequence[np.ndarray],
    hessian: np.ndarray,
    bits: int,
    group_size: int | None = None,
    act_order: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    mse_clip: bool = True,
    scales: Sequence[np.ndarray] | None = None,
    group_scales: str = "static",
) -> list[GPTQResult]:
    """:func:`gptq_quantize` of several weights that read one input (one Hessian), each exactly as alone.

    H is factored once; the row loop of rule 6 runs once over the weights side by side (every step is per column,
    so each weight's columns see the same operations as alone), and each weight's block update is its own matmul
    of the shape it has alone.

    ``group_scales="dynamic"`` (groups, no act-order; GPTQ's reference loop): each group's scales are searched when
    the loop reaches the group, on its rows as the error feedback has updated them, instead of up front on the
    original weight (rule 2); ``scales`` is then not used.
    """
    shapes = [np.shape(w) for w in weights]
    if not shapes or any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"weights must be [K, N], got shapes {shapes}")
    k = shapes[0][0]
    if any(shape[0] != k for shape in shapes):
        raise ValueError(f"weights read one input: all need {k} rows, got {shapes}")
    h_orig = np.asarray(hessian, dtype=np.float64)
    if h_orig.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {h_orig.shape}")
    if group_size is not None and (group_size < 1 or k % group_size):
        raise ValueError(f"input size {k} is not a multiple of group size {group_size}")
    if percdamp < 0 or block_size < 1:
        raise ValueError("percdamp must be ≥ 0 and block_size ≥ 1")
    qrange(bits)  # validates the bit width
    dynamic = group_scales == "dynamic"
    if dynamic and (group_size is None or act_order or block_size % group_size):
        raise ValueError("dynamic group scales need a group size that divides block_size and act_order off")
    dead, perm, u = factor_hessian(h_orig, act_order, percdamp)  # before the float64 weights: the factor peaks
    w_origs = [np.asarray(w, dtype=np.float64) for w in weights]

    # Rules 1-2 per weight: dead rows zeroed, fixed scales expanded to one scale row per input row.
    columns = np.cumsum([0, *(w.shape[1] for w in w_origs)])
    w = np.concatenate(w_origs, axis=1)
    w[dead, :] = 0.0
    if dynamic:  # filled group by group in the row loop
        scales = [np.zeros((k // group_size, c1 - c0), np.float32) for c0, c1 in itertools.pairwise(columns)]
    elif scales is None:  # a caller that also needs the RTN baseline passes the scales it searched once
        scales = [weight_scales(w[:, c0:c1].astype(np.float32), bits, group_size, mse_clip)
                  for c0, c1 in itertools.pairwise(columns)]  # float32 [G, N] each
    row_scale = np.concatenate([np.repeat(sc, k if group_size is None else group_size, axis=0) for sc in scales],
                               axis=1).astype(np.float64)  # [K, sum N]

    # Rule 3: act-order permutation.
    w = w[perm]
    row_scale = row_scale[perm]

    # Rule 6: blockwise error propagation.
    q_int = np.zeros(w.shape, dtype=np.int8 if bits <= 8 else np.int16)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = w[b0:b1].copy()
        err = np.zeros_like(block)
        u_blk = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if dynamic and i % group_size == 0:  # the group's scales from its rows as updated so far
                group = (b0 + i) // group_size
                for c, (c0, c1) in enumerate(itertools.pairwise(columns)):
                    scales[c][group] = weight_scales(block[i : i + group_size, c0:c1].astype(np.float32), bits,
                                                     group_size, mse_clip)[0]
                    row_scale[b0 + i : b0 + i + group_size, c0:c1] = scales[c][group]
            row = block[i]
            qi = quantize(row, row_scale[b0 + i], bits)
            q_int[b0 + i] = qi
            e = (row - qi.astype(np.float64) * row_scale[b0 + i]) / u_blk[i, i]
            block[i:] -= np.outer(u_blk[i, i:], e)
            err[i] = e
        for c0, c1 in itertools.pairwise(columns):
            w[b1:, c0:c1] -= u[b0:b1, b1:].T @ np.ascontiguousarray(err[:, c0:c1])

    q_int = q_int[np.argsort(perm)]
    results = []
    for (c0, c1), w_orig, scale in zip(itertools.pairwise(columns), w_origs, scales, strict=True):
        quantized = QuantizedWeight(q=np.ascontiguousarray(q_int[:, c0:c1]),
                                    scale=scale if group_size is not None else scale[0], bits=bits,
                                    group_size=group_size)
        results.append(GPTQResult(quantized, relative_output_error(w_orig, quantized.dequantize(), h_orig)))
    return results


def refit_scales(weight: np.ndarray, quantized: QuantizedWeight, hessian: np.ndarray) -> QuantizedWeight:
    """Rule 7: the scales that minimise ‖X(W − Ŵ)‖_F for GPTQ's integer codes, per output channel.

    With the codes q fixed, Ŵ[:, o] = Σ_g s[g, o]·q_g[:, o] is linear in the channel's G group scales, so the best
    scales solve the G×G normal equations (q_gᵀ H q_h) s = q_gᵀ H w. GPTQ fixes its scales before choosing the codes;
    this step gives the scales back their freedom afterwards and cannot raise the error on the calibration rows.
    A tiny ridge towards the old scales keeps all-zero groups at their scale; a scale that would turn non-positive
    keeps its old value (the runtime kernels take positive scales).
    """
    w = np.asarray(weight, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    q = quantized.q.astype(np.float64)
    k, n = q.shape
    g = k if quantized.group_size is None else quantized.group_size
    groups = k // g
    old = np.asarray(quantized.scale, dtype=np.float64).reshape(groups, n)
    normal = np.empty((n, groups, groups))
    for j in range(groups):  # H q_j, column by column of groups: K·K·N multiply-adds in all
        hq = h[:, j * g:(j + 1) * g] @ q[j * g:(j + 1) * g]
        normal[:, :, j] = (q * hq).reshape(groups, g, n).sum(axis=1).T
    rhs = (q * (h @ w)).reshape(groups, g, n).sum(axis=1).T  # [N, G]
    diag = np.einsum("ngg->ng", normal)
    ridge = 1e-9 * (diag + diag.mean(axis=1, keepdims=True) + 1e-30)
    normal[:, np.arange(groups), np.arange(groups)] += ridge
    fitted = np.linalg.solve(normal, (rhs + ridge * old.T)[..., None])[..., 0].T  # [G, N]
    fitted = np.where(fitted > 0, fitted, old).astype(np.float32)
    scale = fitted if quantized.group_size is not None else fitted[0]
    candidate = QuantizedWeight(q=quantized.q, scale=scale, bits=quantized.bits, group_size=quantized.group_size)
    before = relative_output_error(w, quantized.dequantize(), h)
    return candidate if relative_output_error(w, candidate.dequantize(), h) <= before else quantized


def hessian_from_tap(tap: TapStats, modalities: Iterable[int] | None = None) -> tuple[np.ndarray | None, int]:
    """GPTQ's H = 2/n · Σ xᵀx from the Gram matrices of ``tap`` (of ``modalities`` only, when given), and n."""
    wanted = set(tap.by_modality) if modalities is None else set(modalities)
    entries = [s for m, s in tap.by_modality.items() if m in wanted and s.gram is not None]
    grams = [s.gram for s in entries if s.rows > 0]
    rows = sum(s.rows for s in entries)
    if not grams or rows == 0:
        return None, 0
    if len(grams) == 1:  # no stacked copy of a K×K Gram matrix (2.9 GB for 7B's down_proj)
        return grams[0] * (2.0 / rows), rows
    total = grams[0] + grams[1]  # summed in order, as np.sum over the stacked matrices does
    for gram in grams[2:]:
        total += gram
    total *= 2.0 / rows
    return total, rows
