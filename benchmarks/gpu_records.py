"""The record file gpu_check.py's stages append to, and the atomic writes of its summaries.

Every finished measurement is one JSON line in OUT/records.jsonl, appended and fsynced at once, so a
stage (or the whole run) that is killed still leaves everything it measured.  No torch here: the parent
process reads and renders records without initialising CUDA.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RECORDS = "records.jsonl"


def append_record(out: Path, record: dict) -> None:
    """Append one record (with a wall-clock stamp) to OUT/records.jsonl and make it durable now."""
    line = json.dumps({**record, "at": round(time.time(), 3)}, default=str) + "\n"
    with open(Path(out) / RECORDS, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_records(out: Path) -> list[dict]:
    """Every complete record so far; a last line cut short by a kill is ignored."""
    path = Path(out) / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Deadline:
    """A wall-clock deadline shared across processes (time.time, which every process agrees on)."""

    def __init__(self, at: float) -> None:
        self.at = at

    def left(self) -> float:
        return self.at - time.time()

    def passed(self) -> bool:
        return self.left() <= 0


def wait_for_go(path: Path, poll_s: float = 0.2) -> dict:
    """Block until the parent writes `path` (a JSON object: this stage's deadline and settings), and return it.

    gpu_check.py starts every stage process at once, so that Python and torch load while the stages before
    it run; a stage waits here for its turn.  It exits if the parent has gone (nobody will ever write it).
    """
    parent = os.getppid()
    while not path.exists():
        if os.getppid() != parent:
            raise SystemExit("gpu_check.py went away before this stage's turn")
        time.sleep(poll_s)
    return json.loads(path.read_text())
