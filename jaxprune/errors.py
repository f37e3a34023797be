"""Errors that mean "the input is wrong": the CLI prints them as one line, without a traceback.

Every other exception is a bug and keeps its traceback. Raise a `UserError` subclass only when
the message names the problem and what to do about it.

    UserError
      ConfigError        a config key or value (also a ValueError, for older callers)
      DataError          data that cannot be read (truncated file, corrupt cache)
      WorkdirError       a workdir that cannot be used (a file, read-only, locked by a run)
        WorkdirLockedError
      CheckpointError    (jaxprune.checkpoint) mismatched or corrupt checkpoints
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong (unknown key, value out of range, NaN, …)."""


class DataError(UserError):
    """The data exists but cannot be read."""


class WorkdirError(UserError):
    """The workdir cannot be used."""


class WorkdirLockedError(WorkdirError):
    """Another live process runs on the same workdir."""


class NotFoundError(UserError, FileNotFoundError):
    """Something asked for (a saved model, a config file) does not exist."""
