"""The run manifest: what was compared, how, what was skipped, what lorascale wrote, and the run's status.

`Manifest` is the typed record the pipeline writes and the report reads; `manifest.json` is its JSON form.
Fields the record does not know (from a newer lorascale) are kept in `extra` and written back unchanged.

The layout has a version (`format_version`, FORMAT_VERSION).  `upgrade()` is the one place that knows the
older layouts: every manifest is read through it, so no reader (summary, report, `lorascale.load`, resume)
guesses which layout it holds.  tests/fixtures/manifests/ keeps one manifest of each layout ever written.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lorascale.errors import OutputError, option
from lorascale.store.atomic import write_atomic
from lorascale.store.schema import MANIFEST

Status = Literal["running", "complete", "failed", "interrupted"]
STATUSES = ("running", "complete", "failed", "interrupted")
# 1: every manifest written before the layout had a version (2026-11-23 .. 2026-12-05); 2: `format_version`,
# every option that shapes the tables recorded (mode, top_k), `label` in every base/tuned entry, `routes`.
FORMAT_VERSION = 2
# What an unversioned run was computed with when its manifest lacks the option: the defaults of the versions
# that wrote such manifests (before 2026-11-23's top-k mode every run was exact), not today's defaults.
_UNVERSIONED_OPTIONS = {"k": 10, "epsilon": 0.5, "side": "left", "mode": "exact", "top_k": None}
_UNVERSIONED_FIELDS = {"lorascale_version": "", "command": "", "options": {}, "base": {}, "tuned": [], "device": "",
                       "precision": "", "torch": "", "matrices_planned": 0, "execution": {}, "routes": {}}
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
    format_version: int = FORMAT_VERSION
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
        """Build the record from parsed JSON in any layout (upgrade()); raise OutputError for anything that is not
        a lorascale manifest."""
        if not isinstance(data, dict) or "lorascale_version" not in data:
            raise OutputError("manifest.json is not a lorascale manifest", path=path, fix=RUN_FIX)
        data = upgrade(data)
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
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise OutputError(f"manifest.json has no {missing[0]!r}", path=path,
                              fix=f"the manifest was edited or corrupted; re-run with {option('overwrite', True)}")
        manifest = cls(**values)
        manifest.tuned = [t for t in manifest.tuned if isinstance(t, dict)]
        manifest.extra = {k: v for k, v in data.items() if k not in known}
        return manifest


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a parsed manifest.json of any version) in the current layout; a newer version is returned as it is
    (its unknown fields travel in Manifest.extra).  The only reader of older layouts:

    - version 1 (no `format_version`): options written before they existed take the value those runs used
      (_UNVERSIONED_OPTIONS: `mode`/`top_k` before the top-k mode, 2026-11-23); `execution` and `routes` before
      they were recorded are empty; a base/tuned entry from before labels (2026-11-27) gets `label: None` (no
      label recorded: readers show the reference's short name).

    >>> upgrade({"lorascale_version": "0.1.0", "options": {"k": 5}})["options"]["mode"]
    'exact'
    """
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version >= FORMAT_VERSION:
        return data
    upgraded = {**_UNVERSIONED_FIELDS, **data, "format_version": FORMAT_VERSION}
    if isinstance(upgraded["options"], dict):
        upgraded["options"] = {**_UNVERSIONED_OPTIONS, **upgraded["options"]}
    if isinstance(upgraded["base"], dict):
        upgraded["base"] = {"label": None, **upgraded["base"]}
    if isinstance(upgraded["tuned"], list):
        upgraded["tuned"] = [{"label": None, **t} if isinstance(t, dict) else t for t in upgraded["tuned"]]
    return upgraded


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
