"""A run request: every option of a comparison, each declared once, here: a field with its type and default, and
its declaration as the field's metadata (optionspec.declare: help, parsing, commands, run identity, what it
controls), from which the CLI, the run identity and docs/REFERENCE.md are made; each check written once too.

`RunRequest` is frozen and typed; its sub-records group the options by the stage that uses them:

    references  what to compare (base, tuned models with their labels, whether pickled .bin weights may be
                read, where a disk-light hub run downloads to)
    selection   which matrices (include / exclude globs, --rename rules)
    analysis    what is computed for each matrix (k, epsilon, side, precision, mode, top_k)
    execution   where and how (device, backend, driver, base-SVD cache, Ray)
    output      where the tables go, and how an existing run there is treated

The CLI (lorascale/cli) and the Python API (lorascale.compare) each build one with `build_request()` and
call `pipeline.compare(request)` / `pipeline.plan_run(request)`.  What a run records of it (the manifest's
options, the command, which options are the run's identity) is run_identity.py; what the workers compute
with is analyses/options.py.  Field names are the keywords of
`lorascale.compare`; every check raises OptionError naming fields with errors.option(), which the CLI alone
spells as its flags (cli/flags.py).  Whether the machine can honour a device or backend is not known here:
execute/routes.py decides that, on the machine that computes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lorascale.errors import OptionError, option
from lorascale.naming import name_references, with_labels
from lorascale.numerics.backends import BACKEND_CHOICES, BACKENDS, CUDA_DRIVERS, DEVICE_CHOICES
from lorascale.optionspec import declare
from lorascale.records import NamedReference
from lorascale.settings import RunEnvironment

Side = Literal["left", "right", "both"]
SIDES: dict[str, tuple[str, ...]] = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
PRECISIONS = ("fp32", "fp64")
MODES = ("topk", "exact")
RANK_MODES = ("r+intruders", "r", "auto")  # how mitigation writes dW' back (numerics/mitigate.py)
DEFAULT_AMPLIFICATION_RANK = 16  # Hu et al.'s r of the amplification factor for a full fine-tune's dW
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

    base: NamedReference | None  # None: the base the adapters name (pipeline.settle_base)
    tuned: tuple[NamedReference, ...]
    no_pickle: bool = field(default=False, metadata=declare(
        "Refuse pickled .bin weights (read otherwise, only when a checkpoint has no safetensors, with torch's "
        "restricted weights_only loader).", parse="flag"))
    scratch_dir: Path | None = field(default=None, metadata=declare(
        "Disk-light hub runs: download hub weight files here instead of the hub cache and delete each once its "
        "matrices are done (files already in the hub cache are read there, never deleted).", commands=("run",),
        parse="path", controls="manifest.json options.scratch_dir (not the run's identity)"))

    def __post_init__(self) -> None:
        _flag("no_pickle", self.no_pickle)
        object.__setattr__(self, "scratch_dir", _optional_path(self.scratch_dir))

    @property
    def all(self) -> tuple[NamedReference, ...]:
        """The base first, then the tuned models in the order given (once the base is known)."""
        if self.base is None:
            raise OptionError(f"no {option('base')} yet: the pipeline takes it from the adapters first")
        return (self.base, *self.tuned)


@dataclass(frozen=True)
class Selection:
    """Which base matrices are analysed, and how tuned names map onto the base's."""

    include: tuple[str, ...] = field(default=(), metadata=declare(
        "Glob on base tensor names to analyse (repeatable).", parse="multiple", identity=True,
        controls="which matrices get rows (manifest.json skipped)"))
    exclude: tuple[str, ...] = field(default=(), metadata=declare(
        "Glob on base tensor names to skip (repeatable).", parse="multiple", identity=True,
        controls="which matrices get rows (manifest.json skipped)"))
    rename: tuple[str, ...] = field(default=(), metadata=declare(
        "Regex rewrite of tuned tensor names before matching them to the base's (repeatable, in order; "
        "Python regex syntax matched by RE2 in linear time: no backreferences or lookarounds).",
        parse="multiple", metavar="FROM=TO", identity=True, controls="which tuned tensor pairs with a base matrix"))

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "rename"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        from lorascale.plan.rename import parse_renames

        parse_renames(self.rename)  # refuse a bad rule now, before anything is read

    @property
    def rules(self):
        """The parsed --rename rules (plan/rename.py)."""
        from lorascale.plan.rename import parse_renames

        return parse_renames(self.rename)


