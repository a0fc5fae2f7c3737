"""Turn a checkpoint reference (local directory, .safetensors file, or Hub `org/name[@rev]`) into local files.

Nothing here reads tensor data or safetensors headers; the result only says which files to index.  Formats:
safetensors always wins; pickled torch.save weights (pytorch_model.bin, its shards with
pytorch_model.bin.index.json, adapter_model.bin) are chosen only when a checkpoint has nothing else, never
downloaded next to safetensors, and refused with allow_pickle=False (--no-pickle).  io/torch_bin.py reads
them with torch's restricted loader.  Other pickles (.pt/.pth) are never opened.
"""

from __future__ import annotations

import glob
import logging
import os
import re

from fnmatch import fnmatchcase
from pathlib import Path
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from huggingface_hub import (get_hf_file_metadata, hf_hub_download, hf_hub_url, list_repo_files, snapshot_download,
                             try_to_load_from_cache)
from huggingface_hub.utils import HFValidationError, build_hf_headers, get_session, hf_raise_for_status, validate_repo_id

try:  # huggingface_hub >= 0.25 keeps every exception class in `errors`
    from huggingface_hub.errors import (DisabledRepoError, EntryNotFoundError, GatedRepoError, HFValidationError,
                                        HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)
except ImportError:  # 0.23-0.24: the HTTP ones only live in `utils` (which still re-exports them all today)
    from huggingface_hub.utils import (DisabledRepoError, EntryNotFoundError, GatedRepoError,  # type: ignore
                                       HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                       OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

from lorascale.errors import CheckpointFormatError, CheckpointReferenceError, option
from lorascale.io.jsonfiles import read_weight_map
from lorascale.io.safetensors_header import MAX_HEADER_BYTES
from lorascale.records import HubFile, ResolvedCheckpoint
from lorascale.settings import HubSettings, hub_settings

_log = logging.getLogger(__name__)
# The HTTP client's own base error (requests' before 1.0, httpx's after): e.g. proxy errors come through raw.
_CLIENT_ERRORS = tuple(base for base in HfHubHTTPError.__bases__ if base is not OSError)


# --- Rules shared by local directories and Hub repos ------------------------------------------------------------

INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PLAIN_BIN = "pytorch_model.bin"
_META_FILES = ("config.json", "adapter_config.json", INDEX, BIN_INDEX)
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "adapter_model.bin")
_REPO_RE = re.compile(r"(?P<repo>[A-Za-z0-9._-]+/[A-Za-z0-9._-]+)(?:@(?P<rev>.*))?", re.DOTALL)
_MAX_REPO_ID = 96  # the whole id (validate_repo_id bounds the name after the '/')
_MAX_REVISION = 255
# What `git check-ref-format` refuses in a branch or tag name (a 40-hex commit passes these rules too).
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONVERT = ("convert it to safetensors, e.g. load with transformers/peft and "
            "save_pretrained with safe_serialization=True")
_NO_PICKLE_FIX = f"drop {option('no_pickle', True)} to read them with torch's restricted loader, or " + _CONVERT


def _pickles(names: Iterable[str]) -> list[str]:
    """Top-level pickled weight files among `names`."""
    return sorted(n for n in names if "/" not in n and any(fnmatchcase(n, p) for p in _PICKLE_PATTERNS))


def _pickled(reference: str, files: list[str], *, allow_pickle: bool) -> list[str]:
    """`files` (pickled weights, the only ones there are) if pickles are allowed, else the --no-pickle refusal."""
    if not allow_pickle:
        raise CheckpointReferenceError(f"only pickled weights ({', '.join(files[:3])}"
                                       f"{', ...' if len(files) > 3 else ''}), and {option('no_pickle', True)} refuses them",
                                       path=reference, fix=_NO_PICKLE_FIX)
    return files


