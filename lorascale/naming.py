"""Labels for checkpoints: `--tuned NAME=REF` (or `tuned={"NAME": "REF"}`) and the default short names.

The rule that splits `NAME=REF`: a hub id never contains '=', but a local path may.  So the text is split
on its first '=' only when it is not an existing local path and the part before the '=' is a valid label
(LABEL_RULE); anything else is a plain reference.  A model without a label gets its short display name
(labels.py), and no two tuned models may share a label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from lorascale.errors import OptionError
from lorascale.records import NamedReference
from lorascale.labels import short_labels

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
LABEL_RULE = "1 to 64 letters, digits, '_', '.', '+' or '-', starting with a letter or digit"

# A reference as compare() takes it: "REF", "NAME=REF", or {"NAME": "REF"} (one item for the base).
References = str | Sequence[str] | Mapping[str, str]


def check_label(label: object, *, role: str) -> str:
    """`label` when it follows LABEL_RULE, else OptionError naming `role` (base or tuned)."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise OptionError(f"{role} label {label!r} is not a valid label", fix=f"use {LABEL_RULE}")
    return label


def split_label(text: str) -> tuple[str | None, str]:
    """'NAME=REF' -> (NAME, REF); a plain reference -> (None, text).

    >>> split_label("lora-r16=org/adapter@main")
    ('lora-r16', 'org/adapter@main')
    >>> split_label("org/adapter")
    (None, 'org/adapter')
    """
    name, equals, reference = text.partition("=")
    # lexists: a path that exists (even as a dangling link) is the user's file, whatever its name.
    if not equals or not _LABEL.fullmatch(name) or os.path.lexists(os.path.expanduser(text)):
        return None, text
    if not reference:
        raise OptionError(f"{text!r} gives the label {name!r} but no checkpoint reference",
                          fix="write NAME=REF, e.g. lora=org/adapter or full=./checkpoints/full")
    return name, reference


def _entries(given: References, *, role: str) -> list[tuple[str | None, str]]:
    """(label or None, reference) pairs from every accepted form of `given`."""
    if isinstance(given, Mapping):
        pairs = []
        for label, reference in given.items():
            if not isinstance(reference, str) or not reference:
                raise OptionError(f"{role} reference for label {label!r} must be a non-empty string, "
                                  f"got {reference!r}")
            pairs.append((check_label(label, role=role), reference))
        return pairs
    if isinstance(given, str):
        given = [given]
    pairs = []
    for item in given:
        if not isinstance(item, str) or not item:
            raise OptionError(f"{role} references must be non-empty strings, got {item!r}")
        pairs.append(split_label(item))
    return pairs


def name_references(base: str | Mapping[str, str], tuned: References) -> tuple[NamedReference, list[NamedReference]]:
    """The base and the tuned models with their labels, every label checked and the tuned ones unique.

    >>> base, tuned = name_references("org/base", ["lora=./runs/a", "./runs/b/final"])
    >>> [(t.reference, t.label) for t in tuned]
    [('./runs/a', 'lora'), ('./runs/b/final', '…/b/final')]
    """
    base_entries = _entries(base, role="base")
    if len(base_entries) != 1:
        raise OptionError(f"give exactly one base checkpoint, got {len(base_entries)}")
    tuned_entries = _entries(tuned, role="tuned")
    if not tuned_entries:
        raise OptionError("give at least one tuned checkpoint")
    references = [reference for _, reference in tuned_entries]
    if len(set(references)) != len(references):
        twice = next(r for r in references if references.count(r) > 1)
        raise OptionError(f"the tuned reference {twice!r} is given twice")
    defaults = short_labels(references)
    named = [NamedReference(reference, label or defaults[reference], explicit=label is not None)
             for label, reference in tuned_entries]
    labels = [n.label for n in named]
    for label in labels:
        if labels.count(label) > 1:
            clashing = [n.reference for n in named if n.label == label]
            raise OptionError(f"two tuned models have the label {label!r}: {', '.join(clashing)}",
                              fix="give each tuned model its own NAME in NAME=REF")
    base_label, base_reference = base_entries[0]
    if base_label is not None and base_label in labels:
        raise OptionError(f"the base and a tuned model have the same label {base_label!r}",
                          fix="give the base another NAME")
    return NamedReference(base_reference, base_label or short_labels([base_reference])[base_reference],
                          explicit=base_label is not None), named
