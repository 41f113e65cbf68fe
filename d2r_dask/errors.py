"""User-facing errors: what went wrong and how to fix it.

Every error a user can cause with bad input derives from :class:`D2RError`,
so the CLI can print the message without a traceback and exit non-zero,
while programming errors still surface as ordinary exceptions.
"""

from __future__ import annotations

import warnings


class D2RError(Exception):
    """Base class of errors caused by the user's input or configuration."""


class InputError(D2RError, ValueError):
    """An input volume, path or parameter is unusable (message says the fix)."""


class OutputExistsError(D2RError, FileExistsError):
    """The output already exists and ``overwrite`` was not given."""


class IncompleteVolumeError(D2RError):
    """A store was left by an interrupted run and is not a finished volume."""


class CheckpointError(D2RError):
    """A model checkpoint is missing, corrupt or does not match the run."""


class ResumeMismatchError(D2RError):
    """An output holds partial results of a different layout, model or input."""


class ChunkReadError(D2RError):
    """A stored chunk cannot be read (corrupt, truncated or unreadable file); names store, array and chunk."""


class WorkerLostError(D2RError):
    """The cluster worker a training ran on left the cluster (the message says how to resume)."""


class LockedError(D2RError):
    """Another live d2r run holds the output or work directory (the message names it)."""


def renamed(old: str, new: str, value: object) -> object:
    """Accept a value given under a deprecated name, with a warning naming the new one."""
    warnings.warn(f"{old} is deprecated and will be removed; use {new}", FutureWarning, stacklevel=3)
    return value
