"""Top-K singular triplets by randomized block Krylov iteration, with a guard against the exact spectrum.

`--mode topk` needs max_cos only for the top K tuned vectors, so it replaces the tuned model's full SVD
by (1) svdvals, which every mode needs for the spectra table, and (2) the top K triplets from a randomized
block Krylov method (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster
approximate SVD"; Halko, Martinsson & Tropp 2011 for the sketch): a Gaussian sketch of K + oversample
columns, `iterations` steps of A A^T whose blocks are all kept (block Lanczos with full
reorthogonalisation), and the small SVD of Q^T A on that basis (Rayleigh-Ritz).  Keeping every block,
not only the last as plain subspace iteration does, is what makes slowly decaying weight spectra converge.

The guard (`check_top`) compares the result with what is known exactly.  With the residual
r_j = ||A v_j - sigma~_j u_j|| (A^T u_j - sigma~_j v_j is zero by construction of Rayleigh-Ritz):
- every j < K: |sigma~_j - sigma_j| <= tolerance * sigma_j against svdvals (a missed or misordered
  direction shifts it), and r_j <= sqrt(tolerance) * sigma~_j.  A Ritz value's error is quadratic in its
  vector's error, hence the square root.  This bounds how far u_j strays from the singular vectors whose
  values are near sigma_j, not its rotation among them.
- the first `separated` vectors (the top k whose intruder status is counted): the angle to the true
  singular vector, bounded by r_j / gap_j (Wedin; gap_j = distance from sigma~_j to the neighbouring exact
  singular values), is at most sqrt(tolerance).
When any check fails the caller falls back to the exact SVD.  A flat spectrum (neighbours closer than
the residual) is where this trips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorascale.numerics.decomposition import Decomposition
from lorascale.numerics.svd import svd

DEFAULT_ITERATIONS = 10
DEFAULT_OVERSAMPLE = 32
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TopCheck:
    sigma_error: float  # max_j<K |sigma~_j - sigma_j| / sigma_j against svdvals
    residual: float  # max_j<K ||A v_j - sigma~_j u_j|| / sigma~_j
    angle_bound: float  # max_j<separated r_j / gap_j: bound on sin(angle to the true vector)
    passed: bool


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


def top_singular(matrix: torch.Tensor, rank: int, *, backend: str, oversample: int = DEFAULT_OVERSAMPLE,
                 iterations: int = DEFAULT_ITERATIONS, seed: int = 0, driver: str | None = None) -> Decomposition:
    """The top `rank` singular triplets of `matrix` (m, n): U (m, rank), S (rank,), Vh (rank, n).

    The small SVD of the projected matrix runs on `backend` with `driver` (numerics/backends.py), like every
    other SVD of the run, so a backend chosen for its accuracy or its library applies here too.

    Deterministic: the sketch comes from a generator seeded with `seed` on the matrix's device.  The basis
    has at most (iterations + 1) * (rank + oversample) columns, and never more than min(m, n).
    """
    m, n = matrix.shape
    p = min(m, n)
    block = min(p, rank + oversample)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    sketch = torch.randn(n, block, generator=generator, device=matrix.device, dtype=matrix.dtype)
    blocks = [_orthonormal(matrix @ sketch)]  # (m, n) @ (n, b) -> (m, b)
    width = block
    for _ in range(iterations):
        if width >= p:
            break
        step = matrix @ (matrix.T @ blocks[-1])  # (m, n) @ ((n, m) @ (m, b)) -> (m, b)
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to fp32 rounding
            for previous in blocks:
                step -= previous @ (previous.T @ step)  # (m, b) @ (b, b)
        step = _orthonormal(step[:, :p - width])
        blocks.append(step)
        width += step.shape[1]
    basis = torch.cat(blocks, dim=1)  # (m, w)
    small = basis.T @ matrix  # (w, m) @ (m, n) -> (w, n)
    u_small, s, vh = svd(small, driver=driver, backend=backend)
    u = basis @ u_small[:, :rank]  # (m, w) @ (w, rank) -> (m, rank)
    return Decomposition(u, s[:rank], vh[:rank])


def check_top(matrix: torch.Tensor, top: Decomposition, exact_s: torch.Tensor,
              tolerance: float = DEFAULT_TOLERANCE, *, separated: int = 0) -> TopCheck:
    """Check the triplets `top` against the exact singular values `exact_s` of `matrix` (see module doc)."""
    rank = top.s.shape[0]
    floor = torch.finfo(torch.float64).tiny
    exact = exact_s.to(torch.float64)
    reference = exact[:rank].clamp_min(floor)
    sigma = top.s.to(torch.float64).clamp_min(floor)
    sigma_error = float(((sigma - reference).abs() / reference).max())
    # A v_j - sigma_j u_j for every j at once: (m, n) @ (n, K) - (m, K) * (K,) -> (m, K)
    residual_vectors = matrix @ top.vh.T - top.u * top.s
    residuals = torch.linalg.vector_norm(residual_vectors, dim=0).to(torch.float64)
    residual = float((residuals / sigma).max())
    angle_bound = 0.0
    if separated > 0:
        count = min(separated, rank)
        neighbours = torch.cat([exact[:1] * 2 + 1, exact, exact[-1:] * 0 - 1])  # (p + 2,): sentinels at the ends
        above, below = neighbours[:count], neighbours[2:count + 2]
        gaps = torch.minimum(above - sigma[:count], sigma[:count] - below).clamp_min(floor)
        angle_bound = float((residuals[:count] / gaps).max())
    root = math.sqrt(tolerance)
    passed = sigma_error <= tolerance and residual <= root and angle_bound <= root
    return TopCheck(sigma_error=sigma_error, residual=residual, angle_bound=angle_bound, passed=passed)
