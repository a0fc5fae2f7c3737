"""The other standard questions about an update (docs/METHOD.md, "The other standard questions about an
update"): energy rank, stable rank, the amplification factor, subspace overlap, rescale vs rotate, and
two fine-tunes against each other.  Pure: tensors in, numbers out; every number from SVDs a comparison
already computes, or from r x r cores for an adapter (dW is never formed for one).

Undefined numbers are None (never NaN or inf): the stable rank and the amplification of dW = 0, a
subspace overlap without vectors, the rescale ratio against a zero base singular value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lorascale.numerics.operators import Dense, LowRankUpdate
from lorascale.numerics.svd import svdvals
from lorascale.numerics.topk import ANGLE_TOLERANCE, top_singular

Operator = Dense | LowRankUpdate
# Subspace angle (sin) the Krylov top-r vectors of a full fine-tune's dW are held to before amplification uses
# them (or the dtype's floor); where that is not reached, the amplification is null (see _top_subspace).
SUBSPACE_TOLERANCE = ANGLE_TOLERANCE
SUBSPACE_GAP = 1e-3  # (s_r - s_{r+1}) / s_1 below which dW's top-r subspace counts as undetermined
SUBSPACE_BLOCKS = 8  # Krylov blocks tried for it (each: two products of dW with r + 16 columns)


@dataclass(frozen=True)
class UpdateSpectrum:
    """dW's singular values and its amplification factor (Hu et al., 7.3)."""

    s: torch.Tensor  # every singular value of dW, descending: r of them for an adapter, min(m, n) otherwise
    amplification: float | None  # None: dW = 0, W0 vanishes on dW's top subspace, or that is undetermined
    amplification_rank: int  # the r of U_r, V_r: the adapter's rank, or the run's amplification_rank
    tuned_fro_squared: float | None = None  # ||W||_F^2 where computed on the way (an adapter's, from its factors)


@dataclass(frozen=True)
class UpdateMeasures:
    """The per-matrix columns of issue 25 for one tuned model (store/schema.py MATRICES, named alike)."""

    delta_rank_90: int
    delta_rank_99: int
    base_rank_90: int
    delta_stable_rank: float | None
    tuned_stable_rank: float | None
    amplification: float | None
    amplification_rank: int | None
    subspace_overlap: float | None  # left vectors: phi(top-k of W, top-k of W0); None without the left side
    subspace_overlap_right: float | None  # right vectors, where the run computed them

    def columns(self) -> dict[str, object]:
        return dict(self.__dict__)


def energy_rank(singular_values: torch.Tensor | np.ndarray, fraction: float) -> int:
    """The smallest k with sum_{i<k} s_i^2 >= fraction * sum_i s_i^2 (0 for a zero matrix).

    >>> energy_rank(np.array([3.0, 1.0]), 0.9)
    1
    """
    s = np.sort(np.abs(np.asarray(torch.as_tensor(singular_values).detach().cpu().double())))[::-1]
    energy = np.cumsum(s * s)
    if energy.size == 0 or energy[-1] <= 0.0:
        return 0
    return int(min(np.searchsorted(energy, fraction * energy[-1], side="left") + 1, energy.size))


def stable_rank(fro_squared: float, top: float) -> float | None:
    """||X||_F^2 / s_1(X)^2; None for X = 0 (undefined)."""
    if not top > 0.0 or not math.isfinite(fro_squared):
        return None
    value = fro_squared / (top * top)
    return value if math.isfinite(value) else None


def tuned_fro_squared(tuned: Operator) -> float:
    """||W||_F^2 without forming an adapter's W: ||W0||^2 + 2 s <W0, L R^T> + s^2 ||L R^T||^2 (dW = s L R^T)."""
    if isinstance(tuned, Dense):
        return float(torch.linalg.vector_norm(tuned.w, dtype=torch.float64)) ** 2
    left, right = update_factors(tuned)
    w0 = tuned.w0
    cross = float(((left.T @ w0).double() * right.T.double()).sum())  # <W0, L R^T>: (r, m) @ (m, n) -> (r, n)
    gram = (left.T.double() @ left.double()) * (right.T.double() @ right.double())  # ||L R^T||^2 = sum of it
    base = float(torch.linalg.vector_norm(w0, dtype=torch.float64)) ** 2
    return base + 2.0 * tuned.scale * cross + tuned.scale ** 2 * float(gram.sum())


