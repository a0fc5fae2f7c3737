"""Tuned names onto the base's: --rename rules, then the longest unambiguous common dotted suffix.

`bert.encoder.layer.0.attention.self.query.weight` (a task head's model), `transformer.h.0...` against
`model.h.0...`, or a PEFT module path `base_model.model.model.layers.0.self_attn.q_proj` find the base's
tensor; `--rename` (plan/rename.py) rewrites tuned names first for anything else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from lorascale.errors import MismatchError, option
from lorascale.plan.rename import Rename, parse_renames, renamed, renamed_names
from lorascale.records import TensorEntry

__all__ = ["BaseMatrices", "NameMatcher", "Rename", "parse_renames", "renamed", "renamed_names"]


def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of at least two components (more than the bare `weight`), longest (the name) first."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(max(len(parts) - 1, 1))]


def _suffix_index(names: Iterable[str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name in names:
        for suffix in _suffixes(name):
            index.setdefault(suffix, []).append(name)
    return index


def _digits(name: str) -> set[str]:
    return {p for p in name.split(".") if p.isdigit()}


class NameMatcher:
    """Map names from another checkpoint onto the base's names.

    Rule: identical names match; otherwise a name matches the base name with which it shares the longest
    common dotted suffix, when that suffix
      - has at least two components and holds every index (all-digit component) of both names,
      - is shared by no other unmatched base name (else: MismatchError naming both candidates), and by no
        other unmatched name of the same checkpoint (else: MismatchError naming both),
      - and what it leaves in front (the two prefixes, e.g. `bert.` and ``) is a prefix pair that at least one
        other match also uses, or the only one: a task head's `classifier.dense.weight` does not become the
        base's `pooler.dense.weight` just because both end in `dense.weight`.
    An ambiguous suffix is an error only where its prefix pair is one the checkpoints use (by other matches,
    or by other ambiguities: every layer of a two-tower base), or when nothing else matched.
    Longer common suffixes are matched first.
    """

    def __init__(self, base_names: Iterable[str]) -> None:
        self._names = list(dict.fromkeys(base_names))
        self._known = set(self._names)
        self._index = _suffix_index(self._names)

    def match(self, name: str) -> str | None:
        return self.match_all([name]).get(name)

    def match_all(self, names: Iterable[str], *, where: str | None = None) -> dict[str, str]:
        """name -> base name for every name that matches; MismatchError (naming `where`) for an ambiguous one."""
        names = list(dict.fromkeys(names))
        result = {n: n for n in names if n in self._known}
        claimed = set(result.values())
        rest = [n for n in names if n not in result]
        others = _suffix_index(rest)

        def best(name: str) -> tuple[str, list[str]] | None:
            for suffix in _suffixes(name):
                candidates = [b for b in self._index.get(suffix, ()) if b not in claimed]
                if candidates:
                    return suffix, candidates
            return None

        def length(name: str) -> int:
            found = best(name)
            return found[0].count(".") if found else -1

        tentative: dict[str, tuple[str, tuple[str, str]]] = {}  # name -> (base name, prefix pair)
        ambiguous: list[tuple[str, list[str], list[tuple[str, str]], str]] = []
        for name in sorted(rest, key=lambda n: -length(n)):  # longest common suffixes first
            found = best(name)
            if found is None:
                continue
            suffix, candidates = found
            if _digits(name) - _digits(suffix) or suffix.count(".") < 1:
                continue
            rivals = [n for n in others.get(suffix, ()) if n != name and n not in tentative]
            cut = len(suffix)
            if len(candidates) > 1 or rivals:
                pairs = [(name[:-cut], c[:-cut]) for c in candidates] + [(r[:-cut], candidates[0][:-cut])
                                                                         for r in rivals]
                shown = [candidates[0], candidates[1]] if len(candidates) > 1 else [name, rivals[0]]
                ambiguous.append((candidates[0] if len(candidates) == 1 else name, shown, pairs, suffix))
                continue
            base = candidates[0]
            if _digits(base) - _digits(suffix):
                continue
            tentative[name] = (base, (name[:-cut], base[:-cut]))
            claimed.add(base)
        counts = Counter(pair for _, pair in tentative.values())
        confirmed = {pair for pair, n in counts.items() if n >= 2 or len(counts) == 1}
        for name, (base, pair) in tentative.items():
            if pair in confirmed:
                result[name] = base
        # An ambiguity is an error when its prefix pair is one the checkpoints use (other matches, or other
        # ambiguities like it: every layer of a two-tower base), not for a lone task-head lookalike.
        usage = counts + Counter(pair for _, _, pairs, _ in ambiguous for pair in set(pairs))
        for subject, shown, pairs, suffix in ambiguous:
            if any(usage[pair] >= 2 for pair in pairs) or confirmed.intersection(pairs) or not result:
                raise MismatchError(
                    f"ambiguous name match: {shown[0]!r} and {shown[1]!r} both end in {suffix!r}",
                    path=where, tensor=subject,
                    fix=f"say which one with {option('rename')} FROM=TO, a regex on the tuned names")
        return result


@dataclass(frozen=True)
class BaseMatrices:
    """The base side of matching: every 2-D (or fused expert, or unknown-dtype) base tensor, the analysed ones
    (selected and analysable), the matcher over their names, the base's model_type and the rename rules."""

    base_2d: dict[str, TensorEntry]
    analysed: dict[str, TensorEntry]
    matcher: NameMatcher
    model_type: str | None = None  # the base's config.json model_type
    rename: tuple[Rename, ...] = ()