def _choose_weights(reference: str, names: set[str], *, adapter: bool, shards: list[str] | None,
                    bin_shards: Callable[[], list[str]] | None = None, allow_pickle: bool = True) -> list[str]:
    """The directory rules, applied to the files of a local directory or of a Hub repo; raise if none apply.

    `adapter`: adapter_config.json is present; `shards`: the weight_map shards when the safetensors index is
    present; `bin_shards`: reads those of pytorch_model.bin.index.json when that is present (called only when
    no safetensors weights exist).  Safetensors first; pickled .bin weights only when there is nothing else.
    """
    if adapter:
        if ADAPTER_WEIGHTS in names:
            return [ADAPTER_WEIGHTS]
        if ADAPTER_BIN in names:
            return _pickled(reference, [ADAPTER_BIN], allow_pickle=allow_pickle)
        raise CheckpointReferenceError(f"adapter_config.json but no {ADAPTER_WEIGHTS} or {ADAPTER_BIN}",
                                       path=reference)
    if shards is not None:
        return _present(reference, INDEX, shards, names)
    top = {n for n in names if "/" not in n}
    plain = ["model.safetensors"] if "model.safetensors" in top else sorted(
        n for n in top if n.endswith(".safetensors"))
    if len(plain) == 1:
        return plain
    if plain:
        raise CheckpointReferenceError(f"{len(plain)} .safetensors files and no {INDEX}", path=reference,
                                       fix="pass the path of the one file to analyse")
    if bin_shards is not None:
        return _pickled(reference, _present(reference, BIN_INDEX, bin_shards(), names), allow_pickle=allow_pickle)
    if PLAIN_BIN in top:
        return _pickled(reference, [PLAIN_BIN], allow_pickle=allow_pickle)
    if pickles := _pickles(names):
        raise CheckpointReferenceError(
            f"only pickled weights lorascale does not read ({', '.join(pickles[:3])})", path=reference,
            fix=f"lorascale reads {PLAIN_BIN}, sharded with {BIN_INDEX}, and {ADAPTER_BIN}; or {_CONVERT}")
    raise CheckpointReferenceError(f"not a checkpoint: no adapter_config.json, {INDEX} or .safetensors file",
                                   path=reference, fix="pass the directory that holds the model's weights")


def _present(reference: str, index: str, shards: list[str], names: set[str]) -> list[str]:
    if missing := [s for s in shards if s not in names]:
        raise CheckpointFormatError(f"shard {missing[0]} listed in {index} does not exist", path=reference,
                                    fix="re-download the checkpoint, or use another revision")
    return shards


def _read_index(path: Path) -> list[str]:
    """Distinct shard names of a model.safetensors.index.json weight_map, sorted (validated by read_weight_map)."""
    return sorted(set(read_weight_map(path).values()))


def _existing(root: Path, name: str) -> Path | None:
    return root / name if (root / name).is_file() else None


# --- Public entry point -----------------------------------------------------------------------------------------

def resolve(reference: str, *, headers_only: bool = False, allow_pickle: bool = True) -> ResolvedCheckpoint:
    """Resolve a local directory, a local .safetensors or .bin file or a Hub `org/name[@revision]` to local files.

    `headers_only`: for a Hub repo (online), fetch the metadata files but no weight file; the weight files'
    headers are then read by HTTP range requests (`remote_header`), as `lorascale inspect` does.  Pickled
    .bin weights have no header to read that way: when they are all a repo has, they are downloaded.
    `allow_pickle=False` (--no-pickle): a checkpoint with only pickled weights is refused.

    Raises CheckpointReferenceError (missing path, not a checkpoint, pickles refused, any Hub failure) or
    CheckpointFormatError (bad index JSON, index naming a missing shard).
    """
    if not reference or not reference.strip():
        raise CheckpointReferenceError("empty checkpoint reference")
    path = local_path(reference)
    if path is not None:
        return _resolve_local(reference, path, allow_pickle=allow_pickle)
    match = _REPO_RE.fullmatch(reference)
    if match:
        _check_repo_id(reference, match["repo"])
        if match["rev"] is not None:
            _check_revision(reference, match["rev"])
        return _resolve_hub(reference, match["repo"], match["rev"], hub_settings(), headers_only=headers_only,
                            allow_pickle=allow_pickle)
    raise CheckpointReferenceError("no such file or directory", path=_printable(reference),
                                   fix="give a local path, or a Hugging Face repo id as org/name[@revision]")


def local_path(reference: str) -> Path | None:
    """The local path (absolute, links not followed) that `reference` names, or None for a Hub reference.
    Explicit path syntax wins, then anything that exists: a local folder named like `org/name` is a path."""
    expanded = os.path.expanduser(reference)
    if reference.startswith(("/", "./", "../", "~")) or os.path.isabs(reference) or os.path.lexists(expanded):
        return Path(os.path.abspath(expanded))
    return None


