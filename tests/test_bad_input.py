"""Bad input: ONE line on stderr naming the file or tensor and a fix, a non-zero exit code, no traceback
(unless LORASCALE_DEBUG=1), and nothing presented as a complete result."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import checkpoints
from lorascale.cli import main
from lorascale.errors import LorascaleError
from lorascale.store.schema import MANIFEST

pytestmark = pytest.mark.usefixtures("one_thread")

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@dataclass
class Case:
    args: list[str]
    exit_code: int
    mentions: list[str]  # the file or tensor, and words of the fix
    out: Path | None = None
    extra: dict = field(default_factory=dict)


def _shard_of(directory: Path, tensor: str) -> Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def _run_args(base: Path | str, tuned: list[Path | str], out: Path, *options: str) -> list[str]:
    args = ["run", "--base", str(base), "--out", str(out), "--device", "cpu", *options]
    for t in tuned:
        args += ["--tuned", str(t)]
    return args


# Each builder damages private copies of the session fixtures under tmp and returns the case.

def missing_path(llama, tmp: Path) -> Case:
    missing = tmp / "no-such-checkpoint"
    return Case(_run_args(llama.base["fp32"], [missing], tmp / "out"), 2, [str(missing)])


def not_a_checkpoint(llama, tmp: Path) -> Case:
    directory = tmp / "notes"
    directory.mkdir()
    (directory / "README.md").write_text("not weights")
    (directory / "config.json").write_text("{}")
    return Case(_run_args(directory, [llama.tuned["fp32"]], tmp / "out"), 2, [str(directory)])


def adapter_targets_not_in_base(llama, tmp: Path, gpt2) -> Case:
    return Case(_run_args(llama.base["fp32"], [gpt2.lora.path], tmp / "out"), 5,
                [str(gpt2.lora.path), "transformer.h.", "pass the base it was trained on"])


def shape_mismatch(llama, tmp: Path) -> Case:
    other = checkpoints.save_full(checkpoints.tiny_llama(seed=7, intermediate_size=96), tmp / "other", "fp32")
    return Case(_run_args(llama.base["fp32"], [other], tmp / "out"), 5,
                ["model.layers.0.mlp.", "[96, 64]", str(other), "exclude it"])


def truncated_shard(llama, tmp: Path) -> Case:
    base = checkpoints.copy_checkpoint(llama.base["bf16"], tmp / "base")
    shard = _shard_of(base, Q_PROJ)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])
    return Case(_run_args(base, [llama.tuned["bf16"]], tmp / "out"), 3, [str(shard), "re-download or re-save"])


def truncated_adapter(llama, tmp: Path) -> Case:
    lora = checkpoints.copy_checkpoint(llama.lora.path, tmp / "lora")
    weights = lora / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return Case(_run_args(llama.base["fp32"], [lora], tmp / "out"), 3, [str(weights), "re-download or re-save"])


def garbage_header(llama, tmp: Path) -> Case:
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp16"], tmp / "tuned")
    shard = _shard_of(tuned, Q_PROJ)
    shard.write_bytes(os.urandom(shard.stat().st_size))
    return Case(_run_args(llama.base["fp16"], [tuned], tmp / "out"), 3, [str(shard), "re-download or re-save"])


def bad_json_header(llama, tmp: Path) -> Case:
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp16"], tmp / "tuned")
    shard = _shard_of(tuned, Q_PROJ)
    header = b'{"model.layers.0.self_attn.q_proj.weight": {"dtype": "F16", "shape": [64, 64], "data_offsets": [0, '
    shard.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    return Case(_run_args(llama.base["fp16"], [tuned], tmp / "out"), 3, [str(shard), "not valid JSON", "re-download"])


def missing_shard(llama, tmp: Path) -> Case:
    base = checkpoints.copy_checkpoint(llama.base["fp32"], tmp / "base")
    shard = _shard_of(base, Q_PROJ)
    shard.unlink()
    return Case(_run_args(base, [llama.tuned["fp32"]], tmp / "out"), 3, [shard.name, "re-download"])


def nan_tensor(llama, tmp: Path) -> Case:
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp / "tuned")
    shard = _shard_of(tuned, Q_PROJ)

    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[3, 5] = float("nan")
        return t

    checkpoints.rewrite_tensor(shard, Q_PROJ, poison)
    return Case(_run_args(llama.base["fp32"], [tuned], tmp / "out", "--include", "*layers.0.self_attn.q_proj*"), 7,
                [Q_PROJ, str(shard), "NaN", "--exclude"], out=tmp / "out")


def lora_bias_adapter(llama, tmp: Path) -> Case:
    adapter = checkpoints.lora_bias_adapter(llama.model, tmp / "lora-bias")
    return Case(_run_args(llama.base["fp32"], [adapter], tmp / "out"), 4,
                [str(adapter), "lora_bias", "merge_and_unload"])


def dora_zero_row(llama, tmp: Path) -> Case:
    """A DoRA merge is undefined where a row of W0 + s*B@A is zero (peft divides by its norm and gets NaN)."""
    base = checkpoints.copy_checkpoint(llama.base["fp32"], tmp / "base")
    adapter = checkpoints.copy_checkpoint(llama.dora.path, tmp / "dora")

    def zero_row(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[5] = 0
        return t

    checkpoints.rewrite_tensor(_shard_of(base, Q_PROJ), Q_PROJ, zero_row)
    checkpoints.rewrite_tensor(adapter / "adapter_model.safetensors",
                               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", zero_row)
    return Case(_run_args(base, [adapter], tmp / "out", "--include", "*layers.0.self_attn.q_proj*"), 7,
                [Q_PROJ, "adapter_model.safetensors", "zero", "DoRA", "--exclude"], out=tmp / "out")


def ia3_adapter(llama, tmp: Path) -> Case:
    ia3 = checkpoints.ia3_adapter(llama.model, tmp / "ia3")
    return Case(_run_args(llama.base["fp32"], [ia3], tmp / "out"), 4, [str(ia3), "IA3", "merge_and_unload"])


def pickle_only_adapter(llama, tmp: Path) -> Case:
    adapter = checkpoints.pickle_adapter(llama.model, tmp / "bin-adapter")
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    return Case(_run_args(llama.base["fp32"], [adapter], tmp / "out", "--no-pickle"), 2,
                [str(adapter), "adapter_model.bin", "--no-pickle"])


class _Trap:
    """Unpickling this runs code: touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_pickle_checkpoint(llama, tmp: Path) -> Case:
    directory = tmp / "pickled"
    directory.mkdir()
    marker = tmp / "UNPICKLED"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (directory / "config.json").write_text("{}")
    return Case(_run_args(llama.base["fp32"], [directory], tmp / "out"), 3,
                [str(directory / "pytorch_model.bin"), "not a zip-format torch.save file"], extra={"marker": marker})


