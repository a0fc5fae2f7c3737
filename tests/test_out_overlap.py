"""`run` and `mitigate` never delete or write their inputs, and a refused command leaves every directory as
it found it (issue 26, points 2 and 3).

An input (base, tuned model, adapter; local, linked, or a Hub snapshot) inside --out, or --out inside an input,
is refused with exit 2 and one line naming both paths, before anything is created, deleted or written: the
trees of every directory involved are snapshotted (names, kinds, sizes, modification times, contents, link
targets, and the directories' own modification times, which change when an entry is created and removed
again) and compared after the command.  The refusals of the results directory itself (foreign files, another
run, nothing to resume, a planted link, a foreign adapter/) are made before its lock is taken: no
.lorascale.lock or .lorascale.pid is left behind.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

import checkpoints
from hubcache import make_hub_cache, point_hub_at
from lorascale.cli import main
from lorascale.store.lock import LOCK_NAME, PID_NAME
from lorascale.store.schema import ADAPTER_DIR, MANIFEST, MATRICES, MITIGATED_MARKER

pytestmark = pytest.mark.usefixtures("one_thread")


def tree(root: Path) -> dict[str, tuple]:
    """Everything under `root` (and `root` itself), links not followed."""
    found: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = os.lstat(path)
        key = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            found[key] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[key] = ("dir", info.st_mtime_ns)
        else:
            found[key] = ("file", info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, code: int, *words: object) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorascale: error: "), result.stderr
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def inputs(llama, tmp_path):
    """Private copies of the base and the adapter, and a finished mitigation in out/ (with out/adapter/)."""
    base = checkpoints.copy_checkpoint(llama.base["fp32"], tmp_path / "base")
    adapter = checkpoints.copy_checkpoint(llama.lora.path, tmp_path / "adapter")
    out = tmp_path / "out"
    done = invoke("mitigate", "--base", base, "--adapter", adapter, "--out", out, "--lambda", "0", "--quiet",
                  "--include", "*layers.0.self_attn*", "--no-cache")
    assert done.exit_code == 0, done.output
    return base, adapter, out


def _mitigate(base: Path, adapter: Path | str, out: Path, *extra: str):
    return invoke("mitigate", "--base", base, "--adapter", adapter, "--out", out, "--lambda", "0", "--quiet",
                  "--include", "*layers.0.self_attn*", "--no-cache", *extra)


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=target.is_dir())
    return link


# Each case: (--adapter, --out, what the message must name) from the fixture's base, adapter and out.
CASES = {
    # The case: mitigating the adapter an earlier mitigate wrote, into the same --out, with --overwrite.
    "adapter inside out": lambda tmp, base, adapter, out: (out / ADAPTER_DIR, out, "lies inside --out"),
    "out is the adapter": lambda tmp, base, adapter, out: (adapter, adapter, "lies inside --out"),
    "out is the base": lambda tmp, base, adapter, out: (adapter, base, "lies inside --out"),
    "out inside the base": lambda tmp, base, adapter, out: (adapter, base / "results", "--out lies inside"),
    "out inside the adapter": lambda tmp, base, adapter, out: (adapter, adapter / "a" / "b", "--out lies inside"),
    "adapter through a link into out": lambda tmp, base, adapter, out: (
        _link(tmp / "linked-adapter", out / ADAPTER_DIR), out, "through links"),
    "out through a link to the base": lambda tmp, base, adapter, out: (
        adapter, _link(tmp / "out-link", base), "lies inside --out"),
    "adapter weights linked into out": lambda tmp, base, adapter, out: (_weights_linked(tmp, adapter, out), out,
                                                                         "through links"),
}


def _weights_linked(tmp: Path, adapter: Path, out: Path) -> Path:
    """An adapter directory of its own whose weight file is a link to the one in out/adapter/."""
    directory = tmp / "adapter-with-linked-weights"
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes((out / ADAPTER_DIR / "adapter_config.json").read_bytes())
    _link(directory / "adapter_model.safetensors", out / ADAPTER_DIR / "adapter_model.safetensors")
    return directory


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_mitigate_refuses_any_overlap_and_changes_nothing(inputs, tmp_path, case, overwrite):
    base, adapter, out = inputs
    adapter_arg, out_arg, words = CASES[case](tmp_path, base, adapter, out)
    before = tree(tmp_path)
    result = _mitigate(base, adapter_arg, out_arg, *(["--overwrite"] if overwrite else []))
    assert_refused(result, 2, words, str(out_arg))
    assert tree(tmp_path) == before, case


def test_run_refuses_a_tuned_model_inside_out_with_overwrite(llama, tmp_path):
    base = checkpoints.copy_checkpoint(llama.base["fp32"], tmp_path / "base")
    out = tmp_path / "out"
    first = invoke("run", "--base", base, "--tuned", llama.tuned["fp32"], "--out", out, "--device", "cpu",
                   "--quiet", "--no-cache", "--include", "*layers.0.self_attn.q_proj*")
    assert first.exit_code == 0, first.output
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], out / "tuned-copy")
    for base_arg, tuned_arg, out_arg in ((base, tuned, out), (out / "tuned-copy", base, out), (base, tuned, base),
                                         (base, tuned, tuned / "results")):
        before = tree(tmp_path)
        result = invoke("run", "--base", base_arg, "--tuned", tuned_arg, "--out", out_arg, "--device", "cpu",
                        "--quiet", "--no-cache", "--overwrite")
        assert_refused(result, 2, "--out", str(out_arg))
        assert tree(tmp_path) == before


def test_a_hub_cache_inside_out_is_refused_before_anything_is_read(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cache = out / "hf" / "hub"
    cache.mkdir(parents=True)
    point_hub_at(monkeypatch, cache)
    make_hub_cache(cache, "org/tuned", {p.name: p for p in llama.tuned["fp32"].iterdir() if p.is_file()})
    before = tree(tmp_path)
    result = invoke("run", "--base", llama.base["fp32"], "--tuned", "org/tuned", "--out", out, "--device", "cpu",
                    "--quiet", "--no-cache")
    assert_refused(result, 2, "the hub cache of the tuned org/tuned lies inside --out", str(cache))
    assert tree(tmp_path) == before


def test_a_hub_snapshot_holding_out_is_refused(llama, tmp_path, offline_hub):
    make_hub_cache(offline_hub, "org/tuned", {p.name: p for p in llama.tuned["fp32"].iterdir() if p.is_file()})
    snapshot = next((offline_hub / "models--org--tuned" / "snapshots").iterdir())
    before = tree(tmp_path)
    result = invoke("run", "--base", llama.base["fp32"], "--tuned", "org/tuned", "--out", snapshot / "out",
                    "--device", "cpu", "--quiet", "--no-cache")
    assert_refused(result, 2, "--out lies inside the tuned org/tuned")
    assert tree(tmp_path) == before


# --- The results directory's own refusals come before its lock ------------------------------------------


def _foreign(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _table_link(out: Path) -> None:
    out.mkdir()
    (out / MANIFEST).write_text("{}")
    (out / MATRICES).symlink_to(out.parent, target_is_directory=True)


@pytest.mark.parametrize("setup, code, words", [
    (_foreign, 6, "holds no lorascale run"),
    (_table_link, 6, "symbolic link"),
])
def test_refusals_of_out_leave_no_lock_behind(llama, tmp_path, setup, code, words):
    out = tmp_path / "out"
    setup(out)
    before = tree(tmp_path)
    result = invoke("run", "--base", llama.base["fp32"], "--tuned", llama.tuned["fp32"], "--out", out, "--device",
                    "cpu", "--quiet", "--no-cache", "--scratch-dir", tmp_path / "scratch")
    assert_refused(result, code, words)
    assert not (out / LOCK_NAME).exists() and not (out / PID_NAME).exists()
    assert not (tmp_path / "scratch").exists()  # the scratch directory is created only after these checks
    assert tree(tmp_path) == before


def test_another_run_or_nothing_to_resume_leaves_no_lock_behind(inputs, tmp_path):
    base, adapter, out = inputs
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for args, words in ((["--out", out, "--lambda", "0.5"], "holds a different run"),
                        (["--out", fresh, "--resume"], "nothing to resume")):
        before = tree(tmp_path)
        result = invoke("mitigate", "--base", base, "--adapter", adapter, "--quiet", "--no-cache",
                        "--include", "*layers.0.self_attn*", *args)
        assert_refused(result, 6, words)
        assert tree(tmp_path) == before


def test_a_foreign_adapter_directory_is_refused_before_any_matrix(inputs, tmp_path):
    """out/adapter/ that lorascale did not write: refused up front (it used to be refused only after every
    matrix was computed), and left alone."""
    base, adapter, out = inputs
    (out / ADAPTER_DIR / MITIGATED_MARKER).unlink()  # no longer carries lorascale's mark
    before = tree(tmp_path)
    result = _mitigate(base, adapter, out, "--overwrite")
    assert_refused(result, 6, "is not an adapter lorascale wrote")
    assert tree(tmp_path) == before


def test_overwrite_never_removes_an_input_even_when_asked_directly(inputs):
    """The store's own guard, under the pipeline's refusal: RunDirectory given the inputs keeps them, also
    where --overwrite would remove lorascale's own files (a mitigated adapter/ is one)."""
    from lorascale.store.manifest import read_manifest
    from lorascale.store.run_directory import RunDirectory

    _, _, out = inputs
    manifest = read_manifest(out)
    kept = tree(out / ADAPTER_DIR)
    with RunDirectory.open(out, manifest, overwrite=True, inputs=(out / ADAPTER_DIR,)):
        assert not (out / MANIFEST).exists()  # lorascale's own files went
    assert tree(out / ADAPTER_DIR) == kept