def _check_repo_id(reference: str, repo_id: str) -> None:
    """Refuse repo ids the Hub cannot have (huggingface_hub's validate_repo_id), before they become cache folder
    names or URLs; the error is lorascale's, naming the reference and the rule."""
    try:
        validate_repo_id(repo_id)
        valid = len(repo_id) <= _MAX_REPO_ID
    except HFValidationError:
        valid = False
    if not valid:
        raise CheckpointReferenceError(
            "not a valid Hugging Face repo id, and no such file or directory", path=_printable(reference),
            fix="a repo id is org/name of letters, digits, '_', '-', '.'; no '--' or '..', no '-' or '.' at either end")


def _check_revision(reference: str, revision: str) -> None:
    """Allow what git allows as a branch or tag name (it may contain '/', e.g. refs/pr/1) and commit hashes.

    The revision names a file under the hub cache's refs/ folder and goes into URLs: '..', control
    characters, whitespace and leading '/' would reach outside them.
    """
    shown = repr(revision) if len(revision) <= 60 else repr(revision[:60]) + "..."
    problem = None
    if not revision:
        problem = "is empty"
    elif len(revision) > _MAX_REVISION:
        problem = f"is longer than {_MAX_REVISION} characters"
    elif _REF_FORBIDDEN_RE.search(revision) or not revision.isprintable():
        problem = "contains '..', '//', '@{', whitespace, a control character or one of ~^:?*[\\"
    elif revision.startswith("/") or revision.endswith(("/", ".", ".lock")) or revision == "@":
        problem = "starts with '/' or ends with '/', '.' or '.lock'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        problem = "has a path component starting with '.' or ending with '.lock'"
    if problem is not None:
        raise CheckpointReferenceError(f"revision {shown} {problem}", path=_printable(reference),
                                       fix="give a branch, tag, e.g. refs/pr/1, or 40-hex commit after '@'")


def _printable(reference: str) -> str:
    # The error is one line: a newline or escape sequence in the reference must not break or restyle it.
    return reference if reference.isprintable() else repr(reference)


def hub_file(origin: HubFile) -> Path:
    """The path of one file of a Hub commit in this machine's hub cache (HF_HUB_CACHE), fetched into it
    unless HF_HUB_OFFLINE is set.  For Ray workers, whose node may keep its hub cache elsewhere than the
    driver's.  Raises CheckpointReferenceError (not cached offline, or any Hub failure).
    """
    settings = hub_settings()
    reference = f"{origin.repo_id}@{origin.revision}"
    return Path(_hub_call(reference, origin.revision, settings, hf_hub_download, origin.repo_id, origin.filename,
                          revision=origin.revision, cache_dir=settings.cache_dir,
                          local_files_only=settings.offline, endpoint=settings.endpoint))


def cached_hub_file(origin: HubFile) -> Path | None:
    """The file in this machine's hub cache if it is there already (no network), else None."""
    found = try_to_load_from_cache(origin.repo_id, origin.filename, cache_dir=hub_settings().cache_dir,
                                   revision=origin.revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def download_hub_file(origin: HubFile, *, local_dir: Path | None = None, tqdm_class: type | None = None) -> Path:
    """Download one weight file of a Hub commit (hub streaming, execute/streaming.py): into the hub cache, or
    into `local_dir` (the disk-light --scratch-dir mode, which never touches the hub cache).  huggingface_hub
    retries a connection that breaks mid-file from where it broke.  `tqdm_class` receives the byte counts.

    Raises CheckpointReferenceError: 401/403 say to set HF_TOKEN; a download cut off says that a rerun resumes.
    The token never reaches the message (the error is rebuilt outside the `except`, see _hub_call).
    """
    settings = hub_settings()
    reference = f"{origin.repo_id}@{origin.revision}"
    where = {"local_dir": local_dir} if local_dir is not None else {"cache_dir": settings.cache_dir}
    try:
        return Path(hf_hub_download(origin.repo_id, origin.filename, revision=origin.revision, token=settings.token,
                                    local_files_only=settings.offline, endpoint=settings.endpoint,
                                    tqdm_class=tqdm_class, **where))
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError,
            *_CLIENT_ERRORS) as exc:
        error = _hub_error(exc, reference, origin.revision, settings, download=origin.filename)
    raise error


