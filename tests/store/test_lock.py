"""The run lock: one writer per --out, the holder named by pid, never through a symlink."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorascale.errors import OutputError
from lorascale.store.lock import LOCK_NAME, PID_NAME, OutputLock, held_by, is_locked

_HOLD = """
import sys, time
from pathlib import Path
from lorascale.store.lock import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_process_is_refused_and_told_the_holders_pid(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(tmp_path) and held_by(tmp_path) == f"pid {holder.pid}"
        with pytest.raises(OutputError, match=f"pid {holder.pid}") as info:
            with OutputLock(tmp_path):
                pass
        assert info.value.exit_code == 6
    finally:
        holder.communicate("\n", timeout=60)
    assert not is_locked(tmp_path)
    with OutputLock(tmp_path):  # released when the holder exits
        assert (tmp_path / PID_NAME).read_text() == str(os.getpid())


@pytest.mark.parametrize("name", [LOCK_NAME, PID_NAME])
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        with OutputLock(out):
            pass
    assert victim.read_text() == "precious"
