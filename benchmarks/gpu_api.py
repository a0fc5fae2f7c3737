"""Everything gpu_check.py and its stages use from lorascale, imported here and nowhere else.

lorascale's internals move (numerics is becoming a backend table); when a name below moves, this file is
the one line to change.  The public entry point is `compare` (lorascale.compare); the rest are the
numerics the SVD stage times route by route and the reader whose disk -> device throughput stage 3 reports.
"""

from __future__ import annotations

from lorascale import compare  # noqa: F401  (the documented Python entry point)
from lorascale.io.checkpoint import open_checkpoint  # noqa: F401
from lorascale.io.resolve import resolve  # noqa: F401
from lorascale.io.tensors import load_tensor  # noqa: F401
from lorascale.numerics.backends import cupy_available  # noqa: F401
from lorascale.numerics.svd import svd, svdvals  # noqa: F401


def tensor_entries(reference: str) -> list:
    """The tensor index entries (file, byte range, dtype, shape) of a checkpoint, from headers alone."""
    return list(open_checkpoint(resolve(reference)).tensors.values())
