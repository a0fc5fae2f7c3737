"""Definition 1 of the paper, written once: tuned singular vector j is an intruder dimension iff max_cos_j <
epsilon, and a matrix's count at (k, epsilon) is the number of intruders among its top k vectors.

Every count lorascale makes goes through these two functions: the worker's `matrices.intruders`, the summary
re-thresholded at another (k, epsilon), the report's curves.  Elementwise on numpy arrays and torch tensors
alike, and importing no torch, so the CLI's summary stays light.  A NaN max_cos (a vector a topk run did not
compute) is never an intruder.
"""

from __future__ import annotations

from typing import Any


def is_intruder(max_cos: Any, epsilon: float) -> Any:
    """Whether each vector is an intruder: max_cos < epsilon (a boolean array of the same shape)."""
    return max_cos < epsilon


def intruder_count(max_cos: Any, k: int, epsilon: float) -> int:
    """How many of the top-k tuned vectors (max_cos in rank order) are intruders."""
    return int(is_intruder(max_cos[:k], epsilon).sum())
