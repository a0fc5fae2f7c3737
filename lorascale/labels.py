"""Short, unambiguous labels for model references and file-safe names for matrices.

References are whatever the user typed (`org/name`, `/scratch/run/checkpoint-100`,
`results/x.safetensors`); legends need them short but must never map two models to one label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_MAX_LABEL = 40


def _parts(reference: str) -> list[str]:
    return [p for p in re.split(r"[\\/]+", reference) if p not in ("", ".")]


def _middle_cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def short_labels(references: Sequence[str], *, limit: int = _MAX_LABEL) -> dict[str, str]:
    """Map each reference to the shortest unique tail of its path components.

    Labels keep at least the last two components (hub ids `org/name` stay whole); longer paths keep only
    as many trailing components as needed to tell them apart and mark the cut with "…/". Labels longer
    than `limit` are cut in the middle only when that keeps them unique.

    >>> labels = short_labels(["/a/x/run/checkpoint-100", "/a/y/run/checkpoint-100", "org/model"])
    >>> list(labels.values())
    ['…/x/run/checkpoint-100', '…/y/run/checkpoint-100', 'org/model']
    """
    refs = list(dict.fromkeys(references))
    parts = {ref: _parts(ref) or [ref] for ref in refs}
    # Grow each clashing label by one component until all are distinct. Two components minimum:
    # "run-a/final" says more than "final", and hub ids stay whole.
    depth = {ref: min(2, len(parts[ref])) for ref in refs}
    labels: dict[str, str] = {}
    for _ in range(max((len(p) for p in parts.values()), default=1) + 1):
        labels = {}
        for ref in refs:
            tail = parts[ref][-depth[ref]:]
            cut = len(tail) < len(parts[ref])
            labels[ref] = ("…/" if cut else "") + "/".join(tail)
        clashes = [ref for ref in refs if list(labels.values()).count(labels[ref]) > 1]
        if not clashes:
            break
        for ref in clashes:
            depth[ref] = min(depth[ref] + 1, len(parts[ref]))
    if len(set(labels.values())) < len(refs):
        labels = {ref: ref for ref in refs}  # e.g. "a/b" and "a//b": only the full text is unique
    shortened = {ref: _middle_cut(label, limit) for ref, label in labels.items()}
    return shortened if len(set(shortened.values())) == len(refs) else labels


def kind_label(kind: str) -> str:
    """How an update kind reads in legends: "LoRA", "DoRA", "full FT"."""
    return {"lora": "LoRA", "dora": "DoRA", "full": "full FT"}.get(kind, kind)


def slug(text: str, *, limit: int = 60) -> str:
    """File-name-safe version of a matrix name: `model.layers.3.self_attn.q_proj.weight` stays readable."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "matrix"
    return cleaned[-limit:].lstrip("-.") or "matrix"


def short_matrix(name: str) -> str:
    """Drop the common `model.`/`.weight` noise from a tensor name for titles."""
    name = re.sub(r"\.weight$", "", name)
    return re.sub(r"^(base_model\.model\.)?(model\.)?", "", name)
