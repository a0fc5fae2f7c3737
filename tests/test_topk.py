"""--mode topk (the default): the top K triplets by block Krylov iteration, the a-posteriori angle bound that
guards them, the adapter operator that never forms W, and intruder counts equal to exact mode's.

Every matrix where the Krylov path itself is tested is larger than the start block (K + oversample
columns): on a smaller one the basis spans the whole space at once and Rayleigh-Ritz is the exact SVD.
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
from runs import compare, settings

from lorascale.errors import OptionError
from lorascale.numerics.compare import base_spectrum, compare_to_base
from lorascale.numerics.intruders import intruder_count
from lorascale.numerics.operators import Dense, LowRankUpdate
from lorascale.numerics.topk import ANGLE_TOLERANCE, DEFAULT_OVERSAMPLE, top_singular

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(2024)
SHAPE = (640, 576)
TOP_K = 16


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


def _sin(u: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """sin(angle) between matching unit columns."""
    u = u / np.linalg.norm(u, axis=0)
    return np.linalg.norm(u - reference * np.sum(u * reference, axis=0), axis=0)


def test_top_singular_matches_the_oracle_and_its_bound_holds():
    w = oracle.separated(500, 300, RNG, gap=0.97)
    u_ref, s_ref, vt_ref = oracle.svd(w)
    top = top_singular(Dense(_t(w)), 24, counted=10)
    assert top.u.shape == (500, 24) and top.s.shape == (24,) and top.vh.shape == (24, 300)
    assert top.check.passed and top.check.basis < 300  # the method's own result, not a complete basis
    np.testing.assert_allclose(top.s.numpy(), s_ref[:24], rtol=1e-5)
    # The bound is a bound: the true angles of the counted vectors (float64 oracle) are below it.
    angles = np.maximum(_sin(top.u.double().numpy()[:, :10], u_ref[:, :10]),
                        _sin(top.vh.double().numpy()[:10].T, vt_ref[:10].T))
    assert angles.max() <= top.check.angle_bound <= max(ANGLE_TOLERANCE, 1e-3)
    # Deterministic: the Gaussian columns have a fixed seed.
    again = top_singular(Dense(_t(w)), 24, counted=10)
    assert torch.equal(top.u, again.u) and torch.equal(top.s, again.s)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_the_adapter_operator_is_the_merged_matrix(transposed):
    """W0 + s B A by products, without forming W, for nn.Linear and for Conv1D ([in, out]) weights."""
    w0 = _t(RNG.standard_normal((96, 80)))
    a = _t(RNG.standard_normal((4, 96 if transposed else 80)))
    b = _t(RNG.standard_normal((80 if transposed else 96, 4)))
    update = LowRankUpdate(w0, a, b, 0.5, transposed=transposed)
    merged = w0 + 0.5 * ((b @ a).T if transposed else b @ a)
    x, y = _t(RNG.standard_normal((80, 7))), _t(RNG.standard_normal((96, 7)))
    torch.testing.assert_close(update.matmul(x), merged @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(update.rmatmul(y), merged.T @ y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(update.dense(), merged)
    by_products, dense = (top_singular(op, 8, counted=8) for op in (update, Dense(merged)))
    torch.testing.assert_close(by_products.s, dense.s, rtol=1e-5, atol=1e-6)


def test_lora_topk_never_forms_w(monkeypatch):
    """An adapter's topk comparison uses W0 and the factors only: the merge is not called when the guard passes."""
    w0, _ = _clear_with_intruders(*SHAPE)
    a = _t(RNG.standard_normal((4, SHAPE[1])) / math.sqrt(SHAPE[1]))
    b = _t(RNG.standard_normal((SHAPE[0], 4)) * 10)
    update = LowRankUpdate(_t(w0), a, b, 2.0)
    monkeypatch.setattr(LowRankUpdate, "dense", lambda self: pytest.fail("W was formed"))
    base = base_spectrum(_t(w0), ("left",), backend="torch")
    delta = torch.linalg.svdvals(2.0 * b @ a)
    result = compare_to_base(base, update, settings(top_k=TOP_K), delta_singular_values=delta)
    assert result.top_check is not None and result.top_check.passed and len(result.s) == TOP_K


