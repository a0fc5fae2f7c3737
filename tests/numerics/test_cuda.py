"""Every CUDA path against the float64 numpy oracle (tests/oracle.py): each SVD route (torch gesvd, gesvdj,
gesvda, cupy, the Gram + eigh route) in fp32 and fp64, the comparison of a full fine-tune and of an
adapter, and the pipeline end to end with --device cuda.  Marked `gpu`; skipped where torch sees no CUDA
(benchmarks/gpu_check.py runs them first on a GPU machine).

Tolerances (docs/METHOD.md, "Accuracy"): singular values to 1e-5 * sigma_1 in fp32, 1e-10 in fp64.  Singular vectors are
only as well defined as the gap to their neighbours, so max_cos and the similarity block are compared
with C * unit roundoff * sigma_1 / gap (Wedin's bound, C = 10), from the gaps the oracle finds, as in
tests/test_formats.py; on the separated matrices used here that is <= 1e-4 in fp32 for the top vectors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import checkpoints
import oracle
from runs import settings
from lorascale.numerics.backends import cupy_available
from lorascale.numerics.compare import base_spectrum, compare_to_base
from lorascale.numerics.metrics import lora_delta_singular_values
from lorascale.numerics.svd import svd, svdvals

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
UNIT = {"fp32": 2.0 ** -24, "fp64": 2.0 ** -53}
SIGMA_TOL = {"fp32": 1e-5, "fp64": 1e-10}
VECTOR_TOL = {"fp32": 1e-4, "fp64": 1e-9}  # 1 - |cos(u_j, u_ref_j)| on separated spectra
C = 10.0
K = 10
ROUTES = [  # (backend, driver): every way lorascale can decompose a CUDA tensor
    ("torch", "gesvd"), ("torch", "gesvdj"), ("torch", "gesvda"),
    pytest.param("cupy", None, marks=pytest.mark.skipif(not cupy_available(), reason="needs cupy")),
    ("gram", None),
]
SHAPES = [(96, 64), (64, 96), (80, 80), (300, 120)]


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _vector_tol(w0: np.ndarray, w: np.ndarray, precision: str) -> np.ndarray:
    """Per tuned vector: how far max_cos may be from the oracle's (Wedin; see the module docstring)."""
    s, s0 = np.linalg.svd(w, compute_uv=False), np.linalg.svd(w0, compute_uv=False)
    complement = w.shape[0] > w.shape[1]
    gaps, gaps0 = oracle.singular_value_gaps(s, complement), oracle.singular_value_gaps(s0, complement)
    return C * UNIT[precision] * (s[0] / gaps + s0[0] / gaps0.min())


# --- Every route, against the oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("backend, driver", ROUTES)
def test_svd_route_agrees_with_float64_oracle(backend, driver, precision):
    rng = np.random.default_rng(2024)
    for shape in SHAPES:
        w = oracle.separated(*shape, rng)
        u_ref, s_ref, vt_ref = oracle.svd(w)
        tensor = torch.from_numpy(w).to(device="cuda", dtype=DTYPES[precision])
        u, s, vh = svd(tensor, backend=backend, driver=driver)
        p = min(shape)
        assert (u.shape, s.shape, vh.shape) == ((shape[0], p), (p,), (p, shape[1]))
        assert u.is_cuda and u.dtype == tensor.dtype and s.dtype == tensor.dtype
        u, s, vh = _np(u), _np(s), _np(vh)
        atol = SIGMA_TOL[precision] * s_ref[0]
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=atol, err_msg=f"sigma {shape}")
        assert np.abs(np.sum(u * u_ref, axis=0)).min() >= 1 - VECTOR_TOL[precision], f"U {shape}"
        assert np.abs(np.sum(vh * vt_ref, axis=1)).min() >= 1 - VECTOR_TOL[precision], f"V {shape}"
        np.testing.assert_allclose(u.T @ u, np.eye(p), rtol=0, atol=100 * UNIT[precision] * p)
        np.testing.assert_allclose((u * s) @ vh, w, rtol=0, atol=10 * atol)
        values = svdvals(tensor, backend=backend, driver=driver)
        assert values.is_cuda
        np.testing.assert_allclose(_np(values), s_ref, rtol=0, atol=atol, err_msg=f"svdvals {shape}")


# --- The comparison of one matrix: full fine-tune and adapter -----------------------------------------------------


def _separated(rows: int, cols: int, seed: int) -> np.ndarray:
    """Geometric spectrum from 1 to 0.05 (tests/checkpoints.py): every gap >= 4% of its value, so the
    Wedin tolerance of every vector stays below ~1e-3 in fp32."""
    return checkpoints.separated(rows, cols, torch.Generator().manual_seed(seed)).numpy()


