"""Every environment variable lorascale reads, read here and nowhere else.

The Hugging Face variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN) are read at call time, so
that a test or a long-lived process can change them; their meaning is huggingface_hub's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


_TRUE = {"1", "ON", "YES", "TRUE"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def debug() -> bool:
    """LORASCALE_DEBUG=1: show tracebacks instead of one-line errors."""
    return _flag("LORASCALE_DEBUG")


@dataclass(frozen=True)
class HubSettings:
    """How to reach the Hugging Face Hub. `token` is excluded from repr so it cannot leak into logs."""

    cache_dir: Path
    offline: bool
    token: str | None = field(default=None, repr=False)


def hub_settings(environ: Mapping[str, str] | None = None) -> HubSettings:
    """Read the Hub environment variables now, with huggingface_hub's precedence.

    huggingface_hub copies them into `huggingface_hub.constants` at import time (0.23 even binds copies into
    other modules), so setting them later has no effect there. Reading them per call and passing `cache_dir`,
    `local_files_only` and `token` explicitly makes later changes (and tests) work on every version.
    """
    env = os.environ if environ is None else environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE
    token = (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or "").strip() or None
    return HubSettings(Path(os.path.abspath(os.path.expanduser(os.path.expandvars(cache)))), offline, token)


def cache_dir() -> Path:
    """LORASCALE_CACHE_DIR, else $XDG_CACHE_HOME/lorascale, for cached base SVDs."""
    if os.environ.get("LORASCALE_CACHE_DIR"):
        return Path(os.environ["LORASCALE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))) / "lorascale"


def ray_address() -> str | None:
    """RAY_ADDRESS, as Ray users expect."""
    return os.environ.get("RAY_ADDRESS") or None
