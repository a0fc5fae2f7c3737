"""Where and how a run decomposes its matrices: every decision about device, backend, cuSOLVER driver and
the route of each quantity is made here and nowhere else, on the machine that computes (numerics/ is handed
the result, a `Routes` per matrix).

- `resolve(options)`: the JobOptions of a run settled for this machine: "auto" device and backend, the
  driver (CUDA only), the routes; OptionError (exit 2) for what this machine cannot honour.
- `cluster_routes(options, gpu_workers=...)`: a Ray driver's one decision for all its CPU workers.
- `pinned_routes(record)`: the routes a manifest records, which a resumed run keeps.
- `describe(routes)`: what the manifest records.

"auto":
- CUDA: "torch" everywhere (cupy calls the same cuSOLVER routine; no GPU figures chose anything else yet).
- CPU, fp32: `cpu_routes()`, a fixed table keyed by the BLAS torch was built with, so that two runs of one
  comparison on one machine always decide alike (no timing at run time): with MKL the float64 Gram routes
  for the vectors (base and tuned, left side only) and for dW's singular values; with any other BLAS,
  LAPACK everywhere.  The figures behind the table are in benchmarks/README.md (benchmarks/speed.py).
- CPU, fp64: "torch" everywhere: the Gram routes' errors (~eps64 (s_1/s_j)) exceed fp64's tolerance.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace

from lorascale.errors import OptionError, option
from lorascale.numerics.backends import AUTO, AUTO_BACKEND, BACKENDS, DEFAULT_CUDA_DRIVER, Routes, installed
from lorascale.analyses.options import JobOptions

PROBE_REASON = "auto: probe"  # routes timed by a run-time probe (runs written before the CPU table)
TABLE_REASON = "auto: CPU table"


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def resolve(options: JobOptions) -> JobOptions:
    """`options` settled for this machine: a concrete device, backend and driver (None off CUDA), and the
    routes ("auto" settled as the module doc says).  Raises OptionError (exit 2) when this machine cannot
    honour the request (no CUDA, cupy not installed).

    `options.routes`, when set to CPU routes "auto" settled for this run (by a Ray driver for all its
    workers, or by the run being resumed, from its manifest), are kept instead of deciding again, so that
    one run's numbers never depend on which process, or which machine, computed them.  Ignored off the CPU.
    """
    device = _resolve_device(options.device)
    chosen = AUTO_BACKEND if options.backend == AUTO else options.backend
    spec = BACKENDS[chosen]
    if spec.cuda_only and not is_cuda(device):  # "auto" became the CPU here
        raise OptionError(f"{option('backend', chosen)} needs a CUDA device, and this machine has none",
                          fix=f"use {option('backend', 'torch')}, or run on a machine with a GPU")
    if spec.requires is not None and not installed(spec.requires):
        raise OptionError(f"{option('backend', chosen)} requested but {spec.requires} is not installed",
                          fix=f"pip install 'lorascale[{spec.requires}]', or use {option('backend', 'torch')}")
    precision = options.analysis.precision
    pinned = options.routes
    if options.backend != AUTO:
        routes = Routes.uniform(chosen, f"--backend {chosen}")
    elif is_cuda(device):
        routes = Routes.uniform(chosen, "auto: CUDA")
    elif precision != "fp32":
        routes = Routes.uniform(chosen, f"auto: {precision} (Gram routes are not accurate to its tolerance)",
                                blas=blas_info())
    elif pinned is not None and is_cpu_auto(pinned.reason):
        routes = pinned
    else:
        routes = cpu_routes(left_only=options.analysis.sides == ("left",))
    driver = (options.driver or DEFAULT_CUDA_DRIVER) if is_cuda(device) else None
    return replace(options, device=device, backend=chosen, driver=driver, routes=routes)


def cluster_routes(options: JobOptions, *, gpu_workers: bool) -> Routes | None:
    """The routes a Ray driver decides once for all its CPU workers ("auto" at fp32 on CPUs: this machine's
    table), or None where each worker settles its own (GPU workers, fp64, an explicit backend, or routes a
    resumed run already pinned).  Workers with another BLAS would decide differently: one run, one decision."""
    if (options.routes is None and options.backend == AUTO and options.analysis.precision == "fp32"
            and options.device in ("cpu", AUTO) and not gpu_workers):
        return cpu_routes(left_only=options.analysis.sides == ("left",))
    return options.routes


def describe(routes: Routes) -> dict:
    """What the manifest records (manifest.json "routes")."""
    record = {"base": routes.base, "tuned": routes.tuned, "delta": routes.delta, "reason": routes.reason}
    if routes.blas:
        record["blas"] = routes.blas
    if routes.probe is not None:
        record["probe"] = routes.probe
    return record


def is_cpu_auto(reason: str) -> bool:
    """Whether routes with this reason were settled by "auto" for a CPU at fp32 (this table, or the probe of
    earlier versions): the routes a Ray driver pins for its workers and a resumed run keeps."""
    return reason.startswith((TABLE_REASON, PROBE_REASON))


def pinned_routes(record: object) -> Routes | None:
    """The Routes of a manifest's "routes" record when "auto" settled them for a CPU (what a resumed run
    reuses); None for anything else, including records from other versions that do not fit."""
    if not isinstance(record, dict) or not is_cpu_auto(str(record.get("reason", ""))):
        return None
    quantities = [record.get(name) for name in ("base", "tuned", "delta")]
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
    comparison disagree.  The table comes from both routes timed on real Llama-2-7B shapes (4096 x 4096,
    11008 x 4096, 4096 x 11008) with weight-like spectra (benchmarks/speed.py, benchmarks/README.md):
    - MKL: the Gram route for the vectors of a left-side run (0.37-1.0 of LAPACK's CPU time) and for dW's
      singular values (0.21-0.62), at every shape; LAPACK for right-side vectors (the Gram route would need
      V as well).
    - any other BLAS (OpenBLAS, ...): LAPACK everywhere, never slower than LAPACK by construction.
    """
    blas = blas_info() if blas is None else blas
    family = blas_family(blas)
    vectors = "gram" if family == "mkl" and left_only else "torch"
    values = "gram" if family == "mkl" else "torch"
    reason = f"{TABLE_REASON} ({family}{'' if left_only else '; both sides: vectors on LAPACK'})"
    return Routes(base=vectors, tuned=vectors, delta=values, reason=reason, blas=blas)


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
    import torch  # here, not at import: the CLI reads the tables without paying for torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if is_cuda(device):
        if not torch.cuda.is_available():
            raise OptionError(f"{option('device', device)} requested but torch sees no CUDA device",
                              fix=f"use {option('device', 'cpu')}, or install a CUDA build of torch")
        index = device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise OptionError(f"{option('device', device)}, but torch sees {torch.cuda.device_count()} CUDA "
                              "device(s)", fix=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
