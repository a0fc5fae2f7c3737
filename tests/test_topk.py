"""--mode topk: same intruder counts as exact where the spectrum is clear, exact fallback where it is flat.

Every matrix here is larger than the Krylov basis top_singular() builds ((iterations + 1) * (K + oversample)
columns at most): on a smaller one the basis spans the whole space, Rayleigh-Ritz returns the exact SVD,
and the guard would pass whatever the method's quality.  Which way the guard went is read from the output:
TunedComparison.top_check, the log record of a fallback, and whether the vectors equal the exact SVD's
bit for bit (fallback) or only to rounding (Krylov).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import save_file

import oracle
from runs import settings
from lorascale.errors import OptionError
from lorascale.numerics.compare import base_spectrum, compare_to_base
from lorascale.numerics.intruders import intruder_count
from lorascale.numerics.topk import DEFAULT_ITERATIONS, DEFAULT_OVERSAMPLE, check_top, top_singular
from runs import compare

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(2024)
# compare_to_base runs top_singular with its defaults: K = 16 needs min(m, n) > 11 * 48 = 528.
SHAPE = (640, 576)
TOP_K = 16


def _basis_columns(rank: int, iterations: int = DEFAULT_ITERATIONS, oversample: int = DEFAULT_OVERSAMPLE) -> int:
    """The most columns top_singular's Krylov basis can have (its docstring)."""
    return (iterations + 1) * (rank + oversample)


