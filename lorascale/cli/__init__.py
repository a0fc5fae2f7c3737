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

from lorascale import settings
from lorascale.cli.flags import FLAGS, OPTIONS, command_line, flag_of, message
from lorascale.cli.progress import Progress
from lorascale.errors import LorascaleError, OptionError
from lorascale.optionspec import OptionSpec, declared, default_of
from lorascale.request import RECORDS
from lorascale.version import __version__

FORMATS = ("table", "json", "csv")  # --format of every command that prints data (inspect, summary)


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


# Options that are not request options (request.py declares those once; _options() makes them click options).
_QUIET = click.option("--quiet", is_flag=True, help="No progress or stage lines on stderr; warnings and errors still show.")
_REFERENCES = {
    "run": {
        "base": click.option("--base", default=None, metavar="REF",
                             help="Base checkpoint: directory, .safetensors or .bin file, or org/name[@rev]; NAME=REF "
                                  "labels it.  Optional when every --tuned is an adapter: the base its "
                                  "adapter_config.json names (base_model_name_or_path)."),
        "tuned": click.option("--tuned", "tuned", multiple=True, required=True, metavar="REF",
                              help="A fine-tune of --base, full or LoRA adapter, as for --base; repeatable.  NAME=REF "
                                   "labels it in tables, legends and the summary: NAME is letters, digits, _ . + -, "
                                   "and the text is split on its first '=' only when it is not an existing path."),
        "label": click.option("--label", "label", multiple=True, metavar="NAME",
                              help="The label of each --tuned, in order (one per --tuned; the same as --tuned "
                                   "NAME=REF): what the summary, tables, report and legends show.  Default: the "
                                   "model's directory or repo name, lengthened where two would be alike."),
        "out": click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
                            help="Results directory."),
        "dry_run": click.option("--dry-run", is_flag=True,
                                help="Resolve, read headers, match names and print the plan: matrices per model, "
                                     "tensors not analysed and why, matrices per route, bytes to read and download, "
                                     "the base-SVD cache after the run, peak memory and a time estimate calibrated on "
                                     "this machine (stored in the cache directory, the one file a dry run writes).  "
                                     "Nothing is computed."),
        "as_json": click.option("--json", "as_json", is_flag=True,
                                help="With --dry-run: print the plan as JSON (seconds, bytes)."),
    },
    "mitigate": {
        "base": click.option("--base", default=None, metavar="REF",
                             help="The base checkpoint the adapter was trained on (as for run; default: the one its "
                                  "adapter_config.json names)."),
        "tuned": click.option("--adapter", "tuned", required=True, metavar="REF",
                              help="The PEFT LoRA adapter to mitigate: directory, adapter file, or org/name[@rev]."),
        "out": click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
                            help="Output: DIR/adapter (the mitigated adapter), DIR/mitigation (what was done), and the "
                                 "tables."),
    },
}
_TYPES = {"choice": None, "path": click.Path(path_type=Path), "int>=1": click.IntRange(min=1),
          "number>0": click.FloatRange(min=0, min_open=True), "number>=0": click.FloatRange(min=0)}


def _click_option(name: str, spec: OptionSpec, default: Any) -> Any:
    """The click option of a declared request option (optionspec.OptionSpec.parse says how it is parsed)."""
    flag = flag_of(name, spec)
    if spec.parse == "flag":
        if spec.false_flag:
            return click.option(flag, name, flag_value=False, default=True, help=spec.help)
        if spec.off_flag:
            return click.option(f"{flag}/{spec.off_flag}", name, default=None, help=spec.help)
        return click.option(flag, name, is_flag=True, help=spec.help)
    extra: dict[str, Any] = {"metavar": spec.metavar} if spec.metavar else {}
    if spec.parse == "multiple":
        return click.option(flag, name, multiple=True, help=spec.help, **extra)
    if spec.parse == "choice":
        extra["type"] = click.Choice(list(spec.choices))
    elif spec.parse in _TYPES:
        extra["type"] = _TYPES[spec.parse]
    return click.option(flag, name, default=default, show_default=default is not None, help=spec.help, **extra)


def _options(command: str) -> Any:
    """Every option of `command`: its references, then the request options that it takes, in FLAGS order, then
    --quiet.  A request option declared in request.py appears here without another edit."""
    defaults = {f.name: default_of(f) for _, f, _ in declared(RECORDS)}
    own = _REFERENCES[command]
    decorators = [own[name] if name in own else _click_option(name, OPTIONS[name], defaults[name])
                  for name in FLAGS if name in own or (name in OPTIONS and command in OPTIONS[name].commands)]
    decorators.append(_QUIET)

    def apply(function: Any) -> Any:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


