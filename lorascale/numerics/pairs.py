"""Fine-tune against fine-tune (docs/METHOD.md, "The other standard questions about an update"): for two
tuned models A, B of the same base, per matrix and side, the best-match agreement of A's top-k singular
vectors against B's and the subspace overlap phi of the two top-k subspaces.  Pure: tensors in, rows out.

Only each model's top-k vectors of the matrix being processed are needed, so memory stays flat however many
models and matrices a run has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascale.numerics.spectral import best_match_agreement, subspace_overlap


@dataclass(frozen=True)
class PairRow:
    """One ordered pair (A, B) on one side: agreement is A's vectors matched in B (not symmetric), phi is."""

    model_a: str
    model_b: str
    side: str
    agreement: float | None
    subspace_overlap: float | None


def pair_rows(top_vectors: dict[str, dict[str, torch.Tensor]]) -> list[PairRow]:
    """Every ordered pair of distinct models (both ways round) on every side both computed.

    `top_vectors`: model -> side -> (d, k) orthonormal top-k singular vectors of that model's W, in the order
    the models were given.  Fewer than two models: no rows.
    """
    models = list(top_vectors)
    rows = []
    for a in models:
        for b in models:
            if a == b:
                continue
            for side, vectors_a in top_vectors[a].items():
                vectors_b = top_vectors[b].get(side)
                if vectors_b is None:
                    continue
                rows.append(PairRow(model_a=a, model_b=b, side=side,
                                    agreement=best_match_agreement(vectors_a, vectors_b),
                                    subspace_overlap=subspace_overlap(vectors_a, vectors_b)))
    return rows
