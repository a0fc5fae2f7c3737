"""Compare one tuned matrix with its base matrix (docs/METHOD.md, sections 2-5).  Pure: tensors in, arrays out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorascale.numerics.backends import Routes
from lorascale.numerics.metrics import SIMILARITY_BLOCK, effective_rank, max_cos, null_max_cos, similarity_block
from lorascale.numerics.svd import left_svd, svd, svdvals
from lorascale.numerics.topk import DEFAULT_TOLERANCE, TopCheck, check_top, top_singular

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
    max_cos: np.ndarray  # (p,) float64, max_i |cos(tuned_j, base_i)|; NaN beyond K in topk mode
    argmax: np.ndarray  # (p,) int64; -1 beyond K in topk mode
    block: np.ndarray  # (b, b) |cos| of the top tuned (rows) vs top base (cols) vectors


@dataclass(frozen=True)
class TunedComparison:
    s: np.ndarray  # (p,) singular values of W
    sides: dict[str, SideComparison]
    delta_fro: float
    delta_rel: float
    delta_effective_rank: float | None
    top_check: TopCheck | None = None  # topk mode: the guard's verdict (failed: exact SVD was used)


@dataclass(frozen=True)
class ComparisonSettings:
    """How one tuned matrix is compared: the backend of each quantity (resolved for this matrix's shape by
    execute/routes.py), the cuSOLVER driver, and what is computed."""

    routes: Routes
    driver: str | None = None
    top_k: int | None = None  # None: exact mode (every tuned vector); K: topk mode (the top K)
    separated: int = 10  # the first vectors (the top k counted for intruders) whose angle the topk guard bounds
    block: int = SIMILARITY_BLOCK  # the similarity block is block x block
    topk_tolerance: float = DEFAULT_TOLERANCE


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


def compare_to_base(base: BaseSpectrum, w: torch.Tensor, settings: ComparisonSettings, *,
                    delta_singular_values: torch.Tensor | None = None,
                    w0: torch.Tensor | None = None) -> TunedComparison:
    """SVD of W and its similarity to the base spectrum; metrics of dW = W - W0.

    Pass `w0` for a full fine-tune (dW's singular values come from svdvals(W - W0)), or
    `delta_singular_values` for an adapter (from the r x r core, see lora_delta_singular_values).

    `settings.top_k=None` (exact mode): the full SVD of W, max_cos for every tuned vector.  `top_k=K` (topk
    mode): all singular values from svdvals, and max_cos/argmax only for the top K vectors (NaN/-1 beyond),
    from top_singular() when its guard passes at `topk_tolerance` (the first `separated` vectors, those
    whose intruder status is counted, with a bound on their angle), else from the exact SVD.
    """
    p = min(w.shape)
    u, s, vh, check = _tuned_vectors(w, settings, right=("right" in base.vectors))
    tuned_vectors = {"left": u, "right": vh.T if vh is not None else None}
    sides = {}
    for side, base_vectors in base.vectors.items():
        values, index = max_cos(tuned_vectors[side], base_vectors)
        sides[side] = SideComparison(
            max_cos=_pad(_np(values), p, np.nan), argmax=_pad(index.cpu().numpy(), p, -1),
            block=_np(similarity_block(tuned_vectors[side], base_vectors, settings.block)),
        )
    if delta_singular_values is None:
        if w0 is None:
            raise ValueError("pass w0 (full fine-tune) or delta_singular_values (adapter)")
        delta_singular_values = svdvals(w - w0, driver=settings.driver, backend=settings.routes.delta)
    delta_fro = float(torch.linalg.norm(delta_singular_values.double()))
    return TunedComparison(
        s=_np(s), sides=sides, delta_fro=delta_fro,
        delta_rel=delta_fro / base.fro if base.fro > 0 else float("inf"),
        delta_effective_rank=effective_rank(delta_singular_values) if delta_fro > 0 else None,
        top_check=check,
    )


def _tuned_vectors(w: torch.Tensor, settings: ComparisonSettings, *, right: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, TopCheck | None]:
    """(U, S, Vh or None, the topk guard's verdict or None) of the tuned W: every vector (exact mode), or the
    top K with every singular value (topk mode, the exact SVD where the guard fails)."""
    routes, driver, top_k = settings.routes, settings.driver, settings.top_k
    if top_k is None:
        if not right:  # no right vectors needed: the Gram route skips V
            u, s = left_svd(w, driver=driver, backend=routes.tuned)
            return u, s, None, None
        u, s, vh = svd(w, driver=driver, backend=routes.tuned)
        return u, s, vh, None
    s = svdvals(w, driver=driver, backend=routes.values)
    top = top_singular(w, min(top_k, min(w.shape)), driver=driver, backend=routes.tuned)
    check = check_top(w, top, s, settings.topk_tolerance, separated=settings.separated)
    u, vh = top.u, top.vh
    if not check.passed:
        u, _, vh = svd(w, driver=driver, backend=routes.tuned)
        u, vh = u[:, :top_k], vh[:top_k]
    return u, s, vh, check


def _pad(values: np.ndarray, length: int, fill: float) -> np.ndarray:
    """Extend per-vector values (q,) to one per singular value (length,), `fill` for vectors not computed."""
    if values.shape[0] == length:
        return values
    out = np.full(length, fill, dtype=values.dtype)
    out[:values.shape[0]] = values
    return out


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()
