"""Every SVD backend against the float64 numpy oracle, at stated tolerances; CUDA ones skip without CUDA."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import oracle
from lorascale.errors import OptionError
from lorascale.numerics.backends import BACKENDS, Routes, backend_functions, cupy_available
from lorascale.request import Execution
from runs import resolved as resolve
from lorascale.numerics.svd import svd, svdvals

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(4321)
SHAPES = [(96, 64), (64, 96), (80, 80)]
# Tolerances relative to sigma_max: fp32 rounding (~6e-8) times a modest growth factor; fp64 likewise.
SIGMA_TOL = {torch.float32: 2e-5, torch.float64: 1e-11}
# Singular vectors of a separated spectrum (oracle.separated): |cos(u_j, u_ref_j)| >= 1 - tol.
VECTOR_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check_against_oracle(w: np.ndarray, backend: str, dtype: torch.dtype, device: str = "cpu",
                          driver: str | None = None) -> None:
    u_ref, s_ref, vt_ref = oracle.svd(w)
    tensor = torch.from_numpy(w).to(device=device, dtype=dtype)
    u, s, vh = svd(tensor, backend=backend, driver=driver)
    p = min(w.shape)
    assert u.shape == (w.shape[0], p) and s.shape == (p,) and vh.shape == (p, w.shape[1])
    assert u.dtype == dtype and u.device == tensor.device
    u, s, vh = (x.cpu().double().numpy() for x in (u, s, vh))
    np.testing.assert_allclose(s, s_ref, atol=SIGMA_TOL[dtype] * s_ref[0])
    # Signs are arbitrary: compare |cos| of matching vectors.
    assert np.abs(np.sum(u * u_ref, axis=0)).min() >= 1 - VECTOR_TOL[dtype]
    assert np.abs(np.sum(vh * vt_ref, axis=1)).min() >= 1 - VECTOR_TOL[dtype]
    np.testing.assert_allclose((u * s) @ vh, w, atol=10 * SIGMA_TOL[dtype] * s_ref[0])
    values = svdvals(torch.from_numpy(w).to(device=device, dtype=dtype), backend=backend, driver=driver)
    np.testing.assert_allclose(values.cpu().double().numpy(), s_ref, atol=SIGMA_TOL[dtype] * s_ref[0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["torch", "gram"])
def test_cpu_backends_agree_with_float64_oracle(backend, dtype, shape):
    _check_against_oracle(oracle.separated(*shape, RNG), backend, dtype)


def test_gram_backend_orthonormal_on_rank_deficient_input():
    # Rank 5 of 40: A V / S is undefined for the 35 zero singular values; the QR step must still give an
    # orthonormal U whose first 5 columns are the true ones.
    left = np.linalg.qr(RNG.standard_normal((60, 5)))[0]
    right = np.linalg.qr(RNG.standard_normal((40, 5)))[0]
    w = (left * np.array([5.0, 4.0, 3.0, 2.0, 1.0])) @ right.T
    u, s, _ = svd(torch.from_numpy(w), backend="gram")
    np.testing.assert_allclose(u.T @ u, np.eye(40), atol=1e-10)
    np.testing.assert_allclose(s[:5].numpy(), [5, 4, 3, 2, 1], rtol=1e-10)
    assert np.abs(s[5:].numpy()).max() < 1e-6
    assert np.abs(np.sum(u[:, :5].numpy() * left, axis=0)).min() > 1 - 1e-10


def test_backend_and_driver_resolution():
    cpu = resolve("cpu", "auto", None)
    assert (cpu.device, cpu.backend, cpu.driver) == ("cpu", "torch", None)  # routes: tests/numerics/test_routes.py
    assert resolve("cpu", "gram", None).backend == "gram"
    assert resolve("cpu", "auto", "gesvdj").driver is None  # CPU has no cuSOLVER
    if torch.cuda.is_available():
        cuda = resolve("cuda", "auto", None)
        assert (cuda.device, cuda.backend, cuda.driver) == ("cuda", "torch", "gesvd")  # not torch's gesvdj default
        assert cuda.routes == Routes.uniform("torch", "auto: CUDA")  # GPU defaults unchanged
        assert resolve("cuda:0", "torch", "gesvdj").driver == "gesvdj"


# Every way a (device, backend, driver) request can be wrong on a machine without CUDA: (request, message).
BAD_REQUESTS = [
    (("tpu", "auto", None), "unknown device"),
    (("cuda:x", "auto", None), "unknown device"),
    (("cpu", "magma", None), "unknown backend"),
    (("cpu", "auto", "gesdd"), "unknown cuSOLVER driver"),
    (("cpu", "cupy", None), "needs a CUDA device"),
]
if not torch.cuda.is_available():
    BAD_REQUESTS += [(("cuda", "auto", None), "no CUDA device"), (("cuda:1", "torch", "gesvd"), "no CUDA device"),
                     (("auto", "cupy", None), "needs a CUDA device")]
else:
    BAD_REQUESTS += [((f"cuda:{torch.cuda.device_count()}", "auto", None), "CUDA device")]


@pytest.mark.parametrize("request_, message", BAD_REQUESTS)
def test_every_bad_request_is_an_option_error(request_, message):
    with pytest.raises(OptionError, match=message) as raised:
        resolve(*request_)  # by name (request.Execution), then on this machine (execute/routes.resolve)
    assert raised.value.exit_code == 2


def test_names_are_checked_without_hardware():
    """What a request checks (and so a Ray driver without GPUs): names and contradictions only."""
    Execution(device="cuda:3", backend="cupy", driver="gesvdj")  # may be fine on the workers
    with pytest.raises(OptionError, match="needs a CUDA device"):
        Execution(device="cpu", backend="cupy")


def test_backend_table_has_one_signature():
    for name in BACKENDS:
        decompose, values = backend_functions(name)
        for function in (decompose, values):
            parameters = inspect.signature(function).parameters
            assert list(parameters) == ["matrix", "driver"], (name, function)
            assert parameters["driver"].kind is inspect.Parameter.KEYWORD_ONLY


def test_core_imports_without_cupy():
    # cupy is detected with importlib and imported only when the cupy backend runs.
    import subprocess
    import sys

    code = ("import sys, lorascale.pipeline, lorascale.analyses.compare, lorascale.numerics.backends as b; "
            "from lorascale.execute.routes import resolve; from lorascale.analyses.options import JobOptions; "
            "resolve(JobOptions(device='cpu', backend='auto')); b.cupy_available(); assert 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_reads_the_backend_table_without_torch():
    import subprocess
    import sys

    code = ("import sys, lorascale.cli, lorascale.numerics.backends, lorascale.request, lorascale.cli.flags; "
            "assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("driver", ["gesvd", "gesvdj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cuda_agrees_with_float64_oracle(driver, dtype):
    for shape in SHAPES:
        _check_against_oracle(oracle.separated(*shape, RNG), "torch", dtype, device="cuda", driver=driver)


@pytest.mark.gpu
@needs_cuda
def test_gram_backend_on_cuda_agrees_with_float64_oracle():
    _check_against_oracle(oracle.separated(96, 64, RNG), "gram", torch.float32, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not cupy_available(), reason="needs cupy")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cupy_agrees_with_float64_oracle(dtype):
    for shape in SHAPES:
        _check_against_oracle(oracle.separated(*shape, RNG), "cupy", dtype, device="cuda")
