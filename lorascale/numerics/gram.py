"""The opt-in "gram" backend: SVD through the symmetric eigensolver of the float64 Gram matrix.

For A (m, n) with m >= n: G = A^T A = V S^2 V^T (n, n), so eigh(G) gives V and S, and U = A V / S.
(m < n: the same with A A^T and U.)  Forming G squares the condition number, which is why G is formed
and decomposed in float64 whatever the compute precision: an eigenvalue error of ~eps64 * s_1^2 is a
singular value error of ~eps64 * s_1^2 / (2 s_j), below fp32's own ~eps32 * s_1 for every s_j above
~1e-9 s_1.  Columns U = A V / S lose orthogonality like eps64 * (s_1 / s_j)^2; when that exceeds the output
precision (always for fp64 output, below s_p / s_1 ~ 4e-5 for fp32) they are re-orthonormalised by a QR
step.  benchmarks/svd_throughput.py measures the error against a float64 LAPACK SVD.

Never selected automatically (`--backend gram` opts in): speed and accuracy depend on the hardware.
"""

from __future__ import annotations

import torch

from lorascale.errors import NumericalError
from lorascale.numerics.decomposition import Decomposition, require_finite

_EPS64 = torch.finfo(torch.float64).eps


def _eigh_descending(gram: torch.Tensor, *, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    # A finite fp64 input can still square past fp64's range (entries above ~1e154).
    require_finite(gram, "Gram matrix")
    try:
        if vectors:
            values, basis = torch.linalg.eigh(gram)  # ascending
            return values.flip(0), basis.flip(1)
        return torch.linalg.eigvalsh(gram).flip(0), None
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(f"eigendecomposition of a {tuple(gram.shape)} Gram matrix failed: {exc}") from exc


def _gram(matrix64: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The Gram matrix of the short side, and whether it is A^T A (tall or square input)."""
    m, n = matrix64.shape
    if m >= n:
        return matrix64.T @ matrix64, True  # (n, m) @ (m, n) -> (n, n)
    return matrix64 @ matrix64.T, False  # (m, n) @ (n, m) -> (m, m)


def svdvals(matrix: torch.Tensor, *, driver: str | None = None) -> torch.Tensor:
    """Singular values of `matrix` (m, n) from eigvalsh of its float64 Gram matrix, descending.

    `driver` is accepted for the common backend signature and unused: no cuSOLVER SVD runs here."""
    gram, _ = _gram(matrix.to(torch.float64))
    values, _ = _eigh_descending(gram, vectors=False)
    return values.clamp_min(0).sqrt().to(matrix.dtype)


def svd(matrix: torch.Tensor, *, driver: str | None = None) -> Decomposition:
    """Thin SVD of `matrix` (m, n) from eigh of its float64 Gram matrix; outputs in the input's dtype.

    `driver` is accepted for the common backend signature and unused."""
    a = matrix.to(torch.float64)
    gram, tall = _gram(a)
    values, basis = _eigh_descending(gram, vectors=True)
    assert basis is not None
    s = values.clamp_min(0).sqrt()  # (p,)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    # tall: U = A V / S, (m, n) @ (n, p) -> (m, p); wide: V = A^T U / S, (n, m) @ (m, p) -> (n, p)
    other = (a @ basis if tall else a.T @ basis) / safe
    # Orthogonality lost in U = A V / S: ~eps64 (s_1 / s_p)^2; repair it when the output precision would show it.
    if _EPS64 * float(s[0]) ** 2 > torch.finfo(matrix.dtype).eps * float(s[-1]) ** 2:
        q, r = torch.linalg.qr(other)  # keeps the well-determined columns, completes the rest orthonormally
        signs = torch.sign(torch.diagonal(r))
        other = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    u, v = (other, basis) if tall else (basis, other)
    return Decomposition(u.to(matrix.dtype), s.to(matrix.dtype), v.T.to(matrix.dtype))
