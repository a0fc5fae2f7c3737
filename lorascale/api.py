"""The Python API: `lorascale.compare()` and `lorascale.load()`, for notebooks and scripts.

`compare()` builds a request from its keywords (request.build_request, the keyword API) and runs it with
pipeline.compare(), as the CLI does from its flags, with what a Python caller expects: `tuned` may be one
reference or a list, a notebook progress bar on request, the report on request, and a result object
carrying the summary.  Errors name keywords (errors.option), never CLI flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascale import results as _results
from lorascale.results import Results

__all__ = ["CompareResult", "MitigateResult", "compare", "load", "mitigate"]


@dataclass(frozen=True)
class CompareResult:
    """What compare() did: where the results are, the run's manifest, the per-model summary rows."""

    out: Path
    manifest: Any  # store.manifest.Manifest
    summary: list[dict[str, Any]]  # one row per tuned model, as `lorascale summary --format json`
    computed: int  # matrices computed by this call (fewer than planned when it resumed a run)
    planned: int
    report: Path | None = None  # report/index.html when report=True

    def load(self) -> Results:
        """The tables of this run (lorascale.load(out))."""
        return load(self.out)

    def _repr_html_(self) -> str:  # notebooks show the summary as a table
        from html import escape

        if not self.summary:
            return f"<p>lorascale results in {escape(str(self.out))}: no rows</p>"
        keys = list(self.summary[0])
        head = "".join(f"<th>{escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{escape(_cell(row.get(k)))}</td>" for k in keys) + "</tr>"
                       for row in self.summary)
        return (f"<p>lorascale results in <code>{escape(str(self.out))}</code></p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def compare(base: str | os.PathLike | Mapping[str, str], tuned: str | os.PathLike | Sequence[str] | Mapping[str, str],
            out: str | os.PathLike, *, progress: bool = False, executor: Any = None,
            download_progress: Any = None, **options: Any) -> CompareResult:
    """Compare `base` with `tuned` (one reference or a list) and write the tables to `out`.

    References are local directories, .safetensors or .bin files, or hub repo ids `org/name[@revision]`;
    `"NAME=REF"` or a dict `{"NAME": "REF"}` labels a model in the tables and figures.
    Every other keyword is an option of the run, a field of request.RunRequest (k, epsilon, side, precision,
    mode, top_k, include, exclude, rename, device, backend, driver, cache_dir, use_cache, cache_max_size, workers,
    ray_address, no_pickle, scratch_dir, overwrite, resume, report, series, ...); see `lorascale run --help`
    for their meaning.  `report=True` also writes out/report/ (figures and index.html).  `progress=True`
    shows a progress bar (tqdm: a widget in Jupyter, a text bar in a terminal); `executor` (an
    execute.Executor) replaces the one the options ask for; `download_progress` gets a DownloadStatus while
    hub files stream.  Errors are lorascale.errors.LorascaleError subclasses whose message names the keyword.

    >>> result = lorascale.compare("meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                            "LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32", "results/")
    >>> result.summary[0]["intruders"]  # doctest: +SKIP
    """
    from lorascale import pipeline
    from lorascale.request import build_request

    request = build_request(base, tuned, out, **options)
    assert request.output is not None
    bar = _ProgressBar() if progress else None
    try:
        result = pipeline.compare(request, executor=executor, progress=bar, download_progress=download_progress)
        summary = _results.load(result.out).summary()
        index = None
        if request.output.report:
            from lorascale.report import build_report

            index = build_report(result.out, series=request.output.series)
    finally:
        if bar is not None:
            bar.close()
    return CompareResult(out=result.out, manifest=result.manifest, summary=summary, computed=result.computed,
                         planned=result.planned, report=index)


def mitigate(base: str | os.PathLike | Mapping[str, str], adapter: str | os.PathLike | Mapping[str, str],
             out: str | os.PathLike, *, progress: bool = False, executor: Any = None, download_progress: Any = None,
             **options: Any) -> MitigateResult:
    """Remove (`mitigation_lambda=0`) or scale down (default 0.75) the intruder dimensions of the LoRA adapter
    `adapter` of `base`, and write the result to `out`: out/adapter/ (a PEFT adapter: PeftModel.from_pretrained
    loads it, `lorascale run` reads it), the run's tables of the adapter as it was, and out/mitigation/ (per
    matrix: intruders before and after, ranks, the written adapter's error against W').

    `rank`: "r+intruders" (default: dW' kept exactly, each changed module's rank in rank_pattern), "r" (the
    adapter's rank, as peft's reduce_intruder_dimension does: dW' truncated), or "auto" (dW''s numerical rank).
    Every other keyword is as for `lorascale.compare` (k, epsilon, mode, top_k, precision, device, ...).

    >>> result = lorascale.mitigate("meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                             "LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32", "mitigated/", mitigation_lambda=0)
    >>> result.summary["intruders_after"]  # doctest: +SKIP
    """
    from lorascale import pipeline
    from lorascale.report.mitigation import mitigation_summary
    from lorascale.request import build_request

    request = build_request(base, adapter, out, mitigate=True, **options)
    bar = _ProgressBar() if progress else None
    try:
        result = pipeline.mitigate(request, executor=executor, progress=bar, download_progress=download_progress)
    finally:
        if bar is not None:
            bar.close()
    return MitigateResult(out=result.out, adapter=result.out / "adapter", manifest=result.manifest,
                          summary=mitigation_summary(result.out), computed=result.computed, planned=result.planned)


@dataclass(frozen=True)
class MitigateResult:
    """What mitigate() did: where the mitigated adapter and the tables are, and the totals."""

    out: Path
    adapter: Path  # out/adapter: the PEFT adapter directory
    manifest: Any
    summary: dict[str, Any]  # report/mitigation.mitigation_summary
    computed: int
    planned: int

    def load(self) -> Results:
        """The tables of this run (lorascale.load(out)); `.mitigation` is what was done per matrix."""
        return load(self.out)


class _ProgressBar:
    """A tqdm bar (tqdm.auto: a widget in notebooks) fed by pipeline.compare's progress callback."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.shown = 0

    def __call__(self, done: int, total: int, matrix: str) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm  # huggingface_hub depends on tqdm: always installed

            self.bar = tqdm(total=total, unit="matrix", desc="lorascale")
            self.shown = 0
        self.bar.update(done - self.shown)
        self.bar.set_postfix_str(matrix, refresh=False)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load(out: str | Path, *, partial: bool = False) -> Results:
    """Open the results directory `out`: its tables as pyarrow Tables and its typed manifest.

    A run that is not complete is refused unless `partial=True` (its tables are partial).  See
    lorascale/results.py for what the returned Results offers (to_pandas, to_polars, dataset, summary).

    >>> results = lorascale.load("results/")  # doctest: +SKIP
    >>> results.to_polars("matrices")          # doctest: +SKIP
    """
    return _results.load(out, partial=partial)
