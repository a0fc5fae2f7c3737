"""The top K singular triplets of W by block Krylov iteration, with an a-posteriori guard on their angles.

`--mode topk` (the default) needs the top K tuned vectors (max_cos, the similarity block, the top k counted
for intruders), never the full spectrum of W.  `top_singular()` builds a block Krylov basis of H = W W^T
(Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster approximate SVD"; block
Lanczos with full reorthogonalisation, every block kept), from a start block of b = K + oversample columns:
the caller's warm columns (the base's top left singular vectors U0[:, :b], and for an adapter the columns of
B, where W's top vectors mostly lie) and a few Gaussian ones through W (so that no direction is missed).  It
uses W only through products (numerics/operators.py: an adapter's W = W0 + s B A is never formed).  After
each block, Rayleigh-Ritz on the basis Q gives Ritz triplets (s_j, u_j = Q y_j, v_j = W^T u_j / s_j), with
W^T u_j = s_j v_j exactly, and the iteration stops as soon as the guard passes:

- residual r_j = W v_j - s_j u_j (computed, one product with W);
- each interval [s_i - ||r_i||, s_i + ||r_i||] holds a singular value of W (Weyl), so the distance from s_j to
  every other singular value is at least delta_j = min(s_{j-1} - ||r_{j-1}|| - s_j, s_j - s_{j+1} - ||r_{j+1}||);
- Wedin's theorem: the angles of u_j and v_j to the true singular vectors are at most ||r_j|| / delta_j.
The guard passes when that bound is <= `tolerance` (1e-4: max_cos is then within ~1e-4 of the exact SVD's,
docs/METHOD.md section 9) for each of the first `counted` vectors (the top k whose intruder status is
counted), and the top Ritz values moved by less than `tolerance` (relative) since the previous block.  The
per-vector bounds of every returned vector (beyond the counted ones too) come back in `angle_bounds`, and each
value's error bound in `value_bounds`: min(||r_j||, ||r_j||^2 / delta_j) (Weyl; and Kato-Temple on the
Jordan-Wielandt matrix [[0, W], [W^T, 0]], where (u_j, v_j) / sqrt(2) has residual ||r_j|| / sqrt(2) and
Rayleigh quotient s_j).  `guarded_count` says how many leading values are within SIGMA_TOLERANCE * s_0 of
true ones: what a caller may store as singular values (issue 25).  With `next_value` (the true singular value
just below the top `rank`, when known) the guard also bounds the top-`rank` subspace as a whole:
||R||_F / (s_rank - next_value) <= max(tolerance, the dtype's floor / gap) (Wedin), for callers that need the
subspace, not each vector.  The
bound assumes that the basis has not missed a singular value between the Ritz values it bounds, which a
Gaussian part of the start block makes a probability-zero event; the stability test catches one found late.
When the guard does not pass within `max_iterations` blocks, the caller uses the exact SVD (matrices.method
= topk->exact).  A nearly flat spectrum, where neighbours are closer than the residuals, is where it fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorascale.numerics.operators import Dense, LowRankUpdate

DEFAULT_OVERSAMPLE = 16  # block columns beyond K: the Ritz values just below the top K converge with it
RANDOM_COLUMNS = 8  # Gaussian columns in every start block, whatever the warm columns
MAX_ITERATIONS = 16  # blocks added to the start block before giving up (then: the exact SVD)
ANGLE_TOLERANCE = 1e-4  # bound on sin(angle) of each counted vector
SIGMA_TOLERANCE = 1e-5  # |s_j - sigma| / s_0 a stored singular value is held to (see value_bounds)

Operator = Dense | LowRankUpdate


@dataclass(frozen=True)
class TopCheck:
    """The guard's verdict on a top-K result."""

    angle_bound: float  # max over the counted vectors of ||r_j|| / delta_j (inf where delta_j <= 0)
    residual: float  # max over the top K of ||W v_j - s_j u_j|| / s_j
    iterations: int  # Krylov blocks after the start block
    basis: int  # columns of the final basis
    passed: bool


