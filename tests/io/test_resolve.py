"""Checkpoint reference resolution: local directories and files, and Hub repos served from a local cache.

Everything runs offline: Hub repos come from a cache written by tests/hubcache.py, and the online code paths are
driven through a stand-in for snapshot_download/list_repo_files that serves from that cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import snapshot_download as real_snapshot_download
from safetensors.torch import save, save_file

from hubcache import make_hub_cache, offline_hub  # noqa: E402,F401  (offline_hub is a fixture)

from lorascale.errors import CheckpointFormatError, CheckpointReferenceError, LorascaleError  # noqa: E402
from lorascale.io import resolve as resolve_module  # noqa: E402
from lorascale.io.resolve import (  # noqa: E402
    DisabledRepoError, GatedRepoError, HfHubHTTPError, HubSettings, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError, hub_settings, resolve)

INDEX = "model.safetensors.index.json"
SECRET = "hf_FAKEsecretTOKEN0123456789abcdefXYZ"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                  "base_model_name_or_path": "org/base"}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj.weight": torch.randn(4, 3, generator=g)}


def st_bytes(seed: int = 0) -> bytes:
    return save(tensors(seed))


def index_json(shards: list[str] = SHARDS) -> bytes:
    # Two tensors per shard, so the weight_map repeats each shard name (resolution must dedupe).
    weight_map = {f"layers.{i}.{m}.weight": shard for i, shard in enumerate(shards) for m in ("q", "k")}
    return json.dumps({"metadata": {"total_size": 96}, "weight_map": weight_map}).encode()


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


# --- Local directories and files ------------------------------------------------------------------------------


def test_local_dir_single_file(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    save_file(tensors(), str(root / "model.safetensors"))
    write_dir(root, {"config.json": b"{}", "tokenizer.json": b"{}"})
    got = resolve(str(root))
    assert (got.source, got.kind, got.root) == ("local-dir", "full", root)
    assert got.weight_files == (root / "model.safetensors",)
    assert got.config == root / "config.json"
    assert got.index_file is got.adapter_config is got.repo_id is got.revision is None
    assert got.reference == str(root)


def test_local_dir_lone_other_safetensors_file(tmp_path):
    root = write_dir(tmp_path / "m", {"consolidated.safetensors": st_bytes()})
    assert resolve(str(root)).weight_files == (root / "consolidated.safetensors",)


def test_local_dir_several_safetensors_without_index_is_ambiguous(tmp_path):
    root = write_dir(tmp_path / "m", {"a.safetensors": st_bytes(), "b.safetensors": st_bytes(1)})
    with pytest.raises(CheckpointReferenceError, match="2 .safetensors files"):
        resolve(str(root))


def test_local_dir_sharded(tmp_path):
    root = write_dir(tmp_path / "m", {INDEX: index_json(list(reversed(SHARDS))), "config.json": b"{}",
                                      **{s: st_bytes(i) for i, s in enumerate(SHARDS)}})
    got = resolve(str(root))
    assert got.kind == "full"
    assert got.weight_files == tuple(root / s for s in SHARDS)  # distinct and sorted
    assert got.index_file == root / INDEX


def test_local_dir_sharded_missing_shard(tmp_path):
    root = write_dir(tmp_path / "m", {INDEX: index_json(), SHARDS[0]: st_bytes()})
    with pytest.raises(CheckpointFormatError, match=SHARDS[1]):
        resolve(str(root))


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "index JSON is not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"metadata": {}}', "no 'weight_map'"),
    (b'{"weight_map": []}', "no 'weight_map'"),
    (b'{"weight_map": "model.safetensors"}', "no 'weight_map'"),
    (b'{"weight_map": {}}', "no 'weight_map'"),
    (b'[1, 2]', "no 'weight_map'"),
    (b'{"weight_map": {"w": "../outside.safetensors"}}', "invalid shard"),
    (b'{"weight_map": {"w": "sub/../../outside.safetensors"}}', "invalid shard"),
    (b'{"weight_map": {"w": "/etc/model.safetensors"}}', "invalid shard"),
    (b'{"weight_map": {"w": "C:/model.safetensors"}}', "invalid shard"),
    (b'{"weight_map": {"w": "..\\\\outside.safetensors"}}', "invalid shard"),
    (b'{"weight_map": {"w": 3}}', "invalid shard"),
    (b'{"weight_map": {"w": null}}', "invalid shard"),
    (b'{"weight_map": {"w": ["a.safetensors"]}}', "invalid shard"),
    (b'{"weight_map": {"w": "model.bin"}}', "invalid shard"),
    (b'{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}', "key 'w' twice"),
    (b'{"weight_map": {"w": "a.safetensors"}, "weight_map": {"w": "b.safetensors"}}', "key 'weight_map' twice"),
    (b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_local_dir_bad_index(tmp_path, content, problem):
    root = write_dir(tmp_path / "m", {INDEX: content})
    with pytest.raises(CheckpointFormatError, match=problem) as info:
        resolve(str(root))
    assert INDEX in str(info.value)


def test_local_adapter_dir(tmp_path):
    root = write_dir(tmp_path / "adapter", {"adapter_config.json": json.dumps(ADAPTER_CONFIG).encode(),
                                            "adapter_model.safetensors": st_bytes(),
                                            "adapter_model.bin": b"pickle"})
    got = resolve(str(root))
    assert (got.kind, got.weight_files) == ("lora", (root / "adapter_model.safetensors",))
    assert got.adapter_config == root / "adapter_config.json"


def test_local_adapter_with_only_bin(tmp_path):
    root = write_dir(tmp_path / "adapter", {"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"})
    got = resolve(str(root))
    assert (got.kind, got.weight_files, got.weight_format) == ("lora", (root / "adapter_model.bin",), "pytorch")
    with pytest.raises(CheckpointReferenceError, match="no_pickle=True refuses") as info:
        resolve(str(root), allow_pickle=False)
    assert "adapter_model.bin" in str(info.value) and "safe_serialization=True" in str(info.value)


def test_local_dir_with_only_pickles(tmp_path):
    root = write_dir(tmp_path / "m", {"pytorch_model.bin": b"pickle", "config.json": b"{}"})
    got = resolve(str(root))
    assert (got.weight_files, got.index_file, got.weight_format) == ((root / "pytorch_model.bin",), None, "pytorch")
    with pytest.raises(CheckpointReferenceError, match="pytorch_model.bin.*no_pickle=True.*convert it to safetensors"):
        resolve(str(root), allow_pickle=False)


BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SHARDS = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_local_dir_with_sharded_bin(tmp_path):
    root = write_dir(tmp_path / "m", {BIN_INDEX: index_json(BIN_SHARDS), **{s: b"pickle" for s in BIN_SHARDS},
                                      "config.json": b"{}"})
    got = resolve(str(root))
    assert got.weight_files == tuple(root / s for s in BIN_SHARDS) and got.index_file == root / BIN_INDEX
    (root / BIN_SHARDS[1]).unlink()
    with pytest.raises(CheckpointFormatError, match=f"{BIN_SHARDS[1]} listed in {BIN_INDEX}"):
        resolve(str(root))


@pytest.mark.parametrize("safetensors", ["sharded", "single"])
def test_local_dir_with_both_formats_takes_safetensors(tmp_path, safetensors):
    """Even with --no-pickle: the .bin copies (and their index) are not even looked at."""
    files = {BIN_INDEX: b"not json", **{s: b"pickle" for s in BIN_SHARDS}, "pytorch_model.bin": b"pickle"}
    files.update({INDEX: index_json(), **{s: st_bytes(i) for i, s in enumerate(SHARDS)}} if safetensors == "sharded"
                 else {"model.safetensors": st_bytes()})
    root = write_dir(tmp_path / "m", files)
    for allow_pickle in (True, False):
        got = resolve(str(root), allow_pickle=allow_pickle)
        assert got.weight_format == "safetensors" and all(p.suffix == ".safetensors" for p in got.weight_files)
        assert got.index_file == (root / INDEX if safetensors == "sharded" else None)


def test_bin_index_must_name_bin_shards(tmp_path):
    root = write_dir(tmp_path / "m", {BIN_INDEX: index_json(SHARDS)})
    with pytest.raises(CheckpointFormatError, match="shards must be .bin files"):
        resolve(str(root))


def test_local_single_bin_file(tmp_path):
    root = write_dir(tmp_path / "a", {"adapter_config.json": b"{}", "adapter_model.bin": b"pickle",
                                      "pytorch_model.bin": b"pickle"})
    assert resolve(str(root / "adapter_model.bin")).kind == "lora"
    assert resolve(str(root / "pytorch_model.bin")).kind == "full"
    with pytest.raises(CheckpointReferenceError, match="no_pickle=True"):
        resolve(str(root / "pytorch_model.bin"), allow_pickle=False)


def test_local_single_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(tensors(), str(path))
    got = resolve(str(path))
    assert (got.source, got.kind, got.root, got.weight_files) == ("local-file", "full", tmp_path, (path,))


def test_local_single_adapter_file(tmp_path):
    root = write_dir(tmp_path / "a", {"adapter_config.json": b"{}", "adapter_model.safetensors": st_bytes()})
    got = resolve(str(root / "adapter_model.safetensors"))
    assert (got.source, got.kind, got.adapter_config) == ("local-file", "lora", root / "adapter_config.json")


@pytest.mark.parametrize("name", ["notes.txt", "weights.pt", "model.pth"])
def test_local_other_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(CheckpointReferenceError):
        resolve(str(tmp_path / name))


@pytest.mark.parametrize("reference", ["./nope", "/definitely/not/here", "~/no-such-lorascale-dir", "a/b/c", "x"])
def test_missing_path(tmp_path, monkeypatch, reference):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointReferenceError, match="no such file or directory"):
        resolve(reference)


def test_not_a_checkpoint_dir(tmp_path):
    root = write_dir(tmp_path / "m", {"README.md": b"hi", "config.json": b"{}"})
    with pytest.raises(CheckpointReferenceError, match="not a checkpoint"):
        resolve(str(root))


def test_existing_relative_path_wins_over_hub_id(tmp_path, monkeypatch, offline_hub):
    monkeypatch.chdir(tmp_path)
    write_dir(tmp_path / "org" / "name", {"model.safetensors": st_bytes()})
    got = resolve("org/name")
    assert got.source == "local-dir" and got.root == tmp_path / "org" / "name"


def test_tilde_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_dir(tmp_path / "ckpt", {"model.safetensors": st_bytes()})
    assert resolve("~/ckpt").root == tmp_path / "ckpt"


# --- Hub, offline from a local cache --------------------------------------------------------------------------

def sharded_repo_files() -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', INDEX: index_json(), "tokenizer.json": b"{}",
            "pytorch_model.bin": b"pickle", **{s: st_bytes(i) for i, s in enumerate(SHARDS)}}


@pytest.fixture
def spy(monkeypatch):
    """Record every snapshot_download call made by lorascale (and still run the real one)."""
    calls: list[dict] = []

    def recording(repo_id, **kwargs):
        calls.append(dict(repo_id=repo_id, **kwargs))
        return real_snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr(resolve_module, "snapshot_download", recording)
    return calls


def test_hub_sharded_repo(offline_hub, spy):
    files = sharded_repo_files()
    commit = make_hub_cache(offline_hub, "org/model", files)
    got = resolve("org/model")
    snap = offline_hub / "models--org--model" / "snapshots" / commit
    assert (got.source, got.kind, got.repo_id, got.revision) == ("hub", "full", "org/model", commit)
    assert got.root == snap
    assert got.weight_files == tuple(snap / s for s in SHARDS)
    assert all(p.name != "pytorch_model.bin" for p in got.weight_files)
    assert (got.index_file, got.config, got.adapter_config) == (snap / INDEX, snap / "config.json", None)
    assert got.file_hashes == {s: hashlib.sha256(files[s]).hexdigest() for s in SHARDS}
    # Only metadata and the chosen weight files were ever asked for.
    patterns = [p for call in spy for p in call["allow_patterns"]]
    requested = {n for n in files if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    assert requested == {"config.json", INDEX, *SHARDS}
    assert all(call["local_files_only"] is True and call["cache_dir"] == offline_hub for call in spy)


def test_hub_single_file_repo(offline_hub):
    files = {"config.json": b"{}", "model.safetensors": st_bytes(), "pytorch_model.bin": b"pickle"}
    make_hub_cache(offline_hub, "org/small", files)
    got = resolve("org/small")
    assert [p.name for p in got.weight_files] == ["model.safetensors"]
    assert got.file_hashes == {"model.safetensors": hashlib.sha256(files["model.safetensors"]).hexdigest()}


def test_hub_adapter_repo(offline_hub, spy):
    files = {"adapter_config.json": json.dumps(ADAPTER_CONFIG).encode(), "adapter_model.safetensors": st_bytes(),
             "adapter_model.bin": b"pickle", "README.md": b"# adapter"}
    make_hub_cache(offline_hub, "org/adapter", files)
    got = resolve("org/adapter")
    assert got.kind == "lora" and [p.name for p in got.weight_files] == ["adapter_model.safetensors"]
    assert got.adapter_config == got.root / "adapter_config.json"
    patterns = [p for call in spy for p in call["allow_patterns"]]
    assert not any(fnmatch.fnmatchcase(n, p) for n in ("adapter_model.bin", "README.md") for p in patterns)


def test_hub_commit_and_tag(offline_hub):
    old = make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes(1)}, revision="v1.0")
    new = make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes(2)}, revision="main")
    assert old != new
    assert resolve("org/model").revision == new
    assert resolve("org/model@main").revision == new
    assert resolve("org/model@v1.0").revision == old
    by_commit = resolve(f"org/model@{old}")
    assert by_commit.revision == old and by_commit.reference == f"org/model@{old}"
    assert by_commit.root.name == old


def test_hub_commit_without_any_ref(offline_hub):
    commit = make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes()}, revision=None)
    assert resolve(f"org/model@{commit}").revision == commit
    with pytest.raises(CheckpointReferenceError, match="not in the local hub cache"):
        resolve("org/model")


def test_hub_repo_not_in_cache(offline_hub):
    with pytest.raises(CheckpointReferenceError) as info:
        resolve("org/absent")
    message = str(info.value)
    assert "org/absent" in message and str(offline_hub) in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_hub_unknown_revision_offline(offline_hub):
    make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes()})
    with pytest.raises(CheckpointReferenceError, match="not in the local hub cache") as info:
        resolve("org/model@v9")
    assert "org/model@v9" in str(info.value)


def test_hub_weights_not_cached(offline_hub):
    make_hub_cache(offline_hub, "org/model", {"config.json": b"{}", INDEX: index_json(), SHARDS[0]: st_bytes()})
    with pytest.raises(CheckpointReferenceError, match=f"{SHARDS[1]} not in the local hub cache"):
        resolve("org/model")


def test_hub_only_pickles_cached(offline_hub):
    make_hub_cache(offline_hub, "org/old", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    got = resolve("org/old")
    assert [p.name for p in got.weight_files] == ["pytorch_model.bin"] and got.weight_format == "pytorch"
    with pytest.raises(CheckpointReferenceError, match="only pickled weights .pytorch_model.bin., and no_pickle=True"):
        resolve("org/old", allow_pickle=False)


def test_hub_sharded_bin_cached(offline_hub):
    make_hub_cache(offline_hub, "org/old", {"config.json": b"{}", BIN_INDEX: index_json(BIN_SHARDS),
                                            **{s: b"pickle" for s in BIN_SHARDS}})
    got = resolve("org/old")
    assert [p.name for p in got.weight_files] == BIN_SHARDS and got.index_file == got.root / BIN_INDEX


def test_hub_sharded_bin_partly_cached(offline_hub):
    make_hub_cache(offline_hub, "org/old", {BIN_INDEX: index_json(BIN_SHARDS), BIN_SHARDS[0]: b"pickle"})
    with pytest.raises(CheckpointReferenceError, match=f"{BIN_SHARDS[1]} not in the local hub cache"):
        resolve("org/old")


def test_hub_adapter_bin_cached(offline_hub):
    make_hub_cache(offline_hub, "org/old", {"adapter_config.json": json.dumps(ADAPTER_CONFIG).encode(),
                                            "adapter_model.bin": b"pickle"})
    got = resolve("org/old")
    assert (got.kind, [p.name for p in got.weight_files]) == ("lora", ["adapter_model.bin"])


def test_hub_bad_index(offline_hub):
    make_hub_cache(offline_hub, "org/model", {INDEX: b"[1, 2]"})
    with pytest.raises(CheckpointFormatError, match="weight_map"):
        resolve("org/model")


def test_invalid_repo_id(offline_hub):
    with pytest.raises(CheckpointReferenceError, match="not a valid Hugging Face repo id"):
        resolve("org/name--x")


@pytest.fixture
def no_hub_call(monkeypatch):
    """Any call into huggingface_hub fails the test: validation must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a hub call was made")

    monkeypatch.setattr(resolve_module, "snapshot_download", refuse)
    monkeypatch.setattr(resolve_module, "list_repo_files", refuse)


