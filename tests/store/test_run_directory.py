"""The results directory under hostile conditions (issue 8): stale inputs, planted symlinks, foreign files,
failed and killed runs, full and read-only disks.  Every refusal is exit 6 with one line on stderr, and
nothing outside --out (or of the user's inside it) is ever written or deleted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import checkpoints
from lorascale.cli import main
from lorascale.store.schema import MANIFEST, MATRICES

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = Path(__file__).resolve().parents[1] / "hooks"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _args(base: Path, tuned: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["run", "--base", str(base), "--out", str(out), "--device", "cpu", "--quiet", *extra]
    for t in tuned:
        args += ["--tuned", str(t)]
    return args


def _cli(args: list[str]):
    return CliRunner().invoke(main, args)


def _one_line_error(result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    line = result.stderr if hasattr(result, "stderr") else result.output
    assert line.count("\n") == 1 and line.startswith("lorascale: error: "), line
    assert "Traceback" not in line
    for word in words:
        assert word in line, (word, line)
    return line


def _parts(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def _status(out: Path) -> str:
    return json.loads((out / MANIFEST).read_text())["status"]


@pytest.fixture
def private(llama, tmp_path):
    """Private copies of the base, a full fine-tune and an adapter that a test may change."""
    return (checkpoints.copy_checkpoint(llama.base["fp32"], tmp_path / "base"),
            checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "full"),
            checkpoints.copy_checkpoint(llama.lora.path, tmp_path / "lora"))


# --- Stale results ---------------------------------------------------------------------------------------------

def test_rerun_of_an_unchanged_complete_run_reuses_it(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out)).exit_code == 0
    before = _parts(out)
    again = _cli(_args(base, [full], out))
    assert again.exit_code == 0 and "resumed: 0 of" in again.output
    assert _parts(out) == before


@pytest.mark.parametrize("change", ["new weights", "same bytes rewritten"])
def test_changed_tuned_weights_make_the_old_rows_stale(private, tmp_path, change):
    base, full, _ = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out)).exit_code == 0
    before = _parts(out)
    shard = checkpoints.weight_files(full)[0]
    name = next(n for n in json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
                if n.endswith("q_proj.weight") and json.loads(
                    (full / "model.safetensors.index.json").read_text())["weight_map"][n] == shard.name)
    if change == "new weights":
        checkpoints.rewrite_tensor(shard, name, lambda w: w + 0.05 * torch.randn_like(w))
    else:  # identical bytes, but written again: lorascale cannot tell without hashing, so it must not reuse
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data)
    stale = _cli(_args(base, [full], out))
    _one_line_error(stale, 6, "stale", shard.name, "--overwrite")
    assert _parts(out) == before and _status(out) == "complete"
    fresh = _cli(_args(base, [full], out, "--overwrite"))
    assert fresh.exit_code == 0 and _status(out) == "complete"
    if change == "new weights":
        assert _parts(out) != before


def test_changed_adapter_scale_makes_the_old_rows_stale(private, tmp_path):
    base, _, lora = private
    out = tmp_path / "out"
    assert _cli(_args(base, [lora], out)).exit_code == 0
    config = json.loads((lora / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 4
    (lora / "adapter_config.json").write_text(json.dumps(config))
    _one_line_error(_cli(_args(base, [lora], out)), 6, "stale", "--overwrite")


def test_changed_base_makes_every_row_stale(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out)).exit_code == 0
    shard = checkpoints.weight_files(base)[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    _one_line_error(_cli(_args(base, [full], out)), 6, "stale", str(base.name))


# --- Symlinks planted in --out -----------------------------------------------------------------------------------

@pytest.mark.parametrize("planted", [".lorascale.lock", ".lorascale.pid", "manifest.json"])
def test_a_planted_file_symlink_is_never_written_through(private, tmp_path, planted):
    base, full, _ = private
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / planted).symlink_to(victim)
    result = _cli(_args(base, [full], out))
    _one_line_error(result, 6, planted, "link")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("table", ["matrices", "spectra", "similarity", "report"])
def test_a_planted_directory_symlink_is_refused(private, tmp_path, table):
    base, full, _ = private
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / table).symlink_to(elsewhere, target_is_directory=True)
    _one_line_error(_cli(_args(base, [full], out)), 6, table, "link")
    assert list(elsewhere.iterdir()) == []


def test_a_symlink_planted_during_a_resume_is_refused(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out)).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".lorascale.lock").unlink()
    (out / ".lorascale.lock").symlink_to(victim)
    _one_line_error(_cli(_args(base, [full], out, "--overwrite")), 6, ".lorascale.lock")
    assert victim.read_text() == "precious"


# --- --overwrite removes only what is ours ----------------------------------------------------------------------

def test_overwrite_refuses_a_foreign_directory(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "my-figure.png").write_bytes(b"mine")
    (out / MATRICES).mkdir()
    (out / MATRICES / "my-table.csv").write_text("mine")
    _one_line_error(_cli(_args(base, [full], out, "--overwrite")), 6, "holds no lorascale run")
    assert (out / "report" / "my-figure.png").read_bytes() == b"mine"
    assert (out / MATRICES / "my-table.csv").read_text() == "mine"


def test_a_foreign_manifest_is_not_ours(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"name": "another tool's manifest"}))
    _one_line_error(_cli(_args(base, [full], out, "--overwrite")), 6, "not a lorascale manifest")
    assert json.loads((out / MANIFEST).read_text()) == {"name": "another tool's manifest"}


def test_overwrite_of_a_run_keeps_the_users_own_files(private, tmp_path):
    base, full, lora = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out)).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / MATRICES / "my-query.sql").write_text("mine")
    (out / "report").mkdir()
    (out / "report" / "draft.md").write_text("mine")  # not a lorascale report: kept
    result = _cli(_args(base, [lora], out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine" and (out / MATRICES / "my-query.sql").read_text() == "mine"
    assert (out / "report" / "draft.md").read_text() == "mine"
    manifest = json.loads((out / MANIFEST).read_text())
    assert [t["reference"] for t in manifest["tuned"]] == [str(lora)] and manifest["status"] == "complete"


def test_overwrite_replaces_lorascales_own_report(private, tmp_path):
    base, full, lora = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out, "--report")).exit_code == 0
    assert (out / "report" / "index.html").is_file()
    assert _cli(_args(base, [lora], out, "--overwrite")).exit_code == 0
    assert not (out / "report").exists()


# --- Nothing partial is served as a result ----------------------------------------------------------------------

def test_a_failed_run_is_never_summarised(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = full / index[name]
    checkpoints.rewrite_tensor(shard, name, lambda w: torch.where(torch.rand_like(w) < 0.01, torch.nan, w))
    _one_line_error(_cli(_args(base, [full], out)), 7, name)
    assert _status(out) == "failed"
    for command in (["summary", str(out)], ["report", str(out)]):
        _one_line_error(_cli(command), 6, "failed", "partial")
    assert not (out / "report").exists()
    labelled = _cli(["summary", str(out), "--partial"])
    assert labelled.exit_code == 0 and "PARTIAL RESULTS: the run is failed" in labelled.stderr
    assert str(full) in labelled.stdout  # the finished matrices' rows, under the warning
    report = _cli(["report", str(out), "--partial"])
    assert report.exit_code == 0 and "PARTIAL RESULTS" in (out / "report" / "index.html").read_text()


def test_a_dead_running_run_reads_as_interrupted(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    assert _cli(_args(base, [full], out)).exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["status"] = "running"  # what a SIGKILL leaves behind
    (out / MANIFEST).write_text(json.dumps(manifest))
    _one_line_error(_cli(["summary", str(out)]), 6, "interrupted", "rerun")


# --- Faults in a real process: SIGTERM, full disk, read-only disk -----------------------------------------------

def _console_script() -> str:
    script = Path(sys.executable).with_name("lorascale")
    return str(script) if script.exists() else shutil.which("lorascale") or pytest.skip("no lorascale script")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HOOKS), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("LORASCALE_DEBUG", None)
    return env


def test_sigterm_is_an_interruption_that_resumes(private, tmp_path):
    base, full, _ = private
    out, marker = tmp_path / "out", tmp_path / "blocked"
    args = [_console_script(), *_args(base, [full], out)]
    process = subprocess.Popen(args, env=_env(LORASCALE_TEST_FAULT=f"block:{marker}"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)
        deadline_polls = 0
        while not marker.exists() and process.poll() is None and deadline_polls < 3000:
            deadline_polls += 1
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.1)
        assert marker.exists(), process.communicate()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and "interrupted" in stderr
    assert _status(out) == "interrupted"
    assert _cli(["summary", str(out)]).exit_code == 6
    resumed = _cli(_args(base, [full], out))
    assert resumed.exit_code == 0 and "resumed:" in resumed.output and _status(out) == "complete"


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_cleanly_and_the_manifest_says_so(private, tmp_path, small_filesystem):
    base, full, _ = private
    out = small_filesystem / "out"
    done = subprocess.run([_console_script(), *_args(base, [full], out)], capture_output=True, text=True,
                          env=_env(LORASCALE_TEST_FAULT=f"fill:{small_filesystem / 'filler'}"), timeout=300)
    assert done.returncode == 6, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "No space left" in done.stderr and str(out) in done.stderr
    assert json.loads((out / MANIFEST).read_text())["status"] == "failed"
    assert not [p for p in out.rglob(".tmp-*")], "a temporary file was left behind"
    (small_filesystem / "filler").unlink()
    resumed = subprocess.run([_console_script(), *_args(base, [full], out)], capture_output=True, text=True,
                             env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _status(out) == "complete"


def test_read_only_output_is_a_one_line_error(private, tmp_path, small_filesystem):
    base, full, _ = private
    (small_filesystem / "out").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    for out in (small_filesystem / "out", small_filesystem / "new" / "out"):
        done = subprocess.run([_console_script(), *_args(base, [full], out)], capture_output=True, text=True,
                              env=_env(), timeout=300)
        assert done.returncode == 6, done.stderr
        assert done.stderr.count("\n") == 1 and "Read-only file system" in done.stderr


def test_a_temporary_manifest_left_by_a_killed_run_is_not_foreign(private, tmp_path):
    base, full, _ = private
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-manifest.json-12345-abcdef01").write_text('{"half": ')  # SIGKILL during the first write
    result = _cli(_args(base, [full], out))
    assert result.exit_code == 0, result.output
    assert not list(out.glob(".tmp-*")) and _status(out) == "complete"
