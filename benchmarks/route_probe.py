"""The run-time measurement behind "auto" on a CPU: LAPACK against the float64 Gram routes, on this BLAS.

numerics/backends.py decides from it (and only there); this module only measures, on one matrix with a
planted spectrum A = Q1 diag(s) Q2^T (orthogonal Q1, Q2; s from 1 down to 1e-4, every gap of the top 10
about 1.2%): seconds of LAPACK's `svd` and `svdvals` in fp32 against the Gram routes' `left_svd` and
`svdvals` (numerics/gram.py), one run each in CPU seconds on one thread (robust to a loaded machine),
and the Gram routes' errors against the planted truth at docs/METHOD.md's fp32 tolerances (singular values
within 1e-5 sigma_1, each of the top 10 left vectors within sin(angle) 1e-4).  About 2 s (MKL, this CPU).

A small square probe is conservative: LAPACK's bidiagonalisation is cache-resident at this size and
memory-bound at Llama sizes, so the Gram routes' advantage grows with size (measured on MKL: Gram/LAPACK
time 0.6-0.9 at 1024, 0.3-0.45 at 4096; benchmarks/README.md).  A wrong call costs speed, never accuracy:
both routes are checked here, and the Gram route is only offered at fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lorascale.numerics import gram

PROBE_SIZE = 1024
SIGMA_TOLERANCE = 1e-5  # docs/METHOD.md, fp32: singular values to 1e-5 of sigma_max
VECTOR_TOLERANCE = 1e-4  # docs/METHOD.md, fp32: max_cos / top-10 vectors to 1e-4


@dataclass(frozen=True)
class ProbeResult:
    size: int
    lapack_svd_s: float  # CPU seconds on one thread, fp32 torch.linalg.svd
    lapack_svdvals_s: float  # seconds, fp32 torch.linalg.svdvals
    gram_left_s: float  # seconds, gram.left_svd (U, S from the float64 Gram matrix)
    gram_values_s: float  # seconds, gram.svdvals
    gram_sigma_error: float  # max |s~ - s| / s_1 of gram.svdvals
    gram_vector_error: float  # max over the top 10 of sin(angle(u~_j, u_j)) of gram.left_svd
    threads: int  # torch's thread count for the run (the probe itself runs on one)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and k.endswith("_s") else v) for k, v in asdict(self).items()}


def planted(size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A fp32 (size, size), its left singular vectors (size, size) float64, its singular values float64).

    Q1 is the orthonormal DCT-II basis and Q2 the same with its rows shuffled: exactly orthogonal, dense,
    and built in O(size^2), where a random orthogonal matrix would cost a QR as large as what is timed."""
    index = torch.arange(size, dtype=torch.float64)
    q1 = torch.cos(torch.pi * (index[:, None] + 0.5) * index[None, :] / size) * (2.0 / size) ** 0.5  # (d, d)
    q1[:, 0] /= 2.0 ** 0.5
    q2 = q1[torch.randperm(size, generator=torch.Generator().manual_seed(seed))]
    s = torch.logspace(0, -4, size, dtype=torch.float64)
    return ((q1 * s) @ q2.T).to(torch.float32), q1, s  # (d, d) * (d,) @ (d, d)


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    """(CPU seconds of this process, result) of one call.  The probe runs on one thread (see probe()), so
    CPU time is the work done, whatever else the machine runs: wall time on a shared machine measures the
    neighbours as much as the routes."""
    started = time.process_time()
    result = call()
    return time.process_time() - started, result


def sin_angles(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """sin(angle) between matching columns of `approx` and unit-length `exact`, from the orthogonal part
    (1 - cos^2 would lose it to the rounding of fp32 columns' norms)."""
    approx = approx.double()
    approx = approx / torch.linalg.vector_norm(approx, dim=0)
    cos = (approx * exact).sum(0)  # (q,)
    return torch.linalg.vector_norm(approx - exact * cos, dim=0)


def probe(size: int = PROBE_SIZE) -> ProbeResult:
    """Time and check LAPACK and the Gram routes once on a planted (size, size) fp32 matrix, on the CPU, on
    one thread (torch's thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe(size, threads)
    finally:
        torch.set_num_threads(threads)


def _probe(size: int, threads: int) -> ProbeResult:
    a, u_true, s_true = planted(size)
    warm = a[:64, :64]  # first calls pay one-time library set-up (thread pools, workspace queries): not timed
    for call in (lambda m: torch.linalg.svd(m, full_matrices=False), torch.linalg.svdvals, gram.left_svd, gram.svdvals):
        call(warm)
    svd_s, _ = _timed(lambda: torch.linalg.svd(a, full_matrices=False))
    left_s, (u, _) = _timed(lambda: gram.left_svd(a))
    svdvals_s, _ = _timed(lambda: torch.linalg.svdvals(a))
    values_s, values = _timed(lambda: gram.svdvals(a))
    return ProbeResult(
        size=size, lapack_svd_s=svd_s, lapack_svdvals_s=svdvals_s, gram_left_s=left_s, gram_values_s=values_s,
        gram_sigma_error=float((values.double() - s_true).abs().max() / s_true[0]),
        gram_vector_error=float(sin_angles(u[:, :10], u_true[:, :10]).max()), threads=threads)