def _full_update(w0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small dense change plus a weak change along W0's own top directions: no intruders expected."""
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    return 1e-3 * rng.standard_normal(w0.shape) + (u[:, :4] * (0.03 * s[:4])) @ vt[:4]


def _adapter(shape: tuple[int, int], r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """A (r, n), B (m, r), scale: s * B @ A has strong singular values along random directions (intruders)."""
    a = np.linalg.qr(rng.standard_normal((shape[1], r)))[0].T
    b = np.linalg.qr(rng.standard_normal((shape[0], r)))[0] * np.array([20.0, 16.0, 13.0, 11.0][:r])
    return a, b, 0.5


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("backend, driver", ROUTES)
@pytest.mark.parametrize("update", ["full", "lora"])
def test_compare_on_cuda_agrees_with_oracle(update, backend, driver, precision):
    rng = np.random.default_rng(7)
    w0 = _separated(120, 80, seed=7)
    dtype = DTYPES[precision]
    cuda = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to("cuda", dtype)  # noqa: E731
    base = base_spectrum(cuda(w0), ("left", "right"), driver=driver, backend=backend)
    if update == "full":
        w = w0 + _full_update(w0, rng)
        got = compare_to_base(base, cuda(w), settings(backend, driver=driver), w0=cuda(w0))
        delta_s = np.linalg.svd(w - w0, compute_uv=False)
    else:
        a, b, scale = _adapter(w0.shape, 4, rng)
        w = w0 + scale * b @ a
        delta = lora_delta_singular_values(cuda(a), cuda(b), scale)
        assert delta.is_cuda
        delta_s = np.linalg.svd(scale * b @ a, compute_uv=False)[:4]
        np.testing.assert_allclose(_np(delta), delta_s, rtol=0, atol=SIGMA_TOL[precision] * delta_s[0])
        got = compare_to_base(base, cuda(w), settings(backend, driver=driver), delta_singular_values=delta)
    s_ref = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(got.s, s_ref, rtol=0, atol=SIGMA_TOL[precision] * s_ref[0])
    assert got.delta_fro == pytest.approx(float(np.linalg.norm(delta_s)), rel=SIGMA_TOL[precision])
    assert got.delta_effective_rank == pytest.approx(oracle.effective_rank(delta_s), rel=1e-3)
    tol = _vector_tol(w0, w, precision)
    for side in ("left", "right"):
        _, max_cos, _, block = oracle.max_cos(w0, w, side)
        np.testing.assert_array_less(np.abs(got.sides[side].max_cos - max_cos), tol + 1e-12, err_msg=side)
        cell_tol = np.broadcast_to(tol[:K, None], block.shape)
        np.testing.assert_array_less(np.abs(got.sides[side].block - block), cell_tol + 1e-12, err_msg=side)
        assert got.sides[side].max_cos[:K].min() > 0  # not vacuous: every top vector was compared
    intruders = int((got.sides["left"].max_cos[:K] < 0.5).sum())
    assert intruders == oracle.intruders(w0, w, K, 0.5)
    assert (intruders == 0) if update == "full" else (intruders >= 3)  # the paper's effect, planted
    assert tol[:K].max() < (1e-3 if precision == "fp32" else 1e-10)  # tight where intruders are counted


@pytest.mark.parametrize("backend, driver", [("torch", "gesvd"), ("gram", None)])
def test_topk_mode_on_cuda_agrees_with_oracle(backend, driver):
    rng = np.random.default_rng(11)
    w0 = _separated(200, 150, seed=11)
    a, b, scale = _adapter(w0.shape, 4, rng)
    w = w0 + scale * b @ a
    cuda = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to("cuda", torch.float32)  # noqa: E731
    base = base_spectrum(cuda(w0), ("left",), driver=driver, backend=backend)
    delta = lora_delta_singular_values(cuda(a), cuda(b), scale)
    got = compare_to_base(base, cuda(w), settings(backend, driver=driver, top_k=16), delta_singular_values=delta)
    assert got.top_check is not None and got.top_check.passed
    _, max_cos, _, _ = oracle.max_cos(w0, w, "left")
    tol = _vector_tol(w0, w, "fp32")
    np.testing.assert_array_less(np.abs(got.sides["left"].max_cos[:16] - max_cos[:16]), tol[:16] + 1e-12)
    assert np.isnan(got.sides["left"].max_cos[16:]).all()


# --- The pipeline end to end on CUDA -----------------------------------------------------------------------------


def _read(out, table: str) -> list[dict]:
    import pyarrow.dataset as ds

    return ds.dataset(out / table, format="parquet").to_table().to_pylist()


def _check_tables(out, base_dir, tuned: dict, precision: str, top_k: int | None = None) -> int:
    """Every tuned row of the run's tables against the oracle; returns how many counts were unambiguous."""
    base = checkpoints.load_float64(base_dir)
    matrices = {(r["model"], r["matrix"]): r for r in _read(out, "matrices")}
    spectra: dict = {}
    for r in _read(out, "spectra"):
        if r["role"] == "tuned":
            spectra.setdefault((r["model"], r["matrix"]), []).append(r)
    expected = {}
    for reference, source in tuned.items():
        if isinstance(source, checkpoints.Adapter):
            tensors = checkpoints.load_float64(source.path)
            for module in source.scaling:
                name = f"{module}.weight"
                expected[reference, name] = base[name] + checkpoints.lora_delta(source, module, tensors)
        else:
            for name, w in checkpoints.load_float64(source).items():
                if w.ndim == 2 and ".layers." in name:
                    expected[reference, name] = w
    assert set(matrices) == set(expected)
    unambiguous = 0
    for (model, name), w in expected.items():
        w0 = base[name]
        rows = sorted(spectra[model, name], key=lambda r: r["rank"])
        s_ref, max_cos, _, _ = oracle.max_cos(w0, w, "left")
        np.testing.assert_allclose([r["sigma"] for r in rows], s_ref, rtol=0, atol=SIGMA_TOL[precision] * s_ref[0])
        got = np.array([np.nan if r["max_cos"] is None else r["max_cos"] for r in rows])
        tol = _vector_tol(w0, w, precision)
        q = top_k or len(rows)
        np.testing.assert_array_less(np.abs(got[:q] - max_cos[:q]), tol[:q] + 1e-12, err_msg=f"{model} {name}")
        lo, hi = int((max_cos[:K] < 0.5 - tol[:K]).sum()), int((max_cos[:K] < 0.5 + tol[:K]).sum())
        assert lo <= matrices[model, name]["intruders"] <= hi, f"intruders of {model} {name}"
        unambiguous += lo == hi
    return unambiguous


PIPELINE_SETTINGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"precision": "fp64"}, id="fp64"),
    pytest.param({"driver": "gesvdj"}, id="gesvdj"),
    pytest.param({"backend": "gram"}, id="gram"),
    pytest.param({"backend": "cupy"}, id="cupy", marks=pytest.mark.skipif(not cupy_available(), reason="needs cupy")),
    pytest.param({"mode": "topk", "top_k": 12}, id="topk"),
]


