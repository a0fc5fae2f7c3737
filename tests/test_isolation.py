"""The test session's own environment: no test reads or writes the user's caches (conftest.isolated_caches)."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants

from lorascale import settings


def _inside(path: Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_caches_point_into_the_session_tmp_dir(isolated_caches: Path):
    home = Path.home()
    for path in (settings.cache_dir(), settings.hub_settings().cache_dir, Path(os.environ["XDG_CACHE_HOME"]),
                 Path(huggingface_hub.constants.HF_HUB_CACHE)):
        assert _inside(path, isolated_caches), path
        assert not _inside(path, home / ".cache"), path
    assert settings.hub_settings().offline and huggingface_hub.constants.HF_HUB_OFFLINE


def test_a_fresh_compare_caches_its_base_svds_in_the_session_dir(llama, isolated_caches: Path, tmp_path: Path):
    """The default (cache on, no cache_dir) as a fixture such as the MiniLM one calls it."""
    from runs import compare

    compare(str(llama.base["fp32"]), [str(llama.lora.path)], tmp_path / "out", device="cpu")
    cache = settings.cache_dir()
    assert _inside(cache, isolated_caches) and list(cache.rglob("*.safetensors"))
