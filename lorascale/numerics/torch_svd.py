"""The "torch" backend: torch.linalg on any device.  CPU: LAPACK gesdd (MKL/OpenBLAS).  CUDA: the cuSOLVER
`driver` given, else DEFAULT_CUDA_DRIVER ("gesvd", QR-based, accurate): never torch's own CUDA default,
gesvdj (Jacobi, falling back to gesvd), whose accuracy at 4096+ sizes depends on its convergence tolerance.
"""

from __future__ import annotations

import torch

from lorascale.errors import NumericalError
from lorascale.numerics.backends import DEFAULT_CUDA_DRIVER
from lorascale.numerics.decomposition import Decomposition


def svd(matrix: torch.Tensor, *, driver: str | None = None) -> Decomposition:
    """Thin SVD of `matrix` (m, n): U (m, p), S (p,), Vh (p, n), on its device and in its dtype."""
    try:
        if matrix.is_cuda:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver or DEFAULT_CUDA_DRIVER)
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as exc:  # typed error, not text matching
        raise NumericalError(f"SVD of a {tuple(matrix.shape)} matrix did not converge: {exc}") from exc
    return Decomposition(u, s, vh)


def svdvals(matrix: torch.Tensor, *, driver: str | None = None) -> torch.Tensor:
    """Singular values (p,) of `matrix` (m, n), descending; no singular vectors are formed."""
    try:
        if matrix.is_cuda:
            return torch.linalg.svdvals(matrix, driver=driver or DEFAULT_CUDA_DRIVER)
        return torch.linalg.svdvals(matrix)
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(f"SVD of a {tuple(matrix.shape)} matrix did not converge: {exc}") from exc


def left_svd(matrix: torch.Tensor, *, driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m, p) and S (p,) of `matrix` (m, n): LAPACK/cuSOLVER compute V anyway, so this is svd() without it."""
    u, s, _ = svd(matrix, driver=driver)
    return u, s
