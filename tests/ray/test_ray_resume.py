"""`lorascale run` as a subprocess: an interrupted or killed driver resumes on rerun; a second run on the same
--out refuses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rayhelpers import MARKER, assert_complete_and_unique, lorascale_command, marked_processes, wait_until

from lorascale.store.writer import completed_pairs

MATRICES = 64  # the `wide` checkpoints
PAUSED_DRIVER = Path(__file__).with_name("paused_lorascale.py")


def _run_args(wide: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["run", "--base", str(wide["base"]), "--tuned", str(wide["full"]),
            "--out", str(out), "--quiet", *extra]


def _interrupt_after_next_part(args: list[str], env: dict[str, str], log: Path, sig: int) -> int:
    """Start a run that pauses once one more matrices part is on disk (paused_lorascale.py), send `sig` when it
    has paused, and return the exit code.

    The writer flushes every 16 matrices, so the pause comes with finished matrices saved and others still to
    do.  The run gets its own session and the signal goes to the whole group, as Ctrl-C in a terminal does.
    """
    paused = log.with_suffix(".paused")
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, str(PAUSED_DRIVER), str(paused), *args], env=env,
                                  stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # The timeout only guards against a hang; the event is the pause file.
            wait_until(lambda: paused.exists() or driver.poll() is not None, timeout=600, what="the run to pause")
            assert paused.exists(), f"the run ended ({driver.returncode}) before a new part: {log.read_text()}"
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
    args = _run_args(wide, out, "--workers", "2")
    marker = subprocess_env[MARKER]

    assert _interrupt_after_next_part(args, subprocess_env, tmp_path / "1.log", signal.SIGINT) == 130
    last_line = (tmp_path / "1.log").read_text().strip().splitlines()[-1]
    assert last_line.startswith("lorascale: interrupted; finished matrices are saved")
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    wait_until(lambda: not marked_processes(marker), timeout=120, interval=0.5, what="Ray to stop after Ctrl-C")

    after_ctrl_c = len(completed_pairs(out))
    assert _interrupt_after_next_part(args, subprocess_env, tmp_path / "2.log", signal.SIGKILL) == -signal.SIGKILL
    done_before = len(completed_pairs(out))
    assert after_ctrl_c < done_before < MATRICES
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # killed: never finished
    # The local Ray the killed driver started shares its fate (Ray's reaper): wait for its processes to end
    # (the timeouts here only guard against a hang; a loaded machine may take a while).
    wait_until(lambda: not marked_processes(marker), timeout=120, interval=0.5, what="Ray to stop with its driver")

    rerun = subprocess.run([*lorascale_command(), *args], env=subprocess_env, capture_output=True, text=True,
                           timeout=300, check=False)
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
    command = [*lorascale_command(), *_run_args(wide, out)]
    first = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (out / "manifest.json").exists() or first.poll() is not None, timeout=120,
                   what="the first run to start writing")
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock: no race with its finishing
        assert first.poll() is None, first.stderr.read()
        # The first run is frozen holding the lock, so a second run that waited for the lock would never
        # return: the timeout turns that hang into a failure.
        second = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=120,
                                check=False)
        assert second.returncode == 6, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lorascale: error:"), second.stderr
        assert f"pid {first.pid}" in lines[0] and "another lorascale run" in lines[0]
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
