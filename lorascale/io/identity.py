"""What identifies a checkpoint's bytes, for the manifest and for deciding whether old rows may be reused.

Hashing every byte of a 140 GB model on each run would cost more than many analyses, so a weight file is
identified by what changes whenever its bytes change:

- every weight file: size, modification and status-change times (ctime cannot be set back by a user: any
  write, copy-over or rename updates it), inode, and `header_sha256`: the sha256 of the safetensors header,
  or for a pickled torch.save .bin the sha256 of its zip record table (name, size, CRC-32 and offset of every
  record, from the central directory: any changed tensor changes its record's CRC-32), so no tensor data is read;
- hub files also: the sha256 the hub publishes for them (content-addressed), and the resolved commit;
- small metadata files (adapter_config.json with the scale, the shard index, config.json): their sha256.

Hub files that a run streams (downloads while it computes; deleted after use with --scratch-dir) have no
lasting local copy: they are identified by the resolved commit (immutable), their size, the sha256 the hub
publishes and the sha256 of their header, all known before the download; the file read is checked against
that header hash once downloaded (execute/streaming.py).

Two identities are equal only if every field is; a false "changed" (a checkpoint copied to another disk)
costs a recomputation, never a wrong number.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorascale.io.checkpoint import Checkpoint
from lorascale.records import RemoteFile

# Fields of a weight-file entry that must match for its rows to be reused.
_FILE_FIELDS = ("name", "bytes", "sha256", "header_sha256", "mtime_ns", "ctime_ns", "inode")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header_sha256(path: Path) -> str:
    if path.suffix == ".bin":
        from lorascale.io.torch_bin import record_table_sha256

        return record_table_sha256(path)
    from lorascale.io.safetensors_header import read_raw_header

    return hashlib.sha256(read_raw_header(path)).hexdigest()


def _weight_file(path: Path, known_sha256: str | None) -> dict[str, Any]:
    stat = os.stat(path)
    entry: dict[str, Any] = {"name": path.name, "bytes": stat.st_size}
    if known_sha256:
        entry["sha256"] = known_sha256
    # Also for hub files: a blob edited in the cache keeps its name (and so its published sha256).
    entry.update(header_sha256=_header_sha256(path), mtime_ns=stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns,
                 inode=stat.st_ino)
    return entry


def _remote_file(name: str, remote: RemoteFile) -> dict[str, Any]:
    """A Hub weight file that is streamed (downloaded while the run goes, and deleted after it in
    --scratch-dir mode): identified by the commit, its size, published sha256 and header hash, since no
    local copy, inode or time outlives the run."""
    entry: dict[str, Any] = {"name": name, "bytes": remote.size}
    if remote.sha256:
        entry["sha256"] = remote.sha256
    entry["header_sha256"] = remote.header_sha256
    entry["streamed"] = True
    return entry


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """The manifest's record of `checkpoint`: where it is, its kind, and the identity of every file read."""
    resolved = checkpoint.resolved
    described: dict[str, Any] = {
        "reference": resolved.reference, "kind": checkpoint.update, "source": resolved.source,
        "format": resolved.weight_format,
        "path": str(resolved.root), "repo_id": resolved.repo_id, "revision": resolved.revision,
        "files": [_remote_file(p.name, checkpoint.remote[p.name]) if resolved.headers_only
                  else _weight_file(p, resolved.file_hashes.get(p.name)) for p in resolved.weight_files],
        "metadata_files": {p.name: _sha256(p) for p in (resolved.adapter_config, resolved.index_file, resolved.config)
                           if p is not None},
    }
    if checkpoint.adapter is not None:
        described["adapter"] = asdict(checkpoint.adapter)
    return described


def _identity(described: dict[str, Any]) -> tuple:
    files = described.get("files") or []
    return (described.get("revision"),
            tuple(tuple(f.get(k) for k in _FILE_FIELDS) for f in files if isinstance(f, dict)),
            tuple(sorted((described.get("metadata_files") or {}).items())))


def changed_since(previous: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why the checkpoint described by `current` is not byte-for-byte the one in `previous`, or None.

    An earlier manifest without identity fields (older lorascale) never matches: its rows cannot be trusted.
    """
    if _identity(previous) == _identity(current):
        return None
    before = {f.get("name"): f for f in previous.get("files") or [] if isinstance(f, dict)}
    for entry in current.get("files") or []:
        old = before.get(entry["name"])
        if old is None:
            return f"{entry['name']} was not read by the earlier run"
        for key in _FILE_FIELDS:
            if old.get(key) != entry.get(key):
                what = {"bytes": "its size", "sha256": "its content hash", "header_sha256": "its header",
                        "mtime_ns": "its modification time", "ctime_ns": "its status-change time",
                        "inode": "the file itself (replaced)"}.get(key, key)
                return f"{entry['name']} changed since the earlier run ({what} differs)"
    if previous.get("revision") != current.get("revision"):
        return f"the hub revision moved from {previous.get('revision')} to {current.get('revision')}"
    return "its metadata files (adapter_config.json, index, config.json) changed since the earlier run"
