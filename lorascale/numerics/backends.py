"""Which SVD backends exist: one table, and the functions of each.  Decisions about which backend a run
uses are not made here (execute/routes.py makes them); numerics/ is handed a resolved `Routes`.

Every backend is a module with the same three functions (one signature, whatever the backend), on the
input's device and in its dtype: `svd(matrix, *, driver) -> Decomposition`, `svdvals(matrix, *, driver)
-> Tensor` and `left_svd(matrix, *, driver) -> (U, S)` (what a left-side-only run needs: the Gram route then
skips V).  `driver` is the cuSOLVER driver; backends that do not call cuSOLVER's SVD ignore it.

- "torch" (numerics/torch_svd.py): torch.linalg; LAPACK on CPU, cuSOLVER `gesvd` on CUDA unless told.
- "cupy" (numerics/cupy_backend.py): cupy.linalg.svd on CUDA (cuSOLVER gesvd), for installations that
  prefer cupy's build of cuSOLVER.  Optional package, never imported before it runs.
- "gram" (numerics/gram.py): eigendecomposition of the float64 Gram matrix of the short side; its accuracy
  is measured against float64 in benchmarks/svd_throughput.py.

Nothing here imports torch or cupy at import time, so the CLI and request.py take their choices from this
table cheaply.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorascale.errors import OptionError, option

if TYPE_CHECKING:
    import torch

    from lorascale.numerics.decomposition import Decomposition

SvdFunction = Callable[..., "Decomposition"]
SvdvalsFunction = Callable[..., "torch.Tensor"]
LeftSvdFunction = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Backend:
    """One SVD backend: the module holding its `svd` and `svdvals`, and what it needs to run."""

    module: str
    cuda_only: bool = False
    requires: str | None = None  # an optional package it imports (checked with importlib.util, not imported)
    family: str = "svd"  # backends of one family agree to rounding (store/svd_cache.py keys cached base SVDs by it)

    def functions(self) -> tuple[SvdFunction, SvdvalsFunction]:
        """(svd, svdvals) of this backend, importing its module on first use."""
        module = importlib.import_module(self.module)
        return module.svd, module.svdvals

    def left_function(self) -> LeftSvdFunction:
        """left_svd of this backend: (U, S) without V."""
        return importlib.import_module(self.module).left_svd


BACKENDS: dict[str, Backend] = {
    "torch": Backend("lorascale.numerics.torch_svd"),
    "cupy": Backend("lorascale.numerics.cupy_backend", cuda_only=True, requires="cupy"),
    "gram": Backend("lorascale.numerics.gram", family="gram"),
}
AUTO = "auto"
AUTO_BACKEND = "torch"
BACKEND_CHOICES = (AUTO, *BACKENDS)  # what --backend accepts
CUDA_DRIVERS = ("gesvd", "gesvdj", "gesvda")  # what --driver / driver= accepts
DEFAULT_CUDA_DRIVER = "gesvd"
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"  # --device is free-form because of the index


@dataclass(frozen=True)
class Routes:
    """Which backend (a name of BACKENDS) computes each quantity of a comparison, and why (execute/routes.py
    decides; the manifest records it)."""

    base: str  # SVD of W0: its singular values and the vectors of the requested sides
    tuned: str  # SVD of each tuned W: exact mode, and topk's fallback where its guard fails
    delta: str  # singular values of dW = W - W0 (full fine-tunes, DoRA)
    reason: str  # "--backend X", "auto: CUDA", "auto: fp64 ...", "auto: CPU table (mkl)", ...
    blas: str = ""  # the BLAS/LAPACK torch was built with (CPU), as torch reports it
    probe: dict | None = None  # the run-time probe's figures, in routes pinned from a run of an earlier version

    @classmethod
    def uniform(cls, backend: str, reason: str, *, blas: str = "") -> Routes:
        """Every quantity on `backend`."""
        return cls(base=backend, tuned=backend, delta=backend, reason=reason, blas=blas)


def cupy_available() -> bool:
    """True when cupy is installed; nothing is imported (importing cupy initialises CUDA)."""
    return installed("cupy")


def installed(package: str) -> bool:
    """Whether an optional package is importable, without importing it."""
    return importlib.util.find_spec(package) is not None


def backend_functions(backend: str) -> tuple[SvdFunction, SvdvalsFunction]:
    """(svd, svdvals) of a resolved backend name; OptionError for an unknown one."""
    return _spec(backend).functions()


def backend_left_function(backend: str) -> LeftSvdFunction:
    """left_svd of a resolved backend name; OptionError for an unknown one."""
    return _spec(backend).left_function()


def _spec(backend: str) -> Backend:
    spec = BACKENDS.get(backend)
    if spec is None:
        raise OptionError(f"unknown {option('backend', str(backend))}", fix=f"use one of {', '.join(BACKENDS)}")
    return spec
