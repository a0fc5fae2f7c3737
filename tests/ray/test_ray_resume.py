"""`lorascale run` as a subprocess: an interrupted or killed driver resumes on rerun; a second run on the same
--out refuses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rayhelpers import MARKER, assert_complete_and_unique, lorascale_command, marked_processes, wait_until

from lorascale.store.writer import completed_pairs

MATRICES = 64  # the `wide` checkpoints


def _run_command(wide: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*lorascale_command(), "run", "--base", str(wide["base"]), "--tuned", str(wide["full"]),
            "--out", str(out), "--quiet", *extra]


def _parts(out: Path) -> list[Path]:
    return sorted((out / "matrices").glob("part-*.parquet"))


def _interrupt_after_next_part(command: list[str], env: dict[str, str], out: Path, log: Path, sig: int) -> int:
    """Start a run, wait for one more matrices part than there is now, send `sig`; return the exit code.

    The writer flushes every 16 matrices, so each part marks progress while the run still has more to do.
    The run gets its own session and the signal goes to the whole group, as Ctrl-C in a terminal does.
    """
    before = len(_parts(out))
    with open(log, "w") as sink:
        driver = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: len(_parts(out)) > before or driver.poll() is not None, timeout=240,
                       what="a new part")
            assert driver.poll() is None, log.read_text()
            os.killpg(driver.pid, sig)
            return driver.wait(timeout=120)
        finally:
            driver.kill()
            driver.wait()


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_driver_resumes_with_only_the_missing_matrices(wide, subprocess_env, tmp_path: Path):
    """Ctrl-C, then SIGKILL, then a rerun of the same command: complete tables, no duplicates, resumed."""
    out = tmp_path / "out"
    command = _run_command(wide, out, "--workers", "2")
    marker = subprocess_env[MARKER]

    assert _interrupt_after_next_part(command, subprocess_env, out, tmp_path / "1.log", signal.SIGINT) == 130
    last_line = (tmp_path / "1.log").read_text().strip().splitlines()[-1]
    assert last_line.startswith("lorascale: interrupted; finished matrices are saved")
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    wait_until(lambda: not marked_processes(marker), timeout=30, interval=0.5, what="Ray to stop after Ctrl-C")

    after_ctrl_c = len(completed_pairs(out))
    assert _interrupt_after_next_part(command, subprocess_env, out, tmp_path / "2.log", signal.SIGKILL) < 0
    done_before = len(completed_pairs(out))
    assert after_ctrl_c < done_before < MATRICES
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # killed: never finished
    # The local Ray the killed driver started shares its fate (Ray's reaper); give it a moment to go.
    wait_until(lambda: not marked_processes(marker), timeout=30, interval=0.5, what="Ray to stop with its driver")

    rerun = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    match = re.search(r"resumed: (\d+) of (\d+) computed now", rerun.stderr)
    assert match and (int(match[1]), int(match[2])) == (MATRICES - done_before, MATRICES), rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] is True and manifest["status"] == "complete"
    assert [s["status"] for s in manifest["sessions"]] == ["interrupted", "running", "complete"]
    assert manifest["execution"]["executor"] == "ray"
    assert_complete_and_unique(out, matrices=MATRICES, models=1)


def test_second_run_on_the_same_out_refuses(wide, subprocess_env, tmp_path: Path):
    out = tmp_path / "out"
    command = _run_command(wide, out)
    first = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (out / "manifest.json").exists() or first.poll() is not None, timeout=120,
                   what="the first run to start writing")
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock: no race with its finishing
        assert first.poll() is None, first.stderr.read()
        started = time.monotonic()
        second = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=120,
                                check=False)
        assert second.returncode == 6, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lorascale: error:"), second.stderr
        assert f"pid {first.pid}" in lines[0] and "another lorascale run" in lines[0]
        assert time.monotonic() - started < 60  # refuses at once, does not wait for the lock
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
