"""`lorascale cache ls | rm | prune`: see, remove and bound the base-SVD cache (in the spirit of `hf cache scan`
and `hf cache delete`).  What is listed and deleted is chosen in lorascale/store (svd_cache.survey,
cache_admin); this module parses options, asks, and prints."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lorascale import settings
from lorascale.errors import OptionError
from lorascale.sizes import format_size as size, parse_size

if TYPE_CHECKING:  # the store modules import torch: only when a cache command runs, not at `lorascale --help`
    from lorascale.store.svd_cache import CacheEntry, CacheSurvey

_CACHE_DIR = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                          help="The cache (default: $LORASCALE_CACHE_DIR, else ~/.cache/lorascale).")


def _directory(cache_dir: Path | None) -> Path:
    return cache_dir.expanduser().absolute() if cache_dir is not None else settings.cache_dir()


@click.group("cache")
def cache() -> None:
    """See, remove and bound the cache of base SVDs that `lorascale run` keeps (--cache-dir)."""


@cache.command("ls")
@_CACHE_DIR
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Aligned text, or JSON with every field.")
def ls(cache_dir: Path | None, fmt: str) -> None:
    """List the cached base SVDs: source model and tensor, shape, sides, precision, bytes, last use; a total."""
    directory = _directory(cache_dir)
    from lorascale.store.svd_cache import survey

    found = survey(directory)
    bound = settings.cache_max_size()
    if fmt == "json":
        click.echo(json.dumps(_as_json(directory, found, bound), indent=2))
        return
    rows = [(e.source or "?", e.tensor or "?", "x".join(map(str, e.shape)) or "?", ",".join(e.sides),
             e.precision or "?", size(e.nbytes), _when(e.last_used)) for e in _ordered(found.entries)]
    rows += [("(unreadable)", str(f.path.relative_to(directory)), "", "", "", size(f.nbytes), _when(f.last_used))
             for f in found.unreadable]
    if rows:
        header = ("SOURCE", "TENSOR", "SHAPE", "SIDES", "PRECISION", "SIZE", "LAST USED")
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    total = sum(e.nbytes for e in found.entries)
    click.echo(f"{len(found.entries)} entries, {size(total)} in {directory}; bound {size(bound or 0)}")
    if found.unreadable:
        click.echo(f"{len(found.unreadable)} unreadable entry files, {size(sum(f.nbytes for f in found.unreadable))}"
                   " (damaged or of an older format; `lorascale cache prune` removes them)")
    if found.foreign:
        click.echo(f"{len(found.foreign)} foreign files or folders under {directory / 'base-svd'}, "
                   f"{size(sum(f.nbytes for f in found.foreign))}: not lorascale's, never read or deleted")


def _ordered(entries: list[CacheEntry]) -> list[CacheEntry]:
    return sorted(entries, key=lambda e: (e.source or "", e.tensor or "", e.key))


def _when(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _as_json(directory: Path, found: CacheSurvey, bound: int | None) -> dict:
    def entry(e: CacheEntry) -> dict:
        return {**asdict(e), "path": str(e.path), "last_used": _iso(e.last_used)}

    def other(f) -> dict:
        return {"path": str(f.path), "nbytes": f.nbytes, "last_used": _iso(f.last_used)}

    return {"directory": str(directory), "max_bytes": bound, "total_bytes": sum(e.nbytes for e in found.entries),
            "entries": [entry(e) for e in _ordered(found.entries)], "unreadable": [other(f) for f in found.unreadable],
            "temporary": [other(f) for f in found.temporary], "foreign": [other(f) for f in found.foreign]}


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


@cache.command("rm")
@click.argument("reference", required=False, metavar="[BASE]")
@click.option("--all", "remove_all", is_flag=True, help="Remove every entry (foreign files are left alone).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_CACHE_DIR
def rm(reference: str | None, remove_all: bool, yes: bool, cache_dir: Path | None) -> None:
    """Remove the entries of base model BASE (a hub repo id or a local path, as given to --base), or --all."""
    if (reference is None) == (not remove_all):
        raise OptionError("give a base model reference or --all, not both and not neither",
                          fix="e.g. lorascale cache rm meta-llama/Llama-2-7b-hf, or lorascale cache rm --all")
    directory = _directory(cache_dir)
    from lorascale.store.svd_cache import survey

    found = survey(directory)
    from lorascale.store import cache_admin

    removal = cache_admin.everything(found) if remove_all else cache_admin.for_source(found, str(reference))
    if not len(removal):
        what = "" if remove_all else f" recorded for {reference!r} (`lorascale cache ls` lists the sources)"
        click.echo(f"lorascale: nothing to remove: no entries{what} in {directory}", err=True)
        return
    question = f"Remove {len(removal)} files, {size(removal.nbytes)}, from {directory}?"
    if not yes:
        if not sys.stdin.isatty():
            raise OptionError(f"{question.rstrip('?')} needs a confirmation, and the input is not a terminal",
                              fix="pass --yes to remove them without asking")
        if not click.confirm(question, default=False, err=True):
            click.echo("lorascale: nothing removed", err=True)
            return
    count, freed = cache_admin.delete(removal)
    click.echo(f"removed {count} files, {size(freed)}, from {directory}", err=True)


@cache.command("prune")
@click.option("--max-size", "max_size", required=True, metavar="SIZE",
              help="Keep at most this much (50GB, 500MiB, bytes): least recently used entries go first, after "
                   "unreadable ones.")
@_CACHE_DIR
def prune(max_size: str, cache_dir: Path | None) -> None:
    """Remove least recently used entries until the cache holds at most --max-size."""
    try:
        max_bytes = parse_size(max_size)
    except ValueError as exc:
        raise OptionError(f"--max-size: {exc}", fix="e.g. --max-size 50GB") from None
    directory = _directory(cache_dir)
    from lorascale.store.svd_cache import survey

    found = survey(directory)
    from lorascale.store import cache_admin
    from lorascale.store.svd_cache import BaseSpectrumCache

    count, freed = cache_admin.delete(cache_admin.to_fit(found, max_bytes))
    left = BaseSpectrumCache(directory).total_bytes()
    click.echo(f"removed {count} files, {size(freed)}; {size(left)} left in {directory}", err=True)