def test_the_guard_falls_back_to_exact_on_a_flat_spectrum():
    w = _flat(*SHAPE)
    assert TOP_K + DEFAULT_OVERSAMPLE < min(SHAPE)
    w0 = oracle.separated(*SHAPE, RNG)
    base = base_spectrum(_t(w0), ("left",), backend="torch")
    top = compare_to_base(base, _t(w), settings(top_k=TOP_K), w0=_t(w0))
    # Rejected: neighbouring singular values are closer than the residuals allow an angle bound.
    assert top.top_check is not None and not top.top_check.passed and top.top_check.angle_bound > 1e-2
    # The fallback is the exact SVD's top K, bit for bit.
    exact = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    np.testing.assert_array_equal(top.sides["left"].max_cos, exact.sides["left"].max_cos[:TOP_K])
    np.testing.assert_array_equal(top.s, exact.s[:TOP_K])


def test_an_intruder_orthogonal_to_the_warm_start_is_still_found():
    """The warm columns are the base's top vectors; an intruder orthogonal to all of them (and stronger
    than the base's top value) must still be found, by the Gaussian part of the start block."""
    m, n = SHAPE
    w0 = oracle.separated(m, n, RNG, gap=0.97)
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    warm_width = TOP_K + DEFAULT_OVERSAMPLE
    direction = RNG.standard_normal(m)
    direction -= u0[:, :warm_width] @ (u0[:, :warm_width].T @ direction)  # orthogonal to every warm column
    direction /= np.linalg.norm(direction)
    right = RNG.standard_normal(n)
    w = w0 + 3.0 * np.linalg.svd(w0, compute_uv=False)[0] * np.outer(direction, right / np.linalg.norm(right))
    base = base_spectrum(_t(w0), ("left",), backend="torch")
    top = compare_to_base(base, _t(w), settings(top_k=TOP_K), w0=_t(w0))
    exact = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    assert abs(float(np.dot(np.linalg.svd(w, full_matrices=False)[0][:, 0], direction))) > 0.9  # W's top vector
    assert top.top_check is not None and top.top_check.passed
    assert top.sides["left"].max_cos[0] < 0.5  # found, and an intruder
    assert intruder_count(top.sides["left"].max_cos, 10, 0.5) == intruder_count(exact.sides["left"].max_cos, 10, 0.5)


@pytest.mark.parametrize("side", [("left",), ("right",), ("left", "right")], ids=["left", "right", "both"])
def test_topk_equals_exact_where_the_spectrum_is_clear(side):
    w0, w = _clear_with_intruders(*SHAPE)
    base = base_spectrum(_t(w0), side, backend="torch")
    exact = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    top = compare_to_base(base, _t(w), settings(top_k=TOP_K), w0=_t(w0))
    assert top.top_check is not None and top.top_check.passed
    for name in side:
        assert intruder_count(top.sides[name].max_cos, 10, 0.5) == intruder_count(exact.sides[name].max_cos, 10, 0.5) >= 1
        np.testing.assert_allclose(top.sides[name].max_cos, exact.sides[name].max_cos[:TOP_K], atol=1e-4)
        np.testing.assert_array_equal(top.sides[name].argmax[:10], exact.sides[name].argmax[:10])
        np.testing.assert_allclose(top.sides[name].block, exact.sides[name].block, atol=1e-4)
    np.testing.assert_allclose(top.s, exact.s[:TOP_K], rtol=1e-5)
    assert top.delta_effective_rank == pytest.approx(exact.delta_effective_rank, rel=1e-6)


def _intruders(out) -> dict[tuple[str, str], int]:
    table = ds.dataset(out / "matrices", format="parquet").to_table().to_pylist()
    return {(r["model"], r["matrix"]): r["intruders"] for r in table}


