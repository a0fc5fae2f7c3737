"""The per-quantity routes of "auto" on a CPU (numerics/backends.Routes, cpu_routes: a table, no timing) and the Gram routes they
may choose, against the float64 oracle at docs/METHOD.md's fp32 tolerances, ill-conditioned inputs included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import oracle
from runs import settings
from lorascale.numerics import gram
from lorascale.execute.routes import cpu_routes, describe
from lorascale.numerics.backends import Routes
from runs import resolved
from lorascale.numerics.compare import base_spectrum, compare_to_base

SIGMA_TOL = 1e-5  # docs/METHOD.md, fp32: of sigma_max
VECTOR_TOL = 1e-4  # docs/METHOD.md, fp32: max_cos and top-10 vectors


def _planted(rows: int, cols: int, s: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(s))))
    return (u * s) @ v.T


def _spectrum(p: int, kind: str) -> np.ndarray:
    """Separated top 12 (gaps of 10%) above a tail: `flat`, or decaying fast to 1e-9 (ill-conditioned),
    or exactly rank-deficient (half the values 0)."""
    top = 10.0 * 0.9 ** np.arange(12)
    tail = {"flat": np.linspace(2.5, 1.0, p - 12), "decaying": np.logspace(0, -9, p - 12),
            "deficient": np.r_[np.linspace(2.5, 1.0, p // 2 - 12), np.zeros(p - p // 2)]}[kind]
    return np.r_[top, tail]


def _sin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sin(angle) between matching unit columns, from the orthogonal part."""
    a = a / np.linalg.norm(a, axis=0)
    return np.linalg.norm(a - b * np.sum(a * b, axis=0), axis=0)


@pytest.mark.parametrize("shape", [(96, 96), (64, 160), (160, 64)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("kind", ["flat", "decaying", "deficient"])
def test_gram_left_svd_meets_the_fp32_tolerances(shape, kind):
    w = _planted(*shape, _spectrum(min(shape), kind), seed=sum(shape))
    u, s = gram.left_svd(torch.from_numpy(w).float())
    u0, s0, _ = oracle.svd(w.astype(np.float32))
    assert u.dtype == s.dtype == torch.float32 and u.shape == (shape[0], min(shape))
    u, s = u.double().numpy(), s.double().numpy()
    assert np.abs(s - s0).max() <= SIGMA_TOL * s0[0]
    assert _sin(u[:, :12], u0[:, :12]).max() <= VECTOR_TOL  # the separated top
    # Orthonormal to fp32 rounding whatever the conditioning (the tall case repairs its poor columns), so
    # max_cos over ALL base vectors keeps its meaning: it is at most 1, and the columns span what U0 spans.
    assert np.abs(u.T @ u - np.eye(u.shape[1])).max() <= 1e-5
    if kind != "deficient":  # (a rank-deficient tall matrix's U0 completes its range arbitrarily)
        principal_cosines = np.linalg.svd(u0.T @ u, compute_uv=False)
        assert principal_cosines.min() >= 1 - 1e-5


@pytest.mark.parametrize("kind", ["flat", "decaying", "deficient"])
def test_gram_values_keep_delta_metrics_within_tolerance(kind):
    w0 = oracle.separated(120, 80, np.random.default_rng(1))
    delta = _planted(120, 80, 0.1 * _spectrum(80, kind), seed=2)
    w = w0 + delta
    fro, rel, erank = oracle.delta_metrics(w0, w)
    base = base_spectrum(torch.from_numpy(w0).float(), ("left",), backend="gram")
    result = compare_to_base(base, torch.from_numpy(w).float(), settings("gram"), w0=torch.from_numpy(w0).float())
    reference = compare_to_base(base, torch.from_numpy(w).float(), settings("torch"), w0=torch.from_numpy(w0).float())
    assert result.delta_fro == pytest.approx(fro, rel=1e-5)
    assert result.delta_rel == pytest.approx(rel, rel=1e-5)
    assert result.delta_effective_rank == pytest.approx(erank, rel=1e-5)
    assert reference.delta_effective_rank == pytest.approx(erank, rel=1e-5)  # the LAPACK route, same tolerance


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)], ids=["tall", "wide"])
def test_gram_routes_reproduce_max_cos_and_intruders(shape):
    rng = np.random.default_rng(3)
    w0 = oracle.separated(*shape, rng)
    # Three intruders: new directions orthogonal to the base's top, above its sigma_1.
    x, _ = np.linalg.qr(rng.standard_normal((shape[0], 3)))
    y, _ = np.linalg.qr(rng.standard_normal((shape[1], 3)))
    w = w0 + (x * np.array([30.0, 25.0, 20.0])) @ y.T
    s, mc, _, block = oracle.max_cos(w0, w)
    base = base_spectrum(torch.from_numpy(w0).float(), ("left",), backend="gram")
    result = compare_to_base(base, torch.from_numpy(w).float(), settings("gram"), w0=torch.from_numpy(w0).float())
    side = result.sides["left"]
    np.testing.assert_allclose(result.s, s, atol=SIGMA_TOL * s[0])
    gaps = oracle.singular_value_gaps(s, complement=shape[0] > shape[1])
    well_defined = gaps > 1e-2 * s[0]
    np.testing.assert_allclose(side.max_cos[well_defined], mc[well_defined], atol=VECTOR_TOL)
    np.testing.assert_allclose(side.block, block, atol=VECTOR_TOL)
    assert int((side.max_cos[:10] < 0.5).sum()) == oracle.intruders(w0, w, 10, 0.5) == 3


