"""The run manifest: what was compared, how, what was skipped, what lorascale wrote, and the run's status.

`Manifest` is the typed record the pipeline writes and the report reads; `manifest.json` is its JSON form.
Fields the record does not know (from a newer lorascale) are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lorascale.errors import OutputError, option
from lorascale.store.atomic import write_atomic
from lorascale.store.schema import MANIFEST

Status = Literal["running", "complete", "failed", "interrupted"]
STATUSES = ("running", "complete", "failed", "interrupted")
# The fix for a path that is not a results directory (every reader of one says it the same way).
RUN_FIX = f"pass the {option('out')} directory of a lorascale run, the one holding manifest.json and matrices/"


@dataclass
class Manifest:
    """Everything a user needs to trust (or reproduce) the tables beside it."""

    lorascale_version: str
    command: str
    options: dict[str, Any]
    base: dict[str, Any]  # reference, kind, source, path, repo/revision, files with sizes and hashes
    tuned: list[dict[str, Any]]
    device: str
    precision: str
    torch: str
    matrices_planned: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    status: Status = "running"
    started: str | None = None
    finished: str | None = None
    resumed: bool = False
    execution: dict[str, Any] = field(default_factory=dict)
    # Backend of each quantity (base, tuned, values, delta), why, the BLAS and the probe's figures
    # (numerics/backends.Routes.describe); empty in manifests written before it existed.
    routes: dict[str, Any] = field(default_factory=dict)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def references(self) -> tuple[str, ...]:
        """The tuned references, in the order given."""
        return tuple(str(t.get("reference")) for t in self.tuned)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json (unknown fields of newer versions included)."""
        data = asdict(self)
        data.update(data.pop("extra"))
        if data["error"] is None:
            del data["error"]
        return data

    def __getitem__(self, key: str) -> Any:
        # Read access by JSON key, as `json.load(open("manifest.json"))` users write it.
        return self.as_dict()[key]

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: Path) -> Manifest:
        """Build the record from parsed JSON; raise OutputError for anything that is not a lorascale manifest."""
        if not isinstance(data, dict) or "lorascale_version" not in data:
            raise OutputError("manifest.json is not a lorascale manifest", path=path, fix=RUN_FIX)
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        checks = {"options": dict, "base": dict, "tuned": list, "skipped": list, "execution": dict,
                  "sessions": list, "routes": dict}
        for name, kind in checks.items():
            if name in values and not isinstance(values[name], kind):
                raise OutputError(f"manifest.json field {name!r} is not a JSON {kind.__name__}", path=path,
                                  fix=f"the manifest was edited or corrupted; re-run with {option('overwrite', True)}")
        if values.get("status") not in STATUSES:
            raise OutputError(f"manifest.json has an unknown status {values.get('status')!r}", path=path,
                              fix=f"the manifest was edited or corrupted; re-run with {option('overwrite', True)}")
        defaults = {"lorascale_version": "", "command": "", "options": {}, "base": {}, "tuned": [], "device": "",
                    "precision": "", "torch": "", "matrices_planned": 0}
        manifest = cls(**{**defaults, **values})
        manifest.tuned = [t for t in manifest.tuned if isinstance(t, dict)]
        manifest.extra = {k: v for k, v in data.items() if k not in known}
        return manifest


def read_manifest(out: Path) -> Manifest | None:
    """The manifest in `out`, None when there is none; OutputError when one is there but unreadable."""
    path = out / MANIFEST
    if path.is_symlink():
        raise OutputError(f"manifest.json is a symbolic link; lorascale never follows links inside {option('out')}",
                          path=path, fix=f"remove the link, or choose another {option('out')}")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OutputError(f"manifest.json cannot be read ({type(exc).__name__})", path=path,
                          fix=f"the run may have died while writing it; re-run with {option('overwrite', True)}") from None
    return Manifest.from_dict(data, path=path)


def write_manifest(out: Path, manifest: Manifest) -> None:
    """Write atomically: readers see the old or the new manifest, never half of one."""
    write_atomic(out / MANIFEST, manifest.to_json().encode("utf-8"))
