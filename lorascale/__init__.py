"""lorascale: how a fine-tune changed a model, through the SVD of every weight matrix."""

from __future__ import annotations

__version__ = "0.1.0"