MKL = "blas=mkl lapack=mkl (Intel(R) oneAPI Math Kernel Library Version 2024.2)"
OPENBLAS = "blas=open lapack=open (OpenBLAS 0.3.27)"


def _blas(monkeypatch, text: str) -> None:
    """Make this process's torch report `text` as its BLAS (what the CPU table is keyed by)."""
    from lorascale.execute import routes

    monkeypatch.setattr(routes, "blas_info", lambda: text)


def resolve(device: str, backend: str = "auto", *, precision: str = "fp32", side: str = "left",
            pinned: Routes | None = None):
    return resolved(device, backend, precision=precision, side=side, routes=pinned)


@pytest.mark.parametrize(("blas", "family", "vectors", "values"), [
    (MKL, "mkl", "gram", "gram"),
    (OPENBLAS, "openblas", "torch", "torch"),  # the Gram route measured slower there: LAPACK
    ("blas=generic lapack=generic", "other", "torch", "torch"),  # unknown: never slower than LAPACK
])
def test_auto_cpu_routes_follow_the_blas_table(monkeypatch, blas, family, vectors, values):
    _blas(monkeypatch, blas)
    routes = resolve("cpu", "auto").routes
    assert (routes.base, routes.tuned, routes.delta) == (vectors, vectors, values)
    assert routes.reason == f"auto: CPU table ({family})" and routes.blas == blas and routes.probe is None
    assert cpu_routes(blas=blas) == routes  # a pure function of the BLAS: nothing timed, nothing cached


def test_routes_outside_the_table(monkeypatch):
    _blas(monkeypatch, MKL)
    both = resolve("cpu", "auto", side="both").routes  # V needed too: vectors stay on LAPACK
    assert (both.base, both.tuned, both.delta) == ("torch", "torch", "gram")
    fp64 = resolve("cpu", "auto", precision="fp64").routes  # Gram errors exceed fp64's tolerance
    assert {fp64.base, fp64.tuned, fp64.delta} == {"torch"}
    for backend in ("torch", "gram"):  # an explicit backend keeps its meaning: every quantity there
        routes = resolve("cpu", backend).routes
        assert routes == Routes.uniform(backend, f"--backend {backend}")


def test_the_manifest_records_the_routes(monkeypatch, tmp_path):
    from checkpoints import finetuned, save_full, tiny_llama

    from runs import compare
    from lorascale.store.manifest import read_manifest

    _blas(monkeypatch, MKL)
    model = tiny_llama()
    save_full(model, tmp_path / "base")
    save_full(finetuned(model), tmp_path / "tuned")
    auto = compare(str(tmp_path / "base"), [str(tmp_path / "tuned")], tmp_path / "auto", device="cpu", use_cache=False)
    manual = compare(str(tmp_path / "base"), [str(tmp_path / "tuned")], tmp_path / "torch", device="cpu",
                     backend="torch", use_cache=False)
    recorded = json.loads((tmp_path / "auto" / "manifest.json").read_text())["routes"]
    assert recorded == read_manifest(tmp_path / "auto").routes == auto.manifest.routes
    assert (recorded["base"], recorded["tuned"], recorded["delta"]) == ("gram", "gram", "gram")
    assert recorded["reason"] == "auto: CPU table (mkl)" and recorded["blas"] == MKL
    assert manual.manifest.routes["reason"] == "--backend torch"
    import pyarrow.dataset as ds

    rows = {name: ds.dataset(tmp_path / name / "matrices").to_table().sort_by("matrix").to_pydict()
            for name in ("auto", "torch")}
    assert rows["auto"]["intruders"] == rows["torch"]["intruders"]
    np.testing.assert_allclose(rows["auto"]["delta_effective_rank"], rows["torch"]["delta_effective_rank"], rtol=1e-5)


def test_one_run_one_route_decision_for_every_ray_worker(monkeypatch):
    """The Ray driver decides once and every CPU worker uses its routes, whatever BLAS the worker's torch
    has: otherwise rows of one run would mix two decisions (different fp32 rounding)."""
    from lorascale.execute.local import LocalExecutor
    from lorascale.execute.ray_executor import RayExecutor
    from lorascale.analyses.options import JobOptions
    from lorascale.request import Analysis

    _blas(monkeypatch, OPENBLAS)  # the driver: LAPACK everywhere
    prepared = RayExecutor(workers=2).prepare(JobOptions(device="cpu", backend="auto"))
    assert (prepared.routes.base, prepared.routes.delta) == ("torch", "torch")
    _blas(monkeypatch, MKL)  # a worker's own table would say Gram
    worker = LocalExecutor().prepare(prepared)  # what each _MatrixWorker does with the driver's options
    assert worker.routes == prepared.routes
    # Off the CPU the pinned CPU routes do not apply; GPU workers never make the driver decide CPU routes.
    assert RayExecutor(workers=2, gpus_per_worker=1).prepare(JobOptions(device="auto", backend="auto")).routes is None
    for precision, backend in (("fp64", "auto"), ("fp32", "torch")):
        options = JobOptions(analysis=Analysis(precision=precision), backend=backend)
        assert RayExecutor(workers=2).prepare(options).routes is None