@main.command()
@_options("run")
def run(quiet: bool, dry_run: bool, as_json: bool, **options: Any) -> None:
    """Compare the --base checkpoint with each --tuned checkpoint and write Parquet tables to --out.

    A checkpoint is a directory, a .safetensors or .bin file, or a Hugging Face repo org/name[@revision].
    """
    from lorascale.cli.format import format_plan
    from lorascale.pipeline import compare, plan_run
    from lorascale.request import build_request

    if as_json and not dry_run:
        raise OptionError("--json prints a dry run's plan", fix="add --dry-run, or leave --json out")
    request = build_request(options.pop("base"), list(options.pop("tuned")), options.pop("out"),
                            environment=settings.run_environment(), **options)
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
@_options("mitigate")
def mitigate(quiet: bool, **options: Any) -> None:
    """Scale down the intruder dimensions of a LoRA adapter and write the result as a PEFT adapter.

    Per adapted matrix: the intruders among the top --k singular vectors of W = W0 + s B A (max_cos < --epsilon,
    as `run` counts them), W' = W + (lambda - 1) * their components, and new factors for dW' = W' - W0.
    Matrices without intruders are copied unchanged.
    """
    from lorascale.pipeline import mitigate as run_mitigation
    from lorascale.report.mitigation import format_mitigation, mitigation_summary
    from lorascale.request import build_request

    request = build_request(options.pop("base"), options.pop("tuned"), options.pop("out"), mitigate=True,
                            environment=settings.run_environment(), **options)
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
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Text, JSON, or CSV (one row per tensor with --tensors, else key,value).")
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Same as --format json (kept for old scripts).")
@click.option("--no-pickle", is_flag=True, help="Refuse pickled .bin weights.")
@click.option("--tensors", "list_all", is_flag=True,
              help="List every tensor: name, shape, dtype and what a default run does with it "
                   "(the names --include and --exclude globs match).")
def inspect(reference: str, fmt: str, as_json: bool, list_all: bool, no_pickle: bool) -> None:
    """Describe checkpoint REF from its headers: kind, format, files, dtypes, matrices, adapter settings.

    REF is a directory, a .safetensors or .bin file, or org/name[@rev]; a hub repo's weights are not downloaded.
    """
    from lorascale.cli.format import format_description, format_rows_csv, format_tensors
    from lorascale.inspect import describe_checkpoint, list_tensors

    fmt = "json" if as_json else fmt
    if list_all:
        rows = list_tensors(reference, allow_pickle=not no_pickle)
        text = {"json": lambda: json.dumps(rows, indent=2), "table": lambda: format_tensors(rows),
                "csv": lambda: format_rows_csv(rows)}[fmt]()
    else:
        info = describe_checkpoint(reference, allow_pickle=not no_pickle)
        text = {"json": lambda: json.dumps(info, indent=2), "table": lambda: format_description(info),
                "csv": lambda: format_rows_csv([{"key": k, "value": json.dumps(v) if not isinstance(v, str) else v}
                                                for k, v in info.items()])}[fmt]()
    click.echo(text)


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
    request = build_request(paths["base"], [paths["full"], paths["lora"]], out / "results", overwrite=True,
                            environment=settings.run_environment())
    progress = Progress(enabled=not quiet)
    try:
        compare(request, progress=progress, command=command_line(request))
    finally:
        progress.close()
    click.echo(f"wrote {out / 'results'}", err=True)
    _print_summary(out / "results")


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
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
    from lorascale.store.reader import results_root
    from lorascale.store.manifest import read_manifest
    from lorascale.store.run_directory import effective_status

    results = results_root(results)
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
@click.option("--k", type=int, default=None,
              help="Count intruders among the top K tuned vectors instead of the run's k (as summary --k).")
@click.option("--epsilon", type=float, default=None,
              help="Intruder threshold on max |cos| instead of the run's epsilon (as summary --epsilon).")
@click.option("--side", type=click.Choice(["left", "right", "both"]), default=None,
              help="Sides shown, among those the run computed (default: all of them).")
@click.option("--format", "figure_format", type=click.Choice(["png", "pdf"]), default="png", show_default=True,
              help="Figures as PNG + SVG, or also as PDF (for papers), next to index.html.")
def report(results: Path, out: Path | None, matrices: tuple[str, ...], **options: Any) -> None:
    """Write figures (PNG, SVG; PDF with --format pdf) and an offline index.html from a run's tables."""
    from lorascale.report import build_report

    index = build_report(results, out, matrices=list(matrices) or None, **options)
    if options["allow_partial"]:
        _warn_if_partial(results)
    click.echo(str(index))


from lorascale.cli.cache import cache as _cache_commands  # noqa: E402  (lorascale cache ls | rm | prune)

main.add_command(_cache_commands)
