"""A run's identity: what a run records of its request (the manifest's `options`, the command that reproduces
it) and which options make a rerun on the same `--out` another run rather than a continuation.

request.py holds the request record; this module is what is derived from it for the record of a run
(pipeline.py writes it, store/run_directory.py compares it, cli/flags.py spells it as a command line).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from lorascale.records import NamedReference
from lorascale.optionspec import declared
from lorascale.request import DEFAULT_AMPLIFICATION_RANK, RECORDS, RunRequest
from lorascale.scrub import public_address

# Options that change the numbers (declared with identity=True): a rerun with other values is another run, not a
# continuation.  "rename" is recorded only when given, so runs written before the option existed keep their identity.
RUN_OPTIONS = tuple(f.name for _, f, spec in declared(RECORDS) if spec.identity)
# The options manifest_options() records in its own way (below); any other identity option is recorded as it is.
_RECORDED = {"k", "epsilon", "side", "precision", "include", "exclude", "rename", "mode", "top_k", "mitigation_lambda",
             "rank", "amplification_rank"}


def manifest_options(request: RunRequest) -> dict[str, Any]:
    """The manifest's `options`: the request as a run records it (and a rerun must match, for the keys
    store/run_directory.py compares).  `rename` only when given, so runs written before it keep their
    identity (and `amplification_rank` only when not the default); `top_k` only in topk mode; `cache_dir` as the run resolved it (None: no cache)."""
    analysis, selection, execution = request.analysis, request.selection, request.execution
    options: dict[str, Any] = {
        "k": analysis.k, "epsilon": analysis.epsilon, "side": analysis.side, "precision": analysis.precision,
        "include": list(selection.include), "exclude": list(selection.exclude)}
    if selection.rename:
        options["rename"] = list(selection.rename)
    if analysis.amplification_rank != DEFAULT_AMPLIFICATION_RANK:  # as rename: runs written before it keep their identity
        options["amplification_rank"] = analysis.amplification_rank
    options.update({"driver": execution.driver, "backend": execution.backend, "mode": analysis.mode,
                    "top_k": analysis.top_vectors if analysis.mode == "topk" else None,
                    "cache_dir": str(request.cache_dir) if request.cache_dir is not None else None})
    if request.references.scratch_dir is not None:
        options["scratch_dir"] = str(request.references.scratch_dir)  # where files went; not the run's identity
    if request.mitigation is not None:
        options.update(mitigation_lambda=request.mitigation.mitigation_lambda, rank=request.mitigation.rank)
    for record, f, spec in declared(RECORDS):  # an identity option declared since: recorded as given
        if spec.identity and f.name not in _RECORDED and getattr(request, record) is not None:
            value = getattr(getattr(request, record), f.name)
            options[f.name] = list(value) if isinstance(value, tuple) else value
    return options


def keywords(request: RunRequest) -> dict[str, Any]:
    """Every option that differs from its default, by field name: base, tuned and out first, then the
    analysis, selection, execution, references and output records in field order.  What reproduces
    this request through build_request(), and what a recorded command shows."""
    given: dict[str, Any] = {"base": _labelled(request.references.base)} if request.references.base else {}
    given["tuned"] = [_labelled(t) for t in request.references.tuned]
    if request.output is not None:
        given["out"] = str(request.output.out)
    for record in (request.mitigation, request.analysis, request.selection, request.execution, request.references,
                   request.output):
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
    out='...', k=20)`, with every option that differs from its default (keywords()), a Ray address
    without its credentials."""
    given = keywords(request)
    given = {"base": None, **given}  # None: the base the adapters name (the keyword is still positional)
    if "ray_address" in given:
        given["ray_address"] = public_address(given["ray_address"])
    return f"lorascale.compare({', '.join(f'{name}={value!r}' for name, value in given.items())})"


def _labelled(reference: NamedReference) -> str:
    return f"{reference.label}={reference.reference}" if reference.explicit else reference.reference