def malicious_torch_save_checkpoint(llama, tmp: Path) -> Case:
    directory = tmp / "pickled"
    directory.mkdir()
    marker = tmp / "UNPICKLED"
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4), "x": _Trap(marker)},
               directory / "pytorch_model.bin")
    return Case(_run_args(llama.base["fp32"], [directory], tmp / "out"), 3,
                [str(directory / "pytorch_model.bin"), "restricted loader refused it"], extra={"marker": marker})


def k_zero(llama, tmp: Path) -> Case:
    return Case(_run_args(llama.base["fp32"], [llama.tuned["fp32"]], tmp / "out", "--k", "0"), 2,
                ["--k", "at least 1"])


def epsilon_two(llama, tmp: Path) -> Case:
    return Case(_run_args(llama.base["fp32"], [llama.tuned["fp32"]], tmp / "out", "--epsilon", "2"), 2,
                ["--epsilon", "(0, 1]"])


def base_is_adapter(llama, tmp: Path) -> Case:
    return Case(_run_args(llama.lora.path, [llama.tuned["fp32"]], tmp / "out"), 5,
                [str(llama.lora.path), "--base"])


def out_is_a_file(llama, tmp: Path) -> Case:
    target = tmp / "out"
    target.write_text("my notes")
    return Case(_run_args(llama.base["fp32"], [llama.tuned["fp32"]], target), 6, [str(target), "--out"],
                out=target, extra={"file": target})


