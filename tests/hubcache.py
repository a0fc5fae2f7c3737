"""Build a Hugging Face hub cache on local disk, exactly as huggingface_hub lays it out, for offline tests.

Layout (see the `hf_hub_download` docstring in huggingface_hub/file_download.py):

    <cache>/models--<org>--<name>/
        blobs/<etag>                      file contents; etag = sha256 for LFS files, git blob sha1 otherwise
        snapshots/<commit>/<path>         relative symlinks to ../../blobs/<etag> (one more ../ per subfolder)
        refs/<revision>                   the commit hash, no newline (branch or tag name; may contain '/')
        .no_exist/<commit>/<path>         empty files: paths known to be absent at that commit

huggingface_hub finds a snapshot offline through refs/<revision> (or the commit hash itself) and then only checks
that the snapshot folder exists, so this is all `snapshot_download(..., local_files_only=True)` needs on every
version. Not written: the tree listing cache (trees/<commit>.json, newer versions only; when absent they cannot
tell a partial snapshot, which is what an interrupted download looks like) and the cache-wide Xet blob store.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

# What the Hub's default .gitattributes stores with LFS, plus the rule that files over 10 MiB must be LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model",
                ".pkl", ".pickle", ".npy", ".npz", ".zip", ".gz", ".tar")
LFS_MIN_SIZE = 10 * 1024 * 1024


def is_lfs(name: str, size: int) -> bool:
    """Whether the Hub would store `name` with LFS (and so name its cache blob by sha256)."""
    return name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def blob_name(name: str, content: bytes | Path) -> str:
    """The etag huggingface_hub names the blob by: sha256 (LFS) or git blob sha1 ('blob <size>\\0' + data)."""
    size = content.stat().st_size if isinstance(content, Path) else len(content)
    digest = hashlib.sha256() if is_lfs(name, size) else hashlib.sha1(b"blob %d\0" % size)
    if isinstance(content, Path):
        with content.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(content)
    return digest.hexdigest()


def make_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes | Path], *,
                   revision: str | Sequence[str] | None = "main", commit: str | None = None,
                   repo_type: str = "model", no_exist: Iterable[str] = ()) -> str:
    """Write `files` (repo path -> bytes, or a local file to copy) as one cached commit of `repo_id`.

    `revision`: the ref(s) to point at the commit (branch or tag names); None writes no ref, so only
    `org/name@<commit>` finds it. `commit` defaults to a hash derived from the contents. Calling again for the
    same repo adds a commit or refs (blobs are shared, as in the real cache). Returns the commit hash.
    """
    storage = Path(cache_dir) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    etags = {name: blob_name(name, content) for name, content in files.items()}
    if commit is None:
        seed = repo_id + "".join(f"\n{n}:{e}" for n, e in sorted(etags.items()))
        commit = hashlib.sha1(seed.encode()).hexdigest()
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")
    snapshot = storage / "snapshots" / commit
    for name, content in files.items():
        blob = storage / "blobs" / etags[name]
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(blob.name + ".incomplete")  # the suffix huggingface_hub uses while downloading
            if isinstance(content, Path):
                shutil.copyfile(content, tmp)
            else:
                tmp.write_bytes(content)
            os.replace(tmp, blob)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    snapshot.mkdir(parents=True, exist_ok=True)  # also for an empty file set
    for name in no_exist:
        marker = storage / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    refs = [revision] if isinstance(revision, str) else list(revision or ())
    for ref in refs:
        ref_path = storage / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(commit)
    return commit


def point_hub_at(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """huggingface_hub offline and pointed at `cache` (HF_HOME is its parent), until `monkeypatch` undoes it.

    Environment variables are what lorascale reads (at call time). huggingface_hub reads them once, at import,
    into `huggingface_hub.constants` (0.23 also binds HF_HUB_CACHE into `_snapshot_download`/`file_download`), so
    those copies are patched too: any call that does not pass cache_dir/local_files_only stays offline and there.
    """
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    patches = {"HF_HUB_OFFLINE": True, "HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache),
               "HF_HOME": str(cache.parent), "HF_TOKEN_PATH": str(cache.parent / "token"),
               "HF_HUB_DISABLE_TELEMETRY": True}
    for module_name in ("huggingface_hub.constants", "huggingface_hub._snapshot_download",
                        "huggingface_hub.file_download"):
        module = importlib.import_module(module_name)
        for attr, value in patches.items():
            if hasattr(module, attr):  # only replace copies that exist in this version
                monkeypatch.setattr(module, attr, value)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache of this test's own, with huggingface_hub offline and pointed at it; returns the cache
    dir.  TRANSFORMERS_OFFLINE is unset, so that HF_HUB_OFFLINE alone decides (see point_hub_at)."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    point_hub_at(monkeypatch, cache)
    return cache
