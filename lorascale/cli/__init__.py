"""The `lorascale` command: each subcommand parses options, builds a request or a query, and calls one library
function.  Errors become one line on stderr, their options spelled as flags (cli/flags.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import click

from lorascale import __version__, settings
from lorascale.cli.flags import command_line, message
from lorascale.cli.progress import Progress
from lorascale.errors import LorascaleError, OptionError
from lorascale.numerics.backends import BACKEND_CHOICES, DEVICE_CHOICES
from lorascale.request import DEFAULT_TOP_K, MODES, PRECISIONS, RANK_MODES, SIDES, Analysis, Mitigation

_ANALYSIS, _MITIGATION = Analysis(), Mitigation()  # the defaults, written once (request.py)


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, Kubernetes, `ray job stop`), handled like Ctrl-C: results flushed, run `interrupted`."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's capture): nothing to do
        pass


class _Group(click.Group):
    """Maps lorascale errors to one line on stderr and an exit code; LORASCALE_DEBUG=1 shows tracebacks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:  # the top-level --help and --version print while parsing
            return super().parse_args(ctx, args)
        except BrokenPipeError:
            _silence_stdout()
            ctx.exit(0)

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            value = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit where it cannot be caught
            return value
        except BrokenPipeError:
            # The reader went away (`lorascale inspect REF --tensors | head`): what it wanted it has; end
            # quietly, exit 0, and let nothing try to write to the pipe again.
            _silence_stdout()
            ctx.exit(0)
        except LorascaleError as exc:
            if settings.debug():
                raise
            _last_line(ctx, f"lorascale: error: {message(exc)}", exc.exit_code)
        except KeyboardInterrupt as exc:
            # 128 + signal number, as shells report a process ended by that signal.
            code, how = (143, "terminated") if isinstance(exc, Terminated) else (130, "interrupted")
            click.echo(f"lorascale: {how}; finished matrices are saved and the run is marked interrupted, rerun "
                       "the same command to resume", err=True)
            ctx.exit(code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
            if settings.debug():
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1]
            _last_line(ctx, f"lorascale: internal error: {type(exc).__name__}: {exc} (at {Path(where.filename).name}:"
                            f"{where.lineno}; set LORASCALE_DEBUG=1 for the traceback and please report it)", 70)


def _last_line(ctx: click.Context, message: str, code: int) -> None:
    """End the command with `message` as the last line on stderr, and a single line, then exit with `code`.

    Progress and stage lines (from this thread or a download thread) are silenced first, newlines inside the
    message (from a library's exception text) become spaces, and once it is written stderr is pointed at
    /dev/null, so that nothing after it (a thread still draining, a warning at interpreter exit) makes the
    error anything but the last line."""
    Progress.silence_all()
    click.echo(" ".join(message.split()), err=True)
    try:
        sys.stderr.flush()
        if sys.stderr is sys.__stderr__:  # the process's own stderr (a test runner's capture is left alone)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorascale")
def main() -> None:
    """Compare a base checkpoint with fine-tunes through the SVD of every weight matrix, and count the
    intruder dimensions LoRA introduces.  Results are Parquet tables in --out.

    \b
    Examples:
      lorascale run --base meta-llama/Llama-2-7b-hf --tuned org/my-lora --tuned ./my-full-ft --out results/
      lorascale inspect org/my-lora --tensors      # tensor names for --include / --exclude
      lorascale summary results/                   # then: lorascale report results/
    """




def _print_summary(out: Path) -> None:
    from lorascale.report import format_summary, summary_rows

    click.echo(format_summary(summary_rows(out), "table"))


