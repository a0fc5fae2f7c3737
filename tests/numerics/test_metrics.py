"""Known answers for the metrics of docs/METHOD.md, and agreement with the float64 oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import oracle
from runs import settings

from lorascale.numerics.compare import base_spectrum, compare_to_base
from lorascale.numerics.intruders import intruder_count
from lorascale.numerics.metrics import (
    effective_rank, lora_delta_singular_values, max_cos, null_max_cos, null_max_cos_approx,
)

RNG = np.random.default_rng(1234)


def _t(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def test_large_rank_one_update_creates_an_intruder():
    # Paper Section 5: W0 + lambda u v^T with lambda above sigma_max and random u, v adds a top singular
    # vector nearly orthogonal to every base vector.
    w0 = oracle.separated(96, 64, RNG)
    u = RNG.standard_normal(96)
    u /= np.linalg.norm(u)
    v = RNG.standard_normal(64)
    v /= np.linalg.norm(v)
    lam = 3.0 * np.linalg.svd(w0, compute_uv=False)[0]
    w = w0 + lam * np.outer(u, v)
    base = base_spectrum(_t(w0), ("left",), backend="torch")
    result = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    assert result.sides["left"].max_cos[0] < 0.5  # the new top direction is an intruder
    assert intruder_count(result.sides["left"].max_cos, 10, 0.5) >= 1
    assert intruder_count(result.sides["left"].max_cos, 10, 0.5) == oracle.intruders(w0, w, 10, 0.5)
    assert result.delta_effective_rank == pytest.approx(1.0, abs=1e-3)


def test_small_dense_perturbation_creates_no_intruder():
    w0 = oracle.separated(96, 64, RNG)
    w = w0 + 1e-3 * RNG.standard_normal(w0.shape)
    base = base_spectrum(_t(w0), ("left", "right"), backend="torch")
    result = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    for side in ("left", "right"):
        assert intruder_count(result.sides[side].max_cos, 10, 0.9) == 0
        assert np.all(result.sides[side].argmax[:10] == np.arange(10))
    # A dense random update has a high effective rank (close to min(m, n) for Gaussian noise).
    assert result.delta_effective_rank > 0.8 * 64


def test_effective_rank_known_values():
    assert effective_rank(torch.linalg.svdvals(torch.eye(17))) == pytest.approx(17.0, rel=1e-6)
    r_equal = torch.cat([torch.full((5,), 3.0), torch.zeros(20)])
    assert effective_rank(r_equal) == pytest.approx(5.0, rel=1e-9)
    assert effective_rank(torch.zeros(4)) is None
    s = np.array([5.0, 2.0, 1.0, 0.1])
    assert effective_rank(s) == pytest.approx(oracle.effective_rank(s), rel=1e-12)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_core_singular_values_match_dense_svd(fan_in_fan_out):
    a = RNG.standard_normal((6, 40))
    b = RNG.standard_normal((70, 6))
    scale = 2.5
    got = lora_delta_singular_values(_t(a, torch.float64), _t(b, torch.float64), scale).numpy()
    dense = scale * b @ a
    want = np.linalg.svd(dense.T if fan_in_fan_out else dense, compute_uv=False)[:6]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_max_cos_is_over_all_base_vectors_and_chunked():
    # More columns than one chunk, to cover the chunked path; the oracle takes max over every base vector.
    base = np.linalg.qr(RNG.standard_normal((1500, 1100)))[0]
    vectors = np.linalg.qr(RNG.standard_normal((1500, 1100)))[0]
    values, index = max_cos(_t(vectors, torch.float64), _t(base, torch.float64))
    sim = np.abs(vectors.T @ base)
    np.testing.assert_allclose(values.numpy(), sim.max(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(index.numpy(), sim.argmax(axis=1))


@pytest.mark.parametrize("dim,n", [(4096, 4096), (384, 384), (1536, 384), (11008, 4096)])
def test_null_max_cos_matches_direct_simulation_and_scale(dim, n):
    value = null_max_cos(dim, n)
    # About sqrt(2 ln(2n) / dim) (docs/METHOD.md): 0.06 for a 4096-dim full basis.
    assert value == pytest.approx(null_max_cos_approx(dim, n), rel=0.15)
    if dim <= 1536:  # direct simulation with a real random basis, for the small cases
        rng = np.random.default_rng(7)
        basis = np.linalg.qr(rng.standard_normal((dim, n)))[0]
        x = rng.standard_normal((dim, 400))
        x /= np.linalg.norm(x, axis=0)
        direct = np.abs(basis.T @ x).max(axis=0).mean()
        assert value == pytest.approx(direct, rel=0.03)


def test_null_max_cos_is_deterministic():
    assert null_max_cos.__wrapped__(300, 200) == null_max_cos.__wrapped__(300, 200)
    # docs/METHOD.md: about 0.06 for m = 4096.
    assert math.isclose(null_max_cos(4096, 4096), 0.06, abs_tol=0.005)


@pytest.mark.parametrize("shape", [(80, 50), (50, 80), (64, 64)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_compare_agrees_with_float64_oracle(shape, side):
    w0 = oracle.separated(*shape, RNG)
    # A moderate update along new directions: some top vectors rotate, some stay.
    w = w0 + 0.8 * np.outer(RNG.standard_normal(shape[0]), RNG.standard_normal(shape[1])) / math.sqrt(shape[1])
    s_ref, mc_ref, arg_ref, block_ref = oracle.max_cos(w0, w, side)
    base = base_spectrum(_t(w0), (side,), backend="torch")
    result = compare_to_base(base, _t(w), settings(), w0=_t(w0))
    # fp32 singular values to 1e-5 of sigma_max.
    np.testing.assert_allclose(result.s, s_ref, atol=1e-5 * s_ref[0])
    np.testing.assert_allclose(base.s.numpy(), np.linalg.svd(w0, compute_uv=False), atol=1e-5 * s_ref[0])
    # Vectors are well defined (separated spectrum): max_cos to 1e-4, block to 1e-4.
    np.testing.assert_allclose(result.sides[side].max_cos, mc_ref, atol=1e-4)
    np.testing.assert_allclose(result.sides[side].block, block_ref, atol=1e-4)
    fro, rel, erank = oracle.delta_metrics(w0, w)
    assert result.delta_fro == pytest.approx(fro, rel=1e-5)
    assert result.delta_rel == pytest.approx(rel, rel=1e-5)
    assert result.delta_effective_rank == pytest.approx(erank, rel=1e-3)


@pytest.mark.parametrize(("dim", "n_vectors", "epsilon"), [(64, 64, 0.3), (96, 48, 0.35), (40, 20, 0.4)])
def test_null_intruder_probability_matches_random_vectors(dim: int, n_vectors: int, epsilon: float) -> None:
    from lorascale.numerics.metrics import null_intruder_probability

    # Brute force: random unit vectors against an explicit random orthonormal basis.
    rng = np.random.default_rng(7)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, n_vectors)))  # (dim, p)
    x = rng.standard_normal((20000, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    brute = float(np.mean(np.abs(x @ basis).max(axis=1) < epsilon))
    assert 0.02 < brute < 0.98  # a threshold where the probability is not trivially 0 or 1
    assert null_intruder_probability(dim, n_vectors, epsilon) == pytest.approx(brute, abs=0.03)
    assert null_intruder_probability(dim, n_vectors, 1.01) == 1.0
    assert null_intruder_probability(dim, n_vectors, 0.0) == 0.0