@pytest.fixture(scope="module")
def clear_and_flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A base and a full fine-tune with two matrices larger than the start block: layer 0's spectrum is
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
def test_the_default_run_is_topk_with_exact_counts_and_top_k_rows(clear_and_flat, tmp_path, caplog):
    base, tuned = clear_and_flat
    common = {"use_cache": False, "device": "cpu"}
    exact = compare(base, [tuned], tmp_path / "exact", mode="exact", **common)
    with caplog.at_level(logging.INFO, logger="lorascale.analyses.compare"):
        top = compare(base, [tuned], tmp_path / "topk", top_k=TOP_K, **common)  # topk: the default mode
    # The documented record of a fallback: exactly one, for the flat matrix.
    fallbacks = [r.getMessage() for r in caplog.records if "guard failed" in r.getMessage()]
    assert len(fallbacks) == 1 and "model.layers.1.mlp.up_proj.weight" in fallbacks[0], fallbacks
    assert _intruders(exact.out) == _intruders(top.out)
    assert _intruders(top.out)[(tuned, "model.layers.0.mlp.up_proj.weight")] >= 1
    assert top.manifest["options"]["mode"] == "topk" and top.manifest["options"]["top_k"] == TOP_K
    methods = {r["matrix"]: r["method"] for r in ds.dataset(top.out / "matrices").to_table().to_pylist()}
    assert methods == {"model.layers.0.mlp.up_proj.weight": "topk", "model.layers.1.mlp.up_proj.weight": "topk->exact"}
    # spectra: the computed triplets only, ranks 0..K-1 of each tuned matrix (the base keeps its full spectrum).
    spectra = ds.dataset(top.out / "spectra", format="parquet").to_table().to_pylist()
    tuned_rows = [r for r in spectra if r["role"] == "tuned"]
    assert sorted({r["rank"] for r in tuned_rows}) == list(range(TOP_K)) and len(tuned_rows) == 2 * TOP_K
    assert all(r["max_cos"] is not None and r["argmax"] is not None for r in tuned_rows)
    assert len([r for r in spectra if r["role"] == "base"]) == 2 * min(SHAPE)
    exact_rows = {(r["matrix"], r["rank"]): r for r in ds.dataset(exact.out / "spectra").to_table().to_pylist()
                  if r["role"] == "tuned"}
    for r in tuned_rows:
        want = exact_rows[(r["matrix"], r["rank"])]
        assert r["sigma"] == pytest.approx(want["sigma"], rel=1e-5)
        if r["matrix"].startswith("model.layers.1."):  # the fallback: the exact vectors themselves
            assert r["max_cos"] == want["max_cos"]
        else:
            assert r["max_cos"] == pytest.approx(want["max_cos"], abs=1e-4)


def test_top_k_below_k_is_refused(llama, tmp_path):
    with pytest.raises(OptionError, match=r"top_k=5 is below k=10"):
        compare(str(llama.base["fp32"]), [str(llama.lora.path)], tmp_path / "out", mode="topk", top_k=5,
                use_cache=False)


def test_the_default_top_k_follows_a_large_k(llama, tmp_path):
    """top_k defaults to 64, or to k when k is larger: `--k 100` alone is a valid topk run."""
    result = compare(str(llama.base["fp32"]), [str(llama.lora.path)], tmp_path / "out", k=100, use_cache=False,
                     include=["*layers.0.self_attn.q_proj*"])
    assert result.manifest["options"]["top_k"] == 100


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
    exact = CliRunner().invoke(main, [
        "run", "--base", str(llama.base["fp32"]), "--tuned", str(llama.lora.path), "--out", str(tmp_path / "e"),
        "--quiet", "--device", "cpu", "--mode", "exact", "--no-cache"])
    assert exact.exit_code == 0, exact.output
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["options"]["top_k"] is None
    refused = CliRunner().invoke(main, [
        "run", "--base", str(llama.base["fp32"]), "--tuned", str(llama.lora.path), "--out", str(tmp_path / "x"),
        "--quiet", "--device", "cpu", "--backend", "cupy", "--no-cache"])
    assert refused.exit_code == 2 and "cupy" in refused.output
