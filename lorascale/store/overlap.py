"""--out never holds an input, and no input holds --out.

`lorascale run` and `lorascale mitigate` delete and write inside --out (--overwrite removes the earlier
run's files, mitigate replaces out/adapter/).  An input inside --out could be deleted before it is read
(`mitigate --adapter OUT/adapter --out OUT --overwrite` did exactly that), and an --out inside an input
directory writes into the checkpoint.  So before anything is created, deleted or written, every input (the
base, each tuned model or adapter: the directory, every file read, and for a Hub reference its snapshot and
the blobs its files link to, or before resolving, the hub cache) is compared with --out, both taken through
symbolic links, and any overlap is refused (OptionError, exit 2), naming both paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lorascale.errors import OptionError, option
from lorascale.io.checkpoint import Checkpoint
from lorascale.io.resolve import local_path
from lorascale.settings import hub_settings

_FIX = (f"choose an {option('out')} outside every input, and no input inside it: lorascale deletes and writes "
        f"in {option('out')}, and {option('overwrite', True)} removes its earlier files")


@dataclass(frozen=True)
class InputPath:
    """A path a run reads: `what` names it in messages; `may_hold_out`: an --out inside it is refused too
    (a checkpoint directory, a snapshot), not for the hub cache as a whole (an --out there is harmless)."""

    what: str
    path: Path
    may_hold_out: bool = True


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def refuse_overlap(out: Path, inputs: Iterable[InputPath]) -> None:
    """OptionError (exit 2) when an input lies inside `out` (or is it), or `out` lies inside an input."""
    target = _real(out)
    for item in inputs:
        real = _real(item.path)
        through = "" if real == Path(os.path.abspath(os.path.expanduser(item.path))) else f" (through links: {real})"
        if real == target or target in real.parents:
            raise OptionError(f"{item.what} lies inside {option('out')}: {item.path}{through} is in {out}", fix=_FIX)
        if item.may_hold_out and real in target.parents:
            raise OptionError(f"{option('out')} lies inside {item.what}: {out} is in {item.path}{through}", fix=_FIX)


def reference_inputs(references: Iterable[tuple[str, str]]) -> list[InputPath]:
    """Before resolving (nothing read or downloaded yet): (role, reference) -> the local path a reference
    names, or for a Hub reference the hub cache it is read from."""
    inputs = []
    for role, reference in references:
        path = local_path(reference)
        if path is not None:
            inputs.append(InputPath(f"the {role} {reference}", path))
        else:
            inputs.append(InputPath(f"the hub cache of the {role} {reference}", hub_settings().cache_dir,
                                    may_hold_out=False))
    return inputs


def checkpoint_inputs(role: str, checkpoint: Checkpoint) -> list[InputPath]:
    """After resolving: the checkpoint's directory (a Hub snapshot for a Hub reference; not the folder around
    a single-file reference) and every file it reads, each followed through its links (Hub blobs)."""
    resolved = checkpoint.resolved
    what = f"the {role} {checkpoint.reference}"
    inputs = [] if resolved.source == "local-file" else [InputPath(what, resolved.root)]
    files = (*resolved.weight_files, resolved.index_file, resolved.adapter_config, resolved.config)
    inputs += [InputPath(what, path) for path in files if path is not None]
    return inputs
