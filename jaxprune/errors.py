"""Errors that mean "the input is wrong": the CLI prints them as one line, without a traceback.

Every other exception is a bug and keeps its traceback. Raise a `UserError` subclass only when
the message names the problem and what to do about it.

    UserError
      ConfigError        a config key or value (also a ValueError, for older callers)
      DataError          data that cannot be read (truncated file, corrupt cache)
      WorkdirError       a workdir that cannot be used (a file, read-only, locked by a run)
        WorkdirLockedError
      CheckpointError    (jaxprune.checkpoint) mismatched or corrupt checkpoints
      ModelFileError     a file of a saved model or an export is missing, damaged or altered
      InputError         a predictor's or loader's argument (dtype, range, shape; a ValueError)
"""
from __future__ import annotations

import logging
import re

# Whole library messages and tracebacks behind a one-line error (orbax / TensorStore): the CLI
# writes them to the run's log file (`workdir/jaxprune.log`), never to the terminal; elsewhere
# they are dropped unless this logger is set to INFO.
details = logging.getLogger("jaxprune.details")


def short(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` in at most `limit` characters: what a one-line error
    may quote of a library's exception (TensorStore specs and orbax tracebacks run to thousands
    of characters; log the rest). A TensorStore spec is dropped; a longer chain of "Error …:
    Error …: cause" keeps its start and its end, where the cause is."""
    text = str(e).strip().splitlines()[0].strip() if str(e).strip() else ""
    text = re.sub(r"\s*\[tensorstore_spec\b.*$", "", text)  # also `tensorstore_spec[1]=`
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if len(text) <= limit:
        return text
    head = limit // 4
    return text[:head] + " … " + text[-(limit - head - 3):]


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


class ModelFileError(UserError):
    """A file of a saved model (`models/<method>/`) or of an export is missing, damaged or
    altered; the message names the file and how to get a good one."""


class InputError(UserError, ValueError):
    """An argument to a predictor or a loader has the wrong type, dtype, range or shape; the
    message names what is expected."""
