"""One exception hierarchy for everything a user can get wrong.

Every error carries the file or tensor it is about and a fix, so the CLI can print one line
(`lorascale: error: <message>`) and exit non-zero without a traceback.

Messages name lorascale's own options by their field names (the keywords of `lorascale.compare`, the fields of
request.RunRequest), written with `option()`: `str(error)` spells them as keywords (`top_k=8`), and the CLI
alone spells them as its flags (`--top-k 8`, lorascale/cli/flags.py), from the same error.  No message is
ever rewritten by matching its text.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# An option inside a message: OPEN name [VALUE repr(value)] CLOSE.  Control characters that no path, tensor
# name or reference printed in a message carries, so that user text is never taken for an option.
_OPEN, _VALUE, _CLOSE = "\x1d", "\x1f", "\x1e"
_OPTION = re.compile(f"{_OPEN}([a-z_]+)(?:{_VALUE}(.*?))?{_CLOSE}", re.DOTALL)
NO_VALUE = object()
# (field name, value or NO_VALUE) -> text: how one audience spells an option.
Spelling = Callable[[str, object], str]


def option(name: str, value: object = NO_VALUE) -> str:
    """An option named in a message: `option("top_k", 8)` reads `top_k=8` from Python and `--top-k 8` on
    the command line; `option("exclude")` reads `exclude` / `--exclude`.  `value` is a str, number or bool."""
    return f"{_OPEN}{name}{_CLOSE}" if value is NO_VALUE else f"{_OPEN}{name}{_VALUE}{value!r}{_CLOSE}"


def spell(text: str, spelling: Spelling) -> str:
    """`text` with every option() in it spelled by `spelling`."""
    import ast

    def one(match: re.Match) -> str:
        value = NO_VALUE if match[2] is None else ast.literal_eval(match[2])
        return spelling(match[1], value)

    return _OPTION.sub(one, text)


def keyword_spelling(name: str, value: object) -> str:
    """Options as Python callers write them: `top_k=8`, `precision='fp64'`, `overwrite=True`, `exclude`."""
    return name if value is NO_VALUE else f"{name}={value!r}"


class LorascaleError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, path: object | None = None, tensor: str | None = None,
                 fix: str | None = None) -> None:
        self.message = message
        self.path = path
        self.tensor = tensor
        self.fix = fix
        parts = []
        if path is not None:
            parts.append(f"{path}")
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        if fix:
            # "message (fix)"; a fix that has parentheses of its own would nest them, so it follows a ";".
            text = f"{text}; {fix}" if "(" in fix or ")" in fix else f"{text} ({fix})"
        super().__init__(text)

    @property
    def text(self) -> str:
        """The whole message with its options unspelled (option() marks): what a wrapping error embeds."""
        return str(self.args[0]) if self.args else ""

    def spelled(self, spelling: Spelling) -> str:
        """The whole message, options spelled by `spelling` (the CLI passes its flag spelling)."""
        return spell(self.text, spelling)

    def __str__(self) -> str:
        return self.spelled(keyword_spelling)

    def relocated(self, path: object) -> LorascaleError:
        """The same error (class, exit code, tensor, fix) about `path` instead: e.g. a Hub file named by its
        repo id rather than its place in the local cache."""
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        LorascaleError.__init__(clone, self.message, path=path, tensor=self.tensor, fix=self.fix)
        return clone


class CheckpointReferenceError(LorascaleError):
    """A checkpoint reference that cannot be resolved (missing path, unknown repo, offline miss)."""

    exit_code = 2


class CheckpointFormatError(LorascaleError):
    """A file that is not a readable checkpoint: corrupt or truncated safetensors, bad index JSON."""

    exit_code = 3


class UnsupportedAdapterError(LorascaleError):
    """A PEFT adapter of a kind lorascale does not analyse (DoRA, non-LoRA PEFT types...)."""

    exit_code = 4


class MismatchError(LorascaleError):
    """Base and tuned checkpoints do not fit together (no shared matrices, shape mismatch)."""

    exit_code = 5


class OutputError(LorascaleError):
    """The output directory cannot be used (already holds another run, locked by a running one)."""

    exit_code = 6


class OptionError(LorascaleError):
    """An option value that makes no sense (k < 1, epsilon outside (0, 1], unknown device...)."""

    exit_code = 2


class NumericalError(LorascaleError):
    """A tensor with NaN/Inf values, or an SVD that did not converge."""

    exit_code = 7


class ExecutionError(LorascaleError):
    """Distributed execution failed: Ray unreachable, no worker could start, or a matrix kept killing workers."""

    exit_code = 8
