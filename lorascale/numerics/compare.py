"""Compare one tuned matrix with its base matrix (METHOD.md, Section 3).  Pure: tensors in, arrays out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorascale.numerics.metrics import effective_rank, max_cos, null_max_cos, similarity_block
from lorascale.numerics.svd import svd, svdvals

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
    max_cos: np.ndarray  # (p,) float64, max_i |cos(tuned_j, base_i)|
    argmax: np.ndarray  # (p,) int64
    block: np.ndarray  # (b, b) |cos| of the top tuned (rows) vs top base (cols) vectors


@dataclass(frozen=True)
class TunedComparison:
    s: np.ndarray  # (p,) singular values of W
    sides: dict[str, SideComparison]
    delta_fro: float
    delta_rel: float
    delta_effective_rank: float | None


def base_spectrum(w0: torch.Tensor, sides: tuple[str, ...], *, driver: str | None = None) -> BaseSpectrum:
    """SVD of the base matrix W0 (m, n), keeping only the singular vectors the requested sides need."""
    u0, s0, vh0 = svd(w0, driver=driver)
    vectors = {}
    if "left" in sides:
        vectors["left"] = u0
    if "right" in sides:
        vectors["right"] = vh0.T  # (n, p)
    p = s0.shape[0]
    dims = {"left": w0.shape[0], "right": w0.shape[1]}
    return BaseSpectrum(
        s=s0, vectors=vectors, fro=float(torch.linalg.norm(s0.double())),
        null_max_cos={side: null_max_cos(dims[side], p) for side in sides},
    )


def compare_to_base(base: BaseSpectrum, w: torch.Tensor, *, delta_singular_values: torch.Tensor | None = None,
                    w0: torch.Tensor | None = None, block: int = 10, driver: str | None = None) -> TunedComparison:
    """SVD of W and its similarity to the base spectrum; metrics of dW = W - W0.

    Pass `w0` for a full fine-tune (dW's singular values come from svdvals(W - W0)), or
    `delta_singular_values` for an adapter (from the r x r core, see lora_delta_singular_values).
    """
    u, s, vh = svd(w, driver=driver)
    tuned_vectors = {"left": u, "right": vh.T}
    sides = {}
    for side, base_vectors in base.vectors.items():
        values, index = max_cos(tuned_vectors[side], base_vectors)
        sides[side] = SideComparison(
            max_cos=_np(values), argmax=index.cpu().numpy(),
            block=_np(similarity_block(tuned_vectors[side], base_vectors, block)),
        )
    if delta_singular_values is None:
        if w0 is None:
            raise ValueError("pass w0 (full fine-tune) or delta_singular_values (adapter)")
        delta_singular_values = svdvals(w - w0, driver=driver)
    delta_fro = float(torch.linalg.norm(delta_singular_values.double()))
    return TunedComparison(
        s=_np(s), sides=sides, delta_fro=delta_fro,
        delta_rel=delta_fro / base.fro if base.fro > 0 else float("inf"),
        delta_effective_rank=effective_rank(delta_singular_values) if delta_fro > 0 else None,
    )


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()
