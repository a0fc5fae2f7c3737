"""The `lorascale` command: each subcommand parses options and calls one library function."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from lorascale import __version__, settings
from lorascale.errors import LorascaleError
from lorascale.numerics.backends import BACKEND_CHOICES, DEVICE_CHOICES


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, Kubernetes, `ray job stop`), handled like Ctrl-C: results flushed, run `interrupted`."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


class _Group(click.Group):
    """Maps lorascale errors to one line on stderr and an exit code; LORASCALE_DEBUG=1 shows tracebacks."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return super().invoke(ctx)
        except LorascaleError as exc:
            if settings.debug():
                raise
            click.echo(f"lorascale: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
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
            click.echo(f"lorascale: internal error: {type(exc).__name__}: {exc} (at {Path(where.filename).name}:"
                       f"{where.lineno}; set LORASCALE_DEBUG=1 for the traceback and please report it)", err=True)
            ctx.exit(70)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorascale")
def main() -> None:
    """Compare a base checkpoint with fine-tunes through the SVD of every weight matrix."""


class _Progress:
    """A progress bar on stderr, created on the first finished matrix."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.shown = enabled, None, 0

    def __call__(self, done: int, total: int, matrix: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label="matrices", file=sys.stderr, show_pos=True,
                                         show_eta=True, item_show_func=lambda m: m or "")
            self.bar.__enter__()
        self.bar.update(done - self.shown, matrix)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _print_summary(out: Path) -> None:
    from lorascale.report import format_summary, summary_rows

    click.echo(format_summary(summary_rows(out), "table"))


@main.command()
@click.option("--base", required=True, help="Base checkpoint: directory, .safetensors file, or org/name[@rev].")
@click.option("--tuned", "tuned", multiple=True, required=True, help="A fine-tune (full or LoRA adapter); repeatable.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Results directory.")
@click.option("--k", default=10, show_default=True, help="Top tuned singular vectors checked for intruders.")
@click.option("--epsilon", default=0.5, show_default=True, help="Intruder threshold on max |cos|.")
@click.option("--side", type=click.Choice(["left", "right", "both"]), default="left", show_default=True,
              help="Singular vectors compared: left (output space, as in the paper), right, or both.")
@click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True)
@click.option("--device", default="auto", show_default=True, help=f"{DEVICE_CHOICES}.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="SVD backend: torch (LAPACK; cuSOLVER gesvd on CUDA), cupy (CUDA), or gram (float64 "
                   "Gram-matrix eigensolver, see benchmarks/README.md).  auto: torch on CUDA and at fp64; on a "
                   "CPU at fp32 a probe picks torch or gram per quantity (manifest.json \"routes\").")
@click.option("--mode", type=click.Choice(["exact", "topk"]), default="exact", show_default=True,
              help="exact: max_cos for every tuned vector.  topk: only for the top --top-k (all singular values "
                   "still computed), guarded against the exact result.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tuned singular vectors computed in --mode topk (at least --k).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Cache of base SVDs, reused across runs (default: $LORASCALE_CACHE_DIR or ~/.cache/lorascale).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the base-SVD cache.")
@click.option("--include", multiple=True, help="Glob on base tensor names to analyse (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on base tensor names to skip (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace a different earlier run in --out.")
@click.option("--resume", is_flag=True, help="Require an earlier run in --out and continue it.")
@click.option("--report", "make_report", is_flag=True, help="Also write RESULTS/report/ (figures + index.html).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--ray-address", default=None,
              help="Run on Ray: auto, ray://host:10001, host:port, or local (default: $RAY_ADDRESS; else in-process).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray workers (more than 1 starts a local Ray when no address is given). "
                   "Default: one per GPU of the cluster, else its CPUs / --cpus-per-worker.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs (and torch threads) per Ray worker.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs per Ray worker (default 1 when the cluster has GPUs; 0.5 shares a GPU by two).")
def run(base: str, tuned: tuple[str, ...], out: Path, k: int, epsilon: float, side: str, precision: str,
        device: str, include: tuple[str, ...], exclude: tuple[str, ...], overwrite: bool, resume: bool,
        quiet: bool, ray_address: str | None, workers: int | None, cpus_per_worker: float | None,
        gpus_per_worker: float | None, backend: str, mode: str, top_k: int, cache_dir: Path | None,
        no_cache: bool, make_report: bool) -> None:
    """Compare BASE with each --tuned checkpoint and write Parquet tables to --out."""
    from lorascale.execute.executor import public_command
    from lorascale.pipeline import compare

    progress = _Progress(enabled=not quiet)
    argv = public_command(sys.argv[1:])  # the manifest records the command: never credentials an address carries
    try:
        result = compare(base, list(tuned), out, k=k, epsilon=epsilon, side=side, precision=precision,
                         device=device, include=include, exclude=exclude, overwrite=overwrite, resume=resume,
                         ray_address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker,
                         gpus_per_worker=gpus_per_worker, backend=backend, mode=mode, top_k=top_k,
                         cache_dir=cache_dir, use_cache=not no_cache, progress=progress,
                         command=shlex.join(["lorascale", *argv]))
    finally:
        progress.close()
    note = f" (resumed: {result.computed} of {result.planned} computed now)" if result.manifest.resumed else ""
    click.echo(f"wrote {out}{note}", err=True)
    _print_summary(out)
    if make_report:
        from lorascale.report import build_report

        click.echo(f"report: {build_report(out)}", err=True)


@main.command()
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(reference: str, as_json: bool) -> None:
    """Describe a checkpoint: kind, shards, dtypes, matrices, adapter settings."""
    from lorascale.inspect import describe_checkpoint

    info = describe_checkpoint(reference)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, (dict, list)) and value:
            click.echo(f"{key}:")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for sub_key, sub_value in items:
                click.echo(f"  {sub_key}: {sub_value}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory for the demo checkpoints (checkpoints/) and results (results/).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def demo(out: Path, quiet: bool) -> None:
    """Offline: build a small base, a full fine-tune and a LoRA adapter, and compare them."""
    from lorascale.demo import build_checkpoints
    from lorascale.pipeline import compare

    paths = build_checkpoints(out / "checkpoints")
    progress = _Progress(enabled=not quiet)
    try:
        compare(str(paths["base"]), [str(paths["full"]), str(paths["lora"])], out / "results", overwrite=True,
                progress=progress, command=shlex.join(["lorascale", *sys.argv[1:]]))
    finally:
        progress.close()
    click.echo(f"wrote {out / 'results'}", err=True)
    _print_summary(out / "results")


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--order", type=click.Choice(["as-given", "name"]), default="as-given", show_default=True,
              help="Model order: as given on the command line, or natural name order (checkpoint-200 < -1000).")
@click.option("--partial", "allow_partial", is_flag=True,
              help="Also summarise a run that is not complete (failed, interrupted, running); marked PARTIAL.")
def summary(results: Path, fmt: str, order: str, allow_partial: bool) -> None:
    """Print the per-model summary of a finished run."""
    from lorascale.report import format_summary, summary_rows

    rows = summary_rows(results, order=order, allow_partial=allow_partial)  # type: ignore[arg-type]
    if allow_partial:
        _warn_if_partial(results)
    click.echo(format_summary(rows, fmt))  # type: ignore[arg-type]


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
              help="Model order, e.g. for a checkpoint series: as given, or natural name order.")
@click.option("--partial", "allow_partial", is_flag=True,
              help="Also report a run that is not complete; the page is marked PARTIAL RESULTS.")
def report(results: Path, out: Path | None, matrices: tuple[str, ...], order: str, allow_partial: bool) -> None:
    """Write figures (PNG, SVG) and an offline index.html from a run's tables."""
    from lorascale.report import build_report

    index = build_report(results, out, matrices=list(matrices) or None, order=order,  # type: ignore[arg-type]
                         allow_partial=allow_partial)
    if allow_partial:
        _warn_if_partial(results)
    click.echo(str(index))
