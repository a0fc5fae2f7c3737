"""One writer per output directory: a second run on the same --out refuses instead of interleaving."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lorascale.errors import OutputError

LOCK_NAME = ".lorascale.lock"


class OutputLock:
    """An exclusive, non-blocking flock on <out>/.lorascale.lock, released when the process dies."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"another lorascale run (pid {holder}) is writing to this directory",
                              path=self.path.parent, fix="wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