def remote_header(resolved: ResolvedCheckpoint, path: Path) -> tuple[bytes, int, str | None]:
    """(header JSON bytes, file size, sha256 or None) of weight file `path` of a headers-only Hub checkpoint,
    read with two HTTP range requests (the 8-byte length, then the header) through huggingface_hub's
    session: no tensor data is transferred.  The sha256 is the one the Hub publishes for an LFS file (its
    ETag).  Raises CheckpointReferenceError for Hub failures, CheckpointFormatError for a length prefix that
    does not fit the file."""
    settings = hub_settings()
    assert resolved.repo_id is not None and resolved.revision is not None
    url = hf_hub_url(resolved.repo_id, path.relative_to(resolved.root).as_posix(), revision=resolved.revision,
                     endpoint=settings.endpoint)
    size, etag = _hub_call(resolved.reference, resolved.revision, settings, _remote_size, url)
    prefix = _hub_call(resolved.reference, resolved.revision, settings, _remote_range, url, 0, 8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if length < 0 or 8 + length > (size or 0) or length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(f"header length {length} does not fit in a file of {size} bytes", path=path,
                                    fix="the file on the Hub is not a safetensors file")
    header = _hub_call(resolved.reference, resolved.revision, settings, _remote_range, url, 8, length)
    return header, size, etag if etag is not None and _SHA256_RE.fullmatch(etag) else None


def _hub_has(reference: str, repo_id: str, commit: str, filename: str, settings: HubSettings) -> bool:
    """Whether the Hub commit has `filename` (one HEAD request; no download)."""
    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=settings.endpoint)
    try:
        get_hf_file_metadata(url, token=settings.token)
        return True
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError,
            *_CLIENT_ERRORS) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        absent = not isinstance(exc, (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)) and (
            isinstance(exc, EntryNotFoundError) or (isinstance(exc, HfHubHTTPError) and status == 404))
        if absent:
            return False
        error = _hub_error(exc, reference, commit, settings)
    raise error  # outside the except block: the HTTP error holds the request, and its headers the token


def _remote_size(url: str, *, token: str | None) -> tuple[int | None, str | None]:
    metadata = get_hf_file_metadata(url, token=token)
    return metadata.size, metadata.etag


def _remote_range(url: str, start: int, length: int, *, token: str | None) -> bytes:
    # The session follows redirects (to the CDN) by default, with requests and with httpx alike.
    response = get_session().get(url, headers={**build_hf_headers(token=token),
                                               "Range": f"bytes={start}-{start + length - 1}"})
    hf_raise_for_status(response)
    return response.content[:length]


# --- Local ------------------------------------------------------------------------------------------------------

def _resolve_local(reference: str, path: Path, *, allow_pickle: bool = True) -> ResolvedCheckpoint:
    # abspath, not resolve(): following symlinks would turn hub-cache snapshot files into hash-named blobs.
    if path.is_dir():
        return _resolve_dir(reference, path, allow_pickle=allow_pickle)
    if not path.exists():
        raise CheckpointReferenceError("no such file or directory", path=reference,
                                       fix="check the path; a hub repo id is written org/name")
    if path.suffix == ".bin":
        _pickled(reference, [path.name], allow_pickle=allow_pickle)
    elif path.suffix in {".pt", ".pth"}:
        raise CheckpointReferenceError("pickled .pt/.pth files are not read", path=reference,
                                       fix=f"save the state dict with torch.save as a .bin, or {_CONVERT}")
    elif path.suffix != ".safetensors":
        raise CheckpointReferenceError("not a .safetensors or .bin file, or a checkpoint directory", path=reference)
    root = path.parent
    adapter = _existing(root, "adapter_config.json") if path.name in (ADAPTER_WEIGHTS, ADAPTER_BIN) else None
    return ResolvedCheckpoint(reference=reference, source="local-file", kind="lora" if adapter else "full",
                              root=root, weight_files=(path,), adapter_config=adapter,
                              config=_existing(root, "config.json"))