@dataclass(frozen=True)
class Analysis:
    """What is computed for every matrix of the run (docs/METHOD.md)."""

    k: int = field(default=10, metadata=declare(
        "Top tuned singular vectors checked for intruders.", identity=True,
        controls="matrices.intruders, matrices.intruders_right, manifest.json options.k"))
    epsilon: float = field(default=0.5, metadata=declare(
        "Intruder threshold on max |cos|.", identity=True, controls="matrices.intruders, matrices.intruders_right"))
    side: Side = field(default="left", metadata=declare(
        "Singular vectors compared: left (output space, as in the paper), right, or both.", commands=("run",),
        parse="choice", choices=tuple(SIDES), identity=True,
        controls="spectra.side, similarity.side, matrices.intruders_right"))
    precision: Literal["fp32", "fp64"] = field(default="fp32", metadata=declare(
        "Arithmetic of the SVDs; weights are read as stored.  fp64 for ill-conditioned matrices.", parse="choice",
        choices=PRECISIONS, identity=True, controls="every computed column"))
    mode: Literal["exact", "topk"] = field(default="topk", metadata=declare(
        "topk: the top --top-k tuned singular triplets by block Krylov iteration, each counted vector's angle "
        "bounded a posteriori (the exact SVD where the bound fails).  exact: every tuned singular value and "
        "vector (the full spectrum).", parse="choice", choices=MODES, identity=True,
        controls="matrices.method, how many tuned rows spectra holds"))
    top_k: int | None = field(default=None, metadata=declare(
        f"Tuned singular triplets computed in --mode topk, at least --k (default {DEFAULT_TOP_K}, or --k when "
        "larger); `lorascale summary --k` re-thresholds up to it.", parse="int>=1", identity=True,
        controls="the tuned rows of spectra (topk mode)"))
    amplification_rank: int = field(default=DEFAULT_AMPLIFICATION_RANK, metadata=declare(
        "r of the amplification factor (matrices.amplification) for a full fine-tune's dW; an adapter uses its own "
        "rank.", commands=("run",), parse="int>=1", identity=True,
        controls="matrices.amplification, matrices.amplification_rank (full fine-tunes)"))

    def __post_init__(self) -> None:
        check_k(self.k)
        check_k(self.amplification_rank, "amplification_rank")
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

    device: str = field(default="auto", metadata=declare(f"{DEVICE_CHOICES}.", controls="manifest.json device"))
    backend: str = field(default="auto", metadata=declare(
        "SVD backend: torch (LAPACK; cuSOLVER gesvd on CUDA), cupy (CUDA), or gram (float64 Gram-matrix "
        "eigensolver, see benchmarks/README.md).  auto: torch on CUDA and at fp64; on a CPU at fp32 a table keyed "
        "by the BLAS picks torch or gram per quantity (manifest.json \"routes\").", parse="choice",
        choices=BACKEND_CHOICES, controls="manifest.json routes"))
    driver: str | None = field(default=None, metadata=declare(
        "cuSOLVER driver on CUDA (gesvd unless told).", commands=(), controls="manifest.json options.driver"))
    cache_dir: Path | None = field(default=None, metadata=declare(
        "Cache of base SVDs, reused across runs (default: $LORASCALE_CACHE_DIR or ~/.cache/lorascale).",
        parse="path", controls="the base-SVD cache read and written"))  # None: RunRequest.cache_dir
    use_cache: bool = field(default=True, metadata=declare(
        "Neither read nor write the base-SVD cache.", flag="--no-cache", parse="flag", false_flag=True))
    # None: the environment's (LORASCALE_CACHE_MAX_SIZE, else settings.DEFAULT_CACHE_MAX_SIZE); not the run's identity
    cache_max_size: int | str | None = field(default=None, metadata=declare(
        "Bound on the base-SVD cache (50GB, 500MiB, bytes); least recently used entries are evicted to stay under "
        "it (default: $LORASCALE_CACHE_MAX_SIZE, else 50GB).  See `lorascale cache` and docs/CACHE.md.",
        metavar="SIZE", controls="the base-SVD cache's size"))
    ray_address: str | None = field(default=None, metadata=declare(
        "Run on Ray: auto, ray://host:10001, host:port, or local (default: $RAY_ADDRESS; else in-process).",
        controls="manifest.json execution"))
    workers: int | None = field(default=None, metadata=declare(
        "Ray workers (more than 1 starts a local Ray when no address is given). Default: one per GPU of the "
        "cluster, else its CPUs / --cpus-per-worker.", parse="int>=1", controls="manifest.json execution"))
    cpus_per_worker: float | None = field(default=None, metadata=declare(
        "CPUs (and torch threads) per Ray worker.", parse="number>0", controls="manifest.json execution"))
    gpus_per_worker: float | None = field(default=None, metadata=declare(
        "GPUs per Ray worker (default 1 when the cluster has GPUs; 0.5 shares a GPU by two).", parse="number>=0",
        controls="manifest.json execution"))

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