CASES: dict[str, Callable] = {f.__name__: f for f in (
    missing_path, not_a_checkpoint, adapter_targets_not_in_base, shape_mismatch, truncated_shard, truncated_adapter,
    garbage_header, bad_json_header, missing_shard, nan_tensor, lora_bias_adapter, dora_zero_row, ia3_adapter, pickle_only_adapter,
    malicious_pickle_checkpoint, malicious_torch_save_checkpoint, k_zero, epsilon_two, base_is_adapter, out_is_a_file)}

WITH_FIX = list(CASES)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling during the run but torch's restricted loader fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("lorascale unpickled a file")

    restricted = torch.load

    def only_restricted(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError("lorascale called torch.load without weights_only=True")
        return restricted(*args, **kwargs)

    monkeypatch.setattr(torch, "load", only_restricted)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def _build(name: str, request, tmp_path: Path) -> Case:
    llama = request.getfixturevalue("llama")
    if name == "adapter_targets_not_in_base":
        return CASES[name](llama, tmp_path, request.getfixturevalue("gpt2"))
    return CASES[name](llama, tmp_path)


def _not_complete(out: Path) -> None:
    if out.is_file():  # a user's file given as --out: left alone
        assert out.read_text() == "my notes"
    elif out.exists():
        manifest = out / MANIFEST
        assert manifest.is_file(), "an output directory without a manifest"
        assert json.loads(manifest.read_text())["status"] != "complete"


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_error(name, request, tmp_path, monkeypatch):
    monkeypatch.delenv("LORASCALE_DEBUG", raising=False)
    case = _build(name, request, tmp_path)
    request.getfixturevalue("no_unpickling")
    result = CliRunner().invoke(main, case.args)
    lines = result.stderr.splitlines()
    assert result.exit_code == case.exit_code, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("lorascale: error: "), line
    for words in case.mentions:
        assert words in line, (words, line)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    _not_complete(tmp_path / "out")
    if case.out is None:
        assert not (tmp_path / "out").exists(), "the output directory was created before the input was checked"
    if "marker" in case.extra:
        assert not case.extra["marker"].exists(), "a pickle was executed"


def _debug_run(name: str, request, tmp_path: Path, monkeypatch) -> tuple[Case, object]:
    case = _build(name, request, tmp_path)
    monkeypatch.setenv("LORASCALE_DEBUG", "1")
    return case, CliRunner().invoke(main, case.args)


@pytest.mark.parametrize("name", list(CASES))
def test_debug_shows_the_exception(name, request, tmp_path, monkeypatch):
    """LORASCALE_DEBUG=1: the error propagates (click prints its traceback) instead of the one-line message."""
    case, result = _debug_run(name, request, tmp_path, monkeypatch)
    # The exception escapes main() (CliRunner's exit code 1, as Python's for an uncaught exception); the
    # documented code travels on it.
    assert result.exit_code == 1
    assert isinstance(result.exception, LorascaleError), result.exception
    assert result.exception.exit_code == case.exit_code
    assert "Traceback" in "".join(traceback.format_exception(*result.exc_info))
    _not_complete(tmp_path / "out")


@pytest.mark.parametrize("name", [n for n in WITH_FIX if not str(n).startswith(("k_", "epsilon_"))])
def test_error_carries_a_fix(name, request, tmp_path, monkeypatch):
    """Every input error says what to do (option errors state the valid range in the message instead)."""
    _, result = _debug_run(name, request, tmp_path, monkeypatch)
    assert isinstance(result.exception, LorascaleError) and result.exception.fix, result.exception


def _console_script() -> str:
    script = Path(sys.executable).with_name("lorascale")
    return str(script) if script.exists() else shutil.which("lorascale") or pytest.skip("no lorascale script")


def test_real_process_exit_code_and_debug_traceback(llama, tmp_path):
    missing = tmp_path / "missing"
    args = [_console_script(), *_run_args(llama.base["fp32"], [missing], tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("LORASCALE_DEBUG", None)
    plain = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("lorascale: error: ")
    assert str(missing) in plain.stderr and "Traceback" not in plain.stderr and plain.stdout == ""
    debug = subprocess.run(args, check=False, capture_output=True, text=True, env={**env, "LORASCALE_DEBUG": "1"}, timeout=120)
    assert debug.returncode == 1  # the exception escapes: Python's status for an uncaught exception
    assert "Traceback" in debug.stderr and "CheckpointReferenceError" in debug.stderr
    assert not (tmp_path / "out").exists()
