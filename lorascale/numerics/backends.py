"""Which SVD backends exist, and which (device, backend, driver) a run uses: decided here and nowhere else.

Every backend is a module with the same two functions (one signature, whatever the backend):
`svd(matrix, *, driver) -> Decomposition` and `svdvals(matrix, *, driver) -> Tensor`, on the input's device
and in its dtype.  `driver` is the cuSOLVER driver; backends that do not call cuSOLVER's SVD ignore it.

- "torch" (numerics/torch_svd.py): torch.linalg; LAPACK on CPU, cuSOLVER `gesvd` on CUDA unless told.
- "cupy" (numerics/cupy_backend.py): cupy.linalg.svd on CUDA (cuSOLVER gesvd), for installations that
  prefer cupy's build of cuSOLVER.  Optional package, never imported before it runs.
- "gram" (numerics/gram.py): opt-in, never chosen automatically.  Eigendecomposition of the float64 Gram
  matrix of the short side; its accuracy is measured against float64 in benchmarks/svd_throughput.py.

"auto" is "torch" on every device: cupy calls the same cuSOLVER routine, so it buys nothing by default
(benchmarks/README.md has the measurements behind these choices).

`check()` validates names and combinations without looking at any hardware (a Ray driver runs it: the
GPUs may be on other machines); `resolve()` also settles "auto" and checks that this machine can honour
the request.  The CLI, compare() and every Ray worker go through these two functions.  Nothing here
imports torch or cupy at import time, so the CLI can take its choices from this table cheaply.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorascale.errors import OptionError

if TYPE_CHECKING:
    import torch

    from lorascale.numerics.decomposition import Decomposition

SvdFunction = Callable[..., "Decomposition"]
SvdvalsFunction = Callable[..., "torch.Tensor"]


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
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Compute:
    """Where and how a worker decomposes: a concrete device, a backend of BACKENDS, the cuSOLVER driver
    (None off CUDA)."""

    device: str
    backend: str
    driver: str | None


def cupy_available() -> bool:
    """True when cupy is installed; nothing is imported (importing cupy initialises CUDA)."""
    return _installed("cupy")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def check(device: str, backend: str, driver: str | None) -> None:
    """Refuse unknown names and contradictions, looking at no hardware; raises OptionError (exit 2).

    >>> check("cpu", "cupy", None)
    Traceback (most recent call last):
    ...
    lorascale.errors.OptionError: --backend cupy needs a CUDA device (use --device cuda, or --backend torch)
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise OptionError(f"unknown device {device!r}", fix=f"use {DEVICE_CHOICES}")
    if backend not in BACKEND_CHOICES:
        raise OptionError(f"unknown backend {backend!r}", fix=f"use one of {', '.join(BACKEND_CHOICES)}")
    if driver is not None and driver not in CUDA_DRIVERS:
        raise OptionError(f"unknown cuSOLVER driver {driver!r}", fix=f"use one of {', '.join(CUDA_DRIVERS)}")
    if backend != AUTO and BACKENDS[backend].cuda_only and device == "cpu":
        raise OptionError(f"--backend {backend} needs a CUDA device", fix="use --device cuda, or --backend torch")


def resolve(device: str, backend: str = AUTO, driver: str | None = None) -> Compute:
    """The concrete Compute for a request on this machine: "auto" settled, the device and the backend's
    package checked.  Takes the user's --device, --backend and driver; raises OptionError (exit 2).

    >>> resolve("cpu", "auto", "gesvdj")
    Compute(device='cpu', backend='torch', driver=None)
    """
    check(device, backend, driver)
    device = _resolve_device(device)
    chosen = AUTO_BACKEND if backend == AUTO else backend
    spec = BACKENDS[chosen]
    if spec.cuda_only and not _is_cuda(device):  # "auto" became the CPU here
        raise OptionError(f"--backend {chosen} needs a CUDA device, and this machine has none",
                          fix="use --backend torch, or run on a machine with a GPU")
    if spec.requires is not None and not _installed(spec.requires):
        raise OptionError(f"--backend {chosen} requested but {spec.requires} is not installed",
                          fix=f"pip install 'lorascale[{spec.requires}]', or use --backend torch")
    return Compute(device=device, backend=chosen, driver=(driver or DEFAULT_CUDA_DRIVER) if _is_cuda(device) else None)


def _resolve_device(device: str) -> str:
    import torch  # here, not at import: the CLI reads this module's names without paying for torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if _is_cuda(device):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device} requested but torch sees no CUDA device",
                              fix="use --device cpu, or install a CUDA build of torch")
        index = device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise OptionError(f"--device {device}, but torch sees {torch.cuda.device_count()} CUDA device(s)",
                              fix=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def backend_functions(backend: str) -> tuple[SvdFunction, SvdvalsFunction]:
    """(svd, svdvals) of a resolved backend name (see resolve()); OptionError for an unknown one."""
    spec = BACKENDS.get(backend)
    if spec is None:
        raise OptionError(f"unknown backend {backend!r}", fix=f"use one of {', '.join(BACKENDS)}")
    return spec.functions()
