"""Intruder mitigation for one adapted matrix (Shuttleworth et al. 2024, Section 6; peft's
reduce_intruder_dimension): scale W's intruder components by lambda and write the new update back as LoRA
factors.  Pure: tensors in, tensors out.  docs/METHOD.md section 10 states the formulas.

With W = W0 + dW (dW = s B A, or s (B A)^T for a Conv1D W0 stored [in, out]) and the intruders I among W's
top k singular triplets (u_i, s_i, v_i):

    W'  = W + (lambda - 1) sum_{i in I} u_i s_i v_i^T        dW' = W' - W0 = dW + (lambda - 1) U_I S_I V_I^T

dW' has rank at most r + |I|: its columns lie in span(B, U_I) and its rows in span(A^T, V_I).  With
orthonormal bases L of the first and R of the second, dW' = L C R^T for the (r + |I|)-square core
C = L^T dW' R, so the SVD of C gives dW' exactly, without an m x n decomposition.  The new factors keep the
module's scale s (alpha is adjusted to the new rank) and split each singular value's square root between B
and A, as peft does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lorascale.numerics.operators import LowRankUpdate

RankMode = Literal["r", "r+intruders", "auto"]
# `auto` keeps the singular values of dW' above this fraction of the largest (its numerical rank).
AUTO_RANK_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
DEPENDENT_TOLERANCE = 1e-12  # the core is float64: below this fraction of its largest value, a singular value is 0


@dataclass(frozen=True)
class MitigatedFactors:
    """The new LoRA factors of one module, in peft's layout (A (r', in), B (out, r')), and what changed."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int  # r'
    delta_ratio: float  # ||dW'||_F / ||dW||_F (dW' as written)
    kept: float  # ||written dW'||_F / ||exact dW'||_F: below 1 only when --rank r truncates


def intruder_directions(update: LowRankUpdate, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The right singular vectors V (n, q) of W that go with its left ones U (m, q) and values S: W^T u / s.

    Exact for singular triplets; computed from W (as products) so that a left-only SVD route serves too."""
    return update.rmatmul(u) / s.clamp_min(torch.finfo(s.dtype).tiny)  # (n, m) @ (m, q) -> (n, q)


def mitigate_update(update: LowRankUpdate, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                    mitigation_lambda: float, *, rank: RankMode) -> MitigatedFactors:
    """New factors for dW' = dW + (lambda - 1) U S V^T, with U (m, q), S (q,), V (n, q) the intruders'
    singular triplets of W = update (W0 stored, so m x n as stored; q may be 0).

    `rank`: "r+intruders" keeps dW' exactly (r' = r + q, fewer only where dW' has lower rank: dependent bases,
    or lambda = 1), "r"
    truncates it to the original rank (peft's choice), "auto" keeps its numerical rank.
    """
    scale = update.scale
    a, b = update.a, update.b
    # dW = left @ right^T as stored: (m, r) @ (r, n)
    left, right = (a.T, scale * b) if update.transposed else (b, scale * a.T)
    columns = torch.cat([left, u], dim=1).to(torch.float64)  # (m, r + q)
    rows = torch.cat([right, v], dim=1).to(torch.float64)  # (n, r + q)
    basis_l, _ = torch.linalg.qr(columns)  # (m, r + q)
    basis_r, _ = torch.linalg.qr(rows)  # (n, r + q)
    intruder = (mitigation_lambda - 1.0) * ((basis_l.T @ u.double()) * s.double()) @ (v.double().T @ basis_r)
    core = (basis_l.T @ left.double()) @ (right.double().T @ basis_r) + intruder  # (r+q, r+q)
    before = float(torch.linalg.norm((basis_l.T @ left.double()) @ (right.double().T @ basis_r)))
    core_u, sigma, core_vh = torch.linalg.svd(core)
    kept_rank = _rank(sigma, a.shape[0], u.shape[1], rank, update.dtype)
    sigma_kept = sigma[:kept_rank]
    total = float(torch.linalg.norm(sigma))
    p = basis_l @ core_u[:, :kept_rank]  # (m, r'): dW' = p diag(sigma) q^T as stored
    q = basis_r @ core_vh[:kept_rank].T  # (n, r')
    magnitude = abs(scale) if scale != 0 else 1.0
    root = (sigma_kept / magnitude).sqrt()  # s B' A' = sign(s) p diag(sigma) q^T: B' carries the sign
    sign = -1.0 if scale < 0 else 1.0
    if update.transposed:  # dW' stored [in, out] = s A'^T B'^T: A' = (p sqrt)^T, B' = q sqrt
        new_a, new_b = (p * root).T, sign * (q * root)
    else:  # dW' = s B' A': B' = p sqrt, A' = (q sqrt)^T
        new_a, new_b = (q * root).T, sign * (p * root)
    written = float(torch.linalg.norm(sigma_kept))
    return MitigatedFactors(a=new_a.to(update.dtype).contiguous(), b=new_b.to(update.dtype).contiguous(),
                            rank=kept_rank, delta_ratio=written / before if before > 0 else math.inf,
                            kept=written / total if total > 0 else 1.0)


def _rank(sigma: torch.Tensor, r: int, intruders: int, mode: RankMode, dtype: torch.dtype) -> int:
    """r' for the core's singular values `sigma` (descending)."""
    available = int(sigma.shape[0])
    if mode == "r":
        return min(r, available)
    if mode == "auto":
        tolerance = AUTO_RANK_TOLERANCE.get(dtype, 1e-6) * float(sigma[0]) if available else 0.0
        return max(1, int((sigma > tolerance).sum()))
    # r + |I|, less the directions dW' does not have (dependent bases; lambda = 1 adds nothing): singular values of
    # the float64 core at its round-off level are zeros, dropping them changes nothing.
    exact = int((sigma > DEPENDENT_TOLERANCE * float(sigma[0])).sum()) if available else 0
    return max(1, min(r + intruders, available, exact))
