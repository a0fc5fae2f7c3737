"""--mode topk: same intruder counts as exact where the spectrum is clear, exact fallback where it is flat."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

import oracle
from lorascale.errors import OptionError
from lorascale.numerics.compare import base_spectrum, compare_to_base
from lorascale.numerics.metrics import intruder_count
from lorascale.numerics.topk import check_top, top_singular
from lorascale.pipeline import compare

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(2024)


def _t(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _lora_like(w0: np.ndarray, rank: int, strengths: np.ndarray) -> np.ndarray:
    """W0 plus a rank-`rank` update along random directions, strong enough to create intruders."""
    left = np.linalg.qr(RNG.standard_normal((w0.shape[0], rank)))[0]
    right = np.linalg.qr(RNG.standard_normal((w0.shape[1], rank)))[0]
    return w0 + (left * strengths) @ right.T


def test_top_singular_matches_oracle_on_a_clear_spectrum():
    w = oracle.separated(500, 300, RNG, gap=0.97)
    u_ref, s_ref, _ = oracle.svd(w)
    top = top_singular(_t(w), 24)
    assert top.u.shape == (500, 24) and top.s.shape == (24,) and top.vh.shape == (24, 300)
    np.testing.assert_allclose(top.s.numpy(), s_ref[:24], rtol=1e-5)
    assert np.abs(np.sum(top.u.numpy() * u_ref[:, :24], axis=0)).min() > 1 - 1e-4
    check = check_top(_t(w), top, _t(s_ref))
    assert check.passed and check.sigma_error < 1e-5 and check.residual < 1e-3
    # Deterministic: the sketch has a fixed seed.
    again = top_singular(_t(w), 24)
    assert torch.equal(again.u, top.u)


def test_topk_gives_the_exact_intruder_counts_on_a_clear_spectrum():
    w0 = oracle.separated(400, 320, RNG, gap=0.97)
    sigma_max = np.linalg.svd(w0, compute_uv=False)[0]
    w = _lora_like(w0, 4, sigma_max * np.array([2.5, 1.8, 1.3, 0.9]))
    base = base_spectrum(_t(w0), ("left", "right"))
    exact = compare_to_base(base, _t(w), w0=_t(w0))
    top = compare_to_base(base, _t(w), w0=_t(w0), top_k=32)
    assert top.top_check is not None and top.top_check.passed
    for side in ("left", "right"):
        counts = [intruder_count(r.sides[side].max_cos, 10, 0.5) for r in (exact, top)]
        assert counts[0] == counts[1] == oracle.intruders(w0, w, 10, 0.5, side) >= 1
        np.testing.assert_allclose(top.sides[side].max_cos[:32], exact.sides[side].max_cos[:32], atol=1e-3)
        np.testing.assert_array_equal(top.sides[side].argmax[:10], exact.sides[side].argmax[:10])
        # Beyond K: not computed (null in the spectra table).
        assert np.isnan(top.sides[side].max_cos[32:]).all() and (top.sides[side].argmax[32:] == -1).all()
        np.testing.assert_allclose(top.sides[side].block, exact.sides[side].block, atol=1e-3)
    # Every singular value is still there, from svdvals.
    np.testing.assert_allclose(top.s, exact.s, rtol=1e-5)
    assert top.delta_effective_rank == pytest.approx(exact.delta_effective_rank, rel=1e-5)


def test_guard_falls_back_to_exact_on_a_flat_spectrum():
    # Singular values all within 1e-3 of each other: no iterative method separates the vectors in a few
    # steps, and the exact SVD is what the result must equal.
    p = 200
    left = np.linalg.qr(RNG.standard_normal((300, p)))[0]
    right = np.linalg.qr(RNG.standard_normal((p, p)))[0]
    w = (left * (1.0 + 1e-3 * RNG.random(p))) @ right.T
    w0 = oracle.separated(300, p, RNG)
    base = base_spectrum(_t(w0), ("left",))
    top = compare_to_base(base, _t(w), w0=_t(w0), top_k=16)
    assert top.top_check is not None and not top.top_check.passed
    exact = compare_to_base(base, _t(w), w0=_t(w0))
    np.testing.assert_array_equal(top.sides["left"].max_cos[:16], exact.sides["left"].max_cos[:16])
    assert np.isnan(top.sides["left"].max_cos[16:]).all()


def test_guard_tolerance_is_a_knob():
    w = oracle.separated(300, 200, RNG, gap=0.97)
    s = torch.linalg.svdvals(_t(w))
    top = top_singular(_t(w), 10, iterations=0)  # one sketch, no iteration: rough
    rough = check_top(_t(w), top, s, tolerance=1e-9)
    assert not rough.passed
    assert check_top(_t(w), top, s, tolerance=max(rough.sigma_error, rough.residual ** 2) * 1.01).passed
    assert math.isfinite(rough.residual)


def _intruders(out) -> dict[tuple[str, str], int]:
    table = ds.dataset(out / "matrices", format="parquet").to_table().to_pylist()
    return {(r["model"], r["matrix"]): r["intruders"] for r in table}


@pytest.mark.slow
def test_pipeline_topk_matches_exact_counts_and_nulls_beyond_k(llama, tmp_path):
    base = str(llama.base["fp32"])
    tuned = [str(llama.tuned["fp32"]), str(llama.lora.path)]
    common = {"use_cache": False, "device": "cpu"}
    exact = compare(base, tuned, tmp_path / "exact", **common)
    top = compare(base, tuned, tmp_path / "topk", mode="topk", top_k=16, **common)
    assert _intruders(exact.out) == _intruders(top.out)
    assert top.manifest["options"]["mode"] == "topk" and top.manifest["options"]["top_k"] == 16
    spectra = ds.dataset(top.out / "spectra", format="parquet").to_table().to_pylist()
    tuned_rows = [r for r in spectra if r["role"] == "tuned"]
    assert all(r["max_cos"] is None and r["argmax"] is None for r in tuned_rows if r["rank"] >= 16)
    assert all(r["max_cos"] is not None for r in tuned_rows if r["rank"] < 16)
    exact_sigma = {(r["model"], r["matrix"], r["rank"]): r["sigma"]
                   for r in ds.dataset(exact.out / "spectra", format="parquet").to_table().to_pylist()}
    for r in spectra:  # every singular value, in every mode
        assert r["sigma"] == pytest.approx(exact_sigma[(r["model"], r["matrix"], r["rank"])], rel=1e-5, abs=1e-7)


def test_top_k_below_k_is_refused(llama, tmp_path):
    with pytest.raises(OptionError, match="top-k"):
        compare(str(llama.base["fp32"]), [str(llama.lora.path)], tmp_path / "out", mode="topk", top_k=5,
                use_cache=False)


def test_cli_passes_mode_backend_and_cache_options(llama, tmp_path):
    import json

    from click.testing import CliRunner

    from lorascale.cli import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    result = CliRunner().invoke(main, [
        "run", "--base", str(llama.base["fp32"]), "--tuned", str(llama.lora.path), "--out", str(out), "--quiet",
        "--device", "cpu", "--backend", "gram", "--mode", "topk", "--top-k", "12", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert (options["backend"], options["mode"], options["top_k"], options["cache_dir"]) == (
        "gram", "topk", 12, str(cache))
    assert list((cache / "base-svd").rglob("*.safetensors"))
    refused = CliRunner().invoke(main, [
        "run", "--base", str(llama.base["fp32"]), "--tuned", str(llama.lora.path), "--out", str(tmp_path / "x"),
        "--quiet", "--device", "cpu", "--backend", "cupy", "--no-cache"])
    assert refused.exit_code == 2 and "cupy" in refused.output