@dataclass(frozen=True)
class TopSingular:
    """The top K singular triplets W ~ U diag(S) Vh and the guard's verdict."""

    u: torch.Tensor  # (m, K)
    s: torch.Tensor  # (K,) descending
    vh: torch.Tensor  # (K, n)
    check: TopCheck
    # (K,) float64: ||r_j|| / delta_j, the Wedin bound on sin(angle) of each returned vector (inf: no gap)
    angle_bounds: torch.Tensor | None = None
    value_bounds: torch.Tensor | None = None  # (K,) float64: |s_j - sigma| <= it for a true singular value sigma

    def guarded_count(self, floor: float = 0.0) -> int:
        """How many leading values are within max(SIGMA_TOLERANCE, floor) * s_0 of true singular values."""
        if self.value_bounds is None or self.s.numel() == 0:
            return int(self.s.numel())
        limit = max(SIGMA_TOLERANCE, floor) * float(self.s[0])
        bad = torch.nonzero(self.value_bounds > limit)
        return int(bad[0, 0]) if bad.numel() else int(self.s.numel())


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the span of `columns` (m, b), b << m.

    CholeskyQR2: R from the Cholesky factor of the float64 Gram matrix, twice (the second pass restores
    orthogonality to working precision).  Matrix products only, so it is fast on any device and does not
    suffer the thread-synchronisation stalls that LAPACK's Householder QR of tall-skinny blocks shows on
    busy CPUs.  Columns too dependent for Cholesky (a Krylov space that is exhausted) take Householder QR.
    """
    for _ in range(2):
        wide = columns.to(torch.float64)
        factor, info = torch.linalg.cholesky_ex(wide.T @ wide)  # (b, m) @ (m, b) -> (b, b) = L L^T
        if int(info) != 0:
            return torch.linalg.qr(columns).Q
        # Q = X L^-T, i.e. solve Q L^T = X
        columns = torch.linalg.solve_triangular(factor.T, wide, upper=True, left=False).to(columns.dtype)
    return columns


def _start_block(operator: Operator, width: int, warm: torch.Tensor | None, seed: int) -> torch.Tensor:
    """(m, width) orthonormal: the warm columns that fit, then Gaussian ones mapped through W."""
    m, n = operator.shape
    taken = warm[:, :max(0, width - RANDOM_COLUMNS)] if warm is not None else warm
    generator = torch.Generator(device=operator.device).manual_seed(seed)
    count = width - (taken.shape[1] if taken is not None else 0)
    sketch = torch.randn(n, count, generator=generator, device=operator.device, dtype=operator.dtype)
    random = operator.matmul(sketch)  # (m, n) @ (n, c) -> (m, c)
    return _orthonormal(random if taken is None else torch.cat([taken.to(operator.dtype), random], dim=1))


def _extend(blocks: list[torch.Tensor], step: torch.Tensor) -> torch.Tensor:
    """The next orthonormal block from H Q_t (m, b): projected off every earlier block and normalised,
    twice.  Once is not enough where the basis is nearly an invariant subspace (a warm start from the base's
    singular vectors): what is left after the projection is then tiny, and normalising it would magnify
    its rounding back into the earlier blocks' span; the second pass removes that."""
    for _ in range(2):
        for earlier in blocks:
            step = step - earlier @ (earlier.T @ step)  # (m, b) @ ((b, m) @ (m, b))
        step = _orthonormal(step)
    return step


class _Ritz:
    """Rayleigh-Ritz on a growing basis: the Gram matrix of Q^T W, kept up to date block by block."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []  # Q_i^T W, (b_i, n) each
        self.gram: torch.Tensor | None = None  # (Q^T W)(Q^T W)^T = Q^T H Q, float64 (w, w)

    def add(self, block_rows: torch.Tensor) -> None:
        new = block_rows.to(torch.float64)
        if self.gram is None:
            self.gram = new @ new.T
        else:
            old = torch.cat([r.to(torch.float64) for r in self.rows], dim=0)
            cross = old @ new.T  # (w, n) @ (n, b) -> (w, b)
            self.gram = torch.cat([torch.cat([self.gram, cross], dim=1),
                                   torch.cat([cross.T, new @ new.T], dim=1)], dim=0)
        self.rows.append(block_rows)

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(singular values descending (w,), their eigenvectors of Q^T H Q (w, w)), float64."""
        assert self.gram is not None
        theta, vectors = torch.linalg.eigh(self.gram)
        return theta.flip(0).clamp_min(0).sqrt(), vectors.flip(1)


