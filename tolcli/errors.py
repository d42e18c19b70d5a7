"""One error type for everything a user can get wrong, with documented exit codes.

Every user-facing failure raises a :class:`TolcliError` (or a subclass). The CLI turns it into one line
on stderr and the exit code below; ``--debug`` shows the traceback instead. The codes are part of the
public contract (``docs/cli.md``) and are never reused for another meaning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path

# A Python parameter named in a message, written `like_this`: the library prints the name, the CLI the flag.
_PARAM = re.compile(r"`([a-z_][a-z0-9_]*)`")


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug in tolcli: please report it (rerun with --debug for the traceback)
    USAGE = 2  # bad command-line usage (unknown option, invalid value)
    QUALITY_GATE = 3  # eval-ppl's or sweep's --max-increase was exceeded
    BAD_INPUT = 4  # an input file is missing, unreadable, malformed or inconsistent
    VERIFY_FAILED = 5  # a checksum, shape or dtype does not match the manifest
    OUTPUT = 6  # the output cannot be written (exists without --force, unwritable, disk full)
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL: "internal error: a bug in tolcli (rerun with --debug and report the traceback)",
    ExitCode.USAGE: "bad command-line usage: unknown option, invalid or contradictory values",
    ExitCode.QUALITY_GATE: "quality gate failed: a variant exceeded eval-ppl's or sweep's --max-increase",
    ExitCode.BAD_INPUT: "bad input: a file is missing, unreadable, malformed or inconsistent",
    ExitCode.VERIFY_FAILED: "verification failed: a checksum, shape or dtype differs from the manifest",
    ExitCode.OUTPUT: "cannot write the output: it exists (use --force), another tolcli run is writing it, the directory"
    " is unwritable, or the disk is full",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGTERM, SIGHUP); no partial output is left at the output path",
}


class TolcliError(Exception):
    """Base class of every error tolcli reports to a user.

    Args:
        message: what is wrong, naming the file/tensor/key concerned; a Python parameter is written
            `` `batch_rows` `` so that the CLI can name its flag instead (:meth:`one_line`).
        hint: how to fix it (optional); printed after the message.
        path: the file concerned, if any (prefixed to the message when it is not already named).
    """

    exit_code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None):
        self.message = message
        self.hint = hint
        self.path = None if path is None else Path(path)
        super().__init__(self.one_line())

    def one_line(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message in one line; ``name_of`` maps each `parameter` it names (e.g. to a CLI flag)."""
        text, hint = self.parts(name_of)
        return f"{text} (hint: {hint})" if hint else text

    def parts(self, name_of: Callable[[str], str] | None = None) -> tuple[str, str | None]:
        """``(message, hint)`` as :meth:`one_line` words them: the path prefixed to the message when it does not
        name it, each `parameter` mapped by ``name_of``; the hint None when there is none."""
        text = self.message
        if self.path is not None and str(self.path) not in text:
            text = f"{self.path}: {text}"
        sub = lambda t: _PARAM.sub(lambda m: (name_of or str)(m.group(1)), t)  # noqa: E731
        return sub(text), (sub(self.hint) if self.hint else None)


class InputError(TolcliError):
    """An input file or value is missing, unreadable, malformed or inconsistent."""

    exit_code = ExitCode.BAD_INPUT


class CheckpointError(InputError):
    """A model checkpoint (config, weights, index) is unusable."""


class UsageError(TolcliError):
    """Options that contradict each other or cannot apply to this input."""

    exit_code = ExitCode.USAGE


class OutputError(TolcliError):
    """The output cannot be written."""

    exit_code = ExitCode.OUTPUT


class VerifyError(TolcliError):
    """Stored data does not match what its manifest declares."""

    exit_code = ExitCode.VERIFY_FAILED


class QualityGateError(TolcliError):
    """A measured quality figure exceeded the limit the user set."""

    exit_code = ExitCode.QUALITY_GATE
