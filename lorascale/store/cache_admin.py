"""What `lorascale cache rm` and `lorascale cache prune` delete from a base-SVD cache, chosen here and deleted
through cache_files.remove: only files named as entries and writers' stale temporary files under
DIR/base-svd, never a foreign file or folder, never through a link.

A run that is reading an entry when it is deleted keeps reading it (POSIX keeps an open file); one about to
read it finds it gone, which is a miss that recomputes and writes it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorascale.store import cache_files
from lorascale.store.cache_files import CacheFile
from lorascale.store.svd_cache import CacheEntry, CacheSurvey, reference_source, stale_temporary


@dataclass(frozen=True)
class Removal:
    """Files chosen for deletion: readable entries, then unreadable ones and stale temporary files."""

    entries: tuple[CacheEntry, ...]
    other: tuple[CacheFile, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries) + sum(f.nbytes for f in self.other)

    def __len__(self) -> int:
        return len(self.entries) + len(self.other)


def for_source(found: CacheSurvey, reference: str) -> Removal:
    """The entries recorded for base checkpoint `reference` (a hub repo id, or a local path; see
    svd_cache.reference_source)."""
    source = reference_source(reference)
    return Removal(tuple(e for e in found.entries if e.source == source), ())


def everything(found: CacheSurvey) -> Removal:
    """Every entry, readable or not, and the temporary files crashed writers left."""
    return Removal(tuple(found.entries), tuple(found.unreadable) + tuple(stale_temporary(found.temporary)))


def to_fit(found: CacheSurvey, max_bytes: int) -> Removal:
    """What brings the cache under `max_bytes`: unreadable entries and stale temporary files (never of use),
    then readable entries, least recently used first."""
    other = tuple(found.unreadable) + tuple(stale_temporary(found.temporary))
    excess = sum(e.nbytes for e in found.entries) - max_bytes  # the unreadable ones go in any case
    chosen: list[CacheEntry] = []
    for entry in sorted(found.entries, key=lambda e: e.last_used):
        if excess <= 0:
            break
        chosen.append(entry)
        excess -= entry.nbytes
    return Removal(tuple(chosen), other)


def delete(removal: Removal) -> tuple[int, int]:
    """Delete what `removal` chose: (files gone, their bytes); a file another process removed first counts."""
    items: Sequence[CacheFile] = [CacheFile(e.path, e.nbytes, e.last_used, e.key) for e in removal.entries]
    items = [*items, *removal.other]
    gone = [item for item in items if cache_files.remove(item)]
    return len(gone), sum(item.nbytes for item in gone)