_COMMON_OPTIONS = [
    click.option("--k", default=_ANALYSIS.k, show_default=True, help="Top tuned singular vectors checked for intruders."),
    click.option("--epsilon", default=_ANALYSIS.epsilon, show_default=True, help="Intruder threshold on max |cos|."),
    click.option("--precision", type=click.Choice(PRECISIONS), default=_ANALYSIS.precision, show_default=True,
                  help="Arithmetic of the SVDs; weights are read as stored.  fp64 for ill-conditioned matrices."),
    click.option("--device", default="auto", show_default=True, help=f"{DEVICE_CHOICES}."),
    click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                  help="SVD backend: torch (LAPACK; cuSOLVER gesvd on CUDA), cupy (CUDA), or gram (float64 "
                       "Gram-matrix eigensolver, see benchmarks/README.md).  auto: torch on CUDA and at fp64; on a "
                       "CPU at fp32 a table keyed by the BLAS picks torch or gram per quantity (manifest.json "
                       "\"routes\")."),
    click.option("--mode", type=click.Choice(MODES), default=_ANALYSIS.mode, show_default=True,
                  help="topk: the top --top-k tuned singular triplets by block Krylov iteration, each counted vector's "
                       "angle bounded a posteriori (the exact SVD where the bound fails).  exact: every tuned singular "
                       "value and vector (the full spectrum)."),
    click.option("--top-k", "top_k", type=click.IntRange(min=1), default=None,
                  help=f"Tuned singular triplets computed in --mode topk, at least --k (default {DEFAULT_TOP_K}, or --k when "
                       "larger); `lorascale summary --k` re-thresholds up to it."),
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                  help="Cache of base SVDs, reused across runs (default: $LORASCALE_CACHE_DIR or ~/.cache/lorascale)."),
    click.option("--no-cache", "use_cache", flag_value=False, default=True,
                  help="Neither read nor write the base-SVD cache."),
    click.option("--cache-max-size", default=None, metavar="SIZE",
                  help="Bound on the base-SVD cache (50GB, 500MiB, bytes); least recently used entries are evicted "
                       "to stay under it (default: $LORASCALE_CACHE_MAX_SIZE, else 50GB).  See `lorascale cache`."),
    click.option("--no-pickle", is_flag=True,
                  help="Refuse pickled .bin weights (read otherwise, only when a checkpoint has no safetensors, "
                       "with torch's restricted weights_only loader)."),
    click.option("--include", multiple=True, help="Glob on base tensor names to analyse (repeatable)."),
    click.option("--exclude", multiple=True, help="Glob on base tensor names to skip (repeatable)."),
    click.option("--rename", multiple=True, metavar="FROM=TO",
                  help="Regex rewrite of tuned tensor names before matching them to the base's (repeatable, in order)."),
    click.option("--overwrite", is_flag=True, help="Replace a different earlier run in --out."),
    click.option("--resume", is_flag=True, help="Require an earlier run in --out and continue it."),
    click.option("--quiet", is_flag=True, help="No progress or stage lines on stderr; warnings and errors still show."),
    click.option("--ray-address", default=None,
                  help="Run on Ray: auto, ray://host:10001, host:port, or local (default: $RAY_ADDRESS; else in-process)."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                  help="Ray workers (more than 1 starts a local Ray when no address is given). "
                       "Default: one per GPU of the cluster, else its CPUs / --cpus-per-worker."),
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="CPUs (and torch threads) per Ray worker."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                  help="GPUs per Ray worker (default 1 when the cluster has GPUs; 0.5 shares a GPU by two)."),
]


def _common_options(command: Any) -> Any:
    """The options `run` and `mitigate` share (the analysis, execution and output ones), in help order."""
    for option_ in reversed(_COMMON_OPTIONS):
        command = option_(command)
    return command


@main.command()
@click.option("--base", required=True, metavar="REF",
              help="Base checkpoint: directory, .safetensors or .bin file, or org/name[@rev]; NAME=REF labels it.")
@click.option("--tuned", "tuned", multiple=True, required=True, metavar="REF",
              help="A fine-tune of --base, full or LoRA adapter, as for --base; repeatable.  NAME=REF labels it in "
                   "tables, legends and the summary: NAME is letters, digits, _ . + -, and the text is split on "
                   "its first '=' only when it is not an existing path.")
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR", help="Results directory.")
@click.option("--side", type=click.Choice(list(SIDES)), default=_ANALYSIS.side, show_default=True,
              help="Singular vectors compared: left (output space, as in the paper), right, or both.")
@click.option("--scratch-dir", type=click.Path(path_type=Path), default=None,
              help="Disk-light hub runs: download hub weight files here instead of the hub cache and delete each "
                   "once its matrices are done (files already in the hub cache are read there, never deleted).")
@click.option("--report", is_flag=True, help="Also write RESULTS/report/ (figures + index.html).")
@click.option("--series/--no-series", "series", default=None,
              help="Draw the tuned models as a checkpoint series in the --report (default: only when their names "
                   "are checkpoints of one run, e.g. run/checkpoint-200 or org/name@step1000).")
@click.option("--dry-run", is_flag=True,
              help="Resolve, read headers, match names and print the plan: matrices per model, tensors not "
                   "analysed and why, matrices per route, bytes to read and download, the base-SVD cache after the "
                   "run, peak memory and a time estimate calibrated on this machine (stored in the cache "
                   "directory, the one file a dry run writes).  Nothing is computed.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON (seconds, bytes).")