def _resolve_dir(reference: str, root: Path, *, allow_pickle: bool = True) -> ResolvedCheckpoint:
    names = {p.name for p in root.iterdir() if p.is_file()}
    adapter = _existing(root, "adapter_config.json")
    index = None if adapter else _existing(root, INDEX)
    shards = _read_index(index) if index else None
    names |= {s for s in shards or () if (root / s).is_file()}  # shards may sit in subfolders
    bin_index = None if adapter or index else _existing(root, BIN_INDEX)

    def bin_shards() -> list[str]:
        assert bin_index is not None
        listed = _read_index(bin_index)
        names.update(s for s in listed if (root / s).is_file())
        return listed

    weights = _choose_weights(reference, names, adapter=adapter is not None, shards=shards,
                              bin_shards=bin_shards if bin_index else None, allow_pickle=allow_pickle)
    if bin_index is not None and weights[0].endswith(".bin"):
        index = bin_index
    return ResolvedCheckpoint(reference=reference, source="local-dir", kind="lora" if adapter else "full",
                              root=root, weight_files=tuple(root / n for n in weights), index_file=index,
                              adapter_config=adapter, config=_existing(root, "config.json"))


# --- Hugging Face Hub -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _HubMetadata:
    """What a hub snapshot's metadata files say about its weights (the first of _resolve_hub's two rounds)."""

    adapter: Path | None  # adapter_config.json
    index: Path | None  # the safetensors index (not for an adapter)
    config: Path | None
    shards: list[str] | None  # the index's shards
    bin_index: Path | None  # the .bin index, when there is no safetensors one
    allow_pickle: bool

    @classmethod
    def read(cls, snap: Path, *, allow_pickle: bool) -> _HubMetadata:
        adapter, index, config = (_existing(snap, n) for n in ("adapter_config.json", INDEX, "config.json"))
        index = None if adapter else index
        return cls(adapter=adapter, index=index, config=config, shards=_read_index(index) if index else None,
                   bin_index=None if adapter or index else _existing(snap, BIN_INDEX), allow_pickle=allow_pickle)

    @property
    def rules(self) -> dict[str, Any]:
        """The keywords of _choose_weights that the metadata decides."""
        bin_index = self.bin_index
        return {"adapter": self.adapter is not None, "bin_shards": (lambda: _read_index(bin_index)) if bin_index else None,
                "allow_pickle": self.allow_pickle}

    def checkpoint(self, reference: str, repo_id: str, commit: str, snap: Path, wanted: list[str],
                   **more: Any) -> ResolvedCheckpoint:
        """The ResolvedCheckpoint of `wanted` in `snap`; `more`: index_file (default: the safetensors index),
        headers_only, file_hashes."""
        more.setdefault("index_file", self.index)
        return ResolvedCheckpoint(reference=reference, source="hub", kind="lora" if self.adapter else "full",
                                  root=snap, weight_files=tuple(snap / n for n in wanted), adapter_config=self.adapter,
                                  config=self.config, repo_id=repo_id, revision=commit, **more)


def _resolve_hub(reference: str, repo_id: str, revision: str | None, settings: HubSettings, *,
                 headers_only: bool = False, allow_pickle: bool = True) -> ResolvedCheckpoint:
    # Two rounds so that only what is needed is fetched: the small metadata decides which weights to get.
    snap = _snapshot(reference, repo_id, revision, _META_FILES, settings)
    commit = snap.name  # snapshot folders are named by commit hash, whatever revision was asked for
    meta = _HubMetadata.read(snap, allow_pickle=allow_pickle)
    # Safetensors first: .bin weights are fetched only when a listing (or, offline, the cache) shows nothing else.
    wanted = [ADAPTER_WEIGHTS] if meta.adapter else meta.shards or ["model.safetensors"]
    if headers_only and not settings.offline:  # (offline, the cache is all there is: read it as usual)
        wanted = _remote_weights(reference, repo_id, commit, meta, settings) or wanted
        if not wanted[0].endswith(".bin"):  # a .bin's index is inside the file: it is downloaded below
            return meta.checkpoint(reference, repo_id, commit, snap, wanted, headers_only=True)
    snap = _snapshot(reference, repo_id, commit, wanted, settings)
    if missing := [n for n in wanted if not (snap / n).is_file()]:
        # Only now pay for a listing: the rest of the directory rules, or the precise reason for the failure.
        wanted = _weights_after_miss(reference, repo_id, snap, meta, missing, wanted, settings)
        snap = _snapshot(reference, repo_id, commit, wanted, settings)
        if missing := [n for n in wanted if not (snap / n).is_file()]:
            raise _cache_miss(reference, missing, settings.cache_dir, offline=settings.offline)
    index = meta.bin_index if meta.bin_index is not None and wanted[0].endswith(".bin") else meta.index
    hashes = {n: h for n in wanted if (h := _lfs_sha256(snap / n, snap)) is not None}
    _log.debug("resolved %s to %s (%d weight files)", reference, snap, len(wanted))
    return meta.checkpoint(reference, repo_id, commit, snap, wanted, index_file=index, file_hashes=hashes)


