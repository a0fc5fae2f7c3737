"""Mixture-of-experts matrices: per-expert 2-D tensors, expert slices of fused 3-D tensors, and fused expert
parameters that a base stores one expert at a time (transformers' conversion mapping, io/moe_layouts.py).

Per-expert 2-D tensors (`experts.N.w1`) are ordinary matrices labelled with their expert; fused 3-D expert
tensors ([num_experts, d1, d2] under an `experts` module) become one job per expert slice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lorascale.errors import MismatchError
from lorascale.io.moe_layouts import saved_expert_parts
from lorascale.io.safetensors_header import DTYPE_BITS
from lorascale.plan.names import BaseMatrices
from lorascale.plan.rename import renamed_names
from lorascale.records import TensorEntry

_EXPERTS = re.compile(r"(?:^|\.)experts(?:\.|$)")
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")


def is_fused_experts(name: str, entry: TensorEntry) -> bool:
    """A 3-D tensor of an `experts` module: [num_experts, d1, d2], analysed expert by expert."""
    return len(entry.shape) == 3 and _EXPERTS.search(name) is not None


def expert_of(name: str) -> int | None:
    """The expert index of a per-expert tensor name (`...experts.N.w1.weight`), else None."""
    match = _EXPERT_INDEX.search(name)
    return int(match[1]) if match else None


def expert_slice(entry: TensorEntry, expert: int) -> TensorEntry:
    """Expert `expert`'s [d1, d2] slice of a fused [E, d1, d2] tensor: a contiguous byte range of it, or for a
    strided view from a torch.save file (entry.strides), the range spanning the slice and its two strides."""
    count, rows, cols = entry.shape
    if entry.strides is None:
        size = (entry.data_end - entry.data_start) // count
        start = entry.data_start + expert * size
        return replace(entry, shape=(rows, cols), data_start=start, data_end=start + size, expert=expert)
    item = max(DTYPE_BITS.get(entry.dtype, 8) // 8, 1)  # strided entries come from .bin files: whole bytes
    first, row_stride, col_stride = entry.strides
    start = entry.data_start + expert * first * item
    span = ((rows - 1) * row_stride + (cols - 1) * col_stride + 1) * item
    strides = None if (row_stride, col_stride) == (cols, 1) else (row_stride, col_stride)
    return replace(entry, shape=(rows, cols), data_start=start, data_end=start + span, strides=strides,
                   expert=expert)


def units(name: str, entry: TensorEntry) -> list[tuple[int | None, TensorEntry]]:
    """(expert, matrix) pairs a selected tensor is analysed as: itself, or one slice per expert."""
    if len(entry.shape) == 3:
        return [(e, expert_slice(entry, e)) for e in range(entry.shape[0])]
    return [(expert_of(name), entry)]


def unit_name(name: str, entry: TensorEntry, expert: int | None) -> str:
    """The `matrix` column: the base tensor's name, and `name[N]` for expert N's slice of a fused tensor."""
    return f"{name}[{expert}]" if len(entry.shape) == 3 else name


@dataclass(frozen=True)
class PerExpertBase:
    """A fused expert parameter that the base stores one expert at a time, as transformers saves it: expert e's
    slice [out, in] of the fused [E, out, in] parameter is its parts `parts[e]` (w1, w3) stacked along out."""

    parts: tuple[tuple[str, ...], ...]  # [expert][part] base tensor names, parts in concatenation order
    rows: tuple[int, ...]  # rows of each part
    cols: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.parts), sum(self.rows), self.cols


_FIRST_EXPERT = re.compile(r"(^|\.)experts\.0(\.|$)")


def match_per_expert(reference: str, selection: BaseMatrices, candidates: Sequence[str]) -> dict[str, PerExpertBase]:
    """Targeted fused expert parameters (in-memory paths with no such base tensor) that the base stores per
    expert under the names transformers' conversion mapping gives them (moe_layouts.saved_expert_parts)."""
    variants = {c: saved_expert_parts(selection.model_type, c, 0) for c in candidates}
    variants = {c: v for c, v in variants.items() if v}
    if not variants:
        return {}
    names = renamed_names(reference, {n for options in variants.values() for parts in options for n in parts},
                          selection.rename)
    by_stored = {stored: new for new, stored in names.items()}
    targets = selection.matcher.match_all(names, where=reference)
    found: dict[str, PerExpertBase] = {}
    for candidate, options in variants.items():
        for parts in options:
            first = [targets.get(by_stored[n]) for n in parts]
            if all(f is not None and _FIRST_EXPERT.search(f) for f in first):
                found[candidate] = _per_expert_base(candidate, [f for f in first if f is not None], selection)
                break
    return found


def _per_expert_base(parameter: str, first: list[str], selection: BaseMatrices) -> PerExpertBase:
    """Expert 0's part tensors `first`, and every further expert the base has them for (experts.1., ...)."""
    experts: list[tuple[str, ...]] = []
    while True:
        names = tuple(_FIRST_EXPERT.sub(rf"\g<1>experts.{len(experts)}\g<2>", n, count=1) for n in first)
        if not all(n in selection.base_2d for n in names):
            break
        experts.append(names)
    shapes = [selection.base_2d[n].shape for n in experts[0]]
    for names in experts:
        found = [selection.base_2d[n].shape for n in names]
        if found != shapes or len({cols for _, cols in found}) != 1:
            raise MismatchError(
                f"the base stores {parameter} per expert, but its parts {list(names)} have shapes "
                f"{[list(s) for s in found]}, which do not stack into one [E, out, in] parameter like expert 0's "
                f"{[list(s) for s in shapes]}", path=selection.base_2d[names[0]].location, tensor=names[0],
                fix="the base checkpoint is not the model the adapter was trained on, or it is damaged")
    return PerExpertBase(parts=tuple(experts), rows=tuple(rows for rows, _ in shapes), cols=shapes[0][1])


