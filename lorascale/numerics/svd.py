"""Thin SVD behind one signature, whatever the backend (the table of backends: numerics/backends.py).

Every backend returns (U, S, Vh) with U (m, p), S (p,) descending, Vh (p, n), p = min(m, n), on the
input's device and in the input's dtype, and `svdvals` returns S alone.  `backend` is a resolved name (a
run's Routes, settled by execute/routes.py); `driver` is the cuSOLVER driver, used by the torch backend on
CUDA.
"""

from __future__ import annotations

import torch

from lorascale.numerics.backends import backend_functions, backend_left_function
from lorascale.numerics.decomposition import Decomposition, require_finite


def svd(matrix: torch.Tensor, *, backend: str, driver: str | None = None) -> Decomposition:
    """Thin SVD of `matrix` (m, n) with `backend`: Decomposition(U (m, p), S (p,), Vh (p, n))."""
    require_finite(matrix, "matrix to decompose")
    decompose, _ = backend_functions(backend)
    return decompose(matrix, driver=driver)


def left_svd(matrix: torch.Tensor, *, backend: str, driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m, p) and S (p,) of `matrix` (m, n) with `backend`, for callers that need no right vectors."""
    require_finite(matrix, "matrix to decompose")
    return backend_left_function(backend)(matrix, driver=driver)


def svdvals(matrix: torch.Tensor, *, backend: str, driver: str | None = None) -> torch.Tensor:
    """Singular values (p,) of `matrix` (m, n) with `backend`, descending: no singular vectors are formed."""
    require_finite(matrix, "matrix to decompose")
    _, values = backend_functions(backend)
    return values(matrix, driver=driver)
