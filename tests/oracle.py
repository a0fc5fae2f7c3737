"""A float64 numpy implementation of docs/METHOD.md, written independently of lorascale's torch code."""

from __future__ import annotations

import numpy as np


def svd(w: np.ndarray):
    return np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)


def max_cos(w0: np.ndarray, w: np.ndarray, side: str = "left"):
    u0, _, vt0 = svd(w0)
    u, s, vt = svd(w)
    a, b = (u, u0) if side == "left" else (vt.T, vt0.T)
    sim = np.abs(a.T @ b)
    return s, sim.max(axis=1), sim.argmax(axis=1), sim[:10, :10]


def intruders(w0: np.ndarray, w: np.ndarray, k: int, epsilon: float, side: str = "left") -> int:
    _, mc, _, _ = max_cos(w0, w, side)
    return int((mc[:k] < epsilon).sum())


def effective_rank(s: np.ndarray) -> float:
    s = np.asarray(s, dtype=np.float64)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def delta_metrics(w0: np.ndarray, w: np.ndarray):
    d = np.asarray(w, np.float64) - np.asarray(w0, np.float64)
    s = np.linalg.svd(d, compute_uv=False)
    fro = float(np.linalg.norm(d))
    return fro, fro / float(np.linalg.norm(np.asarray(w0, np.float64))), effective_rank(s)


def separated(rows: int, cols: int, rng: np.random.Generator, *, top: float = 10.0, gap: float = 0.9):
    """A matrix whose singular values decay geometrically (ratio `gap`), so every singular vector is well
    defined and fp32 vectors can be compared with float64 ones entry by entry."""
    p = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, p)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, p)))
    s = top * gap ** np.arange(p) + 0.05 * top * np.linspace(1, 0.5, p)
    return (u * s) @ v.T


def singular_value_gaps(s: np.ndarray, complement: bool) -> np.ndarray:
    """Distance of each singular value to its nearest neighbour (and to 0 when the side has a complement)."""
    gap = np.full(len(s), np.inf)
    diff = -np.diff(s)
    gap[:-1] = np.minimum(gap[:-1], diff)
    gap[1:] = np.minimum(gap[1:], diff)
    if complement:
        gap = np.minimum(gap, s)
    return np.maximum(gap, 1e-300)


# --- docs/METHOD.md, "The other standard questions about an update" (issue 25) --------------------------------


def np_energy_rank(s: np.ndarray, fraction: float) -> int:
    energy = np.sort(np.asarray(s, np.float64))[::-1] ** 2
    total = energy.sum()
    if total == 0:
        return 0
    return next(k for k in range(1, len(energy) + 1) if energy[:k].sum() >= fraction * total)


def np_amplification(w0: np.ndarray, delta: np.ndarray, r: int) -> float:
    u, _, vt = np.linalg.svd(delta, full_matrices=False)
    return float(np.linalg.norm(delta) / np.linalg.norm(u[:, :r].T @ w0 @ vt[:r].T))


def np_phi(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.T @ b) ** 2 / min(a.shape[1], b.shape[1]))


def np_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.T @ b).max(axis=1).mean())
