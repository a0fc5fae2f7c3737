"""On-disk cache of base SVDs, so comparing a base with fine-tune after fine-tune never recomputes them.

An entry is keyed by what determines its content: the sha256 of the base tensor's stored bytes (hashing
~90 MB takes a fraction of a second, against tens of seconds for its SVD), its stored dtype and shape, the
compute precision, the sides kept and the method family ("svd" for torch/cupy, "gram").  The device and
cuSOLVER driver are not in the key: every exact backend agrees to rounding, so a base decomposed on one
machine serves another.  A run over the same base with other fine-tunes, another --out, or a resumed run
therefore hits.

Each entry is one safetensors file (never pickle) holding S (p,) in the compute precision and the singular
vectors each side needs, U0 (m, p) and/or V0 (n, p), with the null level and ||W0||_F as metadata.  It is
written to a temporary name and renamed, so readers only ever see whole files, and concurrent writers of
the same key (Ray actors on one node) just replace identical content.  A file that cannot be read as an
entry of this format is a miss and is rewritten.

The vectors of an fp32 run are stored in fp16 (`compact`): half the bytes of fp32 (32 MB for a 4096 x 4096
matrix, about 11 GB for the left side of every Llama-2-7B matrix instead of 22 GB).  Rounding an orthonormal
column to fp16 moves each entry by at most 2^-11 of itself, so a |cos| against it moves by about
eps_fp16 / sqrt(m) (~1e-5 at m = 4096, measured in docs/CACHE.md), far below any epsilon a user thresholds
at.  Every fp32 run computes with the compacted vectors, whether it wrote the entry, read it or runs with
`--no-cache`, so a cold, a warm, an uncached and a Ray run give identical numbers (row counts included: top-k
stores what its bounds prove, and those depend on its start).  fp64 runs keep their vectors in fp64: they
asked for the precision.  Entries of the earlier fp32 format
("lorascale-base-svd/1") have other keys, so they are never read as this format; they are misses.

Each entry also records what it is, for `lorascale cache ls` and dry runs (`entries`, `find`): the source
model (`entry_source`) and tensor, shape, stored dtype, precision, sides and method.  None of it is in the
key: one base reachable by two paths is one entry.

The cache is bounded (`max_bytes`, from --cache-max-size / LORASCALE_CACHE_MAX_SIZE): before a write, the
least recently used entries are evicted to make room (a hit touches its entry's mtime, store/cache_files.py),
except those written or used since the run began (by it, by another of its Ray actors, or by a run beside
it: their mtime is that recent); when those fill the bound by themselves, or a
write would leave the disk with less than its margin free (cache_files.disk_margin), the run stops writing
entries and goes on.  Stopping instead of evicting the run's own entries keeps a repeated run that does not
fit hitting on what fitted, where LRU would evict each entry just before it is needed.  One object is made
per run (worker._cache), and it logs at most one warning: every later event goes to the debug log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lorascale.errors import CheckpointFormatError, OutputError
from lorascale.io.safetensors_header import read_header
from lorascale.numerics.backends import BACKENDS
from lorascale.numerics.compare import BaseSpectrum
from lorascale.records import TensorEntry
from lorascale.request import Analysis
from lorascale.sizes import format_size
from lorascale.store import cache_files
from lorascale.store.atomic import write_atomic
from lorascale.store.cache_files import CacheFile

FORMAT = "lorascale-base-svd/2"
# How the vectors of each compute precision are stored (see the module docstring).
STORED_VECTOR_DTYPES = {torch.float32: torch.float16, torch.float64: torch.float64}
_COMPUTE = {"fp32": torch.float32, "fp64": torch.float64}
_PRECISION_OF = {"F32": "fp32", "F64": "fp64"}  # S is stored in the compute precision
_ENTRY_ERRORS = (OSError, ValueError, KeyError, TypeError, SafetensorError, CheckpointFormatError)
STALE_TEMPORARY_SECONDS = 3600  # a writer's .tmp- file older than this was left by a crash
_LOG = logging.getLogger(__name__)


def content_digest(raw: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (before any upcast)."""
    data = raw.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def compact(base: BaseSpectrum) -> BaseSpectrum:
    """`base` as a cache entry holds it: the vectors rounded to their stored dtype and back, so that a run
    computes with the same numbers whether its entry was just written or read back."""
    vectors = {side: v.to(STORED_VECTOR_DTYPES[v.dtype]).to(v.dtype) for side, v in base.vectors.items()}
    return BaseSpectrum(s=base.s, vectors=vectors, fro=base.fro, null_max_cos=base.null_max_cos)


