"""The two kinds of error every `opt` command reports as one line (never a traceback)."""

from __future__ import annotations


class UsageError(Exception):
    """A bad argument from the user (a missing folder, a value out of range): `opt CMD: message`, exit 2."""

    exit_code = 2


class InputError(Exception):
    """An input the command read is unusable (a truncated header, a FIFO where a file should be):
    `opt CMD: message`, exit 1."""

    exit_code = 1