@dataclass(frozen=True)
class Output:
    """Where the tables go, and what happens to a run already there."""

    out: Path
    overwrite: bool = field(default=False, metadata=declare("Replace a different earlier run in --out.", parse="flag"))
    resume: bool = field(default=False, metadata=declare(
        "Require an earlier run in --out and continue it.", parse="flag"))
    report: bool = field(default=False, metadata=declare(
        "Also write RESULTS/report/ (figures + index.html).", commands=("run",), parse="flag",
        controls="out/report/"))
    series: bool | None = field(default=None, metadata=declare(
        "Draw the tuned models as a checkpoint series in the --report (default: only when their names are "
        "checkpoints of one run, e.g. run/checkpoint-200 or org/name@step1000).", commands=("run",), parse="flag",
        off_flag="--no-series", controls="out/report/ (the checkpoint-series figure)"))

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

    mitigation_lambda: float = field(default=0.75, metadata=declare(
        "What is kept of each intruder component of W: 0 removes it, 1 keeps it.", commands=("mitigate",),
        flag="--lambda", identity=True, controls="out/adapter/, mitigation.intruders_after"))
    rank: str = field(default="r+intruders", metadata=declare(
        "Rank of the written factors: r+intruders keeps dW' exactly (rank_pattern per module); r keeps the "
        "adapter's rank (as peft's reduce_intruder_dimension: dW' truncated); auto dW''s numerical rank.",
        commands=("mitigate",), parse="choice", choices=RANK_MODES, identity=True,
        controls="out/adapter/, mitigation.rank_after"))

    def __post_init__(self) -> None:
        value = self.mitigation_lambda
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not 0 <= value <= 1):
            raise OptionError(f"{option('mitigation_lambda')} must be in [0, 1] (what is kept of each intruder: "
                              f"0 removes it, 1 keeps it), got {value!r}")
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
    # What the environment says (the cache, RAY_ADDRESS), read at the edge: settings.run_environment().
    environment: RunEnvironment = field(default_factory=RunEnvironment)

    def __post_init__(self) -> None:
        if self.mitigation is not None:
            self._check_mitigation()
        if self.references.scratch_dir is not None and self.wants_ray:
            raise OptionError(f"{option('scratch_dir')} applies to in-process runs: Ray workers fetch hub files "
                              "into their own node's hub cache", fix=f"drop {option('scratch_dir')}, or run in-process")
        if not self.wants_ray and (self.execution.cpus_per_worker is not None
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

    @property
    def cache_dir(self) -> Path | None:
        """The base-SVD cache this run reads and writes: the one given, else the environment's; None with
        use_cache=False."""
        if not self.execution.use_cache:
            return None
        return self.execution.cache_dir or self.environment.cache_dir

    @property
    def cache_max_size(self) -> int | None:
        """The bound on the base-SVD cache, in bytes: the one given, else the environment's."""
        given = self.execution.cache_max_size
        return int(given) if given is not None else self.environment.cache_max_size

    @property
    def ray_address(self) -> str | None:
        """The Ray address: as given, else the environment's (RAY_ADDRESS)."""
        return self.execution.ray_address or self.environment.ray_address

    @property
    def wants_ray(self) -> bool:
        """Ray runs the job when an address is given (here or as RAY_ADDRESS) or more than one worker."""
        return self.ray_address is not None or (self.execution.workers or 1) > 1



def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{option(name)} must be True or False, got {value!r}")


# The sub-records by RunRequest field name: their declared fields are the options (optionspec.declared).
RECORDS = {"references": References, "selection": Selection, "analysis": Analysis, "execution": Execution,
           "output": Output, "mitigation": Mitigation}
KEYWORDS: dict[str, str] = {f.name: record for record, cls in RECORDS.items() for f in fields(cls)
                            if f.name not in ("base", "tuned", "out")}


def build_request(base: str | Mapping[str, str] | None, tuned: str | Sequence[str] | Mapping[str, str],
                  out: str | os.PathLike | None = None, *, mitigate: bool = False,
                  environment: RunEnvironment | None = None, **options: Any) -> RunRequest:
    """The RunRequest for `lorascale.compare(base, tuned, out, **options)` (or, with `mitigate=True`,
    `lorascale.mitigate(base, adapter, out, **options)`): every keyword is a field of one sub-record; an
    unknown one is an OptionError listing the known ones.  `out=None`: a dry run's request.  `environment`:
    what the edge read (settings.run_environment()); None: nothing (no default cache, no RAY_ADDRESS).

    >>> build_request("org/base", "lora=org/adapter", "results", k=20).analysis.k
    20
    """
    tuned = with_labels(_reference(tuned, "tuned"), options.pop("label", None))
    known = [name for name, record in KEYWORDS.items() if mitigate or record != "mitigation"] + ["label"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(f"unexpected keyword argument {unknown[0]!r}", fix=f"keywords: {', '.join(known)}")
    grouped: dict[str, dict[str, Any]] = {record: {} for record in RECORDS}
    for name, value in options.items():
        grouped[KEYWORDS[name]][name] = value
    base_name, tuned_names = name_references(None if base is None else _reference(base, "base"), tuned)
    references = References(base=base_name, tuned=tuple(tuned_names), **grouped["references"])
    output = Output(out=out, **grouped["output"]) if out is not None else None  # type: ignore[arg-type]
    if output is None and grouped["output"]:
        raise OptionError(f"{option(next(iter(grouped['output'])))} needs an output directory",
                          fix=f"pass {option('out')}")
    return RunRequest(references=references, selection=Selection(**grouped["selection"]),
                      analysis=Analysis(**grouped["analysis"]), execution=Execution(**grouped["execution"]),
                      output=output, mitigation=Mitigation(**grouped["mitigation"]) if mitigate else None,
                      environment=environment or RunEnvironment())


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
