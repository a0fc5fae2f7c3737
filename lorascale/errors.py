"""One exception hierarchy for everything a user can get wrong.

Every error carries the file or tensor it is about and a fix, so the CLI can print one line
(`lorascale: error: <message>`) and exit non-zero without a traceback.
"""

from __future__ import annotations


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