@pytest.mark.parametrize("reference", [
    "org/name--x", "org/-name", "org/name-", "org/.name", "org/name.", "org/na..me", "-org/name", "org/" + "n" * 96,
    "o" * 60 + "/" + "n" * 40, "org/name.git",  # the whole id over 96; a name the Hub refuses (validate_repo_id)
])
def test_bad_repo_ids_never_reach_the_hub(offline_hub, no_hub_call, reference):
    with pytest.raises(CheckpointReferenceError, match="not a valid Hugging Face repo id") as info:
        resolve(reference)
    assert info.value.exit_code == 2 and info.value.fix


@pytest.mark.parametrize("revision, words", [
    ("", "is empty"),
    ("../../x", "'..'"),
    ("main/../../../etc", "'..'"),
    ("/etc/passwd", "starts with '/'"),
    ("refs/pr/", "ends with '/'"),
    ("a//b", "'//'"),
    (" main", "whitespace"),
    ("main ", "whitespace"),
    ("ma in", "whitespace"),
    ("main\n", "control character"),
    ("main\x1b[31m", "control character"),
    ("main\x7f", "control character"),
    ("main\x85", "control character"),
    ("ma\xa0in", "control character"),
    ("main\u2028x", "control character"),
    ("v1~1", "~^:?*["),
    ("HEAD^", "~^:?*["),
    ("a:b", "~^:?*["),
    ("a\\b", "~^:?*["),
    ("main@{1}", "'@{'"),
    ("@", "ends with"),
    ("main.", "ends with '/', '.'"),
    ("main.lock", ".lock"),
    ("refs/.hidden/x", "starting with '.'"),
    ("x" * 256, "longer than 255"),
])
def test_bad_revisions_never_reach_the_cache_or_network(offline_hub, no_hub_call, revision, words):
    with pytest.raises(CheckpointReferenceError, match="revision") as info:
        resolve(f"org/model@{revision}")
    message = str(info.value)
    assert words in message and "\n" not in message and "\x1b" not in message
    assert info.value.exit_code == 2 and "branch, tag" in info.value.fix


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "feature/x-y_z", "release-2024.01", "a" * 40])
def test_git_style_revisions_are_allowed(offline_hub, revision):
    commit = make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes()}, revision=revision,
                            commit="a" * 40)
    assert resolve(f"org/model@{revision}").revision == commit


