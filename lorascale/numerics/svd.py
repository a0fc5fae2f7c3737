"""Thin SVD behind one signature, whatever the backend.

Every backend returns (U, S, Vh) with U (m, p), S (p,) descending, Vh (p, n), p = min(m, n), on the
input's device and in the input's dtype, and `svdvals` returns S alone.

Backends (benchmarks/README.md has the measurements behind these choices):
- "torch": torch.linalg.  CPU: LAPACK gesdd (MKL/OpenBLAS).  CUDA: the cuSOLVER `driver` given, else
  "gesvd" (QR-based, accurate): we never use torch's own default there, gesvdj (Jacobi, falling back to
  gesvd), whose accuracy at 4096+ sizes depends on its convergence tolerance.
- "cupy": cupy.linalg.svd on CUDA (cuSOLVER gesvd), imported lazily; same results as torch's gesvd, for
  installations that prefer cupy's build of cuSOLVER.
- "gram": opt-in, never chosen automatically.  Eigendecomposition of the float64 Gram matrix of the short
  side (numerics/gram.py); faster where the symmetric eigensolver beats the SVD, with an accuracy measured
  against float64 in benchmarks/svd_throughput.py.

"auto" is "torch" on every device: cupy calls the same cuSOLVER routine, so it buys nothing by default.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch

from lorascale.errors import NumericalError, OptionError

BACKENDS = ("auto", "torch", "cupy", "gram")
CUDA_DRIVERS = ("gesvd", "gesvdj", "gesvda")
DEFAULT_CUDA_DRIVER = "gesvd"


class Decomposition(NamedTuple):
    u: torch.Tensor  # (m, p)
    s: torch.Tensor  # (p,)
    vh: torch.Tensor  # (p, n)


def cupy_available() -> bool:
    """True when cupy is installed; nothing is imported (importing cupy initialises CUDA)."""
    return importlib.util.find_spec("cupy") is not None


def resolve_backend(backend: str, device: str) -> str:
    """Turn a user's --backend into a concrete backend for `device`, or say why it cannot run there."""
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}", fix=f"use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch"
    if backend == "cupy":
        if not device.startswith("cuda"):
            raise OptionError("--backend cupy needs a CUDA device", fix="use --device cuda, or --backend torch")
        if not cupy_available():
            raise OptionError("--backend cupy requested but cupy is not installed",
                              fix="pip install 'lorascale[cupy]', or use --backend torch")
    return backend


def resolve_driver(driver: str | None, device: str) -> str | None:
    """The cuSOLVER driver actually used: the one asked for, else gesvd on CUDA; None on CPU."""
    if driver is not None and driver not in CUDA_DRIVERS:
        raise OptionError(f"unknown cuSOLVER driver {driver!r}", fix=f"use one of {', '.join(CUDA_DRIVERS)}")
    if not device.startswith("cuda"):
        return None
    return driver or DEFAULT_CUDA_DRIVER


def require_finite(matrix: torch.Tensor, what: str = "matrix") -> None:
    """Raise NumericalError if `matrix` holds NaN or Inf.

    Every decomposition checks its input first: LAPACK's gesdd, given a NaN, prints "On entry to SLASCL
    parameter number 4 had an illegal value" to stdout (where lorascale writes data) and returns garbage
    instead of failing.  The inputs read from disk are checked with their tensor names in io/tensors.py;
    this catches what arithmetic made non-finite (an overflowing merge or difference) and the callers add
    which matrix and model it was.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise NumericalError(f"the {'x'.join(map(str, matrix.shape))} {what} holds NaN or Inf values "
                             f"(an overflow in {str(matrix.dtype).removeprefix('torch.')}?)")


def svd(matrix: torch.Tensor, *, driver: str | None = None, backend: str = "torch") -> Decomposition:
    """Thin SVD of `matrix` (m, n) with the chosen backend (see the module docstring)."""
    require_finite(matrix, "matrix to decompose")
    if backend == "gram":
        from lorascale.numerics.gram import gram_svd

        return gram_svd(matrix)
    if backend == "cupy":
        from lorascale.numerics.cupy_backend import cupy_svd

        return Decomposition(*cupy_svd(matrix))
    try:
        if matrix.is_cuda:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver or DEFAULT_CUDA_DRIVER)
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as exc:  # typed error, not text matching
        raise NumericalError(f"SVD of a {tuple(matrix.shape)} matrix did not converge ({exc})") from exc
    return Decomposition(u, s, vh)


def svdvals(matrix: torch.Tensor, *, driver: str | None = None, backend: str = "torch") -> torch.Tensor:
    """Singular values only, descending: no singular vectors are formed."""
    require_finite(matrix, "matrix to decompose")
    if backend == "gram":
        from lorascale.numerics.gram import gram_svdvals

        return gram_svdvals(matrix)
    if backend == "cupy":
        from lorascale.numerics.cupy_backend import cupy_svdvals

        return cupy_svdvals(matrix)
    try:
        if matrix.is_cuda:
            return torch.linalg.svdvals(matrix, driver=driver or DEFAULT_CUDA_DRIVER)
        return torch.linalg.svdvals(matrix)
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(f"SVD of a {tuple(matrix.shape)} matrix did not converge ({exc})") from exc
