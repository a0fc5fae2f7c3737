"""The files of a base-SVD cache directory as the file system shows them: which are entries (by their name
alone), how many bytes, when last used; evicting the least recently used; the space left on the disk.
What an entry holds, and whether it reads, is svd_cache.py's business.

Layout: `DIR/base-svd/<first two hex digits of the key>/<64 hex digit key>.safetensors`, written through
store/atomic.py (temporary `.tmp-*` names in the same folder, then a rename).  Everything else under
`DIR/base-svd` (a file or folder of yours, a symbolic link) is foreign: listed, never opened as an entry,
never deleted.  Nothing outside `DIR/base-svd` is looked at: the cache directory may hold other things.
Symbolic links are never followed, so a link cannot make lorascale count or delete files elsewhere.

"Last used" is the file's modification time: a write sets it, a hit touches it (svd_cache.py), so listing
and eviction need one stat per file and no index to keep consistent between concurrent runs.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from lorascale.store.atomic import TMP_PREFIX

ENTRY_FOLDER = "base-svd"
_KEY = re.compile(r"[0-9a-f]{64}")
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class CacheFile:
    """One file (or foreign folder) under DIR/base-svd."""

    path: Path
    nbytes: int
    last_used: float  # modification time, seconds since the epoch
    key: str | None = None  # the entry's key (from its name); None: not named as an entry


@dataclass
class Scan:
    """What DIR/base-svd holds: entries by name (readable or not), writers' temporary files, foreign things."""

    entries: list[CacheFile] = field(default_factory=list)
    temporary: list[CacheFile] = field(default_factory=list)
    foreign: list[CacheFile] = field(default_factory=list)

    @property
    def entry_bytes(self) -> int:
        return sum(f.nbytes for f in self.entries)


def entry_path(directory: Path, key: str) -> Path:
    """Where the entry of `key` lives under cache directory `directory`."""
    return directory / ENTRY_FOLDER / key[:2] / f"{key}{_SUFFIX}"


def scan(directory: Path) -> Scan:
    """The files under `directory`/base-svd, without following links or opening any file."""
    found = Scan()
    for bucket in _listing(directory / ENTRY_FOLDER):
        info = bucket.stat(follow_symlinks=False)
        if not (stat.S_ISDIR(info.st_mode) and re.fullmatch(r"[0-9a-f]{2}", bucket.name)):
            found.foreign.append(_foreign(Path(bucket.path), info))
            continue
        for item in _listing(Path(bucket.path)):
            info = item.stat(follow_symlinks=False)
            key = item.name[:-len(_SUFFIX)] if item.name.endswith(_SUFFIX) else ""
            record = CacheFile(Path(item.path), info.st_size, info.st_mtime)
            if not stat.S_ISREG(info.st_mode):
                found.foreign.append(_foreign(Path(item.path), info))
            elif _KEY.fullmatch(key) and key.startswith(bucket.name):
                found.entries.append(CacheFile(record.path, record.nbytes, record.last_used, key))
            elif item.name.startswith(TMP_PREFIX):
                found.temporary.append(record)
            else:
                found.foreign.append(record)
    return found


def _listing(folder: Path) -> list[os.DirEntry]:
    """The items of `folder`; none when it is absent, unreadable or not a real folder (a link to one)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return []
        with os.scandir(folder) as items:
            return sorted(items, key=lambda item: item.name)
    except OSError:
        return []


def _foreign(path: Path, info: os.stat_result) -> CacheFile:
    """A foreign item with its bytes: a folder's regular files summed (links not followed)."""
    total = info.st_size if not stat.S_ISDIR(info.st_mode) else 0
    if stat.S_ISDIR(info.st_mode):
        for root, _, names in os.walk(path):  # os.walk does not follow links into folders
            for name in names:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    continue
    return CacheFile(path, total, info.st_mtime)


def remove(item: CacheFile) -> bool:
    """Delete one entry or temporary file (never a link's target: unlink removes the name); True when it is
    gone, whoever removed it (two runs evicting at once both succeed)."""
    try:
        os.unlink(item.path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def evict(candidates: list[CacheFile], nbytes: int) -> int:
    """Delete the least recently used of `candidates` until `nbytes` are freed (or none is left); the bytes
    freed.  A reader that has the file open keeps reading it (POSIX); one about to open it finds it gone,
    which is a miss."""
    freed = 0
    for item in sorted(candidates, key=lambda f: f.last_used):
        if freed >= nbytes:
            break
        if remove(item):
            freed += item.nbytes
    return freed


def disk_space(directory: Path) -> tuple[int, int] | None:
    """(free, total) bytes of the file system that holds (or will hold) `directory`; None if unknown."""
    folder = directory
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return usage.free, usage.total


def disk_margin(total: int) -> int:
    """Free space a cache write must leave on its disk: 5% of the file system, at least 1 GB, at most 10 GB
    (docs/CACHE.md)."""
    return min(max(total // 20, 10**9), 10 * 10**9)
