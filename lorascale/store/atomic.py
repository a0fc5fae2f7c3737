"""The one way lorascale writes a file: temporary name, fsync, rename; never through a symbolic link.

Every file lorascale creates (Parquet parts, the manifest, base-SVD cache entries, the run's pid file)
goes through `write_atomic`, so that

- a reader sees the old file or the new one, never half of one (crash, Ctrl-C, full disk);
- the temporary file is created with O_CREAT | O_EXCL | O_NOFOLLOW: a planted symlink at that name makes
  the write fail instead of writing through it, and `os.replace` swaps a link at the final name for our
  file rather than following it;
- a failed write removes its temporary file, which also gives back the space a full disk took.

Directories inside an output directory are made with `ensure_directory`, which refuses a symlink.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from lorascale.errors import OutputError, option

TMP_PREFIX = ".tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_WRITE_FIX = f"free space or choose a writable {option('out')}; rerun the same command to resume"


def write_failure(path: Path, exc: OSError) -> OutputError:
    """The one-line error for a write that the file system refused (full, read-only, no permission)."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ELOOP:
        reason = "it is a symbolic link, and lorascale never writes through one"
    return OutputError(f"cannot write: {reason}", path=path, fix=_WRITE_FIX)


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], None], *, mode: int = 0o644) -> None:
    """Write `content` (bytes, or a function that writes to a binary file) to `path` atomically.

    Raises OutputError (exit 6) naming `path` when the file system refuses the write; nothing is left
    behind then, and an earlier file at `path` is unchanged.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, mode)
    except OSError as exc:
        raise write_failure(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # already renamed or never fully created: nothing of ours is left
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from exc
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows), hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_directory(path: Path) -> Path:
    """Create directory `path` (one level) if needed; refuse a symlink or a non-directory there."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise write_failure(path, exc) from exc
    if path.is_symlink():
        raise OutputError(f"is a symbolic link; lorascale never writes through links inside {option('out')}", path=path,
                          fix=f"remove the link, or choose another {option('out')}")
    if not path.is_dir():
        raise OutputError("exists and is not a directory", path=path, fix=f"remove it, or choose another {option('out')}")
    return path
