"""Hostile or odd input through the real `lorascale` script: exact exit code, one line on stderr, no traceback,
nothing on stdout (in particular no LAPACK chatter written from C), and `--out` not presented as complete.

Each case runs a subprocess, because LAPACK prints to file descriptor 1 where an in-process runner cannot see
it; cases are kept few and tiny (the session's tiny Llama) so the file stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
from lorascale.store.schema import MANIFEST

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ_1 = "model.layers.1.mlp.up_proj.weight"
LAPACK_WORDS = ("SLASCL", "DLASCL", "On entry to", "illegal value", "** ")


def _script() -> str:
    script = Path(sys.executable).with_name("lorascale")
    return str(script) if script.exists() else shutil.which("lorascale") or pytest.skip("no lorascale script")


def _env(tmp: Path, **changes: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "hub-cache"), "LORASCALE_CACHE_DIR": str(tmp / "svd"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("LORASCALE_DEBUG", None)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run(args: list[str], tmp: Path, *, cwd: Path | None = None, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([_script(), *args], check=False, capture_output=True, text=True, env=_env(tmp, **env),
                          cwd=cwd or tmp, timeout=300)


def run_args(base: Path | str, tuned: list[Path | str], out: Path, *options: str) -> list[str]:
    args = ["run", "--base", str(base), "--out", str(out), "--device", "cpu", *options]
    for t in tuned:
        args += ["--tuned", str(t)]
    return args


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *mentions: str) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stdout == "", done.stdout  # nothing from us, and no LAPACK text either
    assert not any(word in done.stdout for word in LAPACK_WORDS)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorascale: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for words in mentions:
        assert words in lines[0], (words, lines[0])
    return lines[0]


def assert_not_complete(out: Path) -> None:
    if out.exists():
        manifest = out / MANIFEST
        assert manifest.is_file(), "an output directory without a manifest"
        assert json.loads(manifest.read_text())["status"] != "complete"


def shard_of(directory: Path, tensor: str) -> Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def set_entry(shard: Path, name: str, value: float, index: tuple[int, int] = (0, 0)) -> None:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    checkpoints.rewrite_tensor(shard, name, change)


# --- Numerical overflow: the cause is named, and nothing non-finite reaches LAPACK -------------------------------


def test_adapter_whose_merge_overflows(llama, tmp_path):
    """s = 1e300 / 4 is a finite float64, and A, B, W0 are finite; s * B @ A is Inf in fp32."""
    lora = checkpoints.copy_checkpoint(llama.lora.path, tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e300
    (lora / "adapter_config.json").write_text(json.dumps(config))
    done = run(run_args(llama.base["fp32"], [lora], tmp_path / "out", "--include", "*layers.0.self_attn.q_proj*"),
               tmp_path)
    line = assert_one_line_error(done, 7, Q_PROJ, "merging the adapter overflowed", "adapter", "factors are finite",
                                 "--precision fp64")
    assert str(lora / "adapter_model.safetensors") in line
    assert_not_complete(tmp_path / "out")


def test_full_fine_tune_whose_difference_overflows(llama, tmp_path):
    """W0[0, 0] = -3e38 and W[0, 0] = 3e38 are finite fp32; W - W0 is Inf, and svdvals(W - W0) must never see it."""
    base = checkpoints.copy_checkpoint(llama.base["fp32"], tmp_path / "base")
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "tuned")
    set_entry(shard_of(base, Q_PROJ), Q_PROJ, -3e38)
    set_entry(shard_of(tuned, Q_PROJ), Q_PROJ, 3e38)
    done = run(run_args(base, [tuned], tmp_path / "out", "--include", "*layers.0.self_attn.q_proj*"), tmp_path)
    assert_one_line_error(done, 7, Q_PROJ, str(tuned), "NaN or Inf", "--precision fp64")
    assert_not_complete(tmp_path / "out")


# --- Headers and references ------------------------------------------------------------------------------------


def _rewrite_header(shard: Path, edit) -> None:
    blob = shard.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = edit(blob[8:8 + length])
    shard.write_bytes(struct.pack("<Q", len(header)) + header + blob[8 + length:])


@pytest.mark.parametrize("edit, words", [
    # The same tensor twice with other offsets: which one a reader takes would depend on the library.
    (lambda h: h.rstrip()[:-1] + b', "' + Q_PROJ.encode() + b'": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
     f"key {Q_PROJ!r} twice"),
    (lambda h: h.rstrip()[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    # A megabyte-long tensor name: refused at header parse, before any --rename/--include pattern meets it.
    (lambda h: h.replace(Q_PROJ.encode(), b"model." + b"a." * 500_000 + b"weight"), "longer than the 1024 bytes"),
])
def test_hostile_header(llama, tmp_path, edit, words):
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "tuned")
    shard = shard_of(tuned, Q_PROJ)
    _rewrite_header(shard, edit)
    done = run(run_args(llama.base["fp32"], [tuned], tmp_path / "out"), tmp_path)
    assert_one_line_error(done, 3, str(shard), words, "re-download or re-save")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reference, words", [
    ("org/model@../../../../etc", "revision '../../../../etc'"),
    ("org/model@main\x1b[31m", "control character"),
    ("org--x/model", "not a valid Hugging Face repo id"),
])
def test_hostile_hub_reference(llama, tmp_path, reference, words):
    done = run(run_args(llama.base["fp32"], [reference], tmp_path / "out"), tmp_path, HF_TOKEN="hf_secretTOKEN123")
    line = assert_one_line_error(done, 2, words)
    assert "\x1b" not in done.stderr and "hf_secretTOKEN123" not in done.stderr + line
    assert not (tmp_path / "hub-cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rule, words", [
    ("a{4294967296}=x", "OverflowError"),  # was exit 70, "internal error"
    ("(" * 1500 + "a" + ")" * 1500 + "=x", "RecursionError"),  # likewise
    ("a{1001}=x", "does not compile as an RE2 pattern"),  # RE2's own refusal: it must not print a log line
    (r"(\w+)\1=x", "a backreference"),
])
def test_a_rename_that_does_not_compile_is_exit_2(llama, tmp_path, rule, words):
    done = run(run_args(llama.base["fp32"], [llama.tuned["fp32"]], tmp_path / "out", "--rename", rule), tmp_path)
    assert_one_line_error(done, 2, "--rename", words)
    assert not (tmp_path / "out").exists()


def test_a_nested_quantifier_over_long_tensor_names_finishes(llama, tmp_path):
    r"""`(a+)+$` and `^(.+\.)+q_proj\.weight$` (replaced by the whole match: names unchanged) over a name of
    1,000 bytes: Python's re never finished (run()'s subprocess timeout fails the test); RE2 is linear."""
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "tuned")
    shard = shard_of(tuned, "model.norm.weight")
    long_name = "a." * 480 + "q_projXweight" + "a" * 20
    _rewrite_header(shard, lambda h: h.replace(b"model.norm.weight", long_name.encode()))
    (tuned / "model.safetensors.index.json").write_text(
        (tuned / "model.safetensors.index.json").read_text().replace("model.norm.weight", long_name))
    done = run(run_args(llama.base["fp32"], [tuned], tmp_path / "out", "--rename", "(a+)+$=x", "--rename",
                        r"^(.+\.)+q_proj\.weight$=\g<0>", "--quiet", "--include", Q_PROJ), tmp_path)
    assert done.returncode == 0, done.stderr


def _nan_alpha(llama, tmp: Path) -> tuple[list[str], Path, str]:
    lora = checkpoints.copy_checkpoint(llama.lora.path, tmp / "lora")
    config = lora / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    return run_args(llama.base["fp32"], [lora], tmp / "out"), config, "lora_alpha is nan"


def _escaping_shard(llama, tmp: Path) -> tuple[list[str], Path, str]:
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp / "tuned")
    index = tuned / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][Q_PROJ] = "../../elsewhere/model.safetensors"
    index.write_text(json.dumps(data))
    return run_args(llama.base["fp32"], [tuned], tmp / "out"), index, "invalid shard"


@pytest.mark.parametrize("build", [_nan_alpha, _escaping_shard])
def test_hostile_json_beside_the_weights(llama, tmp_path, build):
    args, path, words = build(llama, tmp_path)
    assert_one_line_error(run(args, tmp_path), 3, str(path), words)
    assert not (tmp_path / "out").exists()


# --- Odd but valid input runs, skipping what it cannot analyse ----------------------------------------------------


def _set_dtype(shard: Path, name: str, dtype: str, *, packed: bool = False) -> None:
    """Give `name` an unknown dtype code in its header, keeping its bytes; `packed`: as 1-D storage, as packed
    quantized formats lay it out (element size unknown, so the shape says nothing about a matrix)."""
    def edit(raw: bytes) -> bytes:
        header = json.loads(raw)
        entry = header[name]
        begin, end = entry["data_offsets"]
        header[name] = {**entry, "dtype": dtype, **({"shape": [end - begin]} if packed else {})}
        return json.dumps(header).encode()

    _rewrite_header(shard, edit)


K_PROJ = "model.layers.0.self_attn.k_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def test_unknown_dtypes_are_listed_with_their_reason_whatever_their_shape(llama, tmp_path):
    """Unknown dtype strings (not a safetensors code): a base matrix, a base 1-D tensor, and a tuned matrix
    stored packed (1-D).  Each is in the manifest's `skipped` saying "dtype ... unknown", the tuned one under
    the base matrix it stands for (not "only in the base"), and `inspect` says so too."""
    base = checkpoints.copy_checkpoint(llama.base["fp32"], tmp_path / "base")
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "tuned")
    _set_dtype(shard_of(base, K_PROJ), K_PROJ, "F32X")
    _set_dtype(shard_of(base, NORM), NORM, "BLOCK_Q4")
    _set_dtype(shard_of(tuned, Q_PROJ), Q_PROJ, "NVFP4_FUTURE", packed=True)
    done = run(run_args(base, [tuned], tmp_path / "out", "--include", "*layers.0.*",
                        "--exclude", "*layers.0.mlp.*"), tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    reasons = {(s["matrix"], s["model"]): s["reason"] for s in manifest["skipped"]}
    assert "dtype 'F32X' is unknown" in reasons[K_PROJ, None]
    assert "dtype 'BLOCK_Q4' is unknown" in reasons[NORM, None]
    assert "dtype 'NVFP4_FUTURE' is unknown" in reasons[Q_PROJ, str(tuned)]
    assert not any("only in the" in r for (m, _), r in reasons.items() if m in (Q_PROJ, K_PROJ, NORM)), reasons
    analysed = {row["matrix"] for row in __import__("duckdb").sql(
        f"SELECT DISTINCT matrix FROM read_parquet('{tmp_path / 'out' / 'matrices'}/*.parquet')").pl().to_dicts()}
    assert analysed == {"model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"}

    info = json.loads(run(["inspect", str(base), "--json"], tmp_path).stdout)
    unknown = {reason: n for reason, n in info["not_analysed"].items() if "unknown" in reason}
    assert sum(unknown.values()) == 2 and any("'F32X'" in r for r in unknown) and any("'BLOCK_Q4'" in r for r in unknown)
    listed = run(["inspect", str(tuned), "--tensors"], tmp_path).stdout
    line = next(line for line in listed.splitlines() if line.startswith(Q_PROJ))
    assert "NVFP4_FUTURE" in line and "unknown" in line and "not a matrix" not in line



def test_quantized_tensor_excluded_mismatch_and_empty_xdg_cache_home(llama, tmp_path):
    """One run over a tuned checkpoint with an I8 q_proj (skipped with its true reason) and a resized up_proj
    that --exclude gets out of the way; XDG_CACHE_HOME="" must not put the cache under ./lorascale."""
    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "tuned")
    checkpoints.rewrite_tensor(shard_of(tuned, Q_PROJ), Q_PROJ, lambda t: (t * 100).to(torch.int8))
    checkpoints.rewrite_tensor(shard_of(tuned, UP_PROJ_1), UP_PROJ_1, lambda t: t[:96].clone())
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    args = run_args(llama.base["fp32"], [tuned], tmp_path / "out", "--include", "*layers.*.self_attn.q_proj*",
                    "--include", "*layers.1.mlp.*", "--exclude", "*layers.1.mlp.up_proj*")
    done = run(args, tmp_path, cwd=cwd, HOME=str(home), XDG_CACHE_HOME="", LORASCALE_CACHE_DIR=None)
    assert done.returncode == 0, done.stderr
    assert not any(word in done.stdout for word in LAPACK_WORDS)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    reasons = {(s["matrix"], s["model"]): s["reason"] for s in manifest["skipped"]}
    assert "dtype I8 is not a floating type lorascale analyses (quantized?)" in reasons[Q_PROJ, str(tuned)]
    assert "not selected" in reasons[UP_PROJ_1, None]
    assert not any("only in the base" in r for (m, _), r in reasons.items() if m in (Q_PROJ, UP_PROJ_1))
    assert not (cwd / "lorascale").exists(), "the cache went to a relative ./lorascale"
    assert list((home / ".cache" / "lorascale").rglob("*.safetensors")), "the base SVDs were not cached under ~/.cache"
