"""The result every SVD backend returns; its own module so that backends and svd.py import it without a cycle."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Decomposition(NamedTuple):
    """Thin SVD A = U diag(S) Vh of A (m, n), p = min(m, n) (or fewer for a truncated decomposition)."""

    u: torch.Tensor  # (m, p)
    s: torch.Tensor  # (p,) descending
    vh: torch.Tensor  # (p, n)