@pytest.mark.parametrize("settings", PIPELINE_SETTINGS)
def test_pipeline_on_cuda_agrees_with_oracle(llama, tmp_path, settings):
    from runs import compare

    base, full, lora = llama.base["fp16"], llama.tuned["fp16"], llama.lora
    tuned = {str(full): full, str(lora.path): lora}
    compare(str(base), list(tuned), tmp_path / "out", device="cuda", use_cache=False, **settings)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["device"].startswith("cuda")
    precision = settings.get("precision", "fp32")
    unambiguous = _check_tables(tmp_path / "out", base, tuned, precision, settings.get("top_k"))
    assert unambiguous >= len(tuned) * 7  # most counts are exact, so the check cannot pass vacuously
    counts = {u: sum(r["intruders"] for r in _read(tmp_path / "out", "matrices") if r["update"] == u)
              for u in ("full", "lora")}
    assert counts["full"] == 0 and counts["lora"] > 0, counts


def test_cli_run_with_device_cuda_and_cache(llama, tmp_path):
    """`lorascale run --device cuda`, twice on one cache: the second run reads the base SVDs back onto the
    GPU and writes the same counts."""
    from click.testing import CliRunner

    from lorascale.cli import main

    base, lora = llama.base["bf16"], llama.lora
    counts = []
    for run in ("cold", "warm"):
        out = tmp_path / run
        result = CliRunner().invoke(main, ["run", "--base", str(base), "--tuned", str(lora.path), "--out", str(out),
                                           "--device", "cuda", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["device"].startswith("cuda")
        _check_tables(out, base, {str(lora.path): lora}, "fp32")
        counts.append({r["matrix"]: r["intruders"] for r in _read(out, "matrices")})
    assert counts[0] == counts[1]
    assert any((tmp_path / "cache").rglob("*.safetensors"))
