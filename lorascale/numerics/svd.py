"""Thin SVD behind one signature, whatever the backend.

Every backend returns (U, S, Vh) with U (m, p), S (p,) descending, Vh (p, n), p = min(m, n), on the
input's device and in the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorascale.errors import NumericalError


class Decomposition(NamedTuple):
    u: torch.Tensor  # (m, p)
    s: torch.Tensor  # (p,)
    vh: torch.Tensor  # (p, n)


def svd(matrix: torch.Tensor, *, driver: str | None = None) -> Decomposition:
    """Thin SVD with torch.linalg (LAPACK gesdd on CPU; `driver` selects the cuSOLVER routine on CUDA)."""
    try:
        if matrix.is_cuda:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver)
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as exc:  # typed error, not text matching
        raise NumericalError(f"SVD did not converge ({exc})") from exc
    return Decomposition(u, s, vh)


def svdvals(matrix: torch.Tensor, *, driver: str | None = None) -> torch.Tensor:
    """Singular values only, descending: several times cheaper than the full SVD."""
    try:
        if matrix.is_cuda and driver is not None:
            return torch.linalg.svd(matrix, full_matrices=False, driver=driver)[1]
        return torch.linalg.svdvals(matrix)
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(f"SVD did not converge ({exc})") from exc
