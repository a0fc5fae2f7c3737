"""Hub streaming (issue 11): `run` on hub references downloads shard by shard while earlier shards are analysed,
through the real huggingface_hub client and a hub-layout server on loopback (tests/hubserver.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from hubserver import HubServer, hub, serving  # noqa: F401  (hub: the fixture)

from lorascale.cli import main
from runs import compare

TOKEN = "hf_SeCrEt_t0ken_never_printed_0123456789"


def _matrices(out: Path, rename: dict[str, str]) -> list[tuple]:
    table = ds.dataset(out / "matrices").to_table().to_pylist()
    return sorted((rename.get(r["model"], r["model"]), r["matrix"], r["intruders"], round(r["delta_fro"], 4))
                  for r in table)


def _weights(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors") if p.is_file())


def test_a_streamed_hub_run_equals_the_local_run(llama, hub: HubServer, tmp_path, monkeypatch):
    hub.add_directory("org/base", llama.base["bf16"])
    hub.add_directory("org/tuned", llama.tuned["bf16"])
    hub.add_directory("org/lora", llama.lora.path)
    statuses = []
    remote = compare("org/base", ["org/tuned", "org/lora"], tmp_path / "remote", device="cpu", use_cache=False,
                     download_progress=statuses.append)
    local = compare(str(llama.base["bf16"]), [str(llama.tuned["bf16"]), str(llama.lora.path)], tmp_path / "local",
                    device="cpu", use_cache=False)
    rename = {str(llama.tuned["bf16"]): "org/tuned", str(llama.lora.path): "org/lora"}
    assert _matrices(tmp_path / "remote", {}) == _matrices(tmp_path / "local", rename)
    assert remote.computed == local.computed > 0
    manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    files = manifest["base"]["files"]
    assert files and all(f["streamed"] and len(f["sha256"]) == 64 and f["header_sha256"] for f in files)
    assert statuses[-1].files_done == statuses[-1].files_total == 2 * len(files) + 1
    assert statuses[-1].bytes_done == statuses[-1].bytes_total


def _last_shard(directory: Path) -> str:
    return sorted(p.name for p in directory.glob("model-*.safetensors"))[-1]


def test_analysis_starts_before_the_last_shard_is_downloaded(llama, hub: HubServer, tmp_path):
    """The server holds back the base's last shard until a first matrix is written: a run that downloaded
    everything before computing would wait out hold_timeout and be recorded in held_too_long."""
    hub.add_directory("org/base", llama.base["bf16"])
    hub.add_directory("org/lora", llama.lora.path)
    hub.throttle = 2e6  # bytes per second: a slow hub
    last = f"org/base/{_last_shard(llama.base['bf16'])}"
    hub.hold[last] = released = threading.Event()
    seen = []

    def progress(done: int, total: int, matrix: str) -> None:
        seen.append((done, last in {name for name, _ in hub.finished}))
        released.set()

    compare("org/base", ["org/lora"], tmp_path / "out", device="cpu", use_cache=False, progress=progress)
    assert hub.held_too_long == []
    assert seen[0] == (1, False)  # matrix 1 was written while the last shard was still on its way
    assert seen[-1][1] is True and len(seen) > 1


def test_scratch_dir_deletes_its_copies_and_never_the_hub_cache(llama, hub: HubServer, offline_hub, tmp_path):
    """fp32 tiny Llamas: shards 1-3 hold the layers, shard 4 only excluded tensors (never downloaded)."""
    from huggingface_hub import hf_hub_download

    from lorascale.execute.streaming import SCRATCH_AHEAD

    hub.add_directory("org/base", llama.base["fp32"])
    commit = hub.add_directory("org/tuned", llama.tuned["fp32"])
    shard = "model-00003-of-00004.safetensors"
    cached = Path(hf_hub_download("org/tuned", shard, revision=commit, cache_dir=offline_hub, endpoint=hub.url))
    before = {p: p.stat().st_mtime_ns for p in _weights(offline_hub)}
    hub.downloads.clear()
    scratch = tmp_path / "scratch"
    held = []

    def on_status(status) -> None:
        if status.finished is not None:
            held.append(len(_weights(scratch)))

    compare("org/base", ["org/tuned"], tmp_path / "out", device="cpu", use_cache=False, scratch_dir=scratch,
            download_progress=on_status)
    assert _weights(scratch) == []  # every copy deleted once its matrices were done
    assert {p: p.stat().st_mtime_ns for p in _weights(offline_hub)} == before == {cached: before[cached]}
    downloaded = {name for name, _ in hub.downloads if name.endswith(".safetensors")}
    assert f"org/tuned/{shard}" not in downloaded  # read where it was, in the hub cache
    assert len(downloaded) == 5 and not any("model-00004-" in name for name in downloaded)
    # A job needs 2 files (base and tuned shard); downloads run SCRATCH_AHEAD further, never all 5 at once.
    assert len(held) == 6 and max(held) <= 2 + SCRATCH_AHEAD < 5
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["options"]["scratch_dir"] == str(scratch)
    # The same command again: the shards are gone, but their identity (commit, sha256, header hash) is not.
    again = compare("org/base", ["org/tuned"], tmp_path / "out", device="cpu", use_cache=False, scratch_dir=scratch)
    assert again.computed == 0 and again.manifest.status == "complete"


def test_a_server_dying_mid_download_fails_cleanly_and_a_rerun_resumes(llama, hub: HubServer, monkeypatch,
                                                                       tmp_path):
    hub.add_directory("org/base", llama.base["bf16"])
    hub.add_directory("org/lora", llama.lora.path)
    last = f"org/base/{_last_shard(llama.base['bf16'])}"
    size = len(hub.repos["org/base"].files[last.removeprefix("org/base/")])
    hub.die_after[last] = size // 2
    out = tmp_path / "out"
    args = ["run", "--base", "org/base", "--tuned", "org/lora", "--out", str(out), "--device", "cpu", "--no-cache",
            "--quiet"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 2, failed.output
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert f"download of {last.removeprefix('org/base/')} failed" in failed.stderr and "rerun" in failed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    finished_before = ds.dataset(out / "matrices").count_rows()
    assert 0 < finished_before < manifest["matrices_planned"]

    revived = HubServer(repos=hub.repos)
    with serving(monkeypatch, revived):
        resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] is True
    assert ds.dataset(out / "matrices").count_rows() == manifest["matrices_planned"]
    # Files downloaded before the failure were not fetched again: only the one that was cut off.  (This
    # huggingface_hub deletes a partial file when its retries fail, so that one file starts again.)
    assert [name for name, _ in revived.downloads if name.endswith(".safetensors")] == [last]


def test_401_says_to_set_hf_token_and_never_shows_the_token(llama, hub: HubServer, monkeypatch, tmp_path, caplog):
    hub.add_directory("org/base", llama.base["bf16"])
    hub.add_directory("org/lora", llama.lora.path)
    hub.token = "hf_the_right_one"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level("DEBUG")
    out = tmp_path / "out"
    args = ["run", "--base", "org/base", "--tuned", "org/lora", "--out", str(out), "--device", "cpu", "--no-cache"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.count("\n") == 1 and "HF_TOKEN" in refused.stderr
    assert not out.exists()

    hub.token = TOKEN  # now the token is the right one: the run passes it on every request
    accepted = CliRunner().invoke(main, args)
    assert accepted.exit_code == 0, accepted.output
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*.json"))
    for text in (refused.output, refused.stderr, accepted.output, accepted.stderr, caplog.text, written):
        assert TOKEN not in text


def test_stream_order_takes_jobs_as_their_shards_arrive():
    """Jobs on base shard 1 + tuned shard 1 first, largest first among them; no job waits for a file it does
    not read."""
    from lorascale.execute.streaming import stream_order
    from lorascale.records import HubFile, MatrixJob, RemoteFile, TensorEntry, TunedSource

    def entry(repo: str, shard: int, name: str, rows: int) -> TensorEntry:
        return TensorEntry(name, Path(f"/nowhere/{repo}/{shard}"), "F32", (rows, 8), 0, rows * 32,
                           hub=HubFile(repo, "c" * 40, f"model-{shard}.safetensors"))

    layout = [("a", 2, 8), ("b", 1, 4), ("c", 1, 16), ("d", 2, 32), ("e", 3, 8)]  # name, shard, rows
    jobs = [MatrixJob(n, None, n, rows, 8, entry("org/base", s, n, rows),
                      (TunedSource("org/tuned", "full", full=entry("org/tuned", s, n, rows)),), "org/base")
            for n, s, rows in sorted(layout, key=lambda x: -x[2])]  # the plan: largest first
    streamed = {e.hub: RemoteFile(1, "h") for job in jobs for e in (job.base, job.tuned[0].full)}
    streamed = dict(sorted(streamed.items(), key=lambda kv: (kv[0].repo_id, kv[0].filename)))
    assert [j.matrix for j in stream_order(jobs, streamed)] == ["c", "b", "d", "a", "e"]


def test_scratch_dir_is_for_in_process_runs():
    from lorascale.errors import OptionError
    from lorascale.request import build_request

    with pytest.raises(OptionError, match="scratch_dir applies to in-process runs"):
        build_request("org/base", "org/tuned", "out", workers=2, scratch_dir="scratch")
