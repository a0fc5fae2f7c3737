"""The "gram" backend: SVD through the symmetric eigensolver of the float64 Gram matrix.

For A (m, n) with m >= n: G = A^T A = V S^2 V^T (n, n), so eigh(G) gives V and S, and U = A V / S.
(m < n: the same with A A^T and U.)  Forming G squares the condition number, which is why G is formed
and decomposed in float64 whatever the compute precision: an eigenvalue error of ~eps64 * s_1^2 is a
singular value error of ~eps64 * s_1^2 / (2 s_j), below fp32's own ~eps32 * s_1 for every s_j above
~1e-9 s_1 (and at most ~sqrt(eps64 * n) * s_1, 1e-6 s_1 at n = 4096, for s_j near zero).  Columns
U = A V / S lose orthogonality like eps64 * (s_1 / s_j)^2; the columns where that exceeds the output
precision (every column for fp64 output, those with s_j / s_1 below ~4e-5 for fp32) are
re-orthonormalised against the others and among themselves (`_repair`).

`left_svd` gives U and S alone (the left side is all a default run needs): for a wide or square A the
eigenvectors of A A^T are U itself, so no product and no repair at all; a tall A takes A^T A and U = A V / S.

Its singular vectors are at least as accurate as fp32 LAPACK's for every s_j above ~1e-9 s_1 (eigenvector
error ~eps64 s_1^2 / ((s_i + s_j) gap) against ~eps32 s_1 / gap), which is why "auto" may route fp32 runs
here on a CPU where numerics/backends.py's probe finds it faster; with fp64 output it is less accurate than
LAPACK and is never chosen automatically (tests/numerics/test_routes.py checks both claims against the
float64 oracle, ill-conditioned and rank-deficient inputs included).
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
    """The Gram matrix of the short side, and whether it is A^T A (tall input; square takes A A^T)."""
    m, n = matrix64.shape
    if m > n:
        return matrix64.T @ matrix64, True  # (n, m) @ (m, n) -> (n, n)
    return matrix64 @ matrix64.T, False  # (m, n) @ (n, m) -> (m, m)


def _repair(other: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Re-orthonormalise the columns of `other` = A X / S (d, p) whose orthogonality loss,
    ~eps64 (s_1 / s_j)^2, would show in `dtype`.

    Columns are sorted by descending s, so the poor ones are a tail: it is projected off the good columns
    (twice, classical Gram-Schmidt) and QR-factorised, which keeps its well-determined directions and
    completes the rest orthonormally.  Cost ~4 d p b for a tail of b columns instead of a full QR's ~2 d p^2.
    """
    limit = torch.finfo(dtype).eps
    s1 = float(s[0]) if s.numel() else 0.0
    loss = _EPS64 * s1 ** 2 / s.clamp_min(torch.finfo(torch.float64).tiny) ** 2  # (p,)
    poor = loss > limit
    if not bool(poor.any()):
        return other
    start = int(torch.nonzero(poor)[0])
    good, tail = other[:, :start], other[:, start:]
    for _ in range(2):
        tail = tail - good @ (good.T @ tail)  # (d, g) @ ((g, d) @ (d, b)) -> (d, b)
    q, r = torch.linalg.qr(tail)
    signs = torch.sign(torch.diagonal(r))
    tail = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    return torch.cat([good, tail], dim=1)


def svdvals(matrix: torch.Tensor, *, driver: str | None = None) -> torch.Tensor:
    """Singular values of `matrix` (m, n) from eigvalsh of its float64 Gram matrix, descending.

    `driver` is accepted for the common backend signature and unused: no cuSOLVER SVD runs here."""
    gram, _ = _gram(matrix.to(torch.float64))
    values, _ = _eigh_descending(gram, vectors=False)
    return values.clamp_min(0).sqrt().to(matrix.dtype)


def left_svd(matrix: torch.Tensor, *, driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m, p) and S (p,) of `matrix` (m, n), without V: eigh of A A^T (wide or square A), or of A^T A
    and U = A V / S (tall A, repaired where needed); outputs in the input's dtype.  `driver` unused."""
    a = matrix.to(torch.float64)
    gram, tall = _gram(a)
    values, basis = _eigh_descending(gram, vectors=True)
    assert basis is not None
    s = values.clamp_min(0).sqrt()  # (p,)
    if not tall:
        return basis.to(matrix.dtype), s.to(matrix.dtype)  # eigenvectors of A A^T: orthonormal to eps64
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = _repair(a @ basis / safe, s, matrix.dtype)  # (m, n) @ (n, p) -> (m, p)
    return u.to(matrix.dtype), s.to(matrix.dtype)


def svd(matrix: torch.Tensor, *, driver: str | None = None) -> Decomposition:
    """Thin SVD of `matrix` (m, n) from eigh of its float64 Gram matrix; outputs in the input's dtype.

    `driver` is accepted for the common backend signature and unused."""
    a = matrix.to(torch.float64)
    gram, tall = _gram(a)
    values, basis = _eigh_descending(gram, vectors=True)
    assert basis is not None
    s = values.clamp_min(0).sqrt()  # (p,)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    # tall: U = A V / S, (m, n) @ (n, p) -> (m, p); wide/square: V = A^T U / S, (n, m) @ (m, p) -> (n, p)
    other = _repair((a @ basis if tall else a.T @ basis) / safe, s, matrix.dtype)
    u, v = (other, basis) if tall else (basis, other)
    return Decomposition(u.to(matrix.dtype), s.to(matrix.dtype), v.T.to(matrix.dtype))
