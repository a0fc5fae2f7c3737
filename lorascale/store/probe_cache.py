"""The CPU route probe's result, kept per machine (like FFTW's wisdom or an autotuner's cache).

numerics/backends.cpu_routes decides "auto"'s CPU routes from a timed probe.  Timing a loaded machine
twice can give two answers, and the two routes round differently in fp32, so every process on one machine
(runs, resumes, Ray workers, a `ray job submit` driver) reads the first probe's result from here instead of
timing again.  The key is what the timing depends on: torch version, BLAS/LAPACK, CPU model, probe size.
Delete the directory to probe again (e.g. after a machine upgrade the key changes by itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable
from pathlib import Path

from lorascale import settings
from lorascale.errors import OutputError
from lorascale.store.atomic import write_atomic

_LOG = logging.getLogger(__name__)
VERSION = 1  # of the probe and its record; a change here re-probes


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_file(key_parts: dict) -> Path:
    key = json.dumps({"version": VERSION, "cpu": cpu_model(), **key_parts}, sort_keys=True)
    return settings.cache_dir() / "route-probe" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def cached_probe(key_parts: dict, run: Callable[[], dict]) -> dict:
    """The probe record for this machine and `key_parts`: read from the cache, or `run()` and kept.

    A cache that cannot be read or written is not an error: the probe then runs in this process only."""
    path = probe_file(key_parts)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("key") == key_parts:
            return record["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = run()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": key_parts, "cpu": cpu_model(), "result": result}, indent=2).encode())
    except (OSError, OutputError) as exc:
        _LOG.debug("route probe not cached at %s: %s", path, exc)
    return result