def update_factors(update: LowRankUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (m, r), R (n, r)) with dW = scale * L @ R^T, for W0 stored [out, in] or (fan_in_fan_out) [in, out]."""
    if update.transposed:  # dW = s (B A)^T = s A^T B^T: A (r, m), B (n, r)
        return update.a.T, update.b
    return update.b, update.a.T  # dW = s B A: B (m, r), A (r, n)


def lowrank_update_spectrum(update: LowRankUpdate, *, base_fro: float | None = None) -> UpdateSpectrum:
    """An adapter's dW = s L R^T from its r x r core: the singular values (as numerics.metrics computes them),
    the amplification at r = the adapter's rank with U_r = Q_L U_c, V_r = Q_R V_c, and ||W||_F^2, all from one
    product of W0 with r columns (Y = W0 Q_R): U_r^T W0 V_r = U_c^T (Q_L^T Y) V_c and <W0, L R^T> = tr(L^T Y R_R).
    `base_fro`: ||W0||_F when known (the base spectrum's), else computed."""
    # The QRs and core of numerics.metrics.lora_delta_singular_values, done once: the same values, bit for bit.
    q_b, r_b = torch.linalg.qr(update.b)  # B (., r)
    q_a, r_a = torch.linalg.qr(update.a.T)  # A^T (., r)
    values = svdvals(update.scale * (r_b @ r_a.T), backend="torch")  # (r,)
    left, right = update_factors(update)
    rank = min(left.shape[1], left.shape[0], right.shape[0])  # the vectors U_r, V_r can have
    (q_left, r_left), (q_right, r_right) = ((q_a, r_a), (q_b, r_b)) if update.transposed else ((q_b, r_b), (q_a, r_a))
    y = update.w0 @ q_right  # (m, n) @ (n, r'') -> (m, r''): the one product with W0
    cross = float(((left.T @ y).double() * r_right.T.double()).sum())  # tr((r, m) @ (m, r'') @ (r'', r))
    delta_squared = float((values.double() ** 2).sum())
    if base_fro is None:
        base_fro = float(torch.linalg.vector_norm(update.w0, dtype=torch.float64))
    tuned_squared = base_fro ** 2 + 2.0 * update.scale * cross + delta_squared
    if not delta_squared > 0.0:  # dW = 0: amplification undefined
        return UpdateSpectrum(s=values, amplification=None, amplification_rank=rank, tuned_fro_squared=tuned_squared)
    u_core, _, vh_core = torch.linalg.svd(update.scale * (r_left @ r_right.T))  # (r', r'') core
    projected = u_core[:, :rank].T @ (q_left.T @ y) @ vh_core[:rank].T  # U_r^T W0 V_r, (r, r)
    norm = float(torch.linalg.vector_norm(projected.double()))
    value = math.sqrt(delta_squared) / norm if norm > 0.0 else math.inf
    return UpdateSpectrum(s=values, amplification=value if math.isfinite(value) else None, amplification_rank=rank,
                          tuned_fro_squared=tuned_squared)


def dense_update_spectrum(w0: torch.Tensor, delta: torch.Tensor, rank: int, *, driver: str | None = None,
                          backend: str = "torch") -> UpdateSpectrum:
    """A full fine-tune's (or DoRA's) dW (m, n): every singular value (svdvals, the run's delta route) and the
    amplification at `rank` from dW's top-`rank` singular subspace (block Krylov, `_top_subspace`); None where
    that subspace is not determined (s_r ~ s_{r+1})."""
    values = svdvals(delta, driver=driver, backend=backend)  # (p,)
    rank = max(0, min(rank, values.numel()))
    fro = float(torch.linalg.vector_norm(values.double()))
    if not fro > 0.0 or rank == 0:
        return UpdateSpectrum(s=values, amplification=None, amplification_rank=rank)
    subspace = _top_subspace(delta, values, rank)
    value = amplification(w0, *subspace, fro) if subspace is not None else None
    return UpdateSpectrum(s=values, amplification=value, amplification_rank=rank)


def _top_subspace(delta: torch.Tensor, values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """dW's top-`rank` left and right singular subspaces (m, r), (n, r), or None where they are not determined.

    The exact SVD when r = min(m, n).  Else block Krylov until Wedin's bound on the subspace, ||dW V - U S||_F /
    (s_r - sigma_{r+1}), is <= SUBSPACE_TOLERANCE or what an exact SVD in this dtype delivers (sigma_{r+1} is
    known from the values), within SUBSPACE_BLOCKS blocks; a relative gap below SUBSPACE_GAP is not tried.  A
    full fine-tune's dW is often noise-flat after a few directions: its top-16 subspace is then arbitrary (any
    r of a cluster), and so would the amplification be.  Bounded work: never an m x n SVD for this number."""
    if rank >= values.numel():
        u, _, vh = torch.linalg.svd(delta, full_matrices=False)
        return u, vh.T
    if float(values[rank - 1] - values[rank]) < SUBSPACE_GAP * float(values[0]):
        return None
    top = top_singular(Dense(delta), rank, counted=0, tolerance=SUBSPACE_TOLERANCE,
                       next_value=float(values[rank]), max_iterations=SUBSPACE_BLOCKS)
    return (top.u, top.vh.T) if top.check.passed else None


def amplification(w0: torch.Tensor, u_r: torch.Tensor, v_r: torch.Tensor, delta_fro: float) -> float | None:
    """Hu et al. (7.3): ||dW||_F / ||U_r^T W0 V_r||_F; None when either norm is zero."""
    projected = float(torch.linalg.vector_norm(((u_r.T @ w0) @ v_r).double()))  # (r, m) @ (m, n) @ (n, r)
    if not (delta_fro > 0.0 and projected > 0.0):
        return None
    value = delta_fro / projected
    return value if math.isfinite(value) else None


def subspace_overlap(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Hu et al. (7.2): phi(A, B) = ||A^T B||_F^2 / min(i, j) for orthonormal A (d, i), B (d, j)."""
    if a is None or b is None or a.shape[1] == 0 or b.shape[1] == 0:
        return None
    product = (a.T @ b).double()  # (i, d) @ (d, j) -> (i, j)
    return float((product * product).sum()) / min(a.shape[1], b.shape[1])


def best_match_agreement(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean over the columns j of A of max_j' |cos(a_j, b_j')| (unit columns): how well B matches each of A's."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return None
    return float((a.T @ b).abs().amax(dim=1).double().mean())  # (i, d) @ (d, j) -> (i, j)


def sigma_ratio(tuned: np.ndarray, base: np.ndarray, argmax: np.ndarray) -> np.ndarray:
    """s_j(W) / s_{argmax_j}(W0) per tuned vector j (float64; NaN, stored as null, where that base value is 0)."""
    denominator = np.asarray(base, dtype=np.float64)[np.asarray(argmax, dtype=np.int64)]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(tuned, dtype=np.float64) / denominator
    return np.where(np.isfinite(ratio) & (denominator > 0), ratio, np.nan)


def update_measures(*, base_s: torch.Tensor, update: UpdateSpectrum | None, delta_s: torch.Tensor,
                    tuned: Operator, tuned_top: float, overlaps: dict[str, float | None]) -> UpdateMeasures:
    """The per-matrix columns from what a comparison computed: dW's values (`update`, or `delta_s` alone
    when no amplification was computed), the base's values, W's top singular value, and phi per side."""
    fro_squared = float((delta_s.double() ** 2).sum())
    top = float(delta_s.max()) if delta_s.numel() else 0.0
    return UpdateMeasures(
        delta_rank_90=energy_rank(delta_s, 0.90), delta_rank_99=energy_rank(delta_s, 0.99),
        base_rank_90=energy_rank(base_s, 0.90),
        delta_stable_rank=stable_rank(fro_squared, top) if fro_squared > 0 else None,
        tuned_stable_rank=stable_rank(update.tuned_fro_squared if update is not None and update.tuned_fro_squared
                                      is not None else tuned_fro_squared(tuned), tuned_top),
        amplification=update.amplification if update is not None else None,
        amplification_rank=update.amplification_rank if update is not None else None,
        subspace_overlap=overlaps.get("left"), subspace_overlap_right=overlaps.get("right"))