# --- Hub, online code paths (network replaced by the cache) ---------------------------------------------------


class FakeHub:
    """Stands in for the Hub: snapshot_download serves what the cache holds, list_repo_files lists a repo."""

    def __init__(self, listing: list[str]):
        self.listing, self.calls = listing, []

    def snapshot_download(self, repo_id, **kwargs):
        self.calls.append(dict(kwargs))
        return real_snapshot_download(repo_id, **{**kwargs, "local_files_only": True})  # never the network

    def list_repo_files(self, repo_id, **kwargs):
        self.calls.append(dict(kwargs))
        return list(self.listing)


@pytest.fixture
def fake_online_hub(offline_hub, monkeypatch):
    """lorascale believes it is online (HF_HUB_OFFLINE unset); huggingface_hub itself stays offline."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", SECRET)

    def install(files: dict[str, bytes], listing: list[str] | None = None) -> FakeHub:
        make_hub_cache(offline_hub, "org/model", files)
        hub = FakeHub(list(files) if listing is None else listing)
        monkeypatch.setattr(resolve_module, "snapshot_download", hub.snapshot_download)
        monkeypatch.setattr(resolve_module, "list_repo_files", hub.list_repo_files)
        return hub

    return install


def test_huggingface_hub_offline_from_import_time(offline_hub, monkeypatch):
    """HF_HUB_OFFLINE unset now, but huggingface_hub read it as set at import (the fixture patches its constants).

    The real snapshot_download runs in "online" mode: its Hub calls fail with OfflineModeIsEnabled (no request is
    sent) and it falls back to the cache.
    """
    monkeypatch.delenv("HF_HUB_OFFLINE")
    commit = make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes()})
    assert resolve("org/model").revision == commit
    with pytest.raises(CheckpointReferenceError, match="not in the local hub cache.*unset HF_HUB_OFFLINE"):
        resolve("org/absent")


def test_online_passes_token_and_cache(fake_online_hub, offline_hub):
    hub = fake_online_hub({"model.safetensors": st_bytes()})
    resolve("org/model")
    assert hub.calls and all(c["token"] == SECRET and c["local_files_only"] is False for c in hub.calls)
    assert all(c["cache_dir"] == offline_hub for c in hub.calls if "cache_dir" in c)
    assert hub.calls[1]["revision"] == resolve("org/model").revision  # weights fetched at the resolved commit


def test_online_only_pickled_weights(fake_online_hub):
    hub = fake_online_hub({"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    got = resolve("org/model")
    assert [p.name for p in got.weight_files] == ["pytorch_model.bin"]
    hub.calls.clear()
    with pytest.raises(CheckpointReferenceError, match="only pickled weights .pytorch_model.bin.") as info:
        resolve("org/model", allow_pickle=False)
    assert "org/model" in str(info.value) and "no_pickle=True" in str(info.value)
    patterns = [p for call in hub.calls for p in call.get("allow_patterns", ())]
    assert patterns and not any(fnmatch.fnmatchcase("pytorch_model.bin", p) for p in patterns)


def test_online_sharded_bin_fetches_only_the_bin_shards(fake_online_hub):
    files = {"config.json": b"{}", BIN_INDEX: index_json(BIN_SHARDS), **{s: b"pickle" for s in BIN_SHARDS},
             "tokenizer.json": b"{}"}
    hub = fake_online_hub(files)
    got = resolve("org/model")
    assert [p.name for p in got.weight_files] == BIN_SHARDS and got.index_file == got.root / BIN_INDEX
    patterns = [p for call in hub.calls for p in call.get("allow_patterns", ())]
    assert {n for n in files if any(fnmatch.fnmatchcase(n, p) for p in patterns)} == {"config.json", BIN_INDEX,
                                                                                        *BIN_SHARDS}


def test_online_both_formats_never_asks_for_bin(fake_online_hub):
    files = {"config.json": b"{}", "model.safetensors": st_bytes(), "pytorch_model.bin": b"pickle",
             BIN_INDEX: index_json(BIN_SHARDS), **{s: b"pickle" for s in BIN_SHARDS}}
    hub = fake_online_hub(files)
    assert [p.name for p in resolve("org/model").weight_files] == ["model.safetensors"]
    patterns = [p for call in hub.calls for p in call.get("allow_patterns", ())]
    assert not any(fnmatch.fnmatchcase(n, p) for n in files if n.endswith(".bin") for p in patterns)


def test_online_only_pickled_adapter(fake_online_hub):
    fake_online_hub({"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"})
    assert [p.name for p in resolve("org/model").weight_files] == ["adapter_model.bin"]
    with pytest.raises(CheckpointReferenceError, match="adapter_model.bin.*no_pickle=True.*safe_serialization"):
        resolve("org/model", allow_pickle=False)


def test_online_lone_other_safetensors(fake_online_hub):
    fake_online_hub({"consolidated.safetensors": st_bytes()})
    assert [p.name for p in resolve("org/model").weight_files] == ["consolidated.safetensors"]


def test_online_index_names_a_shard_the_repo_lacks(fake_online_hub):
    fake_online_hub({INDEX: index_json(), SHARDS[0]: st_bytes()})
    with pytest.raises(CheckpointFormatError, match=SHARDS[1]):
        resolve("org/model")


def http_error(cls: type, message: str, status: int = 404) -> Exception:
    """A huggingface_hub HTTP error without a real HTTP response (the constructor differs across versions)."""
    response = SimpleNamespace(status_code=status, headers={}, request=None, json=lambda: {"error": f"bad {SECRET}"})
    return cls(message, response=response)


def chained(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("make, expected", [
    (lambda: http_error(RepositoryNotFoundError, f"401 for token {SECRET}"), "repository not found"),
    (lambda: http_error(GatedRepoError, f"403 Authorization: Bearer {SECRET}"), "gated or private repo.*HF_TOKEN"),
    (lambda: http_error(HfHubHTTPError, f"403 Forbidden {SECRET}", 403), "gated or private repo .HTTP 403.*licence"),
    (lambda: http_error(HfHubHTTPError, f"401 Unauthorized {SECRET}", 401), "gated or private repo .HTTP 401.*HF_TOKEN"),
    (lambda: http_error(HfHubHTTPError, f"500 {SECRET}", 500), "Hub request failed .HfHubHTTPError, HTTP 500"),
    (lambda: http_error(RevisionNotFoundError, f"404 {SECRET}"), "revision 'nope' not found"),
    (lambda: http_error(DisabledRepoError, f"403 {SECRET}"), "disabled"),
    (lambda: LocalEntryNotFoundError(f"connection failed, token {SECRET}"), "cannot reach the Hugging Face Hub"),
    (lambda: resolve_module._CLIENT_ERRORS[0](f"proxy refused {SECRET}"), "Hub request failed"),
    (lambda: chained(LocalEntryNotFoundError(f"x {SECRET}"), OfflineModeIsEnabled(SECRET)), "HF_HUB_OFFLINE"),
])
def test_online_hub_errors(fake_online_hub, monkeypatch, make, expected):
    fake_online_hub({})

    def failing(repo_id, **kwargs):
        raise make()

    monkeypatch.setattr(resolve_module, "snapshot_download", failing)
    with pytest.raises(CheckpointReferenceError, match=expected) as info:
        resolve("org/model@nope")
    error = info.value
    assert "org/model" in str(error) and "\n" not in str(error) and error.fix
    # The token must not leak: not in the message, and no hub exception (which holds the request) is chained.
    assert error.__cause__ is None and error.__context__ is None
    rendered = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert SECRET not in rendered and SECRET not in repr(error)


# --- The token never leaks ------------------------------------------------------------------------------------


def test_token_never_in_errors_or_results(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    make_hub_cache(offline_hub, "org/model", {"model.safetensors": st_bytes(), "config.json": b"{}"})
    got = resolve("org/model")
    assert SECRET not in repr(got) and SECRET not in repr(hub_settings())
    for reference in ("org/absent", "org/model@v9", "org/name--x", "./missing"):
        with pytest.raises(LorascaleError) as info:
            resolve(reference)
        error = info.value
        rendered = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        assert SECRET not in rendered and SECRET not in repr(error.args) and SECRET not in str(error.fix)


# --- The cache helper itself ----------------------------------------------------------------------------------


def test_hub_cache_helper_layout_is_what_huggingface_hub_reads(offline_hub):
    from huggingface_hub import hf_hub_download, scan_cache_dir

    files = sharded_repo_files()
    commit = make_hub_cache(offline_hub, "org/model", files, revision=["main", "v1"],
                            no_exist=["tokenizer.model"])
    info = scan_cache_dir(offline_hub)
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type, repo.nb_files) == ("org/model", "model", len(files))
    (rev,) = repo.revisions
    assert rev.commit_hash == commit and rev.refs == frozenset({"main", "v1"})
    blobs = {f.file_name: Path(f.blob_path).name for f in rev.files}
    assert blobs[SHARDS[0]] == hashlib.sha256(files[SHARDS[0]]).hexdigest()  # LFS: sha256
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(files["config.json"]) + files["config.json"]).hexdigest()
    assert blobs["config.json"] == git_sha1  # regular git file: git blob sha1
    path = hf_hub_download("org/model", "config.json", revision="v1", cache_dir=offline_hub, local_files_only=True)
    assert Path(path) == offline_hub / "models--org--model" / "snapshots" / commit / "config.json"
    assert Path(path).read_bytes() == files["config.json"]


# --- Environment ----------------------------------------------------------------------------------------------


def test_hub_settings_precedence(tmp_path):
    home = str(tmp_path / "home")
    assert hub_settings({"HF_HOME": home}).cache_dir == tmp_path / "home" / "hub"
    assert hub_settings({"XDG_CACHE_HOME": home}).cache_dir == tmp_path / "home" / "huggingface" / "hub"
    assert hub_settings({"HF_HOME": home, "HUGGINGFACE_HUB_CACHE": "/legacy"}).cache_dir == Path("/legacy")
    assert hub_settings({"HF_HUB_CACHE": "/new", "HUGGINGFACE_HUB_CACHE": "/legacy"}).cache_dir == Path("/new")
    assert [hub_settings({"HF_HUB_OFFLINE": v}).offline for v in ("1", "true", "YES", "on")] == [True] * 4
    assert [hub_settings({"HF_HUB_OFFLINE": v}).offline for v in ("0", "", "false")] == [False] * 3
    assert hub_settings({"TRANSFORMERS_OFFLINE": "1"}).offline
    assert hub_settings({"HUGGING_FACE_HUB_TOKEN": " t "}).token == "t"
    assert hub_settings({}).token is None
    assert "token" not in repr(HubSettings(Path("/c"), False, SECRET))
