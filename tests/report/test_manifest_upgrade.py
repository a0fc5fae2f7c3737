"""Every manifest layout lorascale ever wrote is read through store/manifest.upgrade(), and reads the same as the
current layout: tests/fixtures/manifests/ holds one of each, named by the date its layout was first written
(derived from `git log -p` of the code that wrote it):

    2026-11-23-core     fb554dd  options k/epsilon/side/precision/include/exclude/driver; no execution, labels
    2026-11-23-topk     50b8a30  + mode, top_k, backend, cache_dir, execution
    2026-11-27-labels   16f8cfd  + label in base/tuned entries, input identity (metadata_files)
    2026-11-27-routes   3081505  + routes
    2026-12-02-request  74ae62e  as written until format_version (every field of today's layout but it)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from report_fixtures import Tuned, write_run

from lorascale.errors import OutputError
from lorascale.report import summary_rows
from lorascale.store.manifest import FORMAT_VERSION, Manifest, read_manifest, upgrade, write_manifest
from lorascale.store.schema import MANIFEST

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "manifests"
LAYOUTS = sorted(p.stem for p in FIXTURES.glob("*.json"))


def test_every_layout_has_a_fixture():
    assert LAYOUTS == ["2026-11-23-core", "2026-11-23-topk", "2026-11-27-labels", "2026-11-27-routes",
                       "2026-12-02-request"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_old_layout_reads_as_the_current_one(tmp_path, layout):
    shutil.copy(FIXTURES / f"{layout}.json", tmp_path / MANIFEST)
    manifest = read_manifest(tmp_path)
    assert manifest is not None and manifest.format_version == FORMAT_VERSION
    options = manifest.options
    assert {"k", "epsilon", "side", "mode", "top_k"} <= set(options)
    # Before the top-k mode (2026-11-23 core) every run was exact; later layouts say what they did.
    assert (options["mode"], options["top_k"]) == {"2026-11-23-core": ("exact", None), "2026-11-23-topk": ("topk", 16),
                                                   "2026-11-27-labels": ("exact", None),
                                                   "2026-11-27-routes": ("exact", None),
                                                   "2026-12-02-request": ("topk", 64)}[layout]
    labelled = layout >= "2026-11-27"
    assert [e["label"] for e in (manifest.base, *manifest.tuned)] == (["base", "lora"] if labelled else [None, None])
    assert isinstance(manifest.routes, dict) and isinstance(manifest.execution, dict)
    assert manifest.extra == {}  # nothing of a layout this project wrote is left unknown
    # Written back, it is the current layout: upgrading again changes nothing.
    write_manifest(tmp_path, manifest)
    again = json.loads((tmp_path / MANIFEST).read_text())
    assert again["format_version"] == FORMAT_VERSION and upgrade(again) == again


def test_a_newer_version_is_kept_as_it_is():
    current = json.loads((FIXTURES / f"{LAYOUTS[-1]}.json").read_text())
    newer = {**current, "format_version": FORMAT_VERSION + 1, "new": 1}
    assert upgrade(newer) is newer
    assert Manifest.from_dict(newer, path=Path("m")).extra == {"new": 1}
    del newer["torch"]  # a field this version needs: refused in one line, not a TypeError
    with pytest.raises(OutputError, match="has no 'torch'"):
        Manifest.from_dict(newer, path=Path("m"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_summary_of_an_old_layout_is_the_summary_of_the_current_one(tmp_path, layout):
    """The report's reader sees an old run as it sees a new one: the same summary rows, labels from the
    manifest or, before labels, short names."""
    root = write_run(tmp_path / "run", [Tuned("lora", "lora")], layers=1, modules=("q_proj",))
    current = summary_rows(root)
    old = json.loads((FIXTURES / f"{layout}.json").read_text())
    old["base"]["reference"] = "meta-llama/Tiny-base"
    (root / MANIFEST).write_text(json.dumps(old))
    assert summary_rows(root) == current
