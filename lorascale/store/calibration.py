"""The dry run's calibration figures (calibrate.py), one JSON file per machine under the lorascale
cache directory: `<cache dir>/calibration/<sha256 of the machine key>.json`.

The file is the only thing a dry run writes.  It is written atomically (a reader sees the old or the new
file, never half of one); one that cannot be read (truncated, foreign, another format or machine key) is
ignored and rewritten; one that cannot be written costs a recalibration next time, never the dry run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from lorascale.errors import OutputError
from lorascale.store.atomic import write_atomic

FORMAT = "lorascale-calibration/3"  # /2: routes timed on one thread; /3: points scaled by the short side
_LOG = logging.getLogger(__name__)


class CalibrationStore:
    """Figures for one machine key (a JSON-able dict) under `cache_dir`."""

    def __init__(self, cache_dir: str | Path, key: dict) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(cache_dir).expanduser() / "calibration" / f"{digest}.json"
        self._warned = False

    def load(self) -> dict:
        """The stored figures, or {} when there are none this machine can use."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("key") != self.key:
            return {}
        figures = record.get("figures")
        return figures if isinstance(figures, dict) else {}

    def save(self, figures: dict) -> None:
        """Replace the stored figures; a failure warns once and is otherwise ignored."""
        record = {"format": FORMAT, "key": self.key, "figures": figures}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(record, indent=1, sort_keys=True).encode())
        except (OSError, OutputError) as exc:
            if not self._warned:
                _LOG.warning("cannot store the dry run's calibration in %s (%s); the next dry run measures again",
                             self.path, exc)
                self._warned = True
