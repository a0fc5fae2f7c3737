"""The one write path: whole files or nothing, never through a link."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lorascale.errors import OutputError
from lorascale.store.atomic import ensure_directory, write_atomic


def test_replaces_a_link_at_the_final_name_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "manifest.json").symlink_to(victim)
    write_atomic(tmp_path / "manifest.json", b"{}")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "manifest.json").is_symlink() and (tmp_path / "manifest.json").read_bytes() == b"{}"


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "part-000000.parquet"
    target.write_bytes(b"old")

    def fail(handle) -> None:
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device") as info:
        write_atomic(target, fail)
    assert info.value.exit_code == 6 and str(target) in str(info.value)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_an_interrupted_writer_leaves_no_temporary(tmp_path: Path) -> None:
    def interrupted(handle) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_ensure_directory_refuses_links_and_files(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "matrices").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "spectra").write_text("a file")
    with pytest.raises(OutputError, match="symbolic link"):
        ensure_directory(tmp_path / "matrices")
    with pytest.raises(OutputError, match="not a directory"):
        ensure_directory(tmp_path / "spectra")
    assert ensure_directory(tmp_path / "similarity").is_dir()
