"""One writer per output directory: a second run on the same --out refuses instead of interleaving.

The lock is a `filelock` lock (portable: flock on POSIX, LockFileEx on Windows) on <out>/.lorascale.lock,
released by the OS when the process dies, so a killed run never leaves a stale lock.  The holder's pid is
kept in a separate file written by `write_atomic`, because some filelock versions truncate the lock file
when another process merely tries it.  Neither file is ever opened through a symbolic link.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import filelock

from lorascale.errors import OutputError, option
from lorascale.store.atomic import write_atomic, write_failure

LOCK_NAME = ".lorascale.lock"
PID_NAME = ".lorascale.pid"
_LINK_FIX = f"remove the link; lorascale never writes through links inside {option('out')}"


class OutputLock:
    """An exclusive, non-blocking lock on `out`, as a context manager; `held_by(out)` names a holder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / LOCK_NAME
        self._lock = filelock.FileLock(str(self.path), timeout=0)

    def __enter__(self) -> OutputLock:
        for name in (LOCK_NAME, PID_NAME):
            if (self.out / name).is_symlink():
                raise OutputError("is a symbolic link", path=self.out / name, fix=_LINK_FIX)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise OutputError(f"another lorascale run ({held_by(self.out)}) is writing to this directory",
                              path=self.out, fix=f"wait for it to finish or choose another {option('out')}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # filelock opens with O_NOFOLLOW: a link planted after our check
                raise OutputError("is a symbolic link", path=self.path, fix=_LINK_FIX) from None
            raise write_failure(self.path, exc) from None
        try:
            write_atomic(self.out / PID_NAME, str(os.getpid()).encode())
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def is_locked(out: Path) -> bool:
    """True while some process holds the lock of `out` (a run is writing there now)."""
    if not (out / LOCK_NAME).exists() or (out / LOCK_NAME).is_symlink():
        return False
    probe = filelock.FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False
    probe.release()
    return False


def held_by(out: Path) -> str:
    """'pid N' of the process that last took the lock of `out`, for messages."""
    try:
        fd = os.open(out / PID_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return "another process"
    try:
        text = os.read(fd, 32).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    return f"pid {text}" if text.isdigit() else "another process"
