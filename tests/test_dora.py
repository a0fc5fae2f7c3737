"""DoRA adapters (peft's use_dora) against the float64 oracle and against peft's own merge_and_unload.

The adapters are made by peft (get_peft_model + save_pretrained) with random factors and magnitude vectors
perturbed away from peft's initial row norms (tests/checkpoints.lora_adapter), so the merge is far from
the identity.  The oracle rebuilds W' = m * V / ||V||_row, V = W0 + s*B@A, in float64 from the saved file,
with s from peft's live LoraLayer.scaling; peft's merge_and_unload of the same adapter is checked to be that
W' to fp32 round-off, and a run on the adapter must equal a run on peft's merged checkpoint.

Tolerances are test_formats.check_run's: singular values to 1e-5 * sigma_max (fp32), 1e-10 (fp64); vectors
by Wedin's bound from the gaps the oracle finds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from lorascale.errors import CheckpointFormatError, NumericalError
from lorascale.io.adapter import index_adapter
from lorascale.numerics.merge import dora_merge
from runs import compare
from lorascale.records import AdapterSettings, TensorEntry
from lorascale.store.schema import MANIFEST, MATRICES, SPECTRA
from test_formats import C, K, UNIT, OracleMatrix, by_key, check_run, intruder_bounds, read_table, safe_epsilon

pytestmark = pytest.mark.usefixtures("one_thread")


def dora_oracle(base_dir: Path, reference: str, adapter: checkpoints.Adapter) -> dict[tuple[str, str], OracleMatrix]:
    base = checkpoints.load_float64(base_dir)
    tensors = checkpoints.load_float64(adapter.path)
    expected = {}
    for module in adapter.scaling:
        name = f"{module}.weight"
        delta = checkpoints.dora_delta(adapter, module, base[name], tensors)
        expected[reference, name] = OracleMatrix(base[name], base[name] + delta, delta, "dora")
    return expected


def merged_oracle(base_dir: Path, merged: Path, names) -> dict[tuple[str, str], OracleMatrix]:
    base, tuned = checkpoints.load_float64(base_dir), checkpoints.load_float64(merged)
    return {(str(merged), n): OracleMatrix(base[n], tuned[n], tuned[n] - base[n], "full") for n in names}


def assert_runs_agree(out: Path, adapter_ref: str, merged_ref: str, expected: dict[tuple[str, str], OracleMatrix],
                      epsilon: float):
    """The adapter's rows equal those of peft's merged checkpoint: sigma, dW metrics, max_cos, intruders."""
    matrices = by_key(read_table(out, MATRICES), "model", "matrix")
    spectra = by_key(read_table(out, SPECTRA), "model", "role", "matrix")
    names = {m for (model, m) in matrices if model == adapter_ref}
    assert names == {m for (model, m) in matrices if model == merged_ref}
    for name in names:
        (a,), (m,) = matrices[adapter_ref, name], matrices[merged_ref, name]
        assert (a["update"], m["update"]) == ("dora", "full")
        assert a["delta_fro"] == pytest.approx(m["delta_fro"], rel=1e-5)
        assert a["delta_effective_rank"] == pytest.approx(m["delta_effective_rank"], rel=1e-3)
        sa = sorted(spectra[adapter_ref, "tuned", name], key=lambda r: r["rank"])
        sm = sorted(spectra[merged_ref, "tuned", name], key=lambda r: r["rank"])
        sigma = np.array([r["sigma"] for r in sa])
        np.testing.assert_allclose([r["sigma"] for r in sm], sigma, rtol=0, atol=2e-5 * sigma[0])
        o = expected[adapter_ref, name].side("left")
        tol = 2 * C * UNIT["fp32"] * (o["s"][0] / o["gap"] + o["s0"][0] / o["gap0"].min())
        np.testing.assert_array_less(np.abs(np.array([r["max_cos"] for r in sa])
                                            - np.array([r["max_cos"] for r in sm])), tol + 1e-12)
        lo, hi = intruder_bounds(o["max_cos"], tol, K, epsilon)
        if lo == hi:
            assert a["intruders"] == m["intruders"] == lo


def _check_against_peft(base: Path, dora: checkpoints.Adapter, tmp_path: Path) -> dict:
    merged = dora.merged(tmp_path / "merged")
    expected = dora_oracle(base, str(dora.path), dora)
    # peft's merge_and_unload is the oracle's formula (fp32 round-off of the merged model apart).
    peft_merged = checkpoints.load_float64(merged)
    for (_, name), want in expected.items():
        np.testing.assert_allclose(peft_merged[name], want.w, rtol=0, atol=2e-6 * np.abs(want.w).max())
    expected |= merged_oracle(base, merged, [name for _, name in expected])
    epsilon = safe_epsilon(expected)
    compare(str(base), [str(dora.path), str(merged)], tmp_path / "out", epsilon=epsilon, device="cpu")
    stats = check_run(tmp_path / "out", str(base), expected, epsilon=epsilon, strict_intruders=True)
    assert_runs_agree(tmp_path / "out", str(dora.path), str(merged), expected, epsilon)
    rows = [r for r in read_table(tmp_path / "out", MATRICES) if r["model"] == str(dora.path)]
    assert len(rows) == len(dora.scaling)
    # dW = W' - W0 is not low rank: the row rescaling touches all of W0 (its spectrum came from svdvals).
    assert min(r["delta_effective_rank"] for r in rows) > 2 * max(dora.ranks.values())
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    (record,) = [t for t in manifest["tuned"] if t["reference"] == str(dora.path)]
    assert record["kind"] == "dora" and record["adapter"]["use_dora"] is True
    return stats


def test_dora_llama_matches_oracle_and_peft_merge_and_unload(llama, tmp_path):
    stats = _check_against_peft(llama.base["fp32"], llama.dora, tmp_path)
    assert stats["exact_intruders"] == 2 * 14


def test_dora_gpt2_conv1d_fan_in_fan_out_matches_oracle_and_peft_merge(gpt2, tmp_path):
    """peft supports DoRA on Conv1D (fan_in_fan_out): W0 is stored [in, out], the norm is per output."""
    assert gpt2.dora.fan_in_fan_out
    _check_against_peft(gpt2.base, gpt2.dora, tmp_path)
    matrices = {r["matrix"]: r for r in read_table(tmp_path / "out", MATRICES) if r["model"] == str(gpt2.dora.path)}
    assert (matrices["transformer.h.0.attn.c_attn.weight"]["rows"],
            matrices["transformer.h.0.attn.c_attn.weight"]["cols"]) == (64, 192)  # stored [in, out]


def test_dora_16bit_adapter_fp64_matches_oracle_tightly(llama, tmp_path):
    """A bf16 base and a bf16-saved DoRA adapter (A, B and m in bf16), computed in fp64 from the stored values."""
    dora = checkpoints.lora_adapter(llama.model, tmp_path / "dora-bf16", seed=8, use_dora=True,
                                    target_modules=("q_proj", "down_proj"), save_dtype="bf16")
    base = llama.base["bf16"]
    dtypes = {name: t.dtype for name, t in load_file(str(dora.path / "adapter_model.safetensors")).items()}
    assert set(dtypes.values()) == {torch.bfloat16}
    expected = dora_oracle(base, str(dora.path), dora)
    compare(str(base), [str(dora.path)], tmp_path / "out", precision="fp64", device="cpu")
    check_run(tmp_path / "out", str(base), expected, precision="fp64")


@pytest.mark.parametrize("suffix", ["lora_magnitude_vector.weight", "lora_magnitude_vector.default",
                                    "lora_magnitude_vector.default.weight"])
def test_other_magnitude_key_spellings(llama, tmp_path, suffix):
    """Older peft and hand-made files keep ".weight" and/or the adapter name on the magnitude key."""
    adapter = checkpoints.copy_checkpoint(llama.dora.path, tmp_path / "dora")
    path = adapter / "adapter_model.safetensors"
    tensors = {name.replace("lora_magnitude_vector", suffix): t for name, t in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    matrix = "model.layers.1.mlp.up_proj.weight"
    compare(str(llama.base["fp32"]), [str(adapter)], tmp_path / "out", include=[matrix], device="cpu")
    (row,) = read_table(tmp_path / "out", MATRICES)
    want = dora_oracle(llama.base["fp32"], str(adapter), llama.dora)[str(adapter), matrix]
    assert row["update"] == "dora"
    assert row["delta_fro"] == pytest.approx(np.linalg.norm(want.delta), rel=1e-5)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_dora_on_an_embedding_is_skipped_and_the_rest_analysed(llama, tmp_path):
    """peft also puts DoRA on embeddings; lorascale does not analyse embeddings and says so in the manifest."""
    dora = checkpoints.lora_adapter(llama.model, tmp_path / "dora-emb", seed=9, use_dora=True,
                                    target_modules=("q_proj", "embed_tokens"))
    saved = load_file(str(dora.path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_magnitude_vector" in saved
    compare(str(llama.base["fp32"]), [str(dora.path)], tmp_path / "out", device="cpu")
    rows = read_table(tmp_path / "out", MATRICES)
    assert {r["matrix"] for r in rows} == {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)}
    assert {r["update"] for r in rows} == {"dora"}
    skipped = json.loads((tmp_path / "out" / MANIFEST).read_text())["skipped"]
    reasons = {s["matrix"]: s["reason"] for s in skipped if s.get("model") == str(dora.path)}
    assert "embedding" in reasons["base_model.model.model.embed_tokens.lora_magnitude_vector"]


def test_cli_inspect_and_run(llama, tmp_path):
    from click.testing import CliRunner

    from lorascale.cli import main

    inspected = CliRunner().invoke(main, ["inspect", str(llama.dora.path), "--json"])
    assert inspected.exit_code == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["kind"] == "dora" and info["adapter"]["use_dora"] is True and info["adapter"]["adapted_modules"] == 14
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--base", str(llama.base["fp32"]), "--tuned", str(llama.dora.path),
                                       "--out", str(out), "--device", "cpu", "--include", "*layers.0.mlp.*"])
    assert result.exit_code == 0, result.stderr
    (line,) = [row for row in result.stdout.splitlines() if str(llama.dora.path) in row]
    assert " dora " in line
    assert {r["update"] for r in read_table(out, MATRICES)} == {"dora"}


# --- The merge itself -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dora_merge_equals_float64_formula(fan_in_fan_out, dtype):
    rng = np.random.default_rng(0)
    out_dim, in_dim, r, scale = 12, 7, 3, 1.7
    w0 = rng.standard_normal((in_dim, out_dim) if fan_in_fan_out else (out_dim, in_dim))
    a, b = rng.standard_normal((r, in_dim)), rng.standard_normal((out_dim, r))
    m = rng.uniform(0.2, 3.0, out_dim)
    v = (w0.T if fan_in_fan_out else w0) + scale * b @ a
    want = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    want = want.T if fan_in_fan_out else want
    got = dora_merge(*(torch.tensor(x, dtype=dtype) for x in (w0, a, b)), scale, torch.tensor(m, dtype=dtype),
                     fan_in_fan_out=fan_in_fan_out)
    assert got.shape == w0.shape and got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=(1e-6 if dtype == torch.float32 else 1e-14) * 10)
    # Each output's norm is its magnitude: the defining property of DoRA's merge.
    norms = np.linalg.norm(got.numpy().T if fan_in_fan_out else got.numpy(), axis=1)
    np.testing.assert_allclose(norms, m, rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_dora_merge_refuses_a_zero_row_and_overflow():
    w0, a, b = torch.ones(4, 3), torch.ones(2, 3), torch.ones(4, 2)
    w0[2], b[2] = 0, 0
    with pytest.raises(NumericalError, match=r"1 row\(s\).*zero.*output 2"):
        dora_merge(w0, a, b, 1.0, torch.ones(4))
    with pytest.raises(NumericalError, match="overflowed"):
        dora_merge(torch.ones(4, 3), a, b, 1e38, torch.ones(4))
    with pytest.raises(NumericalError, match="overflowed"):  # m / ||V|| overflows fp32 (not fp64) for tiny rows
        dora_merge(torch.full((4, 3), 1e-18), a, torch.zeros(4, 2), 1.0, torch.full((4,), 1e30))
    with pytest.raises(NumericalError, match="underflow to 0 in float32"):
        dora_merge(torch.full((4, 3), 1e-30), a, torch.zeros(4, 2), 1.0, torch.ones(4))
    for w0 in (torch.full((4, 3), 1e-18), torch.full((4, 3), 1e-30)):  # both fine in fp64
        merged = dora_merge(w0.double(), a.double(), torch.zeros(4, 2, dtype=torch.float64), 1.0,
                            torch.full((4,), 1e30, dtype=torch.float64))
        np.testing.assert_allclose(merged.numpy(), 1e30 / 3 ** 0.5, rtol=1e-12)


# --- Indexing a DoRA adapter ------------------------------------------------------------------------------------

_MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def _entry(name: str, shape: tuple[int, ...], dtype: str = "F32") -> TensorEntry:
    return TensorEntry(name=name, file=Path("adapter_model.safetensors"), dtype=dtype, shape=shape, data_start=0,
                       data_end=0)


def _tensors(*extra: TensorEntry, magnitude: tuple[int, ...] | None = (8,)) -> dict[str, TensorEntry]:
    entries = [_entry(f"{_MODULE}.lora_A.weight", (2, 6)), _entry(f"{_MODULE}.lora_B.weight", (8, 2)), *extra]
    if magnitude is not None:
        entries.append(_entry(f"{_MODULE}.lora_magnitude_vector", magnitude))
    return {e.name: e for e in entries}


DORA = AdapterSettings(r=2, lora_alpha=4, use_dora=True)


def test_index_attaches_the_magnitude():
    index = index_adapter(Path("a"), DORA, _tensors())
    factors = index.factors["model.layers.0.self_attn.q_proj"]
    assert factors.magnitude is not None and factors.magnitude.name.endswith("lora_magnitude_vector")
    assert factors.scale == 2.0 and not index.other


@pytest.mark.parametrize("settings, tensors, words", [
    (AdapterSettings(r=2, lora_alpha=4), _tensors(), ["does not set use_dora", "lora_magnitude_vector"]),
    (DORA, _tensors(magnitude=None), ["has no lora_magnitude_vector", "q_proj"]),
    (DORA, _tensors(magnitude=(6,)), ["[6]", "8 outputs"]),
    (DORA, _tensors(_entry(f"{_MODULE}.lora_magnitude_vector.default.weight", (8,))), ["two DoRA magnitude"]),
    (DORA, _tensors(_entry("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", (8,))),
     ["up_proj", "no lora_A/lora_B"]),
])
def test_index_refuses_config_and_weights_that_disagree(settings, tensors, words):
    with pytest.raises(CheckpointFormatError) as info:
        index_adapter(Path("adapter_model.safetensors"), settings, tensors)
    assert info.value.exit_code == 3
    for word in words:
        assert word in str(info.value)


def test_index_sets_aside_magnitudes_it_cannot_use():
    conv = "base_model.model.conv"
    tensors = _tensors(
        _entry(f"{conv}.lora_A.weight", (2, 3, 1, 1)), _entry(f"{conv}.lora_B.weight", (5, 2, 1, 1)),
        _entry(f"{conv}.lora_magnitude_vector", (1, 5, 1, 1)),
        _entry("base_model.model.model.embed_tokens.lora_embedding_A", (2, 96)),
        _entry("base_model.model.model.embed_tokens.lora_embedding_B", (64, 2)),
        _entry("base_model.model.model.embed_tokens.lora_magnitude_vector", (64,)),
        magnitude=None)
    tensors[f"{_MODULE}.lora_magnitude_vector"] = _entry(f"{_MODULE}.lora_magnitude_vector", (8,), "F8_E4M3")
    index = index_adapter(Path("a"), DORA, tensors)
    assert not index.factors  # q_proj's magnitude is quantized: the module is not analysed at all
    assert "not analysed" in index.other[f"{_MODULE}.lora_magnitude_vector"]
    assert "LoRA factors are not analysed" in index.other[f"{conv}.lora_magnitude_vector"]
    assert "embedding" in index.other["base_model.model.model.embed_tokens.lora_magnitude_vector"]
    # An unknown dtype, stored packed (a shape that is not [out]): its dtype is the reason, not a corrupt file.
    tensors[f"{_MODULE}.lora_magnitude_vector"] = _entry(f"{_MODULE}.lora_magnitude_vector", (3,), "Q4_PACKED")
    index = index_adapter(Path("a"), DORA, tensors)
    assert not index.factors and "'Q4_PACKED' is unknown" in index.other[f"{_MODULE}.lora_magnitude_vector"]