def _remote_weights(reference: str, repo_id: str, commit: str, meta: _HubMetadata,
                    settings: HubSettings) -> list[str] | None:
    """For a headers-only look (online): which weight files, when the metadata alone does not say; None when it
    does (an index's shards, an adapter's safetensors)."""
    if not (meta.adapter or meta.shards):  # which single file: a listing, not a download
        names = set(_hub_call(reference, commit, settings, list_repo_files, repo_id, revision=commit))
        return _choose_weights(reference, names, shards=None, **meta.rules)
    if meta.adapter and not _hub_has(reference, repo_id, commit, ADAPTER_WEIGHTS, settings):
        names = {ADAPTER_BIN} if _hub_has(reference, repo_id, commit, ADAPTER_BIN, settings) else set()
        return _choose_weights(reference, names, shards=None, **meta.rules)
    return None


def _weights_after_miss(reference: str, repo_id: str, snap: Path, meta: _HubMetadata, missing: list[str],
                        wanted: list[str], settings: HubSettings) -> list[str]:
    """The weight files to fetch when the first guess (`wanted`) was not all there: offline, what the cache
    holds; online, what the repo's listing shows.  Raises the cache miss when nothing else can be chosen."""
    commit = snap.name
    if settings.offline:  # all we know is what the cache holds
        names = {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()}
        lone = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
        pickled = (ADAPTER_BIN in names if meta.adapter else
                   not (meta.shards or lone) and (meta.bin_index is not None or bool(_pickles(names))))
        if pickled:  # the cached .bin weights (or the refusal: --no-pickle, .pt files)
            listed = set(_read_index(meta.bin_index)) if meta.bin_index else set()
            return _choose_weights(reference, names | listed, shards=None, **meta.rules)
        if meta.adapter or meta.shards or len(lone) != 1:
            raise _cache_miss(reference, missing, settings.cache_dir, offline=True)
        return lone
    names = set(_hub_call(reference, commit, settings, list_repo_files, repo_id, revision=commit))
    chosen = _choose_weights(reference, names, shards=meta.shards, **meta.rules)
    if chosen == wanted:  # the repo has them, yet the download left them out
        raise _cache_miss(reference, missing, settings.cache_dir, offline=False)
    return chosen


def _snapshot(reference: str, repo_id: str, revision: str | None, files: Iterable[str],
              settings: HubSettings) -> Path:
    """snapshot_download restricted to `files` (exact names; escaped because the patterns are fnmatch globs)."""
    return Path(_hub_call(reference, revision, settings, snapshot_download, repo_id, revision=revision,
                          cache_dir=settings.cache_dir, allow_patterns=[glob.escape(f) for f in files],
                          local_files_only=settings.offline, endpoint=settings.endpoint))


def _hub_call(reference: str, revision: str | None, settings: HubSettings, fn: Callable[..., Any], /,
              *args: Any, **kwargs: Any) -> Any:
    """Call huggingface_hub, turning its exceptions into one-line CheckpointReferenceErrors.

    The replacement is raised outside the `except` block so it carries no __context__: huggingface_hub errors
    hold the HTTP request, whose headers contain the token.
    """
    try:
        return fn(*args, token=settings.token, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError,
            *_CLIENT_ERRORS) as exc:
        error = _hub_error(exc, reference, revision, settings)
    raise error


