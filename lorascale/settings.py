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


def _env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's value, or None when it is unset, empty or blank.

    `XDG_CACHE_HOME=` (set but empty, as shell scripts and CI templates often leave it) means unset: taking
    it literally would put caches under a relative `./lorascale` that moves with the working directory.
    """
    value = (os.environ if environ is None else environ).get(name)
    return value if value is not None and value.strip() else None


def _flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


def debug() -> bool:
    """LORASCALE_DEBUG=1: show tracebacks instead of one-line errors."""
    return _flag("LORASCALE_DEBUG")


def _cache_home(environ: Mapping[str, str] | None = None) -> str:
    """$XDG_CACHE_HOME, else ~/.cache.  The XDG spec says a relative value is invalid and must be ignored."""
    xdg = _env("XDG_CACHE_HOME", environ)
    if xdg is not None and os.path.isabs(os.path.expanduser(xdg)):
        return os.path.expanduser(xdg)
    return os.path.join(os.path.expanduser("~"), ".cache")


@dataclass(frozen=True)
class HubSettings:
    """How to reach the Hugging Face Hub. `token` is excluded from repr so it cannot leak into logs."""

    cache_dir: Path
    offline: bool
    token: str | None = field(default=None, repr=False)
    endpoint: str | None = None  # HF_ENDPOINT (a mirror or a test server); None: huggingface_hub's default


def hub_settings(environ: Mapping[str, str] | None = None) -> HubSettings:
    """Read the Hub environment variables now, with huggingface_hub's precedence (empty values are unset).

    huggingface_hub copies them into `huggingface_hub.constants` at import time (0.23 even binds copies into
    other modules), so setting them later has no effect there. Reading them per call and passing `cache_dir`,
    `local_files_only` and `token` explicitly makes later changes (and tests) work on every version.
    """
    home = _env("HF_HOME", environ) or os.path.join(_cache_home(environ), "huggingface")
    cache = _env("HF_HUB_CACHE", environ) or _env("HUGGINGFACE_HUB_CACHE", environ) or os.path.join(home, "hub")
    offline = (_env("HF_HUB_OFFLINE", environ) or _env("TRANSFORMERS_OFFLINE", environ) or "").strip().upper() in _TRUE
    token = (_env("HF_TOKEN", environ) or _env("HUGGING_FACE_HUB_TOKEN", environ) or "").strip() or None
    endpoint = (_env("HF_ENDPOINT", environ) or "").strip().rstrip("/") or None
    return HubSettings(Path(os.path.abspath(os.path.expanduser(os.path.expandvars(cache)))), offline, token,
                       endpoint)


def cache_dir() -> Path:
    """LORASCALE_CACHE_DIR, else $XDG_CACHE_HOME/lorascale (else ~/.cache/lorascale), for cached base SVDs.

    Always absolute: Ray workers and a resumed run may start in another working directory.
    """
    explicit = _env("LORASCALE_CACHE_DIR")
    if explicit is not None:
        return Path(os.path.abspath(os.path.expanduser(explicit)))
    return Path(_cache_home()) / "lorascale"


# The base-SVD cache's bound when neither --cache-max-size nor LORASCALE_CACHE_MAX_SIZE says: a fixed size, the
# same on every machine (docs/CACHE.md says why 50 GB).
DEFAULT_CACHE_MAX_SIZE = 50 * 10**9


def cache_max_size() -> int | None:
    """LORASCALE_CACHE_MAX_SIZE in bytes (`50GB`, `500MiB`, a number of bytes), else DEFAULT_CACHE_MAX_SIZE.

    An unparseable value is an OptionError naming the variable (not a silent default: a bound the user set
    and lorascale ignored would fill their disk).  Never None today; typed so for callers that treat None as
    no bound.
    """
    from lorascale.errors import OptionError
    from lorascale.sizes import parse_size

    value = _env("LORASCALE_CACHE_MAX_SIZE")
    if value is None:
        return DEFAULT_CACHE_MAX_SIZE
    try:
        return parse_size(value)
    except ValueError as exc:
        raise OptionError(f"LORASCALE_CACHE_MAX_SIZE: {exc}",
                          fix="set it to e.g. 50GB or 500MiB, or unset it for the default of 50GB") from None


def progress_seconds() -> float:
    """LORASCALE_PROGRESS_SECONDS: at most this long between progress lines when stderr is not a terminal
    (default 30; stages are shown once they last 2 s or this long, whichever is shorter)."""
    value = _env("LORASCALE_PROGRESS_SECONDS")
    try:
        seconds = float(value) if value is not None else 30.0
    except ValueError:
        seconds = 30.0
    return seconds if seconds >= 0 else 30.0  # 0: every stage and every matrix at once


def ray_address() -> str | None:
    """RAY_ADDRESS, as Ray users expect."""
    return _env("RAY_ADDRESS")