def method_family(backend: str) -> str:
    """The family of a resolved backend name: backends of one family give the same base SVD to rounding."""
    return BACKENDS[backend].family


def entry_nbytes(shape: tuple[int, int], sides: Iterable[str], *, precision: str | None = None) -> int:
    """Bytes one entry for a base matrix of `shape` takes on disk, header excluded: S (p,) in the compute
    precision (None: the default's, request.Analysis) and each side's vectors, U0 (m, p) / V0 (n, p), in their
    stored dtype (p = min(m, n)).

    >>> entry_nbytes((4096, 4096), ["left"])  # fp16 U0 and fp32 S
    33570816
    """
    m, n = shape
    p = min(m, n)
    compute = _COMPUTE[precision or Analysis().precision]
    rows = {"left": m, "right": n}
    return p * compute.itemsize + sum(rows[side] * p * STORED_VECTOR_DTYPES[compute].itemsize for side in set(sides))


def entry_source(entry: TensorEntry) -> str:
    """The model a base tensor comes from, as its cache entry records it: the hub repo id, or the absolute
    folder that holds the local weight file (what reference_source() makes of the reference)."""
    return entry.hub.repo_id if entry.hub is not None else os.path.abspath(entry.file.parent)


def entry_tensor(entry: TensorEntry) -> str:
    """The tensor name an entry records: the stored name, with `[E]` for expert E of a fused expert tensor."""
    return entry.name if entry.expert is None else f"{entry.name}[{entry.expert}]"


def reference_source(reference: str) -> str:
    """The source recorded by the entries of checkpoint `reference` (as `lorascale run --base` takes it): an
    existing local path as its absolute folder (a weight file: the folder holding it), else a hub repo id
    without its @revision."""
    local = os.path.expanduser(reference)
    if os.path.exists(local):
        path = os.path.abspath(local)
        return path if os.path.isdir(path) else os.path.dirname(path)
    return reference.split("@", 1)[0]


@dataclass(frozen=True)
class CacheEntry:
    """One readable entry, from its header alone.  `nbytes` is the file's size; `last_used` its mtime (set
    by the write, touched by every hit); the rest as recorded (None, or empty, when an entry lacks it)."""

    path: Path
    key: str
    nbytes: int
    last_used: float
    source: str | None
    tensor: str | None
    shape: tuple[int, ...]
    dtype: str | None  # the base tensor's stored dtype (safetensors code)
    precision: str | None
    sides: tuple[str, ...]
    method: str | None


@dataclass
class CacheSurvey:
    """Everything under a cache directory's base-svd/ folder: readable entries, files named as entries that
    do not read as this format (truncated, damaged, an older format), writers' temporary files, and foreign
    files and folders (never touched)."""

    entries: list[CacheEntry] = field(default_factory=list)
    unreadable: list[CacheFile] = field(default_factory=list)
    temporary: list[CacheFile] = field(default_factory=list)
    foreign: list[CacheFile] = field(default_factory=list)


def _read_entry(item: CacheFile) -> CacheEntry | None:
    """The CacheEntry of a file named as an entry, from its header; None when it is not one of this format."""
    assert item.key is not None
    try:
        tensors, metadata = read_header(item.path)
        if metadata.get("format") != FORMAT or metadata.get("key") != item.key or "s" not in tensors:
            return None
        sides = tuple(sorted(json.loads(metadata["null_max_cos"])))
        shape = tuple(json.loads(metadata["shape"])) if "shape" in metadata else ()
        if any(side not in tensors for side in sides) or not all(isinstance(d, int) for d in shape):
            return None
    except _ENTRY_ERRORS:
        return None
    return CacheEntry(path=item.path, key=item.key, nbytes=item.nbytes, last_used=item.last_used,
                      source=metadata.get("source"), tensor=metadata.get("tensor"), shape=shape,
                      dtype=metadata.get("dtype"), precision=_PRECISION_OF.get(tensors["s"].dtype),
                      sides=sides, method=metadata.get("method"))


