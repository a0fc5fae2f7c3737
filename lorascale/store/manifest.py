"""The run manifest: what was compared, how, what was skipped, and whether the run is complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorascale.store.schema import MANIFEST


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_manifest(out: Path, manifest: dict) -> None:
    """Write atomically: readers see the old or the new manifest, never half of one."""
    path = out / MANIFEST
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
