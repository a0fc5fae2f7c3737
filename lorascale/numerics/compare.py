"""Compare one tuned matrix with its base matrix (docs/METHOD.md, sections 2-5).  Pure: tensors in, arrays out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lorascale.numerics.backends import Routes
from lorascale.numerics.metrics import SIMILARITY_BLOCK, effective_rank, max_cos, null_max_cos, similarity_block
from lorascale.numerics.operators import Dense, LowRankUpdate
from lorascale.numerics.spectral import (UpdateMeasures, UpdateSpectrum, dense_update_spectrum, subspace_overlap,
                                         update_measures)
from lorascale.numerics.svd import left_svd, svd
from lorascale.numerics.topk import ANGLE_TOLERANCE, DEFAULT_OVERSAMPLE, TopCheck, top_singular

Operator = Dense | LowRankUpdate

SIDES = ("left", "right")


@dataclass(frozen=True)
class BaseSpectrum:
    """SVD of W0, computed once per matrix and shared by every tuned model of the run."""

    s: torch.Tensor  # (p,) descending
    vectors: dict[str, torch.Tensor]  # "left": U0 (m, p); "right": V0 (n, p)
    fro: float  # ||W0||_F
    null_max_cos: dict[str, float]  # chance level of max |cos| per side


@dataclass(frozen=True)
class SideComparison:
    max_cos: np.ndarray  # (q,) float64, max_i |cos(tuned_j, base_i)| over every base vector i
    argmax: np.ndarray  # (q,) int64
    block: np.ndarray  # (b, b) |cos| of the top tuned (rows) vs top base (cols) vectors


@dataclass(frozen=True)
class TunedComparison:
    s: np.ndarray  # (q,) the tuned singular values computed: all p (exact mode), the top K (topk mode)
    sides: dict[str, SideComparison]
    delta_fro: float
    delta_rel: float
    delta_effective_rank: float | None
    top_check: TopCheck | None = None  # topk mode: the guard's verdict (failed: exact SVD was used)
    # Issue 25 (numerics/spectral.py): dW's singular values, the per-matrix measures, the top-k tuned vectors
    # per side (for fine-tune vs fine-tune pairs), and each stored vector's angle bound (topk mode, guard passed).
    delta_s: np.ndarray | None = None
    measures: UpdateMeasures | None = None
    top_vectors: dict[str, torch.Tensor] | None = None
    angle_bounds: np.ndarray | None = None


@dataclass(frozen=True)
class ComparisonSettings:
    """How one tuned matrix is compared: the backend of each quantity (resolved for this matrix's shape by
    execute/routes.py), the cuSOLVER driver, and what is computed."""

    routes: Routes
    driver: str | None = None
    top_k: int | None = None  # None: exact mode (every tuned vector); K: topk mode (the top K)
    separated: int = 10  # the first vectors (the top k counted for intruders) whose angle the topk guard bounds
    block: int = SIMILARITY_BLOCK  # the similarity block is block x block
    topk_tolerance: float = ANGLE_TOLERANCE
    amplification_rank: int = 16  # r of the amplification factor for a dense dW (the run's: request.Analysis)


def base_spectrum(w0: torch.Tensor, sides: tuple[str, ...], *, backend: str,
                  driver: str | None = None) -> BaseSpectrum:
    """SVD of the base matrix W0 (m, n), keeping only the singular vectors the requested sides need.

    Always the full SVD: max_cos is a maximum over ALL base vectors (docs/METHOD.md), whatever the mode.
    A left-side-only run asks the backend for U0 and S0 alone (left_svd: the Gram route then skips V0).
    `backend` is the run's base route (Routes.base).
    """
    if tuple(sides) == ("left",):
        u0, s0 = left_svd(w0, driver=driver, backend=backend)
        vh0 = None
    else:
        u0, s0, vh0 = svd(w0, driver=driver, backend=backend)
    # Row-major copies: the layout a cached entry is loaded in, so that products with them (and results)
    # are bit-identical whether the base came from the cache or not.
    vectors = {}
    if "left" in sides:
        vectors["left"] = u0.contiguous()  # (m, p)
    if "right" in sides:
        assert vh0 is not None
        vectors["right"] = vh0.T.contiguous()  # (n, p)
    del u0, vh0
    p = s0.shape[0]
    dims = {"left": w0.shape[0], "right": w0.shape[1]}
    return BaseSpectrum(
        s=s0, vectors=vectors, fro=float(torch.linalg.norm(s0.double())),
        null_max_cos={side: null_max_cos(dims[side], p) for side in sides},
    )


def compare_to_base(base: BaseSpectrum, tuned: Operator | torch.Tensor, settings: ComparisonSettings, *,
                    delta_singular_values: torch.Tensor | None = None, w0: torch.Tensor | None = None,
                    update: UpdateSpectrum | None = None) -> TunedComparison:
    """The tuned W's singular vectors and their similarity to the base spectrum; metrics of dW = W - W0.

    `tuned` is W (a tensor), or W as an operator (numerics/operators.py): an adapter's W0 + s B A is formed
    only where an exact SVD needs it.  Pass `w0` for a full fine-tune (dW's singular values come from
    svdvals(W - W0), plus the amplification), or `update` for an adapter (numerics/spectral.
    lowrank_update_spectrum: its r x r core; `delta_singular_values` alone leaves the amplification null).

    `settings.top_k=None` (exact mode): the full SVD of W; max_cos and singular values of every tuned vector.
    `top_k=K` (topk mode): the top K triplets from top_singular(), warm-started from the base's top vectors
    (and an adapter's B), when its guard passes at `topk_tolerance` for the first `separated` vectors (those
    whose intruder status is counted), else from the exact SVD; values, max_cos and argmax of those K only,
    or of the leading K' < K whose values are guarded to 1e-5 sigma_max (topk.TopSingular.guarded_count).
    """
    if isinstance(tuned, torch.Tensor):
        tuned = Dense(tuned)
    return summarise(base, tuned, tuned_triplets(base, tuned, settings), settings,
                     delta_singular_values=delta_singular_values, w0=w0, update=update)


@dataclass(frozen=True)
class Triplets:
    """The tuned W's singular triplets computed (all of them, or the top K), and the topk guard's verdict."""

    u: torch.Tensor  # (m, q)
    s: torch.Tensor  # (q,)
    vh: torch.Tensor | None  # (q, n); None when only left vectors were needed (exact mode, left side)
    check: TopCheck | None = None  # topk mode only
    angle_bounds: torch.Tensor | None = None  # (q,) topk mode, guard passed: each vector's sin(angle) bound


def summarise(base: BaseSpectrum, tuned: Operator, triplets: Triplets, settings: ComparisonSettings, *,
              delta_singular_values: torch.Tensor | None = None, w0: torch.Tensor | None = None,
              update: UpdateSpectrum | None = None) -> TunedComparison:
    """The comparison's numbers from W's triplets: max_cos, argmax and the similarity block per side, and
    dW's metrics (from `update` or `delta_singular_values` for an adapter, or from W - W0 with `w0`: its
    singular values and amplification, numerics/spectral.dense_update_spectrum)."""
    u, s, vh, check = triplets.u, triplets.s, triplets.vh, triplets.check
    tuned_vectors = {"left": u, "right": vh.T if vh is not None else None}
    sides, top_vectors = {}, {}
    for side, base_vectors in base.vectors.items():
        values, index = max_cos(tuned_vectors[side], base_vectors)
        sides[side] = SideComparison(max_cos=_np(values), argmax=index.cpu().numpy(),
                                     block=_np(similarity_block(tuned_vectors[side], base_vectors, settings.block)))
        top_vectors[side] = tuned_vectors[side][:, :settings.separated].contiguous()  # a copy: (d, k) only
    if update is None and delta_singular_values is None:
        if w0 is None:
            raise ValueError("pass w0 (full fine-tune) or delta_singular_values (adapter)")
        update = dense_update_spectrum(w0, tuned.dense() - w0, settings.amplification_rank, driver=settings.driver,
                                       backend=settings.routes.delta)
    delta_singular_values = update.s if update is not None else delta_singular_values
    assert delta_singular_values is not None
    delta_fro = float(torch.linalg.norm(delta_singular_values.double()))
    overlaps = {side: subspace_overlap(top_vectors[side], base.vectors[side][:, :settings.separated])
                for side in sides}
    measures = update_measures(base_s=base.s, update=update, delta_s=delta_singular_values, tuned=tuned,
                               tuned_top=float(s[0]) if s.numel() else 0.0, overlaps=overlaps)
    bounds = triplets.angle_bounds
    return TunedComparison(
        s=_np(s), sides=sides, delta_fro=delta_fro,
        delta_rel=delta_fro / base.fro if base.fro > 0 else float("inf"),
        delta_effective_rank=effective_rank(delta_singular_values) if delta_fro > 0 else None,
        top_check=check, delta_s=_np(delta_singular_values), measures=measures, top_vectors=top_vectors,
        angle_bounds=bounds.numpy() if bounds is not None and check is not None and check.passed else None,
    )


def tuned_triplets(base: BaseSpectrum, tuned: Operator, settings: ComparisonSettings) -> Triplets:
    """W's singular triplets as compare_to_base computes them: every one (exact mode; Vh None when only left
    vectors are needed), or the top K (topk mode; the top K of the exact SVD where the guard fails)."""
    routes, driver, top_k = settings.routes, settings.driver, settings.top_k
    right = "right" in base.vectors
    if top_k is None:
        w = tuned.dense()
        if not right:  # no right vectors needed: the Gram route skips V
            return Triplets(*left_svd(w, driver=driver, backend=routes.tuned), vh=None)
        return Triplets(*svd(w, driver=driver, backend=routes.tuned))
    top = top_singular(tuned, top_k, counted=settings.separated, warm=_warm_columns(base, tuned, top_k),
                       tolerance=settings.topk_tolerance)
    if top.check.passed:
        # Store what is claimed (issue 25): the leading values within 1e-5 sigma_max of true ones (fp32's
        # residual floor where larger), at least the counted k (their angle guard bounds them far tighter).
        floor = math.sqrt(min(tuned.shape)) * torch.finfo(top.s.dtype).eps
        keep = max(top.guarded_count(floor), min(settings.separated, top.s.numel()))
        bounds = top.angle_bounds[:keep] if top.angle_bounds is not None else None
        return Triplets(top.u[:, :keep], top.s[:keep], top.vh[:keep], top.check, bounds)
    u, s, vh = svd(tuned.dense(), driver=driver, backend=routes.tuned)
    return Triplets(u[:, :top_k], s[:top_k], vh[:top_k], top.check)


def _warm_columns(base: BaseSpectrum, tuned: Operator, top_k: int) -> torch.Tensor | None:
    """Left-space columns W's top singular vectors mostly lie in: an adapter's update directions (B, or A^T
    for a Conv1D W0), then the base's top left singular vectors (U0, or W V0 for a right-side-only run)."""
    width = top_k + DEFAULT_OVERSAMPLE
    columns = []
    if isinstance(tuned, LowRankUpdate):
        update = tuned.a.T if tuned.transposed else tuned.b  # (m, r)
        if update.shape[1] <= width // 2:  # a high-rank adapter's B is no better a start than U0
            columns.append(update)
    if "left" in base.vectors:
        columns.append(base.vectors["left"][:, :width])  # (m, b)
    elif "right" in base.vectors:
        columns.append(tuned.matmul(base.vectors["right"][:, :width]))  # (m, n) @ (n, b) -> (m, b)
    return torch.cat(columns, dim=1)[:, :width] if columns else None


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()
