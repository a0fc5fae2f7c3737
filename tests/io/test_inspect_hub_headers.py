"""`lorascale inspect org/name` reads headers only (issue 9): the metadata files come through the hub
cache, and each weight file's header through two HTTP range requests to a hub-layout server on loopback;
no weight file is ever downloaded, and the description equals the one of the same checkpoint on disk."""

from __future__ import annotations

import http.server
import importlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubcache import make_hub_cache, offline_hub  # noqa: F401  (offline_hub is a fixture)

import lorascale.io.resolve as resolve_module
from lorascale.inspect import describe_checkpoint

COMMIT = "c" * 40


class _HubFiles(http.server.BaseHTTPRequestHandler):
    """Serves /{org}/{name}/resolve/{commit}/{file} with HEAD and single Range GETs; records every request."""

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str, str | None]] = []

    def _lookup(self) -> bytes | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve" or parts[3] != COMMIT:
            return None
        return self.files.get("/".join(parts[4:]))

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(("HEAD", self.path, None))
        content = self._lookup()
        if content is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", '"etag-of-file"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        wanted = self.headers.get("Range")
        self.requests.append(("GET", self.path, wanted))
        content = self._lookup()
        if content is None or not wanted or not wanted.startswith("bytes="):
            self.send_error(404 if content is None else 416)  # a whole-file GET is a download: refused
            return
        start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
        body = content[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(content)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub_server(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_HubFiles]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubFiles)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for name in ("huggingface_hub.constants", "huggingface_hub._snapshot_download", "huggingface_hub.file_download"):
        module = importlib.import_module(name)
        if hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
    _HubFiles.files, _HubFiles.requests = {}, []
    try:
        yield _HubFiles
    finally:
        server.shutdown()
        server.server_close()


def _metadata_only(cache: Path, repo: str) -> object:
    """The metadata round through the hub cache (as snapshot_download would leave it); weights never."""
    def snapshot(reference, repo_id, revision, files, settings):
        files = list(files)
        assert all(not f.endswith(".safetensors") for f in files), f"weights were requested: {files}"
        return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    return snapshot


@pytest.mark.parametrize("which", ["sharded", "adapter"])
def test_inspect_of_a_hub_repo_reads_headers_only(llama, offline_hub, hub_server, monkeypatch, which):
    local = llama.base["bf16"] if which == "sharded" else llama.lora.path
    names = [p.name for p in local.iterdir() if p.is_file()]
    metadata = {n: local / n for n in names if not n.endswith(".safetensors")}
    make_hub_cache(offline_hub, "org/model", metadata, commit=COMMIT)
    hub_server.files = {n: (local / n).read_bytes() for n in names if n.endswith(".safetensors")}
    monkeypatch.setattr(resolve_module, "_snapshot", _metadata_only(offline_hub, "org/model"))

    remote = describe_checkpoint("org/model")

    on_disk = describe_checkpoint(str(local))
    for key in ("reference", "source", "path", "repo_id", "revision"):
        remote.pop(key), on_disk.pop(key)
    assert remote == on_disk
    assert remote["files"] and all(f["bytes"] > 0 for f in remote["files"])
    gets = [r for r in hub_server.requests if r[0] == "GET"]
    assert gets and all(r[2] is not None for r in gets), "a weight file was downloaded whole"
    fetched = sum(int(r[2].split("-")[1]) - int(r[2].split("=")[1].split("-")[0]) + 1 for r in gets)
    assert fetched < sum(len(c) for c in hub_server.files.values()) / 4  # headers, not tensor data
    snapshot = offline_hub / "models--org--model" / "snapshots" / COMMIT
    assert not any(p.name.endswith(".safetensors") for p in snapshot.iterdir())


def test_a_truncated_header_on_the_hub_is_a_format_error(llama, offline_hub, hub_server, monkeypatch):
    from click.testing import CliRunner

    from lorascale.cli import main

    local = llama.base["bf16"]
    names = [p.name for p in local.iterdir() if p.is_file()]
    make_hub_cache(offline_hub, "org/model", {n: local / n for n in names if not n.endswith(".safetensors")},
                   commit=COMMIT)
    hub_server.files = {n: (local / n).read_bytes()[:200] for n in names if n.endswith(".safetensors")}
    monkeypatch.setattr(resolve_module, "_snapshot", _metadata_only(offline_hub, "org/model"))
    result = CliRunner().invoke(main, ["inspect", "org/model"])
    assert result.exit_code == 3, result.output
    assert result.stderr.count("\n") == 1 and "safetensors" in result.stderr
    assert json.dumps(result.stderr)  # one printable line


def test_run_plans_a_hub_comparison_from_headers_before_downloading(llama, gpt2, offline_hub, hub_server,
                                                                    monkeypatch, tmp_path):
    """An adapter for another base fails the plan (exit 5) with no weight file fetched and no --out."""
    from click.testing import CliRunner

    from lorascale.cli import main

    local = llama.base["bf16"]
    names = [p.name for p in local.iterdir() if p.is_file()]
    make_hub_cache(offline_hub, "org/model", {n: local / n for n in names if not n.endswith(".safetensors")},
                   commit=COMMIT)
    hub_server.files = {n: (local / n).read_bytes() for n in names if n.endswith(".safetensors")}
    monkeypatch.setattr(resolve_module, "_snapshot", _metadata_only(offline_hub, "org/model"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--base", "org/model", "--tuned", str(gpt2.lora.path),
                                       "--out", str(out), "--device", "cpu", "--quiet"])
    assert result.exit_code == 5, result.output
    assert not out.exists()
    assert all(r[2] is not None for r in hub_server.requests if r[0] == "GET")
