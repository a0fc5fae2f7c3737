"""adapter_config.json: every value that enters s = lora_alpha / r is checked, naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lorascale.errors import CheckpointFormatError, UnsupportedAdapterError
from lorascale.io.adapter import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R, read_adapter_settings, scale_for

GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.5}, "use_rslora": False,
        "fan_in_fan_out": False, "base_model_name_or_path": "org/base"}


def write_config(tmp_path: Path, config: object | None = None, *, raw: bytes | None = None) -> Path:
    path = tmp_path / "adapter_config.json"
    path.write_bytes(raw if raw is not None else json.dumps(config).encode())
    return path


def refused(tmp_path: Path, **changes) -> str:
    config = {k: v for k, v in {**GOOD, **changes}.items() if v is not _DROP}
    path = write_config(tmp_path, config)
    with pytest.raises(CheckpointFormatError) as info:
        read_adapter_settings(path)
    message = str(info.value)
    assert str(path) in message and "adapter_config.json" in message and info.value.fix
    return message


_DROP = object()


def test_good_config(tmp_path):
    settings = read_adapter_settings(write_config(tmp_path, GOOD))
    assert (settings.r, settings.lora_alpha, settings.rank_pattern, settings.alpha_pattern) == (
        4, 8.0, {"q_proj": 2}, {"v_proj": 3.5})
    assert settings.target_modules == ("q_proj", "v_proj") and settings.base_model_name_or_path == "org/base"


def test_missing_lora_alpha_and_r_take_peft_defaults(tmp_path):
    """peft's LoraConfig defaults lora_alpha to 8 (not to r): an adapter saved without it merges with s = 8 / r."""
    from peft import LoraConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
    assert (PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA) == (defaults["r"], defaults["lora_alpha"])
    config = {k: v for k, v in GOOD.items() if k not in ("lora_alpha", "alpha_pattern")}
    config["r"] = 16
    settings = read_adapter_settings(write_config(tmp_path, config))
    assert settings.lora_alpha == 8.0
    assert scale_for(settings, "model.layers.0.self_attn.k_proj", 16) == pytest.approx(0.5)
    config.pop("r")
    config["rank_pattern"] = {}
    assert read_adapter_settings(write_config(tmp_path, config)).r == 8


@pytest.mark.parametrize("key, value, words", [
    ("lora_alpha", float("nan"), "lora_alpha is nan"),
    ("lora_alpha", float("inf"), "lora_alpha is inf"),
    ("lora_alpha", "16", "lora_alpha is '16'"),
    ("lora_alpha", True, "lora_alpha is True"),
    ("lora_alpha", None, "lora_alpha is None"),
    ("lora_alpha", [16], "lora_alpha is [16]"),
    ("r", 0, "r is 0; expected a positive integer rank"),
    ("r", -4, "r is -4"),
    ("r", 4.0, "r is 4.0"),
    ("r", 4.5, "r is 4.5"),
    ("r", "4", "r is '4'"),
    ("r", True, "r is True"),
    ("rank_pattern", {"q_proj": "2"}, "rank_pattern['q_proj'] is '2'"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] is 0"),
    ("rank_pattern", {"q_proj": 2.0}, "rank_pattern['q_proj'] is 2.0"),
    ("rank_pattern", [["q_proj", 2]], "rank_pattern is [['q_proj', 2]]"),
    ("rank_pattern", {"q_proj(": 2}, "rank_pattern key 'q_proj('"),
    ("alpha_pattern", {"v_proj": "3"}, "alpha_pattern['v_proj'] is '3'"),
    ("alpha_pattern", {"v_proj": float("nan")}, "alpha_pattern['v_proj'] is nan"),
    ("alpha_pattern", {"v_proj": False}, "alpha_pattern['v_proj'] is False"),
    ("alpha_pattern", "v_proj=3", "alpha_pattern is 'v_proj=3'"),
    ("use_rslora", "false", "use_rslora is 'false'; expected true or false"),
    ("fan_in_fan_out", 1, "fan_in_fan_out is 1"),
    ("target_modules", [1, 2], "target_modules is [1, 2]"),
])
def test_bad_values_name_the_key(tmp_path, key, value, words):
    assert words in refused(tmp_path, **{key: value})


@pytest.mark.parametrize("raw, words", [
    (b'{"r": 4, "r": 8}', "key 'r' twice"),
    (b'{"r": 4, "lora_alpha": 1e999}', "lora_alpha is inf"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[4, 8]", "not a JSON object"),
])
def test_bad_json(tmp_path, raw, words):
    path = write_config(tmp_path, raw=raw)
    with pytest.raises(CheckpointFormatError, match="adapter") as info:
        read_adapter_settings(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_null_patterns_and_flags_are_defaults(tmp_path):
    config = {**GOOD, "rank_pattern": None, "alpha_pattern": None, "use_rslora": None, "fan_in_fan_out": None}
    settings = read_adapter_settings(write_config(tmp_path, config))
    assert (settings.rank_pattern, settings.alpha_pattern, settings.use_rslora, settings.fan_in_fan_out) == (
        {}, {}, False, False)


def test_unsupported_kinds_keep_their_exit_code(tmp_path):
    for refused_kind in ({"lora_bias": True}, {"layer_replication": [[0, 2]]}, {"peft_type": "IA3"},
                         {"use_dora": True, "target_parameters": ["mlp.experts.down_proj"]}):
        with pytest.raises(UnsupportedAdapterError) as info:
            read_adapter_settings(write_config(tmp_path, {**GOOD, **refused_kind}))
        assert info.value.exit_code == 4 and str(tmp_path) in str(info.value)


def test_use_dora_is_read_and_must_be_a_boolean(tmp_path):
    assert read_adapter_settings(write_config(tmp_path, {**GOOD, "use_dora": True})).use_dora is True
    assert read_adapter_settings(write_config(tmp_path, {**GOOD, "use_dora": False})).use_dora is False
    assert read_adapter_settings(write_config(tmp_path, GOOD)).use_dora is False
    # "false" is truthy: a string would silently turn the DoRA merge on or off.
    assert "use_dora" in refused(tmp_path, use_dora="false")
