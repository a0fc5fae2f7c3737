"""Which SVD backends exist, and which (device, backend, driver) a run uses: decided here and nowhere else.

Every backend is a module with the same two functions (one signature, whatever the backend):
`svd(matrix, *, driver) -> Decomposition` and `svdvals(matrix, *, driver) -> Tensor`, on the input's device
and in its dtype.  `driver` is the cuSOLVER driver; backends that do not call cuSOLVER's SVD ignore it.

- "torch" (numerics/torch_svd.py): torch.linalg; LAPACK on CPU, cuSOLVER `gesvd` on CUDA unless told.
- "cupy" (numerics/cupy_backend.py): cupy.linalg.svd on CUDA (cuSOLVER gesvd), for installations that
  prefer cupy's build of cuSOLVER.  Optional package, never imported before it runs.
- "gram" (numerics/gram.py): eigendecomposition of the float64 Gram matrix of the short side; its accuracy
  is measured against float64 in benchmarks/svd_throughput.py.

Every backend also has `left_svd(matrix, *, driver) -> (U, S)`: what a left-side-only run needs (the Gram
route then skips V).  A run routes each quantity to a backend (`Routes`): the base SVD, the tuned SVD
(exact mode), the tuned singular values (topk mode) and dW's singular values.  An explicit --backend
routes everything there.  "auto":
- CUDA: "torch" everywhere (cupy calls the same cuSOLVER routine; no GPU figures chose anything else yet).
- CPU, fp32: `cpu_routes()`, a fixed table keyed by the BLAS torch was built with, so that two runs of one
  comparison on one machine always decide alike (no timing at run time): with MKL the float64 Gram routes
  for the vectors (base and tuned, left side only) and for the values (tuned singular values, dW's;
  rectangular matrices only, Routes.for_shape); with any other BLAS, LAPACK everywhere.  The figures
  behind the table are in benchmarks/README.md (benchmarks/cpu_routes.py).
- CPU, fp64: "torch" everywhere: the Gram routes' errors (~eps64 (s_1/s_j)) exceed fp64's tolerance.

`check()` validates names and combinations without looking at any hardware (a Ray driver runs it: the
GPUs may be on other machines); `resolve()` also settles "auto" and checks that this machine can honour
the request.  The CLI, compare() and every Ray worker go through these two functions.  Nothing here
imports torch or cupy at import time, so the CLI can take its choices from this table cheaply.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lorascale.errors import OptionError

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
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Routes:
    """Which backend (a name of BACKENDS) computes each quantity of a comparison, and why."""

    base: str  # SVD of W0: its singular values and the vectors of the requested sides
    tuned: str  # exact mode: SVD of each tuned W
    values: str  # topk mode: all singular values of each tuned W
    delta: str  # singular values of dW = W - W0 (full fine-tunes)
    reason: str  # "--backend X", "auto: CUDA", "auto: fp64 ...", "auto: CPU table (mkl)", ...
    blas: str = ""  # the BLAS/LAPACK torch was built with (CPU), as torch reports it
    probe: dict | None = None  # the run-time probe's figures, in routes pinned from a run of an earlier version

    @classmethod
    def uniform(cls, backend: str, reason: str, *, blas: str = "") -> Routes:
        return cls(base=backend, tuned=backend, values=backend, delta=backend, reason=reason, blas=blas)

    def for_shape(self, rows: int, cols: int) -> Routes:
        """The routes for one (rows, cols) matrix.  auto's CPU Gram values route applies to rectangular
        matrices only (aspect ratio >= SQUARE_VALUES_RATIO): LAPACK's values-only SVD of a square matrix
        skips the QR step that makes it slow on rectangular ones, and measured faster than the Gram route
        at 4096 x 4096 (1.5x) while slower at 11008 x 4096 and 4096 x 11008 (0.82-0.84; MKL, idle machine,
        benchmarks/results/cpu_routes-llama-quiet.md).  Everything else is the same for every shape."""
        square = max(rows, cols) < SQUARE_VALUES_RATIO * min(rows, cols)
        if not square or not is_cpu_auto(self.reason) or "gram" not in (self.values, self.delta):
            return self
        return replace(self, values=AUTO_BACKEND, delta=AUTO_BACKEND)

    def describe(self) -> dict:
        """What the manifest records (manifest.json "routes")."""
        record = {"base": self.base, "tuned": self.tuned, "values": self.values, "delta": self.delta,
                  "reason": self.reason}
        if is_cpu_auto(self.reason) and "gram" in (self.values, self.delta):
            record["values_rule"] = (f"values and delta on {self.values}/{self.delta} for matrices with aspect "
                                     f"ratio >= {SQUARE_VALUES_RATIO:g}, else {AUTO_BACKEND}")
        if self.blas:
            record["blas"] = self.blas
        if self.probe is not None:
            record["probe"] = self.probe
        return record


@dataclass(frozen=True)
class Compute:
    """Where and how a worker decomposes: a concrete device, a backend of BACKENDS, the cuSOLVER driver
    (None off CUDA), and the backend of each quantity."""

    device: str
    backend: str
    driver: str | None
    routes: Routes | None = None


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


def resolve(device: str, backend: str = AUTO, driver: str | None = None, *, precision: str = "fp32",
            sides: tuple[str, ...] = ("left",), pinned: Routes | None = None) -> Compute:
    """The concrete Compute for a request on this machine: "auto" settled (routes included, see the module
    doc), the device and the backend's package checked.  Takes the user's --device, --backend, driver,
    --precision and sides; raises OptionError (exit 2).

    `pinned`: CPU routes "auto" already settled for this run (by the Ray driver for all its workers, or by
    the run being resumed, from its manifest), used instead of probing again, so that one run's numbers
    never depend on which process, or which session, computed them.  Ignored off the CPU.

    >>> resolve("cpu", "torch", "gesvdj").backend
    'torch'
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
    if backend != AUTO:
        routes = Routes.uniform(chosen, f"--backend {chosen}")
    elif _is_cuda(device):
        routes = Routes.uniform(chosen, "auto: CUDA")
    elif precision != "fp32":
        routes = Routes.uniform(chosen, f"auto: {precision} (Gram routes are not accurate to its tolerance)",
                                blas=blas_info())
    elif pinned is not None and is_cpu_auto(pinned.reason):
        routes = pinned
    else:
        routes = cpu_routes(left_only=tuple(sides) == ("left",))
    return Compute(device=device, backend=chosen, driver=(driver or DEFAULT_CUDA_DRIVER) if _is_cuda(device) else None,
                   routes=routes)