def survey(directory: Path) -> CacheSurvey:
    """What the cache under `directory` holds (cache_files.scan, then each entry's header)."""
    found = cache_files.scan(directory)
    result = CacheSurvey(temporary=found.temporary, foreign=found.foreign)
    for item in found.entries:
        entry = _read_entry(item)
        if entry is None:
            result.unreadable.append(item)
        else:
            result.entries.append(entry)
    return result


def stale_temporary(files: Iterable[CacheFile], *, now: float | None = None) -> list[CacheFile]:
    """The temporary files a crashed writer left (older than STALE_TEMPORARY_SECONDS); younger ones may be
    a write in progress."""
    now = time.time() if now is None else now
    return [f for f in files if now - f.last_used > STALE_TEMPORARY_SECONDS]


class BaseSpectrumCache:
    """Get and put BaseSpectrum entries under `directory` (created on first write), holding at most
    `max_bytes` of entries (None: no bound).  One object per run: it remembers when it began and the keys it
    wrote (never evicted by its own writes), and whether it has stopped writing or warned."""

    def __init__(self, directory: str | Path, *, max_bytes: int | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.max_bytes = max_bytes
        self._written: set[str] = set()
        self._since = time.time()  # entries written or used from now on are this run's (or a run's beside it)
        self._stopped = False  # no more writes in this run
        self._warned = False
        self._index: dict[tuple, CacheEntry] | None = None  # find()'s, built on first use

    def key(self, raw: torch.Tensor, entry: TensorEntry, analysis: Analysis, backend: str) -> str:
        """The cache key of base tensor `raw` (stored dtype, as read from `entry`) under `analysis` (precision,
        sides) with the base SVD on `backend` (its method family)."""
        parts = {"format": FORMAT, "content": content_digest(raw), "dtype": entry.dtype,
                 "shape": list(raw.shape), "precision": analysis.precision, "sides": sorted(analysis.sides),
                 "method": method_family(backend)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def label(entry: TensorEntry, analysis: Analysis, backend: str) -> dict[str, str]:
        """What an entry for base tensor `entry` records about itself (metadata, not key): source, tensor,
        shape, stored dtype, sides and method (the precision is S's dtype)."""
        return {"source": entry_source(entry), "tensor": entry_tensor(entry), "shape": json.dumps(list(entry.shape)),
                "dtype": entry.dtype, "sides": json.dumps(sorted(analysis.sides)), "method": method_family(backend)}

    def path(self, key: str) -> Path:
        return cache_files.entry_path(self.directory, key)

    def _warn(self, message: str, *args: object) -> None:
        """The cache's one warning of the run; anything after it goes to the debug log."""
        _LOG.log(logging.DEBUG if self._warned else logging.WARNING, message, *args)
        self._warned = True

    def load(self, key: str, device: str) -> BaseSpectrum | None:
        """The cached spectrum for `key` on `device`, or None (absent, or not a whole entry of this format).
        A hit marks the entry used now (its mtime), for least-recently-used eviction."""
        path = self.path(key)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a folder, or a link: not an entry (cache_files.py)
                return None
        except OSError:
            return None
        try:
            tensors = load_file(path, device="cpu")
            _, metadata = read_header(path)
            if metadata.get("format") != FORMAT or metadata.get("key") != key:
                raise ValueError("entry of another format or key")
            null_levels = json.loads(metadata["null_max_cos"])
            if not isinstance(null_levels, dict):
                raise ValueError("null_max_cos is not a JSON object")
            dtype = tensors["s"].dtype  # the compute precision (part of the key)
            if dtype not in STORED_VECTOR_DTYPES or any(tensors[side].dtype != STORED_VECTOR_DTYPES[dtype]
                                                        for side in null_levels):
                raise ValueError("vectors not in the stored dtype of this format")
            vectors = {side: tensors[side].to(device=device, dtype=dtype) for side in null_levels}
            spectrum = BaseSpectrum(s=tensors["s"].to(device), vectors=vectors, fro=float(metadata["fro"]),
                                    null_max_cos={side: float(v) for side, v in null_levels.items()})
        except _ENTRY_ERRORS as exc:
            if not os.path.lexists(path):  # evicted (by another run) between the check and the reads: a miss
                return None
            self._warn("ignoring unreadable base-SVD cache entry %s (%s); recomputing", path, exc)
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # a read-only cache still serves hits; its eviction order just does not learn of them
        return spectrum

    def store(self, key: str, base: BaseSpectrum, *, label: Mapping[str, str] | None = None) -> None:
        """Write `base` under `key` atomically, with `label` (label()) in its metadata, evicting least
        recently used entries to stay under `max_bytes`.  A cache that cannot or may not be written (disk
        error, the disk's margin, the bound full of this run's entries) warns once and is no longer written
        in this run: it must never fail the analysis."""
        if self._stopped:
            return
        path = self.path(key)
        tensors = {"s": base.s.detach().cpu().contiguous()}
        tensors.update({side: v.detach().to(STORED_VECTOR_DTYPES[v.dtype]).cpu().contiguous()
                        for side, v in base.vectors.items()})
        metadata = {**(label or {}), "format": FORMAT, "key": key, "fro": repr(base.fro),
                    "null_max_cos": json.dumps(base.null_max_cos)}
        blob = save(tensors, metadata=metadata)
        if not self._make_room(key, len(blob)):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, blob)
        except (OSError, OutputError) as exc:  # write_atomic removed its temporary file already
            self._stop("cannot write the base-SVD cache under %s (%s); continuing without it", self.directory, exc)
            return
        self._written.add(key)
        self._index = None

    def _stop(self, message: str, *args: object) -> None:
        self._stopped = True
        self._warn(message, *args)

    def _make_room(self, key: str, nbytes: int) -> bool:
        """Evict for an entry of `nbytes` under `key`, then check the disk's margin; False: do not write."""
        if self.max_bytes is not None:
            entries = [f for f in cache_files.scan(self.directory).entries if f.key != key]  # `key` is replaced
            excess = sum(f.nbytes for f in entries) + nbytes - self.max_bytes
            others = [f for f in entries if f.key not in self._written and f.last_used < self._since]
            if excess > 0 and excess > sum(f.nbytes for f in others):
                self._stop("the base-SVD cache under %s is at its bound of %s with entries this run (or one beside "
                           "it) wrote or used; the "
                           "rest of this run's base SVDs are not cached (a larger bound: --cache-max-size or "
                           "LORASCALE_CACHE_MAX_SIZE)", self.directory, format_size(self.max_bytes))
                return False
            if excess > 0:
                cache_files.evict(others, excess)
                self._index = None
        space = cache_files.disk_space(self.directory)
        if space is not None and space[0] - nbytes < cache_files.disk_margin(space[1]):
            self._stop("the disk under %s has %s free, and caching more base SVDs would leave less than %s; the "
                       "rest of this run's base SVDs are not cached", self.directory, format_size(space[0]),
                       format_size(cache_files.disk_margin(space[1])))
            return False
        return True

    def survey(self) -> CacheSurvey:
        """Every entry, readable or not, and what else lies in the cache's folder (module survey())."""
        return survey(self.directory)

    def entries(self) -> list[CacheEntry]:
        """Every readable entry (files that do not read as one are left out: survey() lists them)."""
        return self.survey().entries

    def total_bytes(self) -> int:
        """Bytes of all files named as entries (readable or not): what the bound counts."""
        return cache_files.scan(self.directory).entry_bytes

    def find(self, source: str, tensor: str, shape: Iterable[int], precision: str, sides: Iterable[str],
             method: str) -> CacheEntry | None:
        """From headers alone, for a dry run: the entry recorded for base tensor `tensor` of `source`
        (entry_source / reference_source) under these settings (`method`: a family, method_family()), or
        None.  A guess: the weights' bytes are not hashed, so a changed file with the same name matches."""
        if self._index is None:
            self._index = {}
            for entry in sorted(self.entries(), key=lambda e: e.last_used):  # the latest wins
                self._index[(entry.source, entry.tensor, entry.shape, entry.precision, entry.sides,
                             entry.method)] = entry
        return self._index.get((source, tensor, tuple(shape), precision, tuple(sorted(set(sides))), method))