@_common_options
def run(quiet: bool, dry_run: bool, as_json: bool, **options: Any) -> None:
    """Compare the --base checkpoint with each --tuned checkpoint and write Parquet tables to --out.

    A checkpoint is a directory, a .safetensors or .bin file, or a Hugging Face repo org/name[@revision].
    """
    from lorascale.cli.format import format_plan
    from lorascale.pipeline import compare, plan_run
    from lorascale.request import build_request

    if as_json and not dry_run:
        raise OptionError("--json prints a dry run's plan", fix="add --dry-run, or leave --json out")
    request = build_request(options.pop("base"), list(options.pop("tuned")), options.pop("out"), **options)
    if not settings.debug():  # huggingface_hub's retry warnings would break the one-line error (progress shows it)
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    progress = Progress(enabled=not quiet)
    if dry_run:
        try:
            planned = plan_run(request)
        finally:
            progress.close()
        click.echo(json.dumps(planned.record(), indent=1) if as_json else format_plan(planned))
        return
    try:
        result = compare(request, progress=progress, download_progress=progress.downloads,
                         command=command_line(request))
    finally:
        progress.close()
    out = result.out
    note = f" (resumed: {result.computed} of {result.planned} computed now)" if result.manifest.resumed else ""
    click.echo(f"wrote {out}{note}", err=True)
    _print_summary(out)
    assert request.output is not None
    if request.output.report:
        from lorascale.report import build_report

        if not quiet:
            progress.stage(f"lorascale: writing the report (figures, index.html) to {out / 'report'}")
        try:
            index = build_report(out, series=request.output.series)
        finally:
            progress.close()
        click.echo(f"report: {index}", err=True)


@main.command()
@click.option("--base", required=True, metavar="REF",
              help="The base checkpoint the adapter was trained on (as for run).")
@click.option("--adapter", "tuned", required=True, metavar="REF",
              help="The PEFT LoRA adapter to mitigate: directory, adapter file, or org/name[@rev].")
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Output: DIR/adapter (the mitigated adapter), DIR/mitigation (what was done), and the tables.")
@click.option("--lambda", "mitigation_lambda", type=float, default=_MITIGATION.mitigation_lambda, show_default=True,
              help="What is kept of each intruder component of W: 0 removes it, 1 keeps it.")
@click.option("--rank", type=click.Choice(RANK_MODES), default=_MITIGATION.rank, show_default=True,
              help="Rank of the written factors: r+intruders keeps dW' exactly (rank_pattern per module); r keeps "
                   "the adapter's rank (as peft's reduce_intruder_dimension: dW' truncated); auto dW''s numerical "
                   "rank.")
@_common_options
def mitigate(quiet: bool, **options: Any) -> None:
    """Scale down the intruder dimensions of a LoRA adapter and write the result as a PEFT adapter.

    Per adapted matrix: the intruders among the top --k singular vectors of W = W0 + s B A (max_cos < --epsilon,
    as `run` counts them), W' = W + (lambda - 1) * their components, and new factors for dW' = W' - W0.
    Matrices without intruders are copied unchanged.
    """
    from lorascale.pipeline import mitigate as run_mitigation
    from lorascale.report.mitigation import format_mitigation, mitigation_summary
    from lorascale.request import build_request

    request = build_request(options.pop("base"), options.pop("tuned"), options.pop("out"), mitigate=True, **options)
    if not settings.debug():
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    progress = Progress(enabled=not quiet)
    try:
        result = run_mitigation(request, progress=progress, download_progress=progress.downloads,
                                command=command_line(request, command="mitigate"))
    finally:
        progress.close()
    click.echo(f"wrote {result.out}", err=True)
    click.echo(format_mitigation(mitigation_summary(result.out)))


@main.command()
@click.argument("reference", metavar="REF")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--no-pickle", is_flag=True, help="Refuse pickled .bin weights.")
@click.option("--tensors", "list_all", is_flag=True,
              help="List every tensor: name, shape, dtype and what a default run does with it "
                   "(the names --include and --exclude globs match).")