def top_singular(operator: Operator, rank: int, *, counted: int, warm: torch.Tensor | None = None,
                 tolerance: float = ANGLE_TOLERANCE, oversample: int = DEFAULT_OVERSAMPLE,
                 max_iterations: int = MAX_ITERATIONS, seed: int = 0,
                 next_value: float | None = None) -> TopSingular:
    """The top `rank` singular triplets of the operator W (m, n), guarded (see the module doc).

    `counted`: how many of them the angle bound must cover (the run's k); `warm`: left-space columns (m, c) to
    start from (the base's top left singular vectors, an adapter's B), Gaussian columns completing the start
    block.  Deterministic: the Gaussian columns come from a generator seeded with `seed` on W's device.
    `next_value`: the true singular value below the top `rank` (see the module doc: the subspace guard).
    Many parameters because each keyword-only one is a knob of the method with its default, set by few callers.
    """
    m, n = operator.shape
    p = min(m, n)
    rank, counted = min(rank, p), min(counted, rank, p)
    width = min(p, rank + oversample)
    blocks = [_start_block(operator, width, warm, seed)]
    ritz = _Ritz()
    previous: torch.Tensor | None = None
    result: TopSingular | None = None
    for iteration in range(max_iterations + 1):
        products = operator.rmatmul(blocks[-1])  # W^T Q_t, (n, m) @ (m, b) -> (n, b)
        ritz.add(products.T)
        values, vectors = ritz.values()
        basis = sum(b.shape[1] for b in blocks)
        complete = basis >= m  # the basis spans the whole left space: Rayleigh-Ritz is the exact SVD
        stable = previous is not None and _stable(values, previous, counted + 1, tolerance)
        if stable or complete or iteration == max_iterations:
            result = _triplets(operator, blocks, ritz, values, vectors, rank, counted, iteration, basis, tolerance,
                               next_value)
            if result.check.passed or complete:  # a complete basis cannot improve: the bound holds or never will
                return result
        previous = values
        if iteration == max_iterations:
            break
        blocks.append(_extend(blocks, operator.matmul(products)[:, :m - basis]))  # H Q_t = W (W^T Q_t)
    assert result is not None
    return result


def _stable(values: torch.Tensor, previous: torch.Tensor, count: int, tolerance: float) -> bool:
    """Whether the top `count` Ritz values moved by at most `tolerance` (relative) since the previous block."""
    count = min(count, values.shape[0], previous.shape[0])
    now, before = values[:count], previous[:count]
    return bool(((now - before).abs() <= tolerance * now.clamp_min(torch.finfo(torch.float64).tiny)).all())


def _triplets(operator: Operator, blocks: list[torch.Tensor], ritz: _Ritz, values: torch.Tensor,
              vectors: torch.Tensor, rank: int, counted: int, iteration: int, basis: int,
              tolerance: float, next_value: float | None = None) -> TopSingular:
    """The top Ritz triplets, their residuals and the guard (the module doc's bound).

    Many parameters because it is the loop's state at one step, passed once rather than kept in an object."""
    dtype = operator.dtype
    wanted = min(values.shape[0], rank + 1)  # one more than returned: the last counted vector's neighbour
    y = vectors[:, :wanted]  # (w, L) float64
    q = torch.cat(blocks, dim=1)  # (m, w)
    u = q @ y.to(dtype)  # (m, w) @ (w, L) -> (m, L)
    rows = torch.cat(ritz.rows, dim=0)  # Q^T W, (w, n)
    s = values[:wanted]
    tiny = torch.finfo(torch.float64).tiny
    v = (rows.T @ y.to(dtype)) / s.clamp_min(tiny).to(dtype)  # W^T u_j / s_j, (n, w) @ (w, L) -> (n, L)
    residuals = torch.linalg.vector_norm((operator.matmul(v) - u * s.to(dtype)).to(torch.float64), dim=0)  # (L,)
    # An exact SVD in this dtype is itself only accurate to ~sqrt(p) eps ||W|| / gap (LAPACK's error bound
    # for singular vectors): a vector of a close pair is held to that, not to more than exact mode delivers.
    floor = math.sqrt(min(operator.shape)) * torch.finfo(dtype).eps * float(s[0]) if wanted else 0.0
    bounds, value_bounds, passed = [], [], True
    for j in range(min(rank, wanted)):  # every returned vector's bound; the counted ones decide the guard
        above = s[j - 1] - residuals[j - 1] - s[j] if j > 0 else math.inf
        below = s[j] - s[j + 1] - residuals[j + 1] if j + 1 < wanted else math.inf
        gap, residual_j = min(float(above), float(below)), float(residuals[j])
        bound = residual_j / gap if gap > 0 else math.inf
        bounds.append(bound)
        value_bounds.append(min(residual_j, residual_j * residual_j / gap) if gap > 0 else residual_j)
        if j < counted:
            passed = passed and bound <= max(tolerance, floor / gap if gap > 0 else 0.0)
    if next_value is not None and rank:  # the top-`rank` subspace as a whole (Wedin), see the module doc
        gap = float(s[rank - 1]) - next_value  # held to what an exact SVD in this dtype delivers, as above
        passed = passed and gap > 0 and float(torch.linalg.vector_norm(residuals[:rank])) / gap <= max(
            tolerance, floor / gap)
    angle = max(bounds[:counted], default=0.0)
    residual = float((residuals[:rank] / s[:rank].clamp_min(tiny)).max()) if rank else 0.0
    check = TopCheck(angle_bound=angle, residual=residual, iterations=iteration, basis=basis, passed=passed)
    return TopSingular(u=u[:, :rank], s=s[:rank].to(dtype), vh=v[:, :rank].T.contiguous(), check=check,
                       angle_bounds=torch.tensor(bounds, dtype=torch.float64),
                       value_bounds=torch.tensor(value_bounds, dtype=torch.float64))