def _t(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _lora_like(w0: np.ndarray, rank: int, strengths: np.ndarray) -> np.ndarray:
    """W0 plus a rank-`rank` update along random directions, strong enough to create intruders."""
    left = np.linalg.qr(RNG.standard_normal((w0.shape[0], rank)))[0]
    right = np.linalg.qr(RNG.standard_normal((w0.shape[1], rank)))[0]
    return w0 + (left * strengths) @ right.T


def _flat(rows: int, cols: int) -> np.ndarray:
    """Singular values all within 1e-3 of each other: no iterative method separates the vectors in a few
    steps, so the guard must reject the Krylov result."""
    p = min(rows, cols)
    left = np.linalg.qr(RNG.standard_normal((rows, p)))[0]
    right = np.linalg.qr(RNG.standard_normal((cols, p)))[0]
    return (left * (1.0 + 1e-3 * RNG.random(p))) @ right.T


def _clear_with_intruders(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(W0, W): a well-separated base spectrum and a LoRA-like update that puts intruders in the top 10."""
    w0 = oracle.separated(rows, cols, RNG, gap=0.97)
    sigma_max = np.linalg.svd(w0, compute_uv=False)[0]
    return w0, _lora_like(w0, 4, sigma_max * np.array([2.5, 1.8, 1.3, 0.9]))


def test_top_singular_matches_oracle_on_a_clear_spectrum():
    w = oracle.separated(500, 300, RNG, gap=0.97)
    u_ref, s_ref, _ = oracle.svd(w)
    # Three iterations: a 224-column basis in a 300-dimensional space, so the result is the method's own.
    assert _basis_columns(24, iterations=3) < min(w.shape)
    top = top_singular(_t(w), 24, iterations=3, backend="torch")
    assert top.u.shape == (500, 24) and top.s.shape == (24,) and top.vh.shape == (24, 300)
    np.testing.assert_allclose(top.s.numpy(), s_ref[:24], rtol=1e-5)
    assert np.abs(np.sum(top.u.numpy() * u_ref[:, :24], axis=0)).min() > 1 - 1e-4
    check = check_top(_t(w), top, _t(s_ref), separated=10)
    assert check.passed and check.sigma_error < 1e-5 and check.residual < 1e-3
    # Deterministic: the sketch has a fixed seed.
    again = top_singular(_t(w), 24, iterations=3, backend="torch")
    assert torch.equal(again.u, top.u)


def test_topk_gives_the_exact_intruder_counts_on_a_clear_spectrum():
    w0, w = _clear_with_intruders(*SHAPE)
    assert _basis_columns(TOP_K) < min(SHAPE)
    base = base_spectrum(_t(w0), ("left", "right"), backend="torch")
    exact = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    top = compare_to_base(base, _t(w), settings(top_k=TOP_K), w0=_t(w0))
    # The guard passed, and the output shows it: the Krylov vectors agree with the exact SVD's to rounding,
    # not bit for bit as they would after a fallback.
    assert top.top_check is not None and top.top_check.passed, top.top_check
    assert not np.array_equal(top.sides["left"].max_cos[:TOP_K], exact.sides["left"].max_cos[:TOP_K])
    u0, _, vh0 = oracle.svd(w0)
    u, _, vh = oracle.svd(w)
    for side, (tuned, reference) in {"left": (u, u0), "right": (vh.T, vh0.T)}.items():
        expected = int((np.abs(tuned[:, :10].T @ reference).max(axis=1) < 0.5).sum())  # float64 oracle
        counts = [intruder_count(r.sides[side].max_cos, 10, 0.5) for r in (exact, top)]
        assert counts[0] == counts[1] == expected >= 1
        np.testing.assert_allclose(top.sides[side].max_cos[:TOP_K], exact.sides[side].max_cos[:TOP_K], atol=1e-3)
        np.testing.assert_array_equal(top.sides[side].argmax[:10], exact.sides[side].argmax[:10])
        # Beyond K: not computed (null in the spectra table).
        assert np.isnan(top.sides[side].max_cos[TOP_K:]).all() and (top.sides[side].argmax[TOP_K:] == -1).all()
        np.testing.assert_allclose(top.sides[side].block, exact.sides[side].block, atol=1e-3)
    # Every singular value is still there, from svdvals.  fp32 SVDs (with and without vectors) agree to
    # about eps * ||W||_2, so small values only agree to that absolute level.
    np.testing.assert_allclose(top.s, exact.s, rtol=1e-5, atol=1e-5 * exact.s[0])
    assert top.delta_effective_rank == pytest.approx(exact.delta_effective_rank, rel=1e-5)


def test_guard_falls_back_to_exact_on_a_flat_spectrum():
    w = _flat(*SHAPE)
    assert _basis_columns(TOP_K) < min(SHAPE)
    w0 = oracle.separated(*SHAPE, RNG)
    base = base_spectrum(_t(w0), ("left",), backend="torch")
    top = compare_to_base(base, _t(w), settings(top_k=TOP_K), w0=_t(w0))
    # Rejected for the angle bound: neighbouring singular values are closer than the residual allows.
    assert top.top_check is not None and not top.top_check.passed
    assert top.top_check.angle_bound > math.sqrt(1e-3)
    # The fallback is the exact SVD, bit for bit.
    exact = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    np.testing.assert_array_equal(top.sides["left"].max_cos[:TOP_K], exact.sides["left"].max_cos[:TOP_K])
    assert np.isnan(top.sides["left"].max_cos[TOP_K:]).all()


def test_guard_tolerance_is_a_knob():
    w = oracle.separated(300, 200, RNG, gap=0.97)
    s = torch.linalg.svdvals(_t(w))
    assert _basis_columns(10, iterations=0) < min(w.shape)
    top = top_singular(_t(w), 10, iterations=0, backend="torch")  # one sketch, no iteration: rough
    rough = check_top(_t(w), top, s, tolerance=1e-9)
    assert not rough.passed
    assert check_top(_t(w), top, s, tolerance=max(rough.sigma_error, rough.residual ** 2) * 1.01).passed
    assert math.isfinite(rough.residual)


def _intruders(out) -> dict[tuple[str, str], int]:
    table = ds.dataset(out / "matrices", format="parquet").to_table().to_pylist()
    return {(r["model"], r["matrix"]): r["intruders"] for r in table}


@pytest.fixture(scope="module")
def clear_and_flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A base and a full fine-tune with two matrices larger than the Krylov basis: layer 0's spectrum is
    clear (the guard passes), layer 1's is flat (it falls back)."""
    w0, clear = _clear_with_intruders(*SHAPE)
    base = {"model.layers.0.mlp.up_proj.weight": w0, "model.layers.1.mlp.up_proj.weight": oracle.separated(*SHAPE, RNG)}
    tuned = {"model.layers.0.mlp.up_proj.weight": clear, "model.layers.1.mlp.up_proj.weight": _flat(*SHAPE)}
    root = tmp_path_factory.mktemp("topk")
    for name, tensors in (("base", base), ("tuned", tuned)):
        (root / name).mkdir()
        save_file({k: _t(v) for k, v in tensors.items()}, str(root / name / "model.safetensors"))
    return str(root / "base"), str(root / "tuned")


@pytest.mark.slow
def test_pipeline_topk_matches_exact_counts_and_nulls_beyond_k(clear_and_flat, tmp_path, caplog):
    base, tuned = clear_and_flat
    common = {"use_cache": False, "device": "cpu"}
    exact = compare(base, [tuned], tmp_path / "exact", **common)
    with caplog.at_level(logging.INFO, logger="lorascale.execute.worker"):
        top = compare(base, [tuned], tmp_path / "topk", mode="topk", top_k=TOP_K, **common)
    # The documented record of a fallback: exactly one, for the flat matrix.
    fallbacks = [r.getMessage() for r in caplog.records if "guard failed" in r.getMessage()]
    assert len(fallbacks) == 1 and "model.layers.1.mlp.up_proj.weight" in fallbacks[0], fallbacks
    assert _intruders(exact.out) == _intruders(top.out)
    assert _intruders(top.out)[(tuned, "model.layers.0.mlp.up_proj.weight")] >= 1
    assert top.manifest["options"]["mode"] == "topk" and top.manifest["options"]["top_k"] == TOP_K
    spectra = ds.dataset(top.out / "spectra", format="parquet").to_table().to_pylist()
    tuned_rows = [r for r in spectra if r["role"] == "tuned"]
    assert all(r["max_cos"] is None and r["argmax"] is None for r in tuned_rows if r["rank"] >= TOP_K)
    assert all(r["max_cos"] is not None for r in tuned_rows if r["rank"] < TOP_K)
    exact_rows = {(r["model"], r["matrix"], r["rank"]): r
                  for r in ds.dataset(exact.out / "spectra", format="parquet").to_table().to_pylist()
                  if r["role"] == "tuned"}
    sigma_max = {m: want["sigma"] for (_, m, rank), want in exact_rows.items() if rank == 0}
    for r in tuned_rows:  # every singular value, in every mode (to fp32 SVD accuracy, eps * ||W||_2)
        want = exact_rows[(r["model"], r["matrix"], r["rank"])]
        assert r["sigma"] == pytest.approx(want["sigma"], rel=1e-5, abs=1e-5 * sigma_max[r["matrix"]])
        if r["rank"] < TOP_K and r["matrix"].startswith("model.layers.1."):  # fallback: the exact vectors
            assert r["max_cos"] == want["max_cos"]


def test_top_k_below_k_is_refused(llama, tmp_path):
    with pytest.raises(OptionError, match=r"top_k=5 is below k=10"):
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
