"""lorascale: how a fine-tune changed a model, through the SVD of every weight matrix."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # `lorascale.compare(...)` without importing torch/pyarrow on `import lorascale` (the CLI stays fast).
    if name in ("compare", "load", "mitigate", "CompareResult", "MitigateResult", "Results"):
        from lorascale import api, results

        return getattr(api, name, None) or getattr(results, name)
    raise AttributeError(f"module 'lorascale' has no attribute {name!r}")


__all__ = ["__version__", "compare", "load", "mitigate", "CompareResult", "MitigateResult", "Results"]
