"""A run request: every option of a comparison, each default and each check written once, here.

`RunRequest` is frozen and typed; its sub-records group the options by the stage that uses them:

    references  what to compare (base, tuned models with their labels, whether pickled .bin weights may be
                read, where a disk-light hub run downloads to)
    selection   which matrices (include / exclude globs, --rename rules)
    analysis    what is computed for each matrix (k, epsilon, side, precision, mode, top_k)
    execution   where and how (device, backend, driver, base-SVD cache, Ray)
    output      where the tables go, and how an existing run there is treated

The CLI (lorascale/cli) and the Python API (lorascale.compare) each build one with `build_request()` and
call `pipeline.compare(request)` / `pipeline.plan_run(request)`.  Field names are the keywords of
`lorascale.compare`; every check raises OptionError naming fields with errors.option(), which the CLI alone
spells as its flags (cli/flags.py).  Whether the machine can honour a device or backend is not known here:
execute/routes.py decides that, on the machine that computes.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lorascale.errors import OptionError, option
from lorascale.naming import name_references
from lorascale.numerics.backends import BACKEND_CHOICES, BACKENDS, CUDA_DRIVERS, DEVICE_CHOICES, Routes
from lorascale.records import NamedReference

Side = Literal["left", "right", "both"]
SIDES: dict[str, tuple[str, ...]] = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
PRECISIONS = ("fp32", "fp64")
MODES = ("topk", "exact")
RANK_MODES = ("r+intruders", "r", "auto")  # how mitigation writes dW' back (numerics/mitigate.py)
DEFAULT_TOP_K = 64  # tuned triplets a topk run computes unless told (or k, when larger): re-thresholding up to it
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_k(k: object, name: str = "k") -> int:
    """A count of top singular vectors: an int of at least 1 (bool is not one)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise OptionError(f"{option(name)} must be an integer of at least 1, got {k!r}")
    if k < 1:
        raise OptionError(f"{option(name)} must be at least 1, got {k}")
    return k


def check_epsilon(epsilon: object) -> float:
    """The intruder threshold on max |cos|: a number in (0, 1]."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 < float(epsilon) <= 1.0:
        raise OptionError(f"{option('epsilon')} must be in (0, 1], got {epsilon!r}")
    return float(epsilon)


def check_side(side: object) -> str:
    if side not in SIDES:
        raise OptionError(f"{option('side')} must be left, right or both, got {side!r}")
    return str(side)


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OptionError(f"{option(name)} must be {' or '.join(choices)}, got {value!r}")


def _patterns(name: str, value: object) -> tuple[str, ...]:
    """Globs or rules: one string, or a sequence of them (never a string taken letter by letter)."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise OptionError(f"{option(name)} must be a string or a list of strings, got {value!r}")
    return tuple(items)


def _optional_path(value: object) -> Path | None:
    return None if value is None or value == "" else Path(os.path.abspath(os.path.expanduser(str(value))))


@dataclass(frozen=True)
class References:
    """What to compare.  `base` and `tuned` are labelled (naming.py: `NAME=REF`, or the default short name)."""

    base: NamedReference
    tuned: tuple[NamedReference, ...]
    no_pickle: bool = False  # refuse pickled .bin weights (read otherwise with torch's restricted loader)
    scratch_dir: Path | None = None  # hub weight files go here instead of the hub cache, deleted once used

    def __post_init__(self) -> None:
        _flag("no_pickle", self.no_pickle)
        object.__setattr__(self, "scratch_dir", _optional_path(self.scratch_dir))

    @property
    def all(self) -> tuple[NamedReference, ...]:
        """The base first, then the tuned models in the order given."""
        return (self.base, *self.tuned)


@dataclass(frozen=True)
class Selection:
    """Which base matrices are analysed, and how tuned names map onto the base's."""

    include: tuple[str, ...] = ()  # globs on base tensor names; an include overrides the default exclusions
    exclude: tuple[str, ...] = ()  # globs on base tensor names; win over everything
    rename: tuple[str, ...] = ()  # FROM=TO regex rules applied in order to tuned names before matching

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "rename"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        from lorascale.plan.names import parse_renames

        parse_renames(self.rename)  # refuse a bad rule now, before anything is read

    @property
    def rules(self):
        """The parsed --rename rules (plan/names.py)."""
        from lorascale.plan.names import parse_renames

        return parse_renames(self.rename)


