"""Environment variables: read in settings.py only; set-but-empty means unset, and cache paths are absolute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorascale import settings


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("XDG_CACHE_HOME", "LORASCALE_CACHE_DIR", "RAY_ADDRESS", "LORASCALE_DEBUG", "HF_HOME", "HF_HUB_CACHE",
                 "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_xdg_cache_home_is_unset(home, monkeypatch, value):
    """XDG_CACHE_HOME="" used to give the relative path ./lorascale."""
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert settings.cache_dir() == home / ".cache" / "lorascale"
    assert settings.hub_settings().cache_dir == home / ".cache" / "huggingface" / "hub"


def test_relative_xdg_cache_home_is_ignored_as_the_spec_says(home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert settings.cache_dir() == home / ".cache" / "lorascale"


def test_absolute_xdg_cache_home_is_used(home, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_dir() == tmp_path / "xdg" / "lorascale"
    assert settings.hub_settings().cache_dir == tmp_path / "xdg" / "huggingface" / "hub"


def test_empty_lorascale_cache_dir_is_unset(home, monkeypatch):
    monkeypatch.setenv("LORASCALE_CACHE_DIR", "")
    assert settings.cache_dir() == home / ".cache" / "lorascale"


def test_lorascale_cache_dir_is_made_absolute(home, monkeypatch, tmp_path):
    monkeypatch.setenv("LORASCALE_CACHE_DIR", "svd")
    assert settings.cache_dir() == tmp_path / "svd" and settings.cache_dir().is_absolute()
    monkeypatch.setenv("LORASCALE_CACHE_DIR", "~/svd")
    assert settings.cache_dir() == home / "svd"


def test_empty_hub_variables_are_unset(home):
    env = {"HF_HOME": "", "HF_HUB_CACHE": "", "HUGGINGFACE_HUB_CACHE": " ", "XDG_CACHE_HOME": "", "HF_TOKEN": "",
           "HUGGING_FACE_HUB_TOKEN": "tok", "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"}
    hub = settings.hub_settings(env)
    assert hub.cache_dir == Path(os.path.expanduser("~")) / ".cache" / "huggingface" / "hub"
    assert hub.token == "tok" and hub.offline


def test_empty_ray_address_and_debug(home, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", " ")
    monkeypatch.setenv("LORASCALE_DEBUG", "")
    assert settings.ray_address() is None and not settings.debug()
