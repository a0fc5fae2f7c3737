"""The one table from lorascale's option names (request.py fields, `lorascale.compare` keywords) to the flags of
the `lorascale` command, and what the CLI spells with it: error messages (errors.option() marks) and the
command a manifest records.  The library never speaks in flags; only this module does.
"""

from __future__ import annotations

import shlex
from typing import Any

from lorascale.errors import NO_VALUE, LorascaleError, keyword_spelling
from lorascale.request import RunRequest, public_address

# Field -> flag, in the order `lorascale run --help` lists them (the order of a recorded command).
FLAGS: dict[str, str] = {
    "base": "--base", "tuned": "--tuned", "out": "--out", "k": "--k", "epsilon": "--epsilon", "side": "--side",
    "precision": "--precision", "device": "--device", "backend": "--backend", "mode": "--mode", "top_k": "--top-k",
    "cache_dir": "--cache-dir", "use_cache": "--no-cache", "cache_max_size": "--cache-max-size", "no_pickle": "--no-pickle", "scratch_dir": "--scratch-dir",
    "include": "--include", "exclude": "--exclude", "rename": "--rename", "overwrite": "--overwrite",
    "resume": "--resume", "report": "--report", "series": "--series", "dry_run": "--dry-run",
    "ray_address": "--ray-address", "workers": "--workers", "cpus_per_worker": "--cpus-per-worker",
    "gpus_per_worker": "--gpus-per-worker",
    # lorascale mitigate (its --adapter is the request's one tuned reference)
    "mitigation_lambda": "--lambda", "rank": "--rank",
    # lorascale summary / report
    "partial": "--partial", "matrix": "--matrix", "order": "--order", "by": "--by", "format": "--format",
}
# Booleans whose flag sets them False (use_cache=False is --no-cache), and the flag that sets a default-None
# boolean False (series=False is --no-series).
FALSE_FLAGS = {"use_cache"}
OFF_FLAGS = {"series": "--no-series"}


def flag_spelling(name: str, value: object) -> str:
    """An option as the command line writes it: `--top-k 8`, `--overwrite`, `--no-cache`, `--exclude`.  A
    field without a flag (driver: Python only) keeps its keyword spelling."""
    flag = FLAGS.get(name)
    if flag is None:
        return keyword_spelling(name, value)
    if value is NO_VALUE:
        return flag
    if isinstance(value, bool):
        if name in FALSE_FLAGS:
            return flag if not value else f"no {flag}"
        if not value:
            return OFF_FLAGS.get(name, f"no {flag}")
        return flag
    return f"{flag} {shlex.quote(str(value))}"


def message(error: LorascaleError) -> str:
    """An error's message as the CLI prints it: options spelled as flags."""
    return error.spelled(flag_spelling)


def command_line(request: RunRequest, *, command: str = "run") -> str:
    """The `lorascale run ...` line that reproduces `request`, in one normalised form whatever way it was
    typed (a venv's script path, `python -m`, `--k=5`, a default given): every option that differs from its
    default, in the order of FLAGS, spelled with its long flag.  Credentials in a Ray address are left out
    (request.public_address)."""
    given = request.keywords()
    words = ["lorascale", command]
    for name in FLAGS:
        if name not in given:
            continue
        if command == "mitigate" and name == "tuned":
            words += ["--adapter", given["tuned"][0]]
            continue
        value: Any = given[name]
        if name == "ray_address":
            value = public_address(value)
        words += _words(name, value)
    return shlex.join(words)


def _words(name: str, value: Any) -> list[str]:
    flag = FLAGS[name]
    if isinstance(value, bool):
        if name in FALSE_FLAGS:
            return [] if value else [flag]
        return [flag] if value else [OFF_FLAGS[name]] if name in OFF_FLAGS else []
    if isinstance(value, list):
        return [word for item in value for word in (flag, str(item))]
    return [flag, str(value)]