@dataclass(frozen=True)
class Analysis:
    """What is computed for every matrix of the run (docs/METHOD.md)."""

    k: int = 10  # top tuned singular vectors checked for intruders
    epsilon: float = 0.5  # intruder threshold on max |cos|
    side: Side = "left"  # singular vectors compared: left (output space, the paper's), right, or both
    precision: Literal["fp32", "fp64"] = "fp32"  # arithmetic of the decompositions; weights are read as stored
    mode: Literal["exact", "topk"] = "topk"  # topk: the top `top_k` tuned triplets, guarded; exact: all of them
    top_k: int | None = None  # tuned triplets a topk run computes; None: DEFAULT_TOP_K, or k when larger

    def __post_init__(self) -> None:
        check_k(self.k)
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        check_side(self.side)
        _choice("precision", self.precision, PRECISIONS)
        _choice("mode", self.mode, MODES)
        if self.top_k is not None:
            check_k(self.top_k, "top_k")
        if self.mode == "topk" and self.top_k is not None and self.top_k < self.k:
            raise OptionError(f"{option('top_k', self.top_k)} is below {option('k', self.k)}: intruders are "
                              "counted among the top k vectors", fix=f"use {option('top_k', self.k)} or more")

    @property
    def top_vectors(self) -> int:
        """The tuned triplets a topk run computes (and stores): top_k, else DEFAULT_TOP_K or k if larger."""
        return self.top_k if self.top_k is not None else max(DEFAULT_TOP_K, self.k)

    @property
    def sides(self) -> tuple[str, ...]:
        """("left",), ("right",) or ("left", "right"): the first is what `matrices.intruders` counts."""
        return SIDES[self.side]


