"""Byte sizes as people write them: `50GB`, `500MiB`, `1.5T`, `123456` (bytes).

Decimal units (kB, MB, GB, TB, PB: powers of 1000, as disks and `hf cache scan` count) and binary ones (KiB,
MiB, GiB, TiB, PiB: powers of 1024); the trailing B is optional and case does not matter.  Used for
`--cache-max-size` / LORASCALE_CACHE_MAX_SIZE and `lorascale cache prune --max-size`.
"""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i)?)?b?\s*", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
SIZE_FORMS = "a size such as 50GB, 500MiB or a number of bytes"


def parse_size(text: object) -> int:
    """The number of bytes `text` says (a str as above, or a non-negative int); ValueError otherwise.

    >>> parse_size("50GB"), parse_size("500MiB"), parse_size("1.5k"), parse_size(1024)
    (50000000000, 524288000, 1500, 1024)
    """
    if isinstance(text, bool):
        raise ValueError(f"expected {SIZE_FORMS}, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"expected {SIZE_FORMS}, got a negative number {text}")
        return text
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected {SIZE_FORMS}, got {text!r}")
    number, unit, binary = match.groups()
    scale = 1 if unit is None else (1024 if binary else 1000) ** _POWER[unit.lower()]
    value = float(number) * scale
    if not math.isfinite(value):
        raise ValueError(f"expected {SIZE_FORMS}, got {text!r}")
    return int(value)



def format_size(nbytes: int) -> str:
    """Bytes as `1.5 GB`, `12.0 MB`, `3.2 kB` or `512 B` (decimal units; as cli/format.size writes them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
