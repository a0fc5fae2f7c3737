"""Every environment variable lorascale reads, read here and nowhere else.

The Hugging Face variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN) are read at call time, so
that a test or a long-lived process can change them; their meaning is huggingface_hub's.
"""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def debug() -> bool:
    """LORASCALE_DEBUG=1: show tracebacks instead of one-line errors."""
    return _flag("LORASCALE_DEBUG")


def hub_offline() -> bool:
    return _flag("HF_HUB_OFFLINE") or _flag("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_token() -> str | None:
    """HF_TOKEN; never logged, never written to outputs."""
    return os.environ.get("HF_TOKEN") or None


def cache_dir() -> Path:
    """LORASCALE_CACHE_DIR, else $XDG_CACHE_HOME/lorascale, for cached base SVDs."""
    if os.environ.get("LORASCALE_CACHE_DIR"):
        return Path(os.environ["LORASCALE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))) / "lorascale"


def ray_address() -> str | None:
    """RAY_ADDRESS, as Ray users expect."""
    return os.environ.get("RAY_ADDRESS") or None