@dataclass(frozen=True)
class Execution:
    """Where and how the matrices are decomposed, as asked for; execute/routes.py settles "auto"."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # a name of numerics/backends.BACKENDS, or auto (per-quantity routes)
    driver: str | None = None  # cuSOLVER driver on CUDA (gesvd unless told); not a CLI option
    cache_dir: Path | None = None  # base-SVD cache; None: settings.cache_dir() (Ray: each node's own)
    use_cache: bool = True  # read and write the base-SVD cache
    # bound on the cache's size in bytes (or "50GB", "500MiB"), least recently used entries evicted to keep
    # under it; None: settings.cache_max_size().  Not the run's identity: a resume with another bound is the same run
    cache_max_size: int | str | None = None
    ray_address: str | None = None  # run on Ray (auto, ray://host:10001, host:port, local); None: RAY_ADDRESS
    workers: int | None = None  # Ray workers; more than 1 starts a local Ray when no address is given
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise OptionError(f"unknown {option('device', str(self.device))}", fix=f"use {DEVICE_CHOICES}")
        if self.backend not in BACKEND_CHOICES:
            raise OptionError(f"unknown {option('backend', str(self.backend))}",
                              fix=f"use one of {', '.join(BACKEND_CHOICES)}")
        if self.driver is not None and self.driver not in CUDA_DRIVERS:
            raise OptionError(f"unknown cuSOLVER {option('driver', str(self.driver))}",
                              fix=f"use one of {', '.join(CUDA_DRIVERS)}")
        if self.backend in BACKENDS and BACKENDS[self.backend].cuda_only and self.device == "cpu":
            raise OptionError(f"{option('backend', self.backend)} needs a CUDA device",
                              fix=f"use {option('device', 'cuda')}, or {option('backend', 'torch')}")
        _flag("use_cache", self.use_cache)
        if self.cache_max_size is not None:
            from lorascale.sizes import parse_size

            try:
                object.__setattr__(self, "cache_max_size", parse_size(self.cache_max_size))
            except ValueError as exc:
                raise OptionError(f"{option('cache_max_size')}: {exc}", fix="e.g. 50GB or 500MiB") from None
        object.__setattr__(self, "cache_dir", _optional_path(self.cache_dir))
        for name, low, inclusive in (("workers", 1, True), ("cpus_per_worker", 0, False), ("gpus_per_worker", 0, True)):
            value = getattr(self, name)
            if value is None:
                continue
            integer = name == "workers"
            if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
                    or not math.isfinite(value) or value < low or (value == low and not inclusive)):
                bound = f"at least {low}" if inclusive else f"more than {low}"
                raise OptionError(f"{option(name)} must be {'an integer' if integer else 'a number'} {bound}, "
                                  f"got {value!r}")
        if self.device == "cpu" and self.gpus_per_worker:
            raise OptionError(f"{option('device', 'cpu')} contradicts {option('gpus_per_worker')}", fix="drop one")

    @property
    def wants_ray(self) -> bool:
        """Ray runs the job when an address is given (here or as RAY_ADDRESS) or more than one worker."""
        return self.address is not None or (self.workers or 1) > 1

    @property
    def address(self) -> str | None:
        """The Ray address: as given, else RAY_ADDRESS (settings.py)."""
        from lorascale import settings

        return self.ray_address or settings.ray_address()


@dataclass(frozen=True)
class Output:
    """Where the tables go, and what happens to a run already there."""

    out: Path
    overwrite: bool = False  # replace a different earlier run (only what lorascale wrote)
    resume: bool = False  # require an earlier run and continue it
    report: bool = False  # also write out/report/ (figures and index.html)
    series: bool | None = None  # draw the tuned models as a checkpoint series in the report (None: decide)

    def __post_init__(self) -> None:
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise OptionError(f"{option('out')} must be a directory path, got {self.out!r}")
        object.__setattr__(self, "out", Path(self.out))
        for name in ("overwrite", "resume", "report"):
            _flag(name, getattr(self, name))
        if self.series is not None and not self.report:
            raise OptionError(f"{option('series', self.series)} only shapes the report",
                              fix=f"add {option('report', True)}, or pass it to `lorascale report` later")


@dataclass(frozen=True)
class Mitigation:
    """How `lorascale mitigate` rewrites an adapter (docs/METHOD.md section 10): W' = W + (lambda - 1) times
    W's intruder components, written back as LoRA factors."""

    mitigation_lambda: float = 0.75  # what is kept of each intruder component: 0 removes it, 1 keeps it
    rank: str = "r+intruders"  # r+intruders: dW' exactly; r: truncated to the adapter's rank (peft); auto

    def __post_init__(self) -> None:
        value = self.mitigation_lambda
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise OptionError(f"{option('mitigation_lambda')} must be a finite number of at least 0, got {value!r}")
        object.__setattr__(self, "mitigation_lambda", float(value))
        _choice("rank", self.rank, RANK_MODES)


