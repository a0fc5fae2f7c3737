"""A Hugging Face hub on loopback, in the hub's URL layout, for the real `huggingface_hub` client (HF_ENDPOINT).

Serves, for each repo added:

    GET  /api/models/{org}/{name}/revision/{rev}            repo info: sha (the commit), siblings
    GET  /api/models/{org}/{name}/tree/{rev}[/...]          the file listing (LFS files with their sha256)
    HEAD /{org}/{name}/resolve/{rev}/{file}                 X-Repo-Commit, ETag (sha256 for LFS, git sha1 else),
                                                            Content-Length
    GET  /{org}/{name}/resolve/{rev}/{file}                 the file, whole or one Range

Test controls: `throttle` (bytes per second for file bodies), `token` (every request needs
`Authorization: Bearer <token>`, else 401), `die_after` ("org/name/file" -> bytes: the server sends that
many bytes of the file, then stops listening, as a crashed server does), `hold` ("org/name/file" ->
threading.Event: its body is not sent before the event is set or `hold_timeout` passes; `held_too_long`
records a timeout).  Every request is logged in `requests` as (method, path, Range header); `downloads`
logs whole-file or resumed GETs as ("org/name/file", first byte); `finished` when a body was sent whole.
"""

from __future__ import annotations

import http.server
import importlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
from hubcache import blob_name, is_lfs


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, bytes]
    refs: tuple[str, ...] = ("main",)


@dataclass
class HubServer:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    throttle: float | None = None
    token: str | None = None
    die_after: dict[str, int] = field(default_factory=dict)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    hold_timeout: float = 60.0
    held_too_long: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    downloads: list[tuple[str, int]] = field(default_factory=list)
    finished: list[tuple[str, float]] = field(default_factory=list)  # (file, time its last byte was sent)
    url: str = ""
    dead: bool = False  # after a die_after cut: every connection is dropped unanswered until stop() completes
    _server: http.server.ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], *, commit: str | None = None) -> str:
        """Serve `files` (repo path -> bytes or a local file) as `repo_id` at `commit` (branch main)."""
        data = {n: (c.read_bytes() if isinstance(c, Path) else c) for n, c in files.items()}
        commit = commit or blob_name("commit", repr(sorted((n, blob_name(n, c)) for n, c in data.items())).encode())[:40]
        self.repos[repo_id] = HubRepo(repo_id, commit, data)
        return commit

    def add_directory(self, repo_id: str, directory: Path, *, commit: str | None = None) -> str:
        """Serve every file of a local checkpoint directory as `repo_id`."""
        return self.add_repo(repo_id, {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
                                       if p.is_file()}, commit=commit)

    # --- serving ----------------------------------------------------------------------------------------------

    def start(self) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        """Stop listening: later connections are refused (a crashed or unreachable hub)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _repo(self, parts: list[str]) -> tuple[HubRepo, str] | None:
        """(repo, revision) for path parts [org, name, <kind>, revision, ...]."""
        if len(parts) < 4:
            return None
        repo = self.repos.get(f"{parts[0]}/{parts[1]}")
        if repo is None or parts[3] not in (repo.commit, *repo.refs):
            return None
        return repo, parts[3]


def _handler(hub: HubServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorised(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._reply(401, b'{"error": "Invalid credentials"}', {"Content-Type": "application/json"})
            return False

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve()

        def do_GET(self) -> None:  # noqa: N802
            self._serve()

        def _serve(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if hub.dead:
                self.close_connection = True
                return
            if not self._authorised():
                return
            path = unquote(self.path.split("?")[0]).strip("/")
            parts = path.split("/")
            if parts[:2] == ["api", "models"]:
                self._api(parts[2:])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file(parts)
            else:
                self._reply(404)

        def _api(self, parts: list[str]) -> None:
            found = hub._repo(parts)
            if found is None or parts[2] not in ("revision", "tree"):
                self._reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                return
            repo, _ = found
            if parts[2] == "revision":
                body = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                        "siblings": [{"rfilename": n} for n in sorted(repo.files)]}
            else:
                body = []
                for name, content in sorted(repo.files.items()):
                    entry = {"type": "file", "path": name, "size": len(content),
                             "oid": blob_name(name + ".git", content)}
                    if is_lfs(name, len(content)):
                        entry["lfs"] = {"oid": blob_name(name, content), "size": len(content), "pointerSize": 134}
                    body.append(entry)
            self._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _file(self, parts: list[str]) -> None:
            found = hub._repo(parts)
            name = "/".join(parts[4:])
            content = found[0].files.get(name) if found else None
            if found is None or content is None:
                self._reply(404, b"", {"X-Error-Code": "EntryNotFound"})
                return
            repo = found[0]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{blob_name(name, content)}"',
                       "Accept-Ranges": "bytes"}
            wanted = self.headers.get("Range")
            start, end = 0, len(content) - 1
            if wanted and wanted.startswith("bytes="):
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else len(content) - 1, len(content) - 1)
            if self.command == "HEAD":
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                return
            body = content[start:end + 1]
            self.send_response(206 if wanted else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            download = not wanted or end == len(content) - 1  # whole or resumed; header reads end before
            if download:
                hub.downloads.append((f"{repo.repo_id}/{name}", start))
                gate = hub.hold.get(f"{repo.repo_id}/{name}")
                if gate is not None and not gate.wait(hub.hold_timeout):
                    hub.held_too_long.append(f"{repo.repo_id}/{name}")
            self._send(f"{repo.repo_id}/{name}", body, start, download)

        def _send(self, name: str, body: bytes, start: int, download: bool) -> None:
            cut = hub.die_after.get(name)  # name: org/repo/file
            step = 16 * 1024
            for offset in range(0, len(body), step):
                chunk = body[offset:offset + step]
                if cut is not None and start + offset + len(chunk) > cut:
                    self.wfile.write(chunk[:max(0, cut - start - offset)])
                    self.wfile.flush()
                    hub.die_after.pop(name, None)
                    hub.dead = True
                    threading.Thread(target=hub.stop, daemon=True).start()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                if hub.throttle:
                    time.sleep(len(chunk) / hub.throttle)
            self.wfile.flush()
            if download:
                hub.finished.append((name, time.monotonic()))

    return Handler


def point_at(monkeypatch: pytest.MonkeyPatch, server: HubServer) -> None:
    """huggingface_hub online and talking to `server` (HF_ENDPOINT), until monkeypatch undoes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    for name in ("huggingface_hub.constants", "huggingface_hub._snapshot_download", "huggingface_hub.file_download"):
        module = importlib.import_module(name)
        if hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)


@contextmanager
def serving(monkeypatch: pytest.MonkeyPatch, server: HubServer | None = None) -> Iterator[HubServer]:
    """Start `server` (a new one by default), point huggingface_hub at it, stop it afterwards."""
    server = server or HubServer()
    server.start()
    point_at(monkeypatch, server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running loopback hub, with huggingface_hub online against it and an empty hub cache of the test's own."""
    with serving(monkeypatch) as server:
        yield server
