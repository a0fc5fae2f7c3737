"""lorascale: how a fine-tune changed a model, through the SVD of every weight matrix."""

from __future__ import annotations

from lorascale.version import __version__


def __getattr__(name: str):
    # `lorascale.compare(...)` without importing torch/pyarrow on `import lorascale` (the CLI stays fast).
    if name in ("compare", "load", "mitigate", "CompareResult", "MitigateResult", "Results"):
        from lorascale import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorascale' has no attribute {name!r}")


__all__ = ["__version__", "compare", "load", "mitigate", "CompareResult", "MitigateResult", "Results"]