PROBE_REASON = "auto: probe"  # routes timed by a run-time probe (runs written before the CPU table)
TABLE_REASON = "auto: CPU table"
# Aspect ratio from which the Gram values route is used (Routes.for_shape).
SQUARE_VALUES_RATIO = 2.0


def is_cpu_auto(reason: str) -> bool:
    """Whether routes with this reason were settled by "auto" for a CPU at fp32 (this table, or the probe of
    earlier versions): the routes a Ray driver pins for its workers and a resumed run keeps."""
    return reason.startswith((TABLE_REASON, PROBE_REASON))


def pinned_routes(record: object) -> Routes | None:
    """The Routes of a manifest's "routes" record when "auto" settled them for a CPU (what a resumed run
    reuses); None for anything else, including records from other versions that do not fit."""
    if not isinstance(record, dict) or not is_cpu_auto(str(record.get("reason", ""))):
        return None
    quantities = [record.get(name) for name in ("base", "tuned", "values", "delta")]
    if not all(q in BACKENDS and not BACKENDS[q].cuda_only for q in quantities):
        return None
    probe = record.get("probe")
    return Routes(*quantities, reason=str(record["reason"]), blas=str(record.get("blas", "")),
                  probe=probe if isinstance(probe, dict) else None)


def blas_family(blas: str) -> str:
    """"mkl", "openblas" or "other", from blas_info()'s text."""
    text = blas.lower()
    if "blas=mkl" in text or "math kernel library" in text:
        return "mkl"
    if "openblas" in text:
        return "openblas"
    return "other"


def cpu_routes(*, left_only: bool = True, blas: str | None = None) -> Routes:
    """The CPU routes of "auto" at fp32: a fixed table keyed by the BLAS torch was built with.

    The same software on the same machine always gets the same routes, whatever ran before, whatever the
    working directory, environment or cache: the two routes round differently in fp32, so a decision that
    depended on a timing (as a run-time probe's does on a loaded machine) could make two runs of one
    comparison disagree.  The table comes from measurements at Llama shapes (benchmarks/cpu_routes.py,
    benchmarks/README.md):
    - MKL: the Gram route for the vectors of a left-side run (0.28-0.92 of LAPACK's time) and for the
      singular values of rectangular matrices (Routes.for_shape; LAPACK's values-only SVD is faster on
      square ones); LAPACK for right-side vectors (the Gram route would need V as well).
    - any other BLAS (OpenBLAS, ...): LAPACK everywhere, never slower than LAPACK by construction.
    """
    blas = blas_info() if blas is None else blas
    family = blas_family(blas)
    vectors = "gram" if family == "mkl" and left_only else "torch"
    values = "gram" if family == "mkl" else "torch"
    reason = f"{TABLE_REASON} ({family}{'' if left_only else '; both sides: vectors on LAPACK'})"
    return Routes(base=vectors, tuned=vectors, values=values, delta=values, reason=reason, blas=blas)


@functools.lru_cache(maxsize=1)
def blas_info() -> str:
    """The BLAS and LAPACK torch was built with, e.g. "blas=mkl lapack=mkl (Intel(R) oneAPI Math Kernel ...)"."""
    import torch

    config = torch.__config__.show()
    found = dict(re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", config))
    library = next((line.strip(" -") for line in config.splitlines()
                    if "Math Kernel Library" in line or "OpenBLAS" in line), "")
    text = f"blas={found.get('BLAS_INFO', '?')} lapack={found.get('LAPACK_INFO', '?')}"
    return f"{text} ({library})" if library else text


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
    return _spec(backend).functions()


def backend_left_function(backend: str) -> LeftSvdFunction:
    """left_svd of a resolved backend name; OptionError for an unknown one."""
    return _spec(backend).left_function()


def _spec(backend: str) -> Backend:
    spec = BACKENDS.get(backend)
    if spec is None:
        raise OptionError(f"unknown backend {backend!r}", fix=f"use one of {', '.join(BACKENDS)}")
    return spec