@dataclass(frozen=True)
class RunRequest:
    """One comparison, as asked for (see the module docstring).  `output` is None for a dry run (plan_run)."""

    references: References
    selection: Selection = field(default_factory=Selection)
    analysis: Analysis = field(default_factory=Analysis)
    execution: Execution = field(default_factory=Execution)
    output: Output | None = None
    mitigation: Mitigation | None = None  # set: `lorascale mitigate` (one adapter, rewritten)

    def __post_init__(self) -> None:
        if self.mitigation is not None:
            self._check_mitigation()
        if self.references.scratch_dir is not None and self.execution.wants_ray:
            raise OptionError(f"{option('scratch_dir')} applies to in-process runs: Ray workers fetch hub files "
                              "into their own node's hub cache", fix=f"drop {option('scratch_dir')}, or run in-process")
        if not self.execution.wants_ray and (self.execution.cpus_per_worker is not None
                                             or self.execution.gpus_per_worker is not None):
            raise OptionError(f"{option('cpus_per_worker')} / {option('gpus_per_worker')} apply to Ray workers, "
                              "and this run is in-process",
                              fix=f"add {option('workers')} N with N > 1, or {option('ray_address')}")

    def _check_mitigation(self) -> None:
        if len(self.references.tuned) != 1:
            raise OptionError(f"mitigation rewrites one adapter, got {len(self.references.tuned)}",
                              fix="run lorascale mitigate once per adapter")
        if self.analysis.side != "left":
            raise OptionError(f"mitigation finds intruders on the left side (the paper's, peft's), not "
                              f"{option('side', self.analysis.side)}", fix=f"drop {option('side')}")
        if self.references.scratch_dir is not None:
            raise OptionError(f"{option('scratch_dir')} deletes the downloaded adapter, which mitigation copies into "
                              "the output", fix=f"drop {option('scratch_dir')}")

    def manifest_options(self) -> dict[str, Any]:
        """The manifest's `options`: the request as a run records it (and a rerun must match, for the keys
        store/run_directory.py compares).  `rename` only when given, so runs written before it keep their
        identity; `top_k` only in topk mode; `cache_dir` as the run resolved it (None: no cache)."""
        analysis, selection, execution = self.analysis, self.selection, self.execution
        options: dict[str, Any] = {
            "k": analysis.k, "epsilon": analysis.epsilon, "side": analysis.side, "precision": analysis.precision,
            "include": list(selection.include), "exclude": list(selection.exclude)}
        if selection.rename:
            options["rename"] = list(selection.rename)
        options.update({"driver": execution.driver, "backend": execution.backend, "mode": analysis.mode,
                        "top_k": analysis.top_vectors if analysis.mode == "topk" else None,
                        "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None})
        if self.references.scratch_dir is not None:
            options["scratch_dir"] = str(self.references.scratch_dir)  # where files went; not the run's identity
        if self.mitigation is not None:
            options.update(mitigation_lambda=self.mitigation.mitigation_lambda, rank=self.mitigation.rank)
        return options

    @property
    def cache_dir(self) -> Path | None:
        """The base-SVD cache this run reads and writes: the one given, else settings.cache_dir(); None with
        use_cache=False."""
        from lorascale import settings

        if not self.execution.use_cache:
            return None
        return self.execution.cache_dir or settings.cache_dir()

    @property
    def cache_max_size(self) -> int | None:
        """The bound on the base-SVD cache, in bytes: the one given, else settings.cache_max_size()."""
        from lorascale import settings

        given = self.execution.cache_max_size
        return int(given) if given is not None else settings.cache_max_size()

    def keywords(self) -> dict[str, Any]:
        """Every option that differs from its default, by field name: base, tuned and out first, then the
        analysis, selection, execution, references and output records in field order.  What reproduces
        this request through build_request(), and what a recorded command shows."""
        given: dict[str, Any] = {"base": _labelled(self.references.base),
                                 "tuned": [_labelled(t) for t in self.references.tuned]}
        if self.output is not None:
            given["out"] = str(self.output.out)
        for record in (self.mitigation, self.analysis, self.selection, self.execution, self.references,
                       self.output):
            if record is None:
                continue
            for f in fields(record):
                if f.name in ("base", "tuned", "out"):
                    continue
                value = getattr(record, f.name)
                default = f.default_factory() if f.default_factory is not MISSING else f.default
                if value != default:
                    given[f.name] = list(value) if isinstance(value, tuple) else (
                        str(value) if isinstance(value, Path) else value)
        return given


def python_command(request: RunRequest) -> str:
    """How a manifest records a run started from Python: `lorascale.compare(base='...', tuned=[...],
    out='...', k=20)`, with every option that differs from its default (RunRequest.keywords), a Ray address
    without its credentials."""
    given = request.keywords()
    if "ray_address" in given:
        given["ray_address"] = public_address(given["ray_address"])
    return f"lorascale.compare({', '.join(f'{name}={value!r}' for name, value in given.items())})"


def public_address(address: str | None) -> str | None:
    """The address without user, password, query or fragment: safe for manifests and messages.

    >>> public_address("ray://me:s3cret@head:10001/?token=x")
    'ray://head:10001/'
    """
    if not address or "://" not in address:
        return address
    parts = urlsplit(address)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


@dataclass(frozen=True)
class JobOptions:
    """What every matrix job of a run is computed with, as it travels from the driver to the workers: the
    analysis, and where and how.  `device`, `backend` and `driver` are as asked until execute/routes.resolve()
    settles them on the machine that computes; `routes` once settled there, or pinned for the whole run (by a
    Ray driver, or from a resumed run's manifest); `cache_dir` the base-SVD cache (None: none)."""

    analysis: Analysis = field(default_factory=Analysis)
    device: str = "cpu"
    backend: str = "torch"
    driver: str | None = None
    routes: Routes | None = None
    cache_dir: str | None = None
    mitigation: Mitigation | None = None  # set: each job also rewrites its adapter's factors
    cache_max_size: int | None = None  # bytes the base-SVD cache may hold (None: no bound)
    # one per run (job_options): the workers' cache object is per run, so a run protects the entries it wrote
    # from its own eviction and warns about the cache at most once
    cache_run: str | None = None


def job_options(request: RunRequest, *, routes: Routes | None = None) -> JobOptions:
    """The JobOptions of `request` as asked for; `routes`: CPU routes a resumed run keeps."""
    execution = request.execution
    cache = request.cache_dir
    return JobOptions(analysis=request.analysis, device=execution.device, backend=execution.backend,
                      driver=execution.driver, routes=routes, cache_dir=str(cache) if cache is not None else None,
                      mitigation=request.mitigation, cache_max_size=request.cache_max_size if cache else None,
                      cache_run=uuid.uuid4().hex if cache is not None else None)


def _labelled(reference: NamedReference) -> str:
    return f"{reference.label}={reference.reference}" if reference.explicit else reference.reference


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{option(name)} must be True or False, got {value!r}")


_RECORDS = {"references": References, "selection": Selection, "analysis": Analysis, "execution": Execution,
            "output": Output, "mitigation": Mitigation}
KEYWORDS: dict[str, str] = {f.name: record for record, cls in _RECORDS.items() for f in fields(cls)
                            if f.name not in ("base", "tuned", "out")}


def build_request(base: str | Mapping[str, str], tuned: str | Sequence[str] | Mapping[str, str],
                  out: str | os.PathLike | None = None, *, mitigate: bool = False, **options: Any) -> RunRequest:
    """The RunRequest for `lorascale.compare(base, tuned, out, **options)` (or, with `mitigate=True`,
    `lorascale.mitigate(base, adapter, out, **options)`): every keyword is a field of one sub-record; an
    unknown one is an OptionError listing the known ones.  `out=None`: a dry run's request.

    >>> build_request("org/base", "lora=org/adapter", "results", k=20).analysis.k
    20
    """
    known = [name for name, record in KEYWORDS.items() if mitigate or record != "mitigation"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(f"unexpected keyword argument {unknown[0]!r}", fix=f"keywords: {', '.join(known)}")
    grouped: dict[str, dict[str, Any]] = {record: {} for record in _RECORDS}
    for name, value in options.items():
        grouped[KEYWORDS[name]][name] = value
    base_name, tuned_names = name_references(_reference(base, "base"), _reference(tuned, "tuned"))
    references = References(base=base_name, tuned=tuple(tuned_names), **grouped["references"])
    output = Output(out=out, **grouped["output"]) if out is not None else None  # type: ignore[arg-type]
    if output is None and grouped["output"]:
        raise OptionError(f"{option(next(iter(grouped['output'])))} needs an output directory",
                          fix=f"pass {option('out')}")
    return RunRequest(references=references, selection=Selection(**grouped["selection"]),
                      analysis=Analysis(**grouped["analysis"]), execution=Execution(**grouped["execution"]),
                      output=output, mitigation=Mitigation(**grouped["mitigation"]) if mitigate else None)


def _reference(given: Any, role: str) -> Any:
    """Paths as strings; the forms naming.py reads (a string, a list of them, a dict of labels to them) as
    given; anything else refused here, naming the argument."""
    if isinstance(given, os.PathLike):
        return os.fspath(given)
    if isinstance(given, str):
        return given
    if isinstance(given, Mapping):
        return {name: os.fspath(ref) if isinstance(ref, os.PathLike) else ref for name, ref in given.items()}
    if isinstance(given, Sequence):
        return [os.fspath(ref) if isinstance(ref, os.PathLike) else ref for ref in given]
    raise OptionError(f"{option(role)} must be a reference string, a list of them, or a dict of labels to "
                      f"references, got {type(given).__name__}",
                      fix="e.g. tuned='org/adapter', tuned=['./full', 'lora=./lora'] or tuned={'lora': './lora'}")
