"""The declaration of an option: everything about it besides its name, type and default (the dataclass field of
request.py that carries it), written once, as that field's metadata.

    k: int = field(default=10, metadata=declare("Top tuned singular vectors checked for intruders.",
                                                identity=True, controls="matrices.intruders"))

From the declarations come the CLI's options and flags (cli/flags.py, cli/__init__.py), the run's identity
(run_identity.RUN_OPTIONS, manifest_options) and the options table of docs/REFERENCE.md (cli/reference.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, fields
from typing import Any

ALL_COMMANDS = ("run", "mitigate")


@dataclass(frozen=True)
class OptionSpec:
    """How an option is shown, parsed and recorded (the field has its name, type and default)."""

    help: str  # one or two sentences: `--help`, docs/REFERENCE.md
    commands: tuple[str, ...] = ALL_COMMANDS  # the CLI commands that take it; (): the Python API only
    identity: bool = False  # a rerun with another value is another run (run_identity.RUN_OPTIONS)
    controls: str = ""  # the table, column or file it changes (docs/REFERENCE.md)
    flag: str | None = None  # the CLI flag; None: --name-with-dashes
    parse: str = "value"  # value (the default's type), choice, path, multiple, flag, int>=1, number>0, number>=0
    choices: Sequence[str] = ()  # parse="choice"
    metavar: str | None = None
    false_flag: bool = False  # the flag sets the field False (use_cache: --no-cache)
    off_flag: str | None = None  # the flag that sets a default-None boolean False (series: --no-series)


def declare(help: str, **spec: Any) -> dict[str, OptionSpec]:
    """The metadata of a field that is an option."""
    return {"option": OptionSpec(help, **spec)}


def spec_of(field_: Field) -> OptionSpec | None:
    return field_.metadata.get("option")


def declared(records: Mapping[str, type]) -> list[tuple[str, Field, OptionSpec]]:
    """(record name, field, spec) of every declared option of `records`, in record and field order."""
    return [(name, f, spec) for name, record in records.items() for f in fields(record)
            if (spec := spec_of(f)) is not None]


def default_of(field_: Field) -> Any:
    """The field's default value (a default_factory called)."""
    from dataclasses import MISSING

    return field_.default_factory() if field_.default_factory is not MISSING else field_.default