def inspect(reference: str, as_json: bool, list_all: bool, no_pickle: bool) -> None:
    """Describe checkpoint REF from its headers: kind, format, files, dtypes, matrices, adapter settings.

    REF is a directory, a .safetensors or .bin file, or org/name[@rev]; a hub repo's weights are not downloaded.
    """
    from lorascale.cli.format import format_description, format_tensors
    from lorascale.inspect import describe_checkpoint, list_tensors

    if list_all:
        rows = list_tensors(reference, allow_pickle=not no_pickle)
        click.echo(json.dumps(rows, indent=2) if as_json else format_tensors(rows))
        return
    info = describe_checkpoint(reference, allow_pickle=not no_pickle)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory for the demo checkpoints (checkpoints/) and results (results/).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def demo(out: Path, quiet: bool) -> None:
    """Offline: build a small base, a full fine-tune and a LoRA adapter, and compare them."""
    from lorascale.demo import build_checkpoints
    from lorascale.pipeline import compare
    from lorascale.request import build_request

    paths = build_checkpoints(out / "checkpoints")
    request = build_request(paths["base"], [paths["full"], paths["lora"]], out / "results", overwrite=True)
    progress = Progress(enabled=not quiet)
    try:
        compare(request, progress=progress, command=command_line(request))
    finally:
        progress.close()
    click.echo(f"wrote {out / 'results'}", err=True)
    _print_summary(out / "results")


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="Aligned text, CSV, or JSON with every field.")
@click.option("--order", type=click.Choice(["as-given", "name"]), default="as-given", show_default=True,
              help="Model order: as given on the command line, or natural name order (checkpoint-200 < -1000).")
@click.option("--partial", "allow_partial", is_flag=True,
              help="Also summarise a run that is not complete (failed, interrupted, running); marked PARTIAL.")
@click.option("--k", type=int, default=None,
              help="Count intruders among the top K tuned vectors instead of the run's k; re-thresholds from "
                   "spectra/ without recomputing.")
@click.option("--epsilon", type=float, default=None,
              help="Intruder threshold on max |cos| instead of the run's epsilon; re-thresholds from spectra/.")
@click.option("--side", type=click.Choice(["left", "right", "both"]), default=None,
              help="Sides to count, among those the run computed (default: all of them).")
@click.option("--by", type=click.Choice(["module", "layer"]), default=None,
              help="One row per model and module type, or per model and layer.")
def summary(results: Path, fmt: str, order: str, allow_partial: bool, k: int | None, epsilon: float | None,
            side: str | None, by: str | None) -> None:
    """Print the per-model summary of a finished run, optionally at another k, epsilon or side."""
    from lorascale.report import format_summary
    from lorascale.report.summary import summarise

    result = summarise(results, order=order, allow_partial=allow_partial,  # type: ignore[arg-type]
                       k=k, epsilon=epsilon, side=side, by=by)  # type: ignore[arg-type]
    if allow_partial:
        _warn_if_partial(results)
    for note in result.notes:
        click.echo(f"lorascale: note: {note}", err=True)
    click.echo(format_summary(result.rows, fmt))  # type: ignore[arg-type]


def _warn_if_partial(results: Path) -> None:
    from lorascale.store.manifest import read_manifest
    from lorascale.store.run_directory import effective_status

    manifest = read_manifest(results)  # the caller has already read it whole: it exists and is valid
    status = effective_status(results, manifest) if manifest is not None else "unknown"
    if status != "complete":
        click.echo(f"lorascale: warning: PARTIAL RESULTS: the run is {status}; totals are incomplete", err=True)


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Report directory (default RESULTS/report).")
@click.option("--matrix", "matrices", multiple=True, help="Matrix for the heatmaps and spectra (repeatable).")
@click.option("--order", type=click.Choice(["as-given", "name"]), default="as-given", show_default=True,
              help="Model order in tables and legends: as given, or natural name order.")
@click.option("--series/--no-series", "series", default=None,
              help="Draw the tuned models as a checkpoint series in the report (default: only when their names "
                   "are checkpoints of one run, e.g. run/checkpoint-200 or org/name@step1000).")
@click.option("--partial", "allow_partial", is_flag=True,
              help="Also report a run that is not complete; the page is marked PARTIAL RESULTS.")
def report(results: Path, out: Path | None, matrices: tuple[str, ...], order: str, series: bool | None,
           allow_partial: bool) -> None:
    """Write figures (PNG, SVG) and an offline index.html from a run's tables."""
    from lorascale.report import build_report

    index = build_report(results, out, matrices=list(matrices) or None, order=order,  # type: ignore[arg-type]
                         series=series, allow_partial=allow_partial)
    if allow_partial:
        _warn_if_partial(results)
    click.echo(str(index))


from lorascale.cli.cache import cache as _cache_commands  # noqa: E402  (lorascale cache ls | rm | prune)

main.add_command(_cache_commands)
