"""The result every SVD backend returns; its own module so that backends and svd.py import it without a cycle."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorascale.errors import NumericalError


class Decomposition(NamedTuple):
    """Thin SVD A = U diag(S) Vh of A (m, n), p = min(m, n) (or fewer for a truncated decomposition)."""

    u: torch.Tensor  # (m, p)
    s: torch.Tensor  # (p,) descending
    vh: torch.Tensor  # (p, n)


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
