"""The Python API: `lorascale.compare()` and `lorascale.load()`, for notebooks and scripts.

`compare()` is the engine of pipeline.compare() (which the CLI calls) with what a Python caller expects:
`tuned` may be one reference or a list, errors name the keyword argument rather than a CLI flag, a
notebook progress bar on request, the report on request, and a result object carrying the summary.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascale.errors import LorascaleError, OptionError
from lorascale import results as _results
from lorascale.results import Results

__all__ = ["CompareResult", "compare", "load"]


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


def compare(base: str | Mapping[str, str], tuned: str | Sequence[str] | Mapping[str, str], out: str | Path, *, report: bool = False,
            progress: bool = False, **options: Any) -> CompareResult:
    """Compare `base` with `tuned` (one reference or a list) and write the tables to `out`.

    References are local directories, .safetensors or .bin files, or hub repo ids `org/name[@revision]`;
    `"NAME=REF"` or a dict `{"NAME": "REF"}` labels a model in the tables and figures.
    `report=True` also writes out/report/ (figures and index.html); `progress=True` shows a progress
    bar (tqdm: a widget in Jupyter, a text bar in a terminal).  Every other keyword is an option of the
    run (k, epsilon, side, precision, device, backend, mode, include, exclude, overwrite, resume, ...);
    see `lorascale run --help` for their meaning.  Errors are lorascale.errors.LorascaleError subclasses
    whose message names the keyword argument.

    >>> result = lorascale.compare("meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                            "LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32", "results/")
    >>> result.summary[0]["intruders"]  # doctest: +SKIP
    """
    from lorascale import pipeline

    if isinstance(tuned, (str, Path)):
        tuned = [str(tuned)]
    elif isinstance(tuned, Mapping):  # {"NAME": "REF"}: labels (naming.py checks them)
        tuned = {name: str(ref) if isinstance(ref, Path) else ref for name, ref in tuned.items()}
    elif not isinstance(tuned, Sequence) or not all(isinstance(t, (str, Path)) for t in tuned):
        raise OptionError("tuned must be a reference string, a list of them, or a dict of labels to references",
                          fix="e.g. tuned='org/adapter', tuned=['./full', 'lora=./lora'] or tuned={'lora': './lora'}")
    else:
        tuned = [str(t) for t in tuned]
    engine = inspect.signature(pipeline.compare).parameters
    unknown = sorted(set(options) - set(_public(engine)))
    if unknown:
        raise OptionError(f"compare() got an unexpected keyword argument {unknown[0]!r}",
                          fix=f"keywords: report, progress, {', '.join(_public(engine))}")
    bar = _ProgressBar() if progress else None
    try:
        result = pipeline.compare(str(base) if isinstance(base, Path) else base, tuned, out, progress=bar, **options)
        summary = _results.load(result.out).summary()
        index = None
        if report:
            from lorascale.report import build_report

            index = build_report(result.out)
    except LorascaleError as exc:
        raise _in_keywords(exc) from None
    finally:
        if bar is not None:
            bar.close()
    return CompareResult(out=result.out, manifest=result.manifest, summary=summary, computed=result.computed,
                         planned=result.planned, report=index)


def _public(parameters: Any) -> list[str]:
    hidden = {"base", "tuned", "out", "progress"}
    return [name for name in parameters if name not in hidden]


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


# CLI flags as the engine's messages spell them -> compare()/load() keywords.  Boolean flags read as `=True`.
_BOOLEAN_FLAGS = {"overwrite", "resume", "partial", "no-cache", "no-pickle", "report", "dry-run"}
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: (-?[0-9][0-9.e+-]*|auto|cpu|cuda(?::\d+)?|torch|cupy|gram|left|right"
                   r"|both|fp32|fp64|exact|topk|gesvdj?|gesvda)\b)?")


def keyword_message(text: str) -> str:
    """Rewrite CLI flags in an engine message into compare() keywords: `--top-k 8` -> `top_k=8`,
    `--overwrite` -> `overwrite=True`, `--no-cache` -> `use_cache=False`, `--tuned` -> `tuned`.

    >>> keyword_message("--top-k 8 is below --k 10 (use --top-k 10 or more, or --overwrite)")
    'top_k=8 is below k=10 (use top_k=10 or more, or overwrite=True)'
    """

    def spell(match: re.Match) -> str:
        flag, value = match.group(1), match.group(2)
        if flag == "no-cache":
            return "use_cache=False"
        keyword = flag.replace("-", "_")
        if flag in _BOOLEAN_FLAGS and value is None:
            return f"{keyword}=True"
        if value is None:
            return keyword
        quoted = value if re.fullmatch(r"-?[0-9][0-9.e+-]*", value) else repr(value)
        return f"{keyword}={quoted}"

    return _FLAG.sub(spell, text)


def _in_keywords(exc: LorascaleError) -> LorascaleError:
    """The same error (same class, exit code, path, tensor), its message and fix in keyword terms."""
    message = str(exc)
    renamed = keyword_message(message)
    if renamed == message:
        return exc
    clone = exc.__class__.__new__(exc.__class__)
    clone.__dict__.update(exc.__dict__)
    clone.fix = keyword_message(exc.fix) if exc.fix else exc.fix
    clone.args = (renamed,)
    return clone


def load(out: str | Path, *, partial: bool = False) -> Results:
    """Open the results directory `out`: its tables as pyarrow Tables and its typed manifest.

    A run that is not complete is refused unless `partial=True` (its tables are partial).  See
    lorascale/results.py for what the returned Results offers (to_pandas, to_polars, dataset, summary).

    >>> results = lorascale.load("results/")  # doctest: +SKIP
    >>> results.to_polars("matrices")          # doctest: +SKIP
    """
    try:
        return _results.load(out, partial=partial)
    except LorascaleError as exc:
        raise _in_keywords(exc) from None
