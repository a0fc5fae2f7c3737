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
from lorascale.pipeline import compare

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