def _hub_error(exc: Exception, reference: str, revision: str | None, settings: HubSettings, *,
               download: str | None = None) -> CheckpointReferenceError:
    """Map by exception class only: huggingface_hub's wording changes between versions.

    `download`: the weight file being downloaded (hub streaming); a failure that is not about access then
    says that a rerun resumes, since finished matrices and downloaded files are kept.
    """
    def err(message: str, fix: str | None = None) -> CheckpointReferenceError:
        return CheckpointReferenceError(message, path=reference, fix=fix)

    if download is not None and not isinstance(exc, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
                                                     DisabledRepoError, HFValidationError)):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if not (isinstance(exc, HfHubHTTPError) and status in (401, 403)) and not settings.offline:
            if isinstance(exc, OSError) and not isinstance(exc, HfHubHTTPError) and exc.filename:
                return err(f"cannot write {download} at {exc.filename} ({exc.strerror or type(exc).__name__})",
                           f"check disk space and permissions of the hub cache or {option('scratch_dir')}")
            what = f"HTTP {status}" if status else type(exc).__name__
            return err(f"download of {download} failed ({what})",
                       "check the network connection and HF_ENDPOINT, then rerun the same command: finished "
                       "matrices and downloaded files are kept")

    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return err("gated or private repo: this token (or no token) has no access",
                   "set HF_TOKEN to a token of an account that accepted the model's licence on the Hub")
    if isinstance(exc, RepositoryNotFoundError):
        return err("repository not found on the Hugging Face Hub (or private and no valid token)",
                   "check the repo id, or set HF_TOKEN to a token that can read it")
    if isinstance(exc, RevisionNotFoundError):
        return err(f"revision {revision or 'main'!r} not found", "use an existing branch, tag or commit hash")
    if isinstance(exc, DisabledRepoError):
        return err("the repo has been disabled on the Hub", "use another repo or a local copy")
    if isinstance(exc, HFValidationError):
        return err("not a valid Hugging Face repo id, and no such file or directory")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return err(f"gated or private repo (HTTP {status})",
                   "set HF_TOKEN to a token that can read it (and accept the model's licence on the Hub)")
    if settings.offline or any(isinstance(e, OfflineModeIsEnabled) for e in (exc, exc.__cause__)):
        # (the latter: HF_HUB_OFFLINE was set when huggingface_hub was imported, and it only reads it then)
        return _cache_miss(reference, None, settings.cache_dir, offline=True)
    if isinstance(exc, LocalEntryNotFoundError):  # online, Hub unreachable, nothing cached
        return err(f"cannot reach the Hugging Face Hub, and not in the local hub cache at {settings.cache_dir}",
                   "check the network connection, proxy and HF_ENDPOINT")
    if isinstance(exc, OSError) and not isinstance(exc, HfHubHTTPError) and exc.filename:  # a local file problem
        return err(f"cannot use the hub cache at {settings.cache_dir} ({exc.strerror or type(exc).__name__})",
                   "check disk space and permissions, or set HF_HUB_CACHE")
    return err(f"Hugging Face Hub request failed ({type(exc).__name__}{f', HTTP {status}' if status else ''})",
               "check the network connection, or retry later")


def _cache_miss(reference: str, files: list[str] | None, cache_dir: Path, *,
                offline: bool) -> CheckpointReferenceError:
    """Files absent from the snapshot: offline, not cached yet; online, a download that left them out."""
    what = "" if not files else f"{files[0]}{f' (and {len(files) - 1} more)' if len(files) > 1 else ''} "
    if offline:
        return CheckpointReferenceError(f"{what}not in the local hub cache at {cache_dir}", path=reference,
                                        fix="run once with network access or unset HF_HUB_OFFLINE")
    return CheckpointReferenceError(f"{what}could not be fetched into the hub cache at {cache_dir}",
                                    path=reference, fix="retry; check disk space and write permission")


def _lfs_sha256(pointer: Path, snap: Path) -> str | None:
    """sha256 of a cached LFS file, taken from the name of the blob its snapshot symlink points to.

    Only one link level is read: newer huggingface_hub makes repo blobs symlinks into a cache-wide store named
    by Xet hash, which is not a sha256. Non-LFS blobs are named by git sha1 (40 hex) and give None.
    """
    try:
        target = os.readlink(pointer)
    except OSError:  # not a symlink: cache without symlink support, nothing to learn
        return None
    blob = os.path.normpath(os.path.join(pointer.parent, target))
    in_repo_blobs = os.path.dirname(blob) == os.path.normpath(snap.parent.parent / "blobs")
    name = os.path.basename(blob)
    return name if in_repo_blobs and _SHA256_RE.fullmatch(name) else None