def test_a_resumed_run_keeps_the_routes_it_started_with(monkeypatch, tmp_path):
    """A run resumed by another torch (another BLAS: a new venv, another node) keeps its manifest's routes."""
    from checkpoints import finetuned, save_full, tiny_llama

    from runs import compare

    model = tiny_llama()
    save_full(model, tmp_path / "base")
    save_full(finetuned(model), tmp_path / "tuned")
    args = (str(tmp_path / "base"), [str(tmp_path / "tuned")], tmp_path / "out")
    _blas(monkeypatch, OPENBLAS)
    first = compare(*args, device="cpu", use_cache=False, include=["*layers.0.*"])
    assert first.manifest.routes["base"] == "torch"
    _blas(monkeypatch, MKL)  # this process's table would decide otherwise
    again = compare(*args, device="cpu", use_cache=False, include=["*layers.0.*"])
    assert again.manifest.resumed and again.manifest.routes == first.manifest.routes
    fresh = compare(*args, device="cpu", use_cache=False, include=["*layers.0.*"], overwrite=True)
    assert (fresh.manifest.routes["base"], fresh.manifest.routes["delta"]) == ("gram", "gram")


def test_routes_pinned_by_a_run_of_an_earlier_version_are_kept():
    """Runs written while a run-time probe decided ("auto: probe") resume with the probe's routes."""
    from lorascale.execute.routes import pinned_routes

    record = {"base": "gram", "tuned": "gram", "values": "torch", "delta": "torch", "reason": "auto: probe",
              "blas": MKL, "probe": {"size": 1024}}
    pinned = pinned_routes(record)
    assert pinned is not None and (pinned.base, pinned.delta, pinned.probe) == ("gram", "torch", {"size": 1024})
    assert resolve("cpu", "auto", pinned=pinned).routes == pinned
    assert pinned_routes({**record, "reason": "--backend gram"}) is None  # explicit choices are not pinned


_ROUTES_SCRIPT = """
import json
from lorascale.execute.routes import describe, resolve
from lorascale.analyses.options import JobOptions
print(json.dumps(describe(resolve(JobOptions(device="cpu", backend="auto")).routes)))
"""


def _routes_in_a_fresh_process(tmp_path, name: str, **env: str):
    import os
    import subprocess
    import sys

    home = tmp_path / name / "home"
    cwd = tmp_path / name / "cwd"
    home.mkdir(parents=True)
    cwd.mkdir()
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("LORASCALE_", "XDG_", "HF_"))} | {"HOME": str(home), **env}
    return subprocess.Popen([sys.executable, "-c", _ROUTES_SCRIPT], cwd=cwd, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_fresh_processes_started_at_once_decide_alike_whatever_their_environment(tmp_path):
    """From empty caches, in other working directories and environments, at the same time: one decision,
    the one this process makes, and nothing written anywhere to make it."""
    processes = [_routes_in_a_fresh_process(tmp_path, "a"),
                 _routes_in_a_fresh_process(tmp_path, "b", XDG_CACHE_HOME=str(tmp_path / "xdg"),
                                            LORASCALE_CACHE_DIR=str(tmp_path / "elsewhere"), OMP_NUM_THREADS="1")]
    decided = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        decided.append(json.loads(out))
    assert decided[0] == decided[1] == describe(resolve("cpu", "auto").routes)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written


def test_every_shape_gets_the_same_routes_in_a_run(monkeypatch, tmp_path):
    """The table decides per BLAS, not per shape (the Gram route measured faster at every Llama shape for
    vectors and dW's values): square and rectangular matrices of one run use the same routes."""
    from checkpoints import finetuned, save_full, tiny_llama
    from runs import compare

    from lorascale.numerics import spectral as compare_module  # dW's singular values (the delta route)

    _blas(monkeypatch, MKL)
    used = set()
    real = compare_module.svdvals

    def spy(matrix, *, driver=None, backend):
        used.add((tuple(matrix.shape), backend))
        return real(matrix, driver=driver, backend=backend)

    monkeypatch.setattr(compare_module, "svdvals", spy)
    model = tiny_llama()
    save_full(model, tmp_path / "base")
    save_full(finetuned(model), tmp_path / "tuned")
    compare(str(tmp_path / "base"), [str(tmp_path / "tuned")], tmp_path / "out", device="cpu", use_cache=False,
            include=["*layers.0.self_attn.q_proj*", "*layers.0.mlp.up_proj*"])
    assert used == {((64, 64), "gram"), ((128, 64), "gram")}
