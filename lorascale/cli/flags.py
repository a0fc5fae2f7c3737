"""The one table from lorascale's option names (request.py fields, `lorascale.compare` keywords) to the flags of
the `lorascale` command, and what the CLI spells with it: error messages (errors.option() marks) and the
command a manifest records.  The library never speaks in flags; only this module does.
"""

from __future__ import annotations

import shlex
from typing import Any

from lorascale.errors import NO_VALUE, LorascaleError, keyword_spelling
from lorascale.optionspec import OptionSpec, declared
from lorascale.request import RECORDS, RunRequest
from lorascale.run_identity import keywords
from lorascale.scrub import public_address

# The options of the request (request.py, each declared once: optionspec.py) that the CLI takes, by field.
OPTIONS: dict[str, OptionSpec] = {f.name: spec for _, f, spec in declared(RECORDS) if spec.commands}
# The order `lorascale run --help` lists the options in, and a recorded command writes them in: these names
# first, then any option declared since, in declaration order.
ORDER = ("base", "tuned", "label", "out", "k", "epsilon", "side", "precision", "device", "backend", "mode", "top_k",
         "cache_dir", "use_cache", "no_pickle", "scratch_dir", "include", "exclude", "rename", "overwrite", "resume",
         "report", "series", "dry_run", "as_json", "ray_address", "workers", "cpus_per_worker", "gpus_per_worker",
         "mitigation_lambda", "rank")
# Flags that are not request options: the references (mitigate's --adapter is the one tuned reference), the dry
# run, and `lorascale summary` / `report`.
_OTHER_FLAGS = {"base": "--base", "tuned": "--tuned", "label": "--label", "out": "--out", "dry_run": "--dry-run", "as_json": "--json", "partial": "--partial",
                "matrix": "--matrix", "order": "--order", "by": "--by", "format": "--format"}


def flag_of(name: str, spec: OptionSpec) -> str:
    """A declared option's flag: its own, else --name-with-dashes."""
    return spec.flag or "--" + name.replace("_", "-")


# Field -> flag, in ORDER.
FLAGS: dict[str, str] = {name: flag_of(name, OPTIONS[name]) if name in OPTIONS else _OTHER_FLAGS[name]
                         for name in (*ORDER, *(n for n in OPTIONS if n not in ORDER),
                                      *(n for n in _OTHER_FLAGS if n not in ORDER))}
# Booleans whose flag sets them False (use_cache=False is --no-cache), and the flag that sets a default-None
# boolean False (series=False is --no-series).
FALSE_FLAGS = {name for name, spec in OPTIONS.items() if spec.false_flag}
OFF_FLAGS = {name: spec.off_flag for name, spec in OPTIONS.items() if spec.off_flag}


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
    (scrub.public_address)."""
    given = keywords(request)
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
