"""The exceptions deltapack raises.

Every error of the engine is a :class:`DeltapackError`; its subclass tells what kind of
problem it is, as the CLI's exit codes do. Messages name the file and tensor involved and,
where a keyword argument answers the problem, end with a ``hint:`` line naming it.
"""

from __future__ import annotations


class DeltapackError(Exception):
    """Base class of every deltapack error (also raised when a call was stopped)."""


class BadInputError(DeltapackError, ValueError):
    """A checkpoint, argument or output location is not acceptable (CLI exit code 2)."""


class WrongBaseError(DeltapackError):
    """The base given is not the one the delta was made from (CLI exit code 3)."""


class CorruptDeltaError(DeltapackError):
    """The delta file is truncated, corrupted or not a deltapack container (CLI exit code 4)."""


class DeltapackIOError(DeltapackError, OSError):
    """Reading or writing a file failed: missing file, permission, disk full (CLI exit code 5).

    It is an :class:`OSError` too, with ``errno`` and ``filename`` set where known.
    """


class MismatchError(DeltapackError):
    """A rebuilt model differs from the fine-tune it was compared with (CLI exit code 6)."""


__all__ = [
    "BadInputError",
    "CorruptDeltaError",
    "DeltapackError",
    "DeltapackIOError",
    "MismatchError",
    "WrongBaseError",
]
