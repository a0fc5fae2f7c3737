"""Metrics of the paper (docs/METHOD.md): max |cos|, effective rank, null level (intruders: intruders.py)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from lorascale.numerics.intruders import is_intruder
from lorascale.numerics.svd import svdvals

# Rows of the similarity product computed at once: bounds the (chunk, p0) temporary.
_CHUNK = 1024
SIMILARITY_BLOCK = 10  # the `similarity` table's top-b x top-b block: the paper's heatmaps (Fig. 1, 3)


def max_cos(vectors: torch.Tensor, base_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column j of `vectors` (d, q): max_i |cos(vectors_j, base_i)| over ALL columns of
    `base_vectors` (d, p0), and the argmax i.  Columns are unit length, so cos is the dot product.

    Returns (max_cos (q,), argmax (q,) int64).
    """
    values, indices = [], []
    for start in range(0, vectors.shape[1], _CHUNK):
        block = (vectors[:, start:start + _CHUNK].T @ base_vectors).abs_()  # (c, d) @ (d, p0) -> (c, p0)
        value, index = block.max(dim=1)
        values.append(value)
        indices.append(index)
    return torch.cat(values), torch.cat(indices)


def similarity_block(vectors: torch.Tensor, base_vectors: torch.Tensor, size: int = SIMILARITY_BLOCK) -> torch.Tensor:
    """The top-`size` x top-`size` block of |vectors^T base_vectors| (tuned rank x base rank)."""
    return (vectors[:, :size].T @ base_vectors[:, :size]).abs()  # (size, d) @ (d, size) -> (size, size)


def effective_rank(singular_values: torch.Tensor | np.ndarray) -> float | None:
    """Roy & Vetterli (2007): exp(entropy of s / sum(s)).  None for a zero matrix (undefined).

    >>> round(effective_rank(torch.ones(5)), 12)
    5.0
    """
    s = torch.as_tensor(singular_values, dtype=torch.float64).clamp_min(0)
    total = float(s.sum())
    if total <= 0.0:
        return None
    p = s / total
    p = p[p > 0]  # 0 * log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def lora_delta_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of s * B @ A from the r x r core, with no m x n SVD.

    B = Qb Rb and A^T = Qa Ra (thin QR), so s B A = Qb (s Rb Ra^T) Qa^T with orthonormal Qb, Qa:
    the singular values of the r x r core are those of the update.
    """
    _, r_b = torch.linalg.qr(b)  # (m, r) -> (r, r)
    _, r_a = torch.linalg.qr(a.T)  # (n, r) -> (r, r)
    core = scale * (r_b @ r_a.T)  # (r, r)
    # LAPACK for an r x r core whatever the run's routes: not a quantity a route is chosen for.
    return svdvals(core, backend="torch")  # checks finiteness (s can overflow the product), maps LinAlgError


@functools.lru_cache(maxsize=32)
def _random_max_cos(dim: int, n_vectors: int, samples: int, seed: int) -> np.ndarray:
    """`samples` draws of max |cos| between a uniformly random unit vector in R^dim and `n_vectors`
    orthonormal vectors (read-only).

    By rotation invariance the cosines are the first `n_vectors` coordinates of a uniform point on the
    sphere, i.e. g_i / ||g|| with g ~ N(0, I_dim).  We draw g_1..g_p exactly and the rest of ||g||^2 as
    one chi-square(dim - p) variable, so the cost is O(samples * p), not O(samples * dim).
    """
    if not 0 < n_vectors <= dim:
        raise ValueError(f"need 0 < n_vectors <= dim, got {n_vectors}, {dim}")
    rng = np.random.default_rng(seed)
    batch = max(1, min(samples, 2_000_000 // n_vectors))
    maxima = []
    for start in range(0, samples, batch):
        count = min(batch, samples - start)
        head = rng.standard_normal((count, n_vectors))
        rest = rng.chisquare(dim - n_vectors, count) if dim > n_vectors else np.zeros(count)
        norm = np.sqrt((head**2).sum(axis=1) + rest)
        maxima.append(np.abs(head).max(axis=1) / norm)
    values = np.concatenate(maxima)
    values.flags.writeable = False  # shared through the cache
    return values


@functools.lru_cache(maxsize=256)
def null_max_cos(dim: int, n_vectors: int, samples: int = 4000, seed: int = 0) -> float:
    """Expected max |cos| between a uniformly random unit vector in R^dim and `n_vectors` orthonormal
    vectors: the level a direction unrelated to the base reaches by chance (docs/METHOD.md, "Chance level").

    Monte Carlo with a fixed seed (`_random_max_cos`): deterministic, standard error below 1e-3 of the value.
    """
    return float(_random_max_cos(dim, n_vectors, samples, seed).mean())


def null_intruder_probability(dim: int, n_vectors: int, epsilon: float, samples: int = 4000,
                              seed: int = 0) -> float:
    """Probability that a uniformly random unit vector in R^dim counts as an intruder against
    `n_vectors` orthonormal base vectors, P(max |cos| < epsilon): the share of intruders a matrix would
    show if its tuned vectors were random directions (docs/METHOD.md, "Chance level").

    Same fixed-seed Monte Carlo draws as `null_max_cos` (resolution 1 / samples).
    """
    values = _random_max_cos(dim, n_vectors, samples, seed)
    return float(np.count_nonzero(is_intruder(values, epsilon)) / values.size)


def null_max_cos_approx(dim: int, n_vectors: int) -> float:
    """Closed-form scale sqrt(2 ln(2 p) / dim), for documentation and sanity checks."""
    return math.sqrt(2.0 * math.log(2.0 * n_vectors) / dim)
